"""Where a constrained step's time goes: step times with and without a sync per step, and
the kernels and operators of a few profiled steps.

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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu-size", action="store_true")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.99, 0.9])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", default="fixed-prefix")
    args = parser.parse_args()
    size = bench_step.GPU_SIZE if args.gpu_size else bench_step.CPU_SIZE
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = bench_step.Config(size, device, torch.float32, rounds=args.steps, warmup=3, seed=0)
    sync = bench_step.synchronize
    print("| frozen | optimizer | variant | synced ms/step | pipelined ms/step |")
    print("|---|---|---|---:|---:|")
    for fraction in args.fractions:
        k = round(fraction * size.vocab)
        inputs = bench_step.make_inputs(config, k)
        for optimizer in bench_step.OPTIMIZERS:
            for variant in VARIANTS:
                trainer, limit = build(variant, inputs, config, optimizer)
                batches = [ids % limit for ids in inputs.batches]
                for ids in batches[:3]:
                    trainer.step(ids)
                synced = []
                for ids in batches[3:]:
                    sync(device)
                    start = time.perf_counter()
                    trainer.step(ids)
                    sync(device)
                    synced.append((time.perf_counter() - start) * 1e3)
                sync(device)
                start = time.perf_counter()
                for ids in batches[3:]:
                    trainer.step(ids)
                sync(device)
                pipelined = (time.perf_counter() - start) * 1e3 / len(batches[3:])
                print(
                    f"| {fraction:g} | {optimizer} | {variant} | "
                    f"{statistics.median(synced):.2f} | {pipelined:.2f} |"
                )
                if variant == args.profile and optimizer == "adamw":
                    activities = [ProfilerActivity.CPU]
                    if device.type == "cuda":
                        activities.append(ProfilerActivity.CUDA)
                    with profile(activities=activities) as prof:
                        for ids in batches[3:8]:
                            trainer.step(ids)
                        sync(device)
                    sort = (
                        "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                    )
                    profiles = prof.key_averages().table(sort_by=sort, row_limit=30)
                    Path(f"profile-{variant}-{fraction:g}.txt").write_text(profiles)
                del trainer
                bench_step.release_memory()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
