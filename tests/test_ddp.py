"""DDP with two CPU processes (gloo): exact fixed rows on every rank, free rows as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_fit.py")


def _fit(flavour: str, devices: int, out: Path, rows: list[int] | None) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # the ranks' own output is not under test
    command = [sys.executable, str(SCRIPT), "--flavour", flavour, "--devices", str(devices)]
    command += ["--out", str(out), *(["--rows", *map(str, rows)] if rows else [])]
    subprocess.run(command, check=True, env=env, timeout=300, capture_output=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flavour", "rows"),
    [("pytorch_lightning", None), ("lightning.pytorch", [9, 0, 4, 2, 7, 5])],
    ids=["pytorch_lightning-prefix", "lightning.pytorch-scattered"],
)
def test_ddp_two_processes_match_one_process(
    flavour: str, rows: list[int] | None, tmp_path: Path
) -> None:
    ranks = _fit(flavour, 2, tmp_path / "ddp", rows)
    (single,) = _fit(flavour, 1, tmp_path / "single", rows)
    reference, fixed_at = single["reference"], single["rows"]
    free_at = [r for r in range(10) if r not in fixed_at]
    for rank in [*ranks, single]:
        assert rank["plain"]
        assert torch.equal(rank["state_dict"]["embedding.weight"][fixed_at], reference)
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(ranks[1]["state_dict"][key], value), f"ranks differ in {key}"
        # Gradients are averaged across ranks in another order than one process sums them.
        torch.testing.assert_close(value, single["state_dict"][key], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    torch.randn(6, 4)
    initial = torch.nn.Embedding(10, 4).weight.detach()[free_at]
    moved = ranks[0]["state_dict"]["embedding.weight"][free_at]
    assert not torch.allclose(moved, initial), "free rows did not train"
