"""`transformers.Trainer` with DDP after `expand_vocabulary`, one rank of ``torchrun``.

Run by tests/test_hf_distributed.py as
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_ddp_fit.py --out DIR``
(gloo on the CPU, a 60 s process-group timeout). For a tied and an untied tiny Llama (and a
tied one "expanded" to its own vocabulary: every row fixed), each rank expands the vocabulary,
trains a few steps with the Trainer, and writes ``{case}-rank{r}.pt`` (its input and output
matrices after expanding and after training, and one body weight before and after); the Trainer writes its
checkpoint and ``save_model`` its model under ``DIR/{case}``. The helpers here (the tiny model,
the vocabularies, the data) are shared with ``hf_fsdp2_fit.py`` and the test.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

OLD = 24
OLD_VOCAB = [f"t{i}" for i in range(OLD)]
# Re-sorted, tokens 3 and 4 removed, three added in between: the fixed rows are scattered.
NEW_VOCAB = [*OLD_VOCAB[:3], "new0", *reversed(OLD_VOCAB[5:]), "new1", "new2"]
KEPT = [0, 1, 2, *range(5, OLD)]  # old ids of the shared tokens
KEPT_AT = [NEW_VOCAB.index(OLD_VOCAB[i]) for i in KEPT]  # their new ids
ADDED_AT = [NEW_VOCAB.index(t) for t in ("new0", "new1", "new2")]
CASES = {"tied": True, "untied": False}
# A tied model "expanded" to its own vocabulary: every row fixed (hf_ddp_fit.py only).
EVERY_ROW = "tied-every-row"
STEPS = 3
TIMEOUT_S = 60  # a rank waiting on a collective another rank skips fails in a minute


def tiny_llama(tied: bool, *, seed: int = 0, vocab: int = OLD) -> Any:  # transformers: partly typed
    """A one-layer Llama of the old vocabulary, the same on every rank for one seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def vocab_tensors(model: Any) -> dict[str, Tensor]:
    """The input embedding's and the output head's matrices, detached copies."""
    return {
        "input": model.get_input_embeddings().weight.detach().clone(),
        "head": model.get_output_embeddings().weight.detach().clone(),
    }


def dataset(count: int = 16, vocab: int = len(NEW_VOCAB)) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, vocab, (count, 8), generator=generator)
    ]


def fit(out: Path, case: str, rank: int) -> None:
    from transformers import Trainer, TrainingArguments

    from embedding_constraint.transformers import expand_vocabulary

    every_row = case == EVERY_ROW
    model = tiny_llama(every_row or CASES[case])
    model = expand_vocabulary(model, OLD_VOCAB, OLD_VOCAB if every_row else NEW_VOCAB)
    expanded = vocab_tensors(model)
    body = model.model.layers[0].mlp.gate_proj.weight
    body_before = body.detach().clone()
    args = TrainingArguments(
        output_dir=str(out / case),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        weight_decay=0.1,
        save_strategy="steps",
        save_steps=STEPS,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=TIMEOUT_S,
        ddp_find_unused_parameters=False,  # every stored parameter gets a gradient
        disable_tqdm=True,
        seed=0,
    )
    examples = dataset(vocab=len(OLD_VOCAB) if every_row else len(NEW_VOCAB))
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    assert args.world_size == 2, args.world_size  # the Trainer runs DDP, not one process each
    trainer.train()
    trainer.save_model(str(out / case / "model"))
    torch.save(
        {
            "expanded": expanded,
            "trained": vocab_tensors(model),
            "body": {"before": body_before, "trained": body.detach().clone()},
        },
        out / f"{case}-rank{rank}.pt",
    )


def run_cases(
    fit_case: Callable[[Path, str, int], None], cases: Sequence[str] = tuple(CASES)
) -> None:
    """This rank's ``fit_case(out, case, rank)`` for each case, ``--out`` from the command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    rank = int(os.environ["RANK"])
    for case in cases:
        fit_case(args.out, case, rank)


def main() -> None:
    run_cases(fit, [*CASES, EVERY_ROW])


if __name__ == "__main__":
    main()
