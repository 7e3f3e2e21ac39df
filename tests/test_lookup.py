"""The constrained `nn.Embedding` lookup: same values and gradients, without building the weight."""

from __future__ import annotations

import copy

import pytest
import torch
from support import constraint_of, graph_ops, stored
from torch import Tensor, nn
from torch.nn.utils import parametrize

from embedding_constraint import FixedRows, fix_rows, fixed_rows
from embedding_constraint.reads import lookup as lookup_read

ROWS: dict[str, list[int] | None] = {"prefix": None, "scattered": [8, 1, 4, 5]}


def _pair(
    rows: list[int] | None,
    fixed: int = 4,
    padding_idx: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[nn.Embedding, nn.Embedding, Tensor]:
    """A fix_rows embedding (fast lookup) and a raw-registered twin (reads the whole weight)."""
    torch.manual_seed(0)
    reference = torch.randn(fixed, 3, dtype=dtype)
    rows = None if rows is None else rows[:fixed]
    fast = nn.Embedding(10, 3, padding_idx=padding_idx, dtype=dtype)
    generic = copy.deepcopy(fast)
    fix_rows(fast, reference, rows=rows)
    parametrize.register_parametrization(generic, "weight", FixedRows(reference, rows=rows))
    return fast, generic, reference


def _step(emb: nn.Embedding, indices: Tensor) -> Tensor:
    out: Tensor = emb(indices)
    weights = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    torch.autograd.backward((out * weights).sum())
    return out


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("padding_idx", [None, 1, 7], ids=["no-padding", "padding-0", "padding-7"])
@pytest.mark.parametrize("fixed", [0, 4, 10], ids=["none-fixed", "some-fixed", "all-fixed"])
def test_lookup_matches_reading_the_whole_weight(
    where: str, padding_idx: int | None, fixed: int
) -> None:
    if where == "scattered" and fixed == 10:
        pytest.skip("all rows fixed is the prefix case")
    fast, generic, _ = _pair(ROWS[where], fixed, padding_idx)
    indices = torch.tensor([[0, 1, 2, 9], [8, 8, 4, 7], [1, 5, 6, 3]])
    out_fast, out_generic = _step(fast, indices), _step(generic, indices)
    assert torch.equal(out_fast, out_generic)
    grad_fast, grad_generic = stored(fast).grad, stored(generic).grad
    assert grad_fast is not None
    assert grad_generic is not None
    torch.testing.assert_close(grad_fast, grad_generic, rtol=1e-12, atol=1e-12)
    if 0 < fixed < 10:
        assert "CatBackward0" not in graph_ops(out_fast)
        assert "_ScatterRowsBackward" not in graph_ops(out_fast)
        assert "_LookupBackward" in graph_ops(out_fast)
    if padding_idx is not None and where == "prefix" and padding_idx >= fixed:
        assert torch.equal(grad_fast[padding_idx - fixed], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("where", ROWS)
def test_the_accelerator_path_matches_too(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # On an accelerator (and under torch.compile) the lookup takes `where` instead of
    # overwriting the free rows' lookups in place; check that path on the CPU.
    monkeypatch.setattr(lookup_read, "_on_host", lambda slot: False)
    fast, generic, _ = _pair(ROWS[where], 4, padding_idx=7)
    indices = torch.tensor([[0, 1, 2, 9], [8, 8, 4, 7], [1, 5, 6, 3]])
    assert torch.equal(_step(fast, indices), _step(generic, indices))
    grad_fast, grad_generic = stored(fast).grad, stored(generic).grad
    assert grad_fast is not None
    assert grad_generic is not None
    torch.testing.assert_close(grad_fast, grad_generic, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("spare_rows", [1, 3, 1024])
@pytest.mark.parametrize("scale", [False, True], ids=["plain", "scale-grad-by-freq"])
def test_the_accelerator_backward_spreads_dropped_lookups_exactly(
    where: str, spare_rows: int, scale: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On an accelerator the backward sends lookups of fixed rows to many spare rows (and of
    # the padding row to one of them); with few, many rows share one. Gradients stay exact.
    monkeypatch.setattr(fixed_rows, "_spare_rows", lambda device, fixed: spare_rows)
    fast, generic, _ = _pair(ROWS[where], 4, padding_idx=7)
    assert constraint_of(fast).spare == spare_rows
    fast.scale_grad_by_freq = generic.scale_grad_by_freq = scale
    indices = torch.randint(0, 10, (50, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_step(fast, indices), _step(generic, indices))
    torch.testing.assert_close(stored(fast).grad, stored(generic).grad, rtol=1e-12, atol=1e-12)


def test_lookup_does_not_build_the_weight() -> None:
    fast, generic, _ = _pair(ROWS["scattered"])
    indices = torch.tensor([0, 3, 8])
    assert "_ScatterRowsBackward" in graph_ops(generic(indices))
    assert "_ScatterRowsBackward" not in graph_ops(fast(indices))
    prefix_fast, prefix_generic, _ = _pair(None)
    assert "CatBackward0" in graph_ops(prefix_generic(indices))
    assert "CatBackward0" not in graph_ops(prefix_fast(indices))


def test_training_with_the_lookup_keeps_fixed_rows_exact_and_matches_the_generic_path() -> None:
    fast, generic, reference = _pair(ROWS["scattered"], dtype=torch.float32)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1) for m in (fast, generic)]
    for step in range(5):
        indices = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(step))
        for module, opt in zip((fast, generic), opts, strict=True):
            opt.zero_grad()
            _step(module, indices)
            opt.step()
        assert torch.equal(fast.weight[[8, 1, 4, 5]], reference)
    torch.testing.assert_close(stored(fast), stored(generic))


@pytest.mark.parametrize("where", ROWS)
def test_scale_grad_by_freq_matches_reading_the_weight(where: str) -> None:
    torch.manual_seed(0)
    fast = nn.Embedding(10, 2, scale_grad_by_freq=True, padding_idx=6)
    generic = copy.deepcopy(fast)
    rows = ROWS[where]
    fix_rows(fast, torch.zeros(4, 2), rows=rows)
    parametrize.register_parametrization(generic, "weight", FixedRows(torch.zeros(4, 2), rows=rows))
    indices = torch.tensor([2, 2, 3, 0, 9, 9, 9, 6, 6, 7])
    assert "CatBackward0" not in graph_ops(_step(fast, indices))
    _step(generic, indices)
    torch.testing.assert_close(stored(fast).grad, stored(generic).grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "change",
    ["to-float64", "deepcopy", "load_state_dict", "assign-weight"],
)
def test_lookup_stays_exact_after_module_changes(change: str) -> None:
    reference = torch.randn(3, 4)
    emb = nn.Embedding(8, 4)
    fix_rows(emb, reference, rows=[7, 0, 3])
    if change == "to-float64":
        emb = emb.to(torch.float64)
        reference = reference.double()
    elif change == "deepcopy":
        emb = copy.deepcopy(emb)
    elif change == "load_state_dict":
        plain = nn.Embedding(8, 4)
        with torch.no_grad():
            plain.weight[[7, 0, 3]] = reference
        emb.load_state_dict(plain.state_dict())
        assert torch.equal(emb(torch.tensor([1, 2])), plain(torch.tensor([1, 2])))
    else:
        emb.weight = torch.arange(32.0).reshape(8, 4)
    opt = torch.optim.SGD(emb.parameters(), lr=1.0)
    for _ in range(2):
        opt.zero_grad()
        _step(emb, torch.arange(8))
        opt.step()
    assert torch.equal(emb(torch.tensor([7, 0, 3])), reference)
    assert torch.equal(emb.weight[[7, 0, 3]], reference)
    assert emb.weight.dtype == reference.dtype


def test_subclasses_keep_their_own_forward() -> None:
    class Scaled(nn.Embedding):
        def forward(self, input: Tensor) -> Tensor:
            return 3 * super().forward(input)

    emb = Scaled(5, 2)
    fix_rows(emb, torch.ones(1, 2))
    assert torch.equal(emb(torch.tensor([0])), torch.full((1, 2), 3.0))
    assert "CatBackward0" in graph_ops(emb(torch.tensor([0])))


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("how", ["fix_rows", "register_parametrization"])
def test_compiled_step_matches_eager(where: str, how: str) -> None:
    torch._dynamo.reset()
    fast, generic, reference = _pair(ROWS[where], dtype=torch.float32)
    module = fast if how == "fix_rows" else generic
    eager = copy.deepcopy(module)
    indices = torch.tensor([0, 1, 4, 8, 9])

    def loss(emb: nn.Embedding, indices: Tensor) -> tuple[Tensor, Tensor]:
        out = emb(indices)
        return out, (out * torch.arange(out.numel()).reshape(out.shape)).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    out, value = compiled(module, indices)
    torch.autograd.backward(value)
    eager_out, eager_value = loss(eager, indices)
    torch.autograd.backward(eager_value)
    assert torch.equal(out, eager_out)
    fixed_at = [0, 1, 2, 3] if ROWS[where] is None else [8, 1, 4, 5]
    assert torch.equal(module.weight[fixed_at], reference)
    torch.testing.assert_close(stored(module).grad, stored(eager).grad)


@pytest.mark.parametrize("where", ROWS)
def test_lookup_gradcheck_float64(where: str) -> None:
    constraint = FixedRows(torch.randn(4, 3, dtype=torch.float64), rows=ROWS[where])
    constraint.right_inverse(torch.zeros(10, 3, dtype=torch.float64))
    free = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 1, 9], [8, 8, 6]])

    def lookup(free: Tensor) -> Tensor:
        # Plain options: padding_idx and scale_grad_by_freq change gradients on purpose.
        return lookup_read.lookup(constraint, indices, free)

    assert torch.autograd.gradcheck(lookup, (free,))
