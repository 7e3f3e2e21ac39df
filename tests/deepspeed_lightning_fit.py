"""Fit the test model with EmbeddingConstraint under Lightning's DeepSpeedStrategy on 2 CPU
ranks, or make the same fits on one device without DeepSpeed.

Run by tests/test_deepspeed.py as a script: Lightning's launcher starts rank 1 by running this
same command again. ``--devices 2`` fits at ZeRO stages 0 to 3 in turn, and at stage 3 with a
tied head too (``lightning_models.cpu_deepspeed``: Lightning's strategy, let run on the CPU).
Each fit is followed by a second one of the baked model with a new Trainer and no constraint
(the model trains on), and by a validation; between them, ``trainer.save_checkpoint`` after
the fit is tried (refused from ZeRO stage 1 on, as the callback's engine holds the stored
rows the bake replaced). At stage 3 the first fit saves a checkpoint
(Lightning's ``ModelCheckpoint``: a DeepSpeed directory), which rank 0 consolidates with
Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``. ``--devices 1`` makes the same fits
on one device, fed the same global batches. Each rank saves what the test compares.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed  # type: ignore[import-untyped,import-not-found,unused-ignore]
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from lightning_models import FLAVOURS, Flavour, cpu_deepspeed, tokens

RANKS, BATCH = 2, 4  # BATCH per rank; one device takes RANKS * BATCH
ROWS = [9, 0, 4, 2, 7, 5]
# name: (ZeRO stage, tied head); one device runs each tie once, without DeepSpeed.
CASES = {
    "zero0": (0, False),
    "zero1": (1, False),
    "zero2": (2, False),
    "zero3": (3, False),
    "zero3-tied": (3, True),
}
CHECKPOINTED = 3  # the stage whose first fit saves a checkpoint


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """The module's parameters whole, where ZeRO-3 partitions them (else as they are)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params) if params else contextlib.nullcontext():
        yield


def state(module: nn.Module) -> dict[str, Tensor]:
    with gathered(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def watcher(flavour: Flavour, reference: Tensor) -> Any:
    """A callback that records, after each step, whether the fixed rows hold the reference."""

    class Watch(flavour.package.Callback):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.exact: list[bool] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            with gathered(pl_module), torch.no_grad():
                self.exact.append(torch.equal(pl_module.embedding.weight[ROWS], reference))

    return Watch()


def fit_case(flavour: Flavour, stage: int | None, tie: bool, out: Path) -> dict[str, Any]:
    """Fit with the constraint (2 epochs), then train on unconstrained (1 epoch), validate."""
    data = tokens(vocab=10, size=64, seed=3)
    if stage is None:  # one device sees each global batch whole: rank 0's part, then rank 1's
        per_rank = data.reshape(-1, RANKS).t().reshape(RANKS, -1, BATCH)
        data, batch_size = per_rank.transpose(0, 1).reshape(-1), BATCH * RANKS
    else:
        batch_size = BATCH
    config = {
        "zero_optimization": {"stage": stage or 0, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": BATCH,
    }

    def trainer(*callbacks: Any, **kwargs: Any) -> Any:
        # Lightning writes into the config it is given: each Trainer gets its own.
        strategy = "auto" if stage is None else cpu_deepspeed(flavour, config=copy.deepcopy(config))
        devices = 1 if stage is None else RANKS
        return flavour.trainer(
            callbacks=list(callbacks),
            devices=devices,
            strategy=strategy,
            use_distributed_sampler=False,
            **kwargs,
        )

    torch.manual_seed(0)
    reference = torch.randn(len(ROWS), 4)
    model = flavour.model(vocab=10, dim=4, tie=tie)
    watch = watcher(flavour, reference)
    checkpoint = []
    if stage == CHECKPOINTED and not tie:
        checkpoint = [flavour.package.callbacks.ModelCheckpoint(dirpath=out / "checkpoints")]
    first = trainer(
        flavour.callback(model.embedding, reference, rows=ROWS),
        watch,
        *checkpoint,
        max_epochs=2,
        enable_checkpointing=bool(checkpoint),
    )
    rank = first.global_rank
    if stage is not None:
        data = data[rank::RANKS]
    batches = DataLoader(TensorDataset(data), batch_size=batch_size)
    first.fit(model, batches)
    result: dict[str, Any] = {
        "reference": reference,
        "exact_each_step": watch.exact,
        "plain": type(model.embedding.weight) is nn.Parameter
        and not any(hasattr(m, "parametrizations") for m in (model.embedding, model.head)),
        "tied": model.head.weight is model.embedding.weight,
        "fitted": state(model),
    }
    # After the fit, its engine holds the stored rows that the bake replaced: from ZeRO
    # stage 1 on, the callback refuses to save from it (before DeepSpeed writes anything).
    result["save_after_fit"] = []  # the error (None: saved), weights only and whole
    for weights_only in (True, False):
        try:
            first.save_checkpoint(out / "after-fit", weights_only=weights_only)
            result["save_after_fit"].append(None)
        except RuntimeError as refused:
            result["save_after_fit"].append(str(refused))
    first.strategy.barrier()
    result["wrote_after_fit"] = (out / "after-fit").exists()
    if stage == 0 and rank == 0:  # the engine's module state: the model's state dict
        saved = torch.load(
            out / "after-fit" / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False
        )
        result["after_fit_module"] = saved["module"]
    result["val_loss"] = first.validate(model, batches, verbose=False)[0]["val_loss"]
    trainer(max_epochs=1).fit(model, batches)
    result["trained_on"] = state(model)
    if checkpoint and rank == 0:
        from lightning.pytorch.utilities.deepspeed import (
            convert_zero_checkpoint_to_fp32_state_dict,
        )

        (saved,) = (out / "checkpoints").iterdir()
        converted = convert_zero_checkpoint_to_fp32_state_dict(saved, out / "converted.ckpt")
        result["converted"] = dict(converted["state_dict"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavour", choices=list(FLAVOURS), default="lightning.pytorch")
    parser.add_argument("--devices", type=int, choices=[1, RANKS], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    flavour = FLAVOURS[args.flavour]
    cases = (
        {
            name: fit_case(flavour, stage, tie, args.out / name)
            for name, (stage, tie) in CASES.items()
        }
        if args.devices == RANKS
        else {
            name: fit_case(flavour, None, tie, args.out / name)
            for name, tie in [("single", False), ("single-tied", True)]
        }
    )
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(cases, args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
