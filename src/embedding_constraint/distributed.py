"""Checks for constrained modules on several processes: the same fixed rows on every rank.

DDP broadcasts rank 0's parameters when it wraps a module, but a `FixedRows` reference is no
parameter: each rank keeps the one it was given. `check_same_on_every_rank` compares every
rank's references and fixed row positions in one collective, and refuses a module that
`fix_rows` constrained after ``DistributedDataParallel`` had recorded its parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from embedding_constraint.fix_rows import fixed_tensors, owner_of
from embedding_constraint.fixed_rows import FixedRows, parametrization_list, sharded
from embedding_constraint.torch_internals import ddp_recorded_parameter_bytes

__all__ = ["check_same_on_every_rank"]

# A prime below 2**31: a byte times a position weight below it stays below 2**39, so a chunk of
# 2**20 such products sums below 2**59, inside int64 (no overflow, so the sums are exact).
_PRIME = 2**31 - 1
_CHUNK = 2**20

# What one tensor's record holds, in order, for messages: (dtype, shape, fingerprint).
_Record = tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]


def _fingerprint(tensor: Tensor) -> tuple[int, ...]:
    """An exact checksum of ``tensor``'s bytes, computed where the tensor lives.

    The bytes are read as a matrix, one row per element: the sum of each column (a byte
    position inside the element) is exact, so any difference in a single element, down to one
    bit (``0.0`` and ``-0.0`` too), changes one of the sums. A sum weighted by each byte's
    position (modulo a prime) also tells apart most differences spread over several elements,
    such as rows in another order, which the column sums cannot see.
    """
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    width = tensor.element_size()
    columns = data.reshape(-1, width).sum(0, dtype=torch.int64)
    weighted = torch.zeros((), dtype=torch.int64, device=data.device)
    for start in range(0, data.numel(), _CHUNK):
        chunk = data[start : start + _CHUNK].to(torch.int64)
        place = torch.arange(start, start + chunk.numel(), device=data.device)
        weighted = (weighted + (chunk * (place % (_PRIME - 1) + 1)).sum()) % _PRIME
    return (*columns.tolist(), int(weighted))


def _record(constraint: FixedRows) -> _Record:
    """What must be equal on every rank for one tensor: its reference, and its fixed rows."""
    reference, rows = constraint.reference, constraint.fixed_row_indices()
    return (
        (str(reference.dtype), tuple(reference.shape), _fingerprint(reference)),
        (str(rows.dtype), tuple(rows.shape), _fingerprint(rows)),
    )


def _compared(module: nn.Module) -> dict[str, _Record]:
    """Each constrained tensor under ``module`` whose fixed rows every rank must hold alike.

    A tensor already sharded (a ``DTensor`` reference or free rows: FSDP2 after
    ``fully_shard``, tensor parallelism) is left out: its ranks hold different parts of it by
    design.
    """
    compared = {}
    for name, constraint in fixed_tensors(module):
        original = parametrization_list(*owner_of(module, name)).original
        if not sharded(constraint.reference, original):
            compared[name] = _record(constraint)
    return compared


def _reduced_bytes(ddp: DistributedDataParallel) -> int:
    """The bytes of the parameters that DDP all-reduces, chosen as DDP chooses them.

    The same rule as ``DistributedDataParallel._build_params_for_reducer``: each parameter
    that requires a gradient and is not in ``parameters_to_ignore``, once.
    """
    seen: set[int] = set()
    total = 0
    for module_name, owner in ddp.module.named_modules():
        for name, param in owner.named_parameters(recurse=False):
            full = f"{module_name}.{name}"
            if (
                param.requires_grad
                and full not in ddp.parameters_to_ignore
                and id(param) not in seen
            ):
                seen.add(id(param))
                total += param.numel() * param.element_size()
    return total


def _constrained_after_ddp(module: nn.Module) -> list[str]:
    """A message for each ``DistributedDataParallel`` under ``module`` (itself included) whose
    constrained tensors were constrained after it wrapped them.

    `fix_rows` keeps the Parameter object and shrinks it to the free rows, so DDP still holds
    it, with buckets sized for the full weight: DDP then no longer all-reduces its gradient.
    DDP keeps no public record of the sizes it was built for; the byte count it logs when it is
    built (`ddp_recorded_parameter_bytes`, from DDP's logging data) is compared with what its
    parameters hold now. (Any other change to DDP's parameters after it was built, which DDP
    does not support either, shows too.)
    """
    problems = []
    for ddp in module.modules():
        if not isinstance(ddp, DistributedDataParallel):
            continue
        names = [name for name, _ in fixed_tensors(ddp.module)]
        recorded = ddp_recorded_parameter_bytes(ddp) if names else None
        if recorded is None:
            continue
        now = _reduced_bytes(ddp)
        if recorded != now:
            problems.append(
                f"Expected {names} to be constrained before DistributedDataParallel wrapped the "
                f"module. Got a DistributedDataParallel built for {recorded} bytes of "
                f"parameters, which now hold {now}: fix_rows shrank each weight to its free rows "
                "after DDP had recorded it, so DDP would not all-reduce their gradients (silently "
                "with find_unused_parameters=True, otherwise failing with 'Expected to have "
                "finished reduction'). Constrain first, then wrap: fix_rows(module, ...), then "
                "DistributedDataParallel(module)."
            )
    return problems


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {list(ranks)}"


def _mismatches(gathered: Sequence[dict[str, _Record]]) -> list[str]:
    """A message for each way the ranks' records differ from rank 0's."""
    first = gathered[0]
    other_names = [r for r, records in enumerate(gathered) if list(records) != list(first)]
    if other_names:
        shown = {r: list(gathered[r]) for r in [0, *other_names]}
        return [
            "Expected the same tensors constrained by fix_rows on every rank. Got "
            + ", ".join(f"{names} on rank {r}" for r, names in shown.items())
            + ": constrain the same tensors on every rank."
        ]
    advice = (
        (
            "build it the same way on every rank (the same seed, the same file), or broadcast "
            "rank 0's (torch.distributed.broadcast) before fix_rows"
        ),
        "pass the same rows= on every rank",
    )
    problems = []
    for name, pair in first.items():
        for index, what in enumerate(["reference (the fixed rows' values)", "fixed row positions"]):
            mine = pair[index]
            differ = [r for r, records in enumerate(gathered) if records[name][index] != mine]
            if not differ:
                continue
            shapes = sorted({gathered[r][name][index][1] for r in differ})
            how = "" if shapes == [mine[1]] else f" (of shape {shapes}; rank 0's: {mine[1]})"
            problems.append(
                f"Expected {name!r} to have the same {what} on every rank. Got "
                f"{_ranks(differ)} differing from rank 0{how}: {advice[index]}."
            )
    return problems


def check_same_on_every_rank(module: nn.Module, *, group: dist.ProcessGroup | None = None) -> None:
    """Raise on every rank unless every rank holds the same fixed rows under ``module``.

    For each tensor under ``module`` constrained by `fix_rows`, compares the reference and the
    fixed rows' positions of every rank of ``group``, bit for bit (an exact checksum of their
    bytes, computed on their device), with one ``all_gather_object``: a gathered object, rather
    than a tensor, because the ranks may hold different numbers of constrained tensors. DDP
    makes the parameters equal when it wraps the module, but the reference is none: a
    reference built from a per-rank seed or file would otherwise stay apart for the whole run.

    It also refuses ``module`` when it is (or holds) a ``DistributedDataParallel`` that wrapped
    a tensor before `fix_rows` constrained it: DDP would not all-reduce its gradient. Pass the
    DDP model itself for this check; the module inside it cannot tell. Tensors already sharded
    (FSDP2 after ``fully_shard``, tensor parallelism) are not compared: call it before.

    Every rank of ``group`` must call it. Does nothing when ``torch.distributed`` is not
    initialized; with one rank, only the DDP check runs.

    Args:
        module (nn.Module): the model, or the ``DistributedDataParallel`` around it.
        group (ProcessGroup, optional): the ranks that must agree; ranks in messages are ranks
            in it. Default: ``None``, the default group.

    Raises:
        ValueError: on every rank, naming the tensor and the ranks that differ from rank 0: a
            rank's reference or fixed rows differ, a tensor is constrained on some ranks only,
            or a ``DistributedDataParallel`` under ``module`` wrapped a tensor before it was
            constrained.

    Examples:

        >>> import torch
        >>> from torch import nn
        >>> from embedding_constraint import check_same_on_every_rank, fix_rows
        >>> emb = fix_rows(nn.Embedding(5, 3), torch.zeros(2, 3))
        >>> check_same_on_every_rank(emb)  # one process: nothing to compare
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be a torch.nn.Module. Got {type(module).__name__}.")
    if not (dist.is_available() and dist.is_initialized()):
        return
    problems = _constrained_after_ddp(module)
    world = dist.get_world_size(group)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (_compared(module), problems), group=group)
        # Every rank sees every rank's records and problems, and so raises the same error.
        reported: dict[str, list[int]] = {}
        for rank, (_, theirs) in enumerate(gathered):
            for problem in theirs:
                reported.setdefault(problem, []).append(rank)
        problems = [
            p if len(ranks) == world else f"On {_ranks(ranks)}: {p}"
            for p, ranks in reported.items()
        ]
        problems += _mismatches([mine for mine, _ in gathered])
    if problems:
        raise ValueError(" ".join(problems))
