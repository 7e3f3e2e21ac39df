"""One rank of `check_same_on_every_rank` on several processes; saves what each case gave.

Run by tests/test_ddp.py as ``python ddp_reference_check.py --rank R --world 2 --store FILE
--out DIR``, once per rank. Every case runs in one process group: rank 1 builds its module as
rank 0 does, except for what the case changes, and the result (``"ok"`` or the error message)
goes into ``DIR/rank{R}.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from embedding_constraint import check_same_on_every_rank, fix_rows

ROWS = [9, 0, 4, 2, 7, 5]


def _reference() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(6, 4)


def _model(reference: torch.Tensor, rows: list[int] | None = ROWS) -> nn.Module:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    return fix_rows(model, reference, name="0.weight", rows=rows)


def cases(rank: int) -> dict[str, Callable[[], nn.Module]]:
    """Each case: the module that ``rank`` checks."""
    other = rank == 1

    def one_ulp() -> nn.Module:
        reference = _reference()
        if other:
            reference[2, 3] = torch.nextafter(reference[2, 3], torch.tensor(float("inf")))
        return _model(reference)

    def negative_zero() -> nn.Module:
        reference = _reference()
        reference[1, 0] = -0.0 if other else 0.0  # equal as numbers, apart as bits
        return _model(reference)

    def swapped() -> nn.Module:
        reference = _reference()
        return _model(reference[[1, 0, 2, 3, 4, 5]] if other else reference)

    def rows() -> nn.Module:
        return _model(_reference(), [9, 0, 4, 2, 7, 6] if other else ROWS)

    def tensors() -> nn.Module:
        model = _model(_reference())
        if other:
            fix_rows(model, torch.zeros(1, 4), name="1.weight")
        return model

    def ddp_first() -> nn.Module:
        return DistributedDataParallel(_model(_reference()))

    def ddp_late(find_unused_parameters: bool) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
            ddp = DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)
            fix_rows(model, _reference(), name="0.weight", rows=ROWS)
            return ddp

        return build

    return {
        "same": lambda: _model(_reference()),
        "one_ulp": one_ulp,
        "negative_zero": negative_zero,
        "swapped": swapped,
        "rows": rows,
        "tensors": tensors,
        "ddp_first": ddp_first,
        "ddp_late": ddp_late(False),
        "ddp_late_find_unused": ddp_late(True),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group(
        "gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=args.world
    )
    results = {}
    try:
        for name, build in cases(args.rank).items():
            module = build()
            try:
                check_same_on_every_rank(module)
                results[name] = "ok"
            except ValueError as error:
                results[name] = str(error)
            del module
        dist.barrier()
    finally:
        dist.destroy_process_group()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{args.rank}.json").write_text(json.dumps(results), encoding="utf-8")


if __name__ == "__main__":
    main()
