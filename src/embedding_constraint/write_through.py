"""`WriteThrough`: a constrained tensor as user code reads it, whose in-place writes reach it.

Reading ``module.weight`` of a constrained module, or its ``state_dict()`` entry, builds the full
tensor anew from the reference and the stored free rows: a plain tensor written in place
(``nn.init.normal_(emb.weight)``, ``emb.reset_parameters()``, ``emb.weight[3] = v`` under
``no_grad``, ``.data.zero_()``, timm's and YOLOv5's EMA updates through ``state_dict()``, PEFT's
``weight.data = merged``) would change that copy and nothing else. `fix_rows` hands out the full
tensor as a `WriteThrough` instead: the same values and autograd graph, one plain tensor to
every operation, but after an operation writes into it (or into a view of it) its free rows are
copied into the stored rows, and its fixed rows are set back to the reference. Writing to a fixed
row is thereby undone: the rows are held.

But for a write through ``.data`` that states what the tensor is now: an assignment
(``weight.data = merged``, as PEFT's merges do) or an in-place operator on ``.data``
(``weight.data += delta``, PEFT's LoRA merge). Where such a write changes a fixed row, holding the
row would silently lose that change (an adapter merged into old tokens), so it is refused before
anything is copied; the module keeps its values. In-place methods (``nn.init``,
``reset_parameters()``, ``.data.normal_()``) and writes into the tensor itself (EMA updates through
``state_dict()``) re-initialise or update the free rows and hold the fixed ones, as before.

What user code does to a plain weight's gradient goes to the free rows' gradient:
``register_hook`` on the tensor is a hook on the stored rows (it sees the full gradient, zero in
the fixed rows); reading or setting its ``.grad`` (``clip_grad_norm_([emb.weight])``) is refused
with the stored rows' name, since this tensor never gets one.

A copy (``clone``, ``deepcopy``, ``torch.save``, another dtype or device) is a plain tensor of
its own, as a copy of a plain weight is. Under ``torch.compile`` and ``torch.func`` transforms
the read stays a plain tensor. Under FSDP2, outside the forward, ``module.weight`` is a
``ShardedWriteThrough`` (a ``DTensor``): its in-place writes reach the stored rows' shards
(`_write_back_sharded`, one all-gather); its ``state_dict()`` entry stays a plain ``DTensor``,
as distributed checkpointing writes into such entries shard by shard.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch
from torch import Tensor
from torch._C import DisableTorchFunctionSubclass
from torch.nn.utils.parametrize import ParametrizationList
from torch.utils.hooks import RemovableHandle

from embedding_constraint.fixed_rows import FixedRows, composable_only, shard_like, sharded

__all__ = ["WriteThrough", "plain", "plain_reads", "write_through"]

W = TypeVar("W", bound=Tensor)

# In-place operators that Python spells without a trailing underscore.
_INPLACE_OPERATORS = frozenset(
    f"__i{op}__"
    for op in [
        "add",
        "sub",
        "mul",
        "matmul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "lshift",
        "rshift",
        "and",
        "or",
        "xor",
    ]
) | {"__setitem__"}
# Methods with a trailing underscore that write no values.
_NOT_WRITES = frozenset({"requires_grad_", "share_memory_", "detach_"})


def _name(func: Callable[..., Any]) -> str:
    """``func``'s name; for a property's getter or setter, ``"<property>.__get__"``."""
    name: str = getattr(func, "__name__", "")
    owner = getattr(func, "__self__", None)
    if name in ("__get__", "__set__") and owner is not None:
        return f"{getattr(owner, '__name__', '')}.{name}"
    return name


def _tensors(value: object) -> Iterator[Any]:
    """The tensors in ``value``: itself, or the items of a list or tuple."""
    if isinstance(value, list | tuple):
        for item in value:
            if isinstance(item, Tensor):
                yield item
    elif isinstance(value, Tensor):
        yield value


def _storage(tensor: Tensor) -> int:
    """The address of ``tensor``'s storage, or 0 where it has none to compare."""
    try:
        with DisableTorchFunctionSubclass():
            return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return 0


class WriteThrough(Tensor):
    """The full value of a constrained tensor; what is written into it reaches its free rows.

    Made by `write_through`. Its operations run on the plain tensor (``torch.Tensor``); their
    results are plain tensors, but for views of it (``t[5:]``, ``t.data``, ``t.detach()``),
    which write through as it does.
    """

    _source: weakref.ref[ParametrizationList]
    _view_of: WriteThrough | None  # the full tensor this one is a view of; None: itself
    _of_data: bool  # a view reached through `.data`: its in-place operators assign

    @property
    def _root(self) -> WriteThrough:
        """The full tensor: this one, or the one it is a view of (no cycle: freed at once)."""
        return self if self._view_of is None else self._view_of

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name, kind = _classify(func)
        if kind == "refused":
            self = args[0]
            if not (name == "grad.__get__" and self.retains_grad):
                raise RuntimeError(_no_grad_message(self))
        elif kind == "hook":
            return args[0]._register_hook(args[1] if len(args) > 1 else kwargs["hook"])
        with DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        written = _written(kind, args, kwargs, WriteThrough)
        for target in written:
            target._root._write_back(keep_fixed=name == "data.__set__")
        if written or kind != "read":
            return out
        # Only a view shares the memory (and `.data`, `detach()`, which autograd does not call
        # views): most results (products, lookups, sums) are not one.
        shares = name in ("data.__get__", "detach")
        if isinstance(out, Tensor) and not out._is_view() and not shares:
            return out
        return _wrap_views(out, args, kwargs, of_data=name == "data.__get__")

    def _write_back(self, *, keep_fixed: bool = False) -> None:
        """Copy this full tensor's free rows into the stored rows; set its fixed rows back.

        With ``keep_fixed`` (an assignment through ``.data``), refuse, before copying anything,
        a tensor whose fixed rows differ from the reference.
        """
        plist = self._source()
        if plist is None:  # the module is gone: nothing to write to
            return
        constraint, free = plist[0], plist.original
        assert isinstance(constraint, FixedRows)
        assert isinstance(free, Tensor)
        with DisableTorchFunctionSubclass(), torch.no_grad():
            expected = (constraint.num_fixed + free.shape[0], *free.shape[1:])
            if tuple(self.shape) != expected:
                raise ValueError(
                    f"Expected a tensor of shape {expected} written into the constrained tensor. "
                    f"Got one of shape {tuple(self.shape)}; the module keeps its values."
                )
            reference = constraint.reference_for(self)
            if keep_fixed:
                _refuse_changed_fixed_rows(self, reference, constraint)
            if constraint.free_rows is None:
                free.copy_(self[constraint.num_fixed :])
                self[: constraint.num_fixed] = reference
            else:
                free.copy_(self.index_select(0, constraint.free_rows.to(self.device)))
                self.index_copy_(0, constraint.fixed_row_indices().to(self.device), reference)

    def _register_hook(self, hook: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
        """``register_hook``: a hook on the stored rows that sees (and may return) the full
        gradient, zero in the fixed rows."""
        plist = self._source()
        if self._root is not self or plist is None:
            raise RuntimeError(
                "Expected register_hook on the constrained tensor itself. Got it on a view of it: "
                "register the hook on the whole tensor, or on its free rows, "
                "module.parametrizations.<name>.original."
            )
        free = plist.original
        assert isinstance(free, Tensor)
        source = self._source

        def on_free_rows(grad: Tensor) -> Tensor | None:
            found = source()
            if found is None:
                return None
            constraint = found[0]
            assert isinstance(constraint, FixedRows)
            full = grad.new_zeros((constraint.num_fixed + grad.shape[0], *grad.shape[1:]))
            if constraint.free_rows is None:
                full[constraint.num_fixed :] = grad
            else:
                full.index_copy_(0, constraint.free_rows.to(grad.device), grad)
            out = hook(full)
            if out is None:
                return None
            if constraint.free_rows is None:
                return out[constraint.num_fixed :]
            return out.index_select(0, constraint.free_rows.to(out.device))

        handle: RemovableHandle = free.register_hook(on_free_rows)  # type: ignore[no-untyped-call]
        return handle

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        """Printed as the plain tensor it stands for (``tensor([...])``)."""
        text: str = Tensor.__repr__(plain(self), tensor_contents=tensor_contents)  # type: ignore[call-arg, no-untyped-call]
        return text

    def __deepcopy__(self, memo: dict[int, Any]) -> Tensor:
        """A plain copy, as a plain weight's deep copy is (a snapshot, not a way to write)."""
        copied: Tensor = plain(self).__deepcopy__(memo)  # type: ignore[no-untyped-call]
        memo[id(self)] = copied
        return copied

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle (``torch.save``) as a plain tensor, so checkpoints load without this class."""
        return plain(self).__reduce_ex__(protocol)  # type: ignore[no-untyped-call]


def _assigning(operator: str) -> Callable[[WriteThrough, Any], Any]:
    """``Tensor.<operator>`` (``__iadd__``, ...), which on a view from ``.data`` assigns: the
    first half of ``weight.data += delta``, with the fixed rows checked (torch sees ``add_``)."""
    plain_operator = getattr(Tensor, operator)

    def assign(self: WriteThrough, other: Any) -> Any:
        if not getattr(self, "_of_data", False):
            return plain_operator(self, other)
        with DisableTorchFunctionSubclass():
            out = plain_operator(self, other)
        self._root._write_back(keep_fixed=True)
        return out

    assign.__name__ = operator
    return assign


# Python's augmented assignments; indexing (`data[i] = v`) writes rows, as `setitem` does.
for _operator in sorted(_INPLACE_OPERATORS - {"__setitem__"}):
    if hasattr(Tensor, _operator):
        setattr(WriteThrough, _operator, _assigning(_operator))


def _no_grad_message(tensor: WriteThrough) -> str:
    return (
        "Expected the gradient of the stored rows. Got a read of .grad on a constrained tensor "
        "(module.weight of a fix_rows module, say): it is computed from the stored free rows "
        "and never gets a gradient of its own. The gradient is on "
        "module.parametrizations.<name>.original, which module.parameters() yields: clip "
        "or inspect those (clip_grad_norm_(module.parameters(), ...))."
    )


def _refuse_changed_fixed_rows(written: Tensor, reference: Tensor, constraint: FixedRows) -> None:
    """Raise if the fixed rows of ``written`` (a plain read) differ from ``reference``."""
    rows = constraint.fixed_row_indices().to(written.device)
    changed = (written.index_select(0, rows) != reference).flatten(1).any(1)
    count = int(changed.sum())
    if count == 0:
        return
    named = rows[changed].tolist()
    shown = ", ".join(str(r) for r in named[:5]) + (", ..." if count > 5 else "")
    raise ValueError(
        "Expected a write through .data that keeps the fixed rows of the constrained tensor. "
        f"Got one that changes {count} fixed row{'s' if count > 1 else ''} (rows {shown}): a "
        "merge of an adapter on old tokens, as PEFT's merge_and_unload does. Those rows are "
        "held to the reference, so the change would be lost; nothing was written, the module "
        "keeps its values. bake(model) first (embedding_constraint.bake: the weights become "
        "plain Parameters), then merge. PEFT merges layer by layer: layers merged before this "
        "one stay merged, and merge_and_unload() after bake merges the rest."
    )


_KINDS: dict[str, str] = {}


def _kind(name: str) -> str:
    """What the operation ``name`` does to its first argument: ``"write"`` (in place),
    ``"refused"`` (its gradient), ``"hook"``, ``"set"`` (a property set) or ``"read"``."""
    if name in ("grad.__get__", "grad.__set__", "register_post_accumulate_grad_hook"):
        return "refused"
    if name == "register_hook":
        return "hook"
    underscored = name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES
    if underscored or name in _INPLACE_OPERATORS or name == "data.__set__":
        return "write"
    return "set" if name.endswith("__set__") else "read"


def _classify(func: Callable[..., Any]) -> tuple[str, str]:
    """The name of the torch function ``func`` and its `_kind`, worked out once per name."""
    name = _name(func)
    return name, _KINDS.get(name) or _KINDS.setdefault(name, _kind(name))


def _written(kind: str, args: tuple[Any, ...], kwargs: dict[str, Any], of_type: type[W]) -> list[W]:
    """The tensors of ``of_type`` that an operation of ``kind`` wrote into."""
    targets: list[object] = []
    if kind == "write":
        # The first argument (`t.add_(...)`, `torch._foreach_mul_([t], ...)`), which functions
        # that handle torch functions themselves pass by keyword (`nn.init.normal_(tensor=t)`).
        targets.extend(_tensors(args[0] if args else next(iter(kwargs.values()), None)))
    if "out" in kwargs:
        targets.extend(_tensors(kwargs["out"]))
    return [t for t in targets if isinstance(t, of_type)]


def _wrap_views(out: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, of_data: bool) -> Any:
    """``out``, with each tensor that shares a `WriteThrough` argument's memory made one too
    (reached through ``.data``: ``of_data``, or a view of such a tensor)."""
    inputs = [
        t for value in (*args, *kwargs.values()) for t in _tensors(value) if type(t) is WriteThrough
    ]
    if not inputs:
        return out
    roots = {_storage(t._root): t for t in inputs}
    roots.pop(0, None)

    def wrap(value: Any) -> Any:
        if type(value) is not Tensor or not roots:
            return value
        found = roots.get(_storage(value))
        if found is None:
            return value
        through_data = of_data or getattr(found, "_of_data", False)
        return _make(value, found._source, found._root, of_data=through_data)

    if isinstance(out, tuple | list):
        return type(out)(wrap(v) for v in out)
    return wrap(out)


def _make(
    tensor: Tensor,
    source: weakref.ref[ParametrizationList],
    root: WriteThrough | None,
    *,
    of_data: bool = False,
) -> WriteThrough:
    # The tensor itself becomes one (it is a fresh result, no one else's): `as_subclass` would
    # add an alias, one more node in every backward through it.
    made = cast(WriteThrough, tensor)
    made.__class__ = WriteThrough
    made._source = source
    made._view_of = root
    made._of_data = of_data
    return made


def write_through(
    tensor: Tensor, plist: ParametrizationList, *, sharded_writes: bool = False
) -> Tensor:
    """Return ``tensor``, the full value of ``plist``'s tensor, as a `WriteThrough` of it.

    Left as it is under ``torch.compile`` and ``torch.func`` transforms and on the meta device:
    there it is what a plain parametrization gives. FSDP2's ``DTensor`` reads too, unless
    ``sharded_writes`` (the module's own ``module.weight``, which a sharded model's
    ``init_weights`` writes into): then a `sharded_write_through` of it.
    """
    if torch.compiler.is_compiling() or composable_only(tensor):
        return tensor
    if sharded(tensor):  # FSDP2's (tensor parallelism's reads are `_FixedShard`'s, as they are)
        if sharded_writes and not _PLAIN_READS and isinstance(plist[0], FixedRows):
            return _sharded_write_through(tensor, plist)
        return tensor
    if type(tensor) is not Tensor:
        return tensor
    return _make(tensor, weakref.ref(plist), None)


# Set while torch's own code reads a sharded weight to replace it (`plain_reads`).
_PLAIN_READS: list[bool] = []


@contextlib.contextmanager
def plain_reads() -> Iterator[None]:
    """Within it, sharded reads are plain ``DTensor``s: torch's ``remove_parametrizations``
    makes the baked Parameter of the read it takes (``Parameter(read)``), which takes only a
    ``DTensor`` whose ``detach()`` is of its own type."""
    _PLAIN_READS.append(True)
    try:
        yield
    finally:
        _PLAIN_READS.pop()


@functools.cache
def _sharded_class() -> type[Tensor]:
    """`ShardedWriteThrough`, made on first use: ``DTensor`` is imported only where a sharded
    read exists (importing it with this package would slow every import)."""
    from torch.distributed.tensor import DTensor

    class ShardedWriteThrough(DTensor):
        """A read of a constrained tensor that FSDP2 shards (outside the forward): what is
        written into it in place (``nn.init.normal_(module.weight)``, ``fill_``) reaches the
        stored rows, its fixed rows set back, as `WriteThrough` does on one device.

        The write-back gathers the written tensor (one all-gather): every rank must write, as
        every rank runs a sharded model's ``init_weights``. Only the read itself writes back:
        a ``DTensor`` made from it (a slice, a product) is a tensor of its own, as it is of
        an unconstrained sharded weight.
        """

        _source: weakref.ref[ParametrizationList]

        @classmethod
        def __torch_function__(
            cls,
            func: Callable[..., Any],
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            kwargs = kwargs or {}
            name, kind = _classify(func)
            with DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            for target in _written(kind, args, kwargs, cls):
                _write_back_sharded(target, assigned=args[1] if name == "data.__set__" else None)
            return out

    return ShardedWriteThrough


def _sharded_write_through(tensor: Tensor, plist: ParametrizationList) -> Tensor:
    made = tensor
    made.__class__ = _sharded_class()  # a fresh result, as in `_make`
    made._source = weakref.ref(plist)  # type: ignore[attr-defined]
    return made


def _write_back_sharded(read: Any, *, assigned: Any = None) -> None:
    """Copy a written sharded read's free rows into the stored rows' shards; set its fixed rows
    back. One all-gather of the read; each rank then keeps its parts, sending nothing more.

    ``assigned``: the value of an assignment through ``.data`` (PEFT's merges write so, and
    ``weight.data += delta`` ends in one), which a ``DTensor``'s shards do not take: it is
    what is written, and a value whose fixed rows differ from the reference is refused before
    anything is copied, as `WriteThrough` does. Every rank holds the same gathered tensor, so
    every rank refuses alike.
    """
    plist = read._source()
    if plist is None:  # the module is gone: nothing to write to
        return
    constraint, free = plist[0], cast(Any, plist.original)  # a DTensor: read is one
    assert isinstance(constraint, FixedRows)
    with DisableTorchFunctionSubclass(), torch.no_grad():
        written = read if assigned is None else assigned
        full = written.full_tensor() if sharded(written) else written.detach().clone()
        reference = constraint.reference_for(full)
        if assigned is not None:
            _refuse_changed_fixed_rows(full, reference, constraint)
        if constraint.free_rows is None:
            rows = full[constraint.num_fixed :]
        else:
            rows = full.index_select(0, constraint.free_rows.to(full.device))
        free_shard: Any = shard_like(rows.contiguous(), free)
        free.to_local().copy_(free_shard.to_local())
        full.index_copy_(0, constraint.fixed_row_indices().to(full.device), reference)
        read_shard: Any = shard_like(full, read)
        read.to_local().copy_(read_shard.to_local())


def plain(tensor: Tensor) -> Tensor:
    """``tensor`` as a plain ``torch.Tensor`` (the same memory and graph), if a `WriteThrough`."""
    if isinstance(tensor, WriteThrough):
        with DisableTorchFunctionSubclass():
            return tensor.as_subclass(Tensor)
    return tensor
