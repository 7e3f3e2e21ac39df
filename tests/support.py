"""Small typed accessors shared by the tests."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
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
