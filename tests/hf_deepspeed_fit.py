"""`transformers.Trainer(deepspeed=...)` after `expand_vocabulary`, one rank of ``torchrun``.

Run by tests/test_hf_distributed.py as
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_deepspeed_fit.py --out DIR``
on the CPU (``DS_ACCELERATOR=cpu``, gloo). For a tied and an untied tiny Llama (the one of
``hf_ddp_fit.py``), each rank expands the vocabulary and trains a few steps with the Trainer
under DeepSpeed ZeRO stage 2, then stage 3 (which partitions the stored free rows as any
parameter), then writes ``zero{stage}-{case}-rank{r}.pt`` (its matrices after expanding and
after training) and ``save_model`` the model under ``DIR/zero{stage}-{case}`` (at stage 3 from
DeepSpeed's consolidated dict of parameter names, saved with plain keys: `plain_keys`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import torch

sys.path.insert(0, str(Path(__file__).parent))

from hf_ddp_fit import (
    CASES,
    NEW_VOCAB,
    OLD_VOCAB,
    STEPS,
    TIMEOUT_S,
    dataset,
    run_cases,
    tiny_llama,
    vocab_tensors,
)

STAGES = (2, 3)
ZERO: dict[str, Any] = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    # DeepSpeed's fused CPU Adam would need a compiler: torch's AdamW instead.
    "zero_force_ds_cpu_optimizer": False,
}


def fit(out: Path, case: str, rank: int) -> None:
    """The case at ZeRO stage 2, then at stage 3."""
    for stage in STAGES:
        fit_at(out, case, rank, stage)


def fit_at(out: Path, case: str, rank: int, stage: int) -> None:
    import deepspeed
    from transformers import Trainer, TrainingArguments

    from embedding_constraint.transformers import expand_vocabulary

    name = f"zero{stage}-{case}"
    model = expand_vocabulary(tiny_llama(CASES[case]), OLD_VOCAB, NEW_VOCAB)
    expanded = vocab_tensors(model)
    zero = {**ZERO, "zero_optimization": {"stage": stage}}
    if stage == 3:  # save_model gathers the partitions into one state dict
        zero["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        # Partition every parameter, however small (by default those under 100k elements
        # stay whole on every rank: nothing of this tiny model would be partitioned).
        zero["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    args = TrainingArguments(
        output_dir=str(out / name),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        weight_decay=0.1,
        save_strategy="no",
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=TIMEOUT_S,
        deepspeed=zero,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset())
    assert args.world_size == 2, args.world_size
    trainer.train()
    trainer.save_model(str(out / name / "model"))
    # ZeRO-3 keeps each rank's partition only: every rank gathers them to read the matrices.
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
        trained = vocab_tensors(model)
    torch.save({"expanded": expanded, "trained": trained}, out / f"{name}-rank{rank}.pt")


def main() -> None:
    run_cases(fit)


if __name__ == "__main__":
    main()
