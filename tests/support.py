"""Small typed accessors shared by the tests."""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.multiprocessing.spawn import spawn
from torch.nn.utils import parametrize

from embedding_constraint import FixedRows
from embedding_constraint.fixed_rows import parametrization_list

T = TypeVar("T")


def stored(module: nn.Module, name: str = "weight") -> Tensor:
    """The parameter a constrained tensor stores: its free rows."""
    original = parametrization_list(module, name).original
    assert isinstance(original, Tensor)
    return original


def constraint_of(module: nn.Module, name: str = "weight") -> FixedRows:
    """The FixedRows registered on ``module.<name>``."""
    constraint = parametrization_list(module, name)[0]
    assert isinstance(constraint, FixedRows)
    return constraint


def snapshot_tree(module: nn.Module) -> dict[str, Any]:
    """What a failed call must leave as it was: classes, parameters by identity, values."""
    return {
        "classes": [type(m) for m in module.modules()],
        "parameters": [(n, p, p.detach().clone()) for n, p in module.named_parameters()],
        "parametrized": [parametrize.is_parametrized(m) for m in module.modules()],
    }


def assert_tree_unchanged(module: nn.Module, before: dict[str, Any]) -> None:
    """``module`` and every submodule as `snapshot_tree` saw them."""
    after = snapshot_tree(module)
    assert after["classes"] == before["classes"]
    assert after["parametrized"] == before["parametrized"]
    assert [(n, p) for n, p, _ in after["parameters"]] == [
        (n, p) for n, p, _ in before["parameters"]
    ]
    for (_, _, value), (_, _, old) in zip(after["parameters"], before["parameters"], strict=True):
        assert torch.equal(value, old)


def graph_ops(out: Tensor) -> set[str]:
    """The names of the autograd nodes behind ``out``."""
    seen: set[str] = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node.name() in seen:
            continue
        seen.add(node.name())
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


def in_process_group(body: Callable[[], T], backend: str, store: str, rank: int, world: int) -> T:
    """Run ``body`` in a process group, then tear the group down cleanly on every rank.

    Everything ``body`` built (DDP reducers, FSDP states, DTensors: all hold the group) is freed
    before ``destroy_process_group``, and no rank destroys its group while another still talks
    to it. Freed later, at interpreter exit, gloo's threads aborted a rank once ("terminate
    called without an active exception"); freed after the destroy, a destructor hung once.
    """
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = body()
        gc.collect()  # cycles through modules and their hooks hold the group too
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return result


def _save_rank(rank: int, fit_all: Callable[[int, int], Any], world: int, out: Path) -> None:
    def body() -> None:
        torch.save(fit_all(rank, world), out / f"rank{rank}.pt")

    in_process_group(body, "gloo", str(out / "group"), rank, world)


def script_main(fit_all: Callable[[int, int], Any], world: int) -> None:
    """Be a fit script's ``main``: ``--world 1`` runs ``fit_all(0, 1)`` here, ``--world N`` spawns.

    Each rank saves what ``fit_all(rank, world)`` returns to ``--out/rank{rank}.pt``, for the
    test to compare; the spawned ranks share one gloo group.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, choices=[1, world], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.world == 1:
        torch.save(fit_all(0, 1), args.out / "rank0.pt")
        return
    spawn(_save_rank, args=(fit_all, world, args.out), nprocs=world)  # type: ignore[no-untyped-call]
