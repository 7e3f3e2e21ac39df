"""The constrained `nn.EmbeddingBag`: same bags and gradients, without building the weight."""

from __future__ import annotations

import copy

import pytest
import torch
from support import constraint_of, graph_ops, stored
from torch import Tensor, nn
from torch.nn.utils import parametrize

from embedding_constraint import FixedRows, bake, fix_rows, fixed_rows

ROWS: dict[str, list[int] | None] = {"prefix": None, "scattered": [8, 1, 4, 5]}
FIXED_AT = {"prefix": [0, 1, 2, 3], "scattered": [8, 1, 4, 5]}


def _pair(where: str, **options: object) -> tuple[nn.EmbeddingBag, nn.EmbeddingBag, Tensor]:
    """A fix_rows bag (fast path) and a raw-registered twin (reads the whole weight)."""
    torch.manual_seed(0)
    reference = torch.randn(4, 3, dtype=torch.float64)
    fast = nn.EmbeddingBag(10, 3, dtype=torch.float64, **options)  # type: ignore[arg-type]
    generic = copy.deepcopy(fast)
    fix_rows(fast, reference, rows=ROWS[where])
    parametrize.register_parametrization(generic, "weight", FixedRows(reference, rows=ROWS[where]))
    return fast, generic, reference


def _run(
    bag: nn.EmbeddingBag,
    input: Tensor,
    offsets: Tensor | None,
    weights: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    leaf = None if weights is None else weights.clone().requires_grad_()
    out: Tensor = bag(input, offsets, per_sample_weights=leaf)
    scale = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    torch.autograd.backward((out * scale).sum())
    return out, None if leaf is None else leaf.grad


INPUT_1D = torch.tensor([0, 5, 9, 8, 8, 2, 7, 1, 6, 4, 3, 9])
OFFSETS = torch.tensor([0, 3, 3, 7, 9])  # the second bag is empty


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 8, 9], ids=["no-padding", "pad-8", "pad-9"])
@pytest.mark.parametrize("shape", ["1d", "1d-last-offset", "2d"])
@pytest.mark.parametrize("on_host", [True, False], ids=["cpu-spares", "accelerator-spares"])
def test_bags_match_reading_the_whole_weight(
    where: str,
    mode: str,
    padding_idx: int | None,
    shape: str,
    on_host: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not on_host:  # the accelerators' spread of fixed rows over spare rows
        monkeypatch.setattr(fixed_rows, "_spare_rows", lambda device, fixed: min(fixed, 3))
    options = {"mode": mode, "padding_idx": padding_idx}
    if shape == "1d-last-offset":
        options["include_last_offset"] = True
    fast, generic, _ = _pair(where, **options)
    if shape == "2d":
        input, offsets = INPUT_1D.reshape(3, 4), None
    elif shape == "1d-last-offset":
        input, offsets = INPUT_1D, torch.cat((OFFSETS, torch.tensor([12])))
    else:
        input, offsets = INPUT_1D, OFFSETS
    out_fast, _ = _run(fast, input, offsets, None)
    out_generic, _ = _run(generic, input, offsets, None)
    torch.testing.assert_close(out_fast, out_generic, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stored(fast).grad, stored(generic).grad, rtol=1e-12, atol=1e-12)
    ops = graph_ops(out_fast)
    if mode == "max":  # reads the weight
        assert "_BagBackward" not in ops
    else:
        assert "_BagBackward" in ops
        assert not {"CatBackward0", "_ScatterRowsBackward"} & ops


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("padding_idx", [None, 2], ids=["no-padding", "padding"])
def test_per_sample_weights_get_their_gradient(where: str, padding_idx: int | None) -> None:
    fast, generic, _ = _pair(where, mode="sum", padding_idx=padding_idx)
    weights = torch.linspace(0.5, 2.0, INPUT_1D.numel(), dtype=torch.float64)
    out_fast, grad_fast = _run(fast, INPUT_1D, OFFSETS, weights)
    out_generic, grad_generic = _run(generic, INPUT_1D, OFFSETS, weights)
    torch.testing.assert_close(out_fast, out_generic, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_fast, grad_generic, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stored(fast).grad, stored(generic).grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", ROWS)
def test_scale_grad_by_freq_matches_reading_the_weight(where: str) -> None:
    fast, generic, _ = _pair(where, mode="sum", scale_grad_by_freq=True)
    _run(fast, INPUT_1D, OFFSETS, None)
    _run(generic, INPUT_1D, OFFSETS, None)
    torch.testing.assert_close(stored(fast).grad, stored(generic).grad, rtol=1e-12, atol=1e-12)


def test_bags_apart_from_the_reference_read_the_weight() -> None:
    fast, generic, _ = _pair("scattered", mode="mean")
    with torch.no_grad():
        stored(fast).data = stored(fast).data.clone()
    out_fast, _ = _run(fast, INPUT_1D, OFFSETS, None)
    out_generic, _ = _run(generic, INPUT_1D, OFFSETS, None)
    assert "_ScatterRowsBackward" in graph_ops(out_fast)
    torch.testing.assert_close(out_fast, out_generic, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stored(fast).grad, stored(generic).grad, rtol=1e-12, atol=1e-12)


def test_training_bags_keeps_fixed_rows_exact() -> None:
    fast, generic, reference = _pair("scattered", mode="mean", padding_idx=0)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1) for m in (fast, generic)]
    for step in range(4):
        input = torch.randint(0, 10, (6, 4), generator=torch.Generator().manual_seed(step))
        for module, opt in zip((fast, generic), opts, strict=True):
            opt.zero_grad()
            _run(module, input, None, None)
            opt.step()
        assert torch.equal(fast.weight[FIXED_AT["scattered"]], reference)
    torch.testing.assert_close(stored(fast), stored(generic), rtol=1e-12, atol=1e-12)
    assert constraint_of(fast).joined(stored(fast)) is not None
    bake(fast)
    assert type(fast) is nn.EmbeddingBag
    assert torch.equal(fast.weight[FIXED_AT["scattered"]], reference)


@pytest.mark.parametrize("where", ROWS)
def test_compiled_bags_match_eager(where: str) -> None:
    torch._dynamo.reset()
    fast, _, reference = _pair(where, mode="mean", padding_idx=9)
    eager = copy.deepcopy(fast)
    input = INPUT_1D.reshape(3, 4)

    def loss(bag: nn.EmbeddingBag, input: Tensor) -> Tensor:
        out: Tensor = bag(input)
        return (out * torch.arange(out.numel()).reshape(out.shape)).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    torch.autograd.backward(compiled(fast, input))
    torch.autograd.backward(loss(eager, input))
    torch.testing.assert_close(stored(fast).grad, stored(eager).grad)
    assert torch.equal(fast.weight[FIXED_AT[where]], reference)
