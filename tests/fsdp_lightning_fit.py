"""Fit the test model with EmbeddingConstraint under ModelParallelStrategy (FSDP2) or one process.

Run by tests/test_fsdp.py as a script: Lightning's launcher starts the other rank by running
this same command again. The model shards itself in ``configure_model`` (``fully_shard``), after
the callback's ``setup`` has constrained it. A ModelCheckpoint saves Lightning's distributed
checkpoint at the end of each epoch, while the constraint is on. With ``--mixed`` one process
shards the model too, on a world of one, so that FSDP2's MixedPrecisionPolicy applies there too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from lightning_models import FLAVOURS, tokens

RANKS = 2
BATCH = 4


def sharded_model(
    flavour: Any,
    per_module: bool,
    *,
    reshard: bool = True,
    offload: bool = False,
    mixed: bool = False,
) -> Any:
    """The flavour's test model, sharding the embedding and the head (or both, tied) itself.

    ``per_module``: the constrained embedding gets an FSDP2 group of its own, as torchtitan
    shards its token embedding (tied to the head: the two in one group, as FSDP2 wants).
    ``reshard``, ``offload`` and ``mixed``: ``reshard_after_forward``, a ``CPUOffloadPolicy``
    and a bfloat16 ``MixedPrecisionPolicy`` for every group (the root's too).
    """
    options: dict[str, Any] = {"reshard_after_forward": reshard}
    if offload:  # pin_memory=False: pinning needs an accelerator, and this runs on CPUs.
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    if mixed:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )

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
    the constraint is on (at the end of training, before the fit ends and bakes), and the
    dtype of the training loss (bfloat16 where a MixedPrecisionPolicy casts the parameters)."""

    class Probe(flavour.package.Callback):  # type: ignore[misc]
        held: tuple[int, int] = (-1, -1)
        loss_dtype = ""

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            self.loss_dtype = str(outputs["loss"].dtype)

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
    parser.add_argument(
        "--mixed", action="store_true", help="a MixedPrecisionPolicy (bfloat16 parameters)"
    )
    parser.add_argument("--fixed", type=int, default=6, help="rows of the reference")
    parser.add_argument(
        "--unconstrained", action="store_true", help="no EmbeddingConstraint (an oracle)"
    )
    parser.add_argument(
        "--more", type=int, default=0, help="epochs of a second fit, of the baked model"
    )
    args = parser.parse_args()
    flavour = FLAVOURS[args.flavour]

    data = tokens(vocab=10, size=64, seed=3)
    checkpoint: list[Any] = []
    strategy: Any = "auto"
    model_class = flavour.model
    if args.devices == RANKS or args.mixed:  # FSDP2, so that a policy applies
        strategy = flavour.package.strategies.ModelParallelStrategy(
            save_distributed_checkpoint=not args.full_checkpoint
        )
        model_class = sharded_model(
            flavour, args.per_module, reshard=not args.keep, offload=args.offload, mixed=args.mixed
        )
    if args.devices == 1:
        # One process sees each global batch whole: rank 0's part, then rank 1's.
        per_rank = data.reshape(-1, RANKS).t().reshape(RANKS, -1, BATCH)
        data = per_rank.transpose(0, 1).reshape(-1)
        batch_size = BATCH * RANKS
    else:
        batch_size = BATCH
        checkpoint = [
            flavour.package.callbacks.ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True)
        ]

    torch.manual_seed(0)
    reference = torch.randn(args.fixed, 4)
    model = model_class(vocab=10, dim=4, tie=args.tie)
    model.strict_loading = not args.lenient
    held = probe(flavour)
    constraint = [] if args.unconstrained else [
        flavour.callback(model.embedding, reference, rows=args.rows),
        held,
    ]  # fmt: skip
    trainer = flavour.trainer(
        callbacks=[*constraint, *checkpoint],
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
        "loss_dtype": held.loss_dtype,
        "state_dict": {k: cast(torch.Tensor, v).detach().clone() for k, v in full.items()},
    }
    # The model after the fit is a plain sharded one: Lightning evaluates it (configure_model
    # leaves it as it is), with the baked weight gathered by FSDP2 like any other.
    loss = trainer.validate(model, DataLoader(TensorDataset(data), batch_size=batch_size))
    result["val_loss"] = loss[0]["val_loss"]
    if args.more:  # and it trains on, every row, with a Trainer of its own and no constraint
        again = flavour.trainer(
            devices=args.devices,
            strategy=type(strategy)() if strategy != "auto" else "auto",
            max_epochs=args.more,
            use_distributed_sampler=False,
        )
        again.fit(model, DataLoader(TensorDataset(data), batch_size=batch_size))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        result["after"] = {k: cast(torch.Tensor, v).detach().clone() for k, v in full.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out / f"rank{trainer.global_rank}.pt")
    # Lightning leaves the process group to the script. Left to the interpreter's exit, gloo's
    # worker threads can outlive it and abort the process ("terminate called without an
    # active exception", seen once with --mixed --more; torch's advice is this call).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
