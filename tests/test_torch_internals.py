"""The private torch behaviour `embedding_constraint.torch_internals` relies on, pinned.

Each test states one fact about torch that the package builds on (the parametrized class
layout, what ``fully_shard`` leaves on a module and in its groups, what DDP logs), with the
values asserted, so that a torch release changing it fails here by name. The FSDP2 and DDP
facts are checked on a one-process gloo group on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam, ParamModuleInfo
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from embedding_constraint.torch_internals import (
    ddp_recorded_parameter_bytes,
    fsdp_managed,
    fsdp_param_group,
    fsdp_params_managing,
    functorch_transform_active,
    inject_parametrized_property,
    parametrized_class,
    parametrized_original,
    replace_fsdp_params,
    splits_rows,
)


class _Double(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * x


def _plist(module: nn.Module, attr: str) -> parametrize.ParametrizationList:
    return cast(parametrize.ParametrizationList, cast(nn.ModuleDict, module.parametrizations)[attr])


def _group(module: nn.Module) -> object | None:
    """`fsdp_param_group` of a module that ``fully_shard`` was called on."""
    assert isinstance(module, FSDPModule)
    return fsdp_param_group(module)


# -- the parametrized class ---------------------------------------------------------------------


def test_register_parametrization_gives_the_module_a_class_of_its_own_over_its_class() -> None:
    emb = nn.Embedding(4, 2)
    other = nn.Embedding(4, 2)
    parametrize.register_parametrization(emb, "weight", _Double())
    parametrize.register_parametrization(other, "weight", _Double())
    cls = type(emb)
    assert cls.__name__ == "ParametrizedEmbedding"
    assert cls.__bases__ == (nn.Embedding,)
    assert isinstance(cls.__dict__["weight"], property)
    assert type(other) is not cls  # one class per module...
    assert type(copy.deepcopy(emb)) is cls  # ...but a deep copy shares it (why `_own_class`)
    assert parametrize.type_before_parametrizations(emb) is nn.Embedding
    assert parametrized_original(cls) is nn.Embedding
    assert parametrized_class(cls, "weight") is cls


def test_remove_parametrizations_deletes_the_property_from_the_module_class() -> None:
    lin = nn.Linear(3, 2)
    parametrize.register_parametrization(lin, "weight", _Double())
    parametrize.register_parametrization(lin, "bias", _Double())
    cls = type(lin)
    parametrize.remove_parametrizations(lin, "weight")
    assert type(lin) is cls  # the bias is still parametrized
    assert "weight" not in cls.__dict__
    assert isinstance(cls.__dict__["bias"], property)
    parametrize.remove_parametrizations(lin, "bias")
    assert type(lin) is nn.Linear  # rolled back to __class__.__bases__[0]
    assert not hasattr(lin, "parametrizations")


def test_remove_parametrizations_fails_on_a_class_derived_from_the_parametrized_one() -> None:
    # What `fully_shard` makes of a parametrized module (FSDPParametrizedEmbedding): torch
    # deletes the property from `module.__class__`, which does not hold it, so
    # `fix_rows.remove_parametrization` runs torch on the parametrized class itself.
    emb = nn.Embedding(4, 2)
    parametrize.register_parametrization(emb, "weight", _Double())
    parametrized = type(emb)
    derived = type("DerivedParametrizedEmbedding", (FSDPModule, parametrized), {})
    emb.__class__ = derived
    assert parametrized_original(derived) is None  # two bases: not torch's layout
    assert parametrized_class(derived, "weight") is parametrized
    with pytest.raises(AttributeError, match="weight"):
        parametrize.remove_parametrizations(emb, "weight", leave_parametrized=False)


def test_parametrized_class_names_the_class_and_its_mro_when_none_holds_the_property() -> None:
    with pytest.raises(
        ValueError,
        match=r"Expected a class in Embedding's MRO holding the parametrized property 'weight'\. "
        r"Got none among \['Embedding', 'Module', 'object'\]\.",
    ):
        parametrized_class(nn.Embedding, "weight")


def test_inject_parametrized_property_makes_a_module_read_another_modules_parametrization() -> None:
    torch.manual_seed(0)
    source = nn.Linear(3, 2)
    parametrize.register_parametrization(source, "weight", _Double())
    tied = nn.Linear(3, 2)
    del tied._parameters["weight"]
    inject_parametrized_property(tied, "weight")  # _inject_new_class, then _inject_property
    cls = type(tied)
    assert cls.__name__ == "ParametrizedLinear"
    assert cls.__bases__ == (nn.Linear,)
    assert cls is not type(source)
    assert isinstance(cls.__dict__["weight"], property)
    assert isinstance(tied.parametrizations, nn.ModuleDict)
    assert len(tied.parametrizations) == 0
    tied.parametrizations["weight"] = _plist(source, "weight")
    assert parametrize.is_parametrized(tied, "weight")
    assert torch.equal(tied.weight, 2 * _plist(source, "weight").original)
    assert torch.equal(tied.weight, source.weight)


def test_inject_parametrized_property_keeps_the_class_of_a_parametrized_module() -> None:
    lin = nn.Linear(3, 2)
    parametrize.register_parametrization(lin, "bias", _Double())
    cls, parametrizations = type(lin), lin.parametrizations
    del lin._parameters["weight"]
    inject_parametrized_property(lin, "weight")
    assert type(lin) is cls
    assert lin.parametrizations is parametrizations
    assert list(cast(nn.ModuleDict, lin.parametrizations)) == ["bias"]
    assert isinstance(cls.__dict__["weight"], property)


def test_inject_property_refuses_a_tensor_still_in_place() -> None:
    # The precondition `_share_parametrization` meets by deleting the Parameter first.
    lin = nn.Linear(3, 2)
    # torch 2.13 says "Module already has an attribute named 'weight'"; 2.8 asserts bare.
    with pytest.raises(AssertionError):
        inject_parametrized_property(lin, "weight")
    assert isinstance(lin._parameters["weight"], nn.Parameter)  # left in place


# -- torch.func ----------------------------------------------------------------------------------


def test_functorch_transform_active_inside_vmap_grad_and_jvp_only() -> None:
    seen: list[bool] = []

    def f(x: Tensor) -> Tensor:
        seen.append(functorch_transform_active())
        return x.sin().sum()

    x = torch.ones(3)
    torch.func.vmap(f)(torch.ones(2, 3))
    torch.func.grad(f)(x)
    torch.func.jvp(f, (x,), (x,))
    f(x)
    assert seen == [True, True, True, False]


# -- FSDP2, on one gloo process -------------------------------------------------------------------


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        gc.collect()  # the test's sharded modules go before their group (see test_ddp.py)
        dist.destroy_process_group()


def test_fsdp2s_strided_row_split_is_no_public_row_split() -> None:
    """FSDP2 splits a tensor-parallel ``Shard(0)`` weight's rows with ``_StridedShard(0)``,
    which ``is_shard(0)`` does not count (tests/test_tensor_parallel.py runs the 2-D case)."""
    strided = _StridedShard(0, split_factor=2)
    assert not strided.is_shard(0)
    assert [splits_rows(p) for p in (strided, Shard(0), Shard(1), Replicate())] == [
        True,
        True,
        False,
        False,
    ]
    assert not splits_rows(_StridedShard(1, split_factor=2))


@pytest.mark.usefixtures("group")
def test_fully_shard_marks_every_module_it_manages() -> None:
    model = nn.Sequential(nn.Embedding(6, 3), nn.Linear(3, 2))
    assert not fsdp_managed(model[0])
    fully_shard(model)
    assert [fsdp_managed(m) for m in (model, model[0], model[1])] == [True, True, True]
    assert not isinstance(model[0], FSDPModule)  # the mark is the only sign below the call
    assert not fsdp_managed(nn.Embedding(6, 3))


@pytest.mark.usefixtures("group")
def test_each_fully_shard_call_keeps_a_group_of_fsdp_params_holding_the_dtensors() -> None:
    emb, lin = nn.Embedding(6, 3), nn.Linear(3, 2)
    model = nn.Sequential(emb, lin)
    fully_shard(emb)
    fully_shard(model)
    assert isinstance(emb.weight, DTensor)
    assert emb.weight.placements == (Shard(0),)
    inner, outer = _group(emb), _group(model)
    assert inner is not None
    assert outer is not None
    inner_params: list[Any] = inner.fsdp_params  # type: ignore[attr-defined]
    outer_params: list[Any] = outer.fsdp_params  # type: ignore[attr-defined]
    assert [type(p) for p in inner_params + outer_params] == [FSDPParam] * 3
    assert [p.sharded_param for p in inner_params] == [emb.weight]
    assert inner_params[0].sharded_param is emb.weight
    assert [
        p.sharded_param is t for p, t in zip(outer_params, [lin.weight, lin.bias], strict=True)
    ] == [
        True,
        True,
    ]
    assert fsdp_params_managing(outer, [lin.bias, emb.weight]) == [outer_params[1]]
    assert fsdp_params_managing(inner, [lin.weight]) == []


@pytest.mark.usefixtures("group")
def test_a_fully_shard_call_without_parameters_of_its_own_keeps_no_group() -> None:
    model = nn.Sequential(nn.Embedding(6, 3), nn.Linear(3, 2))
    fully_shard(model[0])
    fully_shard(model[1])
    fully_shard(model)
    assert _group(model) is None
    assert _group(model[1]) is not None


@pytest.mark.usefixtures("group")
def test_fsdp_param_is_built_from_the_names_replace_fsdp_params_passes() -> None:
    names = list(inspect.signature(FSDPParam.__init__).parameters)
    assert names == [
        "self",
        "param",
        "module_info",
        "mesh_info",
        "post_forward_mesh_info",
        "device",
        "shard_placement_fn",
        "mp_policy",
        "offload_policy",
    ]
    fields = [f.name for f in dataclasses.fields(ParamModuleInfo)]
    assert fields == ["module", "param_name", "shared_modules", "shared_param_names"]
    emb = nn.Embedding(6, 3)
    fully_shard(emb)
    group = _group(emb)
    assert group is not None
    (param,) = fsdp_params_managing(group, [emb.weight])
    # What replace_fsdp_params reads from the FSDPParam it replaces and from the group.
    model: Any = param
    assert model.device == torch.device("cpu")
    assert model.mp_policy == MixedPrecisionPolicy()
    assert model.mesh_info.shard_mesh_dim == 0
    assert model.post_forward_mesh_info.shard_mesh_dim == 0
    assert model._module_info == ParamModuleInfo(emb, "weight", [], [])
    assert isinstance(model._post_load_hook_handle, RemovableHandle)
    assert model._param_fqn is None  # named by the root's first forward
    assert group.offload_policy == OffloadPolicy()  # type: ignore[attr-defined]
    assert callable(group._init_mp_dtypes)  # type: ignore[attr-defined]
    emb(torch.tensor([0]))
    assert model._param_fqn == "weight"


@pytest.mark.usefixtures("group")
def test_replace_fsdp_params_puts_a_plain_tied_weight_in_the_group() -> None:
    emb, head = nn.Embedding(6, 3), nn.Linear(3, 6, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    fully_shard(model)
    group = _group(model)
    assert group is not None
    stale = fsdp_params_managing(group, [emb.weight])
    assert len(stale) == 1
    value = torch.arange(18.0).reshape(6, 3)
    weight = nn.Parameter(value.clone())
    for holder in (emb, head):
        holder._parameters["weight"] = weight
    replace_fsdp_params(group, stale, weight, [(emb, "weight"), (head, "weight")], "0.weight")
    params: list[Any] = group.fsdp_params  # type: ignore[attr-defined]
    assert len(params) == 1
    assert params[0] is not stale[0]
    assert params[0]._param_fqn == "0.weight"
    assert params[0]._module_info == ParamModuleInfo(emb, "weight", [head], ["weight"])
    assert isinstance(emb.weight, DTensor)
    assert head.weight is emb.weight
    assert params[0].sharded_param is emb.weight
    assert torch.equal(emb.weight.full_tensor(), value)
    # The next forward gathers it and the backward reduce-scatters its gradient.
    out = model(torch.tensor([0, 5]))
    torch.testing.assert_close(out, value[[0, 5]] @ value.T, rtol=0, atol=0)
    out.sum().backward()
    grad = emb.weight.grad
    assert isinstance(grad, DTensor)
    expected = torch.zeros(6, 3)
    expected[[0, 5]] += value.sum(0)  # through the lookup
    expected += value[[0, 5]].sum(0)  # through the head, every row
    torch.testing.assert_close(grad.full_tensor(), expected, rtol=0, atol=0)


# -- DDP, on one gloo process ---------------------------------------------------------------------


@pytest.mark.usefixtures("group")
def test_ddp_logs_the_bytes_of_the_parameters_it_was_built_for() -> None:
    emb = nn.Embedding(10, 4)
    model = nn.Sequential(emb, nn.Linear(4, 3))
    ddp = DistributedDataParallel(model)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size == 220
    logged = ddp._get_ddp_logging_data()  # type: ignore[no-untyped-call]
    assert logged["total_parameter_size_bytes"] == 220
    assert ddp_recorded_parameter_bytes(ddp) == 220
    emb.weight.data = torch.zeros(4, 4)  # shrunk after DDP recorded it, as fix_rows would
    assert ddp_recorded_parameter_bytes(ddp) == 220  # a record, not the live size
    ddp.logger = None
    assert ddp_recorded_parameter_bytes(ddp) is None
