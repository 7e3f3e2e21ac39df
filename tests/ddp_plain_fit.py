"""Train a tiny LM with a tied head under plain PyTorch DDP, then bake it and train on.

Run by tests/test_ddp.py as a script (``--world 2`` spawns 2 gloo ranks; ``--world 1`` is the
one-process reference, fed each global batch whole). The head's weight is the embedding's
Parameter; `fix_rows` constrains it once from the root (``name="embedding.weight"``), before
`DistributedDataParallel` wraps the model. Each layout trains with AdamW, bakes, and trains on
under a new DDP (DDP's hooks sit on the constrained model's Parameters); every rank saves what
the test compares. A layout that raises saves its error, so that the other still runs.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

from embedding_constraint import bake, fix_rows

sys.path.insert(0, str(Path(__file__).parent))

from support import script_main

VOCAB, DIM, SEQ = 10, 4, 5
WORLD, BATCH, STEPS, MORE = 2, 4, 3, 2  # BATCH per rank; one process takes WORLD * BATCH
FIXED = 6  # fixed rows of the tied weight
# name: where they are (None: the first FIXED rows)
LAYOUTS: dict[str, list[int] | None] = {"prefix": None, "scattered": [9, 0, 4, 2, 7, 5]}


class TiedLM(nn.Module):
    """A token embedding, one block and an output head that holds the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.block = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.embedding(tokens)
        hidden = hidden + torch.tanh(self.block(hidden))
        logits = self.head(hidden[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def reference() -> Tensor:
    """The fixed rows' values: one generator, so every process draws the same."""
    return torch.randn(FIXED, DIM, generator=torch.Generator().manual_seed(7))


def batches(steps: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, WORLD * BATCH, SEQ), generator=generator)


def train(
    model: nn.Module, tied: TiedLM, rank: int, world: int, steps: int, seed: int
) -> list[dict[str, Tensor]]:
    """AdamW on this rank's part of each batch; the tied weight's value after each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    seen = []
    for batch in batches(steps, seed):
        local = batch[rank * BATCH : (rank + 1) * BATCH] if world > 1 else batch
        optimizer.zero_grad()
        model(local).backward()  # each rank's mean; DDP averages the ranks
        optimizer.step()
        with torch.no_grad():
            seen.append(
                {
                    "embedding": tied.embedding.weight.detach().clone(),
                    "head": tied.head.weight.detach().clone(),
                }
            )
    return seen


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def plain(model: TiedLM) -> bool:
    """No parametrization left, and the head holds the embedding's plain Parameter."""
    return (
        not any(parametrize.is_parametrized(m) for m in model.modules())
        and type(model.embedding.weight) is nn.Parameter
        and model.head.weight is model.embedding.weight
    )


def fit(layout: str, rank: int, world: int) -> dict[str, Any]:
    """Constrain, train under DDP, bake, train on; what the test compares."""
    torch.manual_seed(0)
    model = TiedLM()
    fix_rows(model, reference(), name="embedding.weight", rows=LAYOUTS[layout])
    result: dict[str, Any] = {"initial": state(model)}
    trained: nn.Module = DistributedDataParallel(model) if world > 1 else model
    result["steps"] = train(trained, model, rank, world, STEPS, seed=3)
    result["tied"] = model.head.weight is model.embedding.weight
    result["trained"] = state(model)
    bake(model)
    result["plain"] = plain(model)
    result["baked"] = state(model)
    trained = DistributedDataParallel(model) if world > 1 else model
    result["more"] = train(trained, model, rank, world, MORE, seed=5)
    result["plain_after"] = plain(model)
    result["after"] = state(model)
    return result


def fit_all(rank: int, world: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for layout in LAYOUTS:
        try:
            results[layout] = fit(layout, rank, world)
        except Exception as error:  # noqa: BLE001 - the test shows it, the other goes on
            results[layout] = {"error": "".join(traceback.format_exception(error))}
    return results


if __name__ == "__main__":
    script_main(fit_all, WORLD)
