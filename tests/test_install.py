"""The README's install commands name this checkout and extras that exist.

Running them is left to a person on a fresh machine: each would download torch's default
build, gigabytes, where no CPU build is at hand (the session notes record such runs).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _install_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Install") :]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the Install section has a sh block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [c for c in commands if c]


def test_the_install_block_names_extras_that_exist() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    table = pyproject[pyproject.index("[project.optional-dependencies]") :].split("\n[")[0]
    extras = set(re.findall(r"^([a-z][a-z0-9-]*) = ", table, re.MULTILINE))
    assert {
        "pytorch-lightning",
        "lightning",
        "transformers",
        "peft",
        "test",
        "demo",
        "docs",
    } <= extras
    commands = _install_commands()
    assert commands == [
        'pip install ".[pytorch-lightning]"',
        'pip install ".[lightning]"',
        'pip install ".[transformers]"',
        "pip install .",
    ]
    for command in commands:
        for extra in re.findall(r"\[([^\]]+)\]", command):
            assert extra in extras, f"{command}: no extra {extra!r} in pyproject.toml"
