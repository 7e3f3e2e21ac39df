"""Train part of a weight while the rest stays exactly fixed.

`FixedRows` is a `torch.nn.utils.parametrize` parametrization; `fix_rows` and `bake`
apply and remove it with plain state dicts (`plain_keys` turns a dict of parameter names
into one); `EmbeddingConstraint` does both around a
PyTorch Lightning fit; `vocab` aligns token vocabularies and grows modules to a new one;
`check_same_on_every_rank` checks that every process holds the same fixed rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedding_constraint import vocab
from embedding_constraint.distributed import check_same_on_every_rank
from embedding_constraint.fix_rows import bake, fix_rows, is_fixed
from embedding_constraint.fixed_rows import FixedRows
from embedding_constraint.state_dict import plain_keys

if TYPE_CHECKING:
    from embedding_constraint.callback import EmbeddingConstraint

__all__ = [
    "EmbeddingConstraint",
    "FixedRows",
    "bake",
    "check_same_on_every_rank",
    "fix_rows",
    "is_fixed",
    "plain_keys",
    "vocab",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The callback needs pytorch_lightning, an optional dependency: import it on first use.
    if name == "EmbeddingConstraint":
        from embedding_constraint.callback import EmbeddingConstraint

        return EmbeddingConstraint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
