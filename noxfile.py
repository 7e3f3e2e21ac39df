"""Sessions that check embedding-constraint.

`nox` runs the everyday set: tests, lint, typecheck, docs and demo. All but the demo share one
virtual environment per torch requirement (``.nox/shared-<torch>``), made on first use: torch,
both Lightning packages, every extra and the pinned checkers. So torch is installed once, not
once a session. The demo has a small one of its own (``.nox/demo-<torch>``): torch and this
package with its demo extra. An environment is made again when the torch requirement,
``pyproject.toml`` or (the shared one) the pinned checkers change. pip installs torch: on a
Linux machine without an NVIDIA GPU, whose pip has no index of the user's own, from PyTorch's
CPU-only index (PyPI's is the CUDA build), else as pip is configured (`torch_source`); uv,
where it is on the PATH, installs the rest, else pip. The tests run on every core
(pytest-xdist). `nox -s bench` runs the step benchmark and `nox -s bench_lm` the
language-model benchmark (not part of the everyday set: they measure, they do not check).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import nox
import nox.project
from packaging.requirements import Requirement

nox.options.sessions = ["tests", "lint", "typecheck", "docs", "demo"]
nox.options.error_on_missing_interpreters = True

# Pinned, so the checks do not change with a new release; the environment chooses another
# spec (EMBEDDING_CONSTRAINT_TORCH="torch==2.6.0", say). Which build: see `torch_source`.
TORCH = os.environ.get("EMBEDDING_CONSTRAINT_TORCH", "torch==2.13.0")
LIGHTNING = ["pytorch-lightning>=2.2", "lightning>=2.2"]
# Checkers pinned: a new release may format or infer differently, and CI must not change with it.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"
ROOT = Path(__file__).resolve().parent
# PyTorch's index of CPU-only builds, for machines without an NVIDIA GPU (see `torch_source`).
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_PROBE_SECONDS = 10  # how long `_reachable` waits for the CPU index to answer
# Where pip's own index settings live in the environment; a config file shows in `pip config list`.
_PIP_INDEX_VARIABLES = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS")


def floor_torch(pyproject: Mapping[str, Any]) -> str:
    """The lowest torch the package declares, pinned: ``torch>=2.6`` gives ``torch==2.6``.

    Args:
        pyproject: ``pyproject.toml`` read (``nox.project.load_toml``).
    """
    torches = [
        Requirement(dependency)
        for dependency in pyproject["project"]["dependencies"]
        if Requirement(dependency).name == "torch"
    ]
    lowest = [
        spec.version for torch in torches for spec in torch.specifier if spec.operator == ">="
    ]
    if len(torches) != 1 or len(lowest) != 1:
        raise ValueError(
            "Expected pyproject.toml's [project] dependencies to hold one torch requirement with "
            f"one lower bound (torch>=X). Got {[str(torch) for torch in torches]}."
        )
    return f"torch=={lowest[0]}"


def pip_index_configured(environ: Mapping[str, str], config: str) -> bool:
    """Whether the user told pip where to find packages, in the environment or a config file.

    Args:
        environ: the environment variables (``os.environ``).
        config: what ``pip config list`` prints (``global.index-url='...'`` lines).
    """
    if any(environ.get(name) for name in _PIP_INDEX_VARIABLES):
        return True
    option = r"^\S*\.(?:index[-_]url|extra[-_]index[-_]url|find[-_]links)="
    return re.search(option, config, re.MULTILINE) is not None


def torch_source(
    *, gpu: bool, configured: bool, platform: str, reachable: Callable[[str], bool]
) -> tuple[list[str], str]:
    """Where pip gets torch: the arguments to add to ``pip install`` and why, for the log.

    PyPI's Linux torch is the CUDA build (several GB); on a Linux machine without an NVIDIA GPU
    whose pip has no index of the user's own, torch comes from PyTorch's CPU-only index instead,
    where that answers.

    Args:
        gpu: whether the machine has an NVIDIA GPU.
        configured: whether the user configured pip's index (`pip_index_configured`).
        platform: ``sys.platform``.
        reachable: tells whether a URL answers; called only when the choice needs it.
    """
    if gpu:
        return [], "an NVIDIA GPU is here, so pip installs it as configured (a CUDA build)"
    if configured:
        return [], "pip's index is configured here, so pip installs it as configured"
    if not platform.startswith("linux"):
        return [], "not Linux, where PyPI's torch has no CUDA: pip installs it as configured"
    if reachable(f"{CPU_INDEX}/torch/"):
        # --index-url, not --extra-index-url: PyPI's CUDA build must not be a candidate at all.
        cpu_only = ["--index-url", CPU_INDEX]
        return cpu_only, f"no NVIDIA GPU here: the CPU-only build from {CPU_INDEX}"
    return [], (
        f"no NVIDIA GPU here, but {CPU_INDEX} did not answer within {_PROBE_SECONDS} s, so pip "
        "installs it as configured: from PyPI, on Linux, that is the CUDA build (several GB)"
    )


def _reachable(url: str) -> bool:
    """Whether ``url`` answers within `_PROBE_SECONDS`."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method="HEAD"), timeout=_PROBE_SECONDS
        ):
            return True
    except OSError:  # no network, no name, a timeout, an HTTP error
        return False


def _install_torch(session: nox.Session, python: Path, torch: str = TORCH) -> None:
    """Install ``torch`` (TORCH) with the pip of ``python``: from the CPU-only index if it fits."""
    pip = [str(python), "-m", "pip"]
    gpu = shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()
    # `pip config list` shows the config files' settings; it cannot fail in a way that matters.
    listed = subprocess.run([*pip, "config", "list"], capture_output=True, text=True, check=False)
    args, why = torch_source(
        gpu=gpu,
        configured=pip_index_configured(os.environ, listed.stdout),
        platform=sys.platform,
        reachable=_reachable,
    )
    session.log(f"{torch}: {why}.")
    session.run(*pip, "install", "--progress-bar", "off", *args, torch, external=True)


def _environment(
    session: nox.Session, name: str, wanted: list[str], rest: list[str], torch: str = TORCH
) -> str:
    """The python of ``.nox/<name>-<torch>``, made first if it is missing or out of date.

    Args:
        session: the session that needs it.
        name: the environment's name, before the torch requirement.
        wanted: what it is made from; a change to any of it makes it again.
        rest: what uv (else pip) installs after ``torch``.
        torch: the torch requirement it is made with (TORCH unless a session says otherwise).
    """
    stamp = hashlib.sha256("\n".join(wanted).encode()).hexdigest()
    env = ROOT / ".nox" / f"{name}-{re.sub(r'[^A-Za-z0-9.]+', '-', torch)}"
    python = env / "bin" / "python"
    done = env / "installed.sha256"
    if done.exists() and done.read_text() == stamp and python.exists():
        return str(python)
    uv = shutil.which("uv")
    session.log(
        f"Making {env.relative_to(ROOT)} once: {torch} first, with pip (so nothing pulls an "
        "unpinned one), then with " + ("uv" if uv else "pip") + ": " + " ".join(rest)
    )
    session.run(sys.executable, "-m", "venv", "--clear", str(env), external=True)
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    _install_torch(session, python, torch)
    if uv:
        # Compiled now, as pip does: else every test process (the parallel workers, the DDP
        # ranks) would compile what it imports on its own.
        uv_pip = [uv, "pip", "install", "--compile-bytecode", "--python", str(python)]
        session.run(*uv_pip, *rest, external=True)
    else:
        session.run(*pip, *rest, external=True)
    done.write_text(stamp)
    return str(python)


def _python(session: nox.Session) -> str:
    """The shared environment's python: torch, both Lightning packages, every extra, checkers."""
    wanted = [TORCH, *LIGHTNING, RUFF, MYPY, "nox", (ROOT / "pyproject.toml").read_text()]
    rest = ["-e", f"{ROOT}[test,demo,docs,peft,deepspeed,trl]", *LIGHTNING, RUFF, MYPY, "nox"]
    return _environment(session, "shared", wanted, rest)


def _demo_python(session: nox.Session) -> str:
    """The demo's own environment: torch and this package with its demo extra, nothing else."""
    wanted = [TORCH, "demo", (ROOT / "pyproject.toml").read_text()]
    return _environment(session, "demo", wanted, ["-e", f"{ROOT}[demo]"])


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
def floor(session: nox.Session) -> None:
    """Run the test suite on the lowest torch that pyproject.toml declares (`floor_torch`).

    Not in the everyday set: it makes an environment of its own (``.nox/floor-torch-<X>``), with
    that torch (as `_install_torch` chooses; from PyPI, on Linux, the CUDA build: 7 GB in all),
    both Lightning packages and the test, demo, peft and deepspeed extras (the tests need each), not
    the checkers or the docs extra.
    """
    torch = floor_torch(nox.project.load_toml(ROOT / "pyproject.toml"))
    # torch again with the rest, so that uv (else pip) keeps it rather than resolving another.
    rest = [torch, "-e", f"{ROOT}[test,demo,peft,deepspeed]", *LIGHTNING]
    wanted = [torch, *rest, (ROOT / "pyproject.toml").read_text()]
    python = _environment(session, "floor", wanted, rest, torch)
    workers = ["--numprocesses", "auto", "--dist", "worksteal"]
    session.run(
        python,
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
    python = _demo_python(session)
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
