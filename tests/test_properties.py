"""Property-based: random shapes, row sets and optimizers keep fixed rows exact and train the rest."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any
from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import stored
from torch import nn

from embedding_constraint import bake, fix_rows, fixed_rows

OPTIMIZERS: dict[str, Callable[[Iterable[Any]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
}


@st.composite
def problems(draw: st.DrawFn) -> tuple[int, int, list[int] | None, str, int]:
    rows_total = draw(st.integers(1, 24))
    dim = draw(st.integers(1, 6))
    fixed = draw(st.integers(0, rows_total))
    prefix = draw(st.booleans())
    rows = None if prefix else list(draw(st.permutations(range(rows_total)))[:fixed])
    return rows_total, dim, rows, draw(st.sampled_from(sorted(OPTIMIZERS))), fixed


def _to_and_back(emb: nn.Module) -> None:
    """A dtype round trip: the module rejoins its block after each move."""
    emb.double()
    emb.float()


def _apart(emb: nn.Module) -> None:
    """Separate the stored rows from the reference: lookups take the two-gather path."""
    with torch.no_grad():
        stored(emb).data = stored(emb).data.clone()


# Something done to the module after its second step; none of it may change a value.
DISTURBANCES: dict[str, Callable[[nn.Module], None]] = {
    "none": lambda emb: None,
    "to-and-back": _to_and_back,
    "apart": _apart,
}


@settings(max_examples=60, deadline=None)
@given(
    problem=problems(),
    seed=st.integers(0, 2**16),
    disturbance=st.sampled_from(sorted(DISTURBANCES)),
    spare_rows=st.sampled_from([None, 1, 3]),
)
def test_fixed_rows_exact_and_free_rows_match_a_separate_parameter(
    problem: tuple[int, int, list[int] | None, str, int],
    seed: int,
    disturbance: str,
    spare_rows: int | None,
) -> None:
    # `spare_rows`: None for this device's own choice, else the accelerators' way of spreading
    # fixed rows over that many spare gradient rows.
    rows_total, dim, rows, optimizer, fixed = problem
    torch.manual_seed(seed)
    reference = torch.randn(fixed, dim)
    emb = nn.Embedding(rows_total, dim)
    fixed_at = torch.arange(fixed) if rows is None else torch.tensor(rows, dtype=torch.int64)
    free_at = torch.tensor(
        [r for r in range(rows_total) if r not in set(fixed_at.tolist())], dtype=torch.int64
    )
    separate = nn.Parameter(emb.weight.detach()[free_at].clone())

    spread = (
        contextlib.nullcontext()
        if spare_rows is None
        else mock.patch.object(fixed_rows, "_spare_rows", return_value=spare_rows)
    )
    with spread:
        fix_rows(emb, reference, rows=rows)
    opt = OPTIMIZERS[optimizer](emb.parameters())
    opt_separate = OPTIMIZERS[optimizer]([separate])
    tokens = torch.randint(0, rows_total, (3, 7))
    target = torch.randn(dim)
    for step in range(4):
        if step == 2:
            DISTURBANCES[disturbance](emb)
        opt.zero_grad()
        opt_separate.zero_grad()
        torch.autograd.backward((emb(tokens[step % 3]) - target).pow(2).sum())
        weight = torch.zeros(rows_total, dim).index_put((fixed_at,), reference)
        weight = weight.index_put((free_at,), separate)
        torch.autograd.backward((weight[tokens[step % 3]] - target).pow(2).sum())
        opt.step()
        opt_separate.step()
        assert torch.equal(emb.weight[fixed_at], reference)

    torch.testing.assert_close(stored(emb), separate, rtol=1e-6, atol=1e-6)
    bake(emb)
    assert torch.equal(emb.weight[fixed_at], reference)
    torch.testing.assert_close(emb.weight.detach()[free_at], separate.detach())
