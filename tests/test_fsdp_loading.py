"""Loading into a constrained model under FSDP2 the ways LLM stacks load (2 gloo processes).

``fsdp_loading_fit.py`` runs every case once per test session (a minute or two) and saves each
rank's result; each test here reads one case. The process group's timeout is 60 s: a rank
waiting in a collective that another rank skips fails its case instead of hanging the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import constraint_of, stored
from torch import nn

from embedding_constraint import fix_rows
from embedding_constraint.fsdp import prepare_fully_shard

SCRIPT = Path(__file__).with_name("fsdp_loading_fit.py")
LAYOUTS = ["prefix", "scattered", "prefix-sharded", "scattered-sharded"]
CASES = ["broadcast", "broadcast-lenient", "full", "dcp-2-to-1-save", "dcp-1-to-2", "torchtitan"]
META_CASES = ["meta-read", "accelerate"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """Each rank's results, then the one process's (rank 0, rank 1, single)."""
    out = tmp_path_factory.mktemp("fsdp-loading")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        check=False, env=env, timeout=900, capture_output=True,
    )  # fmt: skip
    return [
        torch.load(path) if path.exists() else {}
        for path in (out / "rank0.pt", out / "rank1.pt", out / "single.pt")
    ]


def _case(results: list[dict[str, str]], name: str) -> None:
    got = [ranked.get(name, "not run (an earlier case failed)") for ranked in results[:2]]
    assert got == ["ok", "ok"], got


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_loading_under_fsdp2(results: list[dict[str, str]], case: str, layout: str) -> None:
    """broadcast_from_rank0 (strict and not), a full state dict on every rank, distributed
    checkpoints across world sizes: exact on both ranks, a changed fixed row refused on both."""
    _case(results, f"{case}/{layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", META_CASES)
def test_loading_with_the_other_ranks_on_the_meta_device(
    results: list[dict[str, str]], case: str, layout: str
) -> None:
    """accelerate's cpu_ram_efficient_loading: every rank reads state_dict() (a meta rank and a
    rank with values alike), then fsdp2_load_full_state_dict loads rank 0's weights exactly.
    A reference sharded by prepare_fully_shard keeps its values on the meta device, as a whole
    one does: the fixed rows, which no checkpoint restores, are not lost there."""
    _case(results, f"{case}/{layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_checkpoint_of_two_ranks_loads_in_one_process(
    results: list[dict[str, str]], layout: str
) -> None:
    """Plain keys in the checkpoint; the values, fixed rows included, exact."""
    assert results[2].get(f"dcp-2-to-1/{layout}") == "ok", results[2]


@pytest.mark.parametrize("rows", [None, [4, 1]], ids=["prefix", "scattered"])
def test_a_reference_held_as_a_parameter_keeps_its_values_on_the_meta_device(
    rows: list[int] | None,
) -> None:
    """One process: the move accelerate makes before sharding, and back."""
    emb = nn.Embedding(6, 3)
    reference = torch.randn(2, 3)
    prepare_fully_shard(fix_rows(emb, reference, rows=rows))
    constraint = constraint_of(emb)
    held = constraint.reference
    before = held.detach().clone()
    emb.to("meta")
    assert stored(emb).is_meta
    assert emb.weight.is_meta
    assert constraint.reference is held
    assert not held.is_meta
    assert torch.equal(held, before)
    assert [n for n, p in emb.named_parameters() if p.is_meta] == [
        "parametrizations.weight.original"
    ]
    emb.to_empty(device="cpu")
    with torch.no_grad():
        stored(emb).normal_()
    fixed = list(range(2)) if rows is None else rows
    assert torch.equal(emb.weight[fixed], reference)
