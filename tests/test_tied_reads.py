"""Tied holders read one tensor: ``embed.weight is head.weight``, as with a plain tie, and
never a stale or spent one."""

from __future__ import annotations

import copy

import pytest
import torch
from support import stored
from torch import Tensor, nn

from embedding_constraint import bake, fix_rows

ROWS = pytest.mark.parametrize("rows", [None, [4, 1]], ids=["prefix", "scattered"])


class _TiedLM(nn.Module):
    """A tiny language model whose output head shares the embedding matrix."""

    def __init__(self, vocab: int = 6, dim: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        out: Tensor = self.head(torch.tanh(self.embed(tokens)))
        return out


def _tied(rows: list[int] | None = None) -> _TiedLM:
    torch.manual_seed(0)
    model = _TiedLM()
    fix_rows(model, torch.randn(2, 3), name="embed.weight", rows=rows)
    return model


def _read(model: _TiedLM) -> Tensor:
    """What a read of the constrained weight gives now, built by a holder on its own."""
    return model.embed.weight.detach().clone()


@ROWS
def test_the_holders_of_a_tie_read_one_tensor(rows: list[int] | None) -> None:
    model = _tied(rows)
    first = model.embed.weight
    assert model.head.weight is first
    # PEFT's test of a tie, on reads made afresh.
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    # In either order, as accelerate and PEFT read them.
    assert model.head.weight is model.embed.weight
    assert model.embed.weight is model.head.weight


def test_a_read_held_is_the_read_of_every_holder() -> None:
    """As a plain Parameter: while one read is held, every read (its maker's too) is it."""
    model = _tied()
    held = model.embed.weight
    assert model.embed.weight is held
    assert model.head.weight is model.embed.weight
    assert model.embed.weight is model.head.weight
    assert model.head.weight.data_ptr() == held.data_ptr()
    untied = nn.Embedding(6, 3)
    fix_rows(untied, torch.zeros(2, 3))
    assert untied.weight is untied.weight


@ROWS
def test_each_holders_loss_runs_backward_on_its_own(rows: list[int] | None) -> None:
    """Two losses through one shared read: each backward works, as on a leaf Parameter, and
    the gradients add up as a plain tied model's."""
    model, plain = _tied(rows), _TiedLM()
    plain.embed.weight.data.copy_(model.embed.weight.detach())
    inputs = torch.randn(4, 3)
    for m in (model, plain):
        torch.autograd.backward(m.embed.weight.pow(2).sum())
        torch.autograd.backward((inputs @ m.head.weight.T).pow(2).sum())
    free = stored(model.embed)
    assert free.grad is not None
    assert plain.embed.weight.grad is not None
    kept = [r for r in range(6) if r not in ([0, 1] if rows is None else rows)]
    torch.testing.assert_close(free.grad, plain.embed.weight.grad[kept], rtol=0, atol=1e-6)


def test_a_read_written_in_place_in_grad_mode_is_not_handed_on() -> None:
    """Its graph now holds the write (here a doubling): a read made now has no such step."""
    model = _tied()
    held = model.embed.weight
    held.mul_(2.0)  # writes through to the stored rows
    now = model.head.weight
    assert now is not held
    assert torch.equal(now.detach(), held.detach())
    torch.autograd.backward(now.sum())
    free = stored(model.embed)
    assert free.grad is not None
    assert torch.equal(free.grad, torch.ones_like(free))


@ROWS
def test_a_read_is_not_handed_on_after_the_rows_change(rows: list[int] | None) -> None:
    model = _tied(rows)
    held = model.embed.weight
    before = held.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.autograd.backward(model(torch.arange(6)).pow(2).sum())
    optimizer.step()
    now = model.head.weight
    assert now is not held
    assert torch.equal(held.detach(), before)
    assert torch.equal(now.detach(), _read(model))
    assert not torch.equal(now.detach(), before)


@ROWS
def test_a_write_that_no_version_counter_sees_is_not_missed(rows: list[int] | None) -> None:
    # `.data` has a version counter of its own: FSDP2's and DeepSpeed's copies write this way.
    model = _tied(rows)
    held = model.embed.weight
    stored(model.embed).data.add_(1.0)
    now = model.head.weight
    assert now is not held
    assert torch.equal(now.detach(), _read(model))


def test_a_graph_used_by_a_backward_is_not_handed_on() -> None:
    """Gradient accumulation holds a read across a backward: the next read has a graph of its
    own (else its backward would run through a freed graph)."""
    model = _tied()
    held = model.embed.weight
    torch.autograd.backward(held.pow(2).sum())
    now = model.head.weight
    assert now is not held
    torch.autograd.backward(now.pow(2).sum())  # no "backward through the graph a second time"
    free = stored(model.embed)
    assert free.grad is not None
    expected = 4 * free.detach()
    torch.testing.assert_close(free.grad, expected, rtol=0, atol=1e-6)


def test_a_shared_read_takes_both_gradients_once() -> None:
    model = _tied()
    free = stored(model.embed)
    torch.autograd.backward(model.embed.weight.sum() + model.head.weight.sum())
    assert free.grad is not None
    assert torch.equal(free.grad, torch.full_like(free, 2.0))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_read_made_without_a_graph_is_not_handed_to_a_read_that_needs_one(mode: str) -> None:
    model = _tied()
    with getattr(torch, mode)():
        held = model.embed.weight
        assert model.head.weight is held  # within the mode, a tie as usual
    now = model.head.weight
    assert now is not held
    assert now.requires_grad
    assert not now.is_inference()


def test_a_read_with_a_graph_is_not_handed_to_a_frozen_read() -> None:
    model = _tied()
    held = model.embed.weight
    stored(model.embed).requires_grad_(False)
    now = model.head.weight
    assert now is not held
    assert not now.requires_grad


def test_copies_and_their_reads_are_their_own() -> None:
    model = _tied()
    held = model.embed.weight
    replica = copy.deepcopy(model)
    assert replica.head.weight is not held
    assert replica.head.weight is replica.embed.weight
    assert model.head.weight is held


def test_the_meta_device_reads_one_tensor_too() -> None:
    """accelerate's cpu_ram_efficient_loading tests the tie on a model moved to meta."""
    model = _tied().to("meta")
    assert model.head.weight is model.embed.weight
    assert model.head.weight.is_meta


def test_under_a_torch_func_transform_each_read_is_its_own() -> None:
    """A transform's tensors live only inside it: nothing is handed on there."""
    model = _tied()
    seen: list[Tensor] = []

    def loss(free: Tensor) -> Tensor:
        state = {"embed.parametrizations.weight.original": free}
        with torch.nn.utils.stateless._reparametrize_module(model, state):
            seen.extend([model.embed.weight, model.head.weight])
        return seen[-1].sum() + seen[-2].sum()

    grad = torch.func.grad(loss)(stored(model.embed).detach())
    assert seen[0] is not seen[1]
    assert torch.equal(grad, torch.full_like(grad, 2.0))


def test_bake_keeps_one_parameter_for_the_tie() -> None:
    model = _tied()
    held = model.embed.weight
    expected = held.detach().clone()
    bake(model)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.head.weight.detach(), expected)


@ROWS
def test_double_backward_through_a_shared_read(rows: list[int] | None) -> None:
    """A gradient penalty through both holders' read, as on a plain tied model."""
    model, plain = _tied(rows), _TiedLM()
    plain.embed.weight.data.copy_(model.embed.weight.detach())
    inputs = torch.randn(4, 3)
    grads = []
    for m in (model, plain):
        weight = m.embed.weight
        assert m.head.weight is weight
        out = (inputs @ m.head.weight.T).tanh().sum() + weight.pow(3).sum()
        (first,) = torch.autograd.grad(out, weight, create_graph=True)
        torch.autograd.backward(first.pow(2).sum())
        grads.append(stored(m.embed).grad if m is model else m.embed.weight.grad)
    free, full = grads
    assert free is not None
    assert full is not None
    kept = [r for r in range(6) if r not in ([0, 1] if rows is None else rows)]
    torch.testing.assert_close(free, full[kept], rtol=1e-6, atol=1e-6)
