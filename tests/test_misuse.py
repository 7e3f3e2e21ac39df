"""Misuse fails loudly and leaves the module as it was; copies and ties stay correct.

One section per class of defect found by the hardening review (issue 10): copies, ties that
reach outside the given module, dtypes, the meta device, stacked parametrizations, optimizers
and checkpoints, Lightning, loading, vocabularies. (Bad ids, double gradients and torch.func
are in the differential harness, ``test_harness.py``.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning_models import FLAVOURS, Flavour, loader
from support import constraint_of, stored
from torch import Tensor, nn
from torch.nn.utils import parametrize

from embedding_constraint import bake, fix_rows, is_fixed

LAYOUTS: dict[str, list[int] | None] = {"prefix": None, "scattered": [8, 1, 4, 5]}
FIXED_AT = {"prefix": [0, 1, 2, 3], "scattered": [8, 1, 4, 5]}


def _snapshot(module: nn.Module) -> dict[str, Any]:
    """What a failed call must leave as it was: classes, parameters by identity, values."""
    return {
        "classes": [type(m) for m in module.modules()],
        "parameters": [(n, p, p.detach().clone()) for n, p in module.named_parameters()],
        "parametrized": [parametrize.is_parametrized(m) for m in module.modules()],
    }


def _assert_unchanged(module: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(module)
    assert after["classes"] == before["classes"]
    assert after["parametrized"] == before["parametrized"]
    assert [(n, p) for n, p, _ in after["parameters"]] == [
        (n, p) for n, p, _ in before["parameters"]
    ]
    for (_, _, value), (_, _, old) in zip(after["parameters"], before["parameters"], strict=True):
        assert torch.equal(value, old)


# -- copies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("baked_first", ["original", "copy"])
def test_baking_one_copy_leaves_the_other_constrained_and_working(
    layout: str, baked_first: str
) -> None:
    torch.manual_seed(0)
    reference = torch.randn(4, 3)
    original = nn.Embedding(10, 3)
    fix_rows(original, reference, rows=LAYOUTS[layout])
    replica = copy.deepcopy(original)
    assert type(replica) is not type(original)  # a class of its own
    baked, kept = (original, replica) if baked_first == "original" else (replica, original)
    bake(baked)
    assert type(baked) is nn.Embedding
    assert is_fixed(kept)
    ids = torch.tensor([0, 1, 4, 8, 9])
    expected = kept.weight.detach()[ids]
    torch.testing.assert_close(kept(ids), expected)
    opt = torch.optim.AdamW(kept.parameters(), lr=0.1, weight_decay=0.1)
    kept(ids).pow(2).sum().backward()
    opt.step()
    assert torch.equal(kept.weight[FIXED_AT[layout]], reference)
    assert list(kept.state_dict()) == ["weight"]
    bake(kept)
    assert type(kept) is nn.Embedding
    assert torch.equal(kept.weight[FIXED_AT[layout]], reference)


def test_a_snapshot_taken_during_a_fit_survives_the_bake_at_its_end() -> None:
    flavour = FLAVOURS["pytorch_lightning"]
    torch.manual_seed(0)
    old = nn.Embedding(6, 4)
    model = flavour.model(vocab=10, dim=4)
    snapshots: list[Any] = []

    class Snapshot(flavour.package.Callback):  # type: ignore[name-defined,misc]
        def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
            snapshots.append(copy.deepcopy(pl_module))  # an EMA or best-model copy

    callbacks = [flavour.callback(model.embedding, old), Snapshot()]
    flavour.trainer(callbacks=callbacks, max_epochs=1).fit(model, loader())
    assert type(model.embedding.weight) is nn.Parameter
    (snapshot,) = snapshots
    assert is_fixed(snapshot, "embedding.weight")
    ids = torch.arange(10)
    torch.testing.assert_close(snapshot.embedding(ids), snapshot.embedding.weight.detach())
    assert torch.equal(snapshot.embedding.weight[:6], old.weight)


# -- ties that reach outside the module given -------------------------------------------------


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embedding.weight


def test_fix_rows_refuses_a_parameter_also_held_outside_the_module() -> None:
    model = _Tied()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"a module outside it holds too.*name='embedding.weight'"):
        fix_rows(model.embedding, torch.zeros(4, 4))
    _assert_unchanged(model, before)
    assert model.head.weight is model.embedding.weight
    assert model.head(torch.zeros(1, 4)).shape == (1, 10)


def test_bake_refuses_a_tensor_also_read_outside_the_module() -> None:
    model = _Tied()
    fix_rows(model, torch.zeros(4, 4), name="embedding.weight")
    with pytest.raises(ValueError, match=r"a module outside it reads too.*bake\(model"):
        bake(model.embedding)
    assert is_fixed(model, "embedding.weight")
    assert is_fixed(model, "head.weight")
    assert model.head(torch.zeros(1, 4)).shape == (1, 10)
    bake(model, name="embedding.weight")
    assert model.head.weight is model.embedding.weight
    assert model.head.weight.shape == (10, 4)


def test_a_parameter_held_only_inside_is_not_refused_for_other_references_to_it() -> None:
    emb = nn.Embedding(10, 4)
    named = dict(emb.named_parameters())  # a dict holding it, but no module's
    optimizer = torch.optim.SGD(emb.parameters(), lr=0.1)
    fix_rows(emb, torch.zeros(4, 4))
    assert named["weight"] is stored(emb)
    assert optimizer.param_groups[0]["params"][0] is stored(emb)


# -- dtypes -----------------------------------------------------------------------------------


def test_a_reference_that_overflows_the_weights_dtype_is_refused() -> None:
    emb = nn.Embedding(4, 2)
    before = _snapshot(emb)
    reference = torch.tensor([[1.0, 2.0], [1e300, -3.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"finite in torch.float32.*rows \[1\]"):
        fix_rows(emb, reference)
    _assert_unchanged(emb, before)
    fix_rows(emb, reference[:1])  # finite in float32: accepted, rounded once
    assert torch.equal(emb.weight[:1], reference[:1].float())


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_weight_that_is_not_floating_point_is_refused(dtype: torch.dtype) -> None:
    module = nn.Module()
    module.weight = nn.Parameter(torch.zeros(4, 2, dtype=dtype), requires_grad=False)
    before = _snapshot(module)
    with pytest.raises(TypeError, match=rf"floating-point tensor to constrain.*{dtype}"):
        fix_rows(module, torch.zeros(1, 2))
    _assert_unchanged(module, before)


# -- the meta device --------------------------------------------------------------------------


def test_a_meta_reference_is_refused() -> None:
    emb = nn.Embedding(4, 2)
    before = _snapshot(emb)
    with pytest.raises(ValueError, match=r"meta device.*load or compute the reference first"):
        fix_rows(emb, torch.empty(2, 2, device="meta"))
    _assert_unchanged(emb, before)


def test_a_module_on_the_meta_device_is_refused_with_what_to_do() -> None:
    emb = nn.Embedding(4, 2, device="meta")
    with pytest.raises(ValueError, match=r"meta device.*to_empty\(\).*then constrain it"):
        fix_rows(emb, torch.zeros(2, 2))
    assert not parametrize.is_parametrized(emb)
    emb.to_empty(device="cpu")  # the way that works: materialise, load, then constrain
    emb.load_state_dict({"weight": torch.arange(8.0).reshape(4, 2)})
    fix_rows(emb, emb.weight[:2].detach())
    assert torch.equal(emb.weight, torch.arange(8.0).reshape(4, 2))


@pytest.mark.parametrize("rows", [None, [5, 0, 3]], ids=["prefix", "scattered"])
def test_to_empty_keeps_the_fixed_rows_and_their_places(rows: list[int] | None) -> None:
    """`to_empty` gives every tensor uninitialised memory; the reference and the rows' places
    are the constraint's own and keep their values: a load of the free rows restores all."""
    torch.manual_seed(0)
    emb = nn.Embedding(6, 2)
    fix_rows(emb, torch.randn(3, 2), rows=rows)
    trained = emb.weight.detach().clone()
    emb.to_empty(device="cpu")
    fixed_at = rows or [0, 1, 2]
    assert torch.equal(emb.weight[fixed_at], trained[fixed_at])
    emb.load_state_dict({"weight": trained})  # the fixed rows are checked against the reference
    assert torch.equal(emb(torch.arange(6)), trained)
    assert torch.equal(emb.weight, trained)


@pytest.mark.parametrize("rows", [None, [5, 0, 3]], ids=["prefix", "scattered"])
def test_a_round_trip_through_the_meta_device_keeps_the_fixed_rows(rows: list[int] | None) -> None:
    """The meta device holds no values: the reference and the places stay where they are, a
    read on the meta device gives the shape, and `to_empty` brings them back exact."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(6, 2), nn.Linear(2, 6)
    model = nn.Sequential(emb, head)
    fix_rows(emb, torch.randn(3, 2), rows=rows)
    fix_rows(head, torch.randn(3, 2), rows=rows)
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.to("meta")
    out = model(torch.arange(6, device="meta"))
    assert out.is_meta
    assert out.shape == (6, 6)
    model.to_empty(device="cpu")
    model.load_state_dict(trained)
    assert torch.equal(emb.weight, trained["0.weight"])
    assert torch.equal(head.weight, trained["1.weight"])
    expected = nn.functional.linear(
        nn.functional.embedding(torch.arange(6), trained["0.weight"]),
        trained["1.weight"],
        trained["1.bias"],
    )
    torch.testing.assert_close(model(torch.arange(6)), expected)
    bag = nn.EmbeddingBag(6, 2, mode="sum")
    fix_rows(bag, torch.randn(3, 2), rows=rows)
    bag.to("meta")
    assert bag(torch.arange(6, device="meta").view(2, 3)).shape == (2, 2)


# -- stacked parametrizations -----------------------------------------------------------------


class _Double(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * x


@pytest.mark.parametrize(
    "module",
    [nn.Embedding(6, 2), nn.EmbeddingBag(6, 2), nn.Linear(2, 6)],
    ids=["embedding", "bag", "linear"],
)
def test_a_parametrization_stacked_on_top_is_refused_at_the_read(module: nn.Module) -> None:
    fix_rows(module, torch.ones(2, 2))
    parametrize.register_parametrization(module, "weight", _Double())
    input = torch.ones(3, 2) if isinstance(module, nn.Linear) else torch.tensor([[0, 1]])
    with pytest.raises(
        ValueError, match=r"only parametrization of 'weight'.*\['FixedRows', '_Double'\]"
    ):
        module(input)
    with pytest.raises(ValueError, match="constrained by FixedRows alone"):
        bake(module)
    keys = list(module.state_dict())  # never raises: torch's own entries then
    assert "parametrizations.weight.original" in keys


def test_a_module_that_reads_its_weight_itself_composes_a_stacked_parametrization() -> None:
    # Only the fast forwards can refuse at the read; any other module reads through torch's
    # list of parametrizations, which applies each in turn (documented in the FAQ).
    module = nn.Module()
    module.weight = nn.Parameter(torch.zeros(4, 2))
    fix_rows(module, torch.ones(2, 2))
    parametrize.register_parametrization(module, "weight", _Double())
    assert torch.equal(module.weight[:2], torch.full((2, 2), 2.0))  # the fixed rows, doubled
    with pytest.raises(ValueError, match="constrained by FixedRows alone"):
        bake(module)


# -- optimizers and checkpoints ---------------------------------------------------------------


def _adagrad(emb: nn.Embedding) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(emb.parameters())  # makes its state when created


def _stepped_adam(emb: nn.Embedding) -> torch.optim.Optimizer:
    optimizer = torch.optim.Adam(emb.parameters())
    emb(torch.tensor([5])).sum().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("make", [_adagrad, _stepped_adam], ids=["adagrad", "stepped-adam"])
def test_an_optimizer_with_state_for_the_full_weight_is_refused(
    make: Any,
) -> None:
    emb = nn.Embedding(6, 2)
    optimizer = make(emb)
    before = _snapshot(emb)
    with pytest.raises(
        ValueError, match=r"still alive, that holds state made for its full shape \(6, 2\)"
    ):
        fix_rows(emb, torch.zeros(2, 2))
    _assert_unchanged(emb, before)
    assert optimizer.state[emb.weight]  # untouched too


def _stepped(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Any:
    def stepped(emb: nn.Embedding) -> torch.optim.Optimizer:
        head = nn.Linear(2, 1)  # first in the group: LBFGS keys its state by the first parameter
        optimizer = make([*head.parameters(), *emb.parameters()])

        def closure() -> float:
            optimizer.zero_grad()
            loss: Tensor = head(emb(torch.tensor([0, 5]))).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return float(loss.detach())

        optimizer.step(closure)
        return optimizer

    return stepped


@pytest.mark.parametrize(
    "make",
    [_stepped(lambda ps: torch.optim.Adafactor(ps)), _stepped(lambda ps: torch.optim.LBFGS(ps))],
    ids=["adafactor-factored", "lbfgs-flat"],
)
def test_an_optimizer_with_state_of_another_shape_is_refused(make: Any) -> None:
    # Adafactor keeps a row and a column vector for a matrix, LBFGS a flat history over all its
    # parameters: neither has a tensor of the weight's shape, and both fail at the next step.
    emb = nn.Embedding(6, 2)
    optimizer = make(emb)
    before = _snapshot(emb)
    with pytest.raises(ValueError, match=r"Create the optimizer after fix_rows"):
        fix_rows(emb, torch.zeros(2, 2))
    _assert_unchanged(emb, before)
    assert optimizer.state


def test_a_conversion_that_overflows_the_reference_is_refused_and_converts_nothing() -> None:
    head = nn.Linear(2, 4)
    reference = torch.tensor([[1.0, 2.0], [1e6, -3.0]])  # 1e6 is past float16's 65504
    fix_rows(head, reference)
    before = copy.deepcopy(head.state_dict())
    with pytest.raises(ValueError, match=r"finite in torch.float16.*rows \[1\]"):
        head.half()
    assert stored(head).dtype == torch.float32
    assert head.bias.dtype == torch.float32
    for key, value in head.state_dict().items():
        assert torch.equal(value, before[key])
    head.bfloat16()  # wide enough: converted, the fixed rows rounded once
    assert torch.equal(head.weight[:2], reference.bfloat16())


def test_an_optimizer_made_before_that_has_not_stepped_trains_the_free_rows() -> None:
    emb = nn.Embedding(6, 2)
    optimizer = torch.optim.Adam(emb.parameters(), lr=0.1)
    fix_rows(emb, torch.zeros(2, 2))
    emb(torch.tensor([0, 5])).sum().backward()
    optimizer.step()
    assert optimizer.state[stored(emb)]["exp_avg"].shape == (4, 2)
    assert torch.equal(emb.weight[:2], torch.zeros(2, 2))


def test_the_callback_ignores_the_optimizer_of_an_earlier_fit() -> None:
    # A plain fit first, its Trainer (and AdamW, with full-size state) still alive: the
    # constrained fit makes its own optimizer after setup, so the old one is no reason to refuse.
    flavour = FLAVOURS["pytorch_lightning"]
    torch.manual_seed(0)
    model = flavour.model(vocab=10, dim=4)
    first = flavour.trainer(max_epochs=1)
    first.fit(model, loader())
    (optimizer,) = first.optimizers
    assert optimizer.state[model.embedding.weight]["exp_avg"].shape == (10, 4)
    reference = model.embedding.weight[:6].detach().clone()
    callback = flavour.callback(model.embedding, reference)
    flavour.trainer(callbacks=[callback], max_epochs=1).fit(model, loader())
    assert torch.equal(model.embedding.weight[:6], reference)


def _fit_plain_and_save(flavour: Flavour, path: Path) -> Any:
    torch.manual_seed(0)
    model = flavour.model(vocab=10, dim=4)
    trainer = flavour.trainer(max_epochs=1)
    trainer.fit(model, loader())
    trainer.save_checkpoint(path)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS.values(), ids=list(FLAVOURS))
def test_resuming_a_plain_checkpoint_with_the_constraint_names_the_cause(
    flavour: Flavour, tmp_path: Path
) -> None:
    path = tmp_path / "plain.ckpt"
    trained = _fit_plain_and_save(flavour, path)
    reference = trained.embedding.weight[:6].detach().clone()
    model = flavour.model(vocab=10, dim=4)
    callback = flavour.callback(model.embedding, reference)
    trainer = flavour.trainer(callbacks=[callback], max_epochs=2)
    with pytest.raises(
        RuntimeError, match=r"optimizer state for 'embedding.weight'.*saved without"
    ):
        trainer.fit(model, loader(), ckpt_path=path)
    assert type(model.embedding.weight) is nn.Parameter  # baked on the way out


# -- Lightning --------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS.values(), ids=list(FLAVOURS))
def test_a_target_replaced_in_the_modules_setup_fails_loudly(flavour: Flavour) -> None:
    class Replacing(flavour.model):  # type: ignore[name-defined,misc]
        def setup(self, stage: str) -> None:
            self.embedding = nn.Embedding(10, 4)  # runs after the callback's setup

    model = Replacing(vocab=10, dim=4)
    callback = flavour.callback(model.embedding, nn.Embedding(6, 4))
    with pytest.raises(
        RuntimeError, match=r"'embedding.weight' to be constrained.*configure_model"
    ):
        flavour.trainer(callbacks=[callback], max_epochs=1).fit(model, loader())


@pytest.mark.parametrize("flavour", FLAVOURS.values(), ids=list(FLAVOURS))
def test_two_callbacks_on_one_weight_fail_before_touching_it(flavour: Flavour) -> None:
    model = flavour.model(vocab=10, dim=4)
    before = _snapshot(model)
    first = flavour.callback(model.embedding, torch.zeros(2, 4))
    second = flavour.callback(model.embedding, torch.ones(3, 4), rows=[7, 8, 9])
    with pytest.raises(ValueError, match=r"one EmbeddingConstraint per tensor.*\['weight'\]"):
        flavour.trainer(callbacks=[first, second], max_epochs=1).fit(model, loader())
    _assert_unchanged(model, before)


AVERAGING = {
    "StochasticWeightAveraging": {"swa_lrs": 0.01},
    "EMAWeightAveraging": {},  # a WeightAveraging: it copies the model in its setup too
}


@pytest.mark.parametrize("averaging", AVERAGING)
@pytest.mark.parametrize("flavour", FLAVOURS.values(), ids=list(FLAVOURS))
def test_weight_averaging_listed_first_is_refused(flavour: Flavour, averaging: str) -> None:
    model = flavour.model(vocab=10, dim=4)
    before = _snapshot(model)
    other = getattr(flavour.package.callbacks, averaging)(**AVERAGING[averaging])
    callback = flavour.callback(model.embedding, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=f"EmbeddingConstraint before {averaging}"):
        flavour.trainer(callbacks=[other, callback], max_epochs=1).fit(model, loader())
    _assert_unchanged(model, before)


@pytest.mark.slow
def test_stochastic_weight_averaging_listed_after_keeps_the_rows_exact() -> None:
    flavour = FLAVOURS["pytorch_lightning"]
    torch.manual_seed(0)
    old = nn.Embedding(6, 4)
    model = flavour.model(vocab=10, dim=4)
    swa = flavour.package.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    callback = flavour.callback(model.embedding, old)
    flavour.trainer(callbacks=[callback, swa], max_epochs=3).fit(model, loader())
    assert type(model.embedding.weight) is nn.Parameter
    assert torch.equal(model.embedding.weight[:6], old.weight)


def test_state_keys_differ_for_same_shaped_targets() -> None:
    flavour = FLAVOURS["pytorch_lightning"]
    model = flavour.model(vocab=10, dim=4, classes=10)
    on_embedding = flavour.callback(model.embedding, torch.zeros(2, 4))
    on_head = flavour.callback(model.head, torch.zeros(2, 4))
    assert on_embedding.state_key != on_head.state_key
    flavour.trainer(callbacks=[on_embedding, on_head], max_epochs=1).fit(model, loader())
    assert "target=embedding" in on_embedding.state_key
    assert "target=head" in on_head.state_key


def test_swapped_arguments_are_named() -> None:
    flavour = FLAVOURS["pytorch_lightning"]
    old, new = nn.Embedding(6, 4), nn.Embedding(10, 4)
    with pytest.raises(
        ValueError, match=r"arguments may be swapped.*EmbeddingConstraint\(new_module, old_module\)"
    ):
        flavour.callback(old, new)


def test_from_vocabularies_checks_the_old_vocabulary_against_the_old_rows() -> None:
    flavour = FLAVOURS["pytorch_lightning"]
    old, new = nn.Embedding(4, 2), nn.Embedding(5, 2)
    with pytest.raises(ValueError, match=r"one token per row of `old` \(4\). Got 3 tokens"):
        flavour.callback.from_vocabularies(new, old, ["a", "b", "c"], ["a", "b", "c", "d", "e"])


# -- loading ----------------------------------------------------------------------------------


def test_differing_fixed_rows_are_reported_through_load_state_dict_with_the_others() -> None:
    model = nn.Sequential(nn.Embedding(8, 2), nn.Linear(2, 3))
    fix_rows(model, torch.zeros(2, 2), name="0.weight")
    incoming = {k: v.clone() for k, v in model.state_dict().items()}
    incoming["0.weight"][1] = 5.0
    incoming["1.weight"] = torch.zeros(4, 2)  # a size mismatch elsewhere
    before = model.state_dict()["0.weight"].clone()
    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(incoming)
    message = str(error.value)
    assert "fixed rows of '0.weight'" in message
    assert "size mismatch for 1.weight" in message
    assert "parametrizations" not in message
    assert torch.equal(model.state_dict()["0.weight"], before)


def test_missing_keys_are_the_plain_ones() -> None:
    emb = fix_rows(nn.Embedding(8, 2), torch.zeros(2, 2))
    result = emb.load_state_dict({}, strict=False)
    assert result.missing_keys == ["weight"]
    assert result.unexpected_keys == []
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "weight"\.'):
        emb.load_state_dict({})
    assert torch.equal(constraint_of(emb).reference, torch.zeros(2, 2))
