"""Writes into a sharded constrained weight reach its stored rows, as on one device.

``fsdp_init_fit.py`` initialises a ``fully_shard`` model in place on 2 gloo processes, the way
a sharded model's ``init_weights`` does; each test reads one layout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).with_name("fsdp_init_fit.py")
sys.path.insert(0, str(SCRIPT.parent))

from fsdp_init_fit import LAYOUTS, REFERENCE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp-init")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        check=False, env=env, timeout=300, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        pytest.fail(f"{SCRIPT.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_in_place_initialisation_of_a_sharded_weight_reaches_its_free_rows(
    ranks: list[dict[str, Any]], layout: str
) -> None:
    rows = LAYOUTS[layout]
    fixed = [0, 1] if rows is None else sorted(rows)
    reference = REFERENCE if rows is None else REFERENCE[torch.tensor(rows).argsort()]
    free = [r for r in range(7) if r not in fixed]
    for rank in ranks:
        got, plain = rank[layout], rank[f"{layout}-plain"]
        for step in ("normal", "fill", "trained"):
            assert torch.equal(got[step][fixed], reference), step  # the fixed rows held
        # The free rows as the same writes leave an unconstrained sharded weight's rows.
        assert torch.equal(got["normal"][free], plain["normal"][free])
        assert torch.equal(got["fill"][free], torch.full((5, 3), 0.5))
        assert torch.equal(got["trained"][free], plain["trained"][free])
    assert all(torch.equal(ranks[0][layout][k], ranks[1][layout][k]) for k in ranks[0][layout])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merges_through_data_reach_the_free_rows_or_are_refused_on_every_rank(
    ranks: list[dict[str, Any]], layout: str
) -> None:
    """PEFT's merges write through ``.data``: ``weight.data += delta`` of free rows reaches
    them, as it does an unconstrained sharded weight's; ``weight.data = ...`` changing fixed
    rows is refused on every rank, as on one device, and the stored rows keep their values."""
    rows = LAYOUTS[layout]
    fixed = [0, 1] if rows is None else sorted(rows)
    reference = REFERENCE if rows is None else REFERENCE[torch.tensor(rows).argsort()]
    free = [r for r in range(7) if r not in fixed]
    for rank in ranks:
        got, plain = rank[layout], rank[f"{layout}-plain"]
        assert torch.equal(got["merged"][fixed], reference)
        assert torch.equal(got["merged"][free], got["trained"][free] + 0.25)
        torch.testing.assert_close(
            got["merged"][free] - got["trained"][free],
            plain["merged"][free] - plain["trained"][free],
            rtol=0,
            atol=0,
        )
        assert int(got["refused"]) == 1
        assert torch.equal(got["after refusal"], got["merged"])
