"""The head: a constrained ``nn.Linear`` multiplies by its weight, with no weight gradient for
fixed rows.

`linear` reads the weight in place from ``[reference; free]`` when the fixed rows are a
prefix, assembles it once (as the plain read does) when they are scattered, and `_Linear`
computes the weight gradient for the free rows only, either way. With the reference and the
free rows apart, a prefix head computes its two parts side by side; under torch.compile and
torch.export it assembles the weight, so that the product is eager's. `linear_forward` is the
forward `fix_rows` installs on a constrained ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from embedding_constraint.fixed_rows import FixedRows, fast_readable

__all__ = ["linear", "linear_forward"]


class _Linear(torch.autograd.Function):
    """``F.linear`` by the whole weight; the weight gradient reaches the free rows only.

    ``weight`` is the full weight without a graph: the block ``[reference; free]`` itself for a
    prefix of fixed rows, an assembled copy for scattered ones or under torch.compile (or
    either's copy in the autocast dtype). The forward is the plain product. The backward
    computes the input's gradient with the whole weight, as a plain layer does, and the weight
    gradient for the free rows (``free_rows``, or the last rows when None) only, in ``free``'s
    dtype: a product the size of the free rows instead of the whole weight.

    With ``create_graph=True`` the input's gradient is computed with the weight rebuilt from
    ``free`` (its free rows replaced by ``free``, which holds the same values), so every
    gradient is differentiable in turn; the others are made of the saved input and the incoming
    gradient, which are. Each tensor is saved only if a gradient reads it, as torch's product
    saves its operands (see `forward`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        free: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        free_rows: Tensor | None,
    ) -> Tensor:
        out = nn.functional.linear(input, weight, bias)
        # Each tensor only where a gradient reads it, as torch's product saves its operands:
        # an in-place change of the rows before the backward (an optimizer step, an EMA
        # update) then raises only where the input needs a gradient, as for a plain weight.
        # `free` too there, though the product reads it through `weight` (a copy for
        # scattered rows), and a second derivative rebuilds the weight from it.
        needs_input, needs_free = ctx.needs_input_grad[:2]
        ctx.fixed, ctx.free_dtype = weight.shape[0] - free.shape[0], free.dtype
        ctx.save_for_backward(
            input if needs_free else None,
            free if needs_input else None,
            weight if needs_input else None,
            free_rows,
        )
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, Tensor | None, None]:
        input, free, weight, free_rows = ctx.saved_tensors
        needs = ctx.needs_input_grad
        fixed: int = ctx.fixed
        grad_input = grad_free = grad_bias = None
        if needs[0]:
            if torch.is_grad_enabled():
                # create_graph=True: the weight as the plain read builds it, so that this
                # gradient is differentiable in `free` too (the `weight` given is not).
                rebuilt = free.to(weight.dtype)
                if free_rows is None:
                    weight = torch.cat((weight[:fixed], rebuilt))
                else:
                    weight = weight.index_copy(0, free_rows, rebuilt)
            grad_input = grad @ weight
        flat_grad = grad.reshape(-1, grad.shape[-1])
        if needs[1]:
            flat_x = input.reshape(-1, input.shape[-1])
            if free_rows is None:
                grad_out_free = flat_grad[:, fixed:]
            else:
                # The free rows' columns. `gather` with the rows broadcast over the tokens:
                # on the CPU 2 to 5 times faster than `index_select` along dimension 1.
                at = free_rows.expand(flat_grad.shape[0], -1)
                grad_out_free = flat_grad.gather(1, at)
            grad_free = (grad_out_free.t() @ flat_x).to(ctx.free_dtype)
        if needs[3]:
            grad_bias = flat_grad.sum(0)
        return grad_input, grad_free, None, grad_bias, None


def _autocast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` as autocast hands it to ``F.linear``: floating-point tensors in ``dtype``,
    except float64 ones, which autocast leaves alone."""
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        return tensor.to(dtype)
    return tensor


def linear(
    constraint: FixedRows, input: Tensor, free: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Return ``F.linear(input, weight, bias)`` with no weight gradient for fixed rows.

    For fixed rows that are a prefix, the weight is ``[reference; free]``: it is read in
    place from the buffer that holds both. For scattered rows it is assembled once, a copy
    of its size, as reading it plainly does. Either way the product is the plain one, and the
    weight gradient is computed for the free rows only (a plain layer computes it for every
    row, then the parametrization drops the fixed ones). Under torch.compile and torch.export,
    which cannot see the buffer, a prefix's weight is assembled (a copy), and the product is
    eager's bit for bit. If the reference and the free rows of a prefix are apart (see
    `FixedRows.rejoin`), the output features of fixed rows come from the reference and those
    of free rows from ``free``, side by side, without a copy: equal to the plain product up to
    the last bits.

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
    if not free.shape[0]:
        return nn.functional.linear(input, constraint(free), bias)
    if constraint.rows is None and torch.compiler.is_compiling():
        # The block cannot be seen under torch.compile or torch.export (see
        # `FixedRows._joined`): the weight is assembled, so that the product is the one eager
        # reads in place. Two products side by side differ from it in the last bits (the
        # matrix product's kernel, so its order of sums, depends on the shapes).
        with torch.no_grad():
            weight = torch.cat((constraint.reference_for(free), free))
    elif constraint.rows is None:
        joined = constraint.joined(free)  # the weight, in place
        if joined is None:
            fixed = constraint.num_fixed
            bias_fixed, bias_free = (None, None) if bias is None else (bias[:fixed], bias[fixed:])
            return torch.cat(
                (
                    nn.functional.linear(input, constraint.reference_for(free), bias_fixed),
                    nn.functional.linear(input, free, bias_free),
                ),
                -1,
            )
        weight = joined
    else:
        with torch.no_grad():  # `_Linear` sends the gradient to `free` itself
            weight = constraint(free)
    device = input.device.type
    if torch.is_autocast_enabled(device):
        # Cast as F.linear does under autocast; outside the function, so the casts are
        # recorded and each gradient returns in its tensor's own dtype.
        dtype = torch.get_autocast_dtype(device)
        input, weight = _autocast(input, dtype), _autocast(weight, dtype)
        bias = None if bias is None else _autocast(bias, dtype)
    out: Tensor = _Linear.apply(  # type: ignore[no-untyped-call]
        input, free, weight, bias, constraint.free_rows
    )
    return out


def linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    """``nn.Linear.forward`` for a constrained weight: no weight gradient for fixed rows."""
    found = fast_readable(self, input, self.bias)
    if found is None:
        return nn.Linear.forward(self, input)
    constraint, free = found
    return linear(constraint, input, free, self.bias)
