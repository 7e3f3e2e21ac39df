"""DDP: exact fixed rows on every rank, free rows as one process, and no traffic for fixed rows.

Two CPU processes (gloo) fit side by side with one, through the callback (untied and with a
tied head; with every row and with no row fixed) and in plain PyTorch with a tied head; one
in-process group counts the bytes a constrained model sends per step.
`check_same_on_every_rank` on two processes refuses ranks whose fixed rows differ, and a module
constrained after DDP wrapped it; the callback runs it at setup.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from support import in_process_group
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from embedding_constraint import check_same_on_every_rank, fix_rows
from embedding_constraint.distributed import _fingerprint

SCRIPT = Path(__file__).with_name("ddp_fit.py")
CHECK_SCRIPT = Path(__file__).with_name("ddp_reference_check.py")
PLAIN_SCRIPT = Path(__file__).with_name("ddp_plain_fit.py")
SCATTERED = [9, 0, 4, 2, 7, 5]


def _fit(
    flavour: str, devices: int, out: Path, rows: list[int] | None, *extra: str
) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # the ranks' own output is not under test
    command = [sys.executable, str(SCRIPT), "--flavour", flavour, "--devices", str(devices)]
    # rows None: the default prefix; [] (``--rows`` alone): no row fixed.
    command += ["--out", str(out), *([] if rows is None else ["--rows", *map(str, rows)]), *extra]
    done = subprocess.run(command, check=False, env=env, timeout=300, capture_output=True)
    if done.returncode:  # show why, not only that
        output = f"{done.stdout[-2000:].decode()}\n{done.stderr[-4000:].decode()}"
        raise AssertionError(f"{command} failed ({done.returncode}):\n{output}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flavour", "rows"),
    [("pytorch_lightning", None), ("lightning.pytorch", [9, 0, 4, 2, 7, 5])],
    ids=["pytorch_lightning-prefix", "lightning.pytorch-scattered"],
)
def test_ddp_two_processes_match_one_process(
    flavour: str, rows: list[int] | None, tmp_path: Path
) -> None:
    ranks = _fit(flavour, 2, tmp_path / "ddp", rows)
    (single,) = _fit(flavour, 1, tmp_path / "single", rows)
    reference, fixed_at = single["reference"], single["rows"]
    free_at = [r for r in range(10) if r not in fixed_at]
    for rank in [*ranks, single]:
        assert rank["plain"]
        assert torch.equal(rank["state_dict"]["embedding.weight"][fixed_at], reference)
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(ranks[1]["state_dict"][key], value), f"ranks differ in {key}"
        # Gradients are averaged across ranks in another order than one process sums them.
        torch.testing.assert_close(value, single["state_dict"][key], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    torch.randn(6, 4)
    initial = torch.nn.Embedding(10, 4).weight.detach()[free_at]
    moved = ranks[0]["state_dict"]["embedding.weight"][free_at]
    assert not torch.allclose(moved, initial), "free rows did not train"


def _check_fit(ranks: list[dict[str, Any]], single: dict[str, Any], *, tied: bool) -> list[int]:
    """Fixed rows exact after every step on every rank, ranks equal, as one process to 1e-5.

    Returns the free rows.
    """
    reference, fixed_at = single["reference"], single["rows"]
    for rank in [*ranks, single]:
        assert rank["error"] is None, rank["error"]
        assert rank["steps"] == 16  # 2 epochs of 8 batches
        assert rank["exact_each_step"] == [True] * 16
        assert rank["plain"]  # baked at the end of the fit
        state = rank["state_dict"]
        assert torch.equal(state["embedding.weight"][fixed_at], reference)
        if tied:
            assert rank["tied_each_step"] == [True] * 16  # the tie, while constrained
            assert rank["tied"]  # and on the baked model
            assert torch.equal(state["head.weight"], state["embedding.weight"])
    assert list(ranks[0]["state_dict"]) == list(single["state_dict"])
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(ranks[1]["state_dict"][key], value), f"ranks differ in {key}"
        # Gradients are averaged across ranks in another order than one process sums them.
        torch.testing.assert_close(value, single["state_dict"][key], rtol=1e-5, atol=1e-5)
    return [r for r in range(10) if r not in fixed_at]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flavour", "rows"),
    [("pytorch_lightning", None), ("lightning.pytorch", SCATTERED)],
    ids=["pytorch_lightning-prefix", "lightning.pytorch-scattered"],
)
def test_ddp_with_a_tied_head_matches_one_process(
    flavour: str, rows: list[int] | None, tmp_path: Path
) -> None:
    ranks = _fit(flavour, 2, tmp_path / "ddp", rows, "--tie")
    (single,) = _fit(flavour, 1, tmp_path / "single", rows, "--tie")
    free_at = _check_fit(ranks, single, tied=True)
    initial = single["initial"]["embedding.weight"][free_at]
    moved = ranks[0]["state_dict"]["embedding.weight"][free_at]
    assert not torch.allclose(moved, initial), "free rows did not train"


@pytest.mark.slow
def test_ddp_with_every_row_fixed_trains_the_rest_and_keeps_the_embedding(
    tmp_path: Path,
) -> None:
    every = list(range(10))
    ranks = _fit("lightning.pytorch", 2, tmp_path / "ddp", every)
    (single,) = _fit("lightning.pytorch", 1, tmp_path / "single", every)
    assert _check_fit(ranks, single, tied=False) == []
    for rank in ranks:
        assert torch.equal(rank["state_dict"]["embedding.weight"], single["reference"])
        # The head, the only parameters left to train, trained.
        assert not torch.allclose(rank["state_dict"]["head.weight"], rank["initial"]["head.weight"])


@pytest.mark.slow
def test_ddp_with_no_row_fixed_trains_as_without_the_callback(tmp_path: Path) -> None:
    ranks = _fit("lightning.pytorch", 2, tmp_path / "ddp", [])
    (single,) = _fit("lightning.pytorch", 1, tmp_path / "single", [])
    plain = _fit("lightning.pytorch", 2, tmp_path / "unconstrained", [], "--unconstrained")
    assert _check_fit(ranks, single, tied=False) == list(range(10))
    for rank, unconstrained in zip(ranks, plain, strict=True):
        assert unconstrained["error"] is None
        assert list(rank["state_dict"]) == list(unconstrained["state_dict"])
        for key, value in rank["state_dict"].items():
            torch.testing.assert_close(
                value, unconstrained["state_dict"][key], rtol=1e-5, atol=1e-5, msg=key
            )
        weight, initial = (
            rank["state_dict"]["embedding.weight"],
            rank["initial"]["embedding.weight"],
        )
        assert not torch.allclose(weight, initial), "the embedding did not train"


# -- plain PyTorch: DDP with a tied head -------------------------------------------------------

PlainFit = tuple[list[dict[str, Any]], dict[str, Any]]


@pytest.fixture(scope="module")
def plain_tied(tmp_path_factory: pytest.TempPathFactory) -> PlainFit:
    """Every layout of `ddp_plain_fit`, on 2 ranks and in one process, once."""
    out = tmp_path_factory.mktemp("ddp-plain")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    results = []
    for world in (2, 1):
        command = [sys.executable, str(PLAIN_SCRIPT), "--world", str(world)]
        command += ["--out", str(out / str(world))]
        done = subprocess.run(
            command, check=False, env=env, timeout=300, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        results.append(
            [torch.load(out / str(world) / f"rank{r}.pt", weights_only=True) for r in range(world)]
        )
    ranks, (single,) = results
    return ranks, single


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["prefix", "scattered"])
def test_plain_ddp_with_a_tied_head_matches_one_process(plain_tied: PlainFit, layout: str) -> None:
    sys.path.insert(0, str(PLAIN_SCRIPT.parent))
    import ddp_plain_fit as fit

    rows = fit.LAYOUTS[layout] or list(range(fit.FIXED))
    free_at = [r for r in range(fit.VOCAB) if r not in rows]
    reference = fit.reference()
    ranks, single = plain_tied[0], plain_tied[1]
    results = [rank[layout] for rank in ranks]
    for result in [*results, single[layout]]:
        assert "error" not in result, result.get("error")
        for step in result["steps"]:  # after each step, both holders read the fixed rows
            assert torch.equal(step["embedding"][rows], reference)
            assert torch.equal(step["head"], step["embedding"])
        assert result["tied"]  # model.head.weight is model.embedding.weight, while constrained
        assert torch.equal(result["trained"]["head.weight"], result["trained"]["embedding.weight"])
        assert result["plain"]  # baked: no parametrization, the head holds the plain Parameter
        for key, value in result["trained"].items():
            assert torch.equal(result["baked"][key], value), key  # the bake changes no value
        assert result["plain_after"]  # trained on under a new DDP, still plain and tied
        moved = result["trained"]["embedding.weight"][free_at]
        assert not torch.allclose(moved, result["initial"]["embedding.weight"][free_at])
        # Trained on after the bake, every row moves: the once fixed rows too.
        assert not torch.allclose(result["after"]["embedding.weight"][rows], reference)
    for stage in ("trained", "after"):
        assert list(results[0][stage]) == list(single[layout][stage])
        for key, value in results[0][stage].items():
            assert torch.equal(results[1][stage][key], value), f"ranks differ in {key}"
            # Gradients meet in another order across ranks than within one process.
            torch.testing.assert_close(
                value, single[layout][stage][key], rtol=1e-5, atol=1e-5, msg=key
            )
    for one, other in zip(results[0]["steps"], results[1]["steps"], strict=True):
        assert torch.equal(one["embedding"], other["embedding"])


class _Traffic:
    """Bytes a DDP model sends per step: buffer broadcasts and gradient all-reduces."""

    def __init__(self) -> None:
        self.broadcast = 0
        self.allreduce = 0

    def hook(self, state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        self.allreduce += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(state, bucket)


@pytest.mark.parametrize("layout", ["prefix", "scattered"])
def test_fixed_rows_add_no_ddp_traffic(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab, dim, fixed = 1000, 16, 900
    traffic = _Traffic()
    broadcast = getattr(dist, "_broadcast_coalesced")  # noqa: B009 - private: what DDP calls

    def counting(group: Any, tensors: list[torch.Tensor], *args: Any) -> Any:
        traffic.broadcast += sum(t.numel() * t.element_size() for t in tensors)
        return broadcast(group, tensors, *args)

    steps = 3

    def train() -> None:
        torch.manual_seed(0)
        emb = nn.Embedding(vocab, dim)
        rows = None if layout == "prefix" else torch.randperm(vocab)[:fixed].tolist()
        fix_rows(emb, torch.randn(fixed, dim), rows=rows)
        model = DistributedDataParallel(emb)  # broadcast_buffers=True, the default
        # (A lambda: DDP checks annotations, which this module keeps as strings.)
        model.register_comm_hook(None, lambda state, bucket: traffic.hook(state, bucket))
        monkeypatch.setattr(dist, "_broadcast_coalesced", counting)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randint(0, vocab, (64,))).pow(2).sum().backward()
            optimizer.step()

    in_process_group(train, "gloo", str(tmp_path / "group"), rank=0, world=1)
    assert traffic.broadcast == 0  # nothing of the fixed rows travels
    free_gradient = (vocab - fixed) * dim * 4  # float32
    assert traffic.allreduce == steps * free_gradient


# -- the same fixed rows on every rank ---------------------------------------------------------

DIFFERENT_REFERENCE = (
    "Expected '0.weight' to have the same reference (the fixed rows' values) on every rank. "
    "Got rank 1 differing from rank 0"
)
CONSTRAINED_AFTER_DDP = (
    "Expected ['0.weight'] to be constrained before DistributedDataParallel wrapped the module."
)


@pytest.fixture(scope="module")
def checked_on_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """What `check_same_on_every_rank` gave on each of 2 gloo ranks, case by case."""
    tmp = tmp_path_factory.mktemp("reference_check")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    options = ["--world", "2", "--store", str(tmp / "store"), "--out", str(tmp)]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(CHECK_SCRIPT), "--rank", str(rank), *options],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for rank in range(2)
    ]
    for rank in ranks:
        _, err = rank.communicate(timeout=300)
        assert rank.returncode == 0, err.decode()
    return [json.loads((tmp / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("same", "ok"),
        ("ddp_first", "ok"),
        ("one_ulp", DIFFERENT_REFERENCE),
        ("negative_zero", DIFFERENT_REFERENCE),
        ("swapped", DIFFERENT_REFERENCE),
        (
            "rows",
            (
                "Expected '0.weight' to have the same fixed row positions on every rank. Got "
                "rank 1 differing from rank 0: pass the same rows= on every rank."
            ),
        ),
        (
            "tensors",
            (
                "Expected the same tensors constrained by fix_rows on every rank. Got "
                "['0.weight'] on rank 0, ['0.weight', '1.weight'] on rank 1"
            ),
        ),
        ("ddp_late", CONSTRAINED_AFTER_DDP),
        ("ddp_late_find_unused", CONSTRAINED_AFTER_DDP),
    ],
)
def test_check_same_on_every_rank_on_two_processes(
    checked_on_two_ranks: list[dict[str, str]], case: str, message: str
) -> None:
    for results in checked_on_two_ranks:  # every rank raises, with the same message
        assert results[case].startswith(message), results[case]


@pytest.mark.slow
def test_the_callback_refuses_a_reference_that_differs_between_ranks_at_setup(
    tmp_path: Path,
) -> None:
    ranks = _fit("lightning.pytorch", 2, tmp_path, None, "--reference-differs-on-rank-1")
    for rank in ranks:
        error = rank["error"]
        assert error is not None
        assert error.startswith(
            "Expected 'embedding.weight' to have the same reference (the fixed rows' values) on "
            "every rank. Got rank 1 differing from rank 0"
        ), error
        assert rank["steps"] == 0  # refused before training
        assert rank["plain"]  # and the module is left plain


def test_check_same_on_every_rank_without_a_process_group_does_nothing() -> None:
    assert not dist.is_initialized()
    emb = fix_rows(nn.Embedding(10, 4), torch.randn(6, 4))
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    assert check_same_on_every_rank(emb) is None  # type: ignore[func-returns-value]
    for key, value in emb.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(
        TypeError, match=r"Expected `module` to be a torch.nn.Module\. Got Tensor\."
    ):
        check_same_on_every_rank(torch.zeros(1))  # type: ignore[arg-type]


@pytest.mark.parametrize("find_unused_parameters", [False, True])
def test_check_same_on_every_rank_refuses_constraining_after_ddp_on_one_rank(
    find_unused_parameters: bool, tmp_path: Path
) -> None:
    def body() -> None:
        first = DistributedDataParallel(fix_rows(nn.Embedding(10, 4), torch.randn(6, 4)))
        check_same_on_every_rank(first)  # constrained, then wrapped: fine
        check_same_on_every_rank(nn.Sequential(first))  # also when it sits inside a module
        model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
        late = DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)
        fix_rows(model, torch.randn(6, 4), name="0.weight")
        check_same_on_every_rank(model)  # the module inside cannot tell
        with pytest.raises(
            ValueError,
            match=r"Expected \['0.weight'\] to be constrained before DistributedDataParallel "
            r"wrapped the module. Got a DistributedDataParallel built for 220 bytes of "
            r"parameters, which now hold 124",
        ):
            check_same_on_every_rank(late)

    in_process_group(body, "gloo", str(tmp_path / "group"), rank=0, world=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_the_fingerprint_tells_apart_every_single_bit_and_swapped_rows(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("embedding_constraint.distributed._CHUNK", 16)  # several chunks
    torch.manual_seed(0)
    tensor = torch.randn(3, 5, dtype=dtype)
    seen = {_fingerprint(tensor)}
    bits = tensor.view(torch.uint8).reshape(-1)
    for byte in range(bits.numel()):
        for bit in range(8):
            flipped = bits.clone()
            flipped[byte] ^= 1 << bit
            seen.add(_fingerprint(flipped.view(dtype).reshape(3, 5)))
    assert len(seen) == 1 + bits.numel() * 8  # each single-bit change is told apart
    assert _fingerprint(tensor[[1, 0, 2]]) != _fingerprint(tensor)
    assert _fingerprint(tensor.t().contiguous().t()) == _fingerprint(tensor)  # layout: no matter
