"""`EmbeddingConstraint` for ``lightning.pytorch`` (``import lightning as L``).

The same callback as ``embedding_constraint.EmbeddingConstraint``, for the Trainer of the
``lightning`` package, whose ``Callback`` class is a different one.
"""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from embedding_constraint.callback_base import EmbeddingConstraintHooks

__all__ = ["EmbeddingConstraint"]


class EmbeddingConstraint(EmbeddingConstraintHooks, Callback):
    """Hold rows of ``target``'s weight at reference values while a ``lightning`` Trainer fits.

    Arguments and behaviour as `embedding_constraint.EmbeddingConstraint`.
    """

    _info = staticmethod(rank_zero_info)
