"""`expand_vocabulary` checks everything before the first change; constrained models keep their
Hugging Face methods.

A refused call leaves the model exactly as it was: its state dict (keys and values, NaN
included), config, module classes, parametrizations and Parameter objects are compared.
Models are the tiny ones of `test_transformers`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

pytest.importorskip("transformers")

from test_transformers import (  # the autouse fixture applies here too
    KEPT,
    KEPT_AT,
    NEW_VOCAB,
    OLD_VOCAB,
    _model,
    _quiet_transformers,  # noqa: F401
    _vocab_tensors,
)

from embedding_constraint import bake, fix_rows, is_fixed
from embedding_constraint.transformers import (
    expand_vocabulary,
    keep_constraints_through_hf_methods,
)

DROPPED = [3, 4]  # old ids of the tokens NEW_VOCAB drops


def _snapshot(model: Any) -> dict[str, Any]:
    """Everything a refused call must leave as it was."""
    parametrizations = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            plists = module.parametrizations
            parametrizations[name] = {
                attr: [type(p).__name__ for p in plists[attr]] for attr in plists
            }
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "generation": model.generation_config.to_dict(),
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "parametrizations": parametrizations,
        "parameters": [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)],
        "sizes": [
            (n, getattr(m, "num_embeddings", None), getattr(m, "padding_idx", None))
            for n, m in model.named_modules()
        ],
        "methods": sorted(
            k for k in vars(model) if k in ("tie_weights", "resize_token_embeddings")
        ),
    }


def _assert_unchanged(model: Any, before: dict[str, Any]) -> None:
    now = _snapshot(model)
    assert list(now["state"]) == list(before["state"])
    for key, value in before["state"].items():
        torch.testing.assert_close(now["state"][key], value, rtol=0, atol=0, equal_nan=True)
    for part in ("config", "generation", "classes", "parametrizations", "parameters", "sizes"):
        assert now[part] == before[part], part
    assert now["methods"] == before["methods"]


def _refused(model: Any, match: str, exception: type[Exception] = ValueError) -> None:
    before = _snapshot(model)
    with pytest.raises(exception, match=match):
        expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    _assert_unchanged(model, before)


def _set(tensor: Tensor, row: int, value: float) -> None:
    with torch.no_grad():
        tensor[row, 0] = value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(("tied", "where"), [(True, "input"), (False, "input"), (False, "head")])
def test_a_non_finite_old_row_is_refused_and_changes_nothing(
    tied: bool, where: str, value: float
) -> None:
    model = _model("llama", tied)
    module = model.get_input_embeddings() if where == "input" else model.get_output_embeddings()
    _set(module.weight, KEPT[5], value)
    what = "input embedding" if where == "input" else "output head"
    _refused(model, rf"the {what}'s rows.*finite.*'t{KEPT[5]}'")


def test_a_non_finite_old_bias_entry_is_refused_and_changes_nothing() -> None:
    model = _model("phi", False)
    with torch.no_grad():
        model.get_output_embeddings().bias[KEPT[2]] = float("nan")
    _refused(model, rf"the output head's bias.*finite.*'t{KEPT[2]}'")


@pytest.mark.parametrize("init", ["mean", "normal"])
@pytest.mark.parametrize("where", ["input", "head", "bias"])
def test_a_non_finite_dropped_row_that_the_init_reads_is_refused(init: str, where: str) -> None:
    model = _model("phi", False)
    head = model.get_output_embeddings()
    tensor = {"input": model.get_input_embeddings().weight, "head": head.weight}.get(where)
    with torch.no_grad():
        if tensor is None:
            head.bias[DROPPED[0]] = float("inf")
        else:
            tensor[DROPPED[0], 1] = float("inf")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"init='{init}' reads.*'t{DROPPED[0]}'.*dropped"):
        expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB, init=init)  # type: ignore[arg-type]
    _assert_unchanged(model, before)


def test_a_non_finite_dropped_row_that_no_init_reads_is_dropped() -> None:
    model = _model("llama", False)
    _set(model.get_input_embeddings().weight, DROPPED[0], float("inf"))
    old = _vocab_tensors(model)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB, init="zeros")
    now = _vocab_tensors(model)
    assert torch.equal(now["input"][KEPT_AT], old["input"][KEPT])
    assert bool(now["input"].isfinite().all())


def test_an_init_that_gives_non_finite_rows_is_refused() -> None:
    model = _model("llama", False)

    def nan_init(rows: Tensor) -> None:
        rows.fill_(float("nan"))

    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"Expected `init` to give finite rows"):
        expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB, init=nan_init)
    _assert_unchanged(model, before)


class _Scale(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * x


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("where", ["input", "head"])
def test_a_parametrized_embedding_or_head_is_refused_and_changes_nothing(
    tied: bool, where: str
) -> None:
    model = _model("llama", tied)
    if where == "head":
        torch.nn.utils.parametrizations.weight_norm(model.get_output_embeddings())
        what, kind = "lm_head.weight", "_WeightNorm"
    else:
        parametrize.register_parametrization(model.get_input_embeddings(), "weight", _Scale())
        what, kind = "model.embed_tokens.weight", "_Scale"
    _refused(model, rf"no parametrization.*{what}.*{kind}.*remove_parametrizations")


def test_a_second_call_on_an_expanded_model_is_refused_and_changes_nothing() -> None:
    model = _model("llama", True)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"earlier expand_vocabulary.*bake\(model\)"):
        expand_vocabulary(model, NEW_VOCAB, [*NEW_VOCAB, "more"])
    _assert_unchanged(model, before)
    assert is_fixed(model.get_input_embeddings())


def test_a_model_constrained_by_fix_rows_is_refused_and_changes_nothing() -> None:
    model = _model("llama", False)
    head = model.get_output_embeddings()
    fix_rows(model, head.weight[:4].detach().clone(), name="lm_head.weight")
    _refused(model, r"output head is already constrained.*fix_rows.*bake\(model\)")


def test_after_bake_a_second_expansion_from_the_first_ones_vocabulary_works() -> None:
    model = _model("llama", True)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    bake(model)
    first = model.get_input_embeddings().weight.detach().clone()
    expand_vocabulary(model, NEW_VOCAB, [*NEW_VOCAB, "more"])
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(NEW_VOCAB) + 1
    assert torch.equal(weight[: len(NEW_VOCAB)], first)


def test_a_refused_call_then_the_cleaned_model_expands_as_a_fresh_one() -> None:
    model = _model("llama", False)
    clean = _vocab_tensors(model)
    _set(model.get_input_embeddings().weight, KEPT[5], float("nan"))
    with pytest.raises(ValueError, match="finite"):
        expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(clean["input"])
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB, generator=torch.Generator().manual_seed(3))
    fresh = expand_vocabulary(
        _model("llama", False), OLD_VOCAB, NEW_VOCAB, generator=torch.Generator().manual_seed(3)
    )
    for key, value in _vocab_tensors(fresh).items():
        assert torch.equal(_vocab_tensors(model)[key], value), key
    assert model.config.vocab_size == len(NEW_VOCAB)


def _fixed_by_name(tied: bool, *, install: bool) -> tuple[Any, Tensor]:
    model = _model("llama", tied)
    reference = model.get_input_embeddings().weight[:5].detach().clone()
    fix_rows(model, reference, name="model.embed_tokens.weight")
    if install:  # what fix_rows does once it calls it (the lead's change to fix_rows.py)
        keep_constraints_through_hf_methods(model)
    return model, reference


@pytest.mark.parametrize("tied", [True, False])
def test_tie_weights_and_resize_work_on_a_model_fixed_by_name(tied: bool) -> None:
    model, reference = _fixed_by_name(tied, install=True)
    params = list(model.parameters())
    model.tie_weights()
    assert list(model.parameters()) == params  # the same objects: an optimizer keeps them
    _assert_fixed_and_tied(model, reference, tied)
    model.resize_token_embeddings(30, mean_resizing=False)
    assert model.get_input_embeddings().weight.shape[0] == 30
    assert model.get_output_embeddings().weight.shape[0] == 30
    assert model.config.vocab_size == 30
    _assert_fixed_and_tied(model, reference, tied)
    with pytest.raises(ValueError, match="at least 5"):
        model.resize_token_embeddings(4)
    assert model.get_input_embeddings().weight.shape[0] == 30


def _assert_fixed_and_tied(model: Any, reference: Tensor, tied: bool) -> None:
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert is_fixed(embedding)
    assert torch.equal(embedding.weight[:5], reference)
    if tied:
        assert head.parametrizations.weight is embedding.parametrizations.weight
    else:
        assert not is_fixed(head)


def test_keep_constraints_through_hf_methods_leaves_a_module_without_them_alone() -> None:
    embedding = nn.Embedding(4, 2)
    fix_rows(embedding, torch.zeros(1, 2))
    keep_constraints_through_hf_methods(embedding)
    assert "tie_weights" not in vars(embedding)


def test_fix_rows_by_name_on_a_tied_model_keeps_tie_weights_working() -> None:
    model, reference = _fixed_by_name(True, install=False)
    model.tie_weights()
    assert torch.equal(model.get_input_embeddings().weight[:5], reference)
