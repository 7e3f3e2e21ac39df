"""FixedRows under raw `register_parametrization`: exactness, training, storage and gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from support import constraint_of, stored
from torch import Tensor, nn
from torch.nn.utils import parametrize

from embedding_constraint import FixedRows

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw-decay": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
ROWS: dict[str, list[int] | None] = {"prefix": None, "scattered": [7, 0, 4, 9]}
N, D = 12, 5


def _assemble_by_hand(free: Tensor, reference: Tensor, rows: list[int] | None) -> Tensor:
    """The constrained weight, built independently of the library."""
    fixed = list(range(reference.shape[0])) if rows is None else rows
    free_at = [r for r in range(N) if r not in fixed]
    weight = torch.zeros(N, *free.shape[1:], dtype=free.dtype)
    weight = weight.index_put((torch.tensor(fixed),), reference)
    return weight.index_put((torch.tensor(free_at),), free)


def _loss(weight: Tensor, step: int) -> Tensor:
    tokens = torch.tensor([[0, 3, 4, 7], [9, 9, 1, 11], [2, 4, 6, 8]])[step % 3]
    target = torch.linspace(-1.0, 1.0, D, dtype=weight.dtype)
    return (nn.functional.embedding(tokens, weight) - target).pow(2).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("where", ROWS)
def test_fixed_rows_exact_and_free_rows_train_like_a_separate_tensor(
    dtype: torch.dtype, optimizer: str, where: str
) -> None:
    torch.manual_seed(0)
    rows = ROWS[where]
    reference = torch.randn(4, D, dtype=dtype)
    emb = nn.Embedding(N, D, dtype=dtype)
    parametrize.register_parametrization(emb, "weight", FixedRows(reference, rows=rows))
    free = stored(emb)
    by_hand = nn.Parameter(free.detach().clone())

    opt = OPTIMIZERS[optimizer]([free])
    opt_by_hand = OPTIMIZERS[optimizer]([by_hand])
    fixed_at = torch.arange(4) if rows is None else torch.tensor(rows)
    runs: list[tuple[torch.optim.Optimizer, Tensor, Callable[[], Tensor]]] = [
        (opt, free, lambda: emb.weight),
        (opt_by_hand, by_hand, lambda: _assemble_by_hand(by_hand, reference, rows)),
    ]
    for step in range(6):
        for o, param, weight in runs:
            o.zero_grad()
            torch.autograd.backward(_loss(weight(), step))
            torch.nn.utils.clip_grad_norm_([param], max_norm=1.0)
            o.step()
        assert torch.equal(emb.weight[fixed_at], reference)

    assert torch.equal(free, by_hand), "free rows must train exactly as a separate tensor"
    initial_free = _assemble_by_hand(torch.zeros(N - 4, D, dtype=dtype), reference, rows)
    assert not torch.equal(emb.weight, initial_free), "free rows did not move"
    assert set(opt.state) == {free}
    for value in opt.state[free].values():
        if isinstance(value, Tensor) and value.dim():
            assert value.shape == (N - 4, D), "optimizer state must cover only the free rows"


def test_stored_parameter_holds_only_free_rows_and_keeps_its_identity() -> None:
    emb = nn.Embedding(10, 3)
    param = emb.weight
    before = emb.weight.detach().clone()
    parametrize.register_parametrization(emb, "weight", FixedRows(torch.ones(4, 3)))
    assert stored(emb) is param
    assert param.shape == (6, 3)
    assert torch.equal(param, before[4:])
    assert [p is param for p in emb.parameters()] == [True]


def test_optimizer_created_before_registration_trains_the_free_rows() -> None:
    emb = nn.Embedding(8, 2)
    opt = torch.optim.Adam(emb.parameters(), lr=0.1)
    parametrize.register_parametrization(emb, "weight", FixedRows(torch.zeros(3, 2)))
    free_before = stored(emb).detach().clone()
    opt.zero_grad()
    emb(torch.arange(8)).sum().backward()
    opt.step()
    assert free_before.shape == (5, 2)
    torch.testing.assert_close(stored(emb), free_before - 0.1, rtol=0, atol=1e-6)
    assert torch.equal(emb.weight[:3], torch.zeros(3, 2))


@pytest.mark.parametrize("rows", [None, [0, 1], [1, 3], [3, 1]], ids=str)
def test_reference_is_a_private_copy(rows: list[int] | None) -> None:
    reference = torch.arange(6.0).reshape(2, 3)
    expected = reference.clone()
    constraint = FixedRows(reference, rows=rows)
    reference.add_(5.0)  # before registration
    emb = nn.Embedding(4, 3)
    parametrize.register_parametrization(emb, "weight", constraint)
    reference.add_(5.0)  # and after
    fixed_at = [0, 1] if rows is None else rows
    assert torch.equal(emb.weight[fixed_at], expected)


def test_reference_follows_to_dtype_and_is_converted_at_registration() -> None:
    emb = nn.Embedding(4, 3)
    reference = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    parametrize.register_parametrization(emb, "weight", FixedRows(reference))
    assert emb.weight.dtype == torch.float32
    assert torch.equal(emb.weight[:1], reference.float())
    emb.to(torch.bfloat16)
    assert emb.weight.dtype == torch.bfloat16
    assert constraint_of(emb).reference.dtype == torch.bfloat16
    assert torch.equal(emb.weight[:1], reference.to(torch.bfloat16))


@pytest.mark.parametrize("rows", [None, [5, 0, 3]], ids=["prefix", "scattered"])
def test_widening_keeps_the_rounded_reference_and_reset_reference_puts_the_exact_one_back(
    rows: list[int] | None,
) -> None:
    # The rule of the FixedRows docstring: a conversion converts the fixed rows as a buffer.
    emb = nn.Embedding(6, 3)
    reference = torch.tensor(
        [[0.1, 0.2, 0.3], [1 / 3, 2 / 3, 1.0], [1e-3, 5.0, -7.1]], dtype=torch.float64
    )
    parametrize.register_parametrization(emb, "weight", FixedRows(reference, rows))
    at = [0, 1, 2] if rows is None else rows
    free_before = emb.weight.detach().double()
    emb.double()
    assert torch.equal(emb.weight[at], reference.float().double())
    assert not torch.equal(emb.weight[at], reference)
    constraint_of(emb).reset_reference(reference, rows)
    assert torch.equal(emb.weight[at], reference)
    others = [r for r in range(6) if r not in at]
    assert torch.equal(emb.weight[others], free_before[others])


def test_reset_reference_refuses_other_rows_shapes_and_values_and_changes_nothing() -> None:
    emb = nn.Embedding(6, 3)
    reference = torch.randn(2, 3)
    parametrize.register_parametrization(emb, "weight", FixedRows(reference, [4, 1]))
    constraint = constraint_of(emb)
    before = emb.weight.detach().clone()
    cases: list[tuple[Tensor, list[int] | None, str]] = [
        (reference, None, r"`rows` to be the constraint's fixed rows \[1, 4\]"),
        (reference, [4, 2], r"`rows` to be the constraint's fixed rows"),
        (torch.randn(2, 4), [4, 1], r"`reference` of shape \(2, 3\). Got \(2, 4\)"),
        (torch.tensor([[0.0] * 3, [float("nan")] * 3]), [4, 1], r"finite. Got NaN .* rows \[1\]"),
    ]
    for given, rows, match in cases:
        with pytest.raises(ValueError, match=match):
            constraint.reset_reference(given, rows)
        assert torch.equal(emb.weight, before)
    emb.half()
    with pytest.raises(ValueError, match=r"finite in torch.float16, the dtype of the fixed rows"):
        constraint.reset_reference(torch.full((2, 3), 1e6), [4, 1])
    # Given in another order, the rows and their values are the same constraint.
    constraint.reset_reference(reference[[1, 0]], [1, 4])
    assert torch.equal(emb.weight[[4, 1]], reference.half())


@pytest.mark.parametrize(
    ("module", "name", "reference"),
    [
        (nn.Embedding(6, 4), "weight", torch.randn(2, 4)),
        (nn.EmbeddingBag(6, 4, mode="sum"), "weight", torch.randn(2, 4)),
        (nn.Linear(4, 6), "weight", torch.randn(2, 4)),
        (nn.Linear(4, 6), "bias", torch.randn(2)),
    ],
    ids=["embedding", "embedding-bag", "linear-weight", "linear-bias"],
)
def test_serves_any_tensor_with_a_row_dimension(
    module: nn.Module, name: str, reference: Tensor
) -> None:
    parametrize.register_parametrization(module, name, FixedRows(reference, rows=[5, 1]))
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    if isinstance(module, nn.Linear):
        x: tuple[Tensor, ...] = (torch.randn(3, 4),)
    elif isinstance(module, nn.EmbeddingBag):
        x = (torch.tensor([0, 1, 2, 5, 3, 4]), torch.tensor([0, 3]))
    else:
        x = (torch.arange(6),)
    for _ in range(3):
        opt.zero_grad()
        module(*x).pow(2).sum().backward()
        opt.step()
    value = getattr(module, name)
    assert torch.equal(value[[1, 5]], reference[[1, 0]])
    assert stored(module, name).shape[0] == 4


@pytest.mark.parametrize("rows", [None, [4, 0, 2]], ids=["prefix", "scattered"])
def test_gradcheck_float64(rows: list[int] | None) -> None:
    constraint = FixedRows(torch.randn(3, 2, dtype=torch.float64), rows=rows)
    constraint.right_inverse(torch.zeros(6, 2, dtype=torch.float64))
    free = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(constraint, (free,))
    assert torch.autograd.gradgradcheck(constraint, (free,))


def test_rows_given_as_a_prefix_are_stored_as_the_prefix_case() -> None:
    constraint = FixedRows(torch.randn(3, 2), rows=torch.tensor([2, 0, 1]))
    assert constraint.rows is None
    emb = nn.Embedding(5, 2)
    reference = constraint.reference.clone()
    parametrize.register_parametrization(emb, "weight", constraint)
    assert torch.equal(emb.weight[:3], reference)


def test_rows_are_matched_to_reference_rows_in_the_given_order() -> None:
    reference = torch.arange(6.0).reshape(3, 2)
    emb = nn.Embedding(6, 2)
    parametrize.register_parametrization(emb, "weight", FixedRows(reference, rows=[5, 1, 3]))
    assert torch.equal(emb.weight[5], reference[0])
    assert torch.equal(emb.weight[1], reference[1])
    assert torch.equal(emb.weight[3], reference[2])


def test_loading_the_parametrized_format_with_other_rows_rederives_the_layout() -> None:
    source = nn.Embedding(6, 2)
    parametrize.register_parametrization(source, "weight", FixedRows(torch.ones(2, 2), rows=[5, 0]))
    target = nn.Embedding(6, 2)
    parametrize.register_parametrization(
        target, "weight", FixedRows(torch.zeros(2, 2), rows=[1, 2])
    )
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight, source.weight)
    assert torch.equal(target.weight[[0, 5]], torch.ones(2, 2))
