"""Plain state dicts for constrained modules: the keys and shapes of the unconstrained module.

`fix_rows` registers `_PlainStateDict` on every module holding a constrained tensor. Saving
writes the full tensor under its plain key (``weight``) instead of the parametrization's
entries (``parametrizations.weight.original``, ...); loading takes the plain key, routes the
free rows to the stored parameter and checks the fixed rows against the reference.
`plain_keys` does the same for a dict that a tool wrote by parameter names.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from embedding_constraint.fixed_rows import (
    FixedRows,
    gathered,
    parametrization_list,
    shard_like,
    sharded,
)
from embedding_constraint.write_through import plain, write_through

__all__ = ["plain_keys", "plain_parameter_order", "register_plain_hooks", "remove_plain_hooks"]

# The full tensor last built for a parametrization, with the ``id`` of the state dict it went
# into. Tied holders share one parametrization; within one ``state_dict()`` call they get one
# tensor, as an unconstrained tied module's state dict holds its one Parameter twice, so savers
# that write shared tensors once (transformers' ``save_pretrained``) write it once. Weak on both
# sides: the entry keeps neither the parametrization nor the (possibly large) tensor alive.
_BUILT: weakref.WeakKeyDictionary[
    ParametrizationList, tuple[tuple[int, ...], weakref.ref[Tensor]]
] = weakref.WeakKeyDictionary()


def _full_tensor(plist: ParametrizationList, state_dict: dict[str, Any], key: str) -> Tensor:
    """The full tensor of ``plist`` for ``state_dict[key]``: built, or shared within one call.

    A tensor built for another holder is shared only while it is a value of this very state
    dict, ``key`` is not in it yet and neither the stored rows nor the reference changed in
    place since (their version counters): a state dict made before, or a second call with the
    same ``destination``, never gets stale values.
    """
    original, reference = plist.original, plist[0].reference
    stamp = (id(state_dict), original._version, reference._version)
    last = _BUILT.get(plist)
    if last is not None and last[0] == stamp and key not in state_dict:
        built = last[1]()
        if built is not None and any(value is built for value in state_dict.values()):
            return built
    # Never an inference tensor, as a plain module's entries are not: a state dict taken
    # during an evaluation may be loaded with `assign=True` and trained.
    # (Leaving inference mode turns gradients on: no_grad inside it.)
    with torch.inference_mode(False), torch.no_grad():
        full = write_through(plist().detach(), plist)  # in-place writers reach the rows
    # Stamped after the read, which may give the reference memory of its own (a new tensor,
    # `FixedRows._release_if_left`): a tied holder then shares the tensor, on every rank alike,
    # and a sharded read (a collective) is made as often on each.
    reference = plist[0].reference
    stamp = (id(state_dict), original._version, reference._version)
    _BUILT[plist] = (stamp, weakref.ref(full))
    return full


def narrower_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The one of two dtypes with the coarser resolution (``b`` unless both are floating)."""
    if not (a.is_floating_point and b.is_floating_point):
        return b
    return a if torch.finfo(a).eps > torch.finfo(b).eps else b


class _PlainStateDict:
    """State-dict hooks that show a constrained tensor as the plain full tensor.

    Saving writes ``<prefix><name>`` (the full tensor) instead of the parametrization's
    entries. Loading accepts ``<prefix><name>``: its free rows go to the stored parameter,
    and its fixed rows must equal the reference.
    """

    def __init__(self, name: str, parameter_order: Sequence[str]) -> None:
        self.name = name
        # The module's parameter names before it was constrained: saving puts the full tensor
        # back in its place, so the keys come in the plain module's order too.
        self.parameter_order = tuple(parameter_order)

    def _constraint(self, module: nn.Module) -> FixedRows | None:
        if not parametrize.is_parametrized(module, self.name):
            return None
        plist = parametrization_list(module, self.name)
        # Stacked under another parametrization, the tensor is no longer the plain one:
        # leave torch's own entries (the module's reads refuse that case, see `constrained`).
        if len(plist) != 1 or not isinstance(plist[0], FixedRows):
            return None
        return plist[0]

    def __call__(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        """Save: replace the parametrization's entries by the full tensor."""
        if self._constraint(module) is None:
            return
        plist = parametrization_list(module, self.name)
        full = _full_tensor(plist, state_dict, prefix + self.name)
        put_plain_entry(state_dict, prefix, self.name, full, self.parameter_order)

    def load(
        self,
        module: nn.Module,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load: route a plain full tensor to the stored free rows, checking the fixed ones.

        Problems go to ``error_msgs`` and ``missing_keys`` in the plain keys, as torch reports
        its own: a missing ``<prefix><name>``, a tensor of another shape, fixed rows that
        differ from the reference. The module then keeps its own values for this tensor.
        """
        constraint = self._constraint(module)
        if constraint is None:
            return
        key = prefix + self.name
        plist = parametrization_list(module, self.name)
        inner = f"{prefix}parametrizations.{self.name}."
        own = state_dict.get(inner + "original")
        incoming = plain(state_dict[key]) if key in state_dict else None
        whole_into_shards = sharded(plist.original) and not sharded(incoming)
        if whole_into_shards and (key in state_dict or own is None or own is plist.original):
            # Whole (or absent) into sharded rows: the first rank's, on every rank.
            state_dict.pop(key, None)
            self._load_from_first_rank(
                constraint, plist, state_dict, key, inner, incoming, missing_keys, error_msgs
            )
            return
        if key not in state_dict:
            if own is None:  # not a state dict in torch's own format
                missing_keys.append(key)
                self._keep_own(constraint, plist, state_dict, inner)
            return
        # Under FSDP2 a DTensor of the plain tensor: checked and routed whole (a collective;
        # every rank loads), then laid out as the stored rows are.
        value = state_dict.pop(key)
        self._route(constraint, plist, state_dict, key, inner, gathered(plain(value)), error_msgs)

    def _load_from_first_rank(
        self,
        constraint: FixedRows,
        plist: ParametrizationList,
        state_dict: dict[str, Any],
        key: str,
        inner: str,
        value: object,
        missing_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load the plain tensor that the first rank of the free rows' mesh holds, on every rank.

        For a whole tensor (or none) loaded into free rows that FSDP2 shards: torch's
        ``set_model_state_dict(..., broadcast_from_rank0=True)`` gives the plain key to rank 0
        alone (it broadcasts only the keys it finds among the module's parameters, which are
        the constraint's), and a full state dict (``full_state_dict=True``) reaches every rank
        whole. Every rank makes the same collectives, whichever it got: a broadcast of what the
        first rank holds (its shape and dtype, or that it holds none), then of the tensor; each
        rank checks its fixed rows and keeps its shard of the free rows.
        """
        like = plist.original
        expected = (constraint.num_fixed + like.shape[0], *like.shape[1:])
        whole = whole_from_first_rank(like, value, expected)
        if whole is None:
            missing_keys.append(key)
            self._keep_own(constraint, plist, state_dict, inner)
            return
        if isinstance(whole, str):  # refused on every rank alike
            error_msgs.append(f"size mismatch for {key}: {whole}")
            self._keep_own(constraint, plist, state_dict, inner)
            return
        self._route(constraint, plist, state_dict, key, inner, whole, error_msgs)

    def _route(
        self,
        constraint: FixedRows,
        plist: ParametrizationList,
        state_dict: dict[str, Any],
        key: str,
        inner: str,
        value: object,
        error_msgs: list[str],
    ) -> None:
        """Check the whole ``value`` and put its free rows where torch loads the stored ones."""
        problem = self._problem(constraint, plist, key, value)
        if problem is not None:
            error_msgs.append(problem)
            self._keep_own(constraint, plist, state_dict, inner)
            return
        assert isinstance(value, Tensor)
        with torch.no_grad():
            free = (
                value[constraint.num_fixed :]
                if constraint.free_rows is None
                else value.index_select(0, constraint.free_rows.to(value.device))
            )
        state_dict[inner + "original"] = shard_like(free, plist.original)
        self._keep_own(constraint, None, state_dict, inner)

    @staticmethod
    def _problem(constraint: FixedRows, plist: Any, key: str, value: object) -> str | None:
        """What keeps ``value`` from loading into the constrained tensor, or None."""
        expected = (constraint.num_fixed + plist.original.shape[0], *plist.original.shape[1:])
        if not isinstance(value, Tensor) or tuple(value.shape) != expected:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            return f"size mismatch for {key}: expected a tensor of shape {expected}, got {got}."
        with torch.no_grad():
            reference = gathered(constraint.reference)
            if reference.is_meta:
                return (
                    f"Expected the reference of {key!r} to hold values. Got one on the meta "
                    "device: prepare_fully_shard made it a parameter, which moving the module to "
                    "the meta device emptied (accelerate's cpu_ram_efficient_loading does, before "
                    "fully_shard). Keep the reference whole there: do not call "
                    "prepare_fully_shard."
                )
            if value.is_meta:
                return f"Expected a tensor with values for {key!r}. Got one on the meta device."
            fixed_at = constraint.fixed_row_indices().to(value.device)
            incoming = value.index_select(0, fixed_at)
            # In the narrower of the two dtypes: a checkpoint of a run in a lower precision
            # holds the reference rounded to it (Lightning loads it before it converts the
            # module), one in a higher precision a reference this module holds rounded.
            narrow = narrower_dtype(incoming.dtype, reference.dtype)
            incoming, reference = incoming.to(reference.device, narrow), reference.to(narrow)
            differ = (incoming != reference).reshape(constraint.num_fixed, -1).any(1)
            if not bool(differ.any()):
                return None
            rows = fixed_at[differ.to(fixed_at.device)].tolist()
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        return (
            f"Expected the fixed rows of {key!r} to equal the reference (they are held fixed). "
            f"Got {len(rows)} differing row(s): [{shown}]."
        )

    @staticmethod
    def _keep_own(
        constraint: FixedRows, plist: Any, state_dict: dict[str, Any], inner: str
    ) -> None:
        """Give torch's loading the constraint's own entries, so it loads them onto themselves.

        The reference always (a plain state dict never replaces it); the stored rows too when
        ``plist`` is given (nothing of them is loaded). Torch then reports no internal keys.
        """
        if plist is not None:
            state_dict[inner + "original"] = plist.original
        for buffer_name, buffer in constraint.state_dict(prefix=inner + "0.").items():
            state_dict[buffer_name] = buffer


def whole_from_first_rank(
    like: Tensor, value: object, expected: tuple[int, ...]
) -> Tensor | str | None:
    """The tensor that the first rank of ``like``'s (a ``DTensor``'s) mesh holds, on every rank.

    Every rank makes the same collectives, whatever it holds: a broadcast of what the first rank
    holds (its shape and dtype, or that it holds none), then of the tensor. None where the
    first rank holds no tensor; a message where it holds one of another shape than
    ``expected`` (or no tensor at all), on every rank alike.
    """
    announced: list[object] = [None]
    if isinstance(value, Tensor):
        announced = [(tuple(value.shape), value.dtype)]
    elif value is not None:
        announced = [type(value).__name__]
    _broadcast_from_first(like, objects=announced)
    (what,) = announced
    if what is None:
        return None
    shape, dtype = what if isinstance(what, tuple) else (None, None)
    if shape is None or tuple(shape) != expected:
        got = what if shape is None else tuple(shape)
        return f"expected a tensor of shape {expected}, got {got}."
    device = torch.device(like.device_mesh.device_type)  # type: ignore[attr-defined]
    if isinstance(value, Tensor) and _first_on_mesh(like):
        whole = value.detach().to(device).contiguous()
    else:
        whole = torch.empty(shape, dtype=dtype, device=device)
    _broadcast_from_first(like, tensor=whole)
    return whole


def any_on_mesh(flag: bool, like: Tensor) -> bool:
    """Whether ``flag`` is true on any rank of ``like``'s (a ``DTensor``'s) mesh: one small
    all-reduce per mesh dimension, which every rank makes."""
    import torch.distributed as dist

    mesh = like.device_mesh  # type: ignore[attr-defined]
    count = torch.tensor([int(flag)], device=mesh.device_type)
    for dim in range(mesh.ndim):
        dist.all_reduce(count, group=mesh.get_group(dim))
    return bool(count.item())


def _first_on_mesh(like: Tensor) -> bool:
    """Whether this rank is the first of ``like``'s (a ``DTensor``'s) mesh."""
    return all(c == 0 for c in like.device_mesh.get_coordinate() or [])  # type: ignore[attr-defined]


def _broadcast_from_first(
    like: Tensor, *, objects: list[object] | None = None, tensor: Tensor | None = None
) -> None:
    """Broadcast ``objects`` or ``tensor`` in place from the first rank of ``like``'s mesh.

    Along each dimension of the mesh in turn, from its first coordinate: after the last, every
    rank holds what the first (all coordinates 0) held.
    """
    import torch.distributed as dist

    mesh = like.device_mesh  # type: ignore[attr-defined]
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        if objects is not None:
            dist.broadcast_object_list(objects, group=group, group_src=0)
        if tensor is not None:
            dist.broadcast(tensor, group=group, group_src=0)


def _ours(hook: Any) -> _PlainStateDict | None:
    target = getattr(hook, "hook", hook)  # torch stores load pre-hooks wrapped in .hook
    target = getattr(target, "__self__", target)  # and ours are bound methods there
    return target if isinstance(target, _PlainStateDict) else None


def register_plain_hooks(module: nn.Module, name: str, parameter_order: Sequence[str]) -> None:
    hooks = _PlainStateDict(name, parameter_order)
    module.register_state_dict_post_hook(hooks)  # type: ignore[no-untyped-call]
    module.register_load_state_dict_pre_hook(hooks.load)  # type: ignore[no-untyped-call]


def put_plain_entry(
    state_dict: dict[str, Any], prefix: str, name: str, value: Tensor, order: tuple[str, ...]
) -> None:
    """Put ``value`` under the plain key ``prefix + name`` in place of the parametrization's
    entries (``prefix + "parametrizations." + name + "."``), the module's entries in the order
    a plain module writes them (``order``: its parameter names, see `plain_parameter_order`).

    The module's entries are the last ones written: they are taken out and put back in order.
    """
    inner = f"{prefix}parametrizations.{name}."
    mine = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    mine[prefix + name] = value
    for key in [prefix + p for p in order if prefix + p in mine]:
        state_dict[key] = mine.pop(key)
    state_dict.update((k, v) for k, v in mine.items() if not k.startswith(inner))


def plain_parameter_order(module: nn.Module) -> tuple[str, ...]:
    """The module's parameter names as the unconstrained module lists them."""
    for hook in module._state_dict_hooks.values():
        ours = _ours(hook)
        if ours is not None:  # constrained before: its order predates every constraint
            return ours.parameter_order
    return tuple(module._parameters)


def remove_plain_hooks(module: nn.Module, name: str) -> None:
    for registry in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
        for handle_id, hook in list(registry.items()):
            ours = _ours(hook)
            if ours is not None and ours.name == name:
                del registry[handle_id]


def plain_keys(module: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``state_dict`` with each constrained tensor under its plain key, as ``module``'s
    own ``state_dict()`` would give it.

    A dict of parameter names, as some tools write one (DeepSpeed's ZeRO-3 consolidation,
    behind ``transformers.Trainer.save_model``, and its ``zero_to_fp32``, walk each module's
    parameters instead of calling ``state_dict()``), holds a constrained tensor's stored free
    rows under ``<prefix>parametrizations.<name>.original``. In its place this gives
    ``<prefix><name>``: the full tensor, the dict's free rows put together with ``module``'s
    reference (or the dict's, for a reference held as a parameter), in the dict's dtype and
    device (a bfloat16 dict gives the fixed rows rounded to bfloat16, as the model's own
    state dict in that dtype would). The constraint's other entries go; every other entry is
    kept, in its order. Tied holders get one tensor, as in a plain tied model's state dict.
    A dict with plain keys comes back equal.

    Args:
        module (nn.Module): the constrained module (or a root above it) the dict was taken of.
        state_dict (Mapping[str, Any]): the dict, keyed by names under ``module``.

    Returns:
        dict[str, Any]: a new dict; ``state_dict`` is not changed.

    Raises:
        ValueError: stored rows (or a held reference) in the dict have another shape than
            ``module``'s.

    Examples:

        >>> import torch
        >>> from torch import nn
        >>> from embedding_constraint import fix_rows, plain_keys
        >>> emb = fix_rows(nn.Embedding(5, 3), torch.zeros(2, 3))
        >>> raw = dict(emb.named_parameters())
        >>> list(raw)
        ['parametrizations.weight.original']
        >>> {key: tuple(value.shape) for key, value in plain_keys(emb, raw).items()}
        {'weight': (5, 3)}
    """
    renamed: dict[str, str] = {}  # stored key -> plain key
    before: dict[str, list[str]] = {}  # key -> the plain keys that go before it
    dropped: set[str] = set()
    built: dict[str, Tensor] = {}  # plain key -> full tensor
    shared: dict[tuple[int, int], Tensor] = {}  # (parametrization, stored rows) -> full tensor
    for path, holder in module.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(holder):
            continue
        base = f"{path}." if path else ""
        for attr in list(holder.parametrizations):
            plist = parametrization_list(holder, attr)
            constraint = plist[0]
            stored = f"{base}parametrizations.{attr}.original"
            if len(plist) != 1 or not isinstance(constraint, FixedRows) or stored not in state_dict:
                continue
            held = f"{base}parametrizations.{attr}.0.reference"
            free = state_dict[stored]
            # Tied holders' entries: one tensor, or views of one memory (`detach()` each).
            key = (id(plist), free.data_ptr() if isinstance(free, Tensor) else id(free))
            if key not in shared:
                reference = state_dict.get(held, constraint.reference)
                shared[key] = _joined(constraint, plist, free, reference, stored)
            renamed[stored] = base + attr
            built[base + attr] = shared[key]
            dropped |= {held, f"{base}parametrizations.{attr}.0._extra_state"}
            order = plain_parameter_order(holder)
            after = order[order.index(attr) + 1 :] if attr in order else ()
            for sibling in after:  # the plain key goes before them, as the plain module has it
                before.setdefault(base + sibling, []).append(base + attr)
    out: dict[str, Any] = {}
    for name, value in state_dict.items():
        for plain_key in [*before.get(name, ()), renamed.get(name)]:
            if plain_key is not None and plain_key not in out:
                out[plain_key] = built[plain_key]
        if name not in renamed and name not in dropped:
            out[name] = value
    return out


def _joined(
    constraint: FixedRows, plist: ParametrizationList, free: Any, reference: Any, key: str
) -> Tensor:
    """The full tensor of stored rows ``free`` (a dict's ``key``) and ``reference``."""
    own = plist.original
    # Under ZeRO-3 a partitioned parameter is empty on every rank; DeepSpeed keeps its shape.
    expected = tuple(getattr(own, "ds_shape", own.shape))
    if not isinstance(free, Tensor) or tuple(free.shape) != expected:
        got = tuple(free.shape) if isinstance(free, Tensor) else type(free).__name__
        raise ValueError(
            f"Expected `state_dict[{key!r}]` to hold the stored rows of the module's constrained "
            f"tensor, of shape {expected}. Got {got}."
        )
    fixed = (constraint.num_fixed, *expected[1:])
    if not isinstance(reference, Tensor) or tuple(reference.shape) != fixed:
        got = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
        raise ValueError(
            f"Expected the reference next to `state_dict[{key!r}]` to hold the constraint's "
            f"{constraint.num_fixed} fixed rows, of shape {fixed}. Got {got}."
        )
    with torch.no_grad():
        reference = gathered(reference).detach().to(device=free.device, dtype=free.dtype)
        if constraint.free_rows is None:
            return torch.cat((reference, free.detach()))
        full = free.new_empty((reference.shape[0] + free.shape[0], *free.shape[1:]))
        full.index_copy_(0, constraint.fixed_row_indices().to(free.device), reference)
        full.index_copy_(0, constraint.free_rows.to(free.device), free.detach())
        return full
