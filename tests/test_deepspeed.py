"""DeepSpeed: ZeRO stages 0 to 3 (1 to 3 with ZeRO-Offload too) train a constrained model
exactly, on 2 CPU processes.

``deepspeed_fit.py`` trains with raw ``deepspeed.initialize`` at each stage on two gloo ranks
(``DS_ACCELERATOR=cpu``), saves a ZeRO-3 checkpoint, bakes and trains on; its parent process consolidates
the checkpoint and trains the same model without DeepSpeed. The script runs once per session.
``deepspeed_lightning_fit.py`` fits through Lightning's ``DeepSpeedStrategy`` with the
callback at each stage on two ranks, and on one device without DeepSpeed, also once.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).with_name("deepspeed_fit.py")
sys.path.insert(0, str(SCRIPT.parent))

from deepspeed_fit import OFFLOADED, ROWS, STAGES, build, references
from deepspeed_lightning_fit import CASES as LIGHTNING_CASES
from deepspeed_lightning_fit import ROWS as LIGHTNING_ROWS

LIGHTNING_SCRIPT = SCRIPT.with_name("deepspeed_lightning_fit.py")

FREE = [r for r in range(10) if r not in ROWS]
PLAIN_KEYS = ["embedding.weight", "head.weight", "head.bias"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("deepspeed")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, str(SCRIPT), "--out", str(out)]
    done = subprocess.run(
        command, check=False, env=env, timeout=300, capture_output=True, text=True
    )
    if done.returncode:  # show why, not only that
        pytest.fail(f"{SCRIPT.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {"ranks": ranks, **torch.load(out / "parent.pt", weights_only=False)}


def _assert_fixed_rows_exact(state: dict[str, torch.Tensor]) -> None:
    refs = references()
    # The constraint sorts the rows: reference row i sits at ROWS[i].
    assert torch.equal(state["embedding.weight"][ROWS], refs["embedding.weight"])
    assert torch.equal(state["head.weight"][:6], refs["head.weight"])
    assert torch.equal(state["head.bias"][:6], refs["head.bias"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [*STAGES, *(f"{s}-offload" for s in OFFLOADED)])
def test_zero_stage_trains_exactly_as_one_process(stage: int | str, fitted: dict[str, Any]) -> None:
    """Each stage, and stages 1 to 3 with ZeRO-Offload (on the CPU accelerator the host is the
    device: this runs DeepSpeed's offload path, the host copies of the optimizer's state, not
    a transfer)."""
    states = [rank[stage]["state_dict"] for rank in fitted["ranks"]]
    single = fitted["single"]
    for state in states:
        assert list(state) == PLAIN_KEYS
        _assert_fixed_rows_exact(state)
    for key in PLAIN_KEYS:
        assert torch.equal(states[0][key], states[1][key]), f"ranks differ in {key}"
        # Gradients are averaged across ranks in another order than one process sums them.
        torch.testing.assert_close(states[0][key], single[key], rtol=1e-5, atol=1e-5)
    initial = build().embedding.weight.detach()[FREE]
    assert not torch.allclose(states[0]["embedding.weight"][FREE], initial), "did not train"


@pytest.mark.slow
def test_zero3_partitions_the_free_rows_and_reads_them_whole(fitted: dict[str, Any]) -> None:
    for rank in fitted["ranks"]:
        # Each rank holds none of the 4 free rows' 16 values outside a forward (a partition of
        # 8 lives in DeepSpeed's ds_tensor), and the parametrization gathers them to read.
        assert rank[3]["partitioned"] == ((0,), (4, 4))
        read = rank[3]["read_outside_forward"]
        assert torch.equal(read, rank[3]["state_dict"]["embedding.weight"])


@pytest.mark.slow
def test_zero3_gathered_state_dict_loads_into_a_plain_model(fitted: dict[str, Any]) -> None:
    from deepspeed_fit import Net

    state = fitted["ranks"][0][3]["state_dict"]
    plain = Net()
    plain.load_state_dict(state)  # strict: the plain keys and shapes
    assert torch.equal(plain.embedding.weight[ROWS], references()["embedding.weight"])


@pytest.mark.slow
def test_zero_to_fp32_consolidates_the_free_rows_for_the_constrained_model(
    fitted: dict[str, Any],
) -> None:
    from embedding_constraint import bake, is_fixed

    consolidated = fitted["consolidated"]
    # DeepSpeed names the parameters it trained: the stored free rows, not the plain weight.
    assert {k: tuple(v.shape) for k, v in consolidated.items()} == {
        "embedding.parametrizations.weight.original": (4, 4),
        "head.parametrizations.weight.original": (4, 4),
        "head.parametrizations.bias.original": (4,),
    }
    net = build()  # the same constraint, so the same stored layout
    missing, unexpected = net.load_state_dict(consolidated, strict=False)
    # Only the constraints' own state (reference and rows), which the model already holds.
    assert sorted(missing) == [
        "embedding.parametrizations.weight.0._extra_state",
        "head.parametrizations.bias.0._extra_state",
        "head.parametrizations.weight.0._extra_state",
    ]
    assert not unexpected
    bake(net)
    assert not is_fixed(net.embedding)
    assert not is_fixed(net.head)
    trained = fitted["ranks"][0][3]["state_dict"]
    for key, value in net.state_dict().items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.slow
def test_bake_under_zero3_gathers_the_weights_and_a_new_engine_trains_on(
    fitted: dict[str, Any],
) -> None:
    """Every rank bakes: the plain weights are whole, exact, and a new engine partitions them
    and trains them as one process trains its baked model (the fixed rows train now)."""
    for rank in fitted["ranks"]:
        baked, trained = rank[3]["baked"], rank[3]["state_dict"]
        assert baked["plain"]
        assert baked["whole"] == {
            "embedding.weight": (10, 4),
            "head.weight": (10, 4),
            "head.bias": (10,),
        }
        assert list(baked["state_dict"]) == PLAIN_KEYS
        assert all(torch.equal(v, trained[k]) for k, v in baked["state_dict"].items())
        assert baked["partitioned"] == ["embedding.weight", "head.bias", "head.weight"]
        more, single = baked["more"], fitted["single_more"]
        torch.testing.assert_close(more, single, rtol=1e-5, atol=1e-5)
        assert not torch.equal(more["embedding.weight"][ROWS], references()["embedding.weight"])


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_callback_takes_deepspeed_strategy_at_every_zero_stage(package: str, stage: int) -> None:
    from types import SimpleNamespace

    from lightning_models import FLAVOURS

    flavour = FLAVOURS[package]
    strategy = importlib.import_module(f"{package}.strategies").DeepSpeedStrategy(stage=stage)
    model = flavour.model()
    callback = flavour.callback(model.embedding, torch.zeros(2, 4))
    trainer = SimpleNamespace(strategy=strategy, callbacks=[callback], world_size=1)
    callback.setup(trainer, model, "fit")
    assert torch.equal(model.embedding.weight[:2], torch.zeros(2, 4))
    assert [n for n, _ in model.embedding.named_parameters()] == [
        "parametrizations.weight.original"
    ]


@pytest.fixture(scope="module")
def lightning_fits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``deepspeed_lightning_fit.py`` on 2 ranks (every case) and on one device."""
    out = tmp_path_factory.mktemp("deepspeed-lightning")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}
    results: dict[str, Any] = {}
    for devices in (2, 1):
        command = [sys.executable, str(LIGHTNING_SCRIPT), "--devices", str(devices)]
        command += ["--out", str(out / str(devices))]
        done = subprocess.run(
            command, check=False, env=env, timeout=900, capture_output=True, text=True
        )
        if done.returncode:  # show why, not only that
            pytest.fail(
                f"{LIGHTNING_SCRIPT.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
            )
        ranks = [
            torch.load(out / str(devices) / f"rank{r}.pt", weights_only=False)
            for r in range(devices)
        ]
        results[str(devices)] = ranks
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LIGHTNING_CASES))
def test_lightning_deepspeed_fits_as_one_process(case: str, lightning_fits: dict[str, Any]) -> None:
    """Lightning's DeepSpeedStrategy with the callback, at each ZeRO stage on 2 ranks: the
    fixed rows exact after every step, a plain module after the fit (tied if it was), the
    ranks equal and as one device within 1e-5, after the fit and after training on."""
    tied = LIGHTNING_CASES[case][1]
    ranks = [rank[case] for rank in lightning_fits["2"]]
    (single,) = [rank["single-tied" if tied else "single"] for rank in lightning_fits["1"]]
    reference = single["reference"]
    for result in [*ranks, single]:
        assert result["exact_each_step"] == [True] * 16  # 2 epochs of 8 batches
        assert result["plain"]
        assert result["tied"] is tied
        for phase in ("fitted", "trained_on"):
            assert list(result[phase]) == ["embedding.weight", "head.weight", "head.bias"]
        assert torch.equal(result["fitted"]["embedding.weight"][LIGHTNING_ROWS], reference)
        if tied:
            assert torch.equal(
                result["fitted"]["head.weight"], result["fitted"]["embedding.weight"]
            )
    for phase in ("fitted", "trained_on"):
        for key, value in ranks[0][phase].items():
            assert torch.equal(ranks[1][phase][key], value), f"ranks differ in {phase} {key}"
            torch.testing.assert_close(value, single[phase][key], rtol=1e-5, atol=1e-5)
    # Trained on without the constraint, the old rows move; the free rows moved in the fit.
    trained_on = ranks[0]["trained_on"]["embedding.weight"]
    assert not torch.allclose(trained_on[LIGHTNING_ROWS], reference)
    torch.manual_seed(0)
    torch.randn(len(LIGHTNING_ROWS), 4)
    free = [r for r in range(10) if r not in LIGHTNING_ROWS]
    initial = torch.nn.Embedding(10, 4).weight.detach()[free]
    assert not torch.allclose(ranks[0]["fitted"]["embedding.weight"][free], initial)
    # Each rank validates its half of the batches: their mean is one device's loss.
    mean = (ranks[0]["val_loss"] + ranks[1]["val_loss"]) / 2
    torch.testing.assert_close(mean, single["val_loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LIGHTNING_CASES))
def test_save_checkpoint_after_a_deepspeed_fit_is_refused_from_zero1_on(
    case: str, lightning_fits: dict[str, Any]
) -> None:
    """After the fit its engine holds the stored rows that the bake replaced: from stage 1 on
    ``trainer.save_checkpoint`` is refused on every rank and writes nothing; at stage 0 it
    writes the model's (plain) state dict."""
    ranks = [rank[case] for rank in lightning_fits["2"]]
    if LIGHTNING_CASES[case][0] == 0:
        assert [r["save_after_fit"] for r in ranks] == [[None, None]] * 2
        assert ranks[0]["wrote_after_fit"]
        module, fitted = ranks[0]["after_fit_module"], ranks[0]["fitted"]
        assert list(module) == list(fitted)
        for key, value in fitted.items():
            assert torch.equal(module[key], value), key
        return
    for result in ranks:
        stage = LIGHTNING_CASES[case][0]
        assert len(result["save_after_fit"]) == 2  # weights only, and whole
        for error in result["save_after_fit"]:
            assert error.startswith(
                f"Expected no checkpoint from the DeepSpeed engine (ZeRO stage {stage}) of a fit"
            )
            assert "ModelCheckpoint(save_last=True)" in error
        assert not result["wrote_after_fit"]


@pytest.mark.slow
def test_lightning_zero3_checkpoint_consolidates_to_the_plain_model(
    lightning_fits: dict[str, Any],
) -> None:
    """Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` of a ZeRO-3 checkpoint that
    ``ModelCheckpoint`` saved at the end of the fit holds the stored free rows under the
    constraint's name, as DeepSpeed's ``zero_to_fp32`` does; ``plain_keys`` with the same
    constraint gives the plain model the fit left, strictly loadable."""
    from lightning_models import FLAVOURS

    from embedding_constraint import fix_rows, plain_keys

    result = lightning_fits["2"][0]["zero3"]
    converted = result["converted"]
    assert list(converted) == [
        "embedding.parametrizations.weight.original",
        "head.weight",
        "head.bias",
    ]
    assert converted["embedding.parametrizations.weight.original"].shape == (4, 4)
    flavour = FLAVOURS["lightning.pytorch"]
    constrained = flavour.model(vocab=10, dim=4)
    fix_rows(constrained.embedding, result["reference"], rows=LIGHTNING_ROWS)
    plain = flavour.model(vocab=10, dim=4)
    plain.load_state_dict(plain_keys(constrained, converted))  # strict
    for key, value in plain.state_dict().items():
        assert torch.equal(value, result["fitted"][key]), key


@pytest.mark.slow
def test_zero_to_fp32_with_plain_keys_loads_into_a_plain_model(fitted: dict[str, Any]) -> None:
    """`plain_keys` gives DeepSpeed's dict of parameter names the plain keys: a plain model
    loads it strictly, with the trained values and the fixed rows exact."""
    from deepspeed_fit import Net, build

    from embedding_constraint import plain_keys

    state = plain_keys(build(), fitted["consolidated"])
    plain = Net()
    plain.load_state_dict(state)  # strict: the plain keys and shapes
    trained = fitted["ranks"][0][3]["state_dict"]
    for key, value in plain.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert torch.equal(plain.embedding.weight[ROWS], references()["embedding.weight"])
