"""PEFT after `expand_vocabulary`: each path gives the model it gives on a plain model, or refuses.

Each test builds the tiny Llama of test_transformers, expands its vocabulary and applies a PEFT
config; the "plain" model is the same expanded model baked (same values, no constraint). The
adapter's weights are set to random values (by name, so both models get the same ones), and
the adapter model's logits are compared with the merged model's, and with the plain model's;
the merged model's old rows are compared with the original's bit for bit.
"""

from __future__ import annotations

import copy
import warnings
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from test_transformers import (
    KEPT,
    KEPT_AT,
    NEW_VOCAB,
    OLD_VOCAB,
    _model,
    _quiet_transformers,  # noqa: F401  (an autouse fixture)
    _vocab_tensors,
)

from embedding_constraint import bake, is_fixed
from embedding_constraint.peft_compat import declare_constrained_ties
from embedding_constraint.transformers import expand_vocabulary

ADDED = [i for i, token in enumerate(NEW_VOCAB) if token.startswith("new")]
OLD_TOKEN = KEPT_AT[3]  # the new id of an old token (its row is fixed)
IDS = torch.tensor([[0, ADDED[0], OLD_TOKEN, 4, ADDED[1], 7, ADDED[2], 11, 20]])
ATOL = 1e-5  # float32 logits through a different (but equal) sum order


def _expanded(tied: bool, *, declared: bool = False) -> tuple[Any, dict[str, Tensor]]:
    """The expanded tiny Llama, constrained, and its vocabulary tensors before expanding."""
    model = _model("llama", tied)
    before = _vocab_tensors(model)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    if declared:
        assert declare_constrained_ties(model) == (["lm_head"] if tied else [])
    return model, before


def _plain(model: Any) -> Any:
    """The same model without the constraint (a baked deep copy)."""
    plain: Any = bake(copy.deepcopy(model))
    assert not is_fixed(plain, "model.embed_tokens.weight")
    return plain


def _set_adapter_weights(adapted: nn.Module) -> None:
    """Random values for every trainable adapter tensor, seeded by its name (the free rows of
    a constrained copy get the rows of the same seed's full tensor)."""
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if not param.requires_grad or ("lora_" not in name and "trainable_tokens" not in name):
                continue
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _wrapped(adapted: nn.Module) -> set[str]:
    """The names of the modules PEFT replaced or wrapped (relative to the base model)."""
    return {
        name.removeprefix("base_model.model.")
        for name, module in adapted.named_modules()
        if type(module).__module__.startswith("peft.") and hasattr(module, "base_layer")
    }


def _merge(adapted: Any) -> Any:
    """``merge_and_unload``; a tied constrained model stays tied, with no warning that it is not
    (`test_merging_a_tied_constrained_model_keeps_it_tied`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return adapted.merge_and_unload()


def _logits(model: nn.Module) -> Tensor:
    with torch.no_grad():
        logits: Tensor = model(input_ids=IDS).logits
    return logits


def _assert_merged_exact(merged: Any, before: dict[str, Tensor]) -> None:
    """The merged model's old rows are the original's, bit for bit."""
    now = _vocab_tensors(merged)
    for key, tensor in before.items():
        assert torch.equal(now[key][KEPT_AT], tensor[KEPT]), key


def _check(config: Any, tied: bool, *, declared: bool = False, plain_too: bool = True) -> None:
    """The adapter and merged logits agree, equal the plain model's, and old rows are exact."""
    model, before = _expanded(tied, declared=declared)
    plain = _plain(model)
    adapted = peft.get_peft_model(model, copy.deepcopy(config))
    _set_adapter_weights(adapted)
    expected = _logits(adapted)
    if plain_too:
        plain_adapted = peft.get_peft_model(plain, copy.deepcopy(config))
        _set_adapter_weights(plain_adapted)
        assert _wrapped(adapted) == _wrapped(plain_adapted)
        torch.testing.assert_close(expected, _logits(plain_adapted), rtol=0, atol=ATOL)
    merged = _merge(adapted)
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=ATOL)
    _assert_merged_exact(merged, before)
    if plain_too:
        plain_merged = plain_adapted.merge_and_unload()
        torch.testing.assert_close(_logits(merged), _logits(plain_merged), rtol=0, atol=ATOL)
        assert _tied(merged) == _tied(plain_merged)


def _tied(model: Any) -> bool:
    """Whether the embedding and head are one Parameter (constrained: one stored Parameter)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return {id(p) for p in embedding.parameters()} == {id(p) for p in head.parameters()}


LORA_BODY = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
# PEFT merges LoRA on a tied embedding and head twice into the one weight, on a plain model too
# (logits 98 off): only the untied model is PEFT's own supported path.
LORA_VOCAB = peft.LoraConfig(r=2, target_modules=["embed_tokens", "lm_head"])


def _tokens(indices: list[int]) -> Any:
    return peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=indices)


@pytest.mark.parametrize("tied", [True, False])
def test_lora_on_the_body_merges_as_on_a_plain_model(tied: bool) -> None:
    _check(LORA_BODY, tied)


@pytest.mark.parametrize(
    "config", [LORA_BODY, _tokens(ADDED)], ids=["lora body", "trainable tokens"]
)
def test_merging_a_tied_constrained_model_keeps_it_tied(config: Any) -> None:
    """PEFT tells a tie by the two weights' ``data_ptr()``: tied holders read one tensor."""
    model, before = _expanded(tied=True, declared=True)
    adapted = peft.get_peft_model(model, copy.deepcopy(config))
    _set_adapter_weights(adapted)
    expected = _logits(adapted)
    merged = _merge(adapted)
    assert _tied(merged)
    assert merged.config.tie_word_embeddings
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=ATOL)
    _assert_merged_exact(merged, before)


@pytest.mark.parametrize(
    "config", [LORA_BODY, _tokens(ADDED)], ids=["lora body", "trainable tokens"]
)
def test_merging_a_tied_model_after_bake_keeps_it_tied(config: Any) -> None:
    model, before = _expanded(tied=True, declared=True)
    adapted = peft.get_peft_model(model, copy.deepcopy(config))
    _set_adapter_weights(adapted)
    expected = _logits(adapted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no longer tied" warning
        baked: Any = bake(adapted)
        merged = baked.merge_and_unload()
    assert _tied(merged)
    assert merged.config.tie_word_embeddings
    assert merged.get_input_embeddings().weight is merged.get_output_embeddings().weight
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=ATOL)
    _assert_merged_exact(merged, before)


def test_lora_on_the_embedding_and_head_merge_is_refused() -> None:
    model, _ = _expanded(tied=False)
    adapted = peft.get_peft_model(model, copy.deepcopy(LORA_VOCAB))
    _set_adapter_weights(adapted)
    expected = _logits(adapted)
    # The old rows cannot take the adapter's change and stay fixed: the merge is refused, and
    # the adapter model is left as it was.
    with pytest.raises(ValueError, match=r"changes \d+ fixed rows .*bake\(model\) first"):
        _merge(adapted)
    torch.testing.assert_close(_logits(adapted), expected, rtol=0, atol=0)
    _assert_bake_then_merge_gives(adapted, expected)


def _assert_bake_then_merge_gives(adapted: Any, expected: Tensor) -> None:
    """The way out the refusal names: bake, then merge, gives the adapter model's logits."""
    baked: Any = bake(adapted)
    merged = baked.merge_and_unload()
    assert type(merged.get_input_embeddings()) is nn.Embedding
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=ATOL)


def test_a_refused_merge_leaves_the_layers_merged_before_it_merged() -> None:
    # PEFT merges (and unwraps) layer by layer, in module order: the body's q_proj before the
    # head, whose merge is refused. The model still gives the adapter's logits; bake and merge
    # again merges the rest.
    model, _ = _expanded(tied=False)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    adapted = peft.get_peft_model(model, config)
    _set_adapter_weights(adapted)
    expected = _logits(adapted)
    with pytest.raises(ValueError, match="layers merged before this one stay merged"):
        _merge(adapted)
    assert _wrapped(adapted) == {"lm_head"}
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # merged and unwrapped
    torch.testing.assert_close(_logits(adapted), expected, rtol=0, atol=ATOL)
    _assert_bake_then_merge_gives(adapted, expected)


def test_lora_on_the_embedding_and_head_merges_exact_after_bake() -> None:
    # The adapter moves every row, old ones too: merged into the baked (plain) model, exactly.
    model, _ = _expanded(tied=False)
    adapted = peft.get_peft_model(model, copy.deepcopy(LORA_VOCAB))
    _set_adapter_weights(adapted)
    expected = _logits(adapted)
    baked: Any = bake(adapted)
    merged = baked.merge_and_unload()
    assert type(merged.get_input_embeddings()) is nn.Embedding
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "tied",
    [True, False],
)
def test_trainable_token_indices_wrap_and_merge_as_on_a_plain_model(tied: bool) -> None:
    _check(_tokens(ADDED), tied)


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_token_indices_with_declared_ties_wrap_and_merge_as_on_a_plain_model(
    tied: bool,
) -> None:
    _check(_tokens(ADDED), tied, declared=True)
    _check(peft.TrainableTokensConfig(token_indices=ADDED), tied, declared=True)


def test_a_declared_tie_is_what_peft_finds_and_bake_removes_it() -> None:
    from peft.utils.other import _get_module_names_tied_with_embedding

    model, _ = _expanded(tied=True)
    # fix_rows (called by expand_vocabulary) declared it; declaring again changes nothing.
    assert _get_module_names_tied_with_embedding(model) == ["lm_head"]
    assert declare_constrained_ties(model) == ["lm_head"]
    assert _get_module_names_tied_with_embedding(model) == ["lm_head"]
    assert model.lm_head._tied_weights_keys == {"weight": "parametrizations.weight.original"}
    untied, _ = _expanded(tied=False, declared=True)
    assert _get_module_names_tied_with_embedding(untied) == []
    bake(model)
    assert type(model.lm_head) is nn.Linear
    assert not hasattr(model.lm_head, "_tied_weights_keys")
    assert _get_module_names_tied_with_embedding(model) == ["lm_head"]  # the model's own entry
    assert model.get_expanded_tied_weights_keys(all_submodels=True) == {
        "lm_head.weight": "model.embed_tokens.weight"
    }


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_tokens_on_an_old_token_merge_is_refused(tied: bool) -> None:
    model, _ = _expanded(tied, declared=True)
    adapted = peft.get_peft_model(model, _tokens([OLD_TOKEN, ADDED[0]]))
    _set_adapter_weights(adapted)
    expected = _logits(adapted)
    # The old rows cannot take the adapter's change and stay fixed: the merge is refused, and
    # the adapter model is left as it was.
    with pytest.raises(ValueError, match=r"changes 1 fixed row .*bake\(model\) first"):
        _merge(adapted)
    torch.testing.assert_close(_logits(adapted), expected, rtol=0, atol=0)
    _assert_bake_then_merge_gives(adapted, expected)


@pytest.mark.parametrize("tied", [True, False])
def test_modules_to_save_train_the_new_rows_and_merge_exact(tied: bool) -> None:
    # Each saved module is a constrained copy: its free rows train, its old rows stay exact.
    # Tied, PEFT copies the embedding and the head apart, as on a plain model.
    config = peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]
    )
    model, before = _expanded(tied, declared=True)
    start = model.get_input_embeddings().weight.detach().clone()
    if tied:  # PEFT's warning on a plain tied model too
        with pytest.warns(UserWarning, match="ensure_weight_tying` is not set"):
            adapted = peft.get_peft_model(model, config)
    else:
        adapted = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "modules_to_save" in name:
                assert name.endswith("parametrizations.weight.original")
                param.add_(1.0)
    expected = _logits(adapted)
    if tied:
        with pytest.warns(UserWarning, match="no longer tied after merging"):
            merged = adapted.merge_and_unload()
    else:
        merged = adapted.merge_and_unload()
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=ATOL)
    _assert_merged_exact(merged, before)
    added = merged.get_input_embeddings().weight.detach()[ADDED]
    torch.testing.assert_close(added, start[ADDED] + 1.0, rtol=0, atol=ATOL)


@pytest.mark.parametrize("tied", [True, False])
# PEFT's own warnings on a plain tied model too (two copies it does not tie):
@pytest.mark.filterwarnings("ignore:.*ensure_weight_tying:UserWarning")
@pytest.mark.filterwarnings("ignore:.*no longer tied after merging:UserWarning")
def test_bake_of_a_model_with_modules_to_save_bakes_every_copy(tied: bool) -> None:
    # PEFT's ModulesToSaveWrapper forwards `parametrizations` to its active copy: the
    # wrapper itself holds none (bake once stopped there, half done, with a StopIteration).
    config = peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]
    )
    model, before = _expanded(tied, declared=True)
    adapted = peft.get_peft_model(model, config)
    expected = _logits(adapted)
    bake(adapted)
    assert not is_fixed(adapted)
    assert not [n for n, _ in adapted.named_parameters() if "parametrizations" in n]
    torch.testing.assert_close(_logits(adapted), expected, rtol=0, atol=0)
    merged = adapted.merge_and_unload()
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=ATOL)
    _assert_merged_exact(merged, before)


def test_modules_to_save_with_ensure_weight_tying_needs_bake_first() -> None:
    # PEFT ties the head's copy with `nn.Linear(...).weight = embedding_copy.weight`; the
    # constrained copy's weight is computed, not a Parameter, so torch refuses the assignment
    # inside get_peft_model (which has wrapped some modules by then: build the model anew).
    config = peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True
    )
    model, before = _expanded(tied=True, declared=True)
    with pytest.raises(TypeError, match=r"cannot assign .* as parameter 'weight'"):
        peft.get_peft_model(model, copy.deepcopy(config))
    # Baked first, the copies are one Parameter and the merged model is tied; every row of the
    # saved copy trains (nothing is fixed any more).
    model, before = _expanded(tied=True, declared=True)
    adapted = peft.get_peft_model(bake(model), copy.deepcopy(config))
    embedding_copy = adapted.get_input_embeddings().modules_to_save["default"]
    head_copy = adapted.get_output_embeddings().modules_to_save["default"]
    assert embedding_copy.weight is head_copy.weight
    assert embedding_copy.weight.requires_grad
    with torch.no_grad():
        embedding_copy.weight[ADDED] += 1.0
    expected = _logits(adapted)
    merged = adapted.merge_and_unload()
    assert _tied(merged)
    assert merged.config.tie_word_embeddings
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=ATOL)
    _assert_merged_exact(merged, before)


SAVED = {
    "lora body": (LORA_BODY, True, False),
    "trainable tokens, untied": (_tokens(ADDED), False, False),
    "trainable tokens, tied, declared": (_tokens(ADDED), True, True),
    "trainable tokens, tied": (_tokens(ADDED), True, False),
}


@pytest.mark.parametrize(
    "case",
    list(SAVED),
)
def test_a_saved_adapter_loads_on_a_fresh_base_and_merges_exact(case: str, tmp_path: Path) -> None:
    config, tied, declared = SAVED[case]
    model, before = _expanded(tied, declared=declared)
    adapted = peft.get_peft_model(model, copy.deepcopy(config))
    _set_adapter_weights(adapted)
    expected = _logits(adapted)
    adapted.save_pretrained(tmp_path)
    fresh, _ = _expanded(tied, declared=declared)  # the same base, built and expanded anew
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    assert _wrapped(loaded) == _wrapped(adapted)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=ATOL)
    merged = _merge(loaded)
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=ATOL)
    _assert_merged_exact(merged, before)
    plain, _ = _expanded(tied)
    plain_loaded = peft.PeftModel.from_pretrained(_plain(plain), tmp_path)
    torch.testing.assert_close(_logits(plain_loaded), expected, rtol=0, atol=ATOL)
