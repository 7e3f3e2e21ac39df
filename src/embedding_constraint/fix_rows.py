"""`fix_rows` and `bake`: constrain a module's rows, and turn the result back into a plain weight.

`fix_rows` registers `FixedRows` and keeps the module's ``state_dict()`` plain: the same keys
and shapes as the unconstrained module, so checkpoints load into ordinary modules and ordinary
checkpoints load into constrained ones. Every module under the root that holds the same
Parameter (tied weights) reads the constrained tensor, and a plain ``nn.Embedding``,
``nn.EmbeddingBag`` or ``nn.Linear`` reads it without building the weight (the forwards of
`embedding_constraint.reads`). After ``.to()`` and ``deepcopy``, which
copy the reference and the stored rows apart, the module puts them back into one buffer
(`FixedRows.rejoin`).

The package's other modules (the integrations, the callback) build on the checks here rather
than repeating them: `SUPPORTED_MODULES`, `references_of` (a reference module's tensors),
`check_reference` (everything about one reference and tensor that `fix_rows` refuses, in the
caller's argument names), `check_lookup_options`, and the lookups `owner_of`, `holders_of`,
`held_outside`, `constraint_of`, `stored_rows`, `fixed_tensors`. They are the package's own API: public to its files, not exported.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from embedding_constraint.fixed_rows import (
    FixedRows,
    RowConstraint,
    parametrization_list,
    sharded,
)
from embedding_constraint.reads import FAST_FORWARDS
from embedding_constraint.state_dict import (
    plain_parameter_order,
    register_plain_hooks,
    remove_plain_hooks,
)
from embedding_constraint.tied_reads import shared_read
from embedding_constraint.torch_internals import (
    fsdp_managed,
    inject_parametrized_property,
    parametrized_class,
    parametrized_original,
)
from embedding_constraint.write_through import plain_reads, write_through

__all__ = ["bake", "fix_rows", "is_fixed"]

# The modules whose reads `fix_rows` makes fast and that the callback and `vocab` take: the
# one list. (`fix_rows` itself takes any module with a floating-point parameter.)
SUPPORTED_MODULES = (nn.Embedding, nn.EmbeddingBag, nn.Linear)


def _split(name: object, argument: str = "name") -> tuple[str, str]:
    """``(owner, attr)`` of a dotted parameter name, checked to be a non-empty str."""
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"Expected `{argument}` to be a non-empty str, a parameter's dotted name "
            f"('weight', 'embed.weight'). Got {name!r}."
        )
    owner, _, attr = name.rpartition(".")
    return owner, attr


def owner_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(module, attr)``: the submodule of ``root`` that holds the tensor ``name``, and its
    attribute name.

    Raises:
        TypeError: ``name`` is not a non-empty str.
        ValueError: ``root`` has no such submodule.
    """
    owner_name, attr = _split(name)
    try:
        return root.get_submodule(owner_name), attr
    except AttributeError:
        raise ValueError(
            f"Expected `name` to name a parameter under the module. Got {name!r}: "
            f"there is no submodule {owner_name!r}."
        ) from None


def holders_of(root: nn.Module, param: Tensor) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) under ``root`` that holds ``param`` itself, once each."""
    return [
        (module, attr)
        for module in root.modules()  # each module once, however often it is reachable
        for attr, value in module._parameters.items()
        if value is param
    ]


def held_outside(root: nn.Module, value: object, registry: str) -> bool:
    """Whether a module outside ``root`` holds ``value`` in its ``registry`` dict too.

    ``registry`` is ``"_parameters"`` (a Parameter tied to a module above ``root``) or
    ``"_modules"`` (a parametrization shared by such a module). Neither keeps a list of its
    holders, so the garbage collector's referrers are the one way to find them: a dict that
    holds ``value`` and is some module's ``registry``. Two passes over the heap (tens of
    milliseconds for a large model), once per `fix_rows` or `bake`.
    """
    inside = {id(getattr(m, registry)) for m in root.modules()}
    for holder in gc.get_referrers(value):
        if not isinstance(holder, dict) or id(holder) in inside:
            continue
        if not any(v is value for v in holder.values()):
            continue
        for owner in gc.get_referrers(holder):
            state = owner.__dict__ if isinstance(owner, nn.Module) else owner
            if isinstance(state, dict) and state.get(registry) is holder:
                return True
    return False


def _optimizers_of(param: Tensor) -> list[torch.optim.Optimizer]:
    """The ``torch.optim`` optimizers that hold ``param`` in a parameter group.

    A group's ``"params"`` list holds it, the optimizer's ``param_groups`` list holds the group:
    the garbage collector's referrers walk that chain back (once per `fix_rows`).
    """
    found: list[torch.optim.Optimizer] = []
    for params in gc.get_referrers(param):
        if not isinstance(params, list):
            continue
        for group in gc.get_referrers(params):
            if not (isinstance(group, dict) and group.get("params") is params):
                continue
            for groups in gc.get_referrers(group):
                if not isinstance(groups, list):
                    continue
                for owner in gc.get_referrers(groups):
                    candidates = [owner] if isinstance(owner, torch.optim.Optimizer) else []
                    if isinstance(owner, dict):  # the optimizer's __dict__
                        candidates = [
                            o for o in gc.get_referrers(owner)
                            if isinstance(o, torch.optim.Optimizer) and o.__dict__ is owner
                        ]  # fmt: skip
                    found += [o for o in candidates if o.param_groups is groups and o not in found]
    return found


def _has_optimizer_state(param: Tensor) -> bool:
    """Whether an optimizer holds state that the free rows' shape would not fit: of ``param``'s
    shape (it stepped, or it makes state when it is made, as Adagrad does), or of any shape
    beyond a scalar once it has stepped (Adafactor's factored rows and columns, LBFGS's flat
    history over all its parameters).

    Optimizers key their state by the Parameter; the garbage collector finds such a dict, and
    the ``torch.optim`` optimizers that hold ``param`` (`_optimizers_of`).
    """
    for holder in gc.get_referrers(param):
        if isinstance(holder, dict) and param in holder:
            state = holder[param]
            if isinstance(state, dict) and any(
                isinstance(v, Tensor) and v.shape == param.shape for v in state.values()
            ):
                return True
    return any(
        isinstance(value, Tensor) and value.numel() > 1
        for optimizer in _optimizers_of(param)
        for state in optimizer.state.values()
        for value in state.values()
    )


def check_lookup_options(module: nn.Module) -> None:
    """Refuse an ``nn.Embedding``/``nn.EmbeddingBag`` option the constraint cannot keep exact.

    Raises:
        ValueError: ``sparse=True`` or ``max_norm`` is set.
    """
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
                "renormalises the rows it looks up in place, the fixed rows among them, which "
                "must not change: the fixed rows would be undone after each renormalisation and "
                "their lookups exceed max_norm."
            )


def share_parametrization(
    source: nn.Module, source_attr: str, module: nn.Module, attr: str
) -> None:
    """Make ``module.<attr>`` read the same parametrization as ``source.<source_attr>``."""
    del module._parameters[attr]
    inject_parametrized_property(module, attr)
    cast(nn.ModuleDict, module.parametrizations)[attr] = parametrization_list(source, source_attr)


def _own_class(cls: type) -> type:
    """A copy of the parametrized class ``cls``: same base, same attributes, a class of its own.

    Torch's ``remove_parametrizations`` deletes the tensor's property from the module's class
    (`embedding_constraint.torch_internals`), so two modules must never share one (``deepcopy``
    of a parametrized module would).
    """
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__, cls.__bases__, own)


def _above_own_class(module: nn.Module) -> Any:
    """``super()`` past the module's own parametrized class (the one `_set_up_class` set up)."""
    own = next(c for c in type(module).__mro__ if "_fixed_rows_class" in c.__dict__)
    return super(own, module)


def _rejoin_all(module: nn.Module) -> None:
    """Rejoin the reference and stored rows of every `FixedRows` on ``module``."""
    if not parametrize.is_parametrized(module):
        return
    for attr in list(module.parametrizations):  # type: ignore[arg-type]
        plist = parametrization_list(module, attr)
        if isinstance(plist[0], FixedRows) and isinstance(plist.original, Tensor):
            plist[0].rejoin(plist.original)


def _apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    """``nn.Module._apply``, then rejoin what it moved apart."""
    _above_own_class(self)._apply(fn, recurse)
    _rejoin_all(self)
    return self


def _read_as_write_through(cls: type, attr: str) -> None:
    """Make the class's property ``attr`` (torch's, from ``register_parametrization``) give its
    value as a `WriteThrough`, so that writes into it reach the stored rows, and tied holders
    the same read while it stands for theirs (`shared_read`)."""
    torch_property = cls.__dict__[attr]
    if getattr(torch_property.fget, "_write_through", False):
        return
    read = torch_property.fget

    def get(self: nn.Module) -> Tensor:
        plist = parametrization_list(self, attr)
        return shared_read(
            self, plist, lambda: write_through(read(self), plist, sharded_writes=True)
        )

    get._write_through = True  # type: ignore[attr-defined]
    setattr(cls, attr, property(get, torch_property.fset))


def _set_up_class(module: nn.Module, attr: str) -> None:
    """Set up the module's own parametrized class for reading a constrained weight.

    ``register_parametrization`` gave the module a class of its own
    (``ParametrizedEmbedding``, the layout `embedding_constraint.torch_internals` pins), which
    ``remove_parametrizations`` takes away again. On it:

    - the fast forward of a plain ``nn.Embedding``, ``nn.EmbeddingBag`` or ``nn.Linear``
      (`embedding_constraint.reads`; subclasses keep their own forward, which may read the
      weight in other ways). It reads the weight plainly once nothing constrains it.
    - ``_apply`` (behind ``.to()``, ``.cuda()``, ``.double()``, ...), which converts the stored
      Parameter and the reference one by one, and ``__deepcopy__``, which clones a Parameter
      without its buffer: both rejoin them afterwards. A deep copy also gets a class of its
      own (`_own_class`), so baking one copy leaves the others as they were.

    Nothing on the class depends on one instance: the methods look at the instance they are
    called on.
    """
    cls = type(module)
    original = parametrized_original(cls)
    if attr == "weight" and original in FAST_FORWARDS:
        setattr(cls, "forward", FAST_FORWARDS[original])  # noqa: B010 - on its own class
    _read_as_write_through(cls, attr)
    keep_copies_apart(cls)
    if "_fixed_rows_class" in cls.__dict__:
        return
    setattr(cls, "_apply", _apply)  # noqa: B010
    setattr(cls, "_fixed_rows_class", True)  # noqa: B010


def keep_copies_apart(cls: type) -> None:
    """Give a deep copy of a module of the parametrized class ``cls`` a class of its own.

    Torch's ``deepcopy`` of a parametrized module keeps its class, so baking the copy would
    delete the property from the original's class too (`_own_class`). The copy's constrained
    tensors are rejoined to their references (`_rejoin_all`).
    """
    if "_fixed_rows_copies" in cls.__dict__:
        return
    copier = getattr(cls, "__deepcopy__")  # noqa: B009 - torch's, or the module's own

    def __deepcopy__(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
        replica: nn.Module = copier(self, memo)
        replica.__class__ = _own_class(type(replica))
        _rejoin_all(replica)
        return replica

    setattr(cls, "__deepcopy__", __deepcopy__)  # noqa: B010
    setattr(cls, "_fixed_rows_copies", True)  # noqa: B010


def is_fixed(module: nn.Module, name: str = "weight") -> bool:
    """Return whether ``module.<name>`` holds fixed rows: constrained by `FixedRows`, or on
    its tensor-parallel shards (`parallelize_fixed`, `fix_rows` on a sharded model).

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or ``name`` is not a non-empty str.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be a torch.nn.Module. Got {type(module).__name__}.")
    owner_name, attr = _split(name)
    try:
        owner = module.get_submodule(owner_name)
    except AttributeError:
        return False
    if not parametrize.is_parametrized(owner, attr):
        return False
    return any(isinstance(p, RowConstraint) for p in parametrization_list(owner, attr))


def fix_rows(
    module: nn.Module,
    reference: Tensor | nn.Module,
    *,
    name: str | None = None,
    rows: Tensor | Sequence[int] | None = None,
) -> nn.Module:
    r"""Hold rows of ``module.<name>`` at ``reference`` while the other rows train.

    ``reference`` is a tensor, or a module of ``module``'s class (the trained ``nn.Linear``
    head, say): then each of its parameters that ``module`` has too (``weight`` and ``bias``)
    holds the same rows of ``module``'s, in one call, all validated before any is changed.

    Registers `FixedRows` on the parameter and keeps ``module.state_dict()`` plain:
    the same keys and shapes as the unconstrained module. Loading a plain state dict loads
    its free rows; its fixed rows must equal the reference. The Parameter object is kept,
    so an optimizer created before the call still trains it if it holds no state for it yet
    (it has not stepped, and it is not one that makes state when created, as Adagrad does;
    such an optimizer is refused). After `bake`, create a new optimizer: the old one's state
    has the free rows' shape.

    ``module.<name>`` and its ``state_dict()`` entry are then computed from the reference and
    the stored rows; what code writes into them in place (``nn.init``, ``reset_parameters()``,
    an EMA update through the state dict, ``.data = ...``) reaches the stored rows, and a write
    to a fixed row is undone (`embedding_constraint.write_through`), except an assignment
    through ``.data`` (``weight.data = x``, ``weight.data += d``: PEFT's merge) that changes a
    fixed row, which is refused: bake first.

    A tensor that tensor parallelism sharded already (a ``DTensor`` that ``fully_shard`` does
    not manage: ``parallelize_module`` ran, or Hugging Face's ``tp_plan`` loaded the model) is
    constrained shard by shard on every rank, as
    `embedding_constraint.tensor_parallel.fix_parallelized` says.

    ``name`` may be dotted (``"transformer.wte.weight"``). Every module under ``module``
    that holds the same Parameter (an output head tied to the embedding) reads the
    constrained tensor, and the optimizer sees the parameter once.

    Args:
        module (nn.Module): the module, or a root module above it.
        reference (Tensor or nn.Module): the fixed rows' values, shape ``(k, *trailing)``, or
            a module of ``module``'s class whose parameters hold them.
        name (str, optional): the parameter, dotted under ``module``. Default: ``"weight"``
            for a tensor reference; left out for a module reference.
        rows (Tensor or sequence of int, optional): positions of the fixed rows, one per
            reference row. Default: ``None``, the first ``k`` rows.

    Returns:
        nn.Module: ``module``, constrained in place.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``; a reference module is of another class
            or comes with ``name``; or see `FixedRows`.
        ValueError: there is no such parameter, it is already parametrized, a module
            outside ``module`` holds it too (a tied head: pass the root and ``name=``), an
            optimizer already holds state of its full shape, it is
            an ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True`` or ``max_norm``, a
            reference module has a bias where ``module`` has none (or the reverse), or the
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
    references = references_of(module, reference, name=name)
    if _tensor_parallel_already(module, references):
        # Sharded before the constraint (Hugging Face's tp_plan loads a model so): each rank
        # constrains its shard, as `parallelize_fixed` would have.
        from embedding_constraint.tensor_parallel import fix_parallelized  # it imports this

        fix_parallelized(module, references, rows)
    else:
        plans = [_plan(module, value, key, rows) for key, value in references.items()]
        # Nothing below can fail on user input: the module changes only from here on.
        for plan in plans:
            _register(plan)
    if "transformers" in sys.modules:  # else no Hugging Face model can be under `module`
        # A Hugging Face model keeps tie_weights and resize_token_embeddings working, and
        # PEFT finds its tied head by name, as on the plain model.
        from embedding_constraint.peft_compat import declare_constrained_ties
        from embedding_constraint.transformers import keep_constraints_through_hf_methods

        keep_constraints_through_hf_methods(module)
        declare_constrained_ties(module)
    return module


def _tensor_parallel_already(module: nn.Module, names: Iterable[object]) -> bool:
    """Whether a tensor ``names`` has under ``module`` is a ``DTensor`` that ``fully_shard``
    does not manage: sharded by tensor parallelism (FSDP2's shards are refused as such)."""
    for name in names:
        if not isinstance(name, str):
            continue  # `_plan` says what is wrong with it, as below
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = module.get_submodule(owner_name)
        except AttributeError:
            continue
        if sharded(owner._parameters.get(attr)) and not fsdp_managed(owner):
            return True
    return False


def references_of(
    module: nn.Module,
    reference: object,
    *,
    name: str | None = None,
    argument: str = "reference",
    module_argument: str = "module",
    call: str = "fix_rows(new_module, old_module)",
) -> dict[str, Tensor]:
    """The tensors ``reference`` holds for ``module``, by parameter name (changes nothing).

    A tensor is the reference of ``name`` (default ``"weight"``); a module of ``module``'s
    class gives each of its parameters, which must be ``module``'s (a bias exactly when
    ``module`` has one). ``argument`` and ``module_argument`` name the two in messages, and
    ``call`` is the caller's call written the right way round, for a reference module with
    more rows than ``module`` (the arguments swapped, most likely).

    Raises:
        TypeError: ``reference`` is neither a tensor nor a module of ``module``'s class, or is
            a module given with ``name``.
        ValueError: a reference module has other parameters than ``module``, or more rows.
    """
    if isinstance(reference, Tensor):
        return {"weight" if name is None else name: reference}
    if not isinstance(reference, nn.Module):
        raise TypeError(
            f"Expected `{argument}` to be a torch.Tensor or a module like `{module_argument}`. "
            f"Got {type(reference).__name__}."
        )
    for attr in ("weight", "bias"):
        _check_unconstrained(module, attr, f"`{module_argument}.{attr}`")
    kind = type(module).__name__
    if type(reference) is not type(module):
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise TypeError(
            f"Expected `{argument}` to be {article} {kind} like `{module_argument}`, or a "
            f"tensor. Got {type(reference).__name__}."
        )
    if name is not None:
        raise TypeError(
            f"Expected `name` to be left out with a reference module: its parameters name "
            f"the tensors to constrain. Got name={name!r}."
        )
    found = {n: p for n, p in reference._parameters.items() if p is not None}
    mine = {n for n, p in module._parameters.items() if p is not None}
    if set(found) != mine:
        raise ValueError(
            f"Expected `{argument}` to have a bias exactly when `{module_argument}` has one, "
            f"and the parameters it has: {sorted(mine)}. Got {sorted(found)}."
        )
    weight, own = found.get("weight"), module._parameters.get("weight")
    if (
        isinstance(weight, Tensor)
        and isinstance(own, Tensor)
        and weight.dim()
        and own.dim()
        and weight.shape[0] > own.shape[0]
    ):
        raise ValueError(
            f"Expected `{argument}` (the trained module) to have at most as many rows as "
            f"`{module_argument}` (the module to train). Got {weight.shape[0]} rows in "
            f"`{argument}` and {own.shape[0]} in `{module_argument}`: the arguments may be "
            f"swapped. The call is {call}."
        )
    return {n: p.detach() for n, p in found.items()}


def _check_unconstrained(owner: nn.Module, attr: str, label: str) -> None:
    if parametrize.is_parametrized(owner, attr):
        raise ValueError(
            f"Expected {label} to be unconstrained. Got a tensor already parametrized (by "
            "fix_rows, say): call bake() before constraining it again."
        )


def check_reference(
    module: nn.Module,
    reference: Tensor,
    *,
    name: str = "weight",
    rows: Tensor | Sequence[int] | None = None,
    argument: str = "reference",
    module_argument: str = "module",
) -> FixedRows:
    """Check what `fix_rows` checks of ``reference`` and ``module.<name>`` alone; change nothing.

    That the tensor exists, is not constrained yet and fits the reference (`FixedRows` and
    `FixedRows.check_compatible`), and the lookup options of ``module``. Not checked here,
    since they need the root that is constrained: other holders of the Parameter (ties) and
    optimizers' state. ``argument`` and ``module_argument`` name the two in messages.

    Returns:
        FixedRows: the constraint, borrowing ``reference`` (`FixedRows.borrowing`).

    Raises:
        TypeError, ValueError: as `fix_rows` does, naming the caller's arguments.
    """
    owner, attr = owner_of(module, name)
    label = f"`{module_argument}.{name}`"
    _check_unconstrained(owner, attr, label)
    param = owner._parameters.get(attr)
    if param is None:
        available = [n for n, _ in module.named_parameters()]
        raise ValueError(
            f"Expected `{module_argument}` to have a parameter named {name!r}. "
            f"Got none; its parameters are {available}."
        )
    check_lookup_options(owner)
    constraint = FixedRows.borrowing(reference, rows=rows, argument=argument)
    constraint.check_compatible(param, argument=argument, tensor_name=label)
    return constraint


@dataclass(frozen=True)
class _Plan:
    """A checked registration of `FixedRows` on ``owner.<attr>``, not yet applied."""

    owner: nn.Module
    attr: str
    constraint: FixedRows
    holders: list[tuple[nn.Module, str]]
    orders: list[tuple[str, ...]]


def _plan(
    module: nn.Module,
    reference: Tensor,
    name: object,
    rows: Tensor | Sequence[int] | None,
    *,
    optimizers_follow: bool = False,
) -> _Plan:
    """Check everything `fix_rows` checks for one tensor, changing nothing.

    ``optimizers_follow``: the caller creates the optimizers afterwards (the Lightning callback),
    so state that an optimizer already holds belongs to one that will not train this fit.
    """
    _split(name)
    assert isinstance(name, str)
    # Registered by `_register`, at once: it borrows the reference.
    constraint = check_reference(module, reference, name=name, rows=rows)
    owner, attr = owner_of(module, name)
    param = owner._parameters[attr]
    assert param is not None  # `check_reference` found it
    if held_outside(module, param, "_parameters"):
        raise ValueError(
            f"Expected {name!r} to be held only by modules under `module`. Got a Parameter "
            "that a module outside it holds too (an output head tied to this embedding, say): "
            "constraining it here would change that module's tensor behind its back. Pass the "
            "root module that holds both, with the dotted name: "
            "fix_rows(model, reference, name='embedding.weight')."
        )
    if not optimizers_follow and _has_optimizer_state(param):
        raise ValueError(
            f"Expected no optimizer state for {name!r} yet. Got an optimizer, still alive, that "
            f"holds state made for its full shape {tuple(param.shape)} (it has stepped, or it "
            "makes its state when it is created, as Adagrad does): after fix_rows the parameter "
            "holds only the free rows, and its next step would fail. Create the optimizer after "
            "fix_rows (and let go of the old one)."
        )
    holders = holders_of(module, param)
    for holder, _ in holders:  # a tied holder's own options (the owner's are checked)
        check_lookup_options(holder)
    orders = [plain_parameter_order(holder) for holder, _ in holders]
    return _Plan(owner, attr, constraint, holders, orders)


def fix_rows_before_optimizers(
    module: nn.Module, reference: Tensor, *, name: str, rows: Tensor | Sequence[int] | None
) -> None:
    """`fix_rows` for a caller that creates the optimizers afterwards (the callback's ``setup``).

    An optimizer alive from an earlier fit may still hold state of the full weight; it does
    not train this one, so it is no reason to refuse.
    """
    _register(_plan(module, reference, name, rows, optimizers_follow=True))


def _register(plan: _Plan) -> None:
    """Apply a `_Plan`: register the constraint, share it with the other holders."""
    owner, attr = plan.owner, plan.attr
    parametrize.register_parametrization(owner, attr, plan.constraint)
    for (holder, holder_attr), order in zip(plan.holders, plan.orders, strict=True):
        if holder is not owner or holder_attr != attr:
            share_parametrization(owner, attr, holder, holder_attr)
        register_plain_hooks(holder, holder_attr, order)
        _set_up_class(holder, holder_attr)


def bake(module: nn.Module, *, name: str | None = None) -> nn.Module:
    r"""Replace a constrained ``module.<name>`` by a plain Parameter holding its current value.

    Without ``name``, every tensor under ``module`` that `fix_rows` constrained (a head's
    weight and bias, every constrained module under a root), all checked before any changes.

    The inverse of `fix_rows` (and of registering `FixedRows` by hand): the
    Parameter object is the one that was constrained, now of the full shape, with the fixed
    rows equal to the reference. Tied modules still share it afterwards.

    Under DeepSpeed's ZeRO-3, which partitions the stored rows, every rank must call it: the
    rows are gathered, and the module gets a new, whole Parameter (a new engine partitions it).
    A module whose weights `parallelize_fixed` sharded (or `fix_rows` on tensor-parallel
    shards) is baked by `embedding_constraint.tensor_parallel.bake_parallelized`, with the
    rest. A module that FSDP2 manages is
    baked by `embedding_constraint.fsdp.bake_fully_sharded`
    (every rank must call it). A class derived from the parametrized one (FSDP2's
    ``FSDPParametrizedEmbedding``) is kept, without the parametrized class (``FSDPEmbedding``).

    Args:
        module (nn.Module): the module, or a root module above it.
        name (str, optional): the parameter, dotted under ``module``. Default: ``None``, every
            constrained tensor under ``module``.

    Returns:
        nn.Module: ``module``, with a plain parameter in place.

    Raises:
        ValueError: nothing under ``module`` is constrained, ``module.<name>`` is not
            constrained by `FixedRows` alone, a module
            outside ``module`` reads it too (a tied head: bake from the root, with ``name=``),
            or FSDP2 shards it from a module above ``module``.
            The module is left unchanged.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be a torch.nn.Module. Got {type(module).__name__}.")
    if name is not None:
        _split(name)  # a str, before anything else is asked of it
    parallel = sys.modules.get("embedding_constraint.tensor_parallel")  # loaded if ever used
    # Tensors that `parallelize_fixed` (or `fix_rows` on tensor-parallel shards) constrained.
    shards = [] if parallel is None else parallel.parallelized(module)
    if name is not None:
        owner, attr = owner_of(module, name)
        if any(m is owner and a == attr for m, a in shards):
            return parallel.bake_parallelized(module, name=name)  # type: ignore[union-attr,no-any-return]
    names = [name] if name is not None else _fixed_names(module)
    if not names and not shards:
        raise ValueError(
            "Expected a tensor constrained by fix_rows under `module`. Got none: its "
            "parametrized tensors are "
            f"{[n for n, m in module.named_modules() if parametrize.is_parametrized(m)]}."
        )
    # Every constrained tensor, the tensor-parallel ones too, all checked before any bakes.
    bake_shards = parallel.prepare_bake(module) if shards and name is None else None  # type: ignore[union-attr]
    checked = [_bake_check(module, n) for n in names]
    if checked and dist.is_available() and _under_fsdp2(module, checked):
        from embedding_constraint.fsdp import bake_fully_sharded  # it imports this module

        bake_fully_sharded(module, name=name)
    elif checked:
        _bake_checked(module, checked)
    if bake_shards is not None:
        bake_shards()
    return module


def bake_unsharded(module: nn.Module, *, name: str) -> None:
    """`bake` ``module.<name>`` as it is, sharded or not (`bake_fully_sharded` then puts the
    baked weight into its FSDP2 group)."""
    _bake_checked(module, [_bake_check(module, name)])


def _under_fsdp2(
    module: nn.Module, checked: list[tuple[nn.Module, str, ParametrizationList]]
) -> bool:
    """Whether FSDP2 manages ``module`` or a constrained tensor's module under it: then a plain
    bake would leave a weight that FSDP2 does not know, and the next forward would fail."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules()) or any(
        fsdp_managed(owner) for owner, _, _ in checked
    )


def _bake_checked(
    module: nn.Module, checked: list[tuple[nn.Module, str, ParametrizationList]]
) -> None:
    """Bake each checked tensor (`_bake_check`) as it is."""
    for owner, attr, plist in checked:
        if not parametrize.is_parametrized(owner, attr):
            continue  # baked already, as a sharer of a tensor before it (tied weights)
        # DeepSpeed's ZeRO-3 partitions the stored rows (each rank holds a part): the whole
        # value is gathered first, and a new Parameter holds it; the partitioned one stays
        # DeepSpeed's, of the free rows' shape (a new engine partitions the baked one).
        whole = _gathered_whole(plist) if hasattr(plist.original, "ds_id") else None
        # Modules that share the parametrization (tied weights) get the stored Parameter back
        # first; baking the owner last then sets that same Parameter to the full value.
        sharers = [
            (holder, holder_attr)
            for holder in module.modules()
            if holder is not owner and holds_parametrizations(holder)
            for holder_attr in list(holder.parametrizations)  # type: ignore[arg-type]
            if parametrization_list(holder, holder_attr) is plist
        ]
        for holder, holder_attr in sharers:
            order = plain_parameter_order(holder)
            remove_parametrization(holder, holder_attr, leave_parametrized=False)
            remove_plain_hooks(holder, holder_attr)
            reorder_parameters(holder, order)
        order = plain_parameter_order(owner)
        remove_parametrization(owner, attr, leave_parametrized=whole is None)
        remove_plain_hooks(owner, attr)
        if whole is not None:
            stored = owner._parameters[attr]
            assert stored is not None  # torch put the stored rows back
            weight = nn.Parameter(whole, requires_grad=stored.requires_grad)
            for holder, holder_attr in [(owner, attr), *sharers]:
                holder._parameters[holder_attr] = weight
        reorder_parameters(owner, order)


def _gathered_whole(plist: ParametrizationList) -> Tensor:
    """The whole value of a constrained tensor whose stored rows DeepSpeed's ZeRO-3 partitions,
    gathered from every rank (a collective: every rank bakes together)."""
    import deepspeed  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from deepspeed.runtime.zero.partition_parameters import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        ZeroParamStatus,
    )

    # Gathered already inside the caller's GatheredParameters, which refuses to be nested.
    available = getattr(plist.original, "ds_status", None) == ZeroParamStatus.AVAILABLE
    gather = (
        contextlib.nullcontext()
        if available
        else deepspeed.zero.GatheredParameters([plist.original])
    )
    with gather, torch.no_grad():
        return cast(Tensor, plist()).detach().clone()


def remove_parametrization(module: nn.Module, attr: str, *, leave_parametrized: bool) -> None:
    """Torch's ``remove_parametrizations``, also on a class derived from the parametrized one.

    Torch deletes the tensor's property from ``module.__class__`` and, once nothing is left
    parametrized, sets the class to ``__class__.__bases__[0]``: right for the class that
    ``register_parametrization`` made, wrong for one derived from it, as ``fully_shard`` derives
    ``FSDPParametrizedEmbedding(FSDPModule, ParametrizedEmbedding)``. Torch then runs on the
    parametrized class itself, and the module gets the derived class back, remade without the
    parametrized class once torch has rolled that back (`_derived_without`).
    """
    derived = type(module)
    parametrized = parametrized_class(derived, attr)  # the class whose property torch deletes
    if parametrized is derived:
        with plain_reads():
            parametrize.remove_parametrizations(module, attr, leave_parametrized=leave_parametrized)
        return
    module.__class__ = parametrized
    try:
        with plain_reads():
            parametrize.remove_parametrizations(module, attr, leave_parametrized=leave_parametrized)
    finally:
        rolled_back = type(module)
        module.__class__ = (
            derived
            if rolled_back is parametrized
            else _derived_without(derived, parametrized, rolled_back)
        )


def _derived_without(cls: type, gone: type, base: type) -> type:
    """``cls`` remade with ``base`` where ``gone`` was among its ancestors.

    Each class between ``cls`` and ``gone`` keeps its name (``gone``'s part replaced by
    ``base``'s: ``FSDPParametrizedEmbedding`` becomes ``FSDPEmbedding``), its other bases and
    its attributes, so what the deriving library put there (FSDP2's ``FSDPModule`` mixin, its
    ``__deepcopy__``) stays.
    """
    if cls is gone:
        return base
    if gone not in cls.__mro__:
        return cls
    bases = tuple(_derived_without(b, gone, base) for b in cls.__bases__)
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    name = cls.__name__.replace(gone.__name__, base.__name__)
    own["__qualname__"] = cls.__qualname__.replace(gone.__name__, base.__name__)
    return type(cls)(name, bases, own)


def reorder_parameters(module: nn.Module, order: tuple[str, ...]) -> None:
    """Put ``module``'s parameters back in ``order`` (the unconstrained module's), which torch's
    ``remove_parametrizations`` does not keep: it adds the tensor back last."""
    params = module._parameters
    ordered = {name: params[name] for name in order if name in params}
    ordered.update((name, value) for name, value in params.items() if name not in ordered)
    params.clear()
    params.update(ordered)


def holds_parametrizations(module: nn.Module) -> bool:
    """Whether ``module`` holds parametrizations of its own.

    ``parametrize.is_parametrized`` also answers yes for a wrapper that forwards attribute
    reads to a parametrized module inside it (PEFT's ``ModulesToSaveWrapper`` reads
    ``parametrizations`` of its active copy): the tensors are that module's, not the wrapper's.
    """
    return isinstance(module._modules.get("parametrizations"), nn.ModuleDict)


def _fixed_names(module: nn.Module) -> list[str]:
    """The dotted names of every tensor under ``module`` that `FixedRows` constrains."""
    return [
        f"{prefix}.{attr}" if prefix else attr
        for prefix, holder in module.named_modules()
        if holds_parametrizations(holder)
        for attr in list(holder.parametrizations)
        if isinstance(parametrization_list(holder, attr)[0], FixedRows)
    ]


def fixed_tensors(module: nn.Module) -> list[tuple[str, FixedRows]]:
    """Each tensor under ``module`` that `FixedRows` constrains, once (tied holders: the first
    name), with its constraint."""
    seen: set[int] = set()
    found = []
    for name in _fixed_names(module):
        owner, attr = owner_of(module, name)
        plist = parametrization_list(owner, attr)
        if id(plist) not in seen:
            seen.add(id(plist))
            found.append((name, cast(FixedRows, plist[0])))
    return found


def constraint_of(root: nn.Module, name: str) -> FixedRows:
    """The `FixedRows` that constrains the tensor ``name`` under ``root``.

    Raises:
        ValueError: ``name`` is not constrained by `FixedRows`.
    """
    owner, attr = owner_of(root, name)
    if holds_parametrizations(owner) and attr in cast(nn.ModuleDict, owner.parametrizations):
        constraint = parametrization_list(owner, attr)[0]
        if isinstance(constraint, FixedRows):
            return constraint
    raise ValueError(f"Expected {name!r} to be constrained by fix_rows. Got a plain tensor.")


def stored_rows(root: nn.Module, name: str) -> Tensor:
    """The Parameter that holds the free rows of the constrained tensor ``name`` (what
    optimizers train).

    Raises:
        ValueError: ``name`` is not constrained by `FixedRows`.
    """
    constraint_of(root, name)
    owner, attr = owner_of(root, name)
    stored = parametrization_list(owner, attr).original
    assert isinstance(stored, Tensor)
    return stored


def _bake_check(module: nn.Module, name: str) -> tuple[nn.Module, str, ParametrizationList]:
    """Check everything `bake` checks for one tensor, changing nothing."""
    owner, attr = owner_of(module, name)
    if not parametrize.is_parametrized(owner, attr):
        if attr not in owner._parameters and attr not in owner._buffers:
            available = [
                n for n, _ in module.named_parameters() if "parametrizations." not in n
            ] + _fixed_names(module)
            raise ValueError(
                f"Expected `name` to name a tensor constrained by fix_rows. Got {name!r}, which "
                f"names no tensor; the module's tensors are {sorted(set(available))}."
            )
        raise ValueError(f"Expected {name!r} to be constrained by fix_rows. Got a plain tensor.")
    plist = parametrization_list(owner, attr)
    if len(plist) != 1 or not isinstance(plist[0], FixedRows):
        kinds = [type(p).__name__ for p in plist]
        raise ValueError(f"Expected {name!r} to be constrained by FixedRows alone. Got {kinds}.")
    if held_outside(module, plist, "_modules"):
        raise ValueError(
            f"Expected {name!r} to be read only by modules under `module`. Got a constrained "
            "tensor that a module outside it reads too (a tied output head, say): baking it "
            "here would leave that module reading a tensor of the wrong size. Bake from the "
            "root module that holds both, with the dotted name: "
            "bake(model, name='embedding.weight')."
        )
    return owner, attr, plist
