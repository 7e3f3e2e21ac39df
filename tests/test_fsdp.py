"""FSDP2 (``fully_shard``): exact fixed rows on every rank, free rows as one process, plain keys.

Two CPU processes (gloo) train side by side with one (``fsdp_fit.py``); in-process tests on a
one-rank group check the reads of sharded rows and the refusals.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
from support import graph_ops, stored
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from embedding_constraint import FixedRows, fix_rows
from embedding_constraint.fixed_rows import parametrization_list
from embedding_constraint.fsdp import bake_fully_sharded, prepare_fully_shard

SCRIPT = Path(__file__).with_name("fsdp_fit.py")
SCATTERED = [9, 0, 4, 2, 7, 5]
# (fixed rows, where the reference lives): `prepare_fully_shard` shards it, else it is whole.
LAYOUTS = {
    "prefix": (None, "sharded"),
    "scattered": (SCATTERED, "sharded"),
    "scattered-replicated": (SCATTERED, "replicated"),
}
Fitted = tuple[list[int] | None, list[dict[str, Any]], dict[str, Any], Path]


def _fit(
    world: int, out: Path, rows: list[int] | None, reference: str = "sharded"
) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # the ranks' own output is not under test
    command = [sys.executable, str(SCRIPT), "--world", str(world), "--out", str(out)]
    command += ["--reference", reference, *(["--rows", *map(str, rows)] if rows else [])]
    _run(command, env)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(
        command, check=False, env=env, timeout=300, capture_output=True, text=True
    )
    if done.returncode:  # show why, not only that
        output = f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        raise AssertionError(f"{command} failed ({done.returncode}):\n{output}")


@pytest.fixture(scope="module", params=list(LAYOUTS))
def fitted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    """Both runs of one layout, once for the tests that read them."""
    rows, reference = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp(f"fsdp-{request.param}")
    ranks = _fit(2, out / "sharded", rows, reference)
    (single,) = _fit(1, out / "single", rows)
    return rows, ranks, single, out / "sharded"


def _fixed(rows: list[int] | None) -> dict[str, list[int]]:
    """Where each constrained tensor of `fsdp_fit.Net` holds its reference rows."""
    at = list(range(6)) if rows is None else sorted(rows)
    classifier = [0, 1, 2] if rows is None else [0, 2, 5]
    return {"embedding.weight": at, "bag.weight": at, "head.weight": at,
            "classifier.weight": classifier, "classifier.bias": classifier}  # fmt: skip


def _references(rows: list[int] | None) -> dict[str, torch.Tensor]:
    """The reference rows in row order, by plain key (as `fsdp_fit.build` fixes them)."""
    sys.path.insert(0, str(SCRIPT.parent))
    from fsdp_fit import references

    refs = references()

    def order(reference: torch.Tensor) -> torch.Tensor:
        return reference if rows is None else reference[torch.argsort(torch.tensor(rows))]

    old = refs["classifier"]
    classifier_order = [1, 2, 0] if rows is not None else [0, 1, 2]  # rows=[5, 0, 2], sorted
    return {
        "embedding.weight": order(refs["embedding"]),
        "head.weight": order(refs["embedding"]),
        "bag.weight": order(refs["bag"]),
        "classifier.weight": old.weight.detach()[classifier_order],
        "classifier.bias": old.bias.detach()[classifier_order],
    }


@pytest.mark.slow
def test_two_ranks_match_one_process_and_fixed_rows_are_exact_on_each(
    fitted: Fitted,
) -> None:
    rows, ranks, single, _ = fitted
    fixed, references = _fixed(rows), _references(rows)
    for rank in ranks:
        for source in ("full", "state_dict"):
            state = rank[source]
            assert list(state) == list(single["state_dict"])  # plain keys, plain order
            for key, value in state.items():
                assert value.shape == single["state_dict"][key].shape
                if key in fixed:
                    assert torch.equal(value[fixed[key]], references[key]), (source, key)
                # Gradients meet in another order across ranks than within one process.
                torch.testing.assert_close(value, single["state_dict"][key], rtol=1e-5, atol=1e-5)
        assert torch.equal(
            rank["weight"][fixed["embedding.weight"]], references["embedding.weight"]
        )
    for key, value in ranks[0]["full"].items():
        assert torch.equal(ranks[1]["full"][key], value), f"ranks differ in {key}"
    torch.manual_seed(0)
    initial = nn.Embedding(10, 4)  # what training started from: seed 0, the first module
    free = [r for r in range(10) if r not in fixed["embedding.weight"]]
    moved = ranks[0]["full"]["embedding.weight"][free]
    assert not torch.allclose(moved, initial.weight.detach()[free]), "free rows did not train"


@pytest.mark.slow
def test_free_rows_and_optimizer_state_are_sharded(
    fitted: Fitted,
) -> None:
    _, ranks, _, _ = fitted
    for rank in ranks:
        assert rank["free_type"] == "DTensor"
        assert rank["free_local_rows"] == 2  # 4 free rows over 2 ranks
        assert rank["state_types"] == ["DTensor"]  # Adam's moments: shards of the free rows
        assert rank["sharded_keys"] == sorted(ranks[0]["full"])


@pytest.mark.slow
def test_memory_at_rest_per_rank(fitted: Fitted) -> None:
    """Rows of each constrained tensor a rank holds between steps, reference and free."""
    _, ranks, _, _ = fitted
    # (fixed, free) rows: the embedding and the bag (6, 4), the classifier's weight and bias (3, 3)
    sizes = {"embedding.weight": (6, 4), "bag.weight": (6, 4)}
    sizes |= {"classifier.weight": (3, 3), "classifier.bias": (3, 3)}
    replicated = ranks[0]["reference"] == "replicated"
    for name, (fixed, free) in sizes.items():
        held = [rank["rest"][name] for rank in ranks]
        if replicated:  # the whole reference on each rank, the free rows sharded
            assert held == [fixed + -(-free // 2), fixed + free // 2], name
        else:  # as an unconstrained weight: 1 / world_size of each, rounded up
            assert held == [-(-fixed // 2) + -(-free // 2), fixed // 2 + free // 2], name


@pytest.mark.slow
def test_a_distributed_checkpoint_loads_into_a_plain_module(
    fitted: Fitted,
    tmp_path: Path,
) -> None:
    rows, ranks, _, out = fitted
    dcp_to_torch_save(out / "dcp", tmp_path / "full.pt")
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    sys.path.insert(0, str(SCRIPT.parent))
    from fsdp_fit import Net

    plain = Net()
    plain.load_state_dict(state)  # strict: exactly the unconstrained module's keys
    for key, value in plain.state_dict().items():
        assert torch.equal(value, ranks[0]["full"][key]), key
    fixed, references = _fixed(rows), _references(rows)
    assert torch.equal(
        plain.embedding.weight[fixed["embedding.weight"]], references["embedding.weight"]
    )


@pytest.mark.slow
def test_set_model_state_dict_loads_full_and_sharded(
    fitted: Fitted,
) -> None:
    _, ranks, _, _ = fitted
    assert [rank["reloaded"] for rank in ranks] == ["ok", "ok"]


# -- one process, one rank: the reads of sharded rows and the refusals -----------------------


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        gc.collect()  # the test's sharded modules go before their group (see test_ddp.py)
        dist.destroy_process_group()


@pytest.mark.usefixtures("group")
def test_fully_shard_before_fix_rows_is_refused_and_changes_nothing() -> None:
    emb = nn.Embedding(6, 3)
    fully_shard(emb)
    before = emb.weight
    with pytest.raises(TypeError, match=r"Expected a tensor that is not sharded\. Got a DTensor"):
        fix_rows(emb, torch.zeros(2, 3))
    assert emb.weight is before
    assert not hasattr(emb, "parametrizations")


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize("rows", [None, [4, 1]], ids=["prefix", "scattered"])
def test_a_read_of_sharded_rows_is_a_dtensor_of_the_plain_weight(rows: list[int] | None) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3)
    reference = torch.randn(2, 3)
    fix_rows(emb, reference, rows=rows)
    expected = emb.weight.detach().clone()
    fully_shard(emb)
    weight = emb.weight  # outside the forward: the stored rows are a DTensor
    assert isinstance(weight, DTensor)
    assert weight.placements == (Shard(0),)
    assert weight.shape == (6, 3)
    assert torch.equal(weight.full_tensor(), expected)
    # A gradient through the read reaches the free rows' shards, and the fixed rows get none.
    weight.full_tensor().pow(2).sum().backward()  # type: ignore[no-untyped-call]
    free = stored(emb)
    assert isinstance(free.grad, DTensor)
    free_at = [r for r in range(6) if r not in (rows or [0, 1])]
    torch.testing.assert_close(free.grad.full_tensor(), 2 * expected[free_at])
    state = get_model_state_dict(emb, options=StateDictOptions(full_state_dict=True))
    assert list(state) == ["weight"]
    assert torch.equal(cast(torch.Tensor, state["weight"]), expected)


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize("rows", [None, [4, 1]], ids=["prefix", "scattered"])
def test_a_whole_reference_leaves_the_block_once_fsdp2_holds_the_free_rows(
    rows: list[int] | None,
) -> None:
    """FSDP2 keeps the free rows in storage of its own: the reference gets a compact copy and
    the block [reference; free] goes, after the first forward and between steps alike."""
    emb = nn.Embedding(6, 3)
    reference = torch.randn(2, 3)
    fix_rows(emb, reference, rows=rows)
    constraint = parametrization_list(emb, "weight")[0]
    assert isinstance(constraint, FixedRows)
    blocks = [constraint._joined_buffer]
    fully_shard(emb)
    emb(torch.arange(6)).sum().backward()
    blocks.append(constraint._joined_buffer)
    assert [block is None for block in blocks] == [False, True]
    held = constraint.reference.untyped_storage().nbytes()
    assert held == reference.numel() * reference.element_size()
    weight = cast(DTensor, emb.weight).full_tensor()
    assert torch.equal(weight[rows or [0, 1]], reference)


def _module(kind: str) -> nn.Module:
    """A module of each read path: the lookup, a sum bag, the head (8 rows of 3)."""
    modules: dict[str, nn.Module] = {
        "embedding": nn.Embedding(8, 3),
        "bag": nn.EmbeddingBag(8, 3, mode="sum"),
        "head": nn.Linear(3, 8),
    }
    return modules[kind]


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize("kind", ["embedding", "bag", "head"])
def test_sharded_reads_equal_the_unsharded_module(kind: str) -> None:
    torch.manual_seed(0)
    module = _module(kind)
    unsharded = copy.deepcopy(module)
    fix_rows(module, torch.randn(3, 3), rows=[6, 1, 3])
    unsharded.load_state_dict(module.state_dict())
    ids = torch.tensor([[0, 1, 6], [7, 3, 3]])
    inputs = torch.randn(2, 3) if kind == "head" else ids
    fully_shard(module)
    # FSDP2 gathers the rows for the forward, apart from the reference: the lookup and the
    # head read them there; the bag, apart, reads the weight (`reads.bag`).
    out = module(inputs)
    read = {
        "embedding": "_LookupBackward",
        "bag": "EmbeddingBagBackward0",
        "head": "_LinearBackward",
    }
    assert read[kind] in graph_ops(out)
    out.pow(2).sum().backward()
    expected = unsharded(inputs)
    expected.pow(2).sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = stored(module).grad
    assert isinstance(grad, DTensor)
    assert isinstance(unsharded.weight, torch.Tensor)
    assert unsharded.weight.grad is not None
    torch.testing.assert_close(grad.full_tensor(), unsharded.weight.grad[[0, 2, 4, 5, 7]])


# -- Lightning: ModelParallelStrategy (FSDP2 in configure_model) ------------------------------

LIGHTNING_SCRIPT = Path(__file__).with_name("fsdp_lightning_fit.py")


def _lightning_fit(
    flavour: str, devices: int, out: Path, rows: list[int] | None, tie: bool, *more: str
) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(LIGHTNING_SCRIPT), "--flavour", flavour]
    command += ["--devices", str(devices), "--out", str(out), *(["--tie"] if tie else [])]
    command += [*(["--rows", *map(str, rows)] if rows else []), *more]
    _run(command, env)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flavour", "rows", "tie", "checkpoint"),
    [
        ("pytorch_lightning", None, False, "full"),
        ("lightning.pytorch", SCATTERED, True, "distributed"),
    ],
    ids=["pytorch_lightning-prefix-full", "lightning.pytorch-scattered-tied-distributed"],
)
def test_model_parallel_strategy_matches_one_process(
    flavour: str, rows: list[int] | None, tie: bool, checkpoint: str, tmp_path: Path
) -> None:
    full = ["--full-checkpoint"] if checkpoint == "full" else []
    ranks = _lightning_fit(flavour, 2, tmp_path / "fsdp", rows, tie, *full)
    (single,) = _lightning_fit(flavour, 1, tmp_path / "single", rows, tie)
    reference, fixed_at = single["reference"], single["rows"]
    keys = ["embedding.weight", "head.weight", "head.bias"]
    for rank in ranks:
        assert rank["plain"]  # a plain Parameter again after the fit...
        assert rank["dtensor"]  # ...and the DTensor that FSDP2 keeps
        # During the fit: half of the 6 reference rows and half of the 4 free rows per rank.
        assert rank["held"] == (3, 2)
        assert sorted(rank["state_dict"]) == sorted(keys)
        assert torch.equal(rank["state_dict"]["embedding.weight"][fixed_at], reference)
        for key, value in rank["state_dict"].items():
            torch.testing.assert_close(value, single["state_dict"][key], rtol=1e-5, atol=1e-5)
    # Validation after the fit, of the baked model: each rank logs the mean over its own
    # batches, and their mean is one process's (equal batches).
    mean = sum(rank["val_loss"] for rank in ranks) / len(ranks)
    torch.testing.assert_close(mean, single["val_loss"], rtol=1e-4, atol=1e-5)
    # Lightning's checkpoint (a distributed one, or one file), saved while the constraint was
    # on, holds plain keys and loads into the unconstrained model.
    last = tmp_path / "fsdp" / "ckpt" / "last.ckpt"
    if checkpoint == "distributed":
        dcp_to_torch_save(last, tmp_path / "last.pt")
        last = tmp_path / "last.pt"
    saved = torch.load(last, weights_only=False)["state_dict"]
    sys.path.insert(0, str(SCRIPT.parent))
    from lightning_models import FLAVOURS

    plain = FLAVOURS[flavour].model(vocab=10, dim=4, tie=tie)
    plain.load_state_dict(saved)
    assert torch.equal(plain.embedding.weight[fixed_at], reference)
    for key in keys:  # the last checkpoint is the end of the fit
        assert torch.equal(plain.state_dict()[key], ranks[0]["state_dict"][key]), key


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize("reference", ["sharded", "whole"])
def test_bake_fully_sharded_leaves_a_plain_weight_that_fsdp2_trains(reference: str) -> None:
    torch.manual_seed(0)
    emb, head = nn.Embedding(8, 3), nn.Linear(3, 8)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, head)
    old = torch.randn(3, 3)
    fix_rows(model, old, name="0.weight", rows=[6, 1, 3])
    if reference == "sharded":
        prepare_fully_shard(model)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    tokens = torch.arange(8)
    model(tokens).pow(2).sum().backward()
    optimizer.step()
    trained = cast(DTensor, emb.weight).full_tensor().detach()
    bake_fully_sharded(model)
    weight = emb.weight
    assert isinstance(weight, nn.Parameter)
    assert isinstance(weight, DTensor)
    assert head.weight is weight  # still tied
    assert not hasattr(emb, "parametrizations")
    assert [name for name, _ in model.named_parameters()] == ["0.weight", "1.bias"]
    assert torch.equal(weight.full_tensor(), trained)
    assert torch.equal(weight.full_tensor()[[6, 1, 3]], old)
    # FSDP2 now manages the plain weight: it gathers it for the forward, and every row trains.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(tokens).pow(2).sum().backward()
    optimizer.step()
    assert isinstance(weight.grad, DTensor)
    assert not torch.equal(weight.full_tensor()[[6, 1, 3]], old)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    assert sorted(state) == ["0.weight", "1.bias", "1.weight"]


@pytest.mark.usefixtures("group")
def test_prepare_fully_shard_is_refused_without_a_constraint_or_after_fully_shard() -> None:
    with pytest.raises(ValueError, match="Expected a module constrained with fix_rows"):
        prepare_fully_shard(nn.Embedding(4, 2))
    emb = fix_rows(nn.Embedding(4, 2), torch.zeros(1, 2))
    fully_shard(emb)
    with pytest.raises(ValueError, match="Expected a module that fully_shard has not sharded"):
        prepare_fully_shard(emb)
    assert not cast(FixedRows, parametrization_list(emb, "weight")[0]).reference_is_parameter


OPTIMIZERS: dict[str, Any] = {
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.1, weight_decay=0.1),
}


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_a_sharded_reference_stays_exact_and_gets_no_state(optimizer_name: str) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3)
    reference = torch.randn(2, 3)
    fix_rows(emb, reference, rows=[4, 0])
    prepare_fully_shard(emb)
    prepare_fully_shard(emb)  # a second call changes nothing
    fully_shard(emb)
    held = dict(emb.named_parameters())["parametrizations.weight.0.reference"]
    assert isinstance(held, DTensor)
    assert not held.requires_grad
    optimizer = OPTIMIZERS[optimizer_name](emb.parameters())  # every parameter, the frozen too
    for _ in range(3):
        optimizer.zero_grad()
        emb(torch.arange(6)).pow(2).sum().backward()
        optimizer.step()
    assert held.grad is None
    assert held not in optimizer.state
    assert torch.equal(cast(DTensor, emb.weight).full_tensor()[[4, 0]], reference)
    assert list(emb.state_dict()) == ["weight"]


@pytest.mark.parametrize(
    ("strategy", "advice"),
    [("FSDPStrategy", "Use ModelParallelStrategy")],
)
def test_flat_sharding_strategies_are_refused_pointing_to_model_parallel(
    strategy: str, advice: str
) -> None:
    from lightning.pytorch import strategies
    from lightning_models import FLAVOURS

    flavour = FLAVOURS["lightning.pytorch"]
    model = flavour.model()
    callback = flavour.callback(model.embedding, torch.zeros(2, 4))
    cls = getattr(strategies, strategy)
    trainer = SimpleNamespace(strategy=cls.__new__(cls), callbacks=[callback])
    with pytest.raises(RuntimeError, match=f"Got {strategy}, which shards them.*{advice}"):
        callback.setup(trainer, model, "fit")
    assert type(model.embedding.weight) is nn.Parameter


@pytest.mark.parametrize("shard_reference", [True, False])
def test_model_parallel_strategy_shards_the_reference_with_the_free_rows(
    shard_reference: bool,
) -> None:
    from lightning.pytorch import strategies
    from lightning_models import FLAVOURS

    flavour = FLAVOURS["lightning.pytorch"]
    model = flavour.model()
    callback = flavour.callback(model.embedding, torch.zeros(2, 4), shard_reference=shard_reference)
    cls = strategies.ModelParallelStrategy
    trainer = SimpleNamespace(strategy=cls.__new__(cls), callbacks=[callback])
    callback.setup(trainer, model, "fit")  # before configure_model, where fully_shard runs
    names = {name: p.requires_grad for name, p in model.embedding.named_parameters()}
    # A frozen parameter, which fully_shard will shard; or no parameter: whole on each rank.
    held = {"parametrizations.weight.0.reference": False} if shard_reference else {}
    assert names == {"parametrizations.weight.original": True, **held}
    callback.teardown(trainer, model, "fit")  # nothing sharded: a plain bake
    assert type(model.embedding.weight) is nn.Parameter
    assert torch.equal(model.embedding.weight[:2], torch.zeros(2, 4))


@pytest.mark.slow
def test_model_parallel_strategy_resumes_from_a_distributed_checkpoint(tmp_path: Path) -> None:
    flavour, rows = "lightning.pytorch", SCATTERED
    _lightning_fit(flavour, 2, tmp_path / "first", rows, False)
    last = str(tmp_path / "first" / "ckpt" / "last.ckpt")
    resumed = _lightning_fit(
        flavour, 2, tmp_path / "resumed", rows, False, "--epochs", "3", "--resume", last
    )
    straight = _lightning_fit(flavour, 2, tmp_path / "straight", rows, False, "--epochs", "3")
    for rank, other in zip(resumed, straight, strict=True):
        assert torch.equal(rank["state_dict"]["embedding.weight"][rank["rows"]], rank["reference"])
        for key, value in rank["state_dict"].items():
            torch.testing.assert_close(value, other["state_dict"][key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resuming_model_parallel_from_one_file_is_refused_not_skipped(tmp_path: Path) -> None:
    """Lightning loads a one-file checkpoint under the parameters' own names; with strict
    loading off it would skip the constrained tensors and resume with fresh free rows."""
    flavour = "lightning.pytorch"
    _lightning_fit(flavour, 2, tmp_path / "first", None, False, "--full-checkpoint")
    last = str(tmp_path / "first" / "ckpt" / "last.ckpt")
    with pytest.raises(AssertionError) as failed:
        _lightning_fit(flavour, 2, tmp_path / "resumed", None, False, "--resume", last, "--lenient")
    assert "Expected a distributed checkpoint (a directory) to resume" in str(failed.value)
    assert "last.ckpt" in str(failed.value)


@pytest.mark.slow
def test_the_benchmark_counts_no_traffic_for_fixed_gradients(tmp_path: Path) -> None:
    """Bytes per step and rank, as `bench_distributed.py` counts them (V=2000, d=32, 90% fixed)."""
    script = SCRIPT.parent / "benchmarks" / "bench_distributed.py"
    _run(
        [sys.executable, str(script), "--quick", "--json", str(tmp_path / "out.json")],
        {**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    weight, free = 2000 * 32 * 4, 200 * 32 * 4  # float32 bytes: all rows, the free rows
    assert results["ddp plain"]["bytes"] == {"all-reduce": weight}
    assert results["ddp fixed"]["bytes"] == {"all-reduce": free}  # nothing of the fixed rows
    assert results["fsdp2 plain"]["bytes"] == {"all-gather": weight, "reduce-scatter": weight}
    # The reference sharded: gathered as an unconstrained weight is; no gradient for it.
    assert results["fsdp2 fixed"]["bytes"] == {"all-gather": weight, "reduce-scatter": free}
    # The reference whole on each rank: nothing of it travels.
    fixed_whole = results["fsdp2 fixed, whole reference"]["bytes"]
    assert fixed_whole == {"all-gather": free, "reduce-scatter": free}
    # At rest, per rank: the shards, the reference (whole or a shard) and AdamW's two moments.
    state = 2 * free // 2
    assert results["fsdp2 plain"]["at_rest_bytes"] == weight // 2 + 2 * weight // 2
    assert results["fsdp2 fixed"]["at_rest_bytes"] == weight // 2 + state
    assert results["fsdp2 fixed, whole reference"]["at_rest_bytes"] == (
        (weight - free) + free // 2 + state
    )


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize("reference", ["sharded", "whole"])
@pytest.mark.parametrize("kind", ["embedding", "bag", "head"])
@pytest.mark.parametrize("rows", [None, [6, 1, 3]], ids=["prefix", "scattered"])
def test_mixed_precision_reads_as_an_unconstrained_weight(
    reference: str, kind: str, rows: list[int] | None
) -> None:
    """Under FSDP2's bfloat16 policy every row is read in bfloat16, the reference included."""
    torch.manual_seed(0)
    module = _module(kind)
    old = torch.randn(3, 3)
    unconstrained = copy.deepcopy(module)
    fix_rows(module, old, rows=rows)
    unconstrained.load_state_dict(module.state_dict())
    if reference == "sharded":
        prepare_fully_shard(module)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    fully_shard(module, mp_policy=policy)
    fully_shard(unconstrained, mp_policy=policy)
    inputs = torch.randn(2, 3) if kind == "head" else torch.tensor([[0, 1, 6], [7, 3, 3]])
    out, expected = module(inputs), unconstrained(inputs)
    assert out.dtype == expected.dtype == torch.bfloat16
    # The head splits its product by rows (the reference's and the free ones'): the same
    # products, maybe summed in another order.
    exact = 0 if kind != "head" else 1e-2
    torch.testing.assert_close(out, expected, rtol=exact, atol=exact)
    out.float().pow(2).sum().backward()
    stored_rows = cast(DTensor, stored(module).grad)
    assert stored_rows.dtype == torch.float32  # gradients reach the float32 shards
    weight = cast(DTensor, module.weight).full_tensor()
    assert torch.equal(weight[rows or [0, 1, 2]], old)  # reference[i] at rows[i], exact


def test_shard_reference_must_be_a_bool() -> None:
    from lightning_models import FLAVOURS

    flavour = FLAVOURS["pytorch_lightning"]
    model = flavour.model()
    with pytest.raises(TypeError, match=r"Expected `shard_reference` to be a bool\. Got str"):
        flavour.callback(model.embedding, torch.zeros(2, 4), shard_reference="no")
    with pytest.raises(TypeError, match=r"Expected `shard_reference` to be a bool\. Got int"):
        flavour.callback.from_vocabularies(
            model.embedding, torch.zeros(2, 4), ["a", "b"], list("abcdefghij"), shard_reference=0
        )


# -- fully_shard on the constrained module itself (torchtitan's layout), and bake ------------


@pytest.mark.usefixtures("group")
def test_torch_removes_a_parametrization_only_from_the_class_it_made() -> None:
    """Pins the torch behaviour `bake` works around (`fix_rows.remove_parametrization`).

    ``fully_shard`` derives ``FSDP<class>(FSDPModule, <class>)`` from the module's class, the
    parametrized one included; torch's ``remove_parametrizations`` deletes the tensor's
    property from ``module.__class__`` and then sets the class to ``__bases__[0]``, which is
    right only for the class ``register_parametrization`` made.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.utils import parametrize

    emb = nn.Embedding(4, 2)
    parametrize.register_parametrization(emb, "weight", nn.Identity())
    parametrized = type(emb)
    assert "weight" in parametrized.__dict__
    assert parametrized.__bases__ == (nn.Embedding,)
    fully_shard(emb)
    assert type(emb).__bases__ == (FSDPModule, parametrized)
    assert "weight" not in type(emb).__dict__
    with pytest.raises(AttributeError, match="has no attribute 'weight'"):
        parametrize.remove_parametrizations(emb, "weight")
    # On the parametrized class itself it works, and the class goes back to its first base.
    derived = type(emb)
    emb.__class__ = parametrized
    parametrize.remove_parametrizations(emb, "weight")
    assert type(emb) is nn.Embedding
    assert derived.__bases__ == (FSDPModule, parametrized)  # torch made it; bake remakes it


class _Mixin:
    """What a library that subclasses ``module.__class__`` adds (as FSDP2's FSDPModule does)."""

    def mixed_in(self) -> str:
        return "still here"


@pytest.mark.parametrize("attrs", [["weight"], ["weight", "bias"]], ids=["weight", "weight-bias"])
def test_bake_keeps_a_class_derived_from_the_parametrized_one(attrs: list[str]) -> None:
    from embedding_constraint import bake

    torch.manual_seed(0)
    head = nn.Linear(3, 5)
    old = nn.Linear(3, 2)
    if attrs == ["weight"]:
        fix_rows(head, old.weight.detach(), rows=[4, 1])
    else:
        fix_rows(head, old)
    expected = head.weight.detach().clone(), head.bias.detach().clone()
    parametrized = type(head)
    derived = type("WrappedParametrizedLinear", (_Mixin, parametrized), {"marker": 7})
    head.__class__ = derived
    bake(head)
    cls = type(head)
    assert cls.__name__ == "WrappedLinear"
    assert cls.__bases__ == (_Mixin, nn.Linear)
    assert cast(Any, head).marker == 7
    assert cast(Any, head).mixed_in() == "still here"
    assert not hasattr(head, "parametrizations")
    assert [name for name, _ in head.named_parameters()] == ["weight", "bias"]
    assert type(head.weight) is nn.Parameter
    assert torch.equal(head.weight, expected[0])
    assert torch.equal(head.bias, expected[1])
    x = torch.randn(2, 3)
    torch.testing.assert_close(head(x), nn.functional.linear(x, *expected), rtol=0, atol=0)


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize("baker", ["bake_fully_sharded", "bake"])
@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
@pytest.mark.parametrize("kind", ["embedding", "bag", "head"])
def test_bake_fully_sharded_on_the_constrained_module_itself(
    kind: str, reshard: bool, baker: str
) -> None:
    """``fully_shard`` on the constrained module (as torchtitan shards its embedding and head):
    bake leaves an FSDP2 module of the plain class, which evaluates and trains on."""
    from torch.distributed.fsdp import FSDPModule

    from embedding_constraint import bake

    torch.manual_seed(0)
    module = _module(kind)
    plain = copy.deepcopy(module)
    old = torch.randn(3, 3)
    fix_rows(module, old, rows=[6, 1, 3])
    fully_shard(module, reshard_after_forward=reshard)
    inputs = torch.randn(2, 3) if kind == "head" else torch.tensor([[0, 1, 6], [7, 3, 3]])
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(inputs).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        module(inputs)  # an evaluation last: with reshard False the rows stay gathered
    read = cast(torch.Tensor, module.weight).detach()
    trained = (read.full_tensor() if isinstance(read, DTensor) else read).clone()
    bakers = {"bake": bake, "bake_fully_sharded": bake_fully_sharded}
    bakers[baker](module)
    assert isinstance(module, FSDPModule)
    assert type(module).__name__ == f"FSDP{type(plain).__name__}"
    assert not any("Parametrized" in c.__name__ for c in type(module).__mro__)
    weight = module.weight
    assert isinstance(weight, nn.Parameter)
    assert isinstance(weight, DTensor)
    assert torch.equal(weight.full_tensor(), trained)
    assert torch.equal(weight.full_tensor()[[6, 1, 3]], old)
    # It evaluates as the plain module with the trained weight, and every row trains on.
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v
             for k, v in module.state_dict().items()}  # fmt: skip
    plain.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(module(inputs), plain(inputs), rtol=0, atol=0)
    # As for any FSDP2 module: an evaluation with reshard_after_forward=False leaves the rows
    # gathered, and parameters() would list the gathered ones.
    module.reshard()
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(inputs).pow(2).sum().backward()
    optimizer.step()
    assert isinstance(weight.grad, DTensor)
    assert not torch.equal(weight.full_tensor()[[6, 1, 3]], old)


@pytest.mark.usefixtures("group")
def test_bake_below_the_module_fsdp2_shards_is_refused_and_changes_nothing() -> None:
    from embedding_constraint import bake

    model = nn.Sequential(nn.Embedding(6, 3), nn.Linear(3, 2))
    fix_rows(model, torch.zeros(2, 3), name="0.weight")
    fully_shard(model)  # the embedding is in the root's group
    free = stored(model[0])
    with pytest.raises(ValueError, match="Expected an FSDP2 group under `module` that manages"):
        bake(model[0])
    assert stored(model[0]) is free
    bake(model)
    assert isinstance(model[0].weight, DTensor)
    assert torch.equal(model[0].weight.full_tensor()[:2], torch.zeros(2, 3))


# -- per-module sharding on 2 ranks (`fsdp_per_module_fit.py`), and DDP's edge cases ---------

PER_MODULE_SCRIPT = Path(__file__).with_name("fsdp_per_module_fit.py")
PerModule = tuple[list[dict[str, Any]], dict[str, Any]]


@pytest.fixture(scope="module")
def per_module(tmp_path_factory: pytest.TempPathFactory) -> PerModule:
    """Every layout of `fsdp_per_module_fit`, on 2 ranks and in one process, once."""
    out = tmp_path_factory.mktemp("per-module")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    loaded = []
    for world in (2, 1):
        where = out / str(world)
        _run(
            [sys.executable, str(PER_MODULE_SCRIPT), "--world", str(world), "--out", str(where)],
            env,
        )
        loaded.append([torch.load(where / f"rank{r}.pt", weights_only=False) for r in range(world)])
    return loaded[0], loaded[1][0]


def _check_per_module(per_module: PerModule, layout: str) -> list[dict[str, Any]]:
    """Fixed rows exact on each rank, free rows as one process: trained, then after the bake."""
    sys.path.insert(0, str(SCRIPT.parent))
    import fsdp_per_module_fit as fit

    ranks, single = per_module
    results = [rank[layout] for rank in ranks]
    for result in [*results, single[layout]]:
        assert "error" not in result, result.get("error")
    tie, _, _, rows = fit.LAYOUTS[layout]
    refs = fit.references(layout)
    fixed = {"tok_embeddings.weight": rows} | ({} if tie else {"output.weight": fit.HEAD_ROWS})
    for result in results:
        for stage in ("trained", "after"):
            state = result[stage]
            assert list(state) == list(single[layout][stage])  # plain keys, plain order
            for key, value in state.items():
                # Gradients meet in another order across ranks than within one process.
                torch.testing.assert_close(
                    value, single[layout][stage][key], rtol=1e-5, atol=1e-5, msg=key
                )
        for key, at in fixed.items():
            assert torch.equal(result["trained"][key][at], refs[key]), key
        assert result["plain"] == single[layout]["plain"]  # no parametrizations left
    for stage in ("trained", "after"):
        for key, value in results[0][stage].items():
            assert torch.equal(results[1][stage][key], value), f"ranks differ in {key}"
    mean = sum(r["val_loss"] for r in results) / len(results)
    torch.testing.assert_close(mean, single[layout]["val_loss"], rtol=1e-5, atol=1e-5)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["untied-reshard", "untied-keep", "tied-reshard", "tied-keep"])
def test_per_module_fully_shard_trains_exactly_and_bakes_into_fsdp2(
    per_module: PerModule, layout: str
) -> None:
    for result in _check_per_module(per_module, layout):
        for name, mro in result["classes"].items():
            # An FSDP2 module still, of the plain class: the parametrized class is gone.
            plain = "Embedding" if name == "tok_embeddings" else "Linear"
            assert mro[:3] == [f"FSDP{plain}", "FSDPModule", plain], name
    # Training went on after the bake: the once fixed rows moved, on every rank alike.
    ranks, _ = per_module
    trained, after = ranks[0][layout]["trained"], ranks[0][layout]["after"]
    rows = [9, 0, 4, 2, 7, 5]
    assert not torch.equal(
        after["tok_embeddings.weight"][rows], trained["tok_embeddings.weight"][rows]
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["no-row-fixed", "ddp-no-row-fixed", "ddp-every-row-fixed"])
def test_no_row_or_every_row_fixed_trains(per_module: PerModule, layout: str) -> None:
    _check_per_module(per_module, layout)


@pytest.mark.slow
def test_every_row_fixed_under_fsdp2_trains(per_module: PerModule) -> None:
    _check_per_module(per_module, "every-row-fixed")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tie", "options"),
    [(False, []), (True, []), (False, ["--keep", "--offload"]), (True, ["--keep"])],
    ids=["untied", "tied", "untied-keep-offload", "tied-keep"],
)
def test_model_parallel_strategy_with_the_embedding_sharded_on_its_own(
    tie: bool, options: list[str], tmp_path: Path
) -> None:
    """``configure_model`` shards the constrained embedding itself (with its tied head), each
    group with ``reshard_after_forward`` True or False and with a CPUOffloadPolicy or none: the
    callback bakes it at the end of the fit into an FSDP2 module of the plain class."""
    flavour = "lightning.pytorch"
    more = ["--per-module", *options]
    ranks = _lightning_fit(flavour, 2, tmp_path / "fsdp", SCATTERED, tie, *more)
    (single,) = _lightning_fit(flavour, 1, tmp_path / "single", SCATTERED, tie)
    reference, fixed_at = single["reference"], single["rows"]
    for rank in ranks:
        assert rank["plain"]
        assert rank["dtensor"]
        assert rank["classes"][:3] == ["FSDPEmbedding", "FSDPModule", "Embedding"]
        assert torch.equal(rank["state_dict"]["embedding.weight"][fixed_at], reference)
        for key, value in rank["state_dict"].items():
            torch.testing.assert_close(value, single["state_dict"][key], rtol=1e-5, atol=1e-5)
    mean = sum(rank["val_loss"] for rank in ranks) / len(ranks)
    torch.testing.assert_close(mean, single["val_loss"], rtol=1e-4, atol=1e-5)


def _initial_embedding(fixed: int) -> torch.Tensor:
    """The embedding `fsdp_lightning_fit` starts from: seed 0, after a reference of `fixed` rows."""
    torch.manual_seed(0)
    torch.randn(fixed, 4)
    return nn.Embedding(10, 4).weight.detach()


def _check_lightning_ranks(
    ranks: list[dict[str, Any]], held: tuple[int, int], per_module: bool
) -> None:
    """Fixed rows exact in float32 on each rank, the ranks alike, the model baked into plain
    FSDP2 (the embedding in a group of its own or in the root's), and every row of it trained on
    after the fit."""
    reference, fixed_at = ranks[0]["reference"], ranks[0]["rows"]
    classes = ["FSDPEmbedding", "FSDPModule", "Embedding"] if per_module else ["Embedding"]
    for rank in ranks:
        assert rank["plain"]  # no parametrizations after the fit
        assert rank["dtensor"]
        assert rank["classes"][: len(classes)] == classes
        assert rank["held"] == held  # (reference, free) rows of this rank during the fit
        assert torch.equal(rank["state_dict"]["embedding.weight"][fixed_at], reference)
        assert {v.dtype for v in rank["state_dict"].values()} == {torch.float32}
        trained, after = rank["state_dict"]["embedding.weight"], rank["after"]["embedding.weight"]
        assert after.ne(trained).any(dim=1).all()  # each row, the once fixed ones too
    for stage in ("state_dict", "after"):
        for key, value in ranks[0][stage].items():
            assert torch.equal(ranks[1][stage][key], value), f"ranks differ in {stage} {key}"


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True], ids=["untied-per-module", "tied-per-module"])
def test_model_parallel_strategy_with_a_mixed_precision_policy(tie: bool, tmp_path: Path) -> None:
    """MixedPrecisionPolicy(bfloat16 parameters, float32 reduction) on every group: the fixed
    rows exact in float32, the rest as the same fit on one process (FSDP2 on a world of one,
    so that the policy applies there too).

    Two ranks compute each gradient over half the batch in bfloat16 (unit roundoff 2**-9, about
    2e-3), one process over all of it: the sums round apart, and 16 AdamW steps of lr 0.1 carry
    that into the weights. Measured 3.5e-3 at most (untied), 1.5e-3 (tied), 1.5e-3 for the mean
    validation loss; 1e-2, a few bfloat16 steps at these magnitudes (up to 2.3), leaves room,
    while the free rows moved from their initial values by far more.
    """
    flavour = "lightning.pytorch"
    more = ["--per-module", "--mixed", "--more", "1"]
    ranks = _lightning_fit(flavour, 2, tmp_path / "fsdp", SCATTERED, tie, *more)
    (single,) = _lightning_fit(flavour, 1, tmp_path / "single", SCATTERED, tie, *more)
    _check_lightning_ranks(ranks, held=(3, 2), per_module=True)
    for rank in [*ranks, single]:
        assert rank["loss_dtype"] == "torch.bfloat16"  # the policy casts the parameters
    for rank in ranks:
        for key, value in rank["state_dict"].items():
            torch.testing.assert_close(value, single["state_dict"][key], rtol=0, atol=1e-2, msg=key)
    mean = sum(rank["val_loss"] for rank in ranks) / len(ranks)
    torch.testing.assert_close(mean, single["val_loss"], rtol=0, atol=1e-2)
    free = [r for r in range(10) if r not in single["rows"]]
    moved = ranks[0]["state_dict"]["embedding.weight"][free]
    assert not torch.allclose(moved, _initial_embedding(6)[free], rtol=0, atol=1e-2)
    # After the bake (`--more`) 2 ranks and 1 process part by more than bfloat16 rounding: a
    # fresh AdamW's first steps are about lr each, whatever the size of the gradient. Not
    # compared; `_check_lightning_ranks` checks that each row trains on, on both ranks alike.


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fixed", "tie", "per_module"),
    [(10, False, True), (10, True, False), (0, False, True), (0, True, False)],
    ids=["every-row-per-module", "every-row-tied-root", "no-row-per-module", "no-row-tied-root"],
)
def test_model_parallel_strategy_with_every_row_or_no_row_fixed(
    fixed: int, tie: bool, per_module: bool, tmp_path: Path
) -> None:
    """A reference with as many rows as the weight, or none, through the callback: it trains.

    Every row fixed: the embedding stays the reference bit for bit (no free rows: an empty
    shard on each rank) while the head trains as on one process. No row fixed: the fit is the
    unconstrained model's, on the same 2 ranks, within 1e-5 (measured: equal). Both then bake
    into a plain FSDP2 model that evaluates and trains on, each row.
    """
    flavour = "lightning.pytorch"
    more = ["--fixed", str(fixed), "--more", "1", *(["--per-module"] if per_module else [])]
    ranks = _lightning_fit(flavour, 2, tmp_path / "fsdp", None, tie, *more)
    _check_lightning_ranks(ranks, held=(5, 0) if fixed else (0, 5), per_module=per_module)
    assert ranks[0]["reference"].shape == (fixed, 4)
    if fixed:  # against one process, as the layouts with some rows fixed
        (single,) = _lightning_fit(flavour, 1, tmp_path / "single", None, tie, *more)
        assert torch.equal(single["state_dict"]["embedding.weight"], single["reference"])
        oracles = [single] * len(ranks)
        # Each rank logs the mean over its own batches, and their mean is one process's.
        val_losses = [sum(rank["val_loss"] for rank in ranks) / len(ranks)]
        expected = [single["val_loss"]]
    else:  # against the unconstrained model, sharded alike: rank for rank
        more.append("--unconstrained")
        oracles = _lightning_fit(flavour, 2, tmp_path / "plain", None, tie, *more)
        assert [oracle["held"] for oracle in oracles] == [(-1, -1)] * 2  # no callback at all
        val_losses = [rank["val_loss"] for rank in ranks]
        expected = [oracle["val_loss"] for oracle in oracles]
    for rank, oracle in zip(ranks, oracles, strict=True):
        for stage in ("state_dict", "after"):
            for key, value in rank[stage].items():
                # Gradients meet in another order across ranks than within one process.
                torch.testing.assert_close(
                    value, oracle[stage][key], rtol=1e-5, atol=1e-5, msg=f"{stage} {key}"
                )
    torch.testing.assert_close(val_losses, expected, rtol=1e-5, atol=1e-5)
    if not fixed:  # every row trained during the fit
        trained = ranks[0]["state_dict"]["embedding.weight"]
        assert trained.ne(_initial_embedding(0)).any(dim=1).all()


def _assert_baked_into_plain_fsdp2(result: dict[str, Any]) -> None:
    for name, mro in result["classes"].items():
        plain = "Embedding" if name == "tok_embeddings" else "Linear"
        assert mro[:3] == [f"FSDP{plain}", "FSDPModule", plain], name


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    ["offload-reshard", "offload-keep", "accumulate-reshard", "accumulate-keep",
     "clip-reshard", "clip-keep"],
)  # fmt: skip
def test_per_module_with_offload_accumulation_or_clipping_trains_as_one_process(
    per_module: PerModule, layout: str
) -> None:
    """CPUOffloadPolicy, micro-batches without sync, clip_grad_norm_ over DTensors: before the
    bake and after, as one process trains the constrained model (fixed rows no parameters)."""
    import fsdp_per_module_fit as fit

    _, single = per_module
    for result in _check_per_module(per_module, layout):
        _assert_baked_into_plain_fsdp2(result)
        if layout.startswith("accumulate"):
            # Each micro-batch but the last left every shard without a gradient: not synced.
            assert result["unsynced"] == [True] * ((fit.STEPS + fit.MORE) * (fit.MICRO - 1))
        if layout.startswith("clip"):
            # One process's total norm over the same parameters: the fixed rows are none.
            norms = result["norms"] + result["more_norms"]
            expected = single[layout]["norms"] + single[layout]["more_norms"]
            assert len(norms) == fit.STEPS + fit.MORE
            torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0)
            assert min(norms) > fit.MAX_NORM  # every step clipped


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", ["bf16-reshard", "bf16-keep", "bf16-all-reshard", "bf16-all-keep"]
)
def test_per_module_mixed_precision_trains_as_the_unconstrained_model(
    per_module: PerModule, layout: str
) -> None:
    """MixedPrecisionPolicy(bfloat16 parameters, float32 reduction), alone and with CPU offload,
    accumulation without sync and clipping (``bf16-all-*``): the fixed rows exact in float32,
    the rest as an unconstrained FSDP2 model under the same policy trains (the oracle), whose
    fixed rows get no gradient (so no share of the clip's norm) and keep their values.

    The oracle gathers and multiplies the same bfloat16 values, so no bfloat16 rounding parts
    the two: only float32 sums taken in another order (the norm over other tensors), measured
    at 3e-8. 1e-5, as against one process in float32, leaves room and catches a wrong row.
    """
    import fsdp_per_module_fit as fit

    ranks, single = per_module
    assert layout not in single  # one process has no policy: the oracle is the reference
    tie, _, _, rows = fit.LAYOUTS[layout]
    refs = fit.references(layout)
    fixed = {"tok_embeddings.weight": rows} | ({} if tie else {"output.weight": fit.HEAD_ROWS})
    for result in (rank[layout] for rank in ranks):
        assert "error" not in result, result.get("error")
        oracle = result["oracle"]
        for key, value in result["initial"].items():
            assert torch.equal(oracle["initial"][key], value), key  # one model, two ways
        for kept in (result["stored"], result["baked_stored"]):  # FSDP2's shards
            assert set(kept.values()) == {"torch.float32"}
        for key, at in fixed.items():
            assert result["trained"][key].dtype == torch.float32
            assert torch.equal(result["trained"][key][at], refs[key]), key
            assert torch.equal(oracle["trained"][key][at], refs[key]), key  # frozen indeed
            # Trained on after the bake, as the oracle's unfrozen rows.
            assert not torch.equal(result["after"][key][at], refs[key]), key
        for stage in ("trained", "after"):
            assert list(result[stage]) == list(oracle[stage])  # plain keys, plain order
            for key, value in result[stage].items():
                torch.testing.assert_close(
                    value, oracle[stage][key], rtol=1e-5, atol=1e-5, msg=f"{stage} {key}"
                )
        torch.testing.assert_close(result["val_loss"], oracle["val_loss"], rtol=1e-5, atol=0)
        norms, expected = result["norms"], oracle["norms"]
        torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(result["more_norms"], oracle["more_norms"], rtol=1e-5, atol=0)
        if layout.startswith("bf16-all"):
            assert len(norms) == fit.STEPS
            assert min(norms + result["more_norms"]) > fit.MAX_NORM  # every step clipped
            assert result["unsynced"] == [True] * ((fit.STEPS + fit.MORE) * (fit.MICRO - 1))
        _assert_baked_into_plain_fsdp2(result)
    for stage in ("trained", "after"):
        for key, value in ranks[0][layout][stage].items():
            assert torch.equal(ranks[1][layout][stage][key], value), f"ranks differ in {key}"
