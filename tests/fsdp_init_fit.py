"""In-place initialisation of a sharded constrained weight (2 gloo processes).

Run by tests/test_fsdp_init.py: ``--out DIR`` writes ``rank{r}.pt`` per rank. A model sharded
by ``fully_shard`` and then initialised in place, as a sharded model's ``init_weights`` does
(``nn.init.normal_(module.weight)``, ``module.weight[rows] = ...`` under ``no_grad``), for a
prefix and scattered fixed rows: each rank saves the full weight after the writes, next to
what the same writes give an unconstrained sharded weight.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.multiprocessing.spawn import spawn

sys.path.insert(0, str(Path(__file__).parent))

from support import in_process_group

from embedding_constraint import fix_rows

WORLD = 2
REFERENCE = torch.arange(6.0).reshape(2, 3) - 10.0
LAYOUTS = {"prefix": None, "scattered": [6, 1]}


def initialised(rows: list[int] | None, constrained: bool) -> dict[str, Tensor]:
    """The full weight after each in-place write, read on every rank."""
    torch.manual_seed(0)
    emb = nn.Embedding(7, 3)
    if constrained:
        fix_rows(emb, REFERENCE, rows=rows)
    fully_shard(emb)
    out = {}
    torch.manual_seed(1)
    nn.init.normal_(emb.weight)
    out["normal"] = _whole(emb)
    with torch.no_grad():
        emb.weight.fill_(0.5)
    out["fill"] = _whole(emb)
    out["trained"] = _step(emb)
    # PEFT's merges, through `.data`: a change of the free rows only, then of every row.
    delta = torch.zeros(7, 3)
    delta[_free(rows)] = 0.25
    weight: Any = emb.weight
    weight.data += distribute_tensor(delta, weight.device_mesh, weight.placements)
    out["merged"] = _whole(emb)
    try:
        weight = emb.weight
        weight.data = weight.detach() + 1.0
        out["refused"] = torch.tensor(0)
    except ValueError as error:
        out["refused"] = torch.tensor(int("fixed row" in str(error)))
    out["after refusal"] = _whole(emb)
    return out


def _free(rows: list[int] | None) -> list[int]:
    fixed = [0, 1] if rows is None else rows
    return [r for r in range(7) if r not in fixed]


def _whole(emb: nn.Embedding) -> Tensor:
    weight: Any = emb.weight  # a DTensor outside the forward
    return cast(Tensor, weight.full_tensor()).detach().clone()


def _step(emb: nn.Embedding) -> Tensor:
    optimizer = torch.optim.SGD(emb.parameters(), lr=0.5)
    torch.autograd.backward(emb(torch.arange(7)).sum())
    optimizer.step()
    return _whole(emb)


def run_rank(rank: int, out: Path) -> None:
    def body() -> dict[str, dict[str, Tensor]]:
        results = {}
        for layout, rows in LAYOUTS.items():
            results[layout] = initialised(rows, True)
            results[f"{layout}-plain"] = initialised(rows, False)
        return results

    torch.save(
        in_process_group(body, "gloo", str(out / "group"), rank, WORLD), out / f"rank{rank}.pt"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spawn(run_rank, args=(args.out,), nprocs=WORLD)  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
