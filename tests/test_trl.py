"""TRL's `SFTTrainer` and `transformers.Trainer`'s options on a model grown with `expand_vocabulary`.

A tiny Llama from a config and a BPE tokenizer trained on a few sentences, grown by the three
tokens of a chat template: nothing is downloaded. Each run checks that the old tokens' rows are
bit for bit the originals, that the new tokens' rows trained, and (where a model is the result)
that `save_pretrained` writes a checkpoint that plain `from_pretrained` loads with the same rows.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from embedding_constraint import bake, is_fixed
from embedding_constraint.transformers import expand_vocabulary

pytestmark = [
    # SFTConfig turns gradient checkpointing on by default under the name transformers 5 deprecates.
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    # Importing inductor (torch_compile's default backend) meets torch 2.13's own deprecation.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

CORPUS = [
    "fresh apples and ripe pears",
    "ripe plums and sweet apples",
    "sweet figs and pears",
    "what fruit is sweet",
    "figs are sweet and plums are ripe",
]
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
PAIRS = [("what fruit is sweet", "figs are sweet"), ("what is ripe", "ripe plums and pears")]
STEPS = 3
LORA = {"r": 2, "target_modules": ["q_proj", "v_proj"]}
UNTIED_ON_MERGE = "no longer tied after merging"  # PEFT's warning, also on a plain tied model


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()
    logging.set_verbosity(level)
    logging.enable_progress_bar()


def _tokenizers() -> tuple[Any, Any]:
    """The old tokenizer and the new one: the old plus the chat template's tokens."""
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "</s>"]
    bpe.train_from_iterator(
        CORPUS, trainers.BpeTrainer(special_tokens=special, show_progress=False)
    )
    old = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )
    new = copy.deepcopy(old)
    new.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    new.chat_template = CHAT_TEMPLATE
    return old, new


def _llama(vocab: int, tied: bool = True) -> Any:  # transformers is partly typed
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config)


def _weights(model: Any) -> dict[str, Tensor]:
    """The input embedding's and the head's full matrices, detached copies."""
    return {
        "input": model.get_input_embeddings().weight.detach().clone(),
        "head": model.get_output_embeddings().weight.detach().clone(),
    }


class Run:
    """A tiny Llama grown by the chat tokens, and what its vocabulary held before and after."""

    def __init__(self, tied: bool = True, lora_first: bool = False) -> None:
        self.old_tokenizer, self.tokenizer = _tokenizers()
        self.old = len(self.old_tokenizer)
        self.new = list(range(self.old, len(self.tokenizer)))
        assert self.tokenizer.convert_tokens_to_ids(CHAT_TOKENS) == self.new
        base = _llama(self.old, tied)
        self.original = _weights(base)
        # The guide's order for LoRA: get_peft_model freezes the base, then the new rows are made.
        target = peft.get_peft_model(base, peft.LoraConfig(**LORA)) if lora_first else base
        expand_vocabulary(target, self.old_tokenizer, self.tokenizer)
        self.model: Any = target
        self.start = _weights(target)

    def check_trained(self, model: Any) -> None:
        """Old rows exactly the originals; every new row of both matrices moved."""
        now = _weights(model)
        for key, matrix in now.items():
            assert torch.equal(matrix[: self.old], self.original[key][: self.old]), key
            moved = (matrix[self.new] != self.start[key][self.new]).any(dim=1)
            assert moved.all(), (key, moved)

    def check_saved_plain(self, model: Any, path: Path) -> None:
        """`save_pretrained`, then plain `from_pretrained`: the same matrices, no constraint."""
        model.save_pretrained(path)
        plain = transformers.LlamaForCausalLM.from_pretrained(path)
        assert type(plain.get_input_embeddings()) is nn.Embedding
        assert not parametrize.is_parametrized(plain.get_input_embeddings())
        assert not parametrize.is_parametrized(plain.get_output_embeddings())
        saved, now = _weights(plain), _weights(model)
        for key, matrix in saved.items():
            assert torch.equal(matrix, now[key]), key
            assert torch.equal(matrix[: self.old], self.original[key][: self.old]), key


def _dialogues(count: int = 8) -> Any:
    rows = [
        {
            "messages": [
                {"role": "user", "content": PAIRS[i % 2][0]},
                {"role": "assistant", "content": PAIRS[i % 2][1]},
            ]
        }
        for i in range(count)
    ]
    return datasets.Dataset.from_list(rows)


def _sft_config(path: Path, **options: Any) -> Any:
    return trl.SFTConfig(
        output_dir=str(path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        bf16=False,
        max_length=32,
        seed=0,
        **options,
    )


def _examples(tokenizer: Any, count: int = 8) -> list[dict[str, Tensor]]:
    """Chat-templated examples of one length (no collator padding) for `transformers.Trainer`."""
    examples = []
    for row in _dialogues(count):
        encoded = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)
        ids = torch.tensor(encoded["input_ids"][:10])
        examples.append({"input_ids": ids, "labels": ids})
    return examples


def _training_args(path: Path, **options: Any) -> Any:
    settings: dict[str, Any] = {
        "output_dir": str(path),
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        "seed": 0,
        "data_seed": 0,
    }
    settings.update(options)
    return transformers.TrainingArguments(**settings)


class FirstLayerInputs:
    """Records, at each forward, the first decoder layer's input and the clean embedding lookup."""

    def __init__(self, model: Any) -> None:
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self._ids: Tensor | None = None
        self._embedding = model.get_input_embeddings()
        backbone, layer = model.model, model.model.layers[0]
        self._handles = [
            backbone.register_forward_pre_hook(self._on_backbone, with_kwargs=True),
            layer.register_forward_pre_hook(self._on_layer, with_kwargs=True),
        ]

    def _on_backbone(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]

    def _on_layer(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        clean = self._embedding.weight.detach()[self._ids]
        self.pairs.append((hidden.detach().clone(), clean.clone()))

    def noisy(self) -> list[bool]:
        return [not torch.equal(hidden, clean) for hidden, clean in self.pairs]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# TRL's SFTTrainer: conversational data through the chat template, TRL's fused LM head (it reads
# `lm_head.weight`, the constrained matrix) and gradient checkpointing (on by default in SFTConfig).


@pytest.mark.parametrize("tied", [True, False])
def test_sft_trainer_keeps_the_old_rows_and_trains_the_chat_tokens(
    tied: bool, tmp_path: Path
) -> None:
    run = Run(tied)
    trainer = trl.SFTTrainer(
        model=run.model,
        args=_sft_config(tmp_path / "out"),
        train_dataset=_dialogues(),
        processing_class=run.tokenizer,
    )
    assert set(run.new) <= set(trainer.train_dataset[0]["input_ids"])  # the chat tokens are read
    trainer.train()
    assert trainer.state.global_step == STEPS
    run.check_trained(run.model)
    assert is_fixed(run.model, "model.embed_tokens.weight")
    run.check_saved_plain(run.model, tmp_path / "saved")


def test_sft_trainer_with_packing(tmp_path: Path) -> None:
    run = Run()
    trainer = trl.SFTTrainer(
        model=run.model,
        args=_sft_config(tmp_path / "out", packing=True),
        train_dataset=_dialogues(),
        processing_class=run.tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    # Packed, padding-free: one row of several dialogues, positions restarting at each.
    assert batch["input_ids"].shape[0] == 1
    assert int((batch["position_ids"] == 0).sum()) > 1
    trainer.train()
    run.check_trained(run.model)
    run.check_saved_plain(run.model, tmp_path / "saved")


def test_sft_trainer_with_neftune(tmp_path: Path) -> None:
    run = Run()
    trainer = trl.SFTTrainer(
        model=run.model,
        args=_sft_config(tmp_path / "out", neftune_noise_alpha=5.0),
        train_dataset=_dialogues(),
        processing_class=run.tokenizer,
    )
    inputs = FirstLayerInputs(run.model)
    trainer.train()
    assert inputs.pairs
    assert all(inputs.noisy())  # NEFTune's noise reached the model at every training forward
    inputs.pairs.clear()
    run.model(input_ids=torch.tensor([run.new]))  # NEFTune is off after training
    assert inputs.noisy() == [False]
    inputs.remove()
    run.check_trained(run.model)
    run.check_saved_plain(run.model, tmp_path / "saved")


# transformers.Trainer's options.


def test_trainer_with_neftune(tmp_path: Path) -> None:
    run = Run()
    args = _training_args(tmp_path / "out", max_steps=STEPS, neftune_noise_alpha=5.0)
    trainer = transformers.Trainer(
        model=run.model, args=args, train_dataset=_examples(run.tokenizer)
    )
    inputs = FirstLayerInputs(run.model)
    trainer.train()
    inputs.remove()
    assert len(inputs.pairs) == STEPS
    assert all(inputs.noisy())
    run.check_trained(run.model)
    run.check_saved_plain(run.model, tmp_path / "saved")


def test_trainer_load_best_model_at_end_loads_the_best_checkpoint(tmp_path: Path) -> None:
    run = Run()
    out = tmp_path / "out"
    args = _training_args(
        out,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # the highest loss: the first checkpoint, not the last
    )
    trainer = transformers.Trainer(
        model=run.model,
        args=args,
        train_dataset=_examples(run.tokenizer),
        eval_dataset=_examples(run.tokenizer, 4),
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-1")
    best = safetensors_torch.load_file(out / "checkpoint-1" / "model.safetensors")
    last = safetensors_torch.load_file(out / "checkpoint-4" / "model.safetensors")
    key = "model.embed_tokens.weight"
    assert not torch.equal(best[key], last[key])
    assert torch.equal(run.model.get_input_embeddings().weight, best[key])  # loaded back
    assert is_fixed(run.model, key)  # and still constrained
    run.check_trained(run.model)
    run.check_saved_plain(run.model, tmp_path / "saved")


def test_trainer_with_gradient_checkpointing(tmp_path: Path) -> None:
    run = Run()
    args = _training_args(tmp_path / "out", max_steps=STEPS, gradient_checkpointing=True)
    trainer = transformers.Trainer(
        model=run.model, args=args, train_dataset=_examples(run.tokenizer)
    )
    calls = []
    first = run.model.model.layers[0].input_layernorm  # the checkpoint recomputes from here
    handle = first.register_forward_hook(lambda *_: calls.append(1))
    trainer.train()
    handle.remove()
    assert len(calls) == 2 * STEPS  # the layer ran again in each backward
    run.check_trained(run.model)
    run.check_saved_plain(run.model, tmp_path / "saved")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_trainer_with_torch_compile(backend: str, tmp_path: Path) -> None:
    run = Run()
    args = _training_args(
        tmp_path / "out", max_steps=2, torch_compile=True, torch_compile_backend=backend
    )
    trainer = transformers.Trainer(
        model=run.model, args=args, train_dataset=_examples(run.tokenizer)
    )
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"  # it ran compiled
    run.check_trained(run.model)
    run.check_saved_plain(run.model, tmp_path / "saved")


def test_trainer_resumed_mid_epoch_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # 8 examples, 2 a batch: 4 steps an epoch, 2 epochs; checkpoint-3 is inside the first epoch.
    options: dict[str, Any] = {"num_train_epochs": 2, "save_strategy": "steps", "save_steps": 3}
    whole = Run()
    transformers.Trainer(
        model=whole.model,
        args=_training_args(out, **options),
        train_dataset=_examples(whole.tokenizer),
    ).train()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["epoch"] == 0.75
    resumed = Run()
    trainer = transformers.Trainer(
        model=resumed.model,
        args=_training_args(tmp_path / "resumed", **options),
        train_dataset=_examples(resumed.tokenizer),
    )
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert trainer.state.global_step == 8
    expected, got = whole.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key  # bit for bit on CPU
    resumed.check_trained(resumed.model)
    resumed.check_saved_plain(resumed.model, tmp_path / "saved")


# PEFT with SFTTrainer.


def test_sft_trainer_peft_config_with_lora_only_leaves_the_new_rows_untrained(
    tmp_path: Path,
) -> None:
    # The trap the guide warns of: SFTTrainer calls get_peft_model after expand_vocabulary, and
    # PEFT freezes every base weight, the new rows too. The run completes; the new tokens never train.
    run = Run()
    trainer = trl.SFTTrainer(
        model=run.model,
        args=_sft_config(tmp_path / "out"),
        train_dataset=_dialogues(),
        processing_class=run.tokenizer,
        peft_config=peft.LoraConfig(**LORA),
    )
    trainer.train()
    now = _weights(trainer.model)
    assert torch.equal(now["input"], run.start["input"])  # not one row moved
    lora_b = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"]
    assert lora_b.weight.abs().sum() > 0  # while LoRA trained


def test_lora_before_expand_vocabulary_then_sft_trainer(tmp_path: Path) -> None:
    # The guide's order: get_peft_model first, then expand_vocabulary, then the PeftModel to
    # SFTTrainer without peft_config. Merged after bake, the model stays tied.
    run = Run(lora_first=True)
    trainer = trl.SFTTrainer(
        model=run.model,
        args=_sft_config(tmp_path / "out"),
        train_dataset=_dialogues(),
        processing_class=run.tokenizer,
    )
    trainer.train()
    run.check_trained(run.model)
    lora_b = run.model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"]
    assert lora_b.weight.abs().sum() > 0  # LoRA trained too
    bake(run.model)
    merged = run.model.merge_and_unload()
    assert merged.config.tie_word_embeddings
    assert merged.get_input_embeddings().weight is merged.get_output_embeddings().weight
    run.check_trained(merged)
    run.check_saved_plain(merged, tmp_path / "saved")


def _adapted_sft(run: Run, config: Any, how: str, path: Path) -> Any:
    """SFTTrainer trained with PEFT `config`, given as `peft_config` or as a PeftModel."""
    if how == "peft_config":
        model, peft_config = run.model, config
    else:
        model, peft_config = peft.get_peft_model(run.model, config), None
    trainer = trl.SFTTrainer(
        model=model,
        args=_sft_config(path),
        train_dataset=_dialogues(),
        processing_class=run.tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer.model


def _merged(adapted: Any, tied: bool) -> Any:
    if not tied:
        return adapted.merge_and_unload()
    with pytest.warns(UserWarning, match=UNTIED_ON_MERGE):
        return adapted.merge_and_unload()


@pytest.mark.parametrize("how", ["peft_config", "get_peft_model"])
def test_modules_to_save_after_expand_vocabulary_train_the_new_rows(
    how: str, tmp_path: Path
) -> None:
    # modules_to_save copies the constrained embedding and head: their new rows train, their old
    # rows stay exact; merge_and_unload (no bake first) gives an untied model, as on a plain one.
    run = Run()
    config = peft.LoraConfig(**LORA, modules_to_save=["embed_tokens", "lm_head"])
    with pytest.warns(UserWarning, match="ensure_weight_tying` is not set"):  # as on a plain model
        adapted = _adapted_sft(run, config, how, tmp_path / "out")
    run.check_trained(adapted)
    merged = _merged(adapted, tied=True)
    run.check_trained(merged)
    run.check_saved_plain(merged, tmp_path / "saved")


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_token_indices_with_the_head_saved_train_the_new_rows(
    tied: bool, tmp_path: Path
) -> None:
    # What TRL itself sets up when it adds chat tokens: the new ids as trainable tokens of the
    # embedding, and the head in modules_to_save.
    run = Run(tied)
    config = peft.LoraConfig(
        **LORA, trainable_token_indices={"embed_tokens": run.new}, modules_to_save=["lm_head"]
    )
    if tied:  # as on a plain tied model
        with pytest.warns(UserWarning, match="ensure_weight_tying` is not set"):
            adapted = _adapted_sft(run, config, "get_peft_model", tmp_path / "out")
    else:
        adapted = _adapted_sft(run, config, "get_peft_model", tmp_path / "out")
    merged = _merged(adapted, tied)
    run.check_trained(merged)
    run.check_saved_plain(merged, tmp_path / "saved")


@pytest.mark.xfail(
    reason=(
        "TRL 1.16's fused LM head reads `lm_head.bias`, which PEFT's TrainableTokensWrapper on a "
        "tied head lacks: an AttributeError on a plain tied model too (not this library's); "
        "add modules_to_save=['lm_head'] (test_trainable_token_indices_with_the_head_saved_...)"
    ),
    raises=AttributeError,
    strict=True,
)
def test_trainable_token_indices_alone_on_a_tied_model(tmp_path: Path) -> None:
    run = Run()
    config = peft.LoraConfig(**LORA, trainable_token_indices={"embed_tokens": run.new})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = _adapted_sft(run, config, "get_peft_model", tmp_path / "out")
    run.check_trained(adapted.merge_and_unload())
