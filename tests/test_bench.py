"""The benchmark script runs (tiny sizes) and reports which variants keep the fixed rows exact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "benchmarks" / "bench_step.py"
TINY = ["--vocab", "500", "--dim", "8", "--tokens", "64", "--rounds", "1", "--warmup", "1"]


def test_benchmark_smoke_run_reports_exactness() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--no-memory", "--fractions", "0", "0.9"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = result.stdout.splitlines()
    header = "| frozen | k | plain | overwrite | overwrite-host | gradmask | fixed-prefix | fixed-scattered |"
    assert lines.count(header) >= 4  # timing and exactness tables, for both AdamW flavours
    # AdamW's weight decay moves plain and gradient-masked rows; the others stay exact.
    exact = "| 0.9 | 450 | **no** | yes | yes | **no** | yes | yes |"
    assert lines.count(exact) == 2
    assert lines.count("| 0 | 0 | yes | yes | yes | yes | yes | yes |") == 2


def test_benchmark_smoke_run_of_an_output_head() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *TINY,
            "--layer",
            "linear",
            "--no-memory",
            "--fractions",
            "0.9",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# Linear training step:")
    assert lines.count("| 0.9 | 450 | **no** | yes | yes | **no** | yes | yes |") == 2
