"""`fix_rows` and `bake`: constrain a module's rows, and turn the result back into a plain weight.

`fix_rows` registers `FixedRows` and keeps the module's ``state_dict()`` plain: the same keys
and shapes as the unconstrained module, so checkpoints load into ordinary modules and ordinary
checkpoints load into constrained ones. Every module under the root that holds the same
Parameter (tied weights) reads the constrained tensor, and a plain ``nn.Embedding``,
``nn.EmbeddingBag`` or ``nn.Linear`` reads it without building the weight (`FixedRows.lookup`,
`FixedRows.bag`, `FixedRows.linear`). After ``.to()`` and ``deepcopy``, which
copy the reference and the stored rows apart, the module puts them back into one buffer
(`FixedRows.rejoin`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from embedding_constraint.fixed_rows import FixedRows

__all__ = ["bake", "fix_rows", "is_fixed", "parametrization_list"]


def parametrization_list(module: nn.Module, attr: str) -> ParametrizationList:
    """Return the parametrizations of ``module.<attr>`` (which must be parametrized)."""
    plist = module.parametrizations[attr]  # type: ignore[index]
    if not isinstance(plist, ParametrizationList):
        raise TypeError(f"Expected {attr!r} to be parametrized. Got {type(plist).__name__}.")
    return plist


def _split(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, attr = _split(name)
    try:
        return root.get_submodule(owner_name), attr
    except AttributeError:
        raise ValueError(
            f"Expected `name` to name a parameter under the module. Got {name!r}: "
            f"there is no submodule {owner_name!r}."
        ) from None


def _holders(root: nn.Module, param: Tensor) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) under ``root`` that holds ``param`` itself, once each."""
    return [
        (module, attr)
        for module in root.modules()  # each module once, however often it is reachable
        for attr, value in module._parameters.items()
        if value is param
    ]


def _check_lookup_options(module: nn.Module) -> None:
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        kind = type(module).__name__
        if module.sparse:
            raise ValueError(
                f"Expected a dense-gradient {kind}. Got {kind}(sparse=True): a sparse gradient "
                "cannot flow through the parametrization to the stored free rows. "
                "Use sparse=False."
            )
        if module.max_norm is not None:
            raise ValueError(
                f"Expected a {kind} without max_norm. Got max_norm={module.max_norm}: max_norm "
                "renormalises rows in place inside the weight it reads, which under a "
                "parametrization is a fresh tensor at every read, so the stored rows would "
                "never be renormalised (and the fixed rows would be, were it applied)."
            )


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
        constraint = parametrization_list(module, self.name)[0]
        return constraint if isinstance(constraint, FixedRows) else None

    def __call__(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        """Save: replace the parametrization's entries by the full tensor."""
        if self._constraint(module) is None:
            return
        inner = f"{prefix}parametrizations.{self.name}."
        # This module's entries are the last ones written: take them out, put them back in order.
        mine = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
        with torch.no_grad():
            mine[prefix + self.name] = parametrization_list(module, self.name)().detach()
        for key in [prefix + p for p in self.parameter_order if prefix + p in mine]:
            state_dict[key] = mine.pop(key)
        state_dict.update((k, v) for k, v in mine.items() if not k.startswith(inner))

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
        """Load: route a plain full tensor to the stored free rows, checking the fixed ones."""
        constraint = self._constraint(module)
        key = prefix + self.name
        if constraint is None or key not in state_dict:
            return
        plist = parametrization_list(module, self.name)
        inner = f"{prefix}parametrizations.{self.name}."
        value = state_dict[key]
        expected = (constraint.num_fixed + plist.original.shape[0], *plist.original.shape[1:])
        if not isinstance(value, Tensor) or tuple(value.shape) != expected:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            error_msgs.append(
                f"size mismatch for {key}: expected a tensor of shape {expected}, got {got}."
            )
            del state_dict[key]
            return
        with torch.no_grad():
            fixed_at = constraint.fixed_row_indices().to(value.device)
            incoming = value.index_select(0, fixed_at).to(constraint.reference)
            differ = (incoming != constraint.reference).reshape(constraint.num_fixed, -1).any(1)
            if bool(differ.any()):
                rows = fixed_at[differ.to(fixed_at.device)].tolist()
                shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
                raise ValueError(
                    f"Expected the fixed rows of {key!r} to equal the reference. "
                    f"Got {len(rows)} differing row(s): [{shown}]."
                )
            free = (
                value[constraint.num_fixed :]
                if constraint.free_rows is None
                else value.index_select(0, constraint.free_rows.to(value.device))
            )
        del state_dict[key]
        state_dict[inner + "original"] = free
        # The reference is the constraint's own: a plain state dict never replaces it.
        for buffer_name, buffer in constraint.state_dict(prefix=inner + "0.").items():
            state_dict[buffer_name] = buffer


def _ours(hook: Any) -> _PlainStateDict | None:
    target = getattr(hook, "hook", hook)  # torch stores load pre-hooks wrapped in .hook
    target = getattr(target, "__self__", target)  # and ours are bound methods there
    return target if isinstance(target, _PlainStateDict) else None


def _register_plain_hooks(module: nn.Module, name: str, parameter_order: Sequence[str]) -> None:
    hooks = _PlainStateDict(name, parameter_order)
    module.register_state_dict_post_hook(hooks)  # type: ignore[no-untyped-call]
    module.register_load_state_dict_pre_hook(hooks.load)  # type: ignore[no-untyped-call]


def _plain_parameter_order(module: nn.Module) -> tuple[str, ...]:
    """The module's parameter names as the unconstrained module lists them."""
    for hook in module._state_dict_hooks.values():
        ours = _ours(hook)
        if ours is not None:  # constrained before: its order predates every constraint
            return ours.parameter_order
    return tuple(module._parameters)


def _remove_plain_hooks(module: nn.Module, name: str) -> None:
    for registry in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
        for handle_id, hook in list(registry.items()):
            ours = _ours(hook)
            if ours is not None and ours.name == name:
                del registry[handle_id]


def _share_parametrization(
    source: nn.Module, source_attr: str, module: nn.Module, attr: str
) -> None:
    """Make ``module.<attr>`` read the same parametrization as ``source.<source_attr>``."""
    del module._parameters[attr]
    if not parametrize.is_parametrized(module):
        parametrize._inject_new_class(module)
        module.parametrizations = nn.ModuleDict()
    parametrize._inject_property(module, attr)
    cast(nn.ModuleDict, module.parametrizations)[attr] = parametrization_list(source, source_attr)


def _constraint_and_free(module: nn.Module) -> tuple[FixedRows, Tensor] | None:
    """The module's weight constraint and stored rows, if `FixedRows` alone constrains it."""
    plist = parametrization_list(module, "weight")
    constraint = plist[0]
    if len(plist) != 1 or not isinstance(constraint, FixedRows):
        return None  # another parametrization stacked on ours: read through all of them
    free = plist.original
    assert isinstance(free, Tensor)
    return constraint, free


def _embedding_forward(self: nn.Embedding, input: Tensor) -> Tensor:
    """``nn.Embedding.forward`` for a constrained weight: look up without building the weight."""
    found = _constraint_and_free(self)
    if found is None:
        return nn.Embedding.forward(self, input)
    constraint, free = found
    return constraint.lookup(input, free, self.padding_idx, self.scale_grad_by_freq)


def _embedding_bag_forward(
    self: nn.EmbeddingBag,
    input: Tensor,
    offsets: Tensor | None = None,
    per_sample_weights: Tensor | None = None,
) -> Tensor:
    """``nn.EmbeddingBag.forward`` for a constrained weight: reduce without building it."""
    found = _constraint_and_free(self)
    if found is None:
        return nn.EmbeddingBag.forward(self, input, offsets, per_sample_weights)
    constraint, free = found
    return constraint.bag(
        input,
        free,
        offsets,
        mode=self.mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=self.include_last_offset,
        padding_idx=self.padding_idx,
        scale_grad_by_freq=self.scale_grad_by_freq,
    )


def _linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    """``nn.Linear.forward`` for a constrained weight: no weight gradient for fixed rows."""
    found = _constraint_and_free(self)
    if found is None:
        return nn.Linear.forward(self, input)
    constraint, free = found
    return constraint.linear(input, free, self.bias)


# The forwards that read a constrained weight without building it, by the module's own class.
_FAST_FORWARDS: dict[type[nn.Module], Any] = {
    nn.Embedding: _embedding_forward,
    nn.EmbeddingBag: _embedding_bag_forward,
    nn.Linear: _linear_forward,
}


def _use_fast_forward(module: nn.Module, attr: str) -> None:
    """Give a constrained plain ``nn.Embedding``, ``nn.EmbeddingBag`` or ``nn.Linear`` a forward
    that skips building the weight.

    ``register_parametrization`` gave the module a class of its own (``ParametrizedEmbedding``),
    which ``remove_parametrizations`` takes away again; the forward lives on that class.
    Subclasses keep their own forward (it may read the weight in other ways).
    """
    bases = type(module).__bases__
    if attr == "weight" and len(bases) == 1 and bases[0] in _FAST_FORWARDS:
        type(module).forward = _FAST_FORWARDS[bases[0]]


def _remove_fast_forward(module: nn.Module, attr: str) -> None:
    if attr == "weight" and type(module).__dict__.get("forward") in _FAST_FORWARDS.values():
        del type(module).forward


def _rejoin_all(module: nn.Module) -> None:
    """Rejoin the reference and stored rows of every `FixedRows` on ``module``."""
    if not parametrize.is_parametrized(module):
        return
    for attr in list(module.parametrizations):  # type: ignore[arg-type]
        plist = parametrization_list(module, attr)
        if isinstance(plist[0], FixedRows) and isinstance(plist.original, Tensor):
            plist[0].rejoin(plist.original)


def _keep_joined(module: nn.Module) -> None:
    """Make ``.to()``-like calls and ``deepcopy`` of ``module`` rejoin its `FixedRows` buffers.

    ``nn.Module._apply`` (behind ``.to()``, ``.cuda()``, ``.double()``, ...) converts the
    stored Parameter and the reference buffer one by one, and ``deepcopy`` clones a Parameter
    without its buffer: either leaves them apart. Both get a wrapper on the module's own
    parametrized class that rejoins them afterwards. The class goes away when the last
    parametrization is removed, and the wrappers with it.
    """
    cls = type(module)
    if "_rejoins" in cls.__dict__:
        return

    def _apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
        super(cls, self)._apply(fn, recurse)  # type: ignore[misc]  # cls: the module's own class
        _rejoin_all(self)
        return self

    setattr(cls, "_apply", _apply)  # noqa: B010 - a method on the module's own class
    copier = cls.__dict__.get("__deepcopy__")  # torch's, unless the module brings its own
    if copier is not None:

        def __deepcopy__(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
            replica: nn.Module = copier(self, memo)
            _rejoin_all(replica)
            return replica

        setattr(cls, "__deepcopy__", __deepcopy__)  # noqa: B010
    setattr(cls, "_rejoins", True)  # noqa: B010


def is_fixed(module: nn.Module, name: str = "weight") -> bool:
    """Return whether ``module.<name>`` is constrained by `FixedRows`."""
    owner_name, attr = _split(name)
    try:
        owner = module.get_submodule(owner_name)
    except AttributeError:
        return False
    if not parametrize.is_parametrized(owner, attr):
        return False
    return any(isinstance(p, FixedRows) for p in parametrization_list(owner, attr))


def fix_rows(
    module: nn.Module,
    reference: Tensor,
    *,
    name: str = "weight",
    rows: Tensor | Sequence[int] | None = None,
) -> nn.Module:
    r"""Hold rows of ``module.<name>`` at ``reference`` while the other rows train.

    Registers `FixedRows` on the parameter and keeps ``module.state_dict()`` plain:
    the same keys and shapes as the unconstrained module. Loading a plain state dict loads
    its free rows; its fixed rows must equal the reference. The Parameter object is kept,
    so an optimizer created before the call still trains it if it has taken no step.

    ``name`` may be dotted (``"transformer.wte.weight"``). Every module under ``module``
    that holds the same Parameter (an output head tied to the embedding) reads the
    constrained tensor, and the optimizer sees the parameter once.

    Args:
        module (nn.Module): the module, or a root module above it.
        reference (Tensor): the fixed rows' values, shape ``(k, *trailing)``.
        name (str, optional): the parameter, dotted under ``module``. Default: ``"weight"``.
        rows (Tensor or sequence of int, optional): positions of the fixed rows, one per
            reference row. Default: ``None``, the first ``k`` rows.

    Returns:
        nn.Module: ``module``, constrained in place.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or see `FixedRows`.
        ValueError: there is no such parameter, it is already parametrized, it is an
            ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True`` or ``max_norm``, or the
            reference does not fit it (see `FixedRows`). The module is left unchanged.

    Examples:

        >>> import torch
        >>> from torch import nn
        >>> from embedding_constraint import fix_rows, bake
        >>> emb = nn.Embedding(5, 3)
        >>> reference = torch.zeros(2, 3)
        >>> _ = fix_rows(emb, reference)
        >>> list(emb.state_dict()), emb.state_dict()["weight"].shape
        (['weight'], torch.Size([5, 3]))
        >>> torch.equal(bake(emb).weight[:2], reference)
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be a torch.nn.Module. Got {type(module).__name__}.")
    given: object = name  # checked at run time: callers may not be typed
    if not isinstance(given, str) or not given:
        raise TypeError(f"Expected `name` to be a non-empty str. Got {given!r}.")
    owner, attr = _owner(module, name)
    if parametrize.is_parametrized(owner, attr):
        raise ValueError(
            f"Expected an unconstrained parameter. Got {name!r}, which is already parametrized; "
            "call bake() before constraining it again."
        )
    param = owner._parameters.get(attr)
    if param is None:
        available = [n for n, _ in module.named_parameters()]
        raise ValueError(
            f"Expected `module` to have a parameter named {name!r}. "
            f"Got none; its parameters are {available}."
        )
    holders = _holders(module, param)
    for holder, _ in holders:
        _check_lookup_options(holder)
    constraint = FixedRows._borrowing(reference, rows=rows)  # registered below, at once
    constraint.check_compatible(param)
    orders = [_plain_parameter_order(holder) for holder, _ in holders]
    # Nothing below can fail on user input: the module changes only from here on.
    parametrize.register_parametrization(owner, attr, constraint)
    for (holder, holder_attr), order in zip(holders, orders, strict=True):
        if holder is not owner or holder_attr != attr:
            _share_parametrization(owner, attr, holder, holder_attr)
        _register_plain_hooks(holder, holder_attr, order)
        _use_fast_forward(holder, holder_attr)
        _keep_joined(holder)
    return module


def bake(module: nn.Module, *, name: str = "weight") -> nn.Module:
    r"""Replace a constrained ``module.<name>`` by a plain Parameter holding its current value.

    The inverse of `fix_rows` (and of registering `FixedRows` by hand): the
    Parameter object is the one that was constrained, now of the full shape, with the fixed
    rows equal to the reference. Tied modules still share it afterwards.

    Args:
        module (nn.Module): the module, or a root module above it.
        name (str, optional): the parameter, dotted under ``module``. Default: ``"weight"``.

    Returns:
        nn.Module: ``module``, with a plain parameter in place.

    Raises:
        ValueError: ``module.<name>`` is not constrained by `FixedRows` alone.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be a torch.nn.Module. Got {type(module).__name__}.")
    owner, attr = _owner(module, name)
    if not parametrize.is_parametrized(owner, attr):
        raise ValueError(f"Expected {name!r} to be constrained by fix_rows. Got a plain tensor.")
    plist = parametrization_list(owner, attr)
    if len(plist) != 1 or not isinstance(plist[0], FixedRows):
        kinds = [type(p).__name__ for p in plist]
        raise ValueError(f"Expected {name!r} to be constrained by FixedRows alone. Got {kinds}.")
    # Modules that share the parametrization (tied weights) get the stored Parameter back first;
    # baking the owner last then sets that same Parameter to the full value.
    sharers = [
        (holder, holder_attr)
        for holder in module.modules()
        if holder is not owner and parametrize.is_parametrized(holder)
        for holder_attr in list(holder.parametrizations)  # type: ignore[arg-type]
        if parametrization_list(holder, holder_attr) is plist
    ]
    for holder, holder_attr in sharers:
        _remove_fast_forward(holder, holder_attr)
        parametrize.remove_parametrizations(holder, holder_attr, leave_parametrized=False)
        _remove_plain_hooks(holder, holder_attr)
    _remove_fast_forward(owner, attr)
    parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
    _remove_plain_hooks(owner, attr)
    return module
