"""Fast reads of a constrained weight: each module kind reads it without assembling it.

One room per read path: `lookup` (``nn.Embedding``), `bag` (``nn.EmbeddingBag``) and `head`
(``nn.Linear``). Each holds its read, its autograd function and the module forward that
`fix_rows` installs. Every read equals the plain read (the module's own forward over
`FixedRows.forward`) in values, gradients and double gradients; it steps aside for that
plain read under torch.func transforms and forward-mode AD and on FSDP2's sharded ``DTensor``
rows (inside an FSDP2 forward the rows are gathered, plain tensors, and the fast reads run), and
the differential tests
(``tests/test_harness.py``) compare the two for each path.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from embedding_constraint.reads.bag import embedding_bag_forward
from embedding_constraint.reads.head import linear_forward
from embedding_constraint.reads.lookup import embedding_forward

__all__ = ["FAST_FORWARDS"]

# The forward that `fix_rows` installs for a constrained weight, by the module's own class.
FAST_FORWARDS: dict[type[nn.Module], Any] = {
    nn.Embedding: embedding_forward,
    nn.EmbeddingBag: embedding_bag_forward,
    nn.Linear: linear_forward,
}
