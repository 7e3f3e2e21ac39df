"""Train a constrained model sharded per module, torchtitan's way, then bake it and train on.

Run by tests/test_fsdp.py as a script (``--world 2`` spawns 2 gloo ranks; ``--world 1`` is the
one-process reference). ``fully_shard`` goes on the token embedding, on each block, on the output
head (or on the embedding and the head together when they are tied: FSDP2 wants a tied
parameter in one group) and then on the root. Each layout trains, bakes into its FSDP2 groups
(`bake_fully_sharded`), evaluates and trains on; every rank saves what the test compares.
``ddp-*`` layouts train under DDP instead. A layout that raises saves its error, so that the
others still run.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.multiprocessing.spawn import spawn
from torch.nn.parallel import DistributedDataParallel

from embedding_constraint import bake, fix_rows
from embedding_constraint.fsdp import bake_fully_sharded, prepare_fully_shard

sys.path.insert(0, str(Path(__file__).parent))

from support import in_process_group

VOCAB, DIM = 10, 4
WORLD, BATCH, STEPS, MORE = 2, 4, 3, 2  # BATCH per rank; one process takes WORLD * BATCH
ROWS = [9, 0, 4, 2, 7, 5]  # the embedding's fixed rows, scattered
HEAD_ROWS = [8, 3]  # the untied head's
# Baked by `bake` (which hands a sharded module to `bake_fully_sharded`); the others by
# `bake_fully_sharded` itself.
PLAIN_BAKE = {"untied-keep", "tied-keep"}
# name: (tie, reshard_after_forward, prepare_fully_shard, fixed rows of the embedding)
LAYOUTS: dict[str, tuple[bool, bool, bool, list[int]]] = {
    "untied-reshard": (False, True, True, ROWS),
    "untied-keep": (False, False, False, ROWS),
    "tied-reshard": (True, True, False, ROWS),
    "tied-keep": (True, False, True, ROWS),
    "no-row-fixed": (False, True, True, []),
    "every-row-fixed": (False, True, True, list(range(VOCAB))),
    "ddp-no-row-fixed": (False, True, False, []),
    "ddp-every-row-fixed": (False, True, False, list(range(VOCAB))),
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, DIM)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + torch.tanh(self.linear(hidden))


class Titan(nn.Module):
    """A token embedding, blocks and an output head, named as torchtitan names them."""

    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(), Block()])
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.tok_embeddings(tokens)
        for layer in self.layers:
            hidden = layer(hidden)
        logits = self.output(hidden[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def references(layout: str) -> dict[str, Tensor]:
    """The fixed rows' values: one generator, so every process draws the same."""
    generator = torch.Generator().manual_seed(7)
    fixed = LAYOUTS[layout][3]
    return {
        "tok_embeddings.weight": torch.randn(len(fixed), DIM, generator=generator),
        "output.weight": torch.randn(len(HEAD_ROWS), DIM, generator=generator),
    }


def build(layout: str) -> Titan:
    tie, _, _, rows = LAYOUTS[layout]
    torch.manual_seed(0)
    model = Titan(tie)
    refs = references(layout)
    fix_rows(model, refs["tok_embeddings.weight"], name="tok_embeddings.weight", rows=rows)
    if not tie:
        fix_rows(model.output, refs["output.weight"], rows=HEAD_ROWS)
    return model


def batches(steps: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, WORLD * BATCH, 5), generator=generator)


def train(model: nn.Module, rank: int, world: int, steps: int, seed: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for batch in batches(steps, seed):
        local = batch[rank * BATCH : (rank + 1) * BATCH] if world > 1 else batch
        optimizer.zero_grad()
        model(local).backward()  # each rank's mean; FSDP2 and DDP average the ranks
        optimizer.step()


def evaluate(model: nn.Module, rank: int, world: int) -> float:
    """This rank's loss on its part of one batch (the mean over the ranks is one process's)."""
    (batch,) = batches(1, seed=11)
    local = batch[rank * BATCH : (rank + 1) * BATCH] if world > 1 else batch
    with torch.no_grad():
        loss = float(model(local))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # with reshard_after_forward=False the rows stay gathered
    return loss


def full_state(model: nn.Module) -> dict[str, Tensor]:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, Tensor)}


def shard(model: Titan, layout: str) -> None:
    tie, reshard, prepare, _ = LAYOUTS[layout]
    if prepare:
        prepare_fully_shard(model)
    if tie:
        fully_shard([model.tok_embeddings, model.output], reshard_after_forward=reshard)
    else:
        fully_shard(model.tok_embeddings, reshard_after_forward=reshard)
    for layer in model.layers:
        fully_shard(layer, reshard_after_forward=reshard)
    if not tie:
        fully_shard(model.output, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)


def fit(layout: str, rank: int, world: int) -> dict[str, Any]:
    """Train, bake, evaluate and train on; what the test compares."""
    model = build(layout)
    ddp = layout.startswith("ddp-")
    trained: nn.Module = model
    if world > 1 and ddp:
        trained = DistributedDataParallel(model)
    elif world > 1:
        shard(model, layout)
    train(trained, rank, world, STEPS, seed=3)
    result: dict[str, Any] = {"trained": full_state(model)}
    if world > 1 and not ddp and layout not in PLAIN_BAKE:
        bake_fully_sharded(model)
    else:
        bake(model)
        if (
            world > 1 and ddp
        ):  # DDP registered hooks on the constrained Parameters: wrap the baked ones anew
            trained = DistributedDataParallel(model)
    result["classes"] = {
        name: [c.__name__ for c in type(module).__mro__]
        for name, module in model.named_modules()
        if name in ("tok_embeddings", "output")
    }
    result["plain"] = [n for n, _ in model.named_parameters()]
    result["val_loss"] = evaluate(trained, rank, world)
    train(trained, rank, world, MORE, seed=5)
    result["after"] = full_state(model)
    return result


def fit_all(rank: int, world: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for layout in LAYOUTS:
        try:
            results[layout] = fit(layout, rank, world)
        except Exception as error:  # noqa: BLE001 - the test shows it, the others go on
            last = traceback.format_exception_only(error)[-1].strip()
            results[layout] = {"error": last}
    return results


def run_rank(rank: int, world: int, out: Path) -> None:
    def body() -> None:
        torch.save(fit_all(rank, world), out / f"rank{rank}.pt")

    in_process_group(body, "gloo", str(out / "group"), rank, world)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, choices=[1, WORLD], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.world == 1:
        torch.save(fit_all(0, 1), args.out / "rank0.pt")
        return
    spawn(run_rank, args=(WORLD, args.out), nprocs=WORLD)  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
