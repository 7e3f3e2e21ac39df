"""The Hugging Face example: a retrained tokenizer, a grown model, old tokens' logits unchanged."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_vocabulary.py"


def test_the_old_tokens_logits_do_not_move_while_the_new_rows_learn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = importlib.util.spec_from_file_location("hf_vocabulary", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # its dataclass looks its module up
    spec.loader.exec_module(example)
    result = example.run(steps=30)
    assert result.new_size > result.old_size
    assert result.moved > 0  # retrained: the fixed rows are scattered
    assert result.loss_after < 0.5 * result.loss_before
    assert result.logit_change == 0.0
    assert result.reloaded_equal


def test_the_command_prints_its_summary() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "5"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    # DeepSpeed, where it is installed (the deepspeed extra), logs its accelerator to stdout
    # when transformers imports it: its lines are not the example's.
    lines = [
        line
        for line in done.stdout.splitlines()
        if not re.match(r"\[[\d-]+ [\d:,]+\] \[[A-Z]+\] \[", line)
    ]
    assert len(lines) == 4, done.stdout
    assert "old tokens moved to other ids" in lines[0]
    assert lines[2].endswith(": 0")
    assert lines[3].endswith("True")
    assert len(done.stdout) + len(done.stderr) < 2000  # no progress bars
