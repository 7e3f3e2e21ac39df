"""How a constrained tensor is read without assembling it: the autograd functions behind
`FixedRows`.

Each reads the reference and the free rows, mostly from the one block ``[reference; free]``
that holds both, and sends gradients to the free rows only: `_ScatterRows` assembles the whole
tensor (`FixedRows.forward`), `_Lookup` looks rows up (`FixedRows.lookup`), `_Bag` reduces bags
(`FixedRows.bag`) and `_Linear` multiplies by the weight (`FixedRows.linear`).

Their forwards take ``ctx`` rather than pairing with ``setup_context``: `Function.apply` then
skips binding the arguments to the signature, which costs more than a small lookup's kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _ScatterRows(torch.autograd.Function):
    """Interleave fixed and free rows into one tensor; gradients reach the free rows only."""

    @staticmethod
    def forward(
        ctx: Any, free: Tensor, reference: Tensor, rows: Tensor, free_rows: Tensor
    ) -> Tensor:
        out = free.new_empty((reference.shape[0] + free.shape[0], *free.shape[1:]))
        out.index_copy_(0, rows, reference)
        out.index_copy_(0, free_rows, free)
        ctx.save_for_backward(free_rows)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        (free_rows,) = ctx.saved_tensors
        grad_free = grad.index_select(0, free_rows) if ctx.needs_input_grad[0] else None
        return grad_free, None, None, None


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
    size of the whole weight is ever formed.
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
        ctx.save_for_backward(indices, grad_row)
        slot = indices if slot is None else slot
        if joined is not None:
            return nn.functional.embedding(slot, joined)
        fixed = reference.shape[0]  # at least one: `FixedRows.lookup` handles none
        out = nn.functional.embedding(slot.clamp(max=fixed - 1), reference)
        if _on_host(slot):
            at = (slot >= fixed).flatten().nonzero().squeeze(1)
            rows = nn.functional.embedding(slot.flatten().index_select(0, at) - fixed, free)
            out.view(-1, *free.shape[1:]).index_copy_(0, at, rows)
            return out
        from_free = nn.functional.embedding((slot - fixed).clamp(min=0), free)
        return torch.where((slot >= fixed).unsqueeze(-1), from_free, out)

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


class _Linear(torch.autograd.Function):
    """``F.linear`` with a weight read in place; the weight gradient reaches free rows only.

    ``joined`` is ``[reference; free]`` in one buffer, the weight itself when the fixed rows are
    a prefix: the forward is the plain product, without a copy of the weight or of the
    output. The backward computes the input's gradient with the whole weight, as a plain layer
    does, and the weight gradient for the free rows (the last output features) only. Under
    autocast, ``dtype`` is the autocast dtype: the product runs in it, as ``F.linear``'s does,
    and each gradient is returned in its input's own dtype.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        free: Tensor,
        joined: Tensor,
        bias: Tensor | None,
        dtype: torch.dtype | None,
    ) -> Tensor:
        x, weight = input, joined
        if dtype is None:
            out = nn.functional.linear(x, weight, bias)
        else:
            x, weight = input.to(dtype), joined.to(dtype)
            b = None if bias is None else bias.to(dtype)
            with torch.autocast(input.device.type, enabled=False):
                out = nn.functional.linear(x, weight, b)
        # `free` too, though unused: an in-place change of it before the backward (an optimizer
        # step) then raises, as it does for a plain layer's weight.
        ctx.save_for_backward(x, weight, free)
        ctx.fixed = joined.shape[0] - free.shape[0]
        ctx.dtypes = (input.dtype, free.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, Tensor | None, None]:
        x, weight, _ = ctx.saved_tensors
        input_dtype, free_dtype, bias_dtype = ctx.dtypes
        grad = grad.to(weight.dtype)
        grad_input = grad_free = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (grad @ weight).to(input_dtype)
        flat_grad = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(-1, x.shape[-1])
            grad_free = (flat_grad[:, ctx.fixed :].t() @ flat_x).to(free_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = flat_grad.sum(0).to(bias_dtype)
        return grad_input, grad_free, None, grad_bias, None


class _Bag(torch.autograd.Function):
    """``F.embedding_bag`` (sums and means) from ``[reference; free]``; gradients to free rows.

    The forward reduces the bags from the block ``joined``, looked up by ``slot_input``. The
    backward runs the same reduction's backward in a small "target" table instead of the
    weight: free rows, then one row for the padding row's lookups (the bags' padding row, so
    they still do not count in a mean), then spare rows for the fixed rows' lookups (counted,
    then dropped). Its cost follows the batch and the free rows, not the vocabulary.
    """

    @staticmethod
    def forward(
        ctx: Any,
        free: Tensor,
        joined: Tensor,
        slot_input: Tensor,
        target_input: Tensor,
        offsets: Tensor | None,
        per_sample_weights: Tensor | None,
        options: tuple[str, bool, int | None, int | None, bool, int],
    ) -> Tensor:
        mode, include_last_offset, slot_padding, _, scale, _ = options
        out = nn.functional.embedding_bag(
            slot_input,
            joined,
            offsets,
            mode=mode,
            per_sample_weights=per_sample_weights,
            include_last_offset=include_last_offset,
            padding_idx=slot_padding,
            scale_grad_by_freq=scale,
        )
        ctx.save_for_backward(free, joined, slot_input, target_input, offsets, per_sample_weights)
        ctx.options = options
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, None, None, None, None, Tensor | None, None]:
        free, joined, slot_input, target_input, offsets, weights = ctx.saved_tensors
        mode, include_last_offset, slot_padding, target_padding, scale, target_rows = ctx.options
        grad_free = grad_weights = None
        detached = None if weights is None else weights.detach()
        if ctx.needs_input_grad[0]:
            with torch.enable_grad():
                table = free.new_zeros((target_rows, *free.shape[1:]), requires_grad=True)
                out = nn.functional.embedding_bag(
                    target_input,
                    table,
                    offsets,
                    mode=mode,
                    per_sample_weights=detached,
                    include_last_offset=include_last_offset,
                    padding_idx=target_padding,
                    scale_grad_by_freq=scale,
                )
                (grad_table,) = torch.autograd.grad(out, table, grad)
            grad_free = grad_table[: free.shape[0]]
        if ctx.needs_input_grad[5]:
            with torch.enable_grad():
                leaf = detached.requires_grad_()  # type: ignore[union-attr]
                out = nn.functional.embedding_bag(
                    slot_input,
                    joined,
                    offsets,
                    mode=mode,
                    per_sample_weights=leaf,
                    include_last_offset=include_last_offset,
                    padding_idx=slot_padding,
                )
                (grad_weights,) = torch.autograd.grad(out, leaf, grad)
        return grad_free, None, None, None, None, grad_weights, None
