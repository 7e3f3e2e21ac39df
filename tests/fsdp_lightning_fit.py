"""Fit the test model with EmbeddingConstraint under ModelParallelStrategy (FSDP2) or one process.

Run by tests/test_fsdp.py as a script: Lightning's launcher starts the other rank by running
this same command again. The model shards itself in ``configure_model`` (``fully_shard``), after
the callback's ``setup`` has constrained it. A ModelCheckpoint saves Lightning's distributed
checkpoint at the end of each epoch, while the constraint is on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from lightning_models import FLAVOURS, tokens

RANKS = 2
BATCH = 4


def sharded_model(
    flavour: Any, per_module: bool, *, reshard: bool = True, offload: bool = False
) -> Any:
    """The flavour's test model, sharding the embedding and the head (or both, tied) itself.

    ``per_module``: the constrained embedding gets an FSDP2 group of its own, as torchtitan
    shards its token embedding (tied to the head: the two in one group, as FSDP2 wants).
    ``reshard`` and ``offload``: ``reshard_after_forward`` and a ``CPUOffloadPolicy`` for every
    group (the root's too).
    """
    # pin_memory=False: pinning needs an accelerator, and this runs on CPUs.
    policy = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if offload else {}
    options: dict[str, Any] = {"reshard_after_forward": reshard, **policy}

    class Sharded(flavour.model):  # type: ignore[misc]
        def configure_model(self) -> None:
            if isinstance(self, FSDPModule):  # sharded by an earlier stage (the fit)
                return
            if per_module and self.hparams.tie:
                fully_shard([self.embedding, self.head], **options)
            elif per_module:
                fully_shard(self.embedding, **options)
            if not self.hparams.tie:  # tied modules share one FSDP2 group: the root's
                fully_shard(self.head, **options)
            fully_shard(self, **options)

    return Sharded


def probe(flavour: Any) -> Any:
    """A callback that records the embedding's rows this rank holds, reference and free, while
    the constraint is on (at the end of training, before the fit ends and bakes)."""

    class Probe(flavour.package.Callback):  # type: ignore[misc]
        held: tuple[int, int] = (-1, -1)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            plist = pl_module.embedding.parametrizations.weight
            tensors = (plist[0].reference, plist.original)
            local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
            self.held = (local[0].shape[0], local[1].shape[0])

    return Probe()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavour", choices=list(FLAVOURS), default="lightning.pytorch")
    parser.add_argument("--devices", type=int, choices=[1, RANKS], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="*", help="fixed rows (default: a prefix)")
    parser.add_argument("--tie", action="store_true", help="tie the head to the embedding")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--resume", type=Path, help="a checkpoint to resume the fit from")
    parser.add_argument(
        "--full-checkpoint", action="store_true", help="one file, not a distributed checkpoint"
    )
    parser.add_argument("--lenient", action="store_true", help="strict_loading=False")
    parser.add_argument(
        "--per-module", action="store_true", help="fully_shard the embedding on its own"
    )
    parser.add_argument("--keep", action="store_true", help="reshard_after_forward=False")
    parser.add_argument("--offload", action="store_true", help="a CPUOffloadPolicy")
    args = parser.parse_args()
    flavour = FLAVOURS[args.flavour]

    data = tokens(vocab=10, size=64, seed=3)
    checkpoint: list[Any] = []
    if args.devices == 1:
        # One process sees each global batch whole: rank 0's part, then rank 1's.
        per_rank = data.reshape(-1, RANKS).t().reshape(RANKS, -1, BATCH)
        data = per_rank.transpose(0, 1).reshape(-1)
        batch_size, strategy, model_class = BATCH * RANKS, "auto", flavour.model
    else:
        batch_size = BATCH
        strategy = flavour.package.strategies.ModelParallelStrategy(
            save_distributed_checkpoint=not args.full_checkpoint
        )
        model_class = sharded_model(
            flavour, args.per_module, reshard=not args.keep, offload=args.offload
        )
        checkpoint = [
            flavour.package.callbacks.ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True)
        ]

    torch.manual_seed(0)
    reference = torch.randn(6, 4)
    model = model_class(vocab=10, dim=4, tie=args.tie)
    model.strict_loading = not args.lenient
    held = probe(flavour)
    trainer = flavour.trainer(
        callbacks=[
            flavour.callback(model.embedding, reference, rows=args.rows),
            held,
            *checkpoint,
        ],
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        enable_checkpointing=bool(checkpoint),
        use_distributed_sampler=False,  # each rank takes its own shard, as in ddp_fit.py
    )
    if args.devices == RANKS:
        data = data[trainer.global_rank :: RANKS]
    trainer.fit(
        model, DataLoader(TensorDataset(data), batch_size=batch_size), ckpt_path=args.resume
    )
    weight = model.embedding.weight
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    result = {
        "reference": reference,
        "rows": args.rows or list(range(reference.shape[0])),
        "plain": isinstance(weight, torch.nn.Parameter)
        and not hasattr(model.embedding, "parametrizations"),
        "dtensor": isinstance(weight, DTensor),
        "classes": [c.__name__ for c in type(model.embedding).__mro__],
        "held": held.held,
        "state_dict": {k: cast(torch.Tensor, v).detach().clone() for k, v in full.items()},
    }
    # The model after the fit is a plain sharded one: Lightning evaluates it (configure_model
    # leaves it as it is), with the baked weight gathered by FSDP2 like any other.
    loss = trainer.validate(model, DataLoader(TensorDataset(data), batch_size=batch_size))
    result["val_loss"] = loss[0]["val_loss"]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
