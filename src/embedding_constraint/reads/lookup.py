"""The lookup: a constrained ``nn.Embedding`` looks its rows up without building the weight.

`lookup` maps each index to its place in ``[reference; free]`` and gathers from that one
block when the two share it (else from each); `_Lookup` sends gradients to the looked-up free
rows only. `embedding_forward` is the forward `fix_rows` installs on a constrained
``nn.Embedding``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from embedding_constraint.fixed_rows import FixedRows, fast_readable

__all__ = ["embedding_forward", "lookup"]


def _on_host(slot: Tensor) -> bool:
    """Whether a lookup may pick its free rows' lookups out by position (else: `where`).

    On the CPU, eagerly, picking them out is the cheapest: one pass over the batch plus its
    free part. On an accelerator it is a device sync, and under torch.compile a
    data-dependent shape; there the lookup handles the whole batch with `where`.
    """
    return slot.device.type == "cpu" and not torch.compiler.is_compiling()


class _Lookup(torch.autograd.Function):
    """Look rows up from the reference and the free rows; gradients reach looked-up free rows.

    ``slot`` holds each index's place in [reference; free] (``None``: the index itself), and
    ``joined`` is that buffer when the two share one (else ``None``: gather from each).
    ``grad_row`` sends each row's lookups to its row of the backward's gradient: free rows to
    their own, fixed rows to ``spare`` rows after them, which are dropped. So no gradient the
    size of the whole weight is ever formed. The backward is one ``embedding_dense_backward``,
    itself differentiable: double backward works.

    Its forward takes ``ctx`` rather than pairing with ``setup_context``: `Function.apply` then
    skips binding the arguments to the signature, which costs more than a small lookup's
    kernels. (So torch.func transforms cannot run it: `embedding_forward` steps aside for them.)
    """

    @staticmethod
    def forward(
        ctx: Any,
        free: Tensor,
        reference: Tensor,
        joined: Tensor | None,
        indices: Tensor,
        slot: Tensor | None,
        grad_row: Tensor,
        spare: int,
        padding_idx: int | None,
        scale_grad_by_freq: bool,
    ) -> Tensor:
        ctx.free_rows, ctx.spare = free.shape[0], spare
        ctx.padding_idx, ctx.scale_grad_by_freq = padding_idx, scale_grad_by_freq
        slot = indices if slot is None else slot
        if joined is not None:
            out = nn.functional.embedding(slot, joined)
        else:
            out = _gather_apart(free, reference, slot)
        ctx.save_for_backward(indices, grad_row)
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, None, None, None, None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None, None, None
        indices, grad_row = ctx.saved_tensors
        free_rows, spare = ctx.free_rows, ctx.spare
        target = grad_row[indices]
        if ctx.padding_idx is not None:
            target = target.masked_fill(indices == ctx.padding_idx, free_rows)
        grad_free = torch.ops.aten.embedding_dense_backward(
            grad,
            target,
            free_rows + spare,
            free_rows if spare == 1 else -1,
            ctx.scale_grad_by_freq,
        )
        return grad_free[:free_rows], None, None, None, None, None, None, None, None


def _gather_apart(free: Tensor, reference: Tensor, slot: Tensor) -> Tensor:
    """Look ``slot`` up in ``[reference; free]`` when the two lie apart: from each in turn.

    Out-of-range slots fail in one of the two ``embedding`` calls, with its error.
    """
    fixed = reference.shape[0]  # at least one: `lookup` handles none
    out = nn.functional.embedding(slot.clamp(max=fixed - 1), reference)
    if _on_host(slot):
        at = (slot >= fixed).flatten().nonzero().squeeze(1)
        rows = nn.functional.embedding(slot.flatten().index_select(0, at) - fixed, free)
        out.view(-1, *free.shape[1:]).index_copy_(0, at, rows)
        return out
    from_free = nn.functional.embedding((slot - fixed).clamp(min=0), free)
    return torch.where((slot >= fixed).unsqueeze(-1), from_free, out)


def lookup(
    constraint: FixedRows,
    indices: Tensor,
    free: Tensor,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
) -> Tensor:
    """Return ``F.embedding(indices, weight)`` without building the weight.

    Fixed rows are gathered from the reference, free rows from ``free``; the gradient
    reaches only the free rows that ``indices`` names, so the cost of a lookup and its
    backward follows the batch and the number of free rows, not the vocabulary. Indices are
    checked as ``F.embedding`` checks them (the same errors for negative, too large and
    non-integer indices).

    Args:
        constraint (FixedRows): the registered constraint.
        indices (Tensor): row indices, any shape.
        free (Tensor): the stored free rows (``parametrizations.weight.original``).
        padding_idx (int, optional): a row whose lookups get no gradient, as in
            ``nn.Embedding``. Default: ``None``.
        scale_grad_by_freq (bool, optional): scale each free row's gradient by the inverse
            of its frequency in ``indices``, as in ``nn.Embedding``. Default: ``False``.

    Returns:
        Tensor: shape ``(*indices.shape, *trailing)``.
    """
    if not free.shape[0]:
        # Nothing to train; read the weight so the result still depends on `free`.
        return nn.functional.embedding(indices, constraint(free), padding_idx)
    if not constraint.num_fixed:
        # Nothing fixed: exactly the plain lookup, at the plain lookup's cost.
        return nn.functional.embedding(
            indices, free, padding_idx, scale_grad_by_freq=scale_grad_by_freq
        )
    grad_row = constraint.gradient_rows(free)
    # For a prefix, an index is its own slot (passed as None: autograd.Function inputs
    # must be distinct tensors for torch.compile).
    slot = constraint.places(indices)
    out: Tensor = _Lookup.apply(  # type: ignore[no-untyped-call]
        free,
        constraint.reference_for(free),
        constraint.joined(free),
        indices,
        slot,
        grad_row,
        constraint.spare,
        padding_idx,
        scale_grad_by_freq,
    )
    return out


def _padding(module: nn.Embedding, rows: int) -> int | bool | None:
    """``module.padding_idx`` as a row (a negative one counted from the end), or False when it
    is out of range: the module's own forward then refuses it, with torch's error."""
    padding = module.padding_idx
    if padding is None:
        return None
    if not -rows <= padding < rows:
        return False
    return padding + rows if padding < 0 else padding


def embedding_forward(self: nn.Embedding, input: Tensor) -> Tensor:
    """``nn.Embedding.forward`` for a constrained weight: look up without building the weight.

    A ``padding_idx`` out of range (set after `fix_rows`) makes it step aside for the
    module's own forward, which refuses it.
    """
    found = fast_readable(self)
    if found is not None:
        constraint, free = found
        padding = _padding(self, constraint.num_fixed + free.shape[0])
        if padding is not False:
            return lookup(constraint, input, free, padding, self.scale_grad_by_freq)
    return nn.Embedding.forward(self, input)
