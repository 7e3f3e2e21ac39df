"""Test-wide hygiene: no test leaks global torch settings into the next."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch

# Scripts that the tests run, which --doctest-modules would import: without their optional
# packages they cannot be imported (their tests skip).
collect_ignore = (
    []
    if importlib.util.find_spec("deepspeed")
    else ["deepspeed_fit.py", "deepspeed_lightning_fit.py"]
)


@pytest.fixture(autouse=True)
def _restore_deterministic_algorithms() -> Iterator[None]:
    # Trainer(deterministic=True) switches deterministic algorithms on for the whole process.
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
