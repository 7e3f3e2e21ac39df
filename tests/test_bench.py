"""The benchmark script runs (tiny sizes) and reports which variants keep the fixed rows exact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "benchmarks" / "bench_step.py"
PROFILE_SCRIPT = Path(__file__).parent / "benchmarks" / "profile_step.py"
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


def test_benchmark_smoke_run_of_an_embedding_bag() -> None:
    command = [sys.executable, str(SCRIPT), *TINY, "--layer", "bag", "--no-memory"]
    result = subprocess.run(
        [*command, "--fractions", "0.9"], capture_output=True, text=True, check=True, timeout=300
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# Bag training step:")
    assert lines.count("| 0.9 | 450 | **no** | yes | yes | **no** | yes | yes |") == 2


def test_profile_smoke_run_times_every_variant_and_writes_a_profile(tmp_path: Path) -> None:
    command = [sys.executable, str(PROFILE_SCRIPT), "--quick", "--fractions", "0.9"]
    command += ["--steps", "2", "--flush-mib", "1"]
    result = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=300, cwd=tmp_path
    )
    rows = [
        line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| 0.9")
    ]
    variants = ["plain", "fixed-prefix", "fixed-scattered", "free-only"]
    assert [row[2].strip() for row in rows] == variants * 2  # default, then fused AdamW
    for row in rows:
        assert all(float(cell) > 0 for cell in row[3:])  # synced, flushed, pipelined
    assert "embedding" in (tmp_path / "profile-fixed-prefix-0.9.txt").read_text()


def test_write_through_benchmark_smoke_run_prints_its_ratios() -> None:
    script = Path(__file__).parent / "benchmarks" / "bench_write_through.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = result.stdout.splitlines()
    assert lines[1] == "| variant | ms per step | ratio to raw-read |"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[3:]}
    assert set(rows) == {"plain", "raw-read", "write-through"}
    assert rows["raw-read"].endswith("| 1.000 |")
