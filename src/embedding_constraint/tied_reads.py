"""`shared_read`: the holders of one tied tensor read the same object, as with a plain tie.

A plain tied weight is one Parameter, so ``embed.weight is head.weight``, and other libraries
find ties that way: accelerate's FSDP2 preparation compares the embedding's and the head's
weights with ``is`` (and shards them apart otherwise), PEFT's merge compares their
``data_ptr()`` (and marks the model untied otherwise). A constrained tensor is built at each
read. So a read that one holder of a tie made is handed to each other holder of it that reads
while that read is alive and still interchangeable with a read made now, once: a holder that
had it already gets a read built anew, as every read was before. Only the tie becomes visible,
in either order: ``embed.weight is head.weight`` and ``head.weight is embed.weight``.

Interchangeable means, checked at each hand-over against a read made now:

- the same kind of tensor: type, shape, dtype, device, ``requires_grad`` and inference mode
  (a read made under ``no_grad`` has no graph; one made before the rows were frozen has one);
- made from the same stored rows and reference (the same tensor objects), so that its graph
  leads where the new one's would;
- its graph not yet run backward through (a hook on its node forgets it then): a graph serves
  one backward, as each forward's own read does;
- equal values (``torch.equal``; on the meta device, which has none, the shapes): a write that
  no version counter sees (through ``.data``, as FSDP2's and DeepSpeed's copies write) cannot
  make it stale.

Only weak references are kept, in a table keyed by the parametrization that the holders share,
which a deep copy does not share: no memory is held, and a copy's reads are its own. Nothing is
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
    """A read of a tied tensor, by weak reference, and what it was made from."""

    tensor: weakref.ref[Tensor]
    readers: weakref.WeakSet[nn.Module]  # the holders it was handed to, its maker first
    free: weakref.ref[Tensor]
    reference: weakref.ref[Tensor]
    spent: bool = False  # a backward ran through its graph


_READS: weakref.WeakKeyDictionary[ParametrizationList, _Read] = weakref.WeakKeyDictionary()


def shared_read(
    module: nn.Module, plist: ParametrizationList, read: Callable[[], Tensor]
) -> Tensor:
    """Return ``read()``, or an alive read of ``plist``'s tensor by another holder that is
    interchangeable with it (see the module docstring)."""
    if torch.compiler.is_compiling() or functorch_transform_active() or fsdp_managed(module):
        return read()
    fresh = read()
    if sharded(fresh) or forward_ad.unpack_dual(fresh).tangent is not None:  # type: ignore[no-untyped-call]
        return fresh
    earlier = _READS.get(plist)
    if earlier is not None and module not in earlier.readers:
        tensor = earlier.tensor()
        if tensor is not None and _interchangeable(earlier, tensor, fresh, plist):
            earlier.readers.add(module)
            return tensor
    _remember(module, plist, fresh)
    return fresh


def _interchangeable(
    earlier: _Read, tensor: Tensor, fresh: Tensor, plist: ParametrizationList
) -> bool:
    """Whether ``tensor`` (``earlier``'s read) may stand for ``fresh``, a read made now."""
    if (
        earlier.spent
        or earlier.free() is not plist.original
        or earlier.reference() is not _constraint(plist).reference
        or type(tensor) is not type(fresh)
        or tensor.shape != fresh.shape
        or tensor.dtype != fresh.dtype
        or tensor.device != fresh.device
        or tensor.requires_grad != fresh.requires_grad
        or tensor.is_inference() != fresh.is_inference()
    ):
        return False
    if fresh.is_meta:
        return True
    return torch.equal(tensor, fresh)


def _constraint(plist: ParametrizationList) -> FixedRows:
    constraint = plist[0]
    assert isinstance(constraint, FixedRows)
    return constraint


def _remember(module: nn.Module, plist: ParametrizationList, fresh: Tensor) -> None:
    free = plist.original
    reference = _constraint(plist).reference
    entry = _Read(
        weakref.ref(fresh), weakref.WeakSet([module]), weakref.ref(free), weakref.ref(reference)
    )
    node = fresh.grad_fn
    if node is not None:

        def forget(grad_outputs: object) -> None:
            entry.spent = True

        node.register_prehook(forget)
    _READS[plist] = entry
