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
        TypeError: ``target`` is not a supported module, ``constraint`` is neither a tensor
            nor a module of ``target``'s class or is not floating-point, ``rows`` is not
            integers, or ``shard_reference`` is not a bool.
        ValueError: the reference does not fit ``target`` (0-d, on the meta device, other
            row shape, more rows than ``target``, NaN/Inf or too large for ``target``'s
            dtype), ``rows`` do not fit (count, duplicates, past ``target``'s rows),
            ``target`` is already constrained (by `fix_rows`), uses ``sparse=True`` or
            ``max_norm``, or only one of them has a bias. At ``setup`` on several processes:
            the ranks hold different references or fixed rows (`check_same_on_every_rank`).
        RuntimeError: at ``setup``, when the strategy flattens parameters into shards of
            its own (``FSDPStrategy``, XLA's FSDP) or is DeepSpeed at ZeRO stage 3;
            ``ModelParallelStrategy`` (FSDP2) and DeepSpeed at stages 0 to 2 are supported.

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
