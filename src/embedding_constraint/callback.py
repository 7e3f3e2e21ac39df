"""`EmbeddingConstraint` for ``pytorch_lightning``: fix rows of a module for the length of a fit."""

from __future__ import annotations

from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info

from embedding_constraint.callback_base import EmbeddingConstraintHooks

__all__ = ["EmbeddingConstraint"]


class EmbeddingConstraint(EmbeddingConstraintHooks, Callback):
    r"""Hold rows of ``target``'s weight at reference values while a Trainer fits the rest.

    Registers `fix_rows` in ``setup`` (before the optimizers and
    DDP see the module) and bakes a plain weight at the end of the fit, also when it fails.
    During the fit, checkpoints hold plain state dicts, and resuming from one works.

    The hooks refuse what the constraint cannot hold exactly (each hook's docstring lists
    its cases). ``setup``: ``FSDPStrategy`` and XLA's FSDP (``RuntimeError``;
    ``ModelParallelStrategy`` (FSDP2) and DeepSpeed at every ZeRO stage are supported),
    a ``target`` outside the LightningModule, a second
    callback on the same tensor, a weight-averaging callback listed before this one, and
    ranks that hold different references or fixed rows (``ValueError``).
    ``on_load_checkpoint``, ``load_state_dict`` and ``on_fit_start``: a checkpoint saved
    without the constraint or with other fixed rows, a one-file checkpoint under
    ``ModelParallelStrategy``, and a target replaced after ``setup`` (``RuntimeError``).
    After a DeepSpeed fit at ZeRO stage 1 to 3, ``trainer.save_checkpoint`` from its
    engine, which holds the stored rows the bake replaced (``RuntimeError``).

    Args:
        target (nn.Module): the ``nn.Embedding``, ``nn.EmbeddingBag`` or ``nn.Linear`` being
            trained; a submodule of the LightningModule passed to ``fit``.
        constraint (Tensor or nn.Module): the reference rows, or a module of ``target``'s class
            whose weight (and bias, for ``nn.Linear``) are the reference, copied now (into host
            memory; `setup` copies it into the module once per fit).
        rows (Tensor or sequence of int, optional): positions of the fixed rows, one per
            reference row. Default: ``None``, the first rows.
        shard_reference (bool, optional): under ``ModelParallelStrategy`` (FSDP2), shard the
            reference with the free rows, so a rank holds ``1 / world_size`` of it and FSDP2
            gathers it each forward (see `embedding_constraint.fsdp.prepare_fully_shard`);
            ``False`` keeps it whole on every rank, and nothing of it is sent. Ignored by
            other strategies. Default: ``True``.

    Raises:
        TypeError: ``target`` is not an ``nn.Embedding``, ``nn.EmbeddingBag`` or ``nn.Linear``,
            or its weight is not floating-point or is a sharded ``DTensor`` (``fully_shard``
            ran first); ``constraint`` is neither a tensor nor a module of ``target``'s class
            (a module constrained by `fix_rows` is of another class: `bake` it), or is not
            floating-point; ``rows`` is neither an integer tensor nor a sequence of ints;
            ``shard_reference`` is not a bool.
        ValueError: the reference (``constraint``, or each of its parameters) is 0-d or on the
            meta device, has rows of another shape than ``target``'s or more rows than
            ``target``, or holds NaN, Inf or a value too large for ``target``'s dtype; a
            ``constraint`` module has more rows than ``target`` (the arguments swapped), or
            only one of the two has a bias; ``rows`` is not 1-D, does not give one position
            per reference row, is negative, has duplicates or goes past ``target``'s last
            row; ``target``'s weight or bias is already constrained (by `fix_rows`: `bake` it
            first) or on the meta device, or ``target`` uses ``sparse=True`` or ``max_norm``.

    Examples:

        >>> import torch
        >>> from torch import nn
        >>> from embedding_constraint import EmbeddingConstraint
        >>> old, new = nn.Embedding(4, 2), nn.Embedding(6, 2)
        >>> constraint = EmbeddingConstraint(new, old)
        >>> constraint.references["weight"].shape
        torch.Size([4, 2])
    """

    _info = staticmethod(rank_zero_info)
