"""One buffer `[reference; free]`: joined at registration, rejoined after moves, exact apart."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from support import constraint_of, stored
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from embedding_constraint import FixedRows, bake, fix_rows
from embedding_constraint.reads import lookup as lookup_read

ROWS: dict[str, list[int] | None] = {"prefix": None, "scattered": [8, 1, 4, 5]}
FIXED_AT = {"prefix": [0, 1, 2, 3], "scattered": [8, 1, 4, 5], "other": [9, 0, 2, 7]}


class _AtenOps(TorchDispatchMode):  # type: ignore[no-untyped-call]  # untyped in torch
    """Count the aten operators that run inside the mode."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _embedding(where: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Embedding, Tensor]:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, dtype=dtype)
    reference = torch.randn(4, 3, dtype=dtype)
    fix_rows(emb, reference, rows=ROWS[where])
    return emb, reference


def _joined(module: nn.Module) -> Tensor | None:
    return constraint_of(module).joined(stored(module))


def _shares_one_buffer(module: nn.Module) -> bool:
    free, reference = stored(module), constraint_of(module).reference
    return free.untyped_storage().data_ptr() == reference.untyped_storage().data_ptr()


def _train(emb: nn.Embedding, steps: int = 3) -> None:
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1, weight_decay=0.1)
    for step in range(steps):
        indices = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out = emb(indices)
        torch.autograd.backward((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum())
        opt.step()


@pytest.mark.parametrize("where", ROWS)
def test_registration_puts_reference_and_free_rows_in_one_buffer(where: str) -> None:
    emb, _ = _embedding(where)
    constraint, free = constraint_of(emb), stored(emb)
    assert _shares_one_buffer(emb)
    joined = _joined(emb)
    assert joined is not None
    assert torch.equal(joined, torch.cat((constraint.reference, free.detach())))
    # The buffer is in slot order: looking a row up by its slot gives the weight's row.
    slot = torch.arange(10) if constraint.slot is None else constraint.slot
    assert torch.equal(joined[slot], emb.weight)


@pytest.mark.parametrize("where", ROWS)
def test_a_raw_registration_joins_too(where: str) -> None:
    emb = nn.Embedding(10, 3)
    parametrize.register_parametrization(
        emb, "weight", FixedRows(torch.randn(4, 3), rows=ROWS[where])
    )
    assert _joined(emb) is not None


@pytest.mark.parametrize("where", ROWS)
def test_a_joined_lookup_is_one_gather_and_apart_it_is_two(where: str) -> None:
    emb, _ = _embedding(where)
    indices = torch.tensor([0, 1, 8, 9, 5])
    places = 0 if where == "prefix" else 1  # scattered ids are mapped by one lookup first
    with _AtenOps() as joined_ops:
        joined_out = emb(indices)
    assert joined_ops.ops["embedding"] == 1 + places
    assert not {"where", "index_copy", "nonzero"} & set(joined_ops.ops)
    with torch.no_grad():
        stored(emb).data = stored(emb).data.clone()  # apart now
    assert _joined(emb) is None
    with _AtenOps() as apart_ops:
        apart_out = emb(indices)
    assert apart_ops.ops["embedding"] == 2 + places
    assert torch.equal(joined_out, apart_out)


def _apart(emb: nn.Module) -> None:
    with torch.no_grad():
        stored(emb).data = stored(emb).data.clone()


def _assign_load(emb: nn.Module) -> None:
    # The parametrization's own format, assigned: a fresh tensor for the stored rows (the
    # reference is extra state, copied in place).
    plists = emb.get_submodule("parametrizations")
    state = {k: v.clone() if isinstance(v, Tensor) else v for k, v in plists.state_dict().items()}
    plists.load_state_dict(state, assign=True)


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("split", [_apart, _assign_load], ids=["data", "assign"])
@pytest.mark.parametrize("overwrite", [True, False], ids=["cpu-path", "accelerator-path"])
def test_apart_the_lookup_gives_the_same_values_gradients_and_training(
    where: str,
    split: Callable[[nn.Module], None],
    overwrite: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lookup_read, "_on_host", lambda slot: overwrite)
    joined, reference = _embedding(where, torch.float64)
    apart = copy.deepcopy(joined)
    split(apart)
    assert _joined(joined) is not None
    assert _joined(apart) is None
    _train(joined)
    _train(apart)
    assert torch.equal(stored(joined), stored(apart))
    assert torch.equal(apart.weight[FIXED_AT[where]], reference)
    assert torch.equal(apart(torch.tensor(FIXED_AT[where])), reference)
    assert torch.equal(joined(torch.arange(10)), apart(torch.arange(10)))


CHANGES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "to-float64": lambda m: m.to(torch.float64),
    "double": lambda m: m.double(),
    "bfloat16": lambda m: m.bfloat16(),
    "to-same-device": lambda m: m.to("cpu"),
    "deepcopy": copy.deepcopy,
    "share_memory": lambda m: m.share_memory(),
}


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("change", list(CHANGES))
def test_moves_and_copies_rejoin_and_keep_values(where: str, change: str) -> None:
    emb, reference = _embedding(where)
    before = emb.weight.detach().clone()
    changed = CHANGES[change](emb)
    assert isinstance(changed, nn.Embedding)
    assert _shares_one_buffer(changed)
    assert _joined(changed) is not None
    dtype = stored(changed).dtype
    assert torch.equal(changed.weight, before.to(dtype))
    _train(changed)
    assert torch.equal(changed.weight[FIXED_AT[where]], reference.to(dtype))


def test_an_optimizer_made_before_a_move_keeps_training_the_same_parameter() -> None:
    emb, reference = _embedding("scattered")
    param = stored(emb)
    opt = torch.optim.SGD(emb.parameters(), lr=1.0)
    emb.double()
    assert stored(emb) is param
    assert _joined(emb) is not None
    opt.zero_grad()
    emb(torch.arange(10)).sum().backward()
    opt.step()
    # The step moved the free rows inside the joined buffer, and only them.
    joined = _joined(emb)
    assert joined is not None
    assert torch.equal(joined[4:], param.detach())
    assert torch.equal(emb(torch.tensor([0, 2])), emb.weight[[0, 2]])
    assert torch.equal(emb.weight[FIXED_AT["scattered"]], reference.double())


@pytest.mark.parametrize("where", ROWS)
def test_a_functional_call_with_other_free_rows_reads_them_and_leaves_the_block(
    where: str,
) -> None:
    """`torch.func.functional_call` swaps the stored rows for a read: the read takes the
    tensor given, and the module keeps its block (its own rows never left it)."""
    emb, reference = _embedding(where)
    other = torch.randn_like(stored(emb))
    ids = torch.arange(10)
    key = "parametrizations.weight.original"
    out = torch.func.functional_call(emb, {key: other}, (ids,))
    constraint = constraint_of(emb)
    plain = torch.cat((constraint.reference, other))
    if constraint.slot is not None:
        plain = plain.index_select(0, constraint.slot)
    assert torch.equal(out, plain)
    assert _shares_one_buffer(emb)
    assert _joined(emb) is not None
    assert torch.equal(emb(ids), emb.weight)
    assert torch.equal(emb.weight[FIXED_AT[where]], reference)


@pytest.mark.parametrize("how", ["ema-parameters", "assigned", "state-dict", "other-rows"])
@pytest.mark.parametrize("where", ROWS)
def test_a_read_under_inference_mode_leaves_the_constraint_trainable(where: str, how: str) -> None:
    """What the constraint builds under ``torch.inference_mode`` and keeps (the reference's
    compact copy when a read lets the block go, a state dict's tensors) is never an inference
    tensor: a later training step would save it for backward, which torch refuses for those,
    where a plain module trains on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Tanh(), nn.Linear(4, 10))
    reference = torch.randn(4, 4)
    fix_rows(model[2], reference, rows=ROWS[where])
    twin = copy.deepcopy(model)
    ids = torch.tensor([0, 5, 9])
    if how == "ema-parameters":  # evaluate an EMA copy's Parameters in the model
        ema: dict[str, Tensor] = dict(copy.deepcopy(model).named_parameters())
        with torch.inference_mode():
            torch.func.functional_call(model, ema, ids)
    elif how == "assigned":  # the stored rows replaced by a Parameter of their own, then read
        model.load_state_dict(model.state_dict(), assign=True)
        with torch.inference_mode():
            model(ids)
    elif how == "state-dict":  # a state dict taken during an evaluation, loaded by assignment
        with torch.inference_mode():
            state = model.state_dict()
        model.load_state_dict(state, assign=True)
    else:  # torch's own format with the fixed rows elsewhere, loaded in inference mode
        other = nn.Linear(4, 10)
        rows = [9, 0, 2, 7]
        parametrize.register_parametrization(other, "weight", FixedRows(reference, rows=rows))
        with torch.inference_mode():
            model[2].load_state_dict(other.state_dict())
        twin[2].load_state_dict(other.state_dict())
        where = "other"
    held = [t for t in vars(constraint_of(model[2])).values() if isinstance(t, Tensor)]
    assert not any(t.is_inference() for t in held)
    model(ids).square().sum().backward()
    twin(ids).square().sum().backward()
    torch.testing.assert_close(stored(model[2]).grad, stored(twin[2]).grad)
    assert torch.equal(cast(Tensor, model[2].weight)[FIXED_AT[where]], reference)


@pytest.mark.parametrize("where", ROWS)
def test_a_module_constrained_moved_and_copied_inside_inference_mode(where: str) -> None:
    """Everything inside inference mode (an inference service): the rejoin after a move or a
    copy changes the stored rows in the caller's mode, where they may be inference tensors."""
    ids = torch.tensor([1, 3, 8])
    with torch.inference_mode():
        emb = nn.Embedding(10, 4)
        reference = torch.randn(4, 4)
        fix_rows(emb, reference, rows=ROWS[where])
        emb.double()
        twin = copy.deepcopy(emb)
        for module in (emb, twin):
            assert torch.equal(module(ids), module.weight[ids])
            assert torch.equal(module.weight[FIXED_AT[where]], reference.double())


@pytest.mark.parametrize("where", ROWS)
def test_share_memory_of_parts_apart_rejoins_them_in_shared_memory(where: str) -> None:
    """Hogwild-style training needs the stored rows in shared memory: a rejoin after
    `share_memory()` must not move them into a private buffer."""
    emb, reference = _embedding(where)
    param = stored(emb)
    with torch.no_grad():
        param.data = param.data.clone()  # apart
    assert _joined(emb) is None
    emb.share_memory()
    assert stored(emb) is param
    assert _joined(emb) is not None
    assert param.is_shared()  # type: ignore[no-untyped-call]
    assert torch.equal(emb.weight[FIXED_AT[where]], reference)


def test_a_plain_state_dict_loads_in_place() -> None:
    emb, reference = _embedding("prefix")
    plain = nn.Embedding(10, 3)
    with torch.no_grad():
        plain.weight[:4] = reference
    emb.load_state_dict(plain.state_dict())
    assert _joined(emb) is not None
    assert torch.equal(emb(torch.arange(10)), plain.weight)


class _Tied(nn.Module):
    """An embedding and an output head sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(10, 3)
        self.head = nn.Linear(3, 10, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> Tensor:
        out: Tensor = self.head(self.wte(ids))
        return out


def test_tied_modules_rejoin_once_after_a_move() -> None:
    model = _Tied()
    reference = torch.randn(4, 3)
    fix_rows(model, reference, name="wte.weight")
    model.double()
    assert _joined(model.wte) is not None
    assert stored(model.wte) is stored(model.head)
    assert torch.equal(model.head.weight[:4], reference.double())


def test_a_tied_input_and_output_read_the_weight_without_copying_it() -> None:
    # The weight is read twice per forward (lookup and head); neither read builds it.
    model = _Tied()
    reference = torch.randn(4, 3)
    twin = copy.deepcopy(model)
    fix_rows(model, reference, name="wte.weight")
    ids = torch.tensor([0, 5, 9, 3])
    with _AtenOps() as seen:
        logits = model(ids)
    assert not {"cat", "index_copy", "clone", "copy_"} & set(seen.ops)
    assert seen.ops["embedding"] == 1
    assert seen.ops["mm"] == 1
    with torch.no_grad():
        twin.wte.weight[:4] = reference
    torch.testing.assert_close(logits, twin(ids))
    logits.sum().backward()
    twin(ids).sum().backward()
    assert twin.wte.weight.grad is not None
    torch.testing.assert_close(stored(model.wte).grad, twin.wte.weight.grad[4:])


def test_bake_gives_a_weight_of_its_own() -> None:
    emb, _ = _embedding("scattered")
    weight = emb.weight.detach().clone()
    bake(emb)
    assert type(emb) is nn.Embedding
    assert torch.equal(emb.weight, weight)
    assert emb.weight.untyped_storage().nbytes() == emb.weight.numel() * 4


def test_rejoin_leaves_tensors_of_other_devices_or_dtypes_apart() -> None:
    constraint = FixedRows(torch.zeros(2, 3))
    free = nn.Parameter(constraint.right_inverse(torch.ones(5, 3)))
    other = nn.Parameter(free.detach().double())
    constraint.rejoin(other)
    assert constraint.joined(other) is None
    assert other.dtype == torch.float64
    constraint.rejoin(free)
    assert constraint.joined(free) is not None
