"""`fix_rows` and `bake`: plain state dicts, loading both ways, baking, tied weights, copies."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from support import constraint_of, stored
from torch import Tensor, nn
from torch.nn.utils import parametrize

from embedding_constraint import FixedRows, bake, fix_rows, is_fixed, vocab


def _train(module: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.AdamW(module.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        module(torch.arange(6)).pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("rows", [None, [5, 2]], ids=["prefix", "scattered"])
def test_state_dict_has_plain_keys_and_shapes(rows: list[int] | None) -> None:
    emb = nn.Embedding(6, 3)
    plain_keys = [(k, v.shape) for k, v in emb.state_dict().items()]
    fix_rows(emb, torch.ones(2, 3), rows=rows)
    assert [(k, v.shape) for k, v in emb.state_dict().items()] == plain_keys
    assert torch.equal(emb.state_dict()["weight"], emb.weight.detach())


def test_state_dict_under_a_parent_module_uses_the_parent_prefix() -> None:
    model = nn.Sequential(nn.Embedding(6, 3), nn.Linear(3, 2), nn.BatchNorm1d(2))
    plain_keys = list(model.state_dict())
    fix_rows(model[0], torch.ones(2, 3))
    fix_rows(model[1], torch.zeros(1), name="bias")
    fix_rows(model[1], torch.zeros(1, 3))
    state = model.state_dict()
    assert list(state) == plain_keys
    other = nn.Linear(3, 2)
    fix_rows(other, torch.zeros(1, 3))
    fix_rows(other, torch.zeros(1), name="bias")
    assert list(other.state_dict()) == ["weight", "bias"]
    assert torch.equal(state["0.weight"][:2], torch.ones(2, 3))
    assert torch.equal(state["1.bias"][:1], torch.zeros(1))


@pytest.mark.parametrize("rows", [None, [5, 2]], ids=["prefix", "scattered"])
def test_plain_module_loads_a_constrained_state_dict_and_back(rows: list[int] | None) -> None:
    reference = torch.randn(2, 3)
    emb = nn.Embedding(6, 3)
    fix_rows(emb, reference, rows=rows)
    _train(emb)
    plain = nn.Embedding(6, 3)
    plain.load_state_dict(emb.state_dict())
    assert torch.equal(plain.weight, emb.weight)

    with torch.no_grad():
        free = [r for r in range(6) if r not in (rows or [0, 1])]
        plain.weight[free] += 1.0
    emb.load_state_dict(plain.state_dict())
    assert torch.equal(emb.weight, plain.weight)
    assert stored(emb).shape == (4, 3)


def test_loading_a_plain_state_dict_with_other_fixed_rows_names_them() -> None:
    reference = torch.zeros(3, 2)
    emb = nn.Embedding(8, 2)
    fix_rows(emb, reference, rows=[6, 1, 3])
    before = copy.deepcopy(emb.state_dict())
    incoming = copy.deepcopy(emb.state_dict())  # a plain module's entries are its weights too
    incoming["weight"][[3, 6]] = 1.0
    incoming["weight"][0] = 7.0  # a free row: would load, but the call must fail as a whole
    with pytest.raises(
        RuntimeError, match=r"fixed rows of 'weight'.*2 differing row\(s\): \[3, 6\]"
    ):
        emb.load_state_dict(incoming)
    assert torch.equal(emb.state_dict()["weight"], before["weight"])


def test_loading_a_plain_state_dict_of_the_wrong_shape_fails_clearly() -> None:
    emb = nn.Embedding(8, 2)
    fix_rows(emb, torch.zeros(3, 2))
    with pytest.raises(
        RuntimeError, match=r"size mismatch for weight: expected .*\(8, 2\), got \(9, 2\)"
    ):
        emb.load_state_dict({"weight": torch.zeros(9, 2)})


def test_a_checkpoint_file_round_trips_through_torch_save() -> None:
    emb = nn.Embedding(6, 3)
    fix_rows(emb, torch.randn(2, 3))
    _train(emb)
    buffer = io.BytesIO()
    torch.save(emb.state_dict(), buffer)
    buffer.seek(0)
    plain = nn.Embedding(6, 3)
    plain.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(plain.weight, emb.weight)


@pytest.mark.parametrize("rows", [None, [1, 4], [4, 1]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fix_rows_copies_the_reference_once_into_the_module(
    rows: list[int] | None, dtype: torch.dtype
) -> None:
    reference = torch.randn(2, 3, dtype=dtype)
    expected = reference.float().clone()
    emb = nn.Embedding(6, 3)
    fix_rows(emb, reference, rows=rows)
    held = constraint_of(emb).reference
    assert held.untyped_storage().data_ptr() != reference.untyped_storage().data_ptr()
    assert held.untyped_storage().data_ptr() == stored(emb).untyped_storage().data_ptr()
    reference.add_(1.0)  # the caller's tensor is not the module's
    fixed_at = [0, 1] if rows is None else rows
    assert torch.equal(emb.weight[fixed_at], expected)


def test_bake_restores_a_plain_module_with_the_same_parameter() -> None:
    reference = torch.randn(2, 3)
    emb = nn.Embedding(6, 3)
    param = emb.weight
    fix_rows(emb, reference, rows=[4, 0])
    _train(emb)
    trained = emb.weight.detach().clone()
    assert is_fixed(emb)
    bake(emb)
    assert type(emb) is nn.Embedding
    assert type(emb.weight) is nn.Parameter
    assert emb.weight is param
    assert not hasattr(emb, "parametrizations")
    assert not is_fixed(emb)
    assert torch.equal(emb.weight, trained)
    assert torch.equal(emb.weight[[4, 0]], reference)
    assert not emb._state_dict_hooks
    assert not emb._load_state_dict_pre_hooks


@pytest.mark.parametrize("attr", ["weight", "bias"])
def test_bake_keeps_the_plain_order_of_parameters(attr: str) -> None:
    # torch's remove_parametrizations adds the tensor back last: `bias` before `weight`, which
    # code that pairs parameters by position (optimizer state, checkpoints) would mismatch.
    head = nn.Linear(4, 5)
    order = [name for name, _ in head.named_parameters()]
    fix_rows(head, torch.zeros(2, *getattr(head, attr).shape[1:]), name=attr)
    bake(head)
    assert [name for name, _ in head.named_parameters()] == order
    assert list(head.state_dict()) == order


@pytest.mark.parametrize(
    "module",
    [nn.Embedding(5, 4), nn.EmbeddingBag(5, 4), nn.Linear(4, 5)],
    ids=["embedding", "bag", "linear"],
)
def test_bake_removes_the_fast_forward(module: nn.Module) -> None:
    plain = type(module)
    fix_rows(module, torch.zeros(2, 4))
    assert type(module).forward is not plain.forward
    bake(module)
    assert type(module) is plain
    assert "forward" not in vars(module)
    weight = module.weight
    assert isinstance(weight, nn.Parameter)
    assert torch.equal(weight[:2], torch.zeros(2, 4))


def test_fix_rows_again_after_bake() -> None:
    emb = nn.Embedding(6, 3)
    fix_rows(emb, torch.ones(2, 3))
    bake(emb)
    fix_rows(emb, torch.zeros(3, 3))
    assert torch.equal(emb.weight[:3], torch.zeros(3, 3))
    assert list(emb.state_dict()) == ["weight"]
    assert len(emb._state_dict_hooks) == 1


def test_bake_of_a_raw_registration_works_too() -> None:
    from torch.nn.utils import parametrize

    emb = nn.Embedding(4, 2)
    parametrize.register_parametrization(emb, "weight", FixedRows(torch.ones(1, 2)))
    bake(emb)
    assert type(emb.weight) is nn.Parameter
    assert torch.equal(emb.weight[0], torch.ones(2))


def test_deepcopy_keeps_the_constraint_and_plain_state_dict() -> None:
    reference = torch.randn(2, 3)
    emb = nn.Embedding(6, 3)
    fix_rows(emb, reference)
    clone = copy.deepcopy(emb)
    _train(clone)
    assert torch.equal(clone.weight[:2], reference)
    assert list(clone.state_dict()) == ["weight"]
    assert not torch.equal(clone.weight, emb.weight)
    bake(clone)
    assert list(clone.state_dict()) == ["weight"]
    assert not clone._state_dict_hooks
    assert list(emb.state_dict()) == ["weight"], "baking the copy must not touch the original"


class _TiedLM(nn.Module):
    """A tiny language model whose output head shares the embedding matrix."""

    def __init__(self, vocab: int = 7, dim: int = 3) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, tokens: Tensor) -> Tensor:
        out: Tensor = self.head(torch.tanh(self.wte(tokens)))
        return out


def test_tied_weights_are_constrained_everywhere_and_stay_tied_after_bake() -> None:
    torch.manual_seed(0)
    model = _TiedLM()
    param = model.wte.weight
    reference = torch.randn(3, 3)
    keys = list(model.state_dict())
    fix_rows(model, reference, name="wte.weight", rows=[6, 0, 2])
    assert list(model.state_dict()) == keys
    assert [p is param for p in model.parameters()] == [True]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(4):
        opt.zero_grad()
        torch.autograd.backward(
            nn.functional.cross_entropy(model(torch.arange(7)), torch.arange(7).flip(0))
        )
        opt.step()
        assert torch.equal(model.head.weight[[6, 0, 2]], reference)
        assert torch.equal(model.wte.weight, model.head.weight)
    trained = model.wte.weight.detach().clone()
    bake(model, name="wte.weight")
    assert model.wte.weight is param
    assert model.head.weight is param
    assert type(model.head) is nn.Linear
    assert type(model.wte) is nn.Embedding
    assert torch.equal(param, trained)


def test_tied_model_state_dict_loads_into_a_plain_tied_model() -> None:
    model = _TiedLM()
    fix_rows(model, torch.randn(2, 3), name="head.weight")
    plain = _TiedLM()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.wte.weight, model.wte.weight)
    model.load_state_dict(plain.state_dict())
    assert torch.equal(model.head.weight, plain.head.weight)


def test_tied_holders_share_one_tensor_in_a_state_dict_as_a_plain_tied_model_does() -> None:
    # Savers that write shared tensors once (safetensors through transformers' save_pretrained)
    # then write the constrained matrix once too.
    def storage(tensor: Tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    plain_state = _TiedLM().state_dict()
    assert storage(plain_state["wte.weight"]) == storage(plain_state["head.weight"])
    model = _TiedLM()
    fix_rows(model, torch.randn(2, 3), name="wte.weight", rows=[4, 1])
    state = model.state_dict()
    assert state["wte.weight"] is state["head.weight"]
    assert torch.equal(state["wte.weight"], model.wte.weight)
    # A later call builds anew: it sees the values as they are now, not a shared stale tensor.
    with torch.no_grad():
        stored(model.wte).add_(1.0)
    again = model.state_dict(destination=state)  # the same dict, written again: no reuse
    assert torch.equal(again["wte.weight"], model.wte.weight)
    assert torch.equal(again["head.weight"], model.wte.weight)
    fresh = model.state_dict()
    assert fresh["wte.weight"] is not state["wte.weight"]
    assert torch.equal(fresh["head.weight"], model.head.weight)


def test_a_reference_module_constrains_a_heads_weight_and_bias_in_one_call() -> None:
    torch.manual_seed(0)
    old_head = nn.Linear(4, 3)
    head = vocab.append(old_head, 2, generator=torch.Generator().manual_seed(0))
    fix_rows(head, old_head)
    assert is_fixed(head, "weight")
    assert is_fixed(head, "bias")
    assert list(head.state_dict()) == ["weight", "bias"]
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        head(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
    assert torch.equal(head.weight[:3], old_head.weight)
    assert torch.equal(head.bias[:3], old_head.bias)
    bake(head)  # every constrained tensor: weight and bias
    assert type(head) is nn.Linear
    assert type(head.weight) is nn.Parameter
    assert type(head.bias) is nn.Parameter
    assert torch.equal(head.bias[:3], old_head.bias)


def test_a_reference_module_with_rows_holds_those_rows_of_each_tensor() -> None:
    old_head = nn.Linear(4, 2)
    head = nn.Linear(4, 5)
    fix_rows(head, old_head, rows=[4, 1])
    assert torch.equal(head.weight[[4, 1]], old_head.weight)
    assert torch.equal(head.bias[[4, 1]], old_head.bias)


@pytest.mark.parametrize("bad", ["no-bias", "other-class", "with-name", "nan-bias"])
def test_a_bad_reference_module_changes_nothing(bad: str) -> None:
    head = nn.Linear(4, 5)
    before = [(n, p, p.detach().clone()) for n, p in head.named_parameters()]
    linear = nn.Linear(4, 2, bias=bad != "no-bias")
    if bad == "nan-bias":  # the weight would fit: the bias fails, and neither is constrained
        with torch.no_grad():
            linear.bias[1] = float("nan")
    reference: nn.Module = nn.Embedding(2, 4) if bad == "other-class" else linear
    name = "weight" if bad == "with-name" else None
    with pytest.raises((TypeError, ValueError), match="Expected"):
        fix_rows(head, reference, name=name)
    assert type(head) is nn.Linear
    assert [(n, p) for n, p, _ in before] == list(head.named_parameters())
    assert all(torch.equal(p, value) for _, p, value in before)


def test_bake_without_a_name_bakes_every_constrained_tensor_under_a_root() -> None:
    model = nn.ModuleDict({"emb": nn.Embedding(6, 2), "head": nn.Linear(2, 6)})
    model["head"].weight = model["emb"].weight
    fix_rows(model, torch.zeros(2, 2), name="emb.weight")
    fix_rows(model, torch.zeros(2), name="head.bias")
    bake(model)
    assert not parametrize.is_parametrized(model["emb"])
    assert not parametrize.is_parametrized(model["head"])
    assert model["head"].weight is model["emb"].weight
    assert model["emb"].weight.shape == (6, 2)
    assert model["head"].bias.shape == (6,)


def test_vocab_append_grows_after_the_old_rows() -> None:
    old = nn.Embedding(5, 3)
    new = vocab.append(old, 2, init="zeros")
    assert new.weight.shape == (7, 3)
    assert torch.equal(new.weight[:5], old.weight)
    assert torch.equal(new.weight[5:], torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"Expected `count` to be 0 or more\. Got -1"):
        vocab.append(old, -1)
    with pytest.raises(TypeError, match=r"Expected `count` to be an int\. Got float"):
        vocab.append(old, 2.0)  # type: ignore[arg-type]


# -- copies -----------------------------------------------------------------------------------


LAYOUTS: dict[str, list[int] | None] = {"prefix": None, "scattered": [8, 1, 4, 5]}

FIXED_AT = {"prefix": [0, 1, 2, 3], "scattered": [8, 1, 4, 5]}


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


# -- ties that reach outside the module given -------------------------------------------------


def test_a_parameter_held_only_inside_is_not_refused_for_other_references_to_it() -> None:
    emb = nn.Embedding(10, 4)
    named = dict(emb.named_parameters())  # a dict holding it, but no module's
    optimizer = torch.optim.SGD(emb.parameters(), lr=0.1)
    fix_rows(emb, torch.zeros(4, 4))
    assert named["weight"] is stored(emb)
    assert optimizer.param_groups[0]["params"][0] is stored(emb)


# -- the meta device --------------------------------------------------------------------------


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


@pytest.mark.parametrize("rows", [None, [5, 0, 3]], ids=["prefix", "scattered"])
def test_a_module_built_on_the_meta_device_is_constrained_there(rows: list[int] | None) -> None:
    """torchtitan's order (and Lightning's ``init_module(empty_init=True)``): build on meta,
    constrain with a reference that holds values, ``to_empty``, initialise, load."""
    torch.manual_seed(0)
    reference = torch.randn(3, 2)
    with torch.device("meta"):
        emb, head = nn.Embedding(6, 2), nn.Linear(2, 6)
    model = nn.Sequential(emb, head)
    parts: list[nn.Embedding | nn.Linear] = [emb, head]
    fix_rows(emb, reference, rows=rows)
    fix_rows(head, reference, rows=rows)
    assert stored(emb).is_meta
    assert stored(emb).shape == (3, 2)
    assert list(model.state_dict()) == ["0.weight", "1.weight", "1.bias"]
    assert model(torch.arange(6, device="meta")).shape == (6, 6)
    model.to_empty(device="cpu")
    for module in parts:
        module.reset_parameters()  # the model's own initialisation: free rows only
    fixed = [0, 1, 2] if rows is None else sorted(rows)
    expected = reference if rows is None else reference[torch.tensor(rows).argsort()]
    for module in parts:
        assert torch.equal(module.weight[fixed], expected)
        assert torch.isfinite(module.weight).all()
        assert constraint_of(module).joined(stored(module)) is not None  # one block again
    plain_emb, plain_head = nn.Embedding(6, 2), nn.Linear(2, 6)
    with torch.no_grad():
        plain_emb.weight[fixed] = expected
        plain_head.weight[fixed] = expected
    model.load_state_dict(nn.Sequential(plain_emb, plain_head).state_dict())
    assert torch.equal(emb.weight, plain_emb.weight)  # a checkpoint of the same fixed rows
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    torch.autograd.backward(model(torch.arange(6)).pow(2).sum())
    opt.step()
    assert torch.equal(emb.weight[fixed], expected)


# -- optimizers made before fix_rows ----------------------------------------------------------


def test_an_optimizer_made_before_that_has_not_stepped_trains_the_free_rows() -> None:
    emb = nn.Embedding(6, 2)
    optimizer = torch.optim.Adam(emb.parameters(), lr=0.1)
    fix_rows(emb, torch.zeros(2, 2))
    emb(torch.tensor([0, 5])).sum().backward()
    optimizer.step()
    assert optimizer.state[stored(emb)]["exp_avg"].shape == (4, 2)
    assert torch.equal(emb.weight[:2], torch.zeros(2, 2))


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
