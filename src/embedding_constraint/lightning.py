"""`EmbeddingConstraint` for ``lightning.pytorch`` (``import lightning as L``).

The same callback as ``embedding_constraint.EmbeddingConstraint``, for the Trainer of the
``lightning`` package, whose ``Callback`` class is a different one.
"""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from embedding_constraint.callback_base import EmbeddingConstraintHooks

__all__ = ["EmbeddingConstraint"]


# To mypy the mixin is a `pytorch_lightning` Callback (see callback_base.py): every hook of
# the two `Callback` classes differs in its `Trainer` type only, the one ignore on this line.
class EmbeddingConstraint(EmbeddingConstraintHooks, Callback):  # type: ignore[misc]
    """Hold rows of ``target``'s weight at reference values while a ``lightning`` Trainer fits.

    Arguments, behaviour and errors as `embedding_constraint.EmbeddingConstraint`.
    """

    _info = staticmethod(rank_zero_info)
