"""`expand_vocabulary` across the architectures transformers builds: every per-token tensor and
vocabulary-size field moves with the vocabulary, or the call is refused before any change.

Targeted cases first (Gemma 4's per-layer table, Marian's decoder vocabulary, XLM's copy of
the size, Whisper's generation token maps, a per-token buffer it does not know), then a sweep
over transformers' causal-LM and seq2seq mappings, each model built from a tiny config.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

transformers = pytest.importorskip("transformers")

from test_expand_checks import _assert_unchanged, _snapshot
from test_transformers import _quiet_transformers  # noqa: F401  (autouse)
from transformers.models.auto import configuration_auto, modeling_auto

from embedding_constraint import is_fixed
from embedding_constraint.transformers import _configs, expand_vocabulary

V = 97  # the old vocabulary size: a prime, unlike every other size of the tiny configs
ADDED = 5
OLD_VOCAB = [f"t{i}" for i in range(V)]
# Settings that make a config tiny, applied where the config has the field.
SMALL: dict[str, Any] = {
    "vocab_size": V,
    "hidden_size": 32,
    "d_model": 32,
    "n_embd": 32,
    "intermediate_size": 40,
    "ffn_dim": 40,
    "encoder_ffn_dim": 40,
    "decoder_ffn_dim": 40,
    "d_ff": 40,
    "n_inner": 40,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "n_layer": 2,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "num_decoder_layers": 1,
    "num_attention_heads": 4,
    "n_head": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "d_kv": 8,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "n_shared_experts": 1,
    "shared_expert_intermediate_size": 16,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 8,
    "q_lora_rank": 8,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": V,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}
MAX_PARAMETERS = 3_000_000


def _tiny_config(config_class: Any, **extra: Any) -> Any:
    """``config_class`` with `SMALL` applied, token ids inside the vocabulary."""
    default = config_class()
    names = set(default.__dict__) | set(getattr(default, "attribute_map", {}))
    kwargs = {k: v for k, v in SMALL.items() if k in names}
    for k, v in default.__dict__.items():
        if k.endswith("_token_id") and type(v) is int and v >= V:
            kwargs[k] = 3
    for sub in getattr(default, "sub_configs", {}):
        sub_config = getattr(default, sub, None)
        if sub_config is not None and hasattr(sub_config, "vocab_size"):
            kwargs[sub] = _tiny_config(type(sub_config)).to_dict()
    kwargs.update(extra)
    return config_class(**kwargs)


def _build(model_type: str, class_name: str) -> Any:
    """A tiny model of ``class_name``; raises where it cannot be built or is too large."""
    model_class = getattr(transformers, class_name)
    config = _tiny_config(configuration_auto.CONFIG_MAPPING[model_type])
    with torch.device("meta"):
        count = sum(p.numel() for p in model_class(config).parameters())
    if count > MAX_PARAMETERS:
        raise RuntimeError(f"{count} parameters even with a tiny config")
    torch.manual_seed(0)
    return model_class(config)


def _config_token_ids(model: Any) -> set[int]:
    ids: set[int] = set()
    for _, config in _configs(model):
        for field, value in config.__dict__.items():
            if field.endswith(("_token_id", "_token_index", "_token_ids", "suppress_tokens")):
                ids.update(
                    i for i in (value if isinstance(value, list) else [value]) if type(i) is int
                )
    return {i for i in ids if 0 <= i < V}


def _new_vocab(pinned: set[int]) -> tuple[list[str], list[int]]:
    """The old tokens re-sorted (reversed, ``pinned`` ids kept), `ADDED` tokens appended."""
    movable = [i for i in range(V) if i not in pinned]
    new = list(OLD_VOCAB)
    for slot, i in zip(movable, reversed(movable), strict=True):
        new[slot] = OLD_VOCAB[i]
    new += [f"new{k}" for k in range(ADDED)]
    return new, movable


def _check(model: Any, seq2seq: bool) -> tuple[str, str]:
    """Expand ``model``; ("ok" | "refused" | "skip", detail). Asserts what must hold."""
    pinned = _config_token_ids(model) | {0, 1, 2, 3}
    new_vocab, movable = _new_vocab(pinned)
    new_id = torch.tensor([new_vocab.index(t) for t in OLD_VOCAB])
    choices = torch.tensor(movable)
    generator = torch.Generator().manual_seed(0)
    x = choices[torch.randint(len(movable), (2, 7), generator=generator)]
    y = choices[torch.randint(len(movable), (2, 5), generator=generator)]

    def inputs(ids: Tensor, labels: bool) -> dict[str, Tensor]:
        kwargs = {"input_ids": ids[x]}
        if seq2seq:
            kwargs["decoder_input_ids"] = ids[y]
        if labels:
            kwargs["labels"] = ids[y] if seq2seq else ids[x]
        return kwargs

    same = torch.arange(V)
    model.eval()
    with torch.no_grad():
        try:
            plain = model(**inputs(same, False)).logits
        except Exception as error:  # noqa: BLE001  (the plain model does not run on these inputs)
            return "skip", f"plain forward: {type(error).__name__}"
        try:
            model(**inputs(same, True))
            labels = True
        except Exception:  # noqa: BLE001  (it takes no labels)
            labels = False
    rows = model.get_input_embeddings().weight.detach().clone()
    before = _snapshot(model)
    try:
        expand_vocabulary(model, OLD_VOCAB, new_vocab)
    except (TypeError, ValueError) as error:
        _assert_unchanged(model, before)
        assert str(error).startswith("Expected"), str(error)  # noqa: PT017  (either outcome)
        return "refused", str(error)[:100]
    with torch.no_grad():
        logits = model(**inputs(new_id, False)).logits
    assert logits.shape[-1] == V + ADDED
    assert torch.equal(model.get_input_embeddings().weight.detach()[new_id], rows)
    torch.testing.assert_close(logits[..., new_id], plain, rtol=1e-4, atol=1e-5)
    model.train()
    out = model(**inputs(new_id, labels))
    loss = out.loss if labels else out.logits.float().square().mean()
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.equal(model.get_input_embeddings().weight.detach()[new_id], rows)
    return "ok", f"labels={labels}"


# --- targeted cases ---------------------------------------------------------------------


def _gemma4(**extra: Any) -> Any:
    return _build_config(transformers.Gemma4ForCausalLM, transformers.Gemma4TextConfig, **extra)


def _build_config(model_class: Any, config_class: Any, **extra: Any) -> Any:
    torch.manual_seed(0)
    return model_class(_tiny_config(config_class, **extra))


def test_gemma4_per_layer_table_moves_with_the_vocabulary() -> None:
    model = _gemma4()
    table = model.get_per_layer_input_embeddings()
    old_rows = table.weight.detach().clone()
    assert old_rows.shape[0] == V
    result, _ = _check(model, seq2seq=False)
    assert result == "ok"
    table = model.get_per_layer_input_embeddings()
    assert table.weight.shape[0] == table.num_embeddings == V + ADDED
    assert model.config.vocab_size_per_layer_input == V + ADDED
    assert is_fixed(model, "model.embed_tokens_per_layer.weight")


def test_gemma4_per_layer_table_shorter_than_old_vocab_is_refused() -> None:
    model = _gemma4(vocab_size_per_layer_input=V - 7)
    before = _snapshot(model)
    new_vocab, _ = _new_vocab({0, 1, 2, 3})
    with pytest.raises(ValueError, match=r"embed_tokens_per_layer.*row for each of the 97"):
        expand_vocabulary(model, OLD_VOCAB, new_vocab)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("shared", [True, False])
def test_marian_decoder_vocabulary_moves(shared: bool, tmp_path: Path) -> None:
    config = _tiny_config(
        transformers.MarianConfig,
        share_encoder_decoder_embeddings=shared,
        tie_word_embeddings=shared,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config)
    decoder = model.get_decoder().embed_tokens
    assert (decoder.weight is model.get_input_embeddings().weight) is shared
    assert _check(model, seq2seq=True)[0] == "ok"  # a step with labels included
    assert model.config.decoder_vocab_size == V + ADDED
    assert model.get_decoder().embed_tokens.weight.shape[0] == V + ADDED
    if not shared:
        assert is_fixed(model, "model.decoder.embed_tokens.weight")
    model.save_pretrained(tmp_path)
    loaded = transformers.MarianMTModel.from_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model.eval()
        want = model(input_ids=ids, decoder_input_ids=ids).logits
        got = loaded(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_xlm_copy_of_the_vocabulary_size_follows() -> None:
    model = _build("xlm", "XLMWithLMHeadModel")
    assert _check(model, seq2seq=False) == ("ok", "labels=True")
    assert model.pred_layer.n_words == model.transformer.n_words == V + ADDED


def _whisper() -> Any:
    torch.manual_seed(0)
    config = _tiny_config(
        transformers.WhisperConfig,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        suppress_tokens=[10, 11],
        begin_suppress_tokens=[12],
    )
    model = transformers.WhisperForConditionalGeneration(config)
    generation = model.generation_config
    generation.lang_to_id = {"<|en|>": 20, "<|de|>": 21}
    generation.task_to_id = {"transcribe": 22, "translate": 23}
    generation.no_timestamps_token_id = 24
    generation.forced_decoder_ids = [[1, 20], [2, 22]]
    generation.bad_words_ids = [[30, 31], [32]]
    generation.alignment_heads = [[0, 1]]  # (layer, head): not token ids
    return model


def test_whisper_generation_token_maps_follow_a_resort() -> None:
    model = _whisper()
    new_vocab, _ = _new_vocab({0, 1, 2, 3})
    new = {t: i for i, t in enumerate(new_vocab)}

    def moved(i: int) -> int:
        return new[OLD_VOCAB[i]]

    expand_vocabulary(model, OLD_VOCAB, new_vocab)
    generation = model.generation_config
    assert generation.lang_to_id == {"<|en|>": moved(20), "<|de|>": moved(21)}
    assert generation.task_to_id == {"transcribe": moved(22), "translate": moved(23)}
    assert generation.no_timestamps_token_id == moved(24)
    assert generation.forced_decoder_ids == [[1, moved(20)], [2, moved(22)]]
    assert generation.bad_words_ids == [[moved(30), moved(31)], [moved(32)]]
    assert generation.suppress_tokens == [moved(10), moved(11)]
    assert generation.begin_suppress_tokens == [moved(12)]
    assert generation.alignment_heads == [[0, 1]]
    assert moved(20) != 20


def test_whisper_dropped_language_token_is_refused() -> None:
    model = _whisper()
    before = _snapshot(model)
    new_vocab = [t for t in OLD_VOCAB if t != "t21"]
    with pytest.raises(ValueError, match=r"lang_to_id\['<\|de\|>'\]"):
        expand_vocabulary(model, OLD_VOCAB, new_vocab)
    _assert_unchanged(model, before)


def test_unknown_per_token_buffer_is_refused() -> None:
    model = _build("llama", "LlamaForCausalLM")
    model.model.layers[0].register_buffer("token_counts", torch.zeros(V, 3))
    before = _snapshot(model)
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.token_counts, a buffer of shape \(97, 3\)"
    ):
        expand_vocabulary(model, OLD_VOCAB, [*OLD_VOCAB, "new"])
    _assert_unchanged(model, before)


def test_other_vocabulary_starting_inside_is_refused() -> None:
    model = _build("llama", "LlamaForCausalLM")
    model.config.image_vocab_offset = V  # image tokens from id 97 on, where added tokens go
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"config\.image_vocab_offset = 97"):
        expand_vocabulary(model, OLD_VOCAB, [*OLD_VOCAB, "new"])
    _assert_unchanged(model, before)


# --- the sweep --------------------------------------------------------------------------

MAPPINGS = [
    (False, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    (True, modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
]


@pytest.mark.slow
def test_sweep_of_architectures() -> None:
    """Every architecture that builds tiny: expanded right (logits, a step), or refused."""
    warnings.filterwarnings("ignore")
    results: dict[str, tuple[str, str]] = {}
    unbuilt = 0
    start = time.monotonic()
    for seq2seq, mapping in MAPPINGS:
        for model_type, class_name in mapping.items():
            try:
                model = _build(model_type, class_name)
            except Exception:  # noqa: BLE001  needs another package, a bespoke config, or is too large
                unbuilt += 1
                continue
            results[f"{model_type}/{class_name}"] = _check(model, seq2seq)
    counts = Counter(result for result, _ in results.values())
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(f"{len(results)} built ({unbuilt} not), {summary}, {time.monotonic() - start:.0f} s")
    for name, (result, detail) in sorted(results.items()):
        if result != "ok":
            print(f"  {name}: {result}: {detail}")
    assert counts["ok"] >= 150  # 159 with transformers 5.25
    for name in ("llama/LlamaForCausalLM", "gemma4_text/Gemma4ForCausalLM", "marian/MarianMTModel"):
        assert results[name][0] == "ok", name
