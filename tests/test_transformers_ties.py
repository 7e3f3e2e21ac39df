"""``tie_weights`` of a model grown with `expand_vocabulary` when its ties already hold.

accelerate's ``fsdp2_prepare_model`` with ``cpu_ram_efficient_loading`` moves the model to the
meta device and calls ``model.tie_weights()`` there: with every tie the model declares already
one shared constraint, nothing is baked or constrained again.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM

from embedding_constraint import is_fixed
from embedding_constraint.transformers import expand_vocabulary

OLD = 12
OLD_VOCAB = [f"t{i}" for i in range(OLD)]
# Tokens 3 and 4 removed, the rest re-sorted, two added: the fixed rows are scattered.
NEW_VOCAB = [*OLD_VOCAB[:3], "new0", *reversed(OLD_VOCAB[5:]), "new1"]
KEPT = [0, 1, 2, *range(5, OLD)]  # old ids of the shared tokens
KEPT_AT = [NEW_VOCAB.index(OLD_VOCAB[i]) for i in KEPT]  # their new ids


@pytest.fixture(autouse=True)
def _quiet_transformers() -> Iterator[None]:
    logging = transformers.utils.logging  # untyped in transformers

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(level)


def _llama(tied: bool) -> Any:  # transformers is partly typed
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=OLD,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def _matrices(model: Any) -> dict[str, Tensor]:
    return {
        "input": model.get_input_embeddings().weight.detach().clone(),
        "head": model.get_output_embeddings().weight.detach().clone(),
    }


def _held(model: Any) -> dict[str, weakref.ref[Any]]:
    """What a bake and a new constraint would replace: each matrix's parametrization list,
    its constraint and its stored Parameter. Weak references: a strong one would hold a baked
    Parameter outside the model, which constraining it again refuses."""
    held: dict[str, weakref.ref[Any]] = {}
    for key, module in (
        ("input", model.get_input_embeddings()),
        ("head", model.get_output_embeddings()),
    ):
        parametrizations = module.parametrizations.weight
        held[f"{key} list"] = weakref.ref(parametrizations)
        held[f"{key} constraint"] = weakref.ref(parametrizations[0])
        held[f"{key} stored"] = weakref.ref(parametrizations.original)
    return held


def _assert_same_objects(model: Any, held: dict[str, weakref.ref[Any]]) -> None:
    for key, now in _held(model).items():
        assert now() is held[key](), key


@pytest.mark.parametrize("tied", [True, False])
def test_tie_weights_with_the_ties_in_place_changes_nothing(tied: bool) -> None:
    model = _llama(tied)
    old = _matrices(model)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    expanded = _matrices(model)
    held = _held(model)
    parameters = list(model.parameters())

    model.tie_weights()

    _assert_same_objects(model, held)  # nothing baked, nothing constrained again
    assert list(model.parameters()) == parameters
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert (embedding.parametrizations.weight is head.parametrizations.weight) == tied
    assert is_fixed(embedding, "weight")
    assert is_fixed(head, "weight")
    now = _matrices(model)
    for key, value in now.items():
        assert torch.equal(value, expanded[key]), key  # every row, bit for bit
    assert torch.equal(now["input"][KEPT_AT], old["input"][KEPT])
    assert torch.equal(now["head"][KEPT_AT], old["head"][KEPT])


@pytest.mark.parametrize("tied", [True, False])
def test_tie_weights_on_the_meta_device_with_the_ties_in_place(tied: bool) -> None:
    """What accelerate does under ``cpu_ram_efficient_loading``: to meta, then tie_weights."""
    model = expand_vocabulary(_llama(tied), OLD_VOCAB, NEW_VOCAB)
    model.to("meta")
    held = _held(model)

    model.tie_weights()

    _assert_same_objects(model, held)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert (embedding.parametrizations.weight is head.parametrizations.weight) == tied
    assert is_fixed(embedding, "weight")
    assert is_fixed(head, "weight")
    assert embedding.weight.is_meta
    assert head.weight.is_meta
    assert tuple(head.weight.shape) == (len(NEW_VOCAB), 8)


def test_tie_weights_making_a_new_tie_on_the_meta_device_keeps_the_fixed_rows() -> None:
    """A tie not yet made is made by baking and constraining again, on the meta device too:
    the reference keeps its values there (a module on the meta device is constrained with
    them), and ``to_empty`` brings them back exact."""
    model = expand_vocabulary(_llama(False), OLD_VOCAB, NEW_VOCAB)
    reference = model.get_input_embeddings().parametrizations.weight[0].reference.clone()
    model.to("meta")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embedding.parametrizations.weight is head.parametrizations.weight
    constraint = embedding.parametrizations.weight[0]
    assert torch.equal(constraint.reference, reference)
    model.to_empty(device="cpu")
    assert torch.equal(head.weight[constraint.fixed_row_indices()], reference)


def test_tie_weights_making_a_new_tie_keeps_the_embeddings_rows() -> None:
    """The tie the class makes when one declared pair is not in place: today's bake, tie and
    constrain again, the embedding's stored Parameter kept."""
    model = _llama(False)
    old = _matrices(model)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    stored = model.get_input_embeddings().parametrizations.weight.original
    model.config.tie_word_embeddings = True

    model.tie_weights()

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embedding.parametrizations.weight is head.parametrizations.weight
    assert embedding.parametrizations.weight.original is stored
    assert torch.equal(head.weight[KEPT_AT], old["input"][KEPT])
