"""Tensor parallelism (``parallelize_module``) of constrained modules, with exact fixed rows.

Torch's ``RowwiseParallel`` and ``ColwiseParallel`` re-register every parameter of a module
under its ``named_parameters()`` name, which for a constrained module is the dotted
``parametrizations.weight.original``: ``parallelize_module`` fails there (``KeyError:
parameter name can't contain "."``). `parallelize_fixed` is the call to make instead: it
checks the plan, bakes each constrained tensor into the plain weight, lets
``parallelize_module`` shard that as usual, and constrains each rank's shard again with
`_FixedShard`: the fixed rows that fall into the rank's slice, at the reference's values.

Under tensor parallelism the stored parameter is torch's ``DTensor`` shard of the whole weight
(fixed rows included, as an unconstrained weight's), so optimizers, ``clip_grad_norm_`` and
distributed checkpoints see the layout they see without the constraint. The fixed rows in it get
a zero gradient and are never read: the weight reads the reference there. `bake_parallelized`
turns the result into a plain sharded weight.

A model sharded before the constraint (Hugging Face's ``tp_plan`` loads one so) is constrained
by `fix_rows` on its shards, which hands them to `fix_parallelized`: the same `_FixedShard`,
made from the reference. ``fully_shard`` over a constrained tensor-parallel model (2-D)
splits the stored shard again; `_FixedShard` finds the fixed rows in any split of it, and
`bake_parallelized` puts the plain weight into the FSDP2 group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.utils import parametrize

from embedding_constraint.fix_rows import (
    bake,
    check_lookup_options,
    fixed_tensors,
    held_outside,
    holders_of,
    keep_copies_apart,
    owner_of,
    remove_parametrization,
    reorder_parameters,
    share_parametrization,
)
from embedding_constraint.fixed_rows import FixedRows, RowConstraint, parametrization_list
from embedding_constraint.state_dict import (
    any_on_mesh,
    narrower_dtype,
    plain_parameter_order,
    put_plain_entry,
    whole_from_first_rank,
)
from embedding_constraint.torch_internals import (
    fsdp_managed,
    fsdp_param_group,
    fsdp_params_managing,
    replace_fsdp_params,
    splits_rows,
)

__all__ = ["bake_parallelized", "fix_parallelized", "parallelize_fixed"]

# Styles that change no parameter: a constrained module under them keeps its constraint as is.
_INPUT_OUTPUT_ONLY = (PrepareModuleInput, PrepareModuleOutput, PrepareModuleInputOutput)


class _FixedShard(RowConstraint):
    """The parametrization of one rank's shard: the reference at the fixed rows it holds.

    ``ids`` are the fixed rows the rank's tensor-parallel shard holds (their rows of the whole
    weight), ``reference`` their values there (the reference laid out like the weight: a
    vocabulary slice of it for a ``Shard(0)`` weight, the local columns for ``Shard(1)``) and
    ``rows`` their positions in the shard. The stored rows at those positions get a zero
    gradient and are never read.

    ``fully_shard`` over the tensor-parallel module (2-D FSDP2 x tensor parallel) splits the
    stored shard's rows further over the data-parallel ranks; it gathers them for the forward,
    which reads the tensor-parallel layout above. A read of the split rows (outside the
    forward: ``state_dict()``, ``module.weight``) finds the fixed rows that the rank holds of
    them from ``ids``, with no collective (`here`).
    """

    ids: Tensor
    reference: Tensor
    rows: Tensor

    def __init__(self, stored: DTensor, ids: Tensor, rows: Tensor, reference: Tensor) -> None:
        super().__init__()
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("reference", reference, persistent=False)
        self._layout = (stored.device_mesh, tuple(stored.placements))

    def forward(self, stored: Tensor) -> Tensor:
        if not isinstance(stored, DTensor):
            raise TypeError(
                "Expected the stored rows of a tensor-parallel constrained weight to be a "
                f"DTensor. Got a {type(stored).__name__}: the module was changed after it was "
                "constrained."
            )
        rows, reference = self.here(stored)
        local = stored.to_local()
        pinned = local.index_put((rows,), reference.to(local.dtype))
        weight = DTensor.from_local(
            pinned,
            stored.device_mesh,
            stored.placements,
            run_check=False,
            shape=stored.shape,
            stride=stored.stride(),
        )
        if not (torch.is_grad_enabled() and stored.requires_grad):
            return weight
        # A no-op forward. Its backward brings the gradient into the stored placements
        # differentiably: from_local's own backward redistributes a gradient in another
        # placement (a vocabulary-split lookup's comes replicated) as a constant, which would
        # lose the second derivatives (a gradient penalty) that the unconstrained module keeps.
        return weight.redistribute(stored.device_mesh, stored.placements)

    def right_inverse(self, value: Tensor) -> Tensor:
        return value

    def in_its_layout(self, stored: DTensor) -> bool:
        """Whether ``stored`` is laid out as the tensor-parallel shard the rows are for."""
        return (stored.device_mesh, tuple(stored.placements)) == self._layout

    def here(self, stored: DTensor) -> tuple[Tensor, Tensor]:
        """The fixed rows in this rank's part of ``stored``: (local positions, their values)."""
        if self.in_its_layout(stored):
            return self.rows, self.reference
        local_ids = _local_row_ids(stored)
        rows, at = _rows_among(local_ids, self.ids, stored.shape[0])
        reference = self.reference.to(local_ids.device)[at]
        local = stored.to_local()
        if reference.shape[1:] != local.shape[1:]:  # another split of the columns
            raise ValueError(
                "Expected the stored rows of a tensor-parallel constrained weight to be split "
                "further by rows only (fully_shard's default Shard(0)). Got placements "
                f"{list(stored.placements)} on a {stored.device_mesh.ndim}-D mesh, which split "
                f"its columns to {tuple(local.shape[1:])} from {tuple(reference.shape[1:])}: "
                "shard_placement_fn must keep Shard(0) for it."
            )
        return rows, reference

    def in_tensor_parallel_layout(self, stored: DTensor) -> DTensor:
        """``stored`` gathered over the data-parallel ranks (a collective) where ``fully_shard``
        splits it: this rank's tensor-parallel shard, the layout ``parallelize_fixed`` made."""
        mesh, placements = self._layout
        detached = cast(DTensor, stored.detach())
        if self.in_its_layout(stored):
            return detached
        data_parallel = stored.device_mesh.ndim - mesh.ndim  # fully_shard puts its dims first
        kept = [Replicate()] * data_parallel + list(stored.placements[data_parallel:])
        whole = detached.redistribute(stored.device_mesh, kept).to_local()
        return DTensor.from_local(
            whole, mesh, placements, run_check=False, shape=stored.shape, stride=stored.stride()
        )

    def pin(self, stored: DTensor) -> None:
        """Write the reference into the stored fixed rows (before a bake)."""
        rows, reference = self.here(stored)
        with torch.no_grad():
            local = stored.to_local()
            local[rows] = reference.to(local.dtype)

    def extra_repr(self) -> str:
        return f"fixed_here={self.rows.numel()}"


def _local_row_ids(stored: DTensor) -> Tensor:
    """Which rows of the whole tensor this rank's part of ``stored`` holds, in its order.

    Torch's own splitting decides: the row numbers, distributed as ``stored``'s rows are (each
    rank takes its part, no collective; a placement that does not split rows keeps them all).
    """
    device = stored.to_local().device
    placements = [p if splits_rows(p) else Replicate() for p in stored.placements]
    ids = torch.arange(stored.shape[0], device=device)
    spread = distribute_tensor(ids, stored.device_mesh, placements, src_data_rank=None)
    # On the shard's device: torch puts the spread on the mesh's (CPU offload keeps the shard
    # on the host of a CUDA mesh).
    return spread.to_local().to(device)


@dataclass(frozen=True)
class _Target:
    """One constrained tensor to parallelize: where it is and which style shards it."""

    name: str
    owner: nn.Module
    attr: str
    order: tuple[str, ...]


def _styles(
    module: nn.Module, plan: ParallelStyle | Mapping[str, ParallelStyle], prefix: str = ""
) -> Iterator[tuple[str, nn.Module, ParallelStyle]]:
    """Each (name, module, style) that ``parallelize_module(module, mesh, plan)`` applies.

    The same matching as torch's: plan keys are dotted paths of ``fnmatch`` patterns, one
    pattern per level of ``named_children``.
    """
    if isinstance(plan, ParallelStyle):
        yield prefix, module, plan
        return
    for path, style in plan.items():
        if path == "":
            yield prefix, module, style
            continue
        token, _, rest = path.partition(".")
        for child_name, child in module.named_children():
            if fnmatch(child_name, token):
                child_prefix = f"{prefix}.{child_name}" if prefix else child_name
                yield from _styles(child, {rest: style} if rest else style, child_prefix)


def _check_style(name: str, module: nn.Module, style: ParallelStyle) -> None:
    """Refuse a style that cannot shard a constrained ``module`` (named ``name``)."""
    plain = parametrize.type_before_parametrizations(module)
    kind = plain.__name__
    layout = f"{type(style).__name__} on the constrained {kind} {name!r}"
    if isinstance(style, RowwiseParallel | ColwiseParallel):
        if plain not in (nn.Embedding, nn.Linear):
            raise ValueError(
                f"Expected a constrained nn.Embedding or nn.Linear under {type(style).__name__} "
                f"(the modules torch's style shards). Got {layout}."
            )
        return
    if isinstance(style, SequenceParallel | _INPUT_OUTPUT_ONLY):
        return
    raise ValueError(
        "Expected RowwiseParallel, ColwiseParallel, SequenceParallel or PrepareModuleInput/"
        f"Output on a constrained module. Got {layout}: a style that parallelize_fixed does "
        "not know may lay out the weight in a way the fixed rows cannot follow."
    )


def _targets(
    module: nn.Module, device_mesh: object, plan: object
) -> tuple[list[_Target], dict[str, FixedRows]]:
    """Check everything `parallelize_fixed` checks, changing nothing."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be a torch.nn.Module. Got {type(module).__name__}.")
    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(
            "Expected `device_mesh` to be a 1-D DeviceMesh, the tensor-parallel one. "
            f"Got {type(device_mesh).__name__}."
        )
    if device_mesh.ndim != 1:
        raise ValueError(
            "Expected `device_mesh` to be a 1-D DeviceMesh, the tensor-parallel one "
            f"(mesh['tensor_parallel'] of a 2-D mesh). Got a {device_mesh.ndim}-D DeviceMesh."
        )
    if not isinstance(plan, ParallelStyle | Mapping) or (
        isinstance(plan, Mapping)
        and not all(isinstance(k, str) and isinstance(v, ParallelStyle) for k, v in plan.items())
    ):
        raise TypeError(
            "Expected `parallelize_plan` to be a ParallelStyle or a dict of module names to "
            f"ParallelStyles, as parallelize_module takes. Got {type(plan).__name__}."
        )
    styles = {id(m): (n, m, s) for n, m, s in _styles(module, plan)}
    targets, constraints = [], {}
    for name, constraint in fixed_tensors(module):
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        plist = parametrization_list(owner, attr)
        if isinstance(plist.original, DTensor):
            raise ValueError(  # noqa: TRY004 - as fix_rows refuses a DTensor
                f"Expected {name!r} not to be sharded yet. Got a DTensor: fully_shard or "
                "parallelize_module ran before parallelize_fixed. Constrain, then parallelize."
            )
        if len(plist) != 1:
            kinds = [type(p).__name__ for p in plist]
            raise ValueError(
                f"Expected {name!r} to be constrained by FixedRows alone. Got {kinds}."
            )
        held = [
            m for m in module.modules()
            if parametrize.is_parametrized(m)
            for a in list(m.parametrizations)  # type: ignore[arg-type]
            if parametrization_list(m, a) is plist
        ]  # fmt: skip
        applied = [styles[id(m)] for m in held if id(m) in styles]
        if applied and len(held) > 1:
            raise ValueError(
                f"Expected {name!r} to be read by one module under tensor parallelism. Got it "
                f"tied to {len(held)} modules (an output head tied to the embedding, say): "
                "parallelize_module gives each module a parameter of its own, which unties them. "
                "Untie the head, or leave these modules out of the plan."
            )
        for style_name, style_module, style in applied:
            _check_style(style_name, style_module, style)
        if applied:
            targets.append(_Target(name, owner, attr, plain_parameter_order(owner)))
            constraints[name] = constraint
    return targets, constraints


def _fix_shard(stored: DTensor, fixed: Tensor, reference: Tensor | None = None) -> _FixedShard:
    """The parametrization of this rank's shard ``stored`` of a weight whose ``fixed`` rows
    (global positions) are held at ``reference``'s rows (``None``: their values in ``stored``,
    the reference baked in)."""
    local_ids = _local_row_ids(stored)
    rows, at = _rows_among(local_ids, fixed, stored.shape[0])
    if reference is None:
        values = stored.to_local()[rows].detach().clone()
    else:  # the rank's part of each reference row: its columns, where the weight splits them
        placements = [Replicate() if splits_rows(p) else p for p in stored.placements]
        whole_rows = reference.detach().to(device=local_ids.device, dtype=stored.dtype)
        spread = distribute_tensor(whole_rows, stored.device_mesh, placements, src_data_rank=None)
        values = spread.to_local().to(local_ids.device)[at].clone()
    return _FixedShard(stored, local_ids[rows], rows, values)


def _rows_among(local_ids: Tensor, fixed: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Where the ``fixed`` rows lie among a rank's rows ``local_ids`` (both global positions):
    (their local positions, in order, and the index of each into ``fixed``)."""
    slot = torch.full((vocab,), -1, dtype=torch.long, device=local_ids.device)
    slot[fixed.to(local_ids.device)] = torch.arange(fixed.numel(), device=slot.device)
    found = slot[local_ids]
    rows = (found >= 0).nonzero().flatten()
    return rows, found[rows]


def parallelize_fixed(
    module: nn.Module,
    device_mesh: DeviceMesh,
    parallelize_plan: ParallelStyle | Mapping[str, ParallelStyle],
    *,
    src_data_rank: int | None = 0,
) -> nn.Module:
    r"""``parallelize_module`` for a module with constrained tensors: the fixed rows stay exact.

    Call it in place of ``torch.distributed.tensor.parallel.parallelize_module``, after
    `fix_rows` (every rank calls it). Each constrained tensor that the plan shards is baked
    into the plain weight, sharded by torch's style and constrained again on every rank: the
    rank's shard reads the reference at the fixed rows it holds (the vocabulary slice of the
    fixed rows, for ``RowwiseParallel`` on an ``nn.Embedding`` and ``ColwiseParallel`` on an
    ``nn.Linear`` head). ``module.state_dict()`` keeps the plain keys, with ``DTensor`` values
    laid out as the unconstrained weight's. Make the optimizer afterwards.

    Args:
        module (nn.Module): the root module, constrained with `fix_rows`.
        device_mesh (DeviceMesh): the 1-D tensor-parallel mesh.
        parallelize_plan (ParallelStyle or dict): as ``parallelize_module`` takes it.
        src_data_rank (int or None, optional): as ``parallelize_module`` takes it. Default: 0.

    Returns:
        nn.Module: ``module``, parallelized in place.

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or the plan is not a plan.
        ValueError: the mesh is not 1-D; a constrained tensor is sharded already, is tied to
            another module (parallelize_module would untie them), is stacked under another
            parametrization, or the plan gives its module a style other than
            ``RowwiseParallel``/``ColwiseParallel`` (on ``nn.Embedding``/``nn.Linear``),
            ``SequenceParallel`` or ``PrepareModuleInput``/``Output``. Nothing is changed.
    """
    targets, constraints = _targets(module, device_mesh, parallelize_plan)
    fixed = {t.name: constraints[t.name].fixed_row_indices() for t in targets}
    # Nothing below can fail on user input: the module changes only from here on.
    for target in targets:
        bake(module, name=target.name)
    plan = (
        parallelize_plan if isinstance(parallelize_plan, ParallelStyle) else dict(parallelize_plan)
    )
    parallelize_module(module, device_mesh, plan, src_data_rank=src_data_rank)
    for target in targets:
        stored = getattr(target.owner, target.attr)  # torch's new Parameter, a DTensor
        assert isinstance(stored, DTensor)
        parametrize.register_parametrization(
            target.owner, target.attr, _fix_shard(stored, fixed[target.name])
        )
        keep_copies_apart(type(target.owner))
        _PlainKeys(target.attr, target.order).register(target.owner)
    return module


def fix_parallelized(
    module: nn.Module,
    references: Mapping[str, Tensor],
    rows: Tensor | Sequence[int] | None,
) -> None:
    """`fix_rows` for tensors that tensor parallelism sharded already (``parallelize_module``,
    or Hugging Face's ``from_pretrained(..., tp_plan=...)``, which loads a model sharded).

    Each tensor of ``references`` (by dotted name under ``module``) is constrained as
    `parallelize_fixed` leaves it: each rank's shard reads the reference at the fixed rows it
    holds (its part of each of them, where the weight splits its columns), and the stored shard
    gets the reference there too. Every rank calls it with the same reference. All checked
    before anything changes.

    Raises:
        TypeError, ValueError: as `fix_rows` does; a tensor of a reference module is not sharded
            as the others are; a tensor lies on a mesh of more than one dimension (2-D: constrain
            it before ``fully_shard``), or is laid out other than by ``Shard`` and ``Replicate``
            placements; a module outside ``module`` holds it too (a tied head: pass the root).
    """
    plans = [_check_parallelized(module, name, value, rows) for name, value in references.items()]
    # Every module under `module` that holds the Parameter (a head tied to the embedding, which
    # Hugging Face's tp_plan keeps tied) reads the constrained tensor, as under `fix_rows`.
    holders = [holders_of(module, stored) for _, _, stored, _ in plans]
    orders = [[plain_parameter_order(h) for h, _ in found] for found in holders]  # before any
    # Nothing below can fail on user input: the module changes only from here on.
    for (owner, attr, stored, constraint), found, order in zip(plans, holders, orders, strict=True):
        shard = _fix_shard(stored, constraint.fixed_row_indices(), constraint.reference)
        shard.pin(stored)
        parametrize.register_parametrization(owner, attr, shard)
        for (holder, holder_attr), holder_order in zip(found, order, strict=True):
            if holder is not owner or holder_attr != attr:
                share_parametrization(owner, attr, holder, holder_attr)
            keep_copies_apart(type(holder))
            _PlainKeys(holder_attr, holder_order).register(holder)


def _check_parallelized(
    module: nn.Module, name: str, reference: Tensor, rows: Tensor | Sequence[int] | None
) -> tuple[nn.Module, str, DTensor, FixedRows]:
    """Check what `fix_parallelized` checks of ``module.<name>``, changing nothing."""
    owner, attr = owner_of(module, name)
    stored: object = owner._parameters.get(attr)
    label = f"`module.{name}`"
    if not isinstance(stored, DTensor):
        raise ValueError(  # noqa: TRY004 - as fix_rows refuses a tensor it cannot constrain
            f"Expected {label} to be sharded by tensor parallelism, as the other tensors of the "
            f"reference module are. Got a {type(stored).__name__}."
        )
    layout = f"placements {list(stored.placements)} on a {stored.device_mesh.ndim}-D mesh"
    if stored.device_mesh.ndim != 1:
        raise ValueError(
            f"Expected {label} to be sharded by tensor parallelism alone (a 1-D mesh). Got "
            f"{layout}: constrain it before fully_shard (fix_rows, then parallelize, then "
            "fully_shard)."
        )
    if not all(isinstance(p, Shard | Replicate) for p in stored.placements):
        raise ValueError(
            f"Expected {label} to be laid out by Shard or Replicate placements. Got {layout}."
        )
    check_lookup_options(owner)
    if held_outside(module, stored, "_parameters"):
        raise ValueError(
            f"Expected {label} to be held only by modules under `module`. Got a Parameter that "
            "a module outside it holds too (an output head tied to this embedding, say): pass "
            "the root module that holds both, with the dotted name."
        )
    for holder, _ in holders_of(module, stored):
        check_lookup_options(holder)
    constraint = FixedRows.borrowing(reference, rows=rows)
    # The checks need the tensor's shape and dtype only, which a meta tensor has.
    stand_in = torch.empty(stored.shape, dtype=stored.dtype, device="meta")
    constraint.check_compatible(stand_in, tensor_name=label)
    return owner, attr, stored, constraint


class _PlainKeys:
    """State-dict hooks: ``<prefix><attr>`` holds the constrained weight (a DTensor).

    Held by the module's own hook registries only (`_plain_keys_of` finds them there), so a
    copy of the module (``copy.deepcopy``) carries hooks of its own.
    """

    def __init__(self, attr: str, order: tuple[str, ...]) -> None:
        self.attr, self.order = attr, order

    def register(self, module: nn.Module) -> None:
        # The object itself: torch marks the hook, which a bound method cannot take.
        module.register_state_dict_post_hook(self)  # type: ignore[no-untyped-call]
        module.register_load_state_dict_pre_hook(self.load)  # type: ignore[no-untyped-call]

    def remove(self, module: nn.Module) -> None:
        for registry in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
            for handle_id, hook in list(registry.items()):
                if _as_plain_keys(hook) is self:
                    del registry[handle_id]

    def __call__(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any
    ) -> None:
        inner = f"{prefix}parametrizations.{self.attr}."
        if inner + "original" not in state_dict:
            return
        with torch.no_grad():
            value = getattr(module, self.attr).detach()
        put_plain_entry(state_dict, prefix, self.attr, value, self.order)

    def load(
        self,
        module: nn.Module,
        state_dict: dict[str, Any],
        prefix: str,
        metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load the plain entry into the stored shard, checking its fixed rows on every rank.

        A ``DTensor`` (a sharded state dict: this rank's part) loads as it is. A whole tensor
        (``full_state_dict=True``), or none where the first rank holds one
        (``broadcast_from_rank0=True``), is the first rank's on every rank, split as the stored
        shard is. Fixed rows that differ on any rank refuse the load on every rank (a small
        all-reduce), so the ranks keep one model.
        """
        key, inner = prefix + self.attr, f"{prefix}parametrizations.{self.attr}.original"
        plist = parametrization_list(module, self.attr)
        constraint, stored = plist[0], plist.original
        assert isinstance(constraint, _FixedShard)
        assert isinstance(stored, DTensor)
        own, incoming = state_dict.get(inner), state_dict.get(key)
        if not isinstance(incoming, DTensor) and (
            key in state_dict or own is None or own is stored
        ):
            state_dict.pop(key, None)
            whole = whole_from_first_rank(stored, incoming, tuple(stored.shape))
            if whole is None:
                missing_keys.append(key)
                state_dict[inner] = stored
                return
            if isinstance(whole, str):
                error_msgs.append(f"size mismatch for {key}: {whole}")
                state_dict[inner] = stored
                return
            placements = list(stored.placements)
            value = distribute_tensor(whole, stored.device_mesh, placements, src_data_rank=None)
        elif isinstance(incoming, DTensor):
            value = state_dict.pop(key)
            if tuple(value.shape) != tuple(stored.shape):  # the same on every rank
                error_msgs.append(
                    f"size mismatch for {key}: expected a tensor of shape "
                    f"{tuple(stored.shape)}, got {tuple(value.shape)}."
                )
                state_dict[inner] = stored
                return
        else:
            return
        rows, reference = constraint.here(value)
        held = value.to_local()[rows]
        # In the narrower of the two dtypes, as a whole tensor loads (a checkpoint of a run in
        # a lower precision holds the reference rounded to it).
        narrow = narrower_dtype(held.dtype, reference.dtype)
        held, reference = held.to(reference.device, narrow), reference.to(narrow)
        if any_on_mesh(not torch.equal(held, reference), stored):
            error_msgs.append(
                f"Expected the fixed rows of {key!r} to equal the reference (they are held "
                "fixed). Got other values on at least one rank."
            )
            state_dict[inner] = stored
            return
        state_dict[inner] = value


def _as_plain_keys(hook: object) -> _PlainKeys | None:
    """The `_PlainKeys` behind a hook of a module's registry, or None."""
    target = getattr(hook, "hook", hook)  # torch keeps load pre-hooks wrapped in .hook
    target = getattr(target, "__self__", target)  # and ours are bound methods there
    return target if isinstance(target, _PlainKeys) else None


def _plain_keys_of(module: nn.Module, attr: str) -> _PlainKeys:
    """The `_PlainKeys` that ``module`` keeps for its tensor ``attr``."""
    for hook in module._state_dict_hooks.values():
        found = _as_plain_keys(hook)
        if found is not None and found.attr == attr:
            return found
    raise AssertionError(f"no plain-key hooks for {attr!r}")  # registered with the constraint


def parallelized(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Each module and tensor name under ``module`` that `parallelize_fixed` constrained."""
    return [
        (m, attr)
        for m in module.modules()
        if parametrize.is_parametrized(m)
        for attr in list(m.parametrizations)  # type: ignore[arg-type]
        if isinstance(parametrization_list(m, attr)[0], _FixedShard)
    ]


def bake_parallelized(module: nn.Module, *, name: str | None = None) -> nn.Module:
    """Replace every tensor-parallel constrained weight under ``module`` by a plain one.

    The stored ``DTensor`` Parameter becomes the module's weight again, with the reference in
    its fixed rows: the model trains on as an unconstrained tensor-parallel one. Under
    ``fully_shard`` as well (2-D FSDP2 x tensor parallel), the plain weight takes the stored
    rows' place in their FSDP2 group, as `embedding_constraint.fsdp.bake_fully_sharded` does:
    pass the module that ``fully_shard`` was called on, or a root above it. Every rank calls it
    (`bake` calls it for such a module), outside a forward and backward; make a new optimizer
    afterwards (the fixed rows train from then on).

    Args:
        module (nn.Module): a module parallelized by `parallelize_fixed`, or a root above it.
        name (str, optional): the constrained tensor, dotted under ``module``. Default:
            ``None``, every one under ``module``.

    Raises:
        ValueError: nothing under ``module`` (or at ``name``) was constrained by
            `parallelize_fixed`, or ``fully_shard`` manages it from a module above ``module``.
            Nothing is changed.
    """
    prepare_bake(module, name=name)()
    return module


def prepare_bake(module: nn.Module, *, name: str | None = None) -> Callable[[], None]:
    """Check what `bake_parallelized` checks, changing nothing; return the call that bakes.

    `bake` checks every constrained tensor before it bakes any: the tensor-parallel ones here.

    Raises:
        ValueError: as `bake_parallelized` does.
    """
    found = parallelized(module)
    if name is not None:
        named, attr = owner_of(module, name)
        found = [(m, a) for m, a in found if m is named and a == attr]
    if not found:
        where = "under `module`" if name is None else f"at {name!r}"
        raise ValueError(f"Expected a tensor constrained by parallelize_fixed {where}. Got none.")
    everyone = parallelized(module)
    ties: dict[int, list[tuple[nn.Module, str]]] = {}  # each tensor's holders (tied modules)
    for owner, attr in found:
        plist = parametrization_list(owner, attr)
        ties.setdefault(
            id(plist), [(m, a) for m, a in everyone if parametrization_list(m, a) is plist]
        )
        if held_outside(module, plist, "_modules"):
            raise ValueError(
                f"Expected the tensor-parallel {attr!r} of a {type(owner).__name__} to be read "
                "only by modules under `module`. Got one that a module outside it reads too (a "
                "tied head): bake from the root module that holds both."
            )
    for fsdp_module in module.modules():
        if isinstance(fsdp_module, FSDPModule):
            fsdp_module.reshard()  # the stored rows are the shards FSDP2 manages
    names = {id(m): n for n, m in module.named_modules()}
    plans = [(holders, _fsdp_param_of(module, *holders[0])) for holders in ties.values()]
    for holders, _ in plans:  # a layout that `pin` cannot pin raises here, not half-way
        plist = parametrization_list(*holders[0])
        constraint, stored = plist[0], plist.original
        assert isinstance(constraint, _FixedShard)
        assert isinstance(stored, DTensor)
        constraint.here(stored)

    def apply() -> None:
        _bake(plans, names)

    return apply


def _bake(
    plans: list[tuple[list[tuple[nn.Module, str]], tuple[object, object] | None]],
    names: dict[int, str],
) -> None:
    """Bake each checked tensor (its holders, and its FSDP2 group if any) of ``plans``."""
    for holders, managed in plans:  # every check is done: the module changes from here on
        plist = parametrization_list(*holders[0])
        constraint, stored = plist[0], plist.original
        assert isinstance(constraint, _FixedShard)
        assert isinstance(stored, DTensor)
        constraint.pin(stored)
        for holder, holder_attr in holders:
            hooks = _plain_keys_of(holder, holder_attr)
            hooks.remove(holder)
            remove_parametrization(holder, holder_attr, leave_parametrized=False)
            reorder_parameters(holder, hooks.order)  # torch puts the weight back last
        if managed is not None:
            group, fsdp_param = managed
            whole = constraint.in_tensor_parallel_layout(stored)
            weight = nn.Parameter(whole, requires_grad=stored.requires_grad)
            for holder, holder_attr in holders:
                holder._parameters[holder_attr] = weight
            owner, attr = holders[0]
            qualified = f"{names[id(owner)]}.{attr}" if names[id(owner)] else attr
            replace_fsdp_params(group, [fsdp_param], weight, holders, qualified)


def _fsdp_param_of(module: nn.Module, owner: nn.Module, attr: str) -> tuple[object, object] | None:
    """The FSDP2 group under ``module`` and its ``FSDPParam`` that shard ``owner.<attr>``'s
    stored rows; None where ``fully_shard`` does not shard them (it does not manage the
    module, or ``ignored_params`` holds them: they keep the tensor-parallel layout)."""
    plist = parametrization_list(owner, attr)
    constraint, stored = plist[0], plist.original
    assert isinstance(constraint, _FixedShard)
    assert isinstance(stored, DTensor)
    if not fsdp_managed(owner) or constraint.in_its_layout(stored):
        return None
    for fsdp_module in module.modules():
        group = fsdp_param_group(fsdp_module) if isinstance(fsdp_module, FSDPModule) else None
        found = [] if group is None else fsdp_params_managing(group, [stored])
        if found:
            return group, found[0]
    raise ValueError(
        f"Expected an FSDP2 group under `module` that manages the tensor-parallel {attr!r} of "
        f"a {type(owner).__name__}. Got none: fully_shard was called on a module above "
        "`module`. Pass that module."
    )
