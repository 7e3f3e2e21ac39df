"""Sessions that check embedding-constraint.

`nox` runs the everyday set: tests, lint, typecheck, docs and demo. They share one virtual
environment per torch requirement (``.nox/shared-<torch>``), made on first use: torch, both
Lightning packages, every extra and the pinned checkers. So torch is installed once, not once a
session; the environment is made again when the torch requirement, ``pyproject.toml`` or the
pinned checkers change. pip installs torch (so your pip configuration, a CPU-only index say,
decides which build); uv, where it is on the PATH, installs the rest, else pip. The tests run
on every core (pytest-xdist). `nox -s bench`
runs the step benchmark and `nox -s bench_lm` the language-model benchmark (not part of
the everyday set: they measure, they do not check).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs", "demo"]
nox.options.error_on_missing_interpreters = True

# An unpinned `torch` pulls a multi-GB CUDA build; pin the CPU build and let the
# environment choose another spec (EMBEDDING_CONSTRAINT_TORCH="torch==2.6.0", say).
TORCH = os.environ.get("EMBEDDING_CONSTRAINT_TORCH", "torch==2.13.0")
LIGHTNING = ["pytorch-lightning>=2.2", "lightning>=2.2"]
# Checkers pinned: a new release may format or infer differently, and CI must not change with it.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"
ROOT = Path(__file__).resolve().parent


def _python(session: nox.Session) -> str:
    """The shared environment's python, made first if it is missing or out of date."""
    wanted = "\n".join(
        [TORCH, *LIGHTNING, RUFF, MYPY, "nox", (ROOT / "pyproject.toml").read_text()]
    )
    stamp = hashlib.sha256(wanted.encode()).hexdigest()
    env = ROOT / ".nox" / f"shared-{re.sub(r'[^A-Za-z0-9.]+', '-', TORCH)}"
    python = env / "bin" / "python"
    done = env / "installed.sha256"
    if done.exists() and done.read_text() == stamp and python.exists():
        return str(python)
    uv = shutil.which("uv")
    session.log(
        f"Making {env.relative_to(ROOT)} once for every session: {TORCH} first, with pip (so "
        "nothing pulls an unpinned one), then with " + ("uv" if uv else "pip") + " both "
        "Lightning packages, this project with its test, demo, docs and peft extras (peft "
        "brings transformers), ruff and mypy."
    )
    session.run(sys.executable, "-m", "venv", "--clear", str(env), external=True)
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    session.run(*pip, TORCH, external=True)
    rest = ["-e", f"{ROOT}[test,demo,docs,peft]", *LIGHTNING, RUFF, MYPY, "nox"]
    if uv:
        # Compiled now, as pip does: else every test process (the parallel workers, the DDP
        # ranks) would compile what it imports on its own.
        uv_pip = [uv, "pip", "install", "--compile-bytecode", "--python", str(python)]
        session.run(*uv_pip, *rest, external=True)
    else:
        session.run(*pip, *rest, external=True)
    done.write_text(stamp)
    return str(python)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the test suite, doctests and executed examples, under both Lightning flavours."""
    # One pytest worker per core (pytest-xdist; `nox -s tests -- -n 0` runs them in one
    # process), the long multi-process tests handed out first come first. Inductor compiles in
    # the worker itself rather than in a pool of its own per worker.
    workers = ["--numprocesses", "auto", "--dist", "worksteal"]
    session.run(
        _python(session),
        "-m",
        "pytest",
        *workers,
        *session.posargs,
        env={"TORCHINDUCTOR_COMPILE_THREADS": "1"},
        external=True,
    )


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    python = _python(session)
    session.run(python, "-m", "ruff", "check", ".", external=True)
    session.run(python, "-m", "ruff", "format", "--check", ".", external=True)


@nox.session(venv_backend="none")
def typecheck(session: nox.Session) -> None:
    """Type-check the package, tests and examples with mypy --strict."""
    session.run(_python(session), "-m", "mypy", "--strict", external=True)


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """Run the produce demo: expand a vocabulary with and without the constraint."""
    python = _python(session)
    session.run(python, "examples/produce_demo.py", *session.posargs, external=True)


@nox.session(venv_backend="none")
def docs(session: nox.Session) -> None:
    """Build the documentation site in strict mode (warnings fail the build)."""
    session.run(
        _python(session),
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        "site",
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},  # material's notice about a future MkDocs
        external=True,
    )


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Time a training step side by side: plain, overwrite, gradmask and this library."""
    session.run(_python(session), "tests/benchmarks/bench_step.py", *session.posargs, external=True)


@nox.session(venv_backend="none")
def bench_lm(session: nox.Session) -> None:
    """Time a language model's step: plain, overwrite, PEFT, the floor and this library."""
    session.run(_python(session), "tests/benchmarks/bench_lm.py", *session.posargs, external=True)
