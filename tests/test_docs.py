"""Run the Python examples of the README and of every documentation page.

The ```python blocks of one file run in order in one fresh namespace, in a temporary working
directory, so an example may build on the one before it and whatever it writes stays out of
the repository. A block whose fence follows a line ``<!-- no-test -->`` is not run.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST = "<!-- no-test -->"
# Generated from the docstrings, whose examples run as doctests.
API_PAGE = "api.md"
# Benchmark numbers: an example there is run, but the page need not have one.
MAY_HAVE_NO_EXAMPLE = {"performance.md"}
# Any fence that opens a Python block, indented or not, in any spelling.
PYTHON_FENCE = re.compile(r"^\s*(```|~~~)\s*(python|py|python3|pycon)\b")


@dataclass(frozen=True)
class Block:
    """One ```python block: its code, where it starts and whether it is marked no-test."""

    code: str
    first_line: int  # 0-based line of the first line of code in the file
    skipped: bool


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, in order.

    Only fences at the start of a line are understood; any other Python fence fails, so a
    block cannot go unrun because the parser did not see it.
    """
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i] != "```python":
            if PYTHON_FENCE.match(lines[i]):
                raise ValueError(
                    f"line {i + 1}: write Python examples as a ```python fence at the start of "
                    f"a line. Got {lines[i]!r}."
                )
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end] != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"line {i + 1}: the ```python block is not closed.")
        skipped = i > 0 and lines[i - 1].strip() == NO_TEST
        blocks.append(Block("\n".join(lines[i + 1 : end]), i + 1, skipped))
        i = end + 1
    return blocks


def _id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _marks(page: Path) -> list[pytest.MarkDecorator]:
    # Pages that fit a Lightning Trainer take several seconds.
    return [pytest.mark.slow] if "Trainer(" in page.read_text(encoding="utf-8") else []


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, id=_id(p), marks=_marks(p)) for p in PAGES if p.name != API_PAGE],
)
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if page.name not in MAY_HAVE_NO_EXAMPLE:
        assert [b for b in blocks if not b.skipped], f"{_id(page)} has no example that runs"
    if page == README:
        assert not [b for b in blocks if b.skipped], "every README example must run"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    # transformers logs its warnings (a config's token ids outside the vocabulary, say) to a
    # logger of its own that does not propagate: the README's examples run without any.
    logged = _Records(logging.WARNING)
    logging.getLogger("transformers").addHandler(logged)
    try:
        for block in blocks:
            if block.skipped:
                continue
            # Leading newlines make tracebacks point at the line in the Markdown file.
            code = compile("\n" * block.first_line + block.code, str(page), "exec")
            exec(code, namespace)  # noqa: S102 -- running the documented examples is the point
    finally:
        logging.getLogger("transformers").removeHandler(logged)
    if page == README:
        assert [r.getMessage() for r in logged.records] == []


class _Records(logging.Handler):
    """The log records it is handed."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_api_page_documents_every_public_name() -> None:
    import embedding_constraint

    text = (ROOT / "docs" / API_PAGE).read_text(encoding="utf-8")
    assert not python_blocks(text)
    documented = [line.split()[1] for line in text.splitlines() if line.startswith("::: ")]
    for name in embedding_constraint.__all__:
        assert any(d.split(".")[-1] == name for d in documented), f"{name} is not in {API_PAGE}"


def test_the_parser_finds_blocks_and_no_test_marks() -> None:
    text = f"# Page\n```python\nx = 1\n```\n{NO_TEST}\n```python\nx = 2\n```\n```sh\nx"
    assert python_blocks(text) == [Block("x = 1", 2, False), Block("x = 2", 6, True)]
    with pytest.raises(ValueError, match="at the start of a line"):
        python_blocks("- a list item\n\n    ```python\n    x = 1\n    ```")
    with pytest.raises(ValueError, match="not closed"):
        python_blocks("```python\nx = 1")
