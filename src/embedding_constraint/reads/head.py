"""The head: a constrained ``nn.Linear`` multiplies by its weight without building it.

`linear` reads the weight in place from ``[reference; free]`` when the fixed rows are a prefix
(`_Linear`: the weight gradient for free rows only), or side by side from the reference and the
free rows when the two lie apart. `linear_forward` is the forward `fix_rows` installs on a
constrained ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from embedding_constraint.fixed_rows import FixedRows, composable_only, constrained

__all__ = ["linear", "linear_forward"]


class _Linear(torch.autograd.Function):
    """``F.linear`` with a weight read in place; the weight gradient reaches free rows only.

    ``weight`` is ``[reference; free]`` in one buffer (or its copy in the autocast dtype), the
    weight itself when the fixed rows are a prefix: the forward is the plain product, without
    a copy of the weight or of the output. The backward computes the input's gradient with
    the whole weight, as a plain layer does, and the weight gradient for the free rows (the
    last output features) only, in ``free``'s dtype.

    With ``create_graph=True`` the input's gradient is computed with the weight read as
    ``cat(reference, free)``, so every gradient is differentiable in turn; the others are
    made of the saved input and the incoming gradient, which are.
    """

    @staticmethod
    def forward(
        ctx: Any, input: Tensor, free: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        out = nn.functional.linear(input, weight, bias)
        # `free` too, though the product reads it through `weight`: an in-place change of it
        # before the backward (an optimizer step) then raises, as it does for a plain weight.
        ctx.save_for_backward(input, free, weight)
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, Tensor | None]:
        input, free, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        fixed = weight.shape[0] - free.shape[0]
        grad_input = grad_free = grad_bias = None
        if needs[0]:
            if torch.is_grad_enabled():
                # create_graph=True: the weight as the plain read builds it, so that this
                # gradient is differentiable in `free` too (the buffer `weight` is not).
                weight = torch.cat((weight[:fixed], free.to(weight.dtype)))
            grad_input = grad @ weight
        flat_grad = grad.reshape(-1, grad.shape[-1])
        if needs[1]:
            flat_x = input.reshape(-1, input.shape[-1])
            grad_free = (flat_grad[:, fixed:].t() @ flat_x).to(free.dtype)
        if needs[3]:
            grad_bias = flat_grad.sum(0)
        return grad_input, grad_free, None, grad_bias


def linear(
    constraint: FixedRows, input: Tensor, free: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Return ``F.linear(input, weight, bias)`` without building the weight.

    For fixed rows that are a prefix, the weight is ``[reference; free]``: it is read in
    place from the buffer that holds both, and the weight gradient is computed for the free
    rows only (a plain layer computes it for every row, then the parametrization drops the
    fixed ones). If the two are apart (see `FixedRows.rejoin`) or under torch.compile, the
    output features of fixed rows come from the reference and those of free rows from
    ``free``, side by side. Scattered rows read the weight.

    Args:
        constraint (FixedRows): the registered constraint.
        input (Tensor): shape ``(*, in_features)``.
        free (Tensor): the stored free rows (``parametrizations.weight.original``).
        bias (Tensor, optional): added to the output. Default: ``None``.

    Returns:
        Tensor: shape ``(*, out_features)``.
    """
    if not constraint.num_fixed:
        return nn.functional.linear(input, free, bias)
    if not free.shape[0] or constraint.rows is not None:
        # Scattered rows would need the output's features reordered, a copy as large as
        # the output and dearer than the weight gradient saved: read the weight instead.
        return nn.functional.linear(input, constraint(free), bias)
    joined = constraint._joined(free)
    if joined is not None:  # the weight, in place
        device = input.device.type
        if torch.is_autocast_enabled(device):
            # Cast as F.linear does under autocast; outside the function, so the casts are
            # recorded and each gradient returns in its tensor's own dtype.
            dtype = torch.get_autocast_dtype(device)
            input, joined = input.to(dtype), joined.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        out: Tensor = _Linear.apply(input, free, joined, bias)  # type: ignore[no-untyped-call]
        return out
    fixed = constraint.num_fixed
    bias_fixed, bias_free = (None, None) if bias is None else (bias[:fixed], bias[fixed:])
    return torch.cat(
        (
            nn.functional.linear(input, constraint.reference, bias_fixed),
            nn.functional.linear(input, free, bias_free),
        ),
        -1,
    )


def linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    """``nn.Linear.forward`` for a constrained weight: no weight gradient for fixed rows."""
    found = constrained(self)
    if found is None or composable_only(found[1], found[0].reference, input, self.bias):
        return nn.Linear.forward(self, input)
    constraint, free = found
    return linear(constraint, input, free, self.bias)
