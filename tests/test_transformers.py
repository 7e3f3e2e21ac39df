"""`embedding_constraint.transformers`: Hugging Face models grown with `expand_vocabulary`.

Models are built from configs (GPT-2, Llama, Phi for a head with a bias), tokenizers from a
made-up corpus with the ``tokenizers`` package: nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
)

from embedding_constraint import bake, is_fixed
from embedding_constraint.transformers import expand_vocabulary

OLD = 24
OLD_VOCAB = [f"t{i}" for i in range(OLD)]
# Re-sorted, tokens 3 and 4 removed, three added in between: the fixed rows are scattered.
NEW_VOCAB = [*OLD_VOCAB[:3], "new0", *reversed(OLD_VOCAB[5:]), "new1", "new2"]
KEPT = [0, 1, 2, *range(5, OLD)]  # old ids of the shared tokens
KEPT_AT = [NEW_VOCAB.index(OLD_VOCAB[i]) for i in KEPT]  # their new ids
ADDED_AT = [NEW_VOCAB.index(t) for t in ("new0", "new1", "new2")]


@pytest.fixture(autouse=True)
def _quiet_transformers() -> Iterator[None]:
    logging = transformers.utils.logging  # untyped in transformers

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    yield
    logging.set_verbosity(level)
    logging.enable_progress_bar()


def _model(kind: str, tied: bool, vocab: int = OLD) -> Any:  # transformers is partly typed
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=tied)
        )
    if kind == "phi":  # an output head with a bias
        return PhiForCausalLM(
            PhiConfig(
                vocab_size=vocab,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                tie_word_embeddings=tied,
            )
        )
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def _vocab_tensors(model: Any) -> dict[str, Tensor]:
    head = model.get_output_embeddings()
    tensors = {"input": model.get_input_embeddings().weight.detach().clone()}
    if head is not None:
        tensors["head"] = head.weight.detach().clone()
        if head.bias is not None:
            tensors["bias"] = head.bias.detach().clone()
    return tensors


def _train(model: nn.Module, steps: int = 3, vocab: int = len(NEW_VOCAB)) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 8), generator=generator)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1
    )
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _assert_old_rows_kept(model: Any, old: dict[str, Tensor]) -> None:
    now = _vocab_tensors(model)
    for key, before in old.items():
        assert torch.equal(now[key][KEPT_AT], before[KEPT]), key


CASES = [("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False), ("phi", False)]


@pytest.mark.parametrize(("kind", "tied"), CASES)
def test_expanded_model_trains_its_new_rows_with_the_old_rows_exact(kind: str, tied: bool) -> None:
    model = _model(kind, tied)
    old = _vocab_tensors(model)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB, generator=torch.Generator().manual_seed(0))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert model.config.vocab_size == len(NEW_VOCAB)
    assert embedding.num_embeddings == head.out_features == len(NEW_VOCAB)
    assert (embedding.parametrizations.weight is head.parametrizations.weight) == tied
    assert is_fixed(head, "weight")
    assert is_fixed(head, "bias") == ("bias" in old)
    _assert_old_rows_kept(model, old)
    added_before = _vocab_tensors(model)["input"][ADDED_AT]
    losses = _train(model)
    assert losses[-1] < losses[0]
    _assert_old_rows_kept(model, old)
    assert not torch.equal(_vocab_tensors(model)["input"][ADDED_AT], added_before)
    bake(model)
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    _assert_old_rows_kept(model, old)


def test_vocabularies_may_be_tokenizers_mappings_or_sequences() -> None:
    corpus = ["apples and pears", "pears and plums", "plums and apples and figs"]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(special_tokens=["[PAD]", "[UNK]"]))
    old_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]")
    new_tokenizer = copy.deepcopy(old_tokenizer)
    assert new_tokenizer.add_tokens(["kiwi", "mango"]) == 2
    size = len(old_tokenizer)
    by_tokenizer = expand_vocabulary(
        _model("llama", True, size), old_tokenizer, new_tokenizer, init="zeros"
    )
    old_map = old_tokenizer.get_vocab()
    by_mapping = expand_vocabulary(
        _model("llama", True, size), old_map, new_tokenizer.get_vocab(), init="zeros"
    )
    in_order = sorted(old_map, key=old_map.__getitem__)
    by_sequence = expand_vocabulary(
        _model("llama", True, size), in_order, [*in_order, "kiwi", "mango"], init="zeros"
    )
    weights = [m.get_input_embeddings().weight for m in (by_tokenizer, by_mapping, by_sequence)]
    assert weights[0].shape[0] == size + 2
    assert torch.equal(weights[0], weights[1])
    assert torch.equal(weights[0], weights[2])
    assert torch.equal(weights[0][size:], torch.zeros(2, 16))


def test_config_token_ids_follow_their_tokens() -> None:
    model = _model("llama", False)
    model.config.pad_token_id = 7
    model.generation_config.eos_token_id = [2, 9]
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    assert model.config.bos_token_id == NEW_VOCAB.index("t1")
    assert model.config.pad_token_id == NEW_VOCAB.index("t7")
    assert model.generation_config.eos_token_id == [NEW_VOCAB.index("t2"), NEW_VOCAB.index("t9")]


def test_a_padding_row_moves_with_its_token_and_stays_out_of_the_statistics() -> None:
    model = _model("llama", True)
    embedding = model.get_input_embeddings()
    embedding.padding_idx = 6
    with torch.no_grad():
        embedding.weight[6] = 1e6  # would dominate a mean it took part in
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB, init="normal")
    assert embedding.padding_idx == NEW_VOCAB.index("t6")
    assert embedding.weight[ADDED_AT].abs().max().item() < 100


def test_num_parameters_counts_the_stored_rows_once() -> None:
    for tied in (True, False):
        plain = _model("llama", tied, len(NEW_VOCAB))
        model = expand_vocabulary(_model("llama", tied), OLD_VOCAB, NEW_VOCAB)
        fixed = len(KEPT) * 16 * (1 if tied else 2)
        assert model.num_parameters() == plain.num_parameters() - fixed
        assert model.num_parameters(only_trainable=True) == model.num_parameters()


@pytest.mark.parametrize("tied", [True, False])
def test_tie_weights_keeps_the_constraint_and_the_parameters(tied: bool) -> None:
    model = _model("llama", tied)
    old = _vocab_tensors(model)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    params = list(model.parameters())
    _train(model)
    model.tie_weights()
    assert list(model.parameters()) == params  # the same objects: an optimizer keeps them
    assert is_fixed(model.get_output_embeddings(), "weight")
    _assert_old_rows_kept(model, old)
    _train(model, steps=1)
    _assert_old_rows_kept(model, old)


def test_tying_an_untied_model_later_keeps_the_embeddings_rows() -> None:
    model = _model("llama", False)
    old = _vocab_tensors(model)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embedding.parametrizations.weight is head.parametrizations.weight
    assert torch.equal(head.weight[KEPT_AT], old["input"][KEPT])


@pytest.mark.parametrize(("kind", "tied"), CASES)
def test_resize_token_embeddings_grows_free_rows_and_keeps_the_constraint(
    kind: str, tied: bool
) -> None:
    model = _model(kind, tied)
    old = _vocab_tensors(model)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    model.resize_token_embeddings(30, pad_to_multiple_of=8)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert model.config.vocab_size == embedding.weight.shape[0] == head.weight.shape[0] == 32
    assert (embedding.parametrizations.weight is head.parametrizations.weight) == tied
    assert is_fixed(head, "weight")
    _assert_old_rows_kept(model, old)
    _train(model, vocab=32)
    _assert_old_rows_kept(model, old)


def test_resizing_below_a_fixed_row_is_refused_and_changes_nothing() -> None:
    model = expand_vocabulary(_model("llama", False), OLD_VOCAB, NEW_VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    last = max(KEPT_AT)
    with pytest.raises(ValueError, match=rf"at least {last + 1}: .* holds row {last} fixed"):
        model.resize_token_embeddings(last)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.config.vocab_size == len(NEW_VOCAB)


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_writes_a_plain_checkpoint_with_a_tied_matrix_once(
    tied: bool, tmp_path: Path
) -> None:
    model = expand_vocabulary(_model("gpt2", tied), OLD_VOCAB, NEW_VOCAB)
    _train(model)
    model.save_pretrained(tmp_path / "constrained")
    saved = safetensors_torch.load_file(tmp_path / "constrained" / "model.safetensors")
    plain = _model("gpt2", tied, len(NEW_VOCAB))
    plain.save_pretrained(tmp_path / "plain")
    assert sorted(saved) == sorted(
        safetensors_torch.load_file(tmp_path / "plain" / "model.safetensors")
    )
    assert ("lm_head.weight" in saved) != tied  # a tied matrix is written once
    loaded: Any = GPT2LMHeadModel.from_pretrained(tmp_path / "constrained")
    assert torch.equal(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert (loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight) == tied
    bake(model)
    model.save_pretrained(tmp_path / "baked")
    baked = safetensors_torch.load_file(tmp_path / "baked" / "model.safetensors")
    assert sorted(baked) == sorted(saved)
    assert all(torch.equal(baked[k], saved[k]) for k in saved)
    config = json.loads((tmp_path / "baked" / "config.json").read_text())
    assert config["vocab_size"] == len(NEW_VOCAB)


def test_generate_matches_the_baked_model() -> None:
    model = expand_vocabulary(_model("llama", True), OLD_VOCAB, NEW_VOCAB)
    _train(model)
    model.eval()
    prompt = torch.tensor([[1, 5, 9]])
    out = model.generate(prompt, max_new_tokens=5, do_sample=False)
    baked: Any = bake(copy.deepcopy(model))
    assert torch.equal(baked.generate(prompt, max_new_tokens=5, do_sample=False), out)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        model = expand_vocabulary(_model("llama", False), OLD_VOCAB, NEW_VOCAB)
        model.train()
        if checkpointing:  # named activation checkpointing from transformers 5 on
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
        ids = torch.arange(8).reshape(1, 8)
        model(input_ids=ids, labels=ids).loss.backward()
        free = model.get_input_embeddings().parametrizations.weight.original
        assert free.grad is not None
        grads.append(free.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def _model_unchanged(model: Any, before: dict[str, Tensor], size: int) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not is_fixed(model, "model.embed_tokens.weight")
    assert model.config.vocab_size == size


@pytest.mark.parametrize(
    ("old_vocab", "new_vocab", "error", "match"),
    [
        (
            {"a": 0, "b": 2},
            NEW_VOCAB,
            ValueError,
            r"`old_vocab` to give the 2 tokens the ids 0 to 1",
        ),
        ({"a": 0, "b": True}, NEW_VOCAB, TypeError, r"`old_vocab` to map tokens to int ids"),
        ([*OLD_VOCAB, "extra"], NEW_VOCAB, ValueError, r"at most 24 tokens.* Got 25"),
        (OLD_VOCAB, ["t0", "t2", "x"], ValueError, r"keep the token 't1' \(id 1, the model's bos"),
        (OLD_VOCAB, "t0 t1", TypeError, r"`new_vocab` to be a sequence of tokens"),
        (OLD_VOCAB, [*OLD_VOCAB, "t0"], ValueError, r"`new_vocab` to hold distinct tokens"),
    ],
)
def test_bad_vocabularies_are_refused_and_change_nothing(
    old_vocab: Any, new_vocab: Any, error: type[Exception], match: str
) -> None:
    model = _model("llama", True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        expand_vocabulary(model, old_vocab, new_vocab)
    _model_unchanged(model, before, OLD)


def test_bad_models_are_refused_and_change_nothing() -> None:
    with pytest.raises(TypeError, match="Expected `model` to be a transformers PreTrainedModel"):
        expand_vocabulary(nn.Linear(2, 2), OLD_VOCAB, NEW_VOCAB)  # type: ignore[type-var]
    model = expand_vocabulary(_model("llama", True), OLD_VOCAB, NEW_VOCAB)
    with pytest.raises(ValueError, match=r"input embedding is not constrained yet.* bake"):
        expand_vocabulary(model, NEW_VOCAB, [*NEW_VOCAB, "more"])
    padded = _model("llama", True)
    padded.get_input_embeddings().padding_idx = 3  # token t3, which NEW_VOCAB drops
    before = {k: v.clone() for k, v in padded.state_dict().items()}
    with pytest.raises(ValueError, match=r"keep the token 't3' \(id 3, the model's padding_idx"):
        expand_vocabulary(padded, OLD_VOCAB, NEW_VOCAB)
    _model_unchanged(padded, before, OLD)
    with pytest.raises(ValueError, match="Expected `init` to be one of"):
        expand_vocabulary(padded, OLD_VOCAB, NEW_VOCAB, init="ones")  # type: ignore[arg-type]
    with torch.device("meta"):
        meta = _model("llama", True)
    with pytest.raises(ValueError, match=r"weight to hold values\. Got one on the meta device"):
        expand_vocabulary(meta, OLD_VOCAB, NEW_VOCAB)


def test_a_deep_copy_is_its_own_model() -> None:
    # EMA snapshots: baking or resizing a copy leaves the original as it was.
    model = expand_vocabulary(_model("llama", True), OLD_VOCAB, NEW_VOCAB)
    snapshot = copy.deepcopy(model)
    snapshot.resize_token_embeddings(40)
    assert model.get_input_embeddings().weight.shape[0] == len(NEW_VOCAB)
    assert snapshot.get_input_embeddings().weight.shape[0] == 40
    bake(snapshot)
    assert is_fixed(model, "model.embed_tokens.weight")
    assert is_fixed(model, "lm_head.weight")


def _dataset(count: int = 8) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, len(NEW_VOCAB), (count, 8), generator=generator)
    ]


def _trainer(model: nn.Module, out: Path, steps: int) -> Any:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        lr_scheduler_type="constant",  # the first steps are the same whatever max_steps is
        weight_decay=0.1,
        save_steps=3,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=_dataset())


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_transformers_trainer_end_to_end_with_checkpoints_and_resume(
    tied: bool, tmp_path: Path
) -> None:
    model = _model("llama", tied)
    old = _vocab_tensors(model)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    _trainer(model, tmp_path, steps=3).train()
    _assert_old_rows_kept(model, old)
    checkpoint = tmp_path / "checkpoint-3"
    plain: Any = LlamaForCausalLM.from_pretrained(checkpoint)
    assert not is_fixed(plain, "model.embed_tokens.weight")
    _assert_old_rows_kept(plain, old)
    assert torch.equal(plain.get_input_embeddings().weight, model.get_input_embeddings().weight)
    # Resume in a fresh process's way: a freshly expanded model, the checkpoint's state.
    resumed = expand_vocabulary(_model("llama", tied), OLD_VOCAB, NEW_VOCAB)
    _trainer(resumed, tmp_path, steps=5).train(resume_from_checkpoint=str(checkpoint))
    _assert_old_rows_kept(resumed, old)
    model_5 = _model("llama", tied)
    expand_vocabulary(model_5, OLD_VOCAB, NEW_VOCAB)
    _trainer(model_5, tmp_path / "straight", steps=5).train()
    torch.testing.assert_close(
        resumed.get_input_embeddings().weight, model_5.get_input_embeddings().weight
    )


@pytest.mark.parametrize("tied", [True, False])
def test_lora_on_the_body_and_expand_vocabulary_on_the_embeddings(tied: bool) -> None:
    peft = pytest.importorskip("peft")
    model = _model("llama", tied)
    old = _vocab_tensors(model)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    expand_vocabulary(lora, OLD_VOCAB, NEW_VOCAB)  # after get_peft_model, which freezes weights
    inner = lora.get_base_model()
    assert inner.vocab_size == inner.config.vocab_size == len(NEW_VOCAB)
    inner.tie_weights()  # the wrapped model's own methods keep the constraint
    assert is_fixed(inner, "lm_head.weight")
    trainable = {
        n.removeprefix("base_model.model.") for n, p in lora.named_parameters() if p.requires_grad
    }
    assert "model.embed_tokens.parametrizations.weight.original" in trainable
    assert ("lm_head.parametrizations.weight.original" in trainable) != tied
    assert all("lora_" in n for n in trainable if "parametrizations" not in n)
    _train(lora)
    # Bake first: merge_and_unload compares the embedding's and the head's storage to see a tie.
    baked: Any = bake(lora)
    merged = baked.merge_and_unload()
    assert merged.config.tie_word_embeddings == tied
    assert (merged.get_input_embeddings().weight is merged.get_output_embeddings().weight) == tied
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, q_before)
    _assert_old_rows_kept(merged, old)


def _bart(vocab: int = OLD) -> Any:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=vocab,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        forced_eos_token_id=2,
        decoder_start_token_id=2,
    )
    model = BartForConditionalGeneration(config)
    with torch.no_grad():
        model.final_logits_bias.normal_()
    return model


def test_an_encoder_decoder_model_moves_its_logits_bias_padding_and_forced_ids() -> None:
    # BART: one embedding matrix in four modules (shared, encoder, decoder, head), a
    # final_logits_bias buffer with one entry per token, a padding row, forced ids.
    model = _bart()
    old_bias = model.final_logits_bias.clone()
    old_weight = model.get_input_embeddings().weight.detach().clone()
    new_vocab = [OLD_VOCAB[0], "new0", *reversed(OLD_VOCAB[1:]), "new1"]  # pad t1 moves
    expand_vocabulary(model, OLD_VOCAB, new_vocab)
    at = torch.tensor([new_vocab.index(t) for t in OLD_VOCAB])
    assert torch.equal(model.final_logits_bias[0, at], old_bias[0])
    assert model.final_logits_bias[0, [1, len(new_vocab) - 1]].tolist() == [0.0, 0.0]
    embeddings = [model.model.shared, model.model.encoder.embed_tokens]
    embeddings.append(model.model.decoder.embed_tokens)
    assert [e.padding_idx for e in embeddings] == [new_vocab.index("t1")] * 3
    assert model.config.forced_eos_token_id == new_vocab.index("t2")
    assert model.generation_config.decoder_start_token_id == new_vocab.index("t2")
    ids = torch.tensor([[0, 1, 5, 9, 2]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grad = model.model.shared.parametrizations.weight.original.grad
    assert grad is not None
    assert bool(grad[0].abs().sum() > 0)  # "new0", at the old padding id, trains
    _train(model, vocab=len(new_vocab))
    assert torch.equal(model.get_input_embeddings().weight[at], old_weight)
    assert torch.equal(model.get_output_embeddings().weight[at], old_weight)


def test_moving_a_padding_token_that_positions_count_from_is_refused() -> None:
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        vocab_size=OLD,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        pad_token_id=1,
    )
    model = RobertaModel(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"'t1' at\s+id 1\. Got it at 22: embeddings\.position_embeddings has"
    ):
        expand_vocabulary(model, OLD_VOCAB, list(reversed(OLD_VOCAB)))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    kept_in_place = [*OLD_VOCAB[:2], *reversed(OLD_VOCAB[2:]), "new"]
    expand_vocabulary(model, OLD_VOCAB, kept_in_place)
    assert model.embeddings.word_embeddings.padding_idx == model.embeddings.padding_idx == 1


def test_an_inner_model_whose_weight_the_head_shares_is_refused() -> None:
    model = _model("llama", True)
    with pytest.raises(ValueError, match=r"held only by modules under `model`.* whole model"):
        expand_vocabulary(model.model, OLD_VOCAB, NEW_VOCAB)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert model.get_input_embeddings().weight.shape[0] == OLD


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"new_num_tokens": 0}, r"`new_num_tokens` to be a positive int or None\. Got 0"),
        ({"pad_to_multiple_of": "8"}, r"`pad_to_multiple_of` to be a positive int .* Got '8'"),
    ],
)
def test_bad_resize_arguments_are_refused_and_change_nothing(
    kwargs: dict[str, Any], match: str
) -> None:
    model = expand_vocabulary(_model("llama", True), OLD_VOCAB, NEW_VOCAB)
    with pytest.raises(ValueError, match=match):
        model.resize_token_embeddings(**kwargs)
    assert is_fixed(model, "model.embed_tokens.weight")
    assert model.get_input_embeddings().weight.shape[0] == len(NEW_VOCAB)


def test_config_ids_and_padding_in_rows_past_the_old_vocabulary_are_refused() -> None:
    model = _model("llama", False, vocab=OLD + 4)  # padded: 4 rows that name no token
    model.config.pad_token_id = OLD + 1
    with pytest.raises(
        ValueError, match=rf"pad_token_id to name a token of `old_vocab`\. Got id {OLD + 1}"
    ):
        expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    model.config.pad_token_id = None
    model.get_input_embeddings().padding_idx = OLD + 2
    with pytest.raises(ValueError, match=rf"padding_idx to name a token .* Got id {OLD + 2}"):
        expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    assert model.get_input_embeddings().weight.shape[0] == OLD + 4
    model.get_input_embeddings().padding_idx = None
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)  # the 4 padding rows are dropped
    assert model.get_input_embeddings().weight.shape[0] == len(NEW_VOCAB)


def test_no_shared_token_leaves_nothing_constrained() -> None:
    model = _model("gpt2", True)
    expand_vocabulary(model, OLD_VOCAB, ["a", "b", "c"])
    assert not is_fixed(model, "transformer.wte.weight")
    _train(model, vocab=3)
    model.tie_weights()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


def test_tie_weights_after_steps_keeps_the_optimizer_training() -> None:
    model = expand_vocabulary(_model("llama", True), OLD_VOCAB, NEW_VOCAB)
    free = model.get_input_embeddings().parametrizations.weight.original
    optimizer = torch.optim.AdamW([free], lr=0.05)
    ids = torch.arange(8).reshape(1, 8)
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.tie_weights()  # the optimizer holds state for `free`: not a reason to refuse
    assert model.get_input_embeddings().parametrizations.weight.original is free
    before = free.detach().clone()
    optimizer.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(free, before)


def _encoder_decoder(kind: str) -> Any:
    torch.manual_seed(0)
    sizes: dict[str, Any] = {"d_model": 16, "max_position_embeddings": 40, "dropout": 0.0}
    layers: dict[str, Any] = {"attention_heads": 2, "ffn_dim": 32, "layers": 1}
    both = {f"{side}_{k}": v for side in ("encoder", "decoder") for k, v in layers.items()}
    if kind == "m2m100":
        from transformers import M2M100Config, M2M100ForConditionalGeneration

        return M2M100ForConditionalGeneration(M2M100Config(vocab_size=OLD, **sizes, **both))
    from transformers import XGLMConfig, XGLMForCausalLM

    return XGLMForCausalLM(
        XGLMConfig(vocab_size=OLD, num_layers=1, attention_heads=2, ffn_dim=32, **sizes)
    )


def test_moving_a_padding_token_that_a_sinusoidal_position_embedding_counts_from_is_refused() -> (
    None
):
    # M2M100's sinusoidal position embedding is no nn.Embedding: it keeps the padding id in
    # its own padding_idx and counts positions from it.
    model = _encoder_decoder("m2m100")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"'t1' at\s+id 1\. Got it at 22: model\.encoder\.embed_positions has"
    ):
        expand_vocabulary(model, OLD_VOCAB, list(reversed(OLD_VOCAB)))
    _model_unchanged_config(model, before, pad=1)
    assert model.model.encoder.embed_positions.padding_idx == 1
    kept_in_place = [*OLD_VOCAB[:2], *reversed(OLD_VOCAB[2:]), "new"]
    expand_vocabulary(model, OLD_VOCAB, kept_in_place)
    assert model.get_input_embeddings().weight.shape[0] == OLD + 1
    # XGLM's position embedding is given positions, not token ids: its padding token may move,
    # as may Llama's (its base model keeps the padding id only to build the embedding).
    for moved in (_encoder_decoder("xglm").eval(), _model("llama", True)):
        moved.config.pad_token_id = moved.get_input_embeddings().padding_idx = 1
        ids = torch.tensor([[0, 5, 9, 1, 7]])
        old_logits = moved(input_ids=ids).logits
        new_vocab = list(reversed(OLD_VOCAB))
        expand_vocabulary(moved, OLD_VOCAB, new_vocab)
        at = torch.tensor([new_vocab.index(t) for t in OLD_VOCAB])
        assert moved.get_input_embeddings().padding_idx == 22
        torch.testing.assert_close(moved(input_ids=at[ids]).logits[..., at], old_logits)


def test_a_padding_idx_on_a_module_that_takes_no_token_ids_is_not_counted() -> None:
    # Whisper's encoder keeps a padding_idx it never uses: it takes audio features.
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    vocab, pad = len(OLD_VOCAB), 1
    config = WhisperConfig(
        vocab_size=vocab,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=16,
        max_target_positions=16,
        num_mel_bins=8,
        pad_token_id=pad,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    model = WhisperForConditionalGeneration(config)
    assert model.model.encoder.padding_idx == pad
    new_vocab = [OLD_VOCAB[0], *reversed(OLD_VOCAB[1:])]  # the padding token moves
    expand_vocabulary(model, OLD_VOCAB, new_vocab)
    assert model.get_input_embeddings().padding_idx == new_vocab.index(OLD_VOCAB[pad])


def _model_unchanged_config(model: Any, before: dict[str, Tensor], pad: int) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.config.vocab_size == OLD
    assert model.config.pad_token_id == model.get_input_embeddings().padding_idx == pad
    assert not any(is_fixed(m, "weight") for m in model.modules() if hasattr(m, "weight"))


def _masked_lm(kind: str) -> Any:
    torch.manual_seed(0)
    sizes: dict[str, Any] = {
        "vocab_size": OLD,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 40,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    if kind == "esm":
        from transformers import EsmConfig, EsmForMaskedLM

        config = EsmConfig(
            pad_token_id=1, mask_token_id=2, position_embedding_type="rotary", **sizes
        )
        model: Any = EsmForMaskedLM(config)
    else:
        from transformers import BertConfig, BertForMaskedLM

        model = BertForMaskedLM(BertConfig(pad_token_id=1, **sizes))
    bias = model.lm_head.bias if kind == "esm" else model.cls.predictions.bias
    with torch.no_grad():
        bias.normal_()  # as if trained: one distinct entry per token
    return model


def test_a_per_token_tensor_beside_the_head_that_is_not_moved_is_refused() -> None:
    # ESM's head is a bias-free nn.Linear; its per-token bias is a Parameter of the module
    # around it, which expand_vocabulary would leave in the old order and size.
    model = _masked_lm("esm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lm_head\.bias, a Parameter of shape \(24,\)"):
        expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    _model_unchanged_config(model, before, pad=1)
    # BERT's head bias is that module's Parameter too, but the head holds it: it moves.
    bert = _masked_lm("bert")
    assert bert.cls.predictions.bias is bert.get_output_embeddings().bias
    ids = torch.tensor([[0, 5, 9, 2, 7]])
    old_logits = bert(input_ids=ids).logits
    expand_vocabulary(bert, OLD_VOCAB, NEW_VOCAB)
    new_ids = torch.tensor([[NEW_VOCAB.index(OLD_VOCAB[i]) for i in ids[0]]])
    torch.testing.assert_close(bert(input_ids=new_ids).logits[..., KEPT_AT], old_logits[..., KEPT])


def test_config_ids_that_are_not_remapped_must_keep_their_tokens_ids() -> None:
    model = _model("llama", True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.config.cls_token_id = 2  # t2 keeps id 2: fine
    model.config.image_token_index = OLD + 5  # names no row: left as it is
    model.config.sep_token_id = 6  # t6 moves to id 21
    with pytest.raises(
        ValueError,
        match=r"config\.sep_token_id \(6, the token 't6'\).* Got it at id 21 in `new_vocab`",
    ):
        expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    _model_unchanged(model, before, OLD)
    model.config.sep_token_id = None
    model.config.mask_token_id = 3  # t3, which NEW_VOCAB drops
    with pytest.raises(ValueError, match=r"config\.mask_token_id \(3, the token 't3'\).* without"):
        expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    _model_unchanged(model, before, OLD)
    model.config.mask_token_id = None
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    assert (model.config.cls_token_id, model.config.image_token_index) == (2, OLD + 5)
