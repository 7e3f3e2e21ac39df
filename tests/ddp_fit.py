"""Fit the test model with EmbeddingConstraint under DDP (or one process); save each rank's result.

Run by tests/test_ddp.py as a script: Lightning's DDP launcher starts the other ranks by running
this same command again, which a pytest process cannot do for itself. With
``--reference-differs-on-rank-1``, rank 1's reference is one float step apart from rank 0's: the
fit must stop at setup, and each rank saves the error and whether its module is plain again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from lightning_models import FLAVOURS, tokens

RANKS = 2
BATCH = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavour", choices=list(FLAVOURS), default="pytorch_lightning")
    parser.add_argument("--devices", type=int, choices=[1, RANKS], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="*", help="fixed rows (default: a prefix)")
    parser.add_argument("--reference-differs-on-rank-1", action="store_true")
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

    torch.manual_seed(0)
    reference = torch.randn(6, 4)
    # Lightning's launcher starts rank 1 with LOCAL_RANK=1 (one machine), before any Trainer.
    if args.reference_differs_on_rank_1 and os.environ.get("LOCAL_RANK") == "1":
        reference[2, 3] = torch.nextafter(reference[2, 3], torch.tensor(float("inf")))
    model = flavour.model(vocab=10, dim=4)
    trainer = flavour.trainer(
        callbacks=[flavour.callback(model.embedding, reference, rows=args.rows)],
        devices=args.devices,
        strategy=strategy,
        max_epochs=2,
        # Each rank takes its shard itself (rank r: samples r, r + 2, ...), so the one-process
        # run can be fed exactly the same global batches.
        use_distributed_sampler=False,
    )
    if args.devices == RANKS:
        data = data[trainer.global_rank :: RANKS]
    error = None
    try:
        trainer.fit(model, DataLoader(TensorDataset(data), batch_size=batch_size))
    except ValueError as refused:
        error = str(refused)
    result = {
        "error": error,
        "steps": model.steps,
        "reference": reference,
        "rows": args.rows or list(range(reference.shape[0])),
        "plain": type(model.embedding.weight) is torch.nn.Parameter
        and not hasattr(model.embedding, "parametrizations"),
        "state_dict": model.state_dict(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
