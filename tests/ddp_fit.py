"""Fit the test model with EmbeddingConstraint under DDP (or one process); save each rank's result.

Run by tests/test_ddp.py as a script: Lightning's DDP launcher starts the other ranks by running
this same command again, which a pytest process cannot do for itself. With
``--reference-differs-on-rank-1``, rank 1's reference is one float step apart from rank 0's: the
fit must stop at setup, and each rank saves the error and whether its module is plain again.
``--tie`` ties the head to the embedding (the head then predicts over the vocabulary);
``--rows`` with no rows fixes none, and ``--unconstrained`` fits without the callback. After
each step every rank records whether the fixed rows hold the reference and the tie holds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from lightning_models import FLAVOURS, Flavour, tokens

RANKS = 2
BATCH = 4
FIXED = 6  # fixed rows without --rows: the first ones


def watcher(flavour: Flavour, reference: torch.Tensor, rows: list[int]) -> Any:
    """A callback that records, after each step, the fixed rows' exactness and the tie."""

    class Watch(flavour.package.Callback):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.exact: list[bool] = []
            self.tied: list[bool] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            # The tie first, with no read alive: a holder that holds a read already (the
            # embedding, through a name kept here) is given a new one (`shared_read`).
            self.tied.append(pl_module.head.weight is pl_module.embedding.weight)
            with torch.no_grad():
                self.exact.append(torch.equal(pl_module.embedding.weight[rows], reference))

    return Watch()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavour", choices=list(FLAVOURS), default="pytorch_lightning")
    parser.add_argument("--devices", type=int, choices=[1, RANKS], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="*", help="fixed rows (default: a prefix)")
    parser.add_argument("--reference-differs-on-rank-1", action="store_true")
    parser.add_argument("--tie", action="store_true", help="tie the head to the embedding")
    parser.add_argument("--unconstrained", action="store_true", help="fit without the callback")
    args = parser.parse_args()
    flavour = FLAVOURS[args.flavour]

    data = tokens(vocab=10, size=64, seed=3)
    if args.devices == 1:
        # One process sees each global batch whole: rank 0's part, then rank 1's.
        per_rank = data.reshape(-1, RANKS).t().reshape(RANKS, -1, BATCH)
        data = per_rank.transpose(0, 1).reshape(-1)
        batch_size = BATCH * RANKS
        strategy = "auto"
    else:
        batch_size = BATCH
        strategy = "ddp"

    rows = list(range(FIXED)) if args.rows is None else args.rows
    torch.manual_seed(0)
    reference = torch.randn(len(rows), 4)
    # Lightning's launcher starts rank 1 with LOCAL_RANK=1 (one machine), before any Trainer.
    if args.reference_differs_on_rank_1 and os.environ.get("LOCAL_RANK") == "1":
        reference[2, 3] = torch.nextafter(reference[2, 3], torch.tensor(float("inf")))
    model = flavour.model(vocab=10, dim=4, tie=args.tie)
    watch = watcher(flavour, reference, rows)
    constraint = (
        [] if args.unconstrained else [flavour.callback(model.embedding, reference, rows=args.rows)]
    )
    trainer = flavour.trainer(
        callbacks=[*constraint, watch],
        devices=args.devices,
        strategy=strategy,
        max_epochs=2,
        # Each rank takes its shard itself (rank r: samples r, r + 2, ...), so the one-process
        # run can be fed exactly the same global batches.
        use_distributed_sampler=False,
    )
    if args.devices == RANKS:
        data = data[trainer.global_rank :: RANKS]
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    error = None
    try:
        trainer.fit(model, DataLoader(TensorDataset(data), batch_size=batch_size))
    except ValueError as refused:
        error = str(refused)
    result = {
        "error": error,
        "steps": model.steps,
        "reference": reference,
        "initial": initial,
        "rows": rows,
        "plain": type(model.embedding.weight) is torch.nn.Parameter
        and not any(hasattr(m, "parametrizations") for m in (model.embedding, model.head)),
        "tied": model.head.weight is model.embedding.weight,
        "exact_each_step": watch.exact,
        "tied_each_step": watch.tied,
        "state_dict": model.state_dict(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
