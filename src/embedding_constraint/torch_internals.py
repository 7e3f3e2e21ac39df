"""Every private torch interface this package relies on, in one place: what each is, why no
public API does it, and the test that pins it (tests/test_torch_internals.py).

A torch release that changes one of them fails that test by name, rather than a training run
somewhere else in the package. Nothing else in the package reaches into torch's private names.

- The parametrized class (``torch.nn.utils.parametrize``). ``register_parametrization`` gives
  the module a class of its own, ``Parametrized<Name>``, whose single base is the module's
  class, and puts the tensor's property on that class; ``remove_parametrizations`` deletes the
  property from ``module.__class__`` and, once nothing is left parametrized, sets the class to
  ``__class__.__bases__[0]``. `fix_rows` adds its reads to that class and keeps it apart
  between modules (`parametrized_original`, `parametrized_class`). Tied weights read one
  parametrization from several modules, which no public call sets up: torch's
  ``_inject_new_class`` and ``_inject_property`` do it (`inject_parametrized_property`).
- The mark ``fully_shard`` leaves on each module it manages, ``_is_fsdp_managed_module``
  (for Dynamo): the only sign on a module below the one ``fully_shard`` was called on, which
  is no ``FSDPModule`` (`fsdp_managed`).
- FSDP2's parameter groups (``torch.distributed.fsdp._fully_shard``): one ``FSDPParamGroup``
  per ``fully_shard`` call, holding an ``FSDPParam`` per parameter it shards. FSDP2 has no
  public call to swap a parameter it manages, which baking a constrained weight needs: its
  stored rows (and reference) give way to the plain weight (`fsdp_param_group`,
  `fsdp_params_managing`, `replace_fsdp_params`).
- The placement FSDP2 gives the rows of a tensor-parallel weight that it shards further,
  ``_StridedShard(0)`` (``torch.distributed.tensor.placement_types``): a public ``Shard``
  does not say it splits the rows (``is_shard(0)`` is false), so a rank's rows under 2-D
  FSDP2 x tensor parallel are found by asking for it by type (`splits_rows`).
- Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``) is active:
  ``torch._C._are_functorch_transforms_active``, what torch's own ``autograd.Function.apply``
  asks; there is no public test (`functorch_transform_active`).
- DDP's logging data (``DistributedDataParallel._get_ddp_logging_data``, a documented
  debugging interface, marked a prototype): the only record of the parameter bytes DDP was
  built for (`ddp_recorded_parameter_bytes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "ddp_recorded_parameter_bytes",
    "fsdp_managed",
    "fsdp_param_group",
    "fsdp_params_managing",
    "functorch_transform_active",
    "inject_parametrized_property",
    "parametrized_class",
    "parametrized_original",
    "replace_fsdp_params",
]


# -- the parametrized class ---------------------------------------------------------------------


def inject_parametrized_property(module: nn.Module, attr: str) -> None:
    """Give ``module`` the parametrized class and property for ``attr``, as
    ``register_parametrization`` does, without registering a parametrization.

    ``module.<attr>`` must be gone already (deleted from its parameters); the caller then puts
    a ``ParametrizationList`` under ``module.parametrizations[attr]``, which this creates as an
    empty ``ModuleDict`` on a module not yet parametrized (torch's own steps, in its order).
    """
    if not parametrize.is_parametrized(module):
        parametrize._inject_new_class(module)
        module.parametrizations = nn.ModuleDict()
    parametrize._inject_property(module, attr)


def parametrized_original(cls: type) -> type | None:
    """The class that ``register_parametrization`` derived the parametrized ``cls`` from (its
    single base), or None where ``cls`` has several bases (a class derived from it again)."""
    bases = cls.__bases__
    return bases[0] if len(bases) == 1 else None


def parametrized_class(cls: type, attr: str) -> type:
    """The class in ``cls``'s MRO that holds the property for ``attr``: the one
    ``register_parametrization`` made, from which ``remove_parametrizations`` deletes it.

    Raises:
        ValueError: no class in ``cls``'s MRO holds a property named ``attr``.
    """
    for c in cls.__mro__:
        if isinstance(c.__dict__.get(attr), property):
            return c
    raise ValueError(
        f"Expected a class in {cls.__name__}'s MRO holding the parametrized property {attr!r}. "
        f"Got none among {[c.__name__ for c in cls.__mro__]}."
    )


# -- FSDP2 ---------------------------------------------------------------------------------------


def fsdp_managed(module: nn.Module) -> bool:
    """Whether ``fully_shard`` manages ``module`` (called on it or on a module above it)."""
    return bool(getattr(module, "_is_fsdp_managed_module", False))


def fsdp_param_group(fsdp_module: FSDPModule) -> object | None:
    """The ``FSDPParamGroup`` of the ``fully_shard`` call on ``fsdp_module`` (an ``FSDPModule``),
    or None where that call found no parameter of its own to shard."""
    group: object | None = fsdp_module._get_fsdp_state()._fsdp_param_group
    return group


def fsdp_params_managing(group: object, tensors: Sequence[Tensor]) -> list[object]:
    """The ``FSDPParam``s of ``group`` whose sharded parameter is one of ``tensors``, in the
    group's order."""
    params: list[Any] = group.fsdp_params  # type: ignore[attr-defined]
    return [p for p in params if any(p.sharded_param is t for t in tensors)]


def replace_fsdp_params(
    group: object,
    stale: Sequence[object],
    weight: nn.Parameter,
    holders: Sequence[tuple[nn.Module, str]],
    name: str,
) -> None:
    """Put ``weight`` into ``group`` in place of its ``stale`` ``FSDPParam``s, where the first
    of them was.

    ``weight`` is a plain, whole Parameter that every ``(module, attr)`` of ``holders`` holds
    (the first is the module it is named for, the rest share it: tied weights). FSDP2 shards it
    as it shards any parameter, with ``stale[0]``'s mesh, device and mixed precision, and sets
    the shard on every holder; ``name`` is its name from the root module, as FSDP2 names its
    parameters.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam, ParamModuleInfo

    info = ParamModuleInfo(
        holders[0][0],
        holders[0][1],
        [m for m, _ in holders[1:]],
        [a for _, a in holders[1:]],
    )
    model: Any = stale[0]
    fresh = FSDPParam(
        param=weight,
        module_info=info,
        mesh_info=model.mesh_info,
        post_forward_mesh_info=model.post_forward_mesh_info,
        device=model.device,
        shard_placement_fn=None,
        mp_policy=model.mp_policy,
        offload_policy=group.offload_policy,  # type: ignore[attr-defined]
    )
    fresh._param_fqn = name
    params: list[Any] = group.fsdp_params  # type: ignore[attr-defined]
    at = min(params.index(p) for p in stale)
    for p in stale:
        p._post_load_hook_handle.remove()  # type: ignore[attr-defined]
    params[:] = [p for p in params if all(p is not s for s in stale)]
    params.insert(at, fresh)
    group._init_mp_dtypes()  # type: ignore[attr-defined]


def splits_rows(placement: object) -> bool:
    """Whether a ``DTensor`` placement splits dimension 0 (``Shard(0)``, or FSDP2's
    ``_StridedShard(0)`` over a tensor-parallel ``Shard(0)``)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(placement, Shard | _StridedShard) and placement.dim == 0


# -- torch.func --------------------------------------------------------------------------------


def functorch_transform_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) is running now."""
    return bool(torch._C._are_functorch_transforms_active())


# -- DDP -----------------------------------------------------------------------------------------


def ddp_recorded_parameter_bytes(ddp: DistributedDataParallel) -> int | None:
    """The bytes of parameters that ``ddp`` recorded when it was built, or None where it keeps
    no record (no logger: it built no reducer)."""
    if getattr(ddp, "logger", None) is None:
        return None
    logged = ddp._get_ddp_logging_data()  # type: ignore[no-untyped-call]
    recorded = logged.get("total_parameter_size_bytes")
    return recorded if isinstance(recorded, int) else None
