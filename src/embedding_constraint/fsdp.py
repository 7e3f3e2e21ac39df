"""FSDP2 (``torch.distributed.fsdp.fully_shard``): shard the reference with the free rows.

A constrained module trains under ``fully_shard`` as it is: FSDP2 shards the stored free rows
like any parameter, gathers them for the module's forward, where the fast reads run, and
outside it `FixedRows` reads them as a ``DTensor`` of the plain weight. Its reference is then a
plain tensor, whole on every rank. `prepare_fully_shard` makes it a frozen parameter instead,
so that ``fully_shard`` shards it too: a rank then holds ``1 / world_size`` of the constrained
weight at rest, as it would of an unconstrained one.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.utils.parametrize import ParametrizationList

from embedding_constraint.fixed_rows import FixedRows

__all__ = ["prepare_fully_shard"]


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
