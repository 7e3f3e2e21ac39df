"""The constrained head under torch.compile (inductor) and torch.export: eager's values.

Compiled and exported, a constrained ``nn.Linear`` gives the eager fast read's output bit for
bit, and the plain module's, in float32 (see docs/performance.md, "Compiled heads, bit for
bit"). Compiling is slow: each test compiles a few small heads only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support import stored
from torch import Tensor, nn

from embedding_constraint import fix_rows

# Inductor imports torch.utils.mkldnn, which torch 2.13 itself warns about: not our code.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)

# (in_features, out_features, fixed rows): a prefix of fixed rows, or scattered ones.
HEADS: dict[str, tuple[int, int, list[int] | int]] = {
    "4-8-prefix": (4, 8, 3),
    "4-8-scattered": (4, 8, [6, 1, 3]),
    "64-1000-prefix": (64, 1000, 100),
    "64-1000-scattered": (64, 1000, [999, 3, *range(10, 400, 7)]),
}


class _Holder(nn.Module):
    """A model holding the head, as torch.export takes one."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(x)
        return out


def _heads(name: str, bias: bool) -> tuple[nn.Linear, nn.Linear]:
    """A plain float32 head and its constrained twin with the same weight."""
    in_features, out_features, fixed = HEADS[name]
    torch.manual_seed(0)
    plain = nn.Linear(in_features, out_features, bias=bias)
    head = copy.deepcopy(plain)
    weight = plain.weight.detach()
    if isinstance(fixed, int):
        fix_rows(head, weight[:fixed].clone())
    else:
        fix_rows(head, weight[fixed].clone(), rows=fixed)
    return plain, head


def _grads(out: Tensor, wrt: list[Tensor]) -> list[Tensor]:
    """The gradients of a fixed loss of ``out``."""
    scale = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    return list(torch.autograd.grad((out * scale).sum(), wrt))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("name", ["4-8-prefix", "64-1000-scattered"])
def test_a_compiled_head_equals_eager_bit_for_bit(name: str, bias: bool) -> None:
    # Before the fix a compiled prefix head computed two products and a cat, 6e-8 off eager
    # at 4 -> 8 features.
    plain, head = _heads(name, bias)
    x = torch.randn(2, 3, head.in_features)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    torch._dynamo.reset()
    out = torch.compile(head, backend="inductor", fullgraph=True)(xs[0])
    eager = head(xs[1])
    plain_out = torch.compile(plain, backend="inductor", fullgraph=True)(xs[2])
    assert torch.equal(out, eager)
    assert torch.equal(out, plain_out)
    got = _grads(out, [xs[0], stored(head)])
    expected = _grads(eager, [xs[1], stored(head)])
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    if bias:
        # Inductor sums the bias gradient in its own order, for the plain module too.
        (got_bias,) = _grads(torch.compile(head, backend="inductor")(x), [head.bias])
        (plain_bias,) = _grads(plain_out, [plain.bias])
        assert torch.equal(got_bias, plain_bias)
        (eager_bias,) = _grads(head(x), [head.bias])
        torch.testing.assert_close(got_bias, eager_bias, rtol=0.0, atol=5e-7)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("name", HEADS)
def test_an_exported_head_equals_eager_bit_for_bit(name: str, bias: bool) -> None:
    plain, head = _heads(name, bias)
    x = torch.randn(2, 3, head.in_features)
    exported = torch.export.export(_Holder(head), (x,)).module()
    with torch.no_grad():
        out = exported(x)
        assert torch.equal(out, head(x))
        assert torch.equal(out, plain(x))


@pytest.mark.parametrize("name", ["4-8-prefix", "64-1000-prefix"])
def test_an_exported_head_apart_from_its_reference_equals_the_plain_module(name: str) -> None:
    # Apart, eager computes two products side by side (no copy of the weight), off the plain
    # module in the last bits; traced, the weight is assembled and the product is the plain
    # one. docs/performance.md states the tolerance.
    plain, head = _heads(name, bias=True)
    with torch.no_grad():
        stored(head).data = stored(head).data.clone()
    x = torch.randn(2, 3, head.in_features)
    exported = torch.export.export(_Holder(head), (x,)).module()
    with torch.no_grad():
        out = exported(x)
        assert torch.equal(out, plain(x))
        torch.testing.assert_close(out, head(x), rtol=0.0, atol=2e-7)


def test_one_input_row_compiles_as_the_plain_module_does() -> None:
    # One input row, both weight dimensions at most 16, a bias: inductor's own CPU `addmm`
    # decomposition (a product and a sum) replaces the eager product, for a plain nn.Linear
    # too. The constrained head then equals the compiled plain module bit for bit, and eager
    # within the tolerance docs/performance.md states.
    plain, head = _heads("4-8-prefix", bias=True)
    x = torch.randn(1, head.in_features)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(head, backend="inductor", fullgraph=True)(x)
        assert torch.equal(out, torch.compile(plain, backend="inductor", fullgraph=True)(x))
        torch.testing.assert_close(out, head(x), rtol=0.0, atol=2e-7)
