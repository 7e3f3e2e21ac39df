"""Train a constrained model under FSDP2 (``fully_shard``, 2 gloo processes) or in one process.

Run by tests/test_fsdp.py as a script (``--world 2`` spawns the ranks itself): each rank, or the
one process, saves what the test compares under ``--out``. The model holds every constrained
kind at once: an ``nn.Embedding`` tied to an ``nn.Linear`` head, an ``nn.EmbeddingBag`` and an
``nn.Linear`` with a bias whose weight and bias rows are fixed together.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.multiprocessing.spawn import spawn

from embedding_constraint import FixedRows, fix_rows
from embedding_constraint.fixed_rows import parametrization_list
from embedding_constraint.fsdp import prepare_fully_shard

sys.path.insert(0, str(Path(__file__).parent))

from support import in_process_group, stored

VOCAB, DIM, CLASSES = 10, 4, 6
WORLD, BATCH, STEPS = 2, 4, 4  # BATCH per rank; one process takes WORLD * BATCH


class Net(nn.Module):
    """A tied embedding and head, a bag and a classifier with a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.bag = nn.EmbeddingBag(VOCAB, DIM, mode="sum")
        self.head = nn.Linear(DIM, VOCAB)
        self.head.weight = self.embedding.weight
        self.classifier = nn.Linear(DIM, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = torch.tanh(self.embedding(tokens).mean(1) + self.bag(tokens))
        target = tokens[:, 0]
        loss = nn.functional.cross_entropy(self.head(hidden), target)
        return loss + nn.functional.cross_entropy(self.classifier(hidden), target % CLASSES)


def references() -> dict[str, Any]:
    """The fixed rows' values: one generator, so every process draws the same."""
    generator = torch.Generator().manual_seed(7)
    old_classifier = nn.Linear(DIM, 3)
    with torch.no_grad():
        for p in old_classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return {
        "embedding": torch.randn(6, DIM, generator=generator),
        "bag": torch.randn(6, DIM, generator=generator),
        "classifier": old_classifier,
    }


def build(rows: list[int] | None) -> tuple[Net, dict[str, Any]]:
    torch.manual_seed(0)
    net = Net()
    refs = references()
    fix_rows(net, refs["embedding"], name="embedding.weight", rows=rows)  # the head reads it too
    fix_rows(net.bag, refs["bag"], rows=rows)
    fix_rows(net.classifier, refs["classifier"], rows=None if rows is None else [5, 0, 2])
    return net, refs


def batches() -> Tensor:
    """STEPS global batches of WORLD * BATCH samples, 3 tokens each."""
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (STEPS, WORLD * BATCH, 3), generator=generator)


def train(net: nn.Module, rank: int, world: int) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    for batch in batches():
        local = batch[rank * BATCH : (rank + 1) * BATCH] if world > 1 else batch
        optimizer.zero_grad()
        net(local).backward()  # the mean over each rank's part; FSDP2 averages the ranks
        optimizer.step()
    return optimizer


def run_rank(rank: int, world: int, out: Path, rows: list[int] | None, reference: str) -> None:
    def body() -> None:
        torch.save(_train_sharded(rank, world, out, rows, reference), out / f"rank{rank}.pt")

    in_process_group(body, "gloo", str(out / "group"), rank, world)


def _train_sharded(
    rank: int, world: int, out: Path, rows: list[int] | None, reference: str
) -> dict[str, Any]:
    """Shard, train and reload the model on this rank: what the test compares."""
    net, _ = build(rows)
    if reference == "sharded":
        prepare_fully_shard(net)
    fully_shard(net.bag)
    fully_shard(net.classifier)
    fully_shard(net)  # the tied embedding and head share one group: the root's
    optimizer = train(net, rank, world)
    free = stored(net.embedding)
    result: dict[str, Any] = {
        "free_type": type(free).__name__,
        "free_local_rows": free.to_local().shape[0] if isinstance(free, DTensor) else -1,
        "rest": _rows_at_rest(net),
        "reference": reference,
        "state_types": sorted(
            {type(v).__name__ for s in optimizer.state.values() for v in s.values() if v.dim()}
        ),
        "state_dict": {k: _full(v) for k, v in net.state_dict().items()},
        "full": get_model_state_dict(net, options=StateDictOptions(full_state_dict=True)),
        "sharded_keys": sorted(get_model_state_dict(net)),
        # Each rank's own read of the weight, gathered: exact on every rank.
        "weight": _full(net.embedding.weight.detach()),
    }
    dcp.save(  # type: ignore[attr-defined]
        get_model_state_dict(net), checkpoint_id=str(out / "dcp")
    )
    fixed_at = rows or list(range(6))
    free_row = next(r for r in range(VOCAB) if r not in fixed_at)
    result["reloaded"] = _reload(net, free_row, fixed_at[0])
    return result


def _rows_at_rest(net: nn.Module) -> dict[str, int]:
    """The rows of each constrained tensor this rank holds between steps, reference and free."""
    held = {}
    for name, module in net.named_modules():
        if name == "head":  # it reads the embedding's (tied)
            continue
        for attr in getattr(module, "parametrizations", {}):
            constraint = parametrization_list(module, attr)[0]
            assert isinstance(constraint, FixedRows)
            tensors = (constraint.reference, stored(module, attr))
            local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
            held[f"{name}.{attr}"] = sum(t.shape[0] for t in local)
    return held


def _reload(net: Net, free_row: int, fixed_row: int) -> str:
    """Load state dicts into the sharded model with set_model_state_dict: "ok", or what failed.

    A full one with a free row changed (it must land), the sharded one it then gives (it must
    load as it is), and a full one with a fixed row changed (it must be refused).
    """
    full_options = StateDictOptions(full_state_dict=True)
    try:
        full = get_model_state_dict(net, options=full_options)
        changed = cast(Tensor, full["embedding.weight"]).clone()
        changed[free_row] += 1.0
        full["embedding.weight"] = full["head.weight"] = changed  # tied: both keys hold it
        set_model_state_dict(net, full, options=full_options)
        if not torch.equal(_full(net.embedding.weight.detach()), changed):
            return "the full state dict did not load"
        set_model_state_dict(net, get_model_state_dict(net))
        if not torch.equal(_full(net.embedding.weight.detach()), changed):
            return "the sharded state dict did not load"
        bad = changed.clone()
        bad[fixed_row] += 1.0
        full["embedding.weight"] = full["head.weight"] = bad
        set_model_state_dict(net, full, options=full_options)
    except RuntimeError as error:
        if "Expected the fixed rows of 'embedding.weight' to equal the reference" in str(error):
            return "ok"
        return str(error).splitlines()[-1]
    return "a changed fixed row loaded"


def _full(value: Tensor) -> Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, choices=[1, WORLD], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="*", help="fixed rows (default: a prefix)")
    parser.add_argument("--reference", choices=["sharded", "replicated"], default="sharded")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.world == 1:  # the reference run: no process group, no sharding
        net, _ = build(args.rows)
        train(net, 0, 1)
        torch.save({"state_dict": net.state_dict()}, args.out / "rank0.pt")
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spawn(run_rank, args=(WORLD, args.out, args.rows, args.reference), nprocs=WORLD)  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
