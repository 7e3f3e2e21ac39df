"""DeepSpeed: ZeRO stages 0 to 3 (1 to 3 with ZeRO-Offload too) train a constrained model
exactly, on 2 CPU processes.

``deepspeed_fit.py`` trains with raw ``deepspeed.initialize`` at each stage on two gloo ranks
(``DS_ACCELERATOR=cpu``), saves a ZeRO-3 checkpoint, bakes and trains on; its parent process consolidates
the checkpoint and trains the same model without DeepSpeed. The script runs once per session.
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
def test_callback_takes_deepspeed_strategy_up_to_zero2_and_refuses_zero3(
    package: str, stage: int
) -> None:
    from types import SimpleNamespace

    from lightning_models import FLAVOURS
    from torch import nn

    flavour = FLAVOURS[package]
    strategy = importlib.import_module(f"{package}.strategies").DeepSpeedStrategy(stage=stage)
    model = flavour.model()
    callback = flavour.callback(model.embedding, torch.zeros(2, 4))
    trainer = SimpleNamespace(strategy=strategy, callbacks=[callback], world_size=1)
    if stage == 3:
        with pytest.raises(
            RuntimeError, match="Expected DeepSpeedStrategy at ZeRO stage 0, 1 or 2"
        ):
            callback.setup(trainer, model, "fit")
        assert type(model.embedding.weight) is nn.Parameter  # left as it was
        return
    callback.setup(trainer, model, "fit")
    assert torch.equal(model.embedding.weight[:2], torch.zeros(2, 4))
    assert [n for n, _ in model.embedding.named_parameters()] == [
        "parametrizations.weight.original"
    ]


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
