"""Load pretrained weights into a constrained model under FSDP2, the ways LLM stacks do (2 gloo
processes).

Run once by tests/test_fsdp_loading.py: ``--out DIR`` writes ``rank{r}.pt`` per rank (each case's
result: "ok" or what went wrong) and ``single.pt`` (the one-process side of the distributed
checkpoints). The process group's timeout is 60 s, so a rank waiting on a collective that another
rank never makes fails a case in a minute instead of hanging the test. Cases, for a prefix and
scattered fixed rows, with the reference whole and sharded (`prepare_fully_shard`):

- ``broadcast``: ``set_model_state_dict(..., broadcast_from_rank0=True)``, the full state dict on
  rank 0 only (torchtitan, torchtune), ``strict`` True and False; a changed fixed row refused
  on both ranks.
- ``full``: ``set_model_state_dict(..., full_state_dict=True)``, the full state dict on every rank.
- ``meta-read``: rank 0 sharded with values, rank 1 on the meta device; both call
  ``state_dict()`` (accelerate's ``fsdp2_load_full_state_dict`` replayed by hand), then that
  function itself loads rank 0's weights.
- ``accelerate``: accelerate's ``fsdp2_prepare_model`` with ``cpu_ram_efficient_loading``
  replayed step by step (rank 1 on meta, then every rank, ``fully_shard``, the load).
- ``dcp-2-to-1``, ``dcp-1-to-2``: a distributed checkpoint saved on 2 processes loads into one,
  and one saved in one process loads on 2; plain keys; a changed fixed row refused.
- ``torchtitan``: the model built on the meta device, constrained there, sharded,
  ``to_empty``, then the one-process checkpoint loaded, and a step taken.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.multiprocessing.spawn import spawn

sys.path.insert(0, str(Path(__file__).parent))

from fsdp_fit import Net, build, references

from embedding_constraint import fix_rows
from embedding_constraint.fsdp import prepare_fully_shard

WORLD = 2
SCATTERED = [9, 0, 4, 2, 7, 5]
# name: (fixed rows of the embedding and bag, reference sharded by prepare_fully_shard)
LAYOUTS: dict[str, tuple[list[int] | None, bool]] = {
    "prefix": (None, False),
    "scattered": (SCATTERED, False),
    "prefix-sharded": (None, True),
    "scattered-sharded": (SCATTERED, True),
}
REFUSED = "Expected the fixed rows of"


def fixed_rows(rows: list[int] | None) -> dict[str, list[int]]:
    """Where each constrained tensor of `fsdp_fit.Net` holds its fixed rows."""
    at = list(range(6)) if rows is None else sorted(rows)
    classifier = [0, 1, 2] if rows is None else [0, 2, 5]
    return {"embedding.weight": at, "head.weight": at, "bag.weight": at,
            "classifier.weight": classifier, "classifier.bias": classifier}  # fmt: skip


def pretrained(rows: list[int] | None) -> dict[str, Tensor]:
    """A full state dict to load: the model's own, every free value moved by 0.5."""
    net, _ = build(rows)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    fixed = fixed_rows(rows)
    for key, value in state.items():
        free = [r for r in range(value.shape[0]) if r not in fixed.get(key, [])]
        value[free] += 0.5
    state["head.weight"] = state["embedding.weight"]  # tied: one tensor under both keys
    return state


def with_a_fixed_row_changed(state: dict[str, Tensor], rows: list[int] | None) -> dict[str, Tensor]:
    bad = dict(state)
    changed = state["embedding.weight"].clone()
    changed[fixed_rows(rows)["embedding.weight"][0]] += 1.0
    bad["embedding.weight"] = bad["head.weight"] = changed
    return bad


def sharded(rows: list[int] | None, reference_sharded: bool, meta: bool = False) -> Net:
    net, _ = build(rows)
    if reference_sharded:
        prepare_fully_shard(net)
    if meta:
        net.to("meta")
    shard(net)
    return net


def shard(net: nn.Module) -> None:
    fully_shard(net.bag)  # type: ignore[arg-type]
    fully_shard(net.classifier)  # type: ignore[arg-type]
    fully_shard(net)  # the tied embedding and head: the root's group


def whole(net: nn.Module) -> dict[str, Tensor]:
    """The model's full state dict on this rank (every rank calls it)."""
    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, Tensor)}


def compare(got: dict[str, Tensor], expected: dict[str, Tensor]) -> str:
    if list(got) != list(expected):
        return f"keys {list(got)} != {list(expected)}"
    for key, value in expected.items():
        if got[key].is_meta or not torch.equal(got[key], value):
            return f"{key} differs"
    return "ok"


def refused(load: Callable[[], object]) -> str:
    try:
        load()
    except RuntimeError as error:
        if REFUSED in str(error):
            return "ok"
        return f"another error: {str(error).splitlines()[-1]}"
    return "a changed fixed row loaded"


def case_broadcast(rank: int, rows: list[int] | None, ref_sharded: bool, strict: bool) -> str:
    expected = pretrained(rows)
    net = sharded(rows, ref_sharded)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(net, dict(expected) if rank == 0 else {}, options=options)
    result = compare(whole(net), expected)
    if result != "ok":
        return result
    bad = with_a_fixed_row_changed(expected, rows)
    given: dict[str, Any] = bad if rank == 0 else {}
    return refused(lambda: set_model_state_dict(net, given, options=options))


def case_full(rank: int, rows: list[int] | None, ref_sharded: bool) -> str:
    expected = pretrained(rows)
    net = sharded(rows, ref_sharded)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(net, dict(expected), options=options)
    return compare(whole(net), expected)


def _accelerator(rank: int) -> SimpleNamespace:
    """What accelerate's loading function asks of its Accelerator."""
    return SimpleNamespace(is_main_process=rank == 0, device=torch.device("cpu"))


def case_meta_read(rank: int, rows: list[int] | None, ref_sharded: bool) -> str:
    from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict

    expected = pretrained(rows)
    net = sharded(rows, ref_sharded, meta=rank != 0)
    state = net.state_dict()  # every rank: rank 0 with values, rank 1 meta
    if list(state) != list(expected):
        return f"keys {list(state)}"
    weight = state["embedding.weight"]
    if not isinstance(weight, DTensor) or weight.shape != expected["embedding.weight"].shape:
        return f"a state-dict weight of {type(weight).__name__} {tuple(weight.shape)}"
    fsdp2_load_full_state_dict(_accelerator(rank), net, expected if rank == 0 else {})
    return compare(whole(net), expected)


def case_accelerate(rank: int, rows: list[int] | None, ref_sharded: bool) -> str:
    """`fsdp2_prepare_model` with `cpu_ram_efficient_loading`, step by step."""
    from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict

    expected = pretrained(rows)
    net, _ = build(rows)
    if rank == 0:
        net.load_state_dict(expected)  # only rank 0 loads the checkpoint
    if ref_sharded:
        prepare_fully_shard(net)
    if rank != 0:
        net.to("meta")
    original = net.state_dict()
    net.to("meta")
    shard(net)
    fsdp2_load_full_state_dict(_accelerator(rank), net, original)
    return compare(whole(net), expected)


def case_dcp_2_to_1(out: Path, rows: list[int] | None, ref_sharded: bool, layout: str) -> str:
    """Save on 2 ranks (the one-process load runs in `main`, after the ranks)."""
    net = sharded(rows, ref_sharded)
    full: dict[str, Any] = pretrained(rows)
    set_model_state_dict(net, full, options=StateDictOptions(full_state_dict=True))
    dcp.save(get_model_state_dict(net), checkpoint_id=str(out / f"dcp2-{layout}"))  # type: ignore[attr-defined]
    return "ok"


def case_dcp_1_to_2(out: Path, rows: list[int] | None, ref_sharded: bool, layout: str) -> str:
    """Load on 2 ranks what `main` saved in one process; then a changed fixed row."""
    net = sharded(rows, ref_sharded)
    state = get_model_state_dict(net)
    dcp.load(state, checkpoint_id=str(out / f"dcp1-{layout}"))  # type: ignore[attr-defined]
    set_model_state_dict(net, state)
    result = compare(whole(net), pretrained(rows))
    if result != "ok":
        return result
    state = get_model_state_dict(net)
    dcp.load(state, checkpoint_id=str(out / f"dcp1-bad-{layout}"))  # type: ignore[attr-defined]
    return refused(lambda: set_model_state_dict(net, state))


def case_torchtitan(out: Path, rows: list[int] | None, ref_sharded: bool, layout: str) -> str:
    """torchtitan's order: the model built on the meta device and constrained there (the
    reference holds values), each module sharded, ``to_empty``, then the distributed
    checkpoint that `main` saved in one process loaded; a step keeps the fixed rows."""
    refs = references()  # values, on the CPU
    with torch.device("meta"):
        net = Net()
    fix_rows(net, refs["embedding"], name="embedding.weight", rows=rows)
    fix_rows(net.bag, refs["bag"], rows=rows)
    fix_rows(net.classifier, refs["classifier"], rows=None if rows is None else [5, 0, 2])
    if ref_sharded:
        prepare_fully_shard(net)
    shard(net)
    net.to_empty(device="cpu")
    state = get_model_state_dict(net)
    dcp.load(state, checkpoint_id=str(out / f"dcp1-{layout}"))  # type: ignore[attr-defined]
    set_model_state_dict(net, state)
    expected = pretrained(rows)
    result = compare(whole(net), expected)
    if result != "ok":
        return result
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    net(torch.arange(6).view(2, 3)).backward()
    optimizer.step()
    after = whole(net)
    for key, fixed in fixed_rows(rows).items():
        if not torch.equal(after[key][fixed], expected[key][fixed]):
            return f"{key}: a fixed row moved in the step"
    return "ok"


def run_rank(rank: int, out: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'group'}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict[str, str] = {}
    cases: dict[str, Callable[[list[int] | None, bool, str], str]] = {
        "broadcast": lambda r, s, _: case_broadcast(rank, r, s, strict=True),
        "broadcast-lenient": lambda r, s, _: case_broadcast(rank, r, s, strict=False),
        "full": lambda r, s, _: case_full(rank, r, s),
        "meta-read": lambda r, s, _: case_meta_read(rank, r, s),
        "accelerate": lambda r, s, _: case_accelerate(rank, r, s),
        "dcp-2-to-1-save": lambda r, s, layout: case_dcp_2_to_1(out, r, s, layout),
        "dcp-1-to-2": lambda r, s, layout: case_dcp_1_to_2(out, r, s, layout),
        "torchtitan": lambda r, s, layout: case_torchtitan(out, r, s, layout),
    }
    order = [(n, layout) for layout in LAYOUTS for n in cases]
    for name, layout in order:
        rows, ref_sharded = LAYOUTS[layout]
        case = cases[name]
        try:
            result = case(rows, ref_sharded, layout)
        except Exception as error:  # noqa: BLE001  # the test shows what failed
            line = traceback.format_exception_only(error)[-1].strip()
            result = f"{type(error).__name__}: {line[:300]}"
        results[f"{name}/{layout}"] = result
        torch.save(results, out / f"rank{rank}.part")
        os.replace(out / f"rank{rank}.part", out / f"rank{rank}.pt")  # whole, even if killed
        if not _all_ok(result):
            # The ranks may now be apart (one waiting in a collective the other left):
            # every later case would fail for that reason. Stop, keeping what is known.
            os._exit(0)
    dist.barrier()
    dist.destroy_process_group()


def _all_ok(result: str) -> bool:
    """Whether every rank's case passed (one small collective); False if that fails too."""
    try:
        every: list[object] = [None] * WORLD
        dist.all_gather_object(every, result)
    except Exception:  # noqa: BLE001  # the group is broken: a rank timed out or left
        return False
    return all(r == "ok" for r in every)


def single_process(out: Path) -> dict[str, str]:
    """The one-process side: save what the ranks load, load what they saved."""
    results: dict[str, str] = {}
    for layout, (rows, _) in LAYOUTS.items():
        net, _ = build(rows)
        expected = pretrained(rows)
        net.load_state_dict(expected)
        dcp.save(net.state_dict(), checkpoint_id=str(out / f"dcp1-{layout}"))  # type: ignore[attr-defined]
        bad = with_a_fixed_row_changed(expected, rows)
        plain = Net()  # an unconstrained model writes the changed fixed row
        plain.load_state_dict(bad)
        dcp.save(plain.state_dict(), checkpoint_id=str(out / f"dcp1-bad-{layout}"))  # type: ignore[attr-defined]
    return results


def load_in_one_process(out: Path) -> dict[str, str]:
    results = {}
    for layout, (rows, _) in LAYOUTS.items():
        path = out / f"dcp2-{layout}"
        if not path.exists():
            results[f"dcp-2-to-1/{layout}"] = "not saved"
            continue
        keys = list(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        net, _ = build(rows)
        state = net.state_dict()
        dcp.load(state, checkpoint_id=str(path))  # type: ignore[attr-defined]
        net.load_state_dict(state)
        expected = pretrained(rows)
        result = compare({k: v.detach() for k, v in net.state_dict().items()}, expected)
        if sorted(keys) != sorted(expected):
            result = f"checkpoint keys {sorted(keys)}"
        results[f"dcp-2-to-1/{layout}"] = result
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    single_process(args.out)
    try:
        spawn(run_rank, args=(args.out,), nprocs=WORLD)  # type: ignore[no-untyped-call]
    except Exception:  # noqa: BLE001  # each rank saved its results so far: the test shows them
        traceback.print_exc()
    torch.save(load_in_one_process(args.out), args.out / "single.pt")


if __name__ == "__main__":
    main()
