"""The bag: a constrained ``nn.EmbeddingBag`` reduces its bags without building the weight.

`bag` reduces sum and mean bags from the block ``[reference; free]``; `_Bag`'s backward runs
the reduction's backward in a small table of free, padding and spare rows, so its cost
follows the batch and the free rows. `embedding_bag_forward` is the forward `fix_rows`
installs on a constrained ``nn.EmbeddingBag``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from embedding_constraint.fixed_rows import FixedRows, fast_readable

__all__ = ["bag", "embedding_bag_forward"]


_Options = tuple[str, bool, int | None, int | None, bool, int]


def _reduce(
    ids: Tensor,
    table: Tensor,
    offsets: Tensor | None,
    weights: Tensor | None,
    padding: int | None,
    options: _Options,
) -> Tensor:
    """``F.embedding_bag`` of ``ids`` in ``table`` with the bag's options (see `bag`)."""
    mode, include_last_offset, _, _, scale, _ = options
    return nn.functional.embedding_bag(
        ids,
        table,
        offsets,
        mode=mode,
        per_sample_weights=weights,
        include_last_offset=include_last_offset,
        padding_idx=padding,
        scale_grad_by_freq=scale,
    )


class _Bag(torch.autograd.Function):
    """``F.embedding_bag`` (sums and means) from ``[reference; free]``; gradients to free rows.

    The forward reduces the bags from the block ``joined``, looked up by ``slot_input``. The
    backward runs the same reduction's backward in a small "target" table instead of the
    weight: free rows, then one row for the padding row's lookups (the bags' padding row, so
    they still do not count in a mean), then spare rows for the fixed rows' lookups (counted,
    then dropped). Its cost follows the batch and the free rows, not the vocabulary.

    With ``create_graph=True`` and per-sample weights that need a gradient, the backward
    differentiates the plain read instead (the same bags from ``cat(reference, free)``), so
    the gradients are differentiable in turn; without, the free rows' gradient is linear in
    the incoming one, and the target table's backward is differentiable in it.
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
        options: _Options,
    ) -> Tensor:
        out = _reduce(slot_input, joined, offsets, per_sample_weights, options[2], options)
        # The rows' values only where the plain bag's backward reads its weight too: for the
        # per-sample weights' gradient. Else an in-place change of the free rows before the
        # backward (an optimizer step) runs, as it does on a plain bag.
        rows = (free, joined) if ctx.needs_input_grad[5] else ()
        ctx.save_for_backward(slot_input, target_input, offsets, per_sample_weights, *rows)
        ctx.free = (free.shape, free.dtype, free.device)
        ctx.options = options
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, None, None, None, None, Tensor | None, None]:
        slot_input, target_input, offsets, weights, *rows = ctx.saved_tensors
        options = ctx.options
        _, _, slot_padding, target_padding, _, target_rows = options
        needs = ctx.needs_input_grad
        create_graph = torch.is_grad_enabled()
        if create_graph and rows:  # differentiate the plain read, per-sample weights and all
            free, joined = rows
            # Aliases: the gradients below are then this read's own (a path from the output
            # to `free` through the per-sample weights is not counted twice), and they stay
            # differentiable in `free` and the weights through the aliases.
            free = free.view_as(free)
            weights = None if weights is None else weights.view_as(weights)
            fixed = joined.shape[0] - free.shape[0]
            weight = torch.cat((joined[:fixed], free))
            out = _reduce(slot_input, weight, offsets, weights, slot_padding, options)
            wrt = [free] if needs[0] else []
            if needs[5]:
                wrt.append(weights)
            grads = iter(torch.autograd.grad(out, wrt, grad, create_graph=True))
            grad_free = next(grads) if needs[0] else None
            grad_weights = next(grads) if needs[5] else None
            return grad_free, None, None, None, None, grad_weights, None
        grad_free = grad_weights = None
        detached = None if weights is None else weights.detach()
        if needs[0]:
            # Linear in the rows: a gradient made of the incoming one (differentiable in it
            # when create_graph=True), whatever the rows hold.
            shape, dtype, device = ctx.free
            table = torch.zeros(
                (target_rows, *shape[1:]), dtype=dtype, device=device, requires_grad=True
            )
            with torch.enable_grad():
                out = _reduce(target_input, table, offsets, detached, target_padding, options)
            (grad_table,) = torch.autograd.grad(out, table, grad, create_graph=create_graph)
            grad_free = grad_table[: shape[0]]
        if needs[5]:
            _, joined = rows
            leaf = detached.requires_grad_()  # type: ignore[union-attr]
            with torch.enable_grad():
                # (scale_grad_by_freq scales the table's gradient only, not this one.)
                out = _reduce(slot_input, joined, offsets, leaf, slot_padding, options)
            (grad_weights,) = torch.autograd.grad(out, leaf, grad)
        return grad_free, None, None, None, None, grad_weights, None


def bag(
    constraint: FixedRows,
    input: Tensor,
    free: Tensor,
    offsets: Tensor | None = None,
    *,
    mode: str = "mean",
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
) -> Tensor:
    """Return ``F.embedding_bag(input, weight, offsets, ...)`` without building the weight.

    For ``mode="sum"`` and ``"mean"``, the bags are reduced from the block that holds the
    reference and the free rows, and the gradient reaches only the free rows that the bags
    name. ``mode="max"``, ``scale_grad_by_freq``, a reference and free rows that are apart
    (see `FixedRows.rejoin`) and torch.compile read the weight. Indices are checked as
    ``F.embedding_bag`` checks them. The arguments are those of ``nn.functional.embedding_bag``.

    Args:
        constraint (FixedRows): the registered constraint.
        input (Tensor): row indices, 1-D with ``offsets`` or 2-D (bags of equal size).
        free (Tensor): the stored free rows (``parametrizations.weight.original``).
        offsets (Tensor, optional): where each bag starts in a 1-D ``input``.
        mode (str, optional): ``"sum"``, ``"mean"`` or ``"max"``. Default: ``"mean"``.
        per_sample_weights (Tensor, optional): a weight per index (``"sum"`` only).
        include_last_offset (bool, optional): ``offsets`` ends with the input's length.
        padding_idx (int, optional): a row whose lookups count for nothing.
        scale_grad_by_freq (bool, optional): scale gradients by the inverse frequency of
            their row in ``input``.

    Returns:
        Tensor: shape ``(bags, *trailing)``.
    """
    joined = None
    # scale_grad_by_freq: torch's own bag backward scales some rows by another row's count,
    # depending on where the ids fall once sorted (its CPU kernel, torch 2.13), so a bag over
    # renumbered rows cannot give the plain read's gradients: read the weight, as it does.
    if constraint.num_fixed and free.shape[0] and mode != "max" and not scale_grad_by_freq:
        joined = constraint.joined(free)
    plain_options: dict[str, Any] = {
        "mode": mode,
        "per_sample_weights": per_sample_weights,
        "include_last_offset": include_last_offset,
        "padding_idx": padding_idx,
        "scale_grad_by_freq": scale_grad_by_freq,
    }
    if joined is None:
        weight = constraint(free) if constraint.num_fixed else free
        return nn.functional.embedding_bag(input, weight, offsets, **plain_options)
    grad_row = constraint.gradient_rows(free)
    total = grad_row.numel()
    if input.device.type == "cpu":
        # The plain bag's own checks (index range and dtype, offsets, per-sample weights) on
        # a table of one column: the same errors as a plain module, for a pass over the ids.
        nn.functional.embedding_bag(input, free.new_empty((total, 1)), offsets, **plain_options)
    if offsets is not None:  # the ids and offsets meet in one dtype, as in the plain bag
        common = torch.promote_types(input.dtype, offsets.dtype)
        input, offsets = input.to(common), offsets.to(common)
    if padding_idx is not None and padding_idx < 0:
        padding_idx += total
    free_rows = free.shape[0]
    target_input, target_padding = _target_ids(input, grad_row, free_rows, padding_idx)
    slot_input, slot_padding = _slot_ids(constraint, input, padding_idx)
    options = (
        mode,
        include_last_offset,
        slot_padding,
        target_padding,
        scale_grad_by_freq,
        free_rows + 1 + constraint.spare,
    )
    out: Tensor = _Bag.apply(  # type: ignore[no-untyped-call]
        free,
        joined,
        slot_input,
        target_input,
        offsets,
        per_sample_weights,
        options,
    )
    return out


def _target_ids(
    input: Tensor, grad_row: Tensor, free_rows: int, padding_idx: int | None
) -> tuple[Tensor, int | None]:
    """Each id's row in the backward's target table, and the table's padding row.

    The table holds the free rows, then one row for the padding row's lookups (so that they
    still do not count in a mean), then the spare rows for the fixed rows' lookups. Ids are
    mapped with a lookup (`F.embedding`), which rejects what Python-style indexing would wrap.
    """
    target = nn.functional.embedding(input, grad_row.unsqueeze(1)).squeeze(-1)
    target = target + (target >= free_rows)
    if padding_idx is None:
        return target.to(input.dtype), None
    return target.masked_fill(input == padding_idx, free_rows).to(input.dtype), free_rows


def _slot_ids(
    constraint: FixedRows, input: Tensor, padding_idx: int | None
) -> tuple[Tensor, int | None]:
    """Each id's place in the block ``[reference; free]``, and the padding row's place."""
    places = constraint.places(input)
    slot_input = input if places is None else places.to(input.dtype)
    if padding_idx is None:
        return slot_input, None
    # (For scattered rows, reading the padding row's place is a device sync on a GPU.)
    slot = constraint.slot
    return slot_input, padding_idx if slot is None else int(slot[padding_idx])


def embedding_bag_forward(
    self: nn.EmbeddingBag,
    input: Tensor,
    offsets: Tensor | None = None,
    per_sample_weights: Tensor | None = None,
) -> Tensor:
    """``nn.EmbeddingBag.forward`` for a constrained weight: reduce without building it."""
    found = fast_readable(self, per_sample_weights)
    if found is None:
        return nn.EmbeddingBag.forward(self, input, offsets, per_sample_weights)
    constraint, free = found
    return bag(
        constraint,
        input,
        free,
        offsets,
        mode=self.mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=self.include_last_offset,
        padding_idx=self.padding_idx,
        scale_grad_by_freq=self.scale_grad_by_freq,
    )
