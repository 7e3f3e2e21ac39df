"""Time a constrained embedding's training step under DDP and FSDP2, and count what it sends.

One step is ``nn.Embedding`` forward on token ids drawn uniformly from the whole vocabulary,
the loss ``(out @ probe).sum()`` with a fixed random vector ``probe``, backward and an
``AdamW(lr=1e-3, weight_decay=0.01)`` step (the loss of ``bench_step.py``: the embedding and
the optimizer are what the step times). Each rank takes its own batch. The variants, each
built once in every rank:

- ``ddp plain`` / ``ddp fixed``: ``DistributedDataParallel`` around the plain module, and
  around one with ``fix_rows`` on the first ``frozen`` rows.
- ``fsdp2 plain`` / ``fsdp2 fixed``: ``fully_shard`` of the plain module, and of a constrained
  one whose reference ``prepare_fully_shard`` shards with the free rows;
  ``fsdp2 fixed, whole reference``: the same without it (every rank keeps the whole
  reference; FSDP2 gathers the free rows only).

All variants are warmed up, then timed round-robin, one step each per round, each step
starting at a barrier (so both ranks start it together) and timed on rank 0 until its
optimizer step returns; the table shows medians over rounds and, per round, the ratio to the
same strategy's ``plain`` step. Bytes per step and rank are counted by wrapping what the
strategies call: DDP's gradient all-reduce (a communication hook) and broadcasts, FSDP2's
all-gather (output size) and reduce-scatter (input size). Memory per rank at rest is the
bytes of the embedding's tensors that rank holds between steps: its parameters (its shard of
them, under FSDP2), the reference, and the optimizer's state.

Run from the repository root (2 processes, gloo, on the CPU)::

    python tests/benchmarks/bench_distributed.py --quick     # a smoke test, seconds
    python tests/benchmarks/bench_distributed.py             # V=20000, d=128: about a minute
    python tests/benchmarks/bench_distributed.py --device cuda --world 1   # one GPU, FSDP2
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.multiprocessing.spawn import spawn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: support

from support import in_process_group

from embedding_constraint import fix_rows
from embedding_constraint.fsdp import prepare_fully_shard


@dataclass(frozen=True)
class Config:
    vocab: int
    dim: int
    tokens: int  # per rank and step
    frozen: float
    rounds: int
    warmup: int
    device: str


class Traffic:
    """Bytes one rank hands to collectives, by kind, since the last `reset`."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    def add(self, kind: str, tensor: Tensor) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + tensor.numel() * tensor.element_size()

    def reset(self) -> dict[str, int]:
        counted, self.bytes = self.bytes, {}
        return counted


TRAFFIC = Traffic()


# What FSDP2 calls, by kind: the names, newest first, and the argument whose bytes count (the
# all-gather's output, the reduce-scatter's input). torch 2.13's FSDP2 calls the `_single` names
# (the older ones are deprecated aliases there); torch 2.8 has only the older ones.
_FSDP2_COLLECTIVES = {
    "all-gather": (("all_gather_single", "all_gather_into_tensor"), "output_tensor"),
    "reduce-scatter": (("reduce_scatter_single", "reduce_scatter_tensor"), "input"),
}


def _count_collectives() -> None:
    """Wrap the collectives FSDP2 and DDP call, so that `TRAFFIC` sees every byte once.

    Every name of `_FSDP2_COLLECTIVES` that this torch has is wrapped; a collective called from
    inside another wrapped one (an alias calling the function it stands for) is not counted again.
    """
    inside = threading.local()  # how deep this thread is in wrapped collectives

    def counted(name: str, kind: str, tensor_of: Callable[..., Tensor]) -> None:
        original: Callable[..., Any] = getattr(dist, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(inside, "depth", 0)
            if depth == 0:
                TRAFFIC.add(kind, tensor_of(*args, **kwargs))
            inside.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                inside.depth = depth

        setattr(dist, name, call)

    def argument_of(function: Callable[..., Any], argument: str) -> Callable[..., Tensor]:
        # FSDP2 passes them by position (2.13's all-gather) or by keyword (the others).
        signature = inspect.signature(function)
        return lambda *args, **kwargs: signature.bind(*args, **kwargs).arguments[argument]

    for kind, (names, argument) in _FSDP2_COLLECTIVES.items():
        present = [name for name in names if hasattr(dist, name)]
        if not present:
            raise RuntimeError(
                f"Expected torch.distributed to have one of {list(names)} (FSDP2's {kind}). "
                f"Got none of them in torch {torch.__version__}."
            )
        for name in present:
            counted(name, kind, argument_of(getattr(dist, name), argument))
    # DDP's broadcasts: a builtin, called as (group, tensors, buffer_size, authoritative_rank).
    counted(
        "_broadcast_coalesced",
        "broadcast",
        lambda group, tensors, *_: torch.cat([t.flatten() for t in tensors]),
    )


def _allreduce_hook(state: Any, bucket: Any) -> torch.futures.Future[Tensor]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    TRAFFIC.add("all-reduce", bucket.buffer())
    return default_hooks.allreduce_hook(state, bucket)


@dataclass
class Variant:
    name: str
    strategy: str
    model: nn.Module
    embedding: nn.Embedding
    optimizer: torch.optim.Optimizer
    times: list[float]
    traffic: dict[str, int]


def _embedding(config: Config, fixed: bool, seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    emb = nn.Embedding(config.vocab, config.dim, device=config.device)
    if fixed:
        k = int(config.vocab * config.frozen)
        fix_rows(emb, torch.randn(k, config.dim, device=config.device))
    return emb


def build(config: Config, world: int) -> list[Variant]:
    variants = []
    kinds = [("fsdp2", "plain"), ("fsdp2", "fixed"), ("fsdp2", "fixed, whole reference")]
    if world > 1:  # DDP of one process is no DDP
        kinds = [("ddp", "plain"), ("ddp", "fixed"), *kinds]
    for strategy, kind in kinds:
        emb = _embedding(config, fixed=kind != "plain")
        model: nn.Module
        if strategy == "ddp":
            model = DistributedDataParallel(emb)
            # (A lambda: DDP checks annotations, which this module keeps as strings.)
            model.register_comm_hook(None, lambda state, bucket: _allreduce_hook(state, bucket))
        else:
            if kind == "fixed":
                prepare_fully_shard(emb)
            fully_shard(emb)
            model = emb
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        variants.append(Variant(f"{strategy} {kind}", strategy, model, emb, optimizer, [], {}))
    return variants


def step(variant: Variant, ids: Tensor, probe: Tensor) -> None:
    variant.optimizer.zero_grad(set_to_none=True)
    (variant.model(ids) @ probe).sum().backward()
    variant.optimizer.step()


def _bytes(tensor: Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def at_rest(variant: Variant) -> int:
    """Bytes of the embedding this rank holds between steps: parameters, reference, state."""
    emb = variant.embedding
    held = sum(_bytes(p) for p in emb.parameters())
    plist = getattr(emb, "parametrizations", None)
    if plist is not None:
        constraint = plist.weight[0]
        if not constraint.reference_is_parameter:  # a plain tensor, not among the parameters
            held += _bytes(constraint.reference)
    for state in variant.optimizer.state.values():
        held += sum(_bytes(v) for v in state.values() if isinstance(v, Tensor) and v.dim())
    return held


def run_rank(rank: int, world: int, config: Config, store: str, out: str, json_out: str) -> None:
    if config.device == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if config.device == "cuda" else "gloo"
    in_process_group(
        lambda: measure(rank, world, config, out, json_out), backend, store, rank, world
    )


def measure(rank: int, world: int, config: Config, out: str, json_out: str) -> None:
    """Time every variant on this rank, side by side; rank 0 reports."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    _count_collectives()
    variants = build(config, world)
    generator = torch.Generator().manual_seed(1 + rank)
    probe = torch.randn(config.dim, generator=generator).to(config.device)

    def batch() -> Tensor:
        ids = torch.randint(0, config.vocab, (config.tokens,), generator=generator)
        return ids.to(config.device)

    for variant in variants:
        for _ in range(config.warmup):
            step(variant, batch(), probe)
    for round_ in range(config.rounds):
        for variant in variants:
            ids = batch()
            dist.barrier()
            TRAFFIC.reset()
            start = time.perf_counter()
            step(variant, ids, probe)
            if config.device == "cuda":
                torch.cuda.synchronize()
            variant.times.append(time.perf_counter() - start)
            counted = TRAFFIC.reset()
            if round_ == 0:
                variant.traffic = counted
    if rank == 0:
        report(config, world, variants, out, json_out)


def report(config: Config, world: int, variants: list[Variant], out: str, json_out: str) -> None:
    plain = {v.strategy: v for v in variants if v.name.endswith("plain")}
    lines = [
        (
            f"V={config.vocab}, d={config.dim}, {config.tokens} tokens per rank and step, "
            f"{config.frozen:.0%} of the rows fixed, AdamW(weight_decay=0.01), {world} "
            f"processes ({config.device}, torch {torch.__version__}), {config.rounds} rounds, "
            "medians."
        ),
        "",
        "| variant | step (ms) | / plain | sent per step and rank | at rest per rank |",
        "|---|---|---|---|---|",
    ]
    for variant in variants:
        base = plain[variant.strategy]
        ratios = [t / b for t, b in zip(variant.times, base.times, strict=True)]
        traffic = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in variant.traffic.items())
        lines.append(
            f"| {variant.name} | {statistics.median(variant.times) * 1e3:.1f} "
            f"| {statistics.median(ratios):.2f} | {traffic or 'nothing'} "
            f"| {at_rest(variant) / 2**20:.2f} MiB |"
        )
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    if json_out:
        results = {
            v.name: {
                "step_s": statistics.median(v.times),
                "bytes": v.traffic,
                "at_rest_bytes": at_rest(v),
            }
            for v in variants
        }
        Path(json_out).write_text(json.dumps({"config": asdict(config), "results": results}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke test")
    parser.add_argument("--world", type=int, default=2, help="processes (default: 2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--frozen", type=float, default=0.9, help="fraction of rows fixed")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default="", help="also write the table to this file")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.quick:
        config = Config(2000, 32, 256, args.frozen, args.rounds or 5, 1, args.device)
    elif args.device == "cuda":
        config = Config(131072, 4096, 16384, args.frozen, args.rounds or 20, 3, args.device)
    else:
        config = Config(20000, 128, 2048, args.frozen, args.rounds or 21, 3, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        spawn(run_rank, args=(args.world, config, store, args.out, args.json), nprocs=args.world)  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
