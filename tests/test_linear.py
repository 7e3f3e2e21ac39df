"""The constrained `nn.Linear`: same outputs and gradients, no weight gradient for fixed rows."""

from __future__ import annotations

import copy

import pytest
import torch
from support import graph_ops, stored
from torch import Tensor, nn
from torch.nn.utils import parametrize

from embedding_constraint import FixedRows, fix_rows

ROWS: dict[str, list[int] | None] = {"prefix": None, "scattered": [6, 1, 3]}


def _pair(rows: list[int] | None, fixed: int, bias: bool) -> tuple[nn.Linear, nn.Linear, Tensor]:
    """A fix_rows layer (fast forward) and a raw-registered twin (reads the whole weight)."""
    torch.manual_seed(0)
    reference = torch.randn(fixed, 5, dtype=torch.float64)
    rows = None if rows is None else rows[:fixed]
    fast = nn.Linear(5, 8, bias=bias, dtype=torch.float64)
    generic = copy.deepcopy(fast)
    fix_rows(fast, reference, rows=rows)
    parametrize.register_parametrization(generic, "weight", FixedRows(reference, rows=rows))
    return fast, generic, reference


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("fixed", [0, 3, 8], ids=["none-fixed", "some-fixed", "all-fixed"])
def test_linear_matches_reading_the_whole_weight(where: str, bias: bool, fixed: int) -> None:
    if where == "scattered" and fixed == 8:
        pytest.skip("all rows fixed is the prefix case")
    fast, generic, _ = _pair(ROWS[where], fixed, bias)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [module(inp) for module, inp in zip((fast, generic), inputs, strict=True)]
    weights = torch.linspace(-1.0, 1.0, outs[0].numel(), dtype=torch.float64).reshape(2, 4, 8)
    for out in outs:
        torch.autograd.backward((out * weights).sum())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-12, atol=1e-12)
    if fixed < 8:
        torch.testing.assert_close(stored(fast).grad, stored(generic).grad, rtol=1e-12, atol=0)
    if bias:
        torch.testing.assert_close(fast.bias.grad, generic.bias.grad, rtol=1e-12, atol=0)
    if 0 < fixed < 8:
        ops = graph_ops(outs[0])
        # The weight read in place (prefix) or assembled once without a graph (scattered):
        # one function whose backward forms the free rows' weight gradient only.
        assert "_LinearBackward" in ops
        assert not {"CatBackward0", "_ScatterRowsBackward"} & set(ops)


def _apart(module: nn.Module) -> None:
    """Give the stored rows a block of their own, away from the reference."""
    with torch.no_grad():
        stored(module).data = stored(module).data.clone()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_a_head_apart_from_its_reference_computes_the_same(bias: bool) -> None:
    joined, generic, _ = _pair(None, 3, bias)
    apart = copy.deepcopy(joined)
    _apart(apart)
    x = torch.randn(3, 5, dtype=torch.float64)
    outs = [module(x) for module in (joined, apart, generic)]
    assert "_LinearBackward" in graph_ops(outs[0])
    assert "CatBackward0" in graph_ops(outs[1])  # two products side by side
    for out in outs:
        torch.autograd.backward((out * torch.linspace(-1, 1, 24).view(3, 8)).sum())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stored(apart).grad, stored(joined).grad, rtol=1e-12, atol=0)


def test_training_a_head_keeps_fixed_rows_exact() -> None:
    fast, generic, reference = _pair(ROWS["scattered"], 3, bias=True)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1) for m in (fast, generic)]
    for step in range(4):
        x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        target = torch.arange(6) % 8
        for module, opt in zip((fast, generic), opts, strict=True):
            opt.zero_grad()
            torch.autograd.backward(nn.functional.cross_entropy(module(x), target))
            opt.step()
        assert torch.equal(fast.weight[[6, 1, 3]], reference)
    torch.testing.assert_close(stored(fast), stored(generic), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["joined", "apart", "scattered"])
def test_linear_under_bfloat16_autocast(layout: str) -> None:
    fast, generic, _ = _pair(ROWS["scattered"] if layout == "scattered" else None, 3, bias=True)
    fast, generic = fast.float(), generic.float()
    if layout == "apart":
        _apart(fast)
    x = [torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()]
    x.append(x[0].detach().clone().requires_grad_())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_fast, out_generic = fast(x[0]), generic(x[1])
    assert out_fast.dtype == out_generic.dtype == torch.bfloat16
    torch.testing.assert_close(out_fast, out_generic)
    torch.autograd.backward(out_fast.float().sum())
    torch.autograd.backward(out_generic.float().sum())
    # Gradients come back in each input's own dtype, as from a plain layer under autocast.
    grad = stored(fast).grad
    assert grad is not None
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, stored(generic).grad)
    assert fast.bias.grad is not None
    assert fast.bias.grad.dtype == torch.float32
    torch.testing.assert_close(fast.bias.grad, generic.bias.grad)
    assert x[0].grad is not None
    assert x[1].grad is not None
    assert x[0].grad.dtype == torch.float32
    if layout != "apart":  # one product with the whole weight, as the plain layer's
        assert torch.equal(x[0].grad, x[1].grad)
    else:  # the sum of two bfloat16 products: rounded differently
        torch.testing.assert_close(x[0].grad, x[1].grad, rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("where", ROWS)
def test_changing_the_stored_rows_before_the_backward_raises(where: str) -> None:
    # As for a plain layer's weight, where the input needs a gradient: the weight saved for
    # it must not go stale (without, the backward runs: test_harness changes the rows too).
    head, _, _ = _pair(ROWS[where], 3, bias=False)
    out = head(torch.randn(2, 5, dtype=torch.float64, requires_grad=True))
    with torch.no_grad():
        stored(head).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
