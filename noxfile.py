"""Sessions that check embedding-constraint.

`nox` runs the everyday set: tests, lint, typecheck, docs and demo. `nox -s bench` runs the
benchmark (not part of the everyday set: it measures, it does not check).
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs", "demo"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

# An unpinned `torch` pulls a multi-GB CUDA build; pin the CPU build and let the
# environment choose another spec (EMBEDDING_CONSTRAINT_TORCH="torch==2.6.0", say).
TORCH = os.environ.get("EMBEDDING_CONSTRAINT_TORCH", "torch==2.13.0")
LIGHTNING = ["pytorch-lightning>=2.2", "lightning>=2.2"]
# Checkers pinned: a new release may format or infer differently, and CI must not change with it.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"


def _install(session: nox.Session, extras: str, *more: str) -> None:
    """Install the pinned torch first, so nothing else can pull an unpinned one."""
    session.install(TORCH)
    session.install("-e", f".[{extras}]", *more)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite, doctests and executed examples, under both Lightning flavours."""
    _install(session, "test,demo", *LIGHTNING)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package, tests and examples with mypy --strict."""
    _install(session, "test,demo", *LIGHTNING, MYPY, "nox")
    session.run("mypy", "--strict")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the produce demo: expand a vocabulary with and without the constraint."""
    _install(session, "demo")
    session.run("python", "examples/produce_demo.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site in strict mode (warnings fail the build)."""
    _install(session, "docs")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        "site",
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},  # material's notice about a future MkDocs
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Time a training step side by side: plain, overwrite, gradmask and this library."""
    _install(session, "test")
    session.run("python", "tests/benchmarks/bench_step.py", *session.posargs)
