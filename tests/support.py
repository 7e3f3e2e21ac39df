"""Small typed accessors shared by the tests."""

from __future__ import annotations

from torch import Tensor, nn

from embedding_constraint import FixedRows
from embedding_constraint.fixed_rows import parametrization_list


def stored(module: nn.Module, name: str = "weight") -> Tensor:
    """The parameter a constrained tensor stores: its free rows."""
    original = parametrization_list(module, name).original
    assert isinstance(original, Tensor)
    return original


def constraint_of(module: nn.Module, name: str = "weight") -> FixedRows:
    """The FixedRows registered on ``module.<name>``."""
    constraint = parametrization_list(module, name)[0]
    assert isinstance(constraint, FixedRows)
    return constraint


def graph_ops(out: Tensor) -> set[str]:
    """The names of the autograd nodes behind ``out``."""
    seen: set[str] = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node.name() in seen:
            continue
        seen.add(node.name())
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return seen
