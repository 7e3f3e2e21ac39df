"""Tensor parallelism (`parallelize_fixed`): exact fixed rows on every rank, free rows as one process.

Two CPU processes (gloo) train a vocabulary-parallel model side by side with one process
(``tp_fit.py``), in plain PyTorch and through Lightning's ``ModelParallelStrategy``; in-process
tests on a one-rank group check the refusals.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.nn.utils import parametrize

from embedding_constraint import bake, fix_rows, is_fixed
from embedding_constraint.tensor_parallel import bake_parallelized, parallelize_fixed

SCRIPT = Path(__file__).with_name("tp_fit.py")
sys.path.insert(0, str(SCRIPT.parent))

import tp_fit

Runs = tuple[list[dict[str, Any]], dict[str, Any]]


def _run(command: list[str]) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # the ranks' own output is not under test
    done = subprocess.run(
        command, check=False, env=env, timeout=300, capture_output=True, text=True
    )
    if done.returncode:  # show why, not only that
        output = f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        raise AssertionError(f"{command} failed ({done.returncode}):\n{output}")


def _load(out: Path, world: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Every layout of `tp_fit`, on 2 tensor-parallel ranks and in one process, once."""
    out = tmp_path_factory.mktemp("tp")
    _run([sys.executable, str(SCRIPT), "--world", "2", "--out", str(out / "tp")])
    _run([sys.executable, str(SCRIPT), "--world", "1", "--out", str(out / "single")])
    (single,) = _load(out / "single", 1)
    return _load(out / "tp", 2), single


@pytest.fixture(scope="module")
def runs_2d(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every layout of `tp_fit` under 2-D FSDP2 x tensor parallel, on 4 ranks, once."""
    out = tmp_path_factory.mktemp("tp2d")
    _run([sys.executable, str(SCRIPT), "--world", "4", "--out", str(out)])
    return _load(out, 4)


def _fixed(layout: str) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Each constrained tensor's fixed rows and their values, in row order."""
    rows = tp_fit.LAYOUTS[layout][0]
    embedding, head = tp_fit.references(rows)
    at = list(range(embedding.shape[0])) if rows is None else rows
    order = sorted(range(len(at)), key=at.__getitem__)
    head_order = sorted(range(len(tp_fit.HEAD_ROWS)), key=tp_fit.HEAD_ROWS.__getitem__)
    return {
        "tok_embeddings.weight": (sorted(at), embedding[order]),
        "output.weight": (sorted(tp_fit.HEAD_ROWS), head.weight.detach()[head_order]),
        "output.bias": (sorted(tp_fit.HEAD_ROWS), head.bias.detach()[head_order]),
    }


def _check(state: dict[str, torch.Tensor], single: dict[str, torch.Tensor], layout: str) -> None:
    assert list(state) == list(single)  # plain keys, plain order
    for key, (rows, reference) in _fixed(layout).items():
        assert torch.equal(state[key][rows], reference), key
    for key, value in state.items():
        # Partial sums meet in another order across ranks than within one process.
        torch.testing.assert_close(value, single[key], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(tp_fit.LAYOUTS))
def test_tensor_parallel_trains_exactly_and_bakes(runs: Runs, layout: str) -> None:
    ranks, single = runs
    for rank in ranks:
        assert "error" not in rank[layout], rank[layout].get("error")
        result, alone = rank[layout], single[layout]
        torch.testing.assert_close(result["losses"], alone["losses"], rtol=1e-5, atol=1e-5)
        _check(result["trained"], alone["trained"], layout)
        # Baked: a plain tensor-parallel weight, which trains on as one process's plain one.
        assert result["plain"] == alone["plain"]
        torch.testing.assert_close(result["after"], alone["after"], rtol=1e-5, atol=1e-5)
    assert all(
        torch.equal(v, ranks[1][layout]["trained"][k])
        for k, v in ranks[0][layout]["trained"].items()
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [*tp_fit.LAYOUTS, *(f"{layout}/after" for layout in tp_fit.CONSTRAINED_AFTER)]
)
def test_second_derivatives_are_the_unconstrained_models(runs: Runs, layout: str) -> None:
    # A gradient penalty on 2 ranks and in one process, against the same weights without the
    # constraint in the same layout (torch's own tensor-parallel second derivatives are not
    # one process's). The fixed rows' second derivatives are zero (tp_fit checks them), the
    # free rows' and every other parameter's equal the unconstrained model's, in the model and
    # for the lookup read alone ("lookup": there torch keeps the lookup's second derivatives).
    ranks, single = runs
    for result in (*(rank[layout] for rank in ranks), single[layout.partition("/")[0]]):
        assert "error" not in result, result.get("error")
        assert list(result["penalty"]) == list(result["penalty_unconstrained"])
        assert any(v.abs().max() > 1e-3 for v in result["penalty"].values())  # not all zero
        torch.testing.assert_close(
            result["penalty"], result["penalty_unconstrained"], rtol=1e-6, atol=1e-6
        )


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(tp_fit.LAYOUTS))
def test_fully_shard_over_tensor_parallel_trains_exactly_and_bakes_into_its_groups(
    runs: Runs, runs_2d: list[dict[str, Any]], layout: str
) -> None:
    """2-D FSDP2 x tensor parallel: per-module groups (or the root alone), with and without
    resharding after the forward; the baked weights join the groups and train on."""
    _, single = runs
    per_module, _ = tp_fit.RECIPES_2D[layout]
    for rank, ranks in enumerate(runs_2d):
        result, alone = ranks[layout], single[layout]
        assert "error" not in result, result.get("error")
        # Split over the data-parallel ranks too: a half (3 or 2) of the rank's 5 rows.
        local, mesh_dims = result["stored"]
        assert mesh_dims == 2
        assert local == ((5, 2) if layout == "embedding-dim" else ((3, 4), (2, 4))[rank // 2])
        torch.testing.assert_close(result["losses"], alone["losses"], rtol=1e-5, atol=1e-5)
        _check(result["trained"], alone["trained"], layout)
        assert all(torch.equal(v, result["trained"][k]) for k, v in result["reloaded"].items())
        assert result["plain"] == alone["plain"]
        fsdp = ["FSDPEmbedding", "FSDPLinear"] if per_module else ["Embedding", "Linear"]
        assert result["classes"] == fsdp
        torch.testing.assert_close(
            result["more_losses"], alone["more_losses"], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(result["after"], alone["after"], rtol=1e-5, atol=1e-5)
        assert all(
            torch.equal(v, runs_2d[0][layout]["trained"][k]) for k, v in result["trained"].items()
        )


@pytest.mark.slow
@pytest.mark.parametrize("layout", tp_fit.HSDP)
def test_hsdp_per_module_trains_exactly_and_bakes(
    runs: Runs, runs_2d: list[dict[str, Any]], layout: str
) -> None:
    """fully_shard on a replicate x shard mesh (torchtitan's HSDP), the embedding and the head
    each in a group; ``prefix`` with its references sharded too (prepare_fully_shard)."""
    _, single = runs
    for ranks in runs_2d:
        result, alone = ranks[f"{layout}/hsdp"], single[layout]
        assert "error" not in result, result.get("error")
        assert result["stored"] == ["R", "S(0)"]  # replicated over one dimension, split over one
        torch.testing.assert_close(result["losses"], alone["losses"], rtol=1e-5, atol=1e-5)
        _check(result["trained"], alone["trained"], layout)
        assert result["plain"] == alone["plain"]
        torch.testing.assert_close(
            result["more_losses"], alone["more_losses"], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(result["after"], alone["after"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fully_shard_splitting_the_columns_of_a_column_split_weight_is_refused(
    runs_2d: list[dict[str, Any]],
) -> None:
    for ranks in runs_2d:
        assert "split further by rows only" in ranks["split-columns"]
        assert "shard_placement_fn must keep Shard(0)" in ranks["split-columns"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", tp_fit.CONSTRAINED_AFTER)
def test_fix_rows_on_a_tensor_parallel_model_matches_parallelize_fixed(
    runs: Runs, layout: str
) -> None:
    """parallelize_module first, then fix_rows on the shards: as fix_rows, then parallelize_fixed."""
    ranks, single = runs
    for rank in ranks:
        result, before = rank[f"{layout}/after"], rank[layout]
        assert "error" not in result, result.get("error")
        assert result["losses"] == before["losses"]
        assert all(torch.equal(v, before["trained"][k]) for k, v in result["trained"].items())
        _check(result["trained"], single[layout]["trained"], layout)
        assert result["plain"] == before["plain"]
        for name in ("tok_embeddings", "output"):  # each rank holds what parallelize_fixed gives it
            mine, theirs = result["held"][name], before["held"][name]
            assert mine["rows"] == theirs["rows"]
            assert torch.equal(mine["reference"], theirs["reference"])
        assert all(torch.equal(v, before["after"][k]) for k, v in result["after"].items())


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(tp_fit.LAYOUTS))
def test_state_dicts_load_back_whole_from_rank_0_or_sharded_and_a_changed_fixed_row_is_refused(
    runs: Runs, layout: str
) -> None:
    """``set_model_state_dict`` with a full state dict on every rank, with one on rank 0 alone
    (``broadcast_from_rank0``), and a sharded one whose fixed row rank 0 changed: refused on
    both ranks, the model left as it was; a sharded tensor of another shape is refused on both
    too, and a plain bfloat16 checkpoint (the reference rounded) loads."""
    ranks, _ = runs
    for rank in ranks:
        result = rank[layout]
        assert "error" not in result, result.get("error")
        trained, loads = result["trained"], result["loads"]
        for case in ("full", "broadcast", "after_tampered", "after_refused"):
            assert list(loads[case]) == list(trained), case
            assert all(torch.equal(v, trained[k]) for k, v in loads[case].items()), case
        assert "fixed rows of 'tok_embeddings.weight' to equal the reference" in loads["tampered"]
        assert "on at least one rank" in loads["tampered"]
        expected = f"expected a tensor of shape ({tp_fit.VOCAB}, {tp_fit.DIM}), got ({tp_fit.VOCAB - 2}, {tp_fit.DIM})"
        assert expected in loads["other_vocabulary"]
        # bfloat16: the free rows take the rounded values, the fixed rows stay the reference.
        for key, (rows, reference) in _fixed(layout).items():
            assert torch.equal(loads["bfloat16"][key][rows], reference), key
        rounded = {k: v.to(torch.bfloat16).float() for k, v in trained.items()}
        torch.testing.assert_close(loads["bfloat16"], rounded, rtol=0, atol=0.02)


@pytest.mark.slow
def test_each_rank_holds_its_vocabulary_slice_of_the_fixed_rows(runs: Runs) -> None:
    ranks, _ = runs
    rows, reference = _fixed("vocab-replicated-logits")["tok_embeddings.weight"]
    for rank, result in enumerate(ranks):
        held = result["vocab-replicated-logits"]["held"]["tok_embeddings"]
        assert held["stored_type"] == "DTensor"
        assert held["stored_local"] == (5, 4)
        assert held["weight_placements"] == ["S(0)"]
        assert held["keys"] == ["weight"]  # plain keys while constrained
        mine = [i for i, row in enumerate(rows) if rank * 5 <= row < rank * 5 + 5]
        assert held["rows"] == [rows[i] - rank * 5 for i in mine]
        assert torch.equal(held["reference"], reference[mine])
    # Split by the embedding dimension, every rank holds every fixed row, its columns.
    for rank, result in enumerate(ranks):
        held = result["embedding-dim"]["held"]["tok_embeddings"]
        assert held["rows"] == rows
        assert held["weight_placements"] == ["S(1)"]
        assert torch.equal(held["reference"], reference[:, rank * 2 : rank * 2 + 2])


@pytest.mark.slow
@pytest.mark.parametrize("data_parallel", [1, 2], ids=["tp", "fsdp2-x-tp"])
@pytest.mark.parametrize("by", ["parallelize_fixed", "callback"])
def test_model_parallel_strategy_tensor_parallel_matches_one_process(
    runs: Runs, tmp_path: Path, by: str, data_parallel: int
) -> None:
    """Constrained in __init__, or by EmbeddingConstraint at setup (then parallelize_fixed in
    configure_model shards the constrained modules, and the callback bakes at the end); with
    ``data_parallel=2``, configure_model also calls fully_shard on the embedding, the head
    and the model (2-D), and the bake puts the weights into their FSDP2 groups."""
    _, single = runs
    more = ["--callback"] if by == "callback" else []
    world = 2 * data_parallel
    command = [sys.executable, str(SCRIPT), "--world", str(world), "--lightning", *more]
    _run([*command, "--data-parallel", str(data_parallel), "--out", str(tmp_path)])
    alone = single["vocab-replicated-logits"]
    for rank, result in enumerate(_load(tmp_path, world)):
        assert result["weights"] == {"tok_embeddings": True, "output": True}
        assert not [n for n in result["plain"] if "parametrizations" in n]
        torch.testing.assert_close(result["losses"], alone["losses"], rtol=1e-5, atol=1e-5)
        _check(result["trained"], alone["trained"], "vocab-replicated-logits")
        _check(result["after_bake"], alone["trained"], "vocab-replicated-logits")
        # The rank's 5 rows of the head, split again over the data-parallel ranks.
        expected = (5, 4) if data_parallel == 1 else ((3, 4), (2, 4))[rank // 2]
        assert result["held"]["output"]["stored_local"] == expected


# -- refusals, in one process ------------------------------------------------------------


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embedding.weight


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "types": [type(m) for m in model.modules()],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def _same(model: nn.Module, before: dict[str, Any]) -> bool:
    after = _snapshot(model)
    return (
        after["types"] == before["types"]
        and list(after["params"]) == list(before["params"])
        and all(torch.equal(v, before["params"][k]) for k, v in after["params"].items())
    )


@pytest.mark.usefixtures("group")
def test_parallelize_module_after_fix_rows_fails_inside_torch() -> None:
    """The crash `parallelize_fixed` replaces (torch's partition walks dotted names)."""
    model = nn.Sequential(fix_rows(nn.Embedding(10, 4), torch.zeros(3, 4)))
    mesh = init_device_mesh("cpu", (1,))
    with pytest.raises(KeyError, match="parameter name can"):
        parallelize_module(model, mesh, {"0": RowwiseParallel(input_layouts=Replicate())})


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize(
    ("build", "plan", "error", "match"),
    [
        (
            lambda: fix_rows(_Tied(), torch.zeros(3, 4), name="embedding.weight"),
            {"embedding": RowwiseParallel(input_layouts=Replicate()), "head": ColwiseParallel()},
            ValueError,
            "tied to 2 modules.*unties them",
        ),
        (
            lambda: nn.Sequential(fix_rows(nn.EmbeddingBag(10, 4), torch.zeros(3, 4))),
            {"0": RowwiseParallel(input_layouts=Replicate())},
            ValueError,
            "Got RowwiseParallel on the constrained EmbeddingBag '0'",
        ),
        (
            lambda: nn.Sequential(fix_rows(nn.Embedding(10, 4), torch.zeros(3, 4))),
            {"0": object()},
            TypeError,
            "Expected `parallelize_plan` to be a ParallelStyle",
        ),
    ],
    ids=["tied", "embedding-bag", "not-a-plan"],
)
def test_unsupported_layouts_are_refused_before_anything_changes(
    build: Any, plan: Any, error: type[Exception], match: str
) -> None:
    model = build()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        parallelize_fixed(model, init_device_mesh("cpu", (1,)), plan)
    assert _same(model, before)


@pytest.mark.usefixtures("group")
def test_a_2d_mesh_and_a_parallelized_module_are_refused() -> None:
    model = nn.Sequential(fix_rows(nn.Embedding(10, 4), torch.zeros(3, 4)))
    plan = {"0": RowwiseParallel(input_layouts=Replicate())}
    with pytest.raises(ValueError, match=r"1-D DeviceMesh.*Got a 2-D DeviceMesh"):
        parallelize_fixed(model, init_device_mesh("cpu", (1, 1)), plan)
    mesh = init_device_mesh("cpu", (1,))
    parallelize_fixed(model, mesh, plan)
    with pytest.raises(ValueError, match="Expected a tensor constrained by parallelize_fixed"):
        bake_parallelized(nn.Linear(2, 2))


@pytest.mark.usefixtures("group")
def test_state_dict_is_plain_and_loading_checks_the_fixed_rows() -> None:
    reference = torch.randn(3, 4)
    model = nn.Sequential(fix_rows(nn.Embedding(10, 4), reference, rows=[7, 1, 4]))
    parallelize_fixed(
        model, init_device_mesh("cpu", (1,)), {"0": RowwiseParallel(input_layouts=Replicate())}
    )
    state = model.state_dict()
    assert list(state) == ["0.weight"]
    assert torch.equal(state["0.weight"].full_tensor()[[7, 1, 4]], reference)
    model.load_state_dict(state)  # its own state loads
    with torch.no_grad():
        state["0.weight"].to_local()[1] += 1
    with pytest.raises(RuntimeError, match=r"fixed rows of '0\.weight' to equal the reference"):
        model.load_state_dict(state)
    weight = model[0].weight
    assert isinstance(weight, DTensor)
    assert torch.equal(weight.full_tensor()[[7, 1, 4]], reference)
    assert is_fixed(model, "0.weight")
    assert not is_fixed(model, "0.bias")
    bake_parallelized(model)
    assert not is_fixed(model, "0.weight")


@pytest.mark.usefixtures("group")
# The vocabulary-parallel lookup's local output is a view; nothing here writes into it.
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor")
def test_fully_shard_over_tensor_parallel_reads_the_reference_outside_the_forward() -> None:
    """On a 1 x 1 mesh: the stored rows, split as FSDP2 splits them, read the reference."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    reference = torch.randn(3, 4)
    model = nn.Sequential(fix_rows(nn.Embedding(10, 4), reference, rows=[8, 1, 5]))
    parallelize_fixed(model, mesh["tp"], {"0": RowwiseParallel(input_layouts=Replicate())})
    fully_shard(model, mesh=mesh["dp"])
    model(torch.arange(10)).sum().backward()
    weight = model[0].weight
    assert isinstance(weight, DTensor)
    assert weight.device_mesh.ndim == 2
    assert torch.equal(weight.full_tensor()[[8, 1, 5]], reference)
    assert torch.equal(model.state_dict()["0.weight"].full_tensor()[[8, 1, 5]], reference)


def _vocabulary_parallel(vocab: int = 10) -> nn.Sequential:
    """An embedding and a head that torch's parallelize_module sharded by vocabulary (1 rank)."""
    model = nn.Sequential(nn.Embedding(vocab, 4), nn.Linear(4, vocab))
    plan = {"0": RowwiseParallel(input_layouts=Replicate()), "1": ColwiseParallel()}
    parallelize_module(model, init_device_mesh("cpu", (1,)), plan)
    return model


@pytest.mark.usefixtures("group")
def test_fix_rows_constrains_a_model_that_tensor_parallelism_sharded_first() -> None:
    model = _vocabulary_parallel()
    reference, head = torch.randn(3, 4), nn.Linear(4, 2)
    fix_rows(model[0], reference, rows=[8, 1, 5])
    fix_rows(model[1], head, rows=[0, 9])  # weight and bias
    assert all(is_fixed(model, name) for name in ("0.weight", "1.weight", "1.bias"))
    weight = model[0].weight
    assert isinstance(weight, DTensor)
    assert torch.equal(weight.full_tensor()[[8, 1, 5]], reference)
    assert list(model.state_dict()) == ["0.weight", "1.weight", "1.bias"]
    assert torch.equal(model.state_dict()["1.bias"].full_tensor()[[0, 9]], head.bias.detach())
    model(torch.arange(10)).sum().backward()
    stored = [p for n, p in model.named_parameters() if n.startswith("0.")]
    (grad,) = [p.grad for p in stored]
    assert isinstance(grad, DTensor)
    assert not grad.full_tensor()[[8, 1, 5]].any()  # the fixed rows are never read
    assert grad.full_tensor()[[0, 2]].abs().sum() > 0
    bake_parallelized(model)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "1.weight", "1.bias"]
    assert not any(is_fixed(model, name) for name in ("0.weight", "1.weight", "1.bias"))
    baked = model[0].weight
    assert isinstance(baked, DTensor)
    assert torch.equal(baked.full_tensor()[[8, 1, 5]], reference)


@pytest.mark.usefixtures("group")
def test_fix_rows_on_a_tied_tensor_parallel_pair_constrains_both_holders() -> None:
    """Hugging Face's tp_plan keeps a tied head tied (one DTensor Parameter): both read the
    constrained tensor, train one stored shard and stay tied through the bake."""
    model = _vocabulary_parallel()
    model[1].weight = model[0].weight  # tied, as transformers ties a sharded pair
    reference = torch.randn(3, 4)
    fix_rows(model, reference, name="0.weight", rows=[8, 1, 5])
    for holder in model:
        weight = holder.weight
        assert isinstance(weight, DTensor)
        assert torch.equal(weight.full_tensor()[[8, 1, 5]], reference)
    stored = [n for n, _ in model.named_parameters()]
    assert stored == ["0.parametrizations.weight.original", "1.bias"]  # once, as a tie
    assert list(model.state_dict()) == ["0.weight", "1.weight", "1.bias"]
    model[1](model[0](torch.arange(10))).sum().backward()
    bake(model)
    assert model[0].weight is model[1].weight
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "1.bias"]


def _two_d() -> tuple[nn.Module, str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    embedding = nn.Embedding(10, 4)
    mesh = init_device_mesh("cpu", (1, 1))
    weight = distribute_tensor(embedding.weight.detach(), mesh, [Replicate(), Shard(0)])
    embedding.weight = nn.Parameter(weight)
    return nn.Sequential(embedding), "0.weight", torch.zeros(3, 4)


def _bias_not_sharded() -> tuple[nn.Module, str | None, Any]:
    model = _vocabulary_parallel()
    model[1].bias = nn.Parameter(torch.zeros(10))
    return model[1], None, nn.Linear(4, 2)


def _wrong_width() -> tuple[nn.Module, str, Any]:
    return _vocabulary_parallel(), "0.weight", torch.zeros(3, 5)


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize(
    ("case", "match"),
    [
        (_two_d, r"tensor parallelism alone \(a 1-D mesh\).*2-D mesh: constrain it before"),
        (_bias_not_sharded, r"`module.bias` to be sharded by tensor parallelism.*Got a Parameter"),
        (_wrong_width, r"rows of shape \(4,\).*Got a reference of shape \(3, 5\)"),
    ],
    ids=["2-d", "bias-not-sharded", "wrong-width"],
)
def test_fix_rows_on_tensor_parallel_shards_refuses_before_anything_changes(
    case: Any, match: str
) -> None:
    module, name, reference = case()
    before = _snapshot(module)
    with pytest.raises(ValueError, match=match):
        fix_rows(module, reference, name=name, rows=[8, 1, 5] if name else [0, 9])
    assert _same(module, before)


def _parallel_embedding(model: nn.Module, mesh: Any) -> None:
    parallelize_fixed(model, mesh, {"0": RowwiseParallel(input_layouts=Replicate())})


@pytest.mark.usefixtures("group")
def test_bake_bakes_tensor_parallel_and_plain_constrained_tensors_together() -> None:
    """The embedding through parallelize_fixed, the head left out of the plan: bake(model)
    bakes both (it baked the head alone, and the embedding's fixed rows never trained)."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    fix_rows(model[0], torch.randn(3, 4))
    fix_rows(model[1], torch.randn(2, 4))
    _parallel_embedding(model, init_device_mesh("cpu", (1,)))
    bake(model)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "1.weight", "1.bias"]
    assert not parametrize.is_parametrized(model[0])
    assert not parametrize.is_parametrized(model[1])


@pytest.mark.usefixtures("group")
def test_bake_by_name_hands_a_tensor_parallel_tensor_to_bake_parallelized() -> None:
    model = nn.Sequential(nn.Embedding(10, 4))
    fix_rows(model[0], torch.randn(3, 4))
    _parallel_embedding(model, init_device_mesh("cpu", (1,)))
    with pytest.raises(ValueError, match="there is no submodule 'nope'"):
        bake_parallelized(model, name="nope.weight")
    bake(model, name="0.weight")
    assert [n for n, _ in model.named_parameters()] == ["0.weight"]
    assert isinstance(model[0].weight, DTensor)


@pytest.mark.usefixtures("group")
def test_a_copy_of_a_tensor_parallel_model_keeps_hooks_of_its_own() -> None:
    import copy

    reference = torch.randn(3, 4)
    model = nn.Sequential(nn.Embedding(10, 4))
    fix_rows(model[0], reference, rows=[8, 1, 5])
    _parallel_embedding(model, init_device_mesh("cpu", (1,)))
    twin = copy.deepcopy(model)
    bake_parallelized(twin)  # raised KeyError: the hooks were kept in a table by module
    assert list(twin.state_dict()) == ["0.weight"]
    assert parametrize.is_parametrized(model[0])  # the original is still constrained
    assert list(model.state_dict()) == ["0.weight"]
    weight = model.state_dict()["0.weight"]
    assert torch.equal(weight.full_tensor()[[8, 1, 5]], reference)


@pytest.mark.usefixtures("group")
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor")
def test_stored_rows_that_fully_shard_ignores_bake_as_tensor_parallel_ones() -> None:
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    reference = torch.randn(3, 4)
    fix_rows(model[0], reference)
    _parallel_embedding(model, mesh["tp"])
    stored = model.get_parameter("0.parametrizations.weight.original")
    fully_shard(model, mesh=mesh["dp"], ignored_params={stored})
    model(torch.arange(10)).sum().backward()
    bake(model)  # refused: "fully_shard was called on a module above `module`"
    weight = model[0].weight
    assert isinstance(weight, DTensor)
    assert weight.device_mesh.ndim == 1  # the tensor-parallel layout: FSDP2 ignores it
    assert torch.equal(weight.full_tensor()[:3], reference)
