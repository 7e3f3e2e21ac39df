"""`shared_read`: the holders of one tied tensor read the same object, as with a plain tie.

A plain tied weight is one Parameter, so ``embed.weight is head.weight``, and other libraries
find ties that way: accelerate's FSDP2 preparation compares the embedding's and the head's
weights with ``is`` (and shards them apart otherwise), PEFT's merge compares their
``data_ptr()`` (and marks the model untied otherwise). A constrained tensor is built at each
read. So a read is handed to every holder of the tensor (the one that made it too) that reads
while it is alive and still interchangeable with a read made now, as a plain Parameter is the
same object at each read: ``embed.weight is head.weight`` in either order, and while one
holder's earlier read is held. Interchangeable means, checked at each hand-over against a read
made now:

- the same kind of tensor: type, shape, dtype, device, ``requires_grad`` and inference mode
  (a read made under ``no_grad`` has no graph; one made before the rows were frozen has one);
- made from the same stored rows and reference (the same tensor objects), so that its graph
  leads where the new one's would, and not written in place since (its version counter: an
  in-place operation in grad mode would be part of its graph);
- its graph not yet run backward through (a hook on its node marks it): the next forward
  gets a graph of its own, as it would from a fresh read;
- equal values (``torch.equal``; on the meta device, which has none, the shapes): a write that
  no version counter sees (through ``.data``, as FSDP2's and DeepSpeed's copies write) cannot
  make it stale. A weight holding NaN never compares equal: each read is then built anew.

The read's own graph saves no tensor (``cat``, or `FixedRows`' scatter, which keeps its index
table on the autograd context), so the losses of several holders of one read can each run
backward, as they can on a leaf Parameter.

Only a weak reference to the read is kept, in a table keyed by the parametrization that the
holders share, which a deep copy does not share: no memory is held, and a copy's reads are
its own. Nothing is
handed on under ``torch.compile``, ``torch.func`` transforms and forward-mode AD (their tensors
live in one trace), for FSDP2's modules and its DTensors (a read there is a collective that
every rank must make alike).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.utils.parametrize import ParametrizationList

from embedding_constraint.fixed_rows import FixedRows, sharded
from embedding_constraint.torch_internals import fsdp_managed, functorch_transform_active

__all__ = ["shared_read"]


@dataclass
class _Read:
    """A read, by weak reference, and what it was made from."""

    tensor: weakref.ref[Tensor]
    version: int  # the read's version counter when it was made
    # The ``id`` of the stored rows and of the reference it was made from. Not weak
    # references: ``torch.utils.swap_tensors`` (``.to()`` in torch's swap mode) refuses a
    # tensor that has one. While a read with a graph is alive, its graph holds the stored
    # rows, so their id cannot pass to another tensor; a read without one is compared by
    # its values.
    free: int
    reference: int
    spent: bool = False  # a backward ran through its graph


_READS: weakref.WeakKeyDictionary[ParametrizationList, _Read] = weakref.WeakKeyDictionary()


def shared_read(
    module: nn.Module, plist: ParametrizationList, read: Callable[[], Tensor]
) -> Tensor:
    """Return ``read()``, or an alive earlier read of ``plist``'s tensor (by ``module`` or
    another holder) that is interchangeable with it (see the module docstring)."""
    if torch.compiler.is_compiling() or functorch_transform_active() or fsdp_managed(module):
        return read()
    fresh = read()
    if sharded(fresh) or forward_ad.unpack_dual(fresh).tangent is not None:  # type: ignore[no-untyped-call]
        return fresh
    earlier = _READS.get(plist)
    tensor = None if earlier is None else earlier.tensor()
    if (
        earlier is not None
        and tensor is not None
        and _interchangeable(earlier, tensor, fresh, plist)
    ):
        return tensor
    _remember(plist, fresh)
    return fresh


def _interchangeable(
    earlier: _Read, tensor: Tensor, fresh: Tensor, plist: ParametrizationList
) -> bool:
    """Whether ``tensor`` (``earlier``'s read) may stand for ``fresh``, a read made now."""
    if (
        earlier.spent
        or _version(tensor) != earlier.version
        or earlier.free != id(plist.original)
        or earlier.reference != id(_constraint(plist).reference)
        or type(tensor) is not type(fresh)
        or tensor.shape != fresh.shape
        or tensor.dtype != fresh.dtype
        or tensor.device != fresh.device
        or tensor.requires_grad != fresh.requires_grad
        or tensor.is_inference() != fresh.is_inference()
    ):
        return False
    return fresh.is_meta or torch.equal(tensor, fresh)


def _version(tensor: Tensor) -> int:
    """``tensor``'s version counter; -1 for an inference tensor, which keeps none (and has no
    graph that a write could join: the values' comparison covers its writes)."""
    return -1 if tensor.is_inference() else tensor._version


def _constraint(plist: ParametrizationList) -> FixedRows:
    constraint = plist[0]
    assert isinstance(constraint, FixedRows)
    return constraint


def _remember(plist: ParametrizationList, fresh: Tensor) -> None:
    entry = _Read(
        weakref.ref(fresh),
        _version(fresh),
        id(plist.original),
        id(_constraint(plist).reference),
    )
    node = fresh.grad_fn
    if node is not None:

        def spend(grad_outputs: object) -> None:
            entry.spent = True

        node.register_prehook(spend)
    _READS[plist] = entry
