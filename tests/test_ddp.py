"""DDP: exact fixed rows on every rank, free rows as one process, and no traffic for fixed rows.

Two CPU processes (gloo) fit side by side with one; one in-process group counts the bytes a
constrained model sends per step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from support import in_process_group
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from embedding_constraint import fix_rows

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


class _Traffic:
    """Bytes a DDP model sends per step: buffer broadcasts and gradient all-reduces."""

    def __init__(self) -> None:
        self.broadcast = 0
        self.allreduce = 0

    def hook(self, state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        self.allreduce += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(state, bucket)


@pytest.mark.parametrize("layout", ["prefix", "scattered"])
def test_fixed_rows_add_no_ddp_traffic(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab, dim, fixed = 1000, 16, 900
    traffic = _Traffic()
    broadcast = getattr(dist, "_broadcast_coalesced")  # noqa: B009 - private: what DDP calls

    def counting(group: Any, tensors: list[torch.Tensor], *args: Any) -> Any:
        traffic.broadcast += sum(t.numel() * t.element_size() for t in tensors)
        return broadcast(group, tensors, *args)

    steps = 3

    def train() -> None:
        torch.manual_seed(0)
        emb = nn.Embedding(vocab, dim)
        rows = None if layout == "prefix" else torch.randperm(vocab)[:fixed].tolist()
        fix_rows(emb, torch.randn(fixed, dim), rows=rows)
        model = DistributedDataParallel(emb)  # broadcast_buffers=True, the default
        # (A lambda: DDP checks annotations, which this module keeps as strings.)
        model.register_comm_hook(None, lambda state, bucket: traffic.hook(state, bucket))
        monkeypatch.setattr(dist, "_broadcast_coalesced", counting)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randint(0, vocab, (64,))).pow(2).sum().backward()
            optimizer.step()

    in_process_group(train, "gloo", str(tmp_path / "group"), rank=0, world=1)
    assert traffic.broadcast == 0  # nothing of the fixed rows travels
    free_gradient = (vocab - fixed) * dim * 4  # float32
    assert traffic.allreduce == steps * free_gradient
