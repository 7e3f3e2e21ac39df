"""`plain_keys`: a dict of parameter names (DeepSpeed's ZeRO-3 consolidation, ``zero_to_fp32``)
turned into the plain state dict that the unconstrained model loads."""

from __future__ import annotations

import pytest
import torch
from support import stored
from torch import Tensor, nn

from embedding_constraint import fix_rows, plain_keys
from embedding_constraint.fsdp import prepare_fully_shard

ROWS = pytest.mark.parametrize("rows", [None, [4, 1]], ids=["prefix", "scattered"])


class _LM(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 6)
        if tied:
            self.head.weight = self.embed.weight


def _constrained(tied: bool, rows: list[int] | None) -> _LM:
    torch.manual_seed(0)
    model = _LM(tied)
    fix_rows(model, torch.randn(2, 3), name="embed.weight", rows=rows)
    if not tied:
        fix_rows(model.head, torch.randn(2, 3), rows=rows)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # the free rows move; the fixed ones are held
    return model


def _by_parameter_names(model: nn.Module, *, copy: bool = False) -> dict[str, Tensor]:
    """What DeepSpeed's consolidation writes: each module's own parameters and buffers, each
    ``detach()``-ed (tied holders' entries share memory), or copies."""
    return {
        name: tensor.detach().clone() if copy else tensor.detach()
        for name, tensor in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    }


@ROWS
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_parameter_names_become_the_plain_state_dict(tied: bool, rows: list[int] | None) -> None:
    model = _constrained(tied, rows)
    raw = _by_parameter_names(model)
    assert any("parametrizations" in key for key in raw)
    plain = plain_keys(model, raw)
    expected = model.state_dict()
    assert list(plain) == list(expected)
    for key, value in expected.items():
        assert torch.equal(plain[key], value), key
    if tied:  # one tensor for both holders, as in a plain tied model's state dict
        assert plain["embed.weight"] is plain["head.weight"]
        apart = plain_keys(model, _by_parameter_names(model, copy=True))
        assert torch.equal(apart["embed.weight"], apart["head.weight"])
    unconstrained = _LM(tied)
    unconstrained.load_state_dict(plain)
    assert torch.equal(unconstrained.embed.weight, model.embed.weight)


def test_the_values_are_the_dicts_not_the_models() -> None:
    """A consolidated checkpoint of a later step: its free rows, the model's fixed rows."""
    model = _constrained(False, None)
    raw = _by_parameter_names(model, copy=True)
    raw["embed.parametrizations.weight.original"] += 1.0
    plain = plain_keys(model, raw)
    assert torch.equal(plain["embed.weight"][2:], raw["embed.parametrizations.weight.original"])
    assert torch.equal(plain["embed.weight"][:2], model.embed.weight[:2])


def test_a_reference_held_as_a_parameter_comes_from_the_dict() -> None:
    model = _constrained(False, [4, 1])
    prepare_fully_shard(model)
    raw = _by_parameter_names(model)
    assert "embed.parametrizations.weight.0.reference" in raw
    plain = plain_keys(model, raw)
    assert list(plain) == list(model.state_dict())
    assert torch.equal(plain["embed.weight"], model.embed.weight)


def test_a_plain_dict_and_an_unconstrained_model_pass_through() -> None:
    model = _constrained(True, None)
    state = model.state_dict()
    assert plain_keys(model, state) == state
    other = _LM(False)
    raw = _by_parameter_names(other)
    assert plain_keys(other, raw) == raw


def test_stored_rows_of_another_shape_are_refused() -> None:
    model = _constrained(False, None)
    raw = _by_parameter_names(model)
    raw["embed.parametrizations.weight.original"] = torch.zeros(7, 3)
    with pytest.raises(ValueError, match=r"embed\.parametrizations\.weight\.original.*\(4, 3\)"):
        plain_keys(model, raw)


def test_a_held_reference_of_another_shape_is_refused() -> None:
    model = _constrained(False, [4, 1])
    prepare_fully_shard(model)
    raw = _by_parameter_names(model, copy=True)
    raw["embed.parametrizations.weight.0.reference"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"2 fixed rows, of shape \(2, 3\)\. Got \(3, 3\)"):
        plain_keys(model, raw)


def test_a_partitioned_parameter_is_compared_by_its_whole_shape() -> None:
    """ZeRO-3 leaves a partitioned parameter empty, its shape in ``ds_shape``."""
    model = _constrained(False, None)
    raw = _by_parameter_names(model, copy=True)
    free = stored(model.embed)
    whole = free.shape
    free.data = free.data.new_empty(0)
    free.ds_shape = whole  # type: ignore[attr-defined]
    plain = plain_keys(model, raw)
    assert plain["embed.weight"].shape == (6, 3)
