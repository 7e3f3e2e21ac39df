"""The core imports without its optional integrations, and never loads them by itself.

Nor ``torch.distributed.tensor`` (more than half a second): a ``DTensor`` is recognised by
looking its class up where it is already loaded.
"""

from __future__ import annotations

import subprocess
import sys

_BLOCKED = """
import sys
for name in ("transformers", "peft", "tokenizers"):
    sys.modules[name] = None  # an import of it now raises ImportError
import torch
import embedding_constraint
import embedding_constraint.transformers as hf
from embedding_constraint import fix_rows, bake
emb = torch.nn.Embedding(4, 2)
bake(fix_rows(emb, torch.zeros(1, 2)))
print(hf.__all__)
"""

_LAZY = """
import sys
import embedding_constraint, embedding_constraint.transformers
print(sorted({"transformers", "peft", "torch.distributed.tensor"} & set(sys.modules)))
"""


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_core_and_the_integration_module_import_without_transformers() -> None:
    assert _run(_BLOCKED) == "['expand_vocabulary']"


def test_importing_the_package_imports_neither_transformers_nor_dtensor() -> None:
    assert _run(_LAZY) == "[]"
