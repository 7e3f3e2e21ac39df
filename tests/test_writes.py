"""What user code writes into a constrained tensor reaches its free rows (`WriteThrough`).

``module.weight`` and the module's ``state_dict()`` entry are computed from the reference and
the stored free rows; the writers below (in-place initialisation, EMA updates through the state
dict, ``.data`` assignment) would otherwise change a copy only. Each test compares with what
the same code does to a plain module: the free rows take the written values, the fixed rows
stay exactly the reference.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
from support import stored
from torch import Tensor, nn

from embedding_constraint import bake, fix_rows
from embedding_constraint.fixed_rows import parametrization_list
from embedding_constraint.write_through import WriteThrough

ROWS: dict[str, list[int] | None] = {"prefix": None, "scattered": [1, 4, 6]}


def _constrained(rows: list[int] | None) -> tuple[nn.Embedding, Tensor, list[int]]:
    torch.manual_seed(0)
    emb = nn.Embedding(8, 3)
    reference = torch.randn(3, 3)
    fix_rows(emb, reference, rows=rows)
    fixed = [0, 1, 2] if rows is None else rows
    return emb, reference, fixed


def _free(fixed: list[int], total: int = 8) -> list[int]:
    return [r for r in range(total) if r not in fixed]


def _assert_held(emb: nn.Embedding, reference: Tensor, fixed: list[int]) -> None:
    assert torch.equal(emb.weight.detach()[fixed], reference)


def _init_embeddings(module: nn.Module) -> None:
    if isinstance(module, nn.Embedding):
        nn.init.uniform_(module.weight)


WRITERS: dict[str, Callable[[nn.Embedding], object]] = {
    "init.normal_": lambda emb: nn.init.normal_(emb.weight),
    "apply(init_fn)": lambda emb: emb.apply(_init_embeddings),
    "reset_parameters": lambda emb: emb.reset_parameters(),
    "setitem under no_grad": lambda emb: _no_grad(lambda: emb.weight.__setitem__(5, 1.0)),
    "data.zero_": lambda emb: emb.weight.data.zero_(),
    "view.fill_": lambda emb: _no_grad(lambda: emb.weight[3:].fill_(2.0)),
    "detach().mul_": lambda emb: emb.weight.detach().mul_(3.0),
    "data = ... (the fixed rows as they are)": lambda emb: setattr(
        emb.weight, "data", _free_rows_set(emb.weight.detach(), 4.0)
    ),
    "data += ... (zero in the fixed rows)": lambda emb: _add_to_data(emb),
    "copy_": lambda emb: _no_grad(lambda: emb.weight.copy_(torch.arange(24.0).view(8, 3))),
}


def _no_grad(write: Callable[[], object]) -> None:
    with torch.no_grad():
        write()


FREE_IN_BOTH = [3, 5, 7]  # rows free in both layouts of ROWS


def _free_rows_set(weight: Tensor, value: float) -> Tensor:
    """A copy of ``weight`` with rows 3, 5 and 7 (free in both layouts) set to ``value``."""
    written = weight.clone()
    written[FREE_IN_BOTH] = value
    return written


def _add_to_data(emb: nn.Embedding) -> None:
    """PEFT's LoRA merge, ``weight.data += delta``, with a delta that is zero in the fixed rows."""
    delta = torch.zeros(8, 3)
    delta[FREE_IN_BOTH] = torch.arange(9.0).view(3, 3)
    emb.weight.data += delta


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("writer", WRITERS)
def test_writes_into_the_weight_reach_the_free_rows(writer: str, where: str) -> None:
    emb, reference, fixed = _constrained(ROWS[where])
    plain = nn.Embedding(8, 3)
    with torch.no_grad():
        plain.weight.copy_(emb.weight)
    free = _free(fixed)
    torch.manual_seed(1)
    WRITERS[writer](plain)
    torch.manual_seed(1)
    WRITERS[writer](emb)
    _assert_held(emb, reference, fixed)
    assert torch.equal(stored(emb), plain.weight.detach()[free])
    assert not torch.equal(plain.weight.detach()[free], torch.zeros(0))  # something was written


@pytest.mark.parametrize("where", ROWS)
def test_the_written_weight_shows_the_fixed_rows_held(where: str) -> None:
    emb, reference, fixed = _constrained(ROWS[where])
    with torch.no_grad():
        weight = emb.weight
        weight.fill_(5.0)
    assert torch.equal(weight[fixed], reference)  # the write to a fixed row is undone
    assert torch.equal(weight[_free(fixed)], torch.full((5, 3), 5.0))


def _ema_v2(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """timm's ModelEmaV2 update rule: a copy_ into each state-dict entry."""
    with torch.no_grad():
        for ema_v, model_v in zip(
            ema.state_dict().values(), model.state_dict().values(), strict=True
        ):
            ema_v.copy_(ema_v * decay + (1.0 - decay) * model_v)


def _ema_v3(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """timm's ModelEmaV3 update rule: one foreach lerp over the floating state-dict entries."""
    with torch.no_grad():
        pairs = [
            (e, m)
            for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True)
            if e.is_floating_point()
        ]
        torch._foreach_lerp_([e for e, _ in pairs], [m for _, m in pairs], weight=1.0 - decay)


def _ema_yolov5(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """YOLOv5's ModelEMA update rule: ``v *= d; v += (1 - d) * msd[k]`` in place."""
    with torch.no_grad():
        msd = model.state_dict()
        for k, v in ema.state_dict().items():
            if v.dtype.is_floating_point:
                v *= decay
                v += (1 - decay) * msd[k].detach()


EMAS = {"timm-v2": _ema_v2, "timm-v3": _ema_v3, "yolov5": _ema_yolov5}


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("rule", EMAS)
def test_ema_updates_through_the_state_dict_move_the_free_rows(rule: str, where: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(8, 3), nn.Linear(3, 2))
    reference = torch.randn(3, 3)
    fix_rows(model, reference, name="0.weight", rows=ROWS[where])
    fixed = ROWS[where] or [0, 1, 2]
    ema = copy.deepcopy(model)
    plain_ema = copy.deepcopy(model.state_dict())  # the same rule on plain tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    decay = 0.9
    for step in range(3):
        loss = model(torch.tensor([0, 2, 3, 5, 7, step])).square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        EMAS[rule](ema, model, decay)
        plain_model = copy.deepcopy(model.state_dict())
        EMAS[rule](_Holder(plain_ema), _Holder(plain_model), decay)
    for key, value in ema.state_dict().items():
        expected = plain_ema[key]
        if key == "0.weight":  # the plain rule moves the fixed rows by rounding; they are held
            expected = expected.index_copy(0, torch.tensor(fixed), reference)
            assert torch.equal(value[fixed], reference)
        assert torch.equal(value, expected), key
    free = _free(fixed)
    assert not torch.equal(ema.state_dict()["0.weight"][free], model.state_dict()["0.weight"][free])


class _Holder(nn.Module):
    """A module whose ``state_dict()`` is the given dict itself (plain tensors, in place)."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        self.state = state

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, Tensor]:  # type: ignore[override]
        return self.state


@pytest.mark.parametrize("where", ROWS)
def test_an_in_place_load_through_the_state_dict_loads_the_free_rows(where: str) -> None:
    emb, reference, fixed = _constrained(ROWS[where])
    incoming = torch.arange(24.0).view(8, 3)
    with torch.no_grad():
        emb.state_dict()["weight"].copy_(incoming)
    free = _free(fixed)
    assert torch.equal(stored(emb), incoming[free])
    _assert_held(emb, reference, fixed)
    kept = emb.state_dict(keep_vars=True)["weight"]
    with torch.no_grad():
        kept.zero_()
    assert torch.equal(stored(emb), torch.zeros(5, 3))


def test_copies_of_the_weight_are_plain_tensors_of_their_own() -> None:
    emb, _, _ = _constrained(None)
    state = emb.state_dict()
    assert type(state["weight"]) is WriteThrough
    snapshot = copy.deepcopy(state)["weight"]
    clone = emb.weight.detach().clone()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)["weight"]
    for copied in (snapshot, clone, saved):
        assert type(copied) is Tensor
        with torch.no_grad():
            copied.add_(1.0)
    assert torch.equal(emb.weight.detach(), state["weight"])  # none of them wrote back
    assert repr(emb.weight).startswith("tensor(")


@pytest.mark.parametrize("where", ROWS)
def test_a_gradient_hook_on_the_weight_sees_the_full_gradient_and_may_change_it(
    where: str,
) -> None:
    emb, _, fixed = _constrained(ROWS[where])
    seen: list[Tensor] = []

    def double(grad: Tensor) -> Tensor:
        seen.append(grad)
        return grad * 2

    handle = emb.weight.register_hook(double)  # type: ignore[no-untyped-call]
    ids = torch.tensor([0, 1, 3, 3, 7])
    emb(ids).sum().backward()
    plain = nn.Embedding(8, 3)
    plain(ids).sum().backward()
    assert plain.weight.grad is not None
    expected = plain.weight.grad.clone()
    expected[fixed] = 0.0
    assert torch.equal(seen[0], expected)
    rows = stored(emb)
    assert rows.grad is not None
    assert torch.equal(rows.grad, 2 * plain.weight.grad[_free(fixed)])
    handle.remove()
    rows.grad = None
    emb(ids).sum().backward()
    assert len(seen) == 1
    grad = stored(emb).grad
    assert grad is not None
    assert torch.equal(grad, plain.weight.grad[_free(fixed)])


def test_the_weights_gradient_is_refused_with_the_stored_rows_name() -> None:
    emb, _, _ = _constrained(None)
    emb(torch.tensor([4, 5])).sum().backward()
    with pytest.raises(RuntimeError, match=r"parametrizations.<name>.original"):
        torch.nn.utils.clip_grad_norm_([emb.weight], 1.0)
    with pytest.raises(RuntimeError, match=r"never gets a gradient of its own"):
        _ = emb.weight.grad
    weight = emb.weight
    weight.retain_grad()  # as for any computed tensor: asked for, it is kept
    weight.sum().backward()  # type: ignore[no-untyped-call]
    assert weight.grad is not None
    assert torch.equal(weight.grad, torch.ones(8, 3))


def _set_data(emb: nn.Embedding) -> None:
    emb.weight.data = torch.full((8, 3), 4.0)


def _subtract_from_data(emb: nn.Embedding) -> None:
    emb.weight.data -= torch.ones(8, 3)


def _scale_a_view_of_data(emb: nn.Embedding) -> None:
    data = emb.weight.data[:5]
    data *= 2.0


# Writes through `.data` that say what the whole tensor is now (an assignment, Python's `+=` on
# `.data`, PEFT's merge), changing fixed rows: refused, since holding those rows loses the change.
DATA_ASSIGNMENTS: dict[str, Callable[[nn.Embedding], object]] = {
    "data = ...": _set_data,
    "data -= ...": _subtract_from_data,
    "view of data *= ...": _scale_a_view_of_data,
    "TrainableTokens merge on an old row": lambda emb: setattr(
        emb.weight,
        "data",
        emb.weight.data.index_copy(0, torch.tensor([1, 3]), torch.ones(2, 3)),
    ),
}


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("writer", DATA_ASSIGNMENTS)
def test_a_data_assignment_that_changes_fixed_rows_is_refused_and_the_module_keeps_its_rows(
    writer: str, where: str
) -> None:
    emb, reference, fixed = _constrained(ROWS[where])
    before, version = stored(emb).detach().clone(), stored(emb)._version
    changed = {
        "data = ...": 3,
        "data -= ...": 3,
        "view of data *= ...": 3 if where == "prefix" else 2,
        "TrainableTokens merge on an old row": 1,
    }[writer]
    with pytest.raises(ValueError, match=rf"changes {changed} fixed rows? .*bake\(model\) first"):
        DATA_ASSIGNMENTS[writer](emb)
    assert torch.equal(stored(emb), before)  # nothing was copied
    _assert_held(emb, reference, fixed)
    assert stored(emb)._version == version


def test_the_refusal_names_the_rows_and_what_stays_merged() -> None:
    emb, _, _ = _constrained([1, 4, 6])
    with pytest.raises(ValueError, match="bake") as refused:
        emb.weight.data += torch.ones(8, 3)
    message = str(refused.value)
    assert "changes 3 fixed rows (rows 1, 4, 6)" in message
    assert "layers merged before this one stay merged" in message


def test_in_place_methods_on_data_and_on_the_weight_still_hold_the_fixed_rows() -> None:
    # Re-initialisation and EMA-style writes are not refused: the fixed rows are set back.
    emb, reference, fixed = _constrained([1, 4, 6])
    emb.weight.data.normal_()
    emb.weight.data[1].zero_()
    with torch.no_grad():
        emb.weight += 1.0
        emb.weight.data.mul_(2.0)
    _assert_held(emb, reference, fixed)
    assert not torch.equal(stored(emb), torch.zeros(5, 3))


def test_a_write_of_another_shape_is_refused_and_the_module_keeps_its_rows() -> None:
    emb, _, _ = _constrained(None)
    before = stored(emb).detach().clone()
    with pytest.raises(ValueError, match=r"Expected a tensor of shape \(8, 3\).*\(9, 3\)"):
        emb.weight.data = torch.zeros(9, 3)
    assert torch.equal(stored(emb), before)


def test_the_baked_module_has_a_plain_weight() -> None:
    emb, reference, _ = _constrained(None)
    nn.init.zeros_(emb.weight)
    bake(emb)
    assert type(emb.weight) is nn.Parameter
    assert torch.equal(emb.weight[:3], reference)
    assert torch.equal(emb.weight[3:], torch.zeros(5, 3))


class _WeightOf(nn.Module):
    """Returns its module's weight as read (and records the read's type)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.types: list[type] = []

    def forward(self) -> Tensor:
        weight = self.inner.weight
        assert isinstance(weight, Tensor)
        self.types.append(type(weight))
        return weight


@pytest.mark.parametrize("where", ROWS)
def test_reads_under_torch_func_and_compile_are_plain_tensors(where: str) -> None:
    emb, _, fixed = _constrained(ROWS[where])
    reader = _WeightOf(emb)
    key = "inner.parametrizations.weight.original"
    free = stored(emb).detach()
    grad = torch.func.grad(lambda rows: torch.func.functional_call(reader, {key: rows}, ()).sum())(
        free
    )
    assert torch.equal(grad, torch.ones(5, 3))
    compiled = torch.compile(reader, backend="eager", fullgraph=True)
    assert torch.equal(compiled().detach(), emb.weight.detach())
    assert reader.types[:1] == [Tensor]
    assert emb.weight.detach()[fixed].shape == (3, 3)


def test_peft_merges_trainable_tokens_into_the_new_rows() -> None:
    # PEFT's merge writes `weight.data = merged`: before, on a constrained weight, that write
    # went to a computed copy and the merged model kept the untrained new rows.
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from test_transformers import NEW_VOCAB, OLD_VOCAB, _model

    from embedding_constraint.transformers import expand_vocabulary

    model = _model("llama", tied=False)
    expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
    old = model.get_input_embeddings().weight.detach().clone()
    new_ids = [i for i, token in enumerate(NEW_VOCAB) if token.startswith("new")]
    tokens = peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=new_ids)
    adapted = peft.get_peft_model(model, tokens)
    for name, param in adapted.named_parameters():
        if "trainable_tokens_delta" in name:
            with torch.no_grad():
                param.normal_()
    ids = torch.tensor([[0, new_ids[0], 4, new_ids[1], 7, new_ids[2]]])
    with torch.no_grad():
        expected = adapted(ids).logits
    merged = adapted.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, expected)
    kept = [i for i in range(len(NEW_VOCAB)) if i not in new_ids]
    assert torch.equal(merged.get_input_embeddings().weight.detach()[kept], old[kept])


@pytest.mark.parametrize("where", ROWS)
def test_the_write_through_read_matches_the_plain_read(where: str) -> None:
    # `module.weight` against torch's own read of the parametrization: values, gradients and
    # second derivatives (float64), and the lookups of bad ids fail as the plain read's do.
    torch.manual_seed(0)
    emb = nn.Embedding(8, 3).double()
    fix_rows(emb, torch.randn(3, 3, dtype=torch.float64), rows=ROWS[where])
    rows = stored(emb)
    plain_read = parametrization_list(emb, "weight")
    read = emb.weight
    assert type(read) is WriteThrough
    plain = plain_read()
    assert type(plain) is Tensor
    assert torch.equal(read.detach(), plain.detach())

    def loss(weight: Tensor) -> Tensor:
        return (weight.sin() * torch.arange(24.0, dtype=torch.float64).view(8, 3)).sum()

    (grad_read,) = torch.autograd.grad(loss(emb.weight), [rows], create_graph=True)
    (grad_plain,) = torch.autograd.grad(loss(plain_read()), [rows], create_graph=True)
    assert torch.equal(grad_read, grad_plain)
    (second_read,) = torch.autograd.grad(grad_read.sum(), [rows])
    (second_plain,) = torch.autograd.grad(grad_plain.sum(), [rows])
    assert torch.equal(second_read, second_plain)
    for bad in (torch.tensor([8]), torch.tensor([-9]), torch.tensor([0.5])):
        with pytest.raises((IndexError, RuntimeError)) as plain_error:
            torch.nn.functional.embedding(bad, plain_read())
        with pytest.raises(plain_error.type):
            torch.nn.functional.embedding(bad, emb.weight)
