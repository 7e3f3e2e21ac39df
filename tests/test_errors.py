"""Bad input: a clear error naming the argument, and the module left exactly as it was."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from support import stored
from torch import nn

from embedding_constraint import FixedRows, bake, fix_rows, is_fixed
from embedding_constraint.fixed_rows import parametrization_list


def _snapshot(module: nn.Module) -> tuple[type, dict[str, Any], list[int]]:
    return (
        type(module),
        copy.deepcopy(module.state_dict(keep_vars=False)),
        [id(p) for p in module.parameters()],
    )


def _assert_unchanged(module: nn.Module, before: tuple[type, dict[str, Any], list[int]]) -> None:
    kind, state, ids = before
    assert type(module) is kind
    assert not hasattr(module, "parametrizations")
    assert [id(p) for p in module.parameters()] == ids
    after = module.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert torch.equal(after[key], value)
    assert not module._state_dict_hooks
    assert not module._load_state_dict_pre_hooks


CASES: list[tuple[str, Callable[[], nn.Module], dict[str, Any], type[Exception], str]] = [
    (
        "wrong trailing shape",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.zeros(2, 4)},
        ValueError,
        r"rows of shape \(3,\) \(a reference of shape \(k, 3\)\).* Got a reference of shape \(2, 4\)",
    ),
    (
        "too many reference rows",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.zeros(7, 3)},
        ValueError,
        r"at most as many rows as `module.weight` of shape \(6, 3\). Got 7 rows",
    ),
    (
        "rows out of range",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.zeros(2, 3), "rows": [1, 6]},
        ValueError,
        r"Expected `rows` below 6.*Got row 6",
    ),
    (
        "negative rows",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.zeros(2, 3), "rows": [-1, 2]},
        ValueError,
        r"Expected `rows` to be non-negative. Got -1",
    ),
    (
        "duplicate rows",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.zeros(3, 3), "rows": [1, 4, 1]},
        ValueError,
        r"Expected `rows` to be distinct. Got duplicates: \[1\]",
    ),
    (
        "float rows",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.zeros(2, 3), "rows": torch.tensor([1.0, 2.0])},
        TypeError,
        r"Expected `rows` to hold integers. Got a tensor of dtype torch.float32",
    ),
    (
        "non-int rows",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.zeros(2, 3), "rows": [1, "2"]},
        TypeError,
        r"Expected `rows` to hold integers. Got an element of type str",
    ),
    (
        "rows count",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.zeros(2, 3), "rows": [1, 2, 3]},
        ValueError,
        r"one row per reference row \(2\). Got 3 rows",
    ),
    (
        "nan reference",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.tensor([[0.0, 0, 0], [0, float("nan"), 0]])},
        ValueError,
        r"Expected `reference` to be finite. Got NaN or Inf in rows \[1\]",
    ),
    (
        "inf reference",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.tensor([[float("inf"), 0, 0]])},
        ValueError,
        r"Got NaN or Inf in rows \[0\]",
    ),
    (
        "list reference",
        lambda: nn.Embedding(6, 3),
        {"reference": [[0.0, 0.0, 0.0]]},
        TypeError,
        r"Expected `reference` to be a torch.Tensor or a module like `module`. Got list",
    ),
    (
        "numpy reference",
        lambda: nn.Embedding(6, 3),
        {"reference": np.zeros((1, 3), dtype=np.float32)},
        TypeError,
        r"Expected `reference` to be a torch.Tensor or a module like `module`. Got ndarray",
    ),
    (
        "integer reference",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.zeros(1, 3, dtype=torch.int64)},
        TypeError,
        r"floating-point. Got a tensor of dtype torch.int64",
    ),
    (
        "missing parameter",
        lambda: nn.Embedding(6, 3),
        {"reference": torch.zeros(1, 3), "name": "bias"},
        ValueError,
        r"Expected `module` to have a parameter named 'bias'. Got none; its parameters are \['weight'\]",
    ),
    (
        "missing submodule",
        lambda: nn.Sequential(nn.Embedding(6, 3)),
        {"reference": torch.zeros(1, 3), "name": "1.weight"},
        ValueError,
        r"there is no submodule '1'",
    ),
    (
        "sparse embedding",
        lambda: nn.Embedding(6, 3, sparse=True),
        {"reference": torch.zeros(1, 3)},
        ValueError,
        r"Got Embedding\(sparse=True\): a sparse gradient cannot flow",
    ),
    (
        "sparse embedding bag",
        lambda: nn.EmbeddingBag(6, 3, sparse=True),
        {"reference": torch.zeros(1, 3)},
        ValueError,
        r"Got EmbeddingBag\(sparse=True\)",
    ),
    (
        "max_norm embedding",
        lambda: nn.Embedding(6, 3, max_norm=1.0),
        {"reference": torch.zeros(1, 3)},
        ValueError,
        r"Expected a Embedding without max_norm. Got max_norm=1.0: max_norm renormalises",
    ),
]


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "match"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_fix_rows_rejects_bad_input_and_leaves_the_module_unchanged(
    make: Callable[[], nn.Module],
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    module = make()
    before = _snapshot(module)
    reference = kwargs.pop("reference")
    with pytest.raises(error, match=match):
        fix_rows(module, reference, **kwargs)
    _assert_unchanged(module, before)


def test_a_second_constraint_on_a_constrained_weight_is_rejected() -> None:
    emb = nn.Embedding(6, 3)
    fix_rows(emb, torch.ones(2, 3))
    free = stored(emb)
    state = copy.deepcopy(emb.state_dict())
    with pytest.raises(ValueError, match=r"`module.weight` to be unconstrained. Got a tensor"):
        fix_rows(emb, torch.zeros(1, 3))
    assert stored(emb) is free
    assert len(parametrization_list(emb, "weight")) == 1
    assert torch.equal(emb.state_dict()["weight"], state["weight"])


def test_raw_registration_with_bad_rows_leaves_the_module_unchanged() -> None:
    from torch.nn.utils import parametrize

    emb = nn.Embedding(6, 3)
    before = _snapshot(emb)
    with pytest.raises(ValueError, match=r"Expected `rows` below 6"):
        parametrize.register_parametrization(emb, "weight", FixedRows(torch.zeros(1, 3), rows=[9]))
    _assert_unchanged(emb, before)


@pytest.mark.parametrize("bad", ["", "weights", 3])  # (None is the default: "weight")
def test_fix_rows_rejects_a_bad_name(bad: Any) -> None:
    emb = nn.Embedding(6, 3)
    before = _snapshot(emb)
    with pytest.raises((TypeError, ValueError), match="Expected"):
        fix_rows(emb, torch.zeros(1, 3), name=bad)
    _assert_unchanged(emb, before)


def test_fix_rows_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"Expected `module` to be a torch.nn.Module. Got Tensor"):
        fix_rows(torch.zeros(3, 3), torch.zeros(1, 3))  # type: ignore[arg-type]


def test_bake_on_an_unconstrained_module_is_rejected() -> None:
    emb = nn.Embedding(6, 3)
    before = _snapshot(emb)
    with pytest.raises(ValueError, match=r"Expected a tensor constrained by fix_rows under"):
        bake(emb)
    with pytest.raises(ValueError, match=r"Expected 'weight' to be constrained by fix_rows"):
        bake(emb, name="weight")
    _assert_unchanged(emb, before)


@pytest.mark.parametrize("bad", [3, "", None])
def test_bake_and_is_fixed_reject_a_name_that_is_not_a_str(bad: Any) -> None:
    emb = nn.Embedding(6, 3)
    fix_rows(emb, torch.zeros(1, 3))
    with pytest.raises(TypeError, match=r"Expected `name` to be a non-empty str.*Got"):
        is_fixed(emb, bad)
    if bad is not None:  # None is bake's default: every constrained tensor
        with pytest.raises(TypeError, match=r"Expected `name` to be a non-empty str.*Got"):
            bake(emb, name=bad)
    assert is_fixed(emb)


def test_bake_names_a_tensor_that_does_not_exist() -> None:
    head = nn.Linear(3, 6)
    fix_rows(head, torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"'wieght', which names no tensor.*\['bias', 'weight'\]"):
        bake(head, name="wieght")
    with pytest.raises(ValueError, match=r"Expected 'bias' to be constrained by fix_rows"):
        bake(head, name="bias")
    assert is_fixed(head)
