"""The language-model benchmark runs (``--quick``): every exact variant keeps the old rows, and
the library's losses are the hand-written floor's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "benchmarks" / "bench_lm.py"
# The library and the floor compute the same products, lookups and AdamW steps; their losses
# have matched bit for bit. Allow float32 rounding in case a kernel sums in another order.
LOSS_RTOL = 1e-5


def test_quick_run_keeps_old_rows_and_matches_the_floor(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "lm.json"
    result = subprocess.run(
        # Default AdamW only and two rounds (with the warmup step, three steps per variant):
        # every layout, tying and dtype, in seconds.
        [sys.executable, str(SCRIPT), "--quick", "--optimizers", "adamw", "--json", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    raw = json.loads(out.read_text())
    cells = raw["cells"]
    settings = {
        (c["setting"]["layout"], c["setting"]["tied"], c["setting"]["dtype"]) for c in cells
    }
    assert len(settings) == 8  # appended/resorted x untied/tied x float32/bfloat16
    exact_variants = ["overwrite", "floor", "library"]
    try:
        import peft  # noqa: F401
    except ImportError:
        pass
    else:
        exact_variants.append("peft")
    for cell in cells:
        label = cell["setting"]
        assert not cell["errors"], (label, cell["errors"])
        for variant in exact_variants:
            assert cell["exact"][variant], (label, variant)
        assert not cell["exact"]["plain"], label  # AdamW moves every row it trains
        assert cell["loss_rel_diff"] <= LOSS_RTOL, (label, cell["loss_rel_diff"])
        # bfloat16 weights: the library trains its rows and keeps AdamW's state in bfloat16.
        assert cell["trained_dtype"]["library"] == label["dtype"], label
        assert cell["state_dtype"]["library"] == label["dtype"], label
