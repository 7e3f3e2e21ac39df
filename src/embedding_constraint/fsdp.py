"""FSDP2 (``torch.distributed.fsdp.fully_shard``): shard the reference, bake a sharded weight.

A constrained module trains under ``fully_shard`` as it is: FSDP2 shards the stored free rows
like any parameter, gathers them for the module's forward, where the fast reads run, and
outside it `FixedRows` reads them as a ``DTensor`` of the plain weight. Its reference is then a
plain tensor, whole on every rank. `prepare_fully_shard` makes it a frozen parameter instead,
so that ``fully_shard`` shards it too: a rank then holds ``1 / world_size`` of the constrained
weight at rest, as it would of an unconstrained one.

`bake_fully_sharded` is `bake` for a sharded module: the plain weight it leaves is one that
FSDP2 goes on sharding, gathering and training, in place of the parameters it managed for the
constraint.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from embedding_constraint.fix_rows import bake_unsharded, fixed_tensors, holders_of
from embedding_constraint.fixed_rows import FixedRows, gathered, parametrization_list
from embedding_constraint.torch_internals import (
    fsdp_param_group,
    fsdp_params_managing,
    replace_fsdp_params,
)

__all__ = ["bake_fully_sharded", "prepare_fully_shard"]


def prepare_fully_shard(module: nn.Module) -> nn.Module:
    r"""Ready a constrained module for ``fully_shard``: its references are sharded with it.

    Holds the reference of every `FixedRows` under ``module`` as a frozen parameter
    (``requires_grad=False``, see `FixedRows.hold_reference_as_parameter`), which
    ``fully_shard`` then shards and gathers with the free rows. Call it after `fix_rows` and
    before ``fully_shard``. Without it, training is the same and exact, but every rank keeps
    the whole reference.

    The reference gets no gradient, so an optimizer given all of ``module.parameters()``
    keeps no state for it and never changes it. Under DDP, do not call it: DDP would
    broadcast the frozen parameter when it wraps the module.

    Args:
        module (nn.Module): a module constrained with `fix_rows` (or a root above it).

    Returns:
        nn.Module: ``module``, its references held as frozen parameters.

    Raises:
        ValueError: nothing under ``module`` is constrained by `FixedRows`, or ``fully_shard``
            has sharded it already (its free rows are a ``DTensor``). Nothing is changed.

    Examples:

        >>> import torch
        >>> from torch import nn
        >>> from embedding_constraint import fix_rows
        >>> from embedding_constraint.fsdp import prepare_fully_shard
        >>> emb = prepare_fully_shard(fix_rows(nn.Embedding(5, 3), torch.zeros(2, 3)))
        >>> [(name, p.requires_grad) for name, p in emb.named_parameters()]
        [('parametrizations.weight.original', True), ('parametrizations.weight.0.reference', False)]
    """
    lists = [
        m
        for m in module.modules()
        if isinstance(m, ParametrizationList) and isinstance(m[0], FixedRows)
    ]
    constraints = [c for plist in lists for c in [plist[0]] if isinstance(c, FixedRows)]
    if any(isinstance(plist.original, DTensor) for plist in lists):
        raise ValueError(
            "Expected a module that fully_shard has not sharded yet. Got free rows that are a "
            "DTensor: FSDP2 shards the parameters it finds when it is called, so a reference "
            "made a parameter afterwards would stay whole. Call prepare_fully_shard before "
            "fully_shard."
        )
    if not constraints:
        raise ValueError(
            "Expected a module constrained with fix_rows (a FixedRows under it). Got none: "
            "call fix_rows first, then prepare_fully_shard, then fully_shard."
        )
    for constraint in constraints:  # `modules()` lists a tied constraint once
        constraint.hold_reference_as_parameter()
    return module


def bake_fully_sharded(module: nn.Module, *, name: str | None = None) -> nn.Module:
    r"""`bake` a module that ``fully_shard`` has sharded: FSDP2 goes on managing the weight.

    `bake` calls it for a module that FSDP2 manages: torch's plain removal would leave a
    ``DTensor`` weight that FSDP2 does not know (it manages the constraint's parameters), so
    the module's next forward would fail. Here the plain weight takes their place in their
    FSDP2 group, whichever module ``fully_shard`` was called on (the constrained module
    itself, a parent, the embedding and its tied head together): a new parameter, sharded as
    FSDP2 shards any, that the next forward gathers and the next backward reduce-scatters, so
    the module trains, evaluates and saves as one that was never constrained; the module keeps
    the class FSDP2 gave it, less the parametrization's (``FSDPEmbedding``). Create a new
    optimizer afterwards.

    Every rank must call it (the weight is gathered whole once), outside a forward and
    backward. A tensor whose free rows are not sharded is baked by `bake`.

    Args:
        module (nn.Module): the module that ``fully_shard`` was called on, or a root above it.
        name (str, optional): the constrained parameter, dotted under ``module``. Default:
            ``None``, every constrained tensor under ``module``.

    Returns:
        nn.Module: ``module``, with plain, sharded parameters in place.

    Raises:
        ValueError: nothing under ``module`` is constrained, or no FSDP2 group under
            ``module`` manages a constrained tensor whose free rows are sharded (``module``
            is below the module that ``fully_shard`` was called on: pass that one).
    """
    names = [name] if name is not None else [n for n, _ in fixed_tensors(module)]
    if not names:
        raise ValueError("Expected a tensor constrained by fix_rows under `module`. Got none.")
    for fsdp_module in module.modules():
        if isinstance(fsdp_module, FSDPModule):
            # A forward without a backward (an evaluation) with reshard_after_forward=False
            # leaves the rows gathered, as plain tensors: the shards are what FSDP2 manages.
            fsdp_module.reshard()
    plans = [_bake_plan(module, n) for n in names]  # every check before any change
    for plan in plans:
        if plan is None:
            continue
        _replace_in_group(module, *plan)
    for n in names:  # what is left: not sharded (a sharer of a baked tensor is gone already)
        owner_name, _, attr = n.rpartition(".")
        if parametrize.is_parametrized(module.get_submodule(owner_name), attr):
            bake_unsharded(module, name=n)
    return module


# A group, the FSDPParams it keeps for one constraint's stored rows (and reference), the name.
_Plan = tuple[object, list[object], str]


def _bake_plan(module: nn.Module, name: str) -> _Plan | None:
    """Find the FSDP2 group that manages ``name``'s constraint; None if it is not sharded."""
    owner_name, _, attr = name.rpartition(".")
    plist = parametrization_list(module.get_submodule(owner_name), attr)
    constraint, free = plist[0], plist.original
    assert isinstance(constraint, FixedRows)
    if not isinstance(free, DTensor):
        return None
    managed = [free, constraint.reference]
    for fsdp_module in module.modules():
        if not isinstance(fsdp_module, FSDPModule):
            continue
        group = fsdp_param_group(fsdp_module)  # one per fully_shard call
        if group is None:
            continue
        found = fsdp_params_managing(group, managed)
        if found:
            return group, found, name
    raise ValueError(
        f"Expected an FSDP2 group under `module` that manages {name!r}. Got none: its free rows "
        "are sharded by a fully_shard call on a module above `module`. Pass that module."
    )


def _replace_in_group(module: nn.Module, group: object, stale: list[object], name: str) -> None:
    """Bake ``name`` and put its plain weight in the group instead of the ``stale`` params."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    plist = parametrization_list(owner, attr)
    requires_grad = plist.original.requires_grad
    with torch.no_grad():
        whole = gathered(plist()).clone()
    bake_unsharded(module, name=name)  # the tied holders share the baked Parameter
    baked = owner._parameters[attr]
    assert baked is not None  # `bake` put the Parameter back
    holders = holders_of(module, baked)
    weight = nn.Parameter(whole, requires_grad=requires_grad)
    for holder, holder_attr in holders:
        holder._parameters[holder_attr] = weight
    replace_fsdp_params(group, stale, weight, holders, name)  # shards it on every holder
