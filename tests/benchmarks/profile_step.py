"""Where a constrained step's time goes: each variant's step alone (synced, synced with the
caches flushed before each step, and pipelined), and the operators of a few profiled steps.

Variants as in ``bench_step.py`` (``plain``, ``fixed-prefix``, ``fixed-scattered``) and
``free-only``: an unconstrained ``nn.Embedding`` of just the free rows, fed ``ids % free``,
the step no constraint can beat. Run from the repository root::

    python tests/benchmarks/profile_step.py --gpu-size --fractions 0.99 0.9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # the benchmark's builders, beside this file

VARIANTS = ("plain", "fixed-prefix", "fixed-scattered", "free-only")


def build(
    variant: str, inputs: bench_step.Inputs, config: bench_step.Config, optimizer: str
) -> tuple[bench_step.Trainer, int]:
    """Return the trainer and the number of rows its ids must stay below."""
    k = inputs.prefix.numel()
    if variant != "free-only":
        return bench_step.make_trainer(variant, inputs, config, optimizer), config.size.vocab
    rows = max(config.size.vocab - k, 1)
    emb = nn.Embedding(rows, config.size.dim, device=config.device, dtype=config.dtype)
    opt = bench_step.make_optimizer(list(emb.parameters()), optimizer)
    return bench_step.Trainer(variant, emb, opt, inputs.prefix[:0], inputs.probe), rows


def synced_ms(
    trainer: bench_step.Trainer,
    batches: list[torch.Tensor],
    device: torch.device,
    flush: torch.Tensor | None = None,
) -> float:
    """Median ms of single steps, synced around each; ``flush`` is written before each."""
    times = []
    for ids in batches:
        if flush is not None:
            flush.add_(1.0)  # evicts the step's data from the caches, untimed
        bench_step.synchronize(device)
        start = time.perf_counter()
        trainer.step(ids)
        bench_step.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def pipelined_ms(
    trainer: bench_step.Trainer, batches: list[torch.Tensor], device: torch.device
) -> float:
    """Mean ms of steps run back to back, synced once at the end."""
    bench_step.synchronize(device)
    start = time.perf_counter()
    for ids in batches:
        trainer.step(ids)
    bench_step.synchronize(device)
    return (time.perf_counter() - start) * 1e3 / len(batches)


def write_profile(
    trainer: bench_step.Trainer, batches: list[torch.Tensor], device: torch.device, name: str
) -> None:
    """Profile a few steps; write the operator table, by device time where there is one."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for ids in batches[:5]:
            trainer.step(ids)
        bench_step.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(name).write_text(prof.key_averages().table(sort_by=sort, row_limit=30))


def main() -> int:
    parser = argparse.ArgumentParser()
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--gpu-size", action="store_true")
    sizes.add_argument("--quick", action="store_true", help="a smoke test: tiny sizes")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.99, 0.9])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--profile", default="fixed-prefix", help="variant to profile (default AdamW); none: none"
    )
    parser.add_argument(
        "--flush-mib",
        type=int,
        default=256,
        help="also time steps with this many MiB written before each, to start every step "
        "with cold caches as in the interleaved benchmark (0: skip; default: %(default)s)",
    )
    args = parser.parse_args()
    size = (
        bench_step.GPU_SIZE
        if args.gpu_size
        else bench_step.QUICK_SIZE
        if args.quick
        else bench_step.CPU_SIZE
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = bench_step.Config(size, device, torch.float32, rounds=args.steps, warmup=3, seed=0)
    flush = torch.zeros(args.flush_mib * 2**18, device=device) if args.flush_mib else None
    print("| frozen | optimizer | variant | synced ms/step | synced, caches flushed | pipelined |")
    print("|---|---|---|---:|---:|---:|")
    for fraction in args.fractions:
        inputs = bench_step.make_inputs(config, round(fraction * size.vocab))
        for optimizer in bench_step.OPTIMIZERS:
            for variant in VARIANTS:
                trainer, limit = build(variant, inputs, config, optimizer)
                batches = [ids % limit for ids in inputs.batches]
                for ids in batches[:3]:
                    trainer.step(ids)
                timed = batches[3:]
                flushed = (
                    "-" if flush is None else f"{synced_ms(trainer, timed, device, flush):.2f}"
                )
                print(
                    f"| {fraction:g} | {optimizer} | {variant} | "
                    f"{synced_ms(trainer, timed, device):.2f} | {flushed} | "
                    f"{pipelined_ms(trainer, timed, device):.2f} |"
                )
                if variant == args.profile and optimizer == "adamw":
                    write_profile(trainer, timed, device, f"profile-{variant}-{fraction:g}.txt")
                del trainer
                bench_step.release_memory()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
