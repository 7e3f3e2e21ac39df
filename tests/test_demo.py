"""The produce demo (`examples/produce_demo.py`) runs, keeps its promises and draws its figure."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "produce_demo.py"
# Few epochs keep the fits short; the constrained expansion already sorts the new items then.
EPOCHS = 15
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NEW_ITEM_KINDS = {"kiwi": "fruit", "lemon": "fruit", "pepper": "vegetable", "pumpkin": "vegetable"}


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    # examples/ is not a package: load the script as a module under its own name (dataclasses
    # look their module up in sys.modules).
    spec = importlib.util.spec_from_file_location("produce_demo", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def summary(demo: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return demo.run(tmp_path_factory.mktemp("demo"), epochs=EPOCHS, seed=0, progress_bar=False)


def test_datasets_hold_every_triple_of_one_kind(demo: ModuleType) -> None:
    first = demo.triples(demo.OLD_ITEMS, [demo.FRUITS, demo.VEGETABLES])
    second = demo.triples(
        demo.NEW_ITEMS,
        [demo.FRUITS + demo.NEW_FRUITS, demo.VEGETABLES + demo.NEW_VEGETABLES],
    )
    assert first.shape == (2 * 6 * 5 * 4, 3)
    assert second.shape == (2 * 8 * 7 * 6, 3)
    for data, vocab in ((first, demo.OLD_ITEMS), (second, demo.NEW_ITEMS)):
        assert len({tuple(row) for row in data.tolist()}) == data.shape[0]
        for row in data.tolist():
            assert len(set(row)) == 3
            assert len({demo.KIND[vocab[i]] for i in row}) == 1
    # The old items are not a prefix of the new vocabulary: from_vocabularies has work to do.
    assert list(demo.NEW_ITEMS[: len(demo.OLD_ITEMS)]) != list(demo.OLD_ITEMS)
    assert sorted(demo.ADDED) == sorted(NEW_ITEM_KINDS)


@pytest.mark.slow
def test_figure_is_a_readable_png(summary: Any) -> None:
    from matplotlib.image import imread

    assert summary.figure.name == "produce_demo.png"
    assert summary.figure.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(summary.figure)
    height, width, channels = image.shape
    assert channels in (3, 4)
    assert 400 <= height <= 2000
    assert 2 * height <= width <= 5000, "three panels side by side"
    assert float(image.std()) > 0.05, "the figure is not blank"


@pytest.mark.slow
def test_constrained_expansion_keeps_every_old_item_bit_for_bit(
    demo: ModuleType, summary: Any
) -> None:
    constrained = summary.constrained
    assert constrained.max_old_change == 0.0
    assert constrained.old_unchanged
    for item in demo.OLD_ITEMS:
        old, new = summary.original[item], constrained.coordinates[item]
        assert torch.equal(new.view(torch.int32), old.view(torch.int32)), item
    assert set(constrained.coordinates) == set(demo.NEW_ITEMS)


@pytest.mark.slow
def test_constrained_expansion_places_new_items_with_their_kind(summary: Any) -> None:
    assert summary.constrained.placed == NEW_ITEM_KINDS
    assert summary.constrained.misplaced == []
    assert summary.constrained.new_accuracy == 1.0


@pytest.mark.slow
def test_constrained_expansion_keeps_the_classifiers_accuracy(summary: Any) -> None:
    assert summary.original_accuracy == 1.0
    assert summary.constrained.old_accuracy == summary.original_accuracy
    assert summary.problems == []


@pytest.mark.slow
def test_retraining_moves_the_old_items(demo: ModuleType, summary: Any) -> None:
    retrained = summary.retrained
    assert not retrained.old_unchanged
    assert retrained.max_old_change > 0.1
    largest = max(
        float((retrained.coordinates[item] - summary.original[item]).abs().max())
        for item in demo.OLD_ITEMS
    )
    assert retrained.max_old_change == largest


@pytest.mark.slow
def test_the_table_reports_the_summary(summary: Any) -> None:
    lines = summary.table().splitlines()
    assert lines[0].split() == ["original", "retrained", "constrained"]
    rows = {line[: line.index("  ")]: line.split() for line in lines[2:]}
    assert rows["largest change of an old item"][-1] == "0.0"
    assert rows["old items bit for bit unchanged"][-1] == "yes"
    for item, kind in NEW_ITEM_KINDS.items():
        assert rows[f"nearest centroid: {item} ({kind})"][-1] == kind
    assert rows["classifier accuracy, old items"][-3] == rows["classifier accuracy, old items"][-1]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_embeddings(demo: ModuleType, tmp_path: Path) -> None:
    torch.manual_seed(1)
    global_state = torch.random.get_rng_state()
    first = demo.run(tmp_path / "a", epochs=2, seed=3, progress_bar=False)
    # The demo draws from generators of its own: the global one is neither read nor advanced.
    assert torch.equal(torch.random.get_rng_state(), global_state)
    torch.manual_seed(2)
    second = demo.run(tmp_path / "b", epochs=2, seed=3, progress_bar=False)
    for name in ("retrained", "constrained"):
        a, b = getattr(first, name).coordinates, getattr(second, name).coordinates
        assert a.keys() == b.keys()
        for item in a:
            assert torch.equal(a[item], b[item]), (name, item)


@pytest.mark.slow
def test_main_exits_0_and_prints_the_figure_path(tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    command = [sys.executable, str(EXAMPLE), "--outdir", str(outdir), "--epochs", str(EPOCHS)]
    result = subprocess.run(
        [*command, "--seeds", "2"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figure = outdir / "produce_demo.png"
    assert result.stdout.rstrip().splitlines()[-1] == f"Figure: {figure.absolute()}"
    assert figure.read_bytes()[:8] == PNG_SIGNATURE
    assert "classifier accuracy, old items" in result.stdout
    assert "Over 2 seeds (0 to 1)" in result.stdout
    # Quiet when not on a terminal: one line per fit (3 fits a seed), no progress bars, no
    # Lightning notices, nothing on stderr.
    fits = [line for line in result.stdout.splitlines() if line.startswith("seed ")]
    assert len(fits) == 6
    assert "Epoch" not in result.stdout
    assert "GPU available" not in result.stdout + result.stderr
    assert result.stderr == ""
    assert len(result.stdout.encode()) < 20_000


@pytest.mark.slow
def test_main_exits_1_when_the_constraint_did_not_hold(
    demo: ModuleType,
    summary: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = dataclasses.replace(
        summary,
        constrained=dataclasses.replace(
            summary.constrained,
            max_old_change=0.25,
            old_unchanged=False,
            placed={**NEW_ITEM_KINDS, "kiwi": "vegetable"},
        ),
    )
    monkeypatch.setattr(demo, "run", lambda *args, **kwargs: broken)
    assert demo.main(["--outdir", "unused", "--epochs", "1", "--seeds", "1"]) == 1
    captured = capsys.readouterr()
    assert "seed 0: the constraint did not hold" in captured.err
    assert "kiwi (fruit) settled nearest the vegetable centroid" in captured.err
    assert f"Figure: {summary.figure.absolute()}" in captured.out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "expected a positive number of epochs"),
        (["--seeds", "-1"], "expected a count of seeds"),
    ],
)
def test_main_rejects_bad_counts(
    demo: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_the_sweep_report_counts_the_seeds(demo: ModuleType, summary: Any) -> None:
    lost = dataclasses.replace(
        summary,
        seed=1,
        retrained=dataclasses.replace(summary.retrained, max_old_change=9.5, old_accuracy=0.5),
    )
    kept = dataclasses.replace(
        summary,
        seed=2,
        retrained=dataclasses.replace(summary.retrained, max_old_change=0.25, old_accuracy=1.0),
    )
    report = demo.sweep_report([lost, kept])
    assert report.splitlines()[0] == f"Over 2 seeds (1 to 2), {EPOCHS} epochs per fit:"
    assert "old items moved by 0.25 to 9.50" in report
    assert "kept every old item in 1 of 2 seeds (old-item accuracy 50% to 100%)" in report
    assert "bit for bit unchanged in 2 of 2 seeds" in report
    assert "settled with their kind in 2 of 2" in report


# Runs a script (argv[1], with the arguments after it) as if matplotlib were not installed: not
# importable, and no distribution metadata (which Lightning's torchmetrics asks before importing).
_WITHOUT_MATPLOTLIB = """
import importlib.machinery, importlib.util, runpy, sys

class PathFinder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "matplotlib":
            return None
        return super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        found = super().find_distributions(*args, **kwargs)
        return (d for d in found if (d.metadata["Name"] or "").lower() != "matplotlib")

sys.meta_path[:] = [
    PathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path
]
assert importlib.util.find_spec("matplotlib") is None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_help_works_without_matplotlib(tmp_path: Path) -> None:
    script = tmp_path / "without_matplotlib.py"
    script.write_text(_WITHOUT_MATPLOTLIB)
    result = subprocess.run(
        [sys.executable, str(script), str(EXAMPLE), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: produce_demo.py")
    for flag in ("--outdir", "--epochs", "--seed", "--seeds"):
        assert flag in result.stdout


def test_the_matplotlib_block_blocks(tmp_path: Path) -> None:
    script = tmp_path / "without_matplotlib.py"
    script.write_text(_WITHOUT_MATPLOTLIB)
    uses = tmp_path / "uses_matplotlib.py"
    uses.write_text("import matplotlib.figure\n")
    result = subprocess.run(
        [sys.executable, str(script), str(uses)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "ModuleNotFoundError: No module named 'matplotlib'" in result.stderr


@pytest.fixture(scope="module")
def noxfile() -> ModuleType:
    pytest.importorskip("nox")  # the shared environment has it; a bare one may not
    path = EXAMPLE.parents[1] / "noxfile.py"
    spec = importlib.util.spec_from_file_location("noxfile_under_test", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _never_probed(url: str) -> bool:
    raise AssertionError(f"probed {url} although the choice did not need it")


@pytest.mark.parametrize(
    ("gpu", "configured", "platform", "reason"),
    [
        (True, False, "linux", "an NVIDIA GPU is here"),
        (True, True, "linux", "an NVIDIA GPU is here"),
        (False, True, "linux", "pip's index is configured here"),
        (False, False, "darwin", "not Linux"),
        (False, False, "win32", "not Linux"),
    ],
)
def test_torch_comes_from_pip_as_configured(
    noxfile: ModuleType, gpu: bool, configured: bool, platform: str, reason: str
) -> None:
    args, why = noxfile.torch_source(
        gpu=gpu, configured=configured, platform=platform, reachable=_never_probed
    )
    assert args == []
    assert why.startswith(reason)
    assert "pip installs it as configured" in why


def test_torch_comes_from_the_cpu_index_on_a_linux_machine_without_a_gpu(
    noxfile: ModuleType,
) -> None:
    probed: list[str] = []

    def reachable(url: str) -> bool:
        probed.append(url)
        return True

    args, why = noxfile.torch_source(
        gpu=False, configured=False, platform="linux", reachable=reachable
    )
    assert args == ["--index-url", "https://download.pytorch.org/whl/cpu"]
    assert probed == ["https://download.pytorch.org/whl/cpu/torch/"]
    assert "https://download.pytorch.org/whl/cpu" in why


def test_torch_falls_back_to_plain_pip_when_the_cpu_index_is_unreachable(
    noxfile: ModuleType,
) -> None:
    args, why = noxfile.torch_source(
        gpu=False, configured=False, platform="linux", reachable=lambda url: False
    )
    assert args == []
    assert "https://download.pytorch.org/whl/cpu did not answer" in why
    assert "CUDA build" in why


@pytest.mark.parametrize(
    ("environ", "config", "expected"),
    [
        ({}, "", False),
        ({"PIP_DEFAULT_TIMEOUT": "60"}, "global.timeout='60'\n", False),
        ({"PIP_INDEX_URL": "https://mirror/simple"}, "", True),
        ({"PIP_EXTRA_INDEX_URL": "file:///x"}, "", True),
        ({"PIP_FIND_LINKS": "/opt/wheels"}, "", True),
        ({"PIP_INDEX_URL": ""}, "", False),
        ({}, "global.index-url='https://mirror/simple'\n", True),
        ({}, "global.cert='/c'\nglobal.extra-index-url='file:///x'\n", True),
        ({}, "install.find-links='/opt/wheels'\n", True),
        ({}, ":env:.find-links='/opt/wheels'\n", True),
    ],
)
def test_pip_index_configured(
    noxfile: ModuleType, environ: dict[str, str], config: str, expected: bool
) -> None:
    assert noxfile.pip_index_configured(environ, config) is expected


def test_the_floor_session_pins_the_lowest_torch_pyproject_declares(noxfile: ModuleType) -> None:
    project = {"project": {"dependencies": ["numpy", "torch>=2.8"]}}
    assert noxfile.floor_torch(project) == "torch==2.8"
    with pytest.raises(ValueError, match="one lower bound"):
        noxfile.floor_torch({"project": {"dependencies": ["torch<3"]}})
    with pytest.raises(ValueError, match="one torch requirement"):
        noxfile.floor_torch({"project": {"dependencies": ["numpy"]}})
    real = noxfile.nox.project.load_toml(EXAMPLE.parents[1] / "pyproject.toml")
    assert noxfile.floor_torch(real).startswith("torch==")
