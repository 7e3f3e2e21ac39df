"""Grow a Hugging Face language model's vocabulary; the old tokens' logits do not move.

A shop's tokenizer is retrained when new produce arrives, so its vocabulary is re-sorted: old
tokens get new ids, new tokens appear among them. Everything is built here, nothing is
downloaded: a BPE tokenizer trained on a made-up corpus and a tiny Llama trained on it. Then
`expand_vocabulary` grows the model to the retrained tokenizer's vocabulary, and only the
embedding rows train on sentences about the new produce. The model's logits for the old
tokens, on a prompt of old tokens, are the same afterwards: their input rows, their output
rows and the frozen body did not change.

Run ``python examples/hf_vocabulary.py``; ``--steps`` sets the training steps.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

OLD_CORPUS = [
    "fresh apples and ripe pears",
    "ripe plums and sweet apples",
    "sweet pears and fresh figs",
    "figs and plums and apples",
]
NEW_CORPUS = [
    *OLD_CORPUS,
    "fresh kiwis and ripe mangoes",
    "sweet mangoes and fresh kiwis",
    "kiwis and mangoes and apples",
]
PROMPT = "fresh apples and ripe"


@dataclass(frozen=True)
class Result:
    """What the example measured."""

    old_size: int
    new_size: int
    moved: int  # old tokens whose id changed
    loss_before: float  # on the new sentences, right after expanding
    loss_after: float
    logit_change: float  # largest change of an old token's logit on the old prompt
    reloaded_equal: bool  # save_pretrained -> a plain model: the same logits


def _tokenizer(corpus: list[str], size: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=size, special_tokens=["[PAD]", "[UNK]", "[EOS]"], show_progress=False
        ),
    )
    fast: Any = PreTrainedTokenizerFast  # untyped in transformers
    return fast(tokenizer_object=bpe, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def _batch(tokenizer: Any, corpus: list[str]) -> dict[str, torch.Tensor]:
    batch: dict[str, torch.Tensor] = tokenizer(corpus, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def _fit(model: Any, batch: dict[str, torch.Tensor], steps: int, lr: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def run(steps: int = 60, seed: int = 0) -> Result:
    """Build, pre-train, expand and train; measure the old tokens' logits."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from embedding_constraint import bake
    from embedding_constraint.transformers import expand_vocabulary

    quiet: Any = logging  # untyped in transformers
    quiet.set_verbosity_error()
    quiet.disable_progress_bar()
    torch.manual_seed(seed)
    old_tokenizer = _tokenizer(OLD_CORPUS, 60)
    new_tokenizer = _tokenizer(NEW_CORPUS, 90)  # retrained: old tokens get other ids
    config = LlamaConfig(
        vocab_size=len(old_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=False,
        pad_token_id=old_tokenizer.pad_token_id,
        eos_token_id=old_tokenizer.eos_token_id,
    )
    model: Any = LlamaForCausalLM(config)
    _fit(model, _batch(old_tokenizer, OLD_CORPUS), steps=100, lr=1e-2)  # the "old" model

    old_vocab, new_vocab = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    shared = [t for t in old_vocab if t in new_vocab]
    old_ids = torch.tensor([old_vocab[t] for t in shared])
    new_ids = torch.tensor([new_vocab[t] for t in shared])
    prompt_old = torch.tensor([old_tokenizer(PROMPT)["input_ids"]])
    prompt_tokens = old_tokenizer.convert_ids_to_tokens(prompt_old[0].tolist())
    prompt_new = torch.tensor([new_tokenizer.convert_tokens_to_ids(prompt_tokens)])
    with torch.no_grad():
        before = model(prompt_old).logits[..., old_ids]

    expand_vocabulary(model, old_tokenizer, new_tokenizer)
    for name, param in model.named_parameters():  # only the new rows train: freeze the body
        param.requires_grad_("parametrizations" in name)
    new_batch = _batch(new_tokenizer, NEW_CORPUS[len(OLD_CORPUS) :])
    model.eval()
    with torch.no_grad():
        loss_before = float(model(**new_batch).loss)
    loss_after = _fit(model, new_batch, steps=steps, lr=3e-2)
    with torch.no_grad():
        after = model(prompt_new).logits[..., new_ids]

    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        plain: Any = LlamaForCausalLM.from_pretrained(path)  # no constraint: a plain checkpoint
        plain.eval()
        with torch.no_grad():
            reloaded_equal = torch.equal(plain(prompt_new).logits, model(prompt_new).logits)
    bake(model)
    return Result(
        old_size=len(old_vocab),
        new_size=len(new_vocab),
        moved=int((old_ids != new_ids).sum()),
        loss_before=loss_before,
        loss_after=loss_after,
        logit_change=float((after - before).abs().max()),
        reloaded_equal=reloaded_equal,
    )


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps after expanding")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1. Got {args.steps}.")
    result = run(steps=args.steps, seed=args.seed)
    print(
        f"vocabulary {result.old_size} -> {result.new_size} tokens "
        f"({result.moved} old tokens moved to other ids)\n"
        f"loss on the new sentences: {result.loss_before:.3f} -> {result.loss_after:.3f} "
        f"({args.steps} steps, embedding rows only)\n"
        f"largest change of an old token's logit on {PROMPT!r}: {result.logit_change:.3g}\n"
        f"save_pretrained -> plain from_pretrained gives the same logits: "
        f"{result.reloaded_equal}"
    )
    return result


if __name__ == "__main__":
    main()
