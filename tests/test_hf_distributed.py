"""Hugging Face on several processes: a model grown with `expand_vocabulary`, 2 gloo ranks.

``transformers.Trainer`` with DDP under ``torchrun`` (``hf_ddp_fit.py``) and with DeepSpeed
ZeRO-2 and ZeRO-3 (``hf_deepspeed_fit.py``, ``DS_ACCELERATOR=cpu``), and accelerate's FSDP2
preparation, ``fsdp2_prepare_model``, called on each rank (``hf_fsdp2_fit.py``: accelerate
refuses an FSDP plugin on the CPU, so the real Trainer + FSDP2 path runs in
``tests/benchmarks/gpu_check.sh``). Each script runs once per test session (seconds) and saves
each rank's matrices; the tests compare them. The process groups time out after 60 s, so a rank
left waiting fails its run instead of hanging it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

pytest.importorskip("transformers")

from hf_ddp_fit import ADDED_AT, KEPT, KEPT_AT, NEW_VOCAB, tiny_llama

from embedding_constraint import is_fixed

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
TIED = {"tied": True, "untied": False, "tied-pair": True, "untied-ram-efficient": False,
        "tied-ram-efficient": True, "untied-mixed": False, "tied-offload": True}  # fmt: skip


def _torchrun(script: str, out: Path) -> str:
    """Run ``script`` on 2 ranks; its output, for the test that fails."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(HERE / script), "--out", str(out)]  # fmt: skip
    done = subprocess.run(
        command, env=env, timeout=600, capture_output=True, text=True, check=False
    )
    return (done.stdout + done.stderr)[-3000:]


def _originals(tied: bool) -> dict[str, Tensor]:
    """The old model's matrices (each rank builds the same one)."""
    model = tiny_llama(tied)
    return {
        "input": model.get_input_embeddings().weight.detach(),
        "head": model.get_output_embeddings().weight.detach(),
    }


def _load_plain(path: Path) -> Any:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path)
    assert not is_fixed(model, "model.embed_tokens.weight")
    assert not is_fixed(model, "lm_head.weight")
    return model


def _assert_old_rows_kept(matrices: dict[str, Tensor], tied: bool) -> None:
    for key, original in _originals(tied).items():
        assert torch.equal(matrices[key][KEPT_AT], original[KEPT]), key


# transformers.Trainer, DDP.


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("hf-ddp")
    return out, _torchrun("hf_ddp_fit.py", out)


@pytest.mark.parametrize("case", ["tied", "untied"])
def test_trainer_with_ddp_keeps_the_old_rows_and_trains_the_new(
    ddp: tuple[Path, str], case: str
) -> None:
    out, log = ddp
    ranks = [out / f"{case}-rank{r}.pt" for r in (0, 1)]
    assert all(path.exists() for path in ranks), log
    rank0, rank1 = (torch.load(path) for path in ranks)
    for key in ("input", "head"):
        assert torch.equal(rank0["trained"][key], rank1["trained"][key]), key  # ranks equal
        moved = rank0["trained"][key][ADDED_AT] - rank0["expanded"][key][ADDED_AT]
        assert moved.abs().amin(dim=1).gt(0).all(), key  # every added row trained
    _assert_old_rows_kept(rank0["trained"], TIED[case])
    _assert_old_rows_kept(rank1["trained"], TIED[case])
    # save_model and the Trainer's checkpoint: plain, loaded without this library's help.
    for saved in (out / case / "model", out / case / "checkpoint-3"):
        plain = _load_plain(saved)
        matrices = {
            "input": plain.get_input_embeddings().weight.detach(),
            "head": plain.get_output_embeddings().weight.detach(),
        }
        tied = plain.get_input_embeddings().weight is plain.get_output_embeddings().weight
        assert tied == TIED[case]
        for key, value in matrices.items():
            assert torch.equal(value, rank0["trained"][key]), (saved.name, key)
        _assert_old_rows_kept(matrices, TIED[case])


def test_trainer_with_ddp_and_every_row_fixed_trains_the_body_only(ddp: tuple[Path, str]) -> None:
    """Every row of the tied embedding fixed: under DDP (which needs a gradient for every
    parameter it was built with) the empty stored rows get one; the matrix stays the old one on
    both ranks, the body trains, and ``save_model`` writes a plain model."""
    out, log = ddp
    ranks = [out / f"tied-every-row-rank{r}.pt" for r in (0, 1)]
    assert all(path.exists() for path in ranks), log
    rank0, rank1 = (torch.load(path) for path in ranks)
    original = tiny_llama(True).get_input_embeddings().weight.detach()
    for rank in (rank0, rank1):
        assert torch.equal(rank["trained"]["input"], original)
        assert torch.equal(rank["trained"]["head"], original)
    body = rank0["body"]
    assert torch.equal(body["trained"], rank1["body"]["trained"])  # ranks equal
    assert not torch.allclose(body["trained"], body["before"])  # the body trained
    plain = _load_plain(out / "tied-every-row" / "model")
    assert torch.equal(plain.get_input_embeddings().weight, original)
    assert plain.get_input_embeddings().weight is plain.get_output_embeddings().weight


# transformers.Trainer(deepspeed=...), ZeRO stages 2 and 3.


@pytest.fixture(scope="module")
def zero(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("hf-deepspeed")
    return out, _torchrun("hf_deepspeed_fit.py", out)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("case", ["tied", "untied"])
def test_trainer_with_deepspeed_keeps_the_old_rows_and_trains_as_ddp(
    zero: tuple[Path, str], ddp: tuple[Path, str], case: str, stage: int
) -> None:
    """The same run as the DDP one but for DeepSpeed: the same values, the old rows exact;
    ``save_model`` writes a plain model (at stage 3 from DeepSpeed's consolidated dict)."""
    out, log = zero
    ranks = [out / f"zero{stage}-{case}-rank{r}.pt" for r in (0, 1)]
    assert all(path.exists() for path in ranks), log
    rank0, rank1 = (torch.load(path) for path in ranks)
    under_ddp = torch.load(ddp[0] / f"{case}-rank0.pt")["trained"]
    for key in ("input", "head"):
        assert torch.equal(rank0["trained"][key], rank1["trained"][key]), key  # ranks equal
        moved = rank0["trained"][key][ADDED_AT] - rank0["expanded"][key][ADDED_AT]
        assert moved.abs().amin(dim=1).gt(0).all(), key  # every added row trained
        # DeepSpeed sums the gradients in another order and clips with its own norm; Adam's
        # first steps move a row by about lr whatever its gradient's size, so a gradient near
        # 0 may differ in sign: 2e-3 of the 0.15 that 3 steps move at lr=0.05.
        torch.testing.assert_close(rank0["trained"][key], under_ddp[key], rtol=0, atol=2e-3)
    _assert_old_rows_kept(rank0["trained"], TIED[case])
    _assert_old_rows_kept(rank1["trained"], TIED[case])
    plain = _load_plain(out / f"zero{stage}-{case}" / "model")
    assert torch.equal(plain.get_input_embeddings().weight, rank0["trained"]["input"])
    assert torch.equal(plain.get_output_embeddings().weight, rank0["trained"]["head"])
    assert (plain.get_input_embeddings().weight is plain.get_output_embeddings().weight) == (
        TIED[case]
    )


# accelerate's FSDP2 preparation.


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("hf-fsdp2")
    return out, _torchrun("hf_fsdp2_fit.py", out)


def _fsdp2_case(fsdp2: tuple[Path, str], case: str) -> None:
    out, log = fsdp2
    errors = [out / f"{case}-rank{r}.err" for r in (0, 1)]
    assert not any(path.exists() for path in errors), [p.read_text() for p in errors if p.exists()]
    ranks = [out / f"{case}-rank{r}.pt" for r in (0, 1)]
    assert all(path.exists() for path in ranks), log
    rank0, rank1 = (torch.load(path) for path in ranks)
    tied = TIED[case]
    # Plain keys: those of a plain model of the new vocabulary.
    plain_keys = set(tiny_llama(tied, vocab=len(NEW_VOCAB)).state_dict())
    assert set(rank0["state"]) == set(rank1["state"]) == plain_keys
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key  # ranks equal
    matrices = {"input": rank0["state"]["model.embed_tokens.weight"],
                "head": rank0["state"]["lm_head.weight"]}  # fmt: skip
    _assert_old_rows_kept(matrices, tied)
    for key, value in matrices.items():
        moved = value[ADDED_AT] - rank0["expanded"][key][ADDED_AT]
        assert moved.abs().amin(dim=1).gt(0).all(), key  # every added row trained
    # The model saved as the Trainer saves it under FSDP2: plain, the same values.
    plain = _load_plain(out / case)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, rank0["state"][key]), key
    assert (plain.get_input_embeddings().weight is plain.get_output_embeddings().weight) == tied


@pytest.mark.parametrize("case", ["untied", "tied-pair"])
def test_accelerate_fsdp2_prepare_model_keeps_the_old_rows(
    fsdp2: tuple[Path, str], case: str
) -> None:
    """``fsdp2_prepare_model`` shards each decoder layer, the embedding, the tail and the root;
    a few steps keep the old rows exact on both ranks; the full state dict has plain keys.
    ``tied-pair``: the tied embedding and head sharded as one group first."""
    _fsdp2_case(fsdp2, case)


@pytest.mark.parametrize("case", ["untied-mixed", "tied-offload"])
def test_accelerate_fsdp2_with_mixed_precision_or_cpu_offload(
    fsdp2: tuple[Path, str], case: str
) -> None:
    """The plugin's MixedPrecisionPolicy (bfloat16 reads, float32 reduction) and its
    CPUOffloadPolicy: the old rows stay exact (the sharded parameters stay float32), the ranks
    equal, the added rows trained, the saved model plain."""
    _fsdp2_case(fsdp2, case)


def test_accelerate_fsdp2_with_cpu_ram_efficient_loading(fsdp2: tuple[Path, str]) -> None:
    """Rank 1's added rows start apart from rank 0's; rank 0's weights reach it.
    ``fsdp2_prepare_model`` calls ``model.tie_weights()`` on the model moved to the meta device:
    with its ties in place (none, here) it changes nothing: no bake, no new constraint."""
    out, _ = fsdp2
    rank0, rank1 = (torch.load(out / f"untied-ram-efficient-rank{r}.pt") for r in (0, 1))
    assert not torch.equal(rank0["expanded"]["input"], rank1["expanded"]["input"])
    _fsdp2_case(fsdp2, "untied-ram-efficient")


@pytest.mark.parametrize("case", ["tied", "tied-ram-efficient"])
def test_accelerate_fsdp2_on_a_tied_model_left_to_accelerate(
    fsdp2: tuple[Path, str], case: str
) -> None:
    """accelerate tells the tie by ``input_embed.weight is output_embed.weight`` (on the meta
    device too, with cpu_ram_efficient_loading): the two read one tensor, so it shards them as
    one group, as a plain tied model's."""
    _fsdp2_case(fsdp2, case)


# Tensor parallelism: from_pretrained(..., tp_plan="auto"), then fix_rows on the shards.


@pytest.fixture(scope="module")
def hf_tp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("hf-tp")
    return out, _torchrun("hf_tp_fit.py", out)


@pytest.mark.parametrize("case", ["untied", "tied"])
def test_tp_plan_model_constrained_on_its_shards_trains_as_one_process(
    hf_tp: tuple[Path, str], case: str
) -> None:
    """An expanded checkpoint loaded sharded by vocabulary, then constrained: the ranks train
    as one process does (the vocabulary matrices within 1e-5), the old rows exact, and ``save_pretrained`` writes a
    plain checkpoint of the trained values. A tied head stays tied and reads the embedding's
    constrained tensor."""
    import hf_tp_fit
    from transformers import LlamaForCausalLM

    root, log = hf_tp
    out, tied = root / case, hf_tp_fit.CASES[case]
    assert (out / "rank1.pt").exists(), log
    start = LlamaForCausalLM.from_pretrained(out / "expanded-rank0")
    alone = LlamaForCausalLM.from_pretrained(out / "expanded-rank0")
    hf_tp_fit.constrain(alone, tied)
    losses = hf_tp_fit.train(alone)
    expected = hf_tp_fit.full_state(alone)
    old = tiny_llama(tied)
    for rank in (0, 1):
        result = torch.load(out / f"rank{rank}.pt")
        assert result["sharded"] == "DTensor"  # transformers sharded it, not this library
        assert result["still_tied"] is (True if tied else None)
        torch.testing.assert_close(result["losses"], losses, rtol=1e-5, atol=1e-5)
        assert list(result["trained"]) == list(expected)  # plain keys, plain order
        for key, value in result["trained"].items():
            # The body's sums meet in another order across ranks, and AdamW's first steps
            # scale the difference up (measured 1.9e-5 in a tied model's attention).
            body = key not in ("model.embed_tokens.weight", "lm_head.weight")
            tolerance = 1e-4 if body else 1e-5
            torch.testing.assert_close(value, expected[key], rtol=tolerance, atol=tolerance)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            kept = old.get_parameter(name).detach()[KEPT]
            assert torch.equal(result["trained"][name][KEPT_AT], kept), name
            moved = result["trained"][name][ADDED_AT] - start.get_parameter(name)[ADDED_AT]
            assert moved.abs().amax(dim=1).gt(0).all(), name  # every added row trained
    plain = _load_plain(out / "model")
    saved = plain.state_dict()
    assert all(torch.equal(value, result["trained"][key]) for key, value in saved.items())
    assert (plain.get_input_embeddings().weight is plain.get_output_embeddings().weight) == tied
