"""Time one embedding training step with and without fixed rows, and its peak memory.

One step is ``nn.Embedding`` forward on token ids drawn uniformly from the whole vocabulary,
the loss ``(out @ probe).float().sum()`` with a fixed random vector ``probe`` (one read of the
output forward, one write of its gradient backward: the least any loss costs, so the
embedding and the optimizer are what the step times), backward and an
``AdamW(lr=1e-3, weight_decay=0.01)`` step, for the default AdamW and ``fused=True``.
The variants:

- ``plain``: no constraint, the baseline; its fixed rows drift.
- ``overwrite``: plain module; the reference rows (kept on the device) are copied back
  into the weight after every step.
- ``overwrite-host``: the same with the reference on the host (pinned on CUDA), copied over
  every step, as the old tool did.
- ``gradmask``: plain module; a tensor hook zeroes the fixed rows' gradient. AdamW's weight
  decay still moves them.
- ``fixed-prefix``: ``fix_rows(emb, reference)``, the first ``k`` rows fixed.
- ``fixed-scattered``: ``fix_rows(emb, reference, rows=...)`` with ``k`` seeded random rows.

All variants of one (frozen fraction, optimizer) cell are built once, warmed up, then timed
round-robin, one step each per round, so that drift of a shared machine hits them alike; the
table shows medians over rounds and the ratio to ``plain`` of the same round set. Peak memory
is measured with each variant alone in a fresh process (this script again, with the hidden
``--measure-memory`` flag): on CPU the increase of the peak resident set size (Linux ``VmHWM``,
reset after building the inputs; ``ru_maxrss`` elsewhere), on CUDA
``torch.cuda.max_memory_allocated``, over the memory in use once the inputs are built. Two
peaks: while training (three steps, after the variant is built; the module, its optimizer
state, gradients and activations) and while building (registering the constraint copies the
weight once).
``--compile`` adds ``torch.compile`` of the forward and loss for ``plain`` and the constrained
variants at one fraction.

Run from the repository root::

    python tests/benchmarks/bench_step.py --quick          # smoke test, under a minute
    python tests/benchmarks/bench_step.py --json out.json  # CPU size, minutes on 2 cores
    python tests/benchmarks/bench_step.py --gpu-size --compile
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from embedding_constraint import fix_rows

VARIANTS = ("plain", "overwrite", "overwrite-host", "gradmask", "fixed-prefix", "fixed-scattered")
COMPILE_VARIANTS = ("plain", "fixed-prefix", "fixed-scattered")
OPTIMIZERS = {"adamw": "AdamW (default)", "adamw-fused": "AdamW (fused=True)"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LR = 1e-3
WEIGHT_DECAY = 0.01
MIB = 2**20
BAG_SIZE = 8  # tokens per bag with --layer bag


@dataclass(frozen=True)
class Size:
    """Vocabulary rows, embedding width and tokens per batch."""

    vocab: int
    dim: int
    tokens: int


CPU_SIZE = Size(vocab=20_000, dim=256, tokens=4096)
GPU_SIZE = Size(vocab=131_072, dim=4096, tokens=16_384)
QUICK_SIZE = Size(vocab=2000, dim=32, tokens=256)


@dataclass(frozen=True)
class Config:
    """Everything a measurement depends on; the memory subprocess gets the same."""

    size: Size
    device: torch.device
    dtype: torch.dtype
    rounds: int
    warmup: int
    seed: int
    # "embedding"; "bag": an nn.EmbeddingBag(mode="mean") over bags of BAG_SIZE tokens;
    # "linear": an output head, (tokens, dim) -> (tokens, vocab).
    layer: str = "embedding"


@dataclass
class Inputs:
    """What every variant of a cell starts from: the same weight, rows and batches."""

    init: Tensor  # (vocab, dim) on the device: the starting weight, fixed rows included
    prefix: Tensor  # the first k rows, int64 on the device
    scattered: Tensor  # k seeded random rows, int64 on the device
    batches: list[Tensor]  # token ids (or head inputs) on the device, per warmup step and round
    probe: Tensor  # the loss is (out @ probe).sum(): one value per token


def make_inputs(config: Config, k: int) -> Inputs:
    """Build the starting weight, the fixed-row positions and the token batches, seeded."""
    size, device = config.size, config.device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    # Straight in the target dtype: a float32 detour would raise the CPU memory baseline.
    init = torch.randn(size.vocab, size.dim, generator=generator, device=device, dtype=config.dtype)
    cpu_generator = torch.Generator().manual_seed(config.seed + 1)
    scattered = torch.randperm(size.vocab, generator=cpu_generator)[:k].to(device)
    steps = range(config.warmup + config.rounds)
    if config.layer == "linear":
        batches = [
            torch.randn(
                size.tokens, size.dim, generator=generator, device=device, dtype=config.dtype
            )
            for _ in steps
        ]
    else:
        shape = (size.tokens // BAG_SIZE, BAG_SIZE) if config.layer == "bag" else (size.tokens,)
        batches = [
            torch.randint(0, size.vocab, shape, generator=generator, device=device) for _ in steps
        ]
    prefix = torch.arange(k, device=device)
    width = size.vocab if config.layer == "linear" else size.dim
    probe = torch.randn(width, generator=generator, device=device, dtype=config.dtype)
    probe /= width**0.5
    return Inputs(init=init, prefix=prefix, scattered=scattered, batches=batches, probe=probe)


class Trainer:
    """One variant: its module, optimizer and training step, and where its fixed rows are."""

    def __init__(
        self,
        name: str,
        module: nn.Embedding | nn.EmbeddingBag | nn.Linear,
        optimizer: torch.optim.Optimizer,
        rows: Tensor,
        probe: Tensor,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.optimizer = optimizer
        self.rows = rows
        self.probe = probe
        self.after_step = after_step
        self.compiled_loss: Callable[[Tensor], Tensor] | None = None

    def eager_loss(self, ids: Tensor) -> Tensor:
        """Return the loss of one batch, computed eagerly."""
        out: Tensor = self.module(ids)
        return (out @ self.probe).float().sum()

    def step(self, ids: Tensor) -> None:
        """Take one training step on ``ids``."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.eager_loss(ids) if self.compiled_loss is None else self.compiled_loss(ids)
        torch.autograd.backward(loss)
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step()

    @torch.no_grad()
    def exact(self, init: Tensor) -> bool:
        """Return whether the fixed rows still equal their starting values bit for bit."""
        weight: Tensor = self.module.weight
        return torch.equal(weight.index_select(0, self.rows), init.index_select(0, self.rows))


def make_optimizer(params: Sequence[nn.Parameter], optimizer: str) -> torch.optim.Optimizer:
    """Return the AdamW that ``optimizer`` names."""
    fused = True if optimizer == "adamw-fused" else None
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=fused)


def make_trainer(variant: str, inputs: Inputs, config: Config, optimizer: str) -> Trainer:
    """Build ``variant`` from ``inputs``; errors from the library propagate."""
    size, device = config.size, config.device
    emb: nn.Embedding | nn.EmbeddingBag | nn.Linear
    if config.layer == "linear":
        emb = nn.Linear(size.dim, size.vocab, bias=False, device=device, dtype=config.dtype)
    elif config.layer == "bag":
        emb = nn.EmbeddingBag(size.vocab, size.dim, device=device, dtype=config.dtype)
    else:
        emb = nn.Embedding(size.vocab, size.dim, device=device, dtype=config.dtype)
    with torch.no_grad():
        emb.weight.copy_(inputs.init)
    rows = inputs.scattered if variant == "fixed-scattered" else inputs.prefix
    k = rows.numel()
    after_step: Callable[[], None] | None = None
    if variant in ("overwrite", "overwrite-host"):
        if variant == "overwrite":
            reference = inputs.init[:k].clone()
        else:
            reference = inputs.init[:k].to("cpu", copy=True)
            if device.type == "cuda":
                reference = reference.pin_memory()
        weight = emb.weight
        non_blocking = reference.device != device

        @torch.no_grad()
        def overwrite() -> None:
            weight[:k].copy_(reference, non_blocking=non_blocking)

        after_step = overwrite
    elif variant == "gradmask":

        def mask(grad: Tensor) -> Tensor:
            # A hook must not change its argument in place; return a masked copy.
            masked = grad.clone()
            masked[:k] = 0
            return masked

        emb.weight.register_hook(mask)  # type: ignore[no-untyped-call]  # unannotated in torch
    elif variant == "fixed-prefix":
        fix_rows(emb, inputs.init[:k])
    elif variant == "fixed-scattered":
        fix_rows(emb, inputs.init.index_select(0, rows), rows=rows)
    elif variant != "plain":
        raise ValueError(f"Expected a variant in {VARIANTS}. Got {variant!r}.")
    opt = make_optimizer(list(emb.parameters()), optimizer)
    return Trainer(variant, emb, opt, rows, inputs.probe, after_step)


def fused_unsupported(config: Config) -> str | None:
    """Return why ``AdamW(fused=True)`` cannot run on this device and dtype, or ``None``."""
    param = nn.Parameter(torch.zeros(2, 2, device=config.device, dtype=config.dtype))
    try:
        opt = make_optimizer([param], "adamw-fused")
        param.grad = torch.zeros_like(param)
        opt.step()
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    trainers: Sequence[Trainer], inputs: Inputs, config: Config, *, skip_warmup: bool = False
) -> dict[str, list[float]]:
    """Warm up, then time ``rounds`` rounds of one step per trainer; return ms per step."""
    if not skip_warmup:
        for ids in inputs.batches[: config.warmup]:
            for trainer in trainers:
                trainer.step(ids)
    times: dict[str, list[float]] = {trainer.name: [] for trainer in trainers}
    for round_index, ids in enumerate(inputs.batches[config.warmup :]):
        # Rotate the order, and reverse it every other round, so that no variant always runs
        # first or right after the same neighbour (whose memory traffic it would inherit).
        shift = round_index % len(trainers)
        order = [*trainers[shift:], *trainers[:shift]]
        for trainer in order[::-1] if round_index % 2 else order:
            synchronize(config.device)
            start = time.perf_counter()
            trainer.step(ids)
            synchronize(config.device)
            times[trainer.name].append((time.perf_counter() - start) * 1e3)
    return times


@dataclass
class Cell:
    """Results for one frozen fraction and optimizer."""

    fraction: float
    optimizer: str
    k: int
    ms: dict[str, list[float]] = field(default_factory=dict)
    median_ms: dict[str, float] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)
    exact: dict[str, bool] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)
    peak_host_mib: dict[str, float] = field(default_factory=dict)
    setup_peak_mib: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    compile_status: dict[str, str] = field(default_factory=dict)


def release_memory() -> None:
    """Free the last cell's variants before the next are built (compiled ones sit in cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(cell: Cell, baseline: str) -> None:
    """Fill medians and ratios to ``baseline`` from the per-round times."""
    cell.median_ms = {name: statistics.median(ms) for name, ms in cell.ms.items()}
    if baseline in cell.median_ms:
        base = cell.median_ms[baseline]
        cell.ratio = {name: ms / base for name, ms in cell.median_ms.items()}


def start_cell(config: Config, fraction: float, optimizer: str) -> tuple[Cell, Inputs]:
    """Return an empty cell for ``fraction`` and ``optimizer``, and its inputs."""
    k = round(fraction * config.size.vocab)
    return Cell(fraction=fraction, optimizer=optimizer, k=k), make_inputs(config, k)


def build(variant: str, inputs: Inputs, config: Config, cell: Cell) -> Trainer | None:
    """Build ``variant`` for ``cell``; a library error is recorded in the cell instead."""
    try:
        return make_trainer(variant, inputs, config, cell.optimizer)
    except (ValueError, TypeError, RuntimeError) as error:
        cell.errors[variant] = f"{type(error).__name__}: {error}"
        return None


def run_cell(config: Config, fraction: float, optimizer: str) -> Cell:
    """Build every variant of one cell, time them interleaved and check exactness."""
    cell, inputs = start_cell(config, fraction, optimizer)
    trainers = []
    for variant in VARIANTS:
        trainer = build(variant, inputs, config, cell)
        if trainer is not None:
            trainers.append(trainer)
    cell.ms = time_interleaved(trainers, inputs, config)
    cell.exact = {trainer.name: trainer.exact(inputs.init) for trainer in trainers}
    summarize(cell, "plain")
    return cell


def compile_trainer(trainer: Trainer, ids: Tensor) -> str:
    """Compile the trainer's forward and loss and take its first step; return the outcome.

    Tries one graph first (``fullgraph=True``) so that graph breaks are reported, then lets
    dynamo break the graph. On failure the trainer is left eager and the error is returned.
    """
    failures = []
    for fullgraph in (True, False):
        trainer.compiled_loss = torch.compile(trainer.eager_loss, fullgraph=fullgraph)
        try:
            trainer.step(ids)
        except Exception as error:  # noqa: BLE001 - any compiler error is a result to report
            failures.append(f"{type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        return "ok" if fullgraph else f"ok with graph breaks ({failures[0]})"
    trainer.compiled_loss = None
    return "failed: " + " / ".join(failures)


def run_compile_cell(config: Config, fraction: float, optimizer: str) -> Cell:
    """Time eager and compiled steps of ``plain`` and the constrained variants at one fraction."""
    cell, inputs = start_cell(config, fraction, optimizer)
    trainers = []
    for variant in COMPILE_VARIANTS:
        for compiled in (False, True):
            trainer = build(variant, inputs, config, cell)
            if trainer is None:
                break
            if compiled:
                trainer.name = f"{variant} compiled"
                cell.compile_status[variant] = compile_trainer(trainer, inputs.batches[0])
            trainers.append(trainer)
    for ids in inputs.batches[: config.warmup]:
        for trainer in trainers:
            trainer.step(ids)
    cell.ms = time_interleaved(trainers, inputs, config, skip_warmup=True)
    cell.exact = {trainer.name: trainer.exact(inputs.init) for trainer in trainers}
    summarize(cell, "plain")
    # Dynamo guards on the module each compiled closure reads; start the next cell afresh
    # rather than pile recompilations up to the cache limit.
    torch._dynamo.reset()
    return cell


def _proc_status_bytes(key: str) -> int | None:
    """Return a ``kB`` entry of ``/proc/self/status`` in bytes, or ``None`` off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return None


def host_peak_bytes() -> int:
    """Return this process's peak resident set size in bytes.

    Linux's ``VmHWM`` where there is one. Not ``ru_maxrss``: Linux carries the parent's peak
    over fork and exec into the child's ``ru_maxrss``, so a memory subprocess started by a
    large benchmark process would read the parent's peak and see no increase at all.
    """
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource  # Unix only; only this fallback needs it

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def reset_host_peak() -> int:
    """Lower the peak-RSS mark to the current RSS where Linux allows it; return the mark.

    Transient peaks while importing and building inputs would otherwise hide part of the
    variant's increase.
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return host_peak_bytes()


def measure_memory(config: Config, variant: str, fraction: float, optimizer: str) -> dict[str, Any]:
    """Return the peak memory of ``variant`` over a few steps, relative to its inputs."""
    # Build and step a tiny copy first: creating the optimizer imports torch._dynamo (some
    # 70 MiB on CPU) and the first steps start thread pools, none of which is the variant's.
    tiny = replace(config, size=Size(vocab=16, dim=4, tokens=8), rounds=0, warmup=3)
    try:
        primer = make_trainer(variant, make_inputs(tiny, round(fraction * 16)), tiny, optimizer)
    except (ValueError, TypeError, RuntimeError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    for ids in make_inputs(tiny, 0).batches:
        primer.step(ids)
    del primer
    k = round(fraction * config.size.vocab)
    inputs = make_inputs(config, k)
    synchronize(config.device)
    rss_base = reset_host_peak()
    cuda = config.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(config.device)
        cuda_base = torch.cuda.memory_allocated(config.device)
    try:
        trainer = make_trainer(variant, inputs, config, optimizer)
    except (ValueError, TypeError, RuntimeError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    synchronize(config.device)
    result: dict[str, Any] = {"setup_host_bytes": host_peak_bytes() - rss_base}
    reset_host_peak()
    if cuda:
        result["setup_device_bytes"] = torch.cuda.max_memory_allocated(config.device) - cuda_base
        torch.cuda.reset_peak_memory_stats(config.device)
    # AdamW allocates its state on the first step; three steps reach the steady peak.
    for ids in inputs.batches[:3]:
        trainer.step(ids)
    synchronize(config.device)
    result["host_bytes"] = host_peak_bytes() - rss_base
    if cuda:
        result["device_bytes"] = torch.cuda.max_memory_allocated(config.device) - cuda_base
    return result


def memory_command(config: Config, variant: str, fraction: float, optimizer: str) -> list[str]:
    """Return the command line that measures one variant in a fresh process."""
    size = config.size
    dtype = next(name for name, value in DTYPES.items() if value == config.dtype)
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--measure-memory={variant}",
        f"--fraction={fraction!r}",
        f"--optimizer={optimizer}",
        f"--device={config.device}",
        f"--dtype={dtype}",
        f"--vocab={size.vocab}",
        f"--dim={size.dim}",
        f"--tokens={size.tokens}",
        f"--layer={config.layer}",
        f"--seed={config.seed}",
        "--warmup=3",
        "--rounds=0",
    ]


def measure_all_memory(
    config: Config, cells: Sequence[Cell], fractions: Sequence[float], jobs: int
) -> None:
    """Measure every variant of the cells at ``fractions``, each in its own process."""
    work = [
        (cell, variant)
        for cell in cells
        if cell.fraction in fractions
        for variant in VARIANTS
        if variant not in cell.errors and variant in cell.median_ms
    ]

    def run(item: tuple[Cell, str]) -> tuple[Cell, str, dict[str, Any]]:
        cell, variant = item
        command = memory_command(config, variant, cell.fraction, cell.optimizer)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return cell, variant, {"error": f"exit {done.returncode}: {tail}"}
        result: dict[str, Any] = json.loads(lines[-1])
        return cell, variant, result

    # Peaks are per process, so running a few at once does not mix them up.
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for cell, variant, result in pool.map(run, work):
            if "error" in result:
                cell.errors.setdefault(variant, f"memory: {result['error']}")
                continue
            cell.peak_host_mib[variant] = result["host_bytes"] / MIB
            main = result.get("device_bytes", result["host_bytes"])
            cell.peak_mib[variant] = main / MIB
            setup = result.get("setup_device_bytes", result["setup_host_bytes"])
            cell.setup_peak_mib[variant] = setup / MIB


def device_name(device: torch.device) -> str:
    """Return a human name for ``device``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Return a Markdown table, first column left-aligned and the rest right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *["---:"] * (len(header) - 1)]) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def time_cell_text(cell: Cell, name: str) -> str:
    """Return ``ms (ratio)`` for one variant of a cell, or why there is none."""
    if name in cell.errors and name not in cell.median_ms:
        return "error"
    if name not in cell.median_ms:
        return "n/a"
    ratio = f" ({cell.ratio[name]:.2f})" if name in cell.ratio else ""
    return f"{cell.median_ms[name]:.2f}{ratio}"


def memory_cell_text(cell: Cell, name: str) -> str:
    """Return one variant's training peak (ratio to plain), building peak, or why none."""
    if name not in cell.peak_mib:
        return "error" if name in cell.errors else "-"
    text = f"{cell.peak_mib[name]:.0f}"
    if cell.peak_mib.get("plain"):
        text += f" ({cell.peak_mib[name] / cell.peak_mib['plain']:.2f})"
    if name in cell.setup_peak_mib:
        text += f", build {cell.setup_peak_mib[name]:.0f}"
    return text


def yes_no(value: bool | None) -> str:
    """Return ``yes``, a bold ``no``, or ``n/a``."""
    if value is None:
        return "n/a"
    return "yes" if value else "**no**"


def report(
    config: Config,
    cells: Sequence[Cell],
    compile_cells: Sequence[Cell],
    fused_reason: str | None,
) -> str:
    """Return the Markdown report of all cells."""
    size = config.size
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dtype = str(config.dtype).removeprefix("torch.")
    title = (
        f"# {config.layer.capitalize()} training step: {device_name(config.device)}, "
        f"torch {torch.__version__}, "
        f"V={size.vocab} d={size.dim} tokens={size.tokens} {dtype}, "
        f"{config.rounds} interleaved rounds after {config.warmup} warmup, {today}"
    )
    out = [title]
    memory_kind = (
        "torch.cuda.max_memory_allocated over the inputs"
        if config.device.type == "cuda"
        else "peak RSS (VmHWM) increase over the inputs"
    )
    errors: list[str] = []
    for optimizer, label in OPTIMIZERS.items():
        own = [cell for cell in cells if cell.optimizer == optimizer]
        if optimizer == "adamw-fused" and fused_reason is not None:
            out += ["", f"## {label}", "", f"n/a on {config.device} {dtype}: {fused_reason}"]
            continue
        if not own:
            continue
        header = ["frozen", "k", *VARIANTS]
        out += [
            "",
            f"## {label}: median ms/step (ratio to plain)",
            "",
            table(
                header,
                [
                    [f"{c.fraction:g}", str(c.k), *[time_cell_text(c, v) for v in VARIANTS]]
                    for c in own
                ],
            ),
        ]
        if any(c.peak_mib for c in own):
            out += [
                "",
                (
                    f"### {label}: peak memory, MiB, while training (ratio to plain), and "
                    f"while building ({memory_kind}, each variant in its own process; "
                    "- not measured)"
                ),
                "",
                table(
                    header,
                    [
                        [
                            f"{c.fraction:g}",
                            str(c.k),
                            *[memory_cell_text(c, v) for v in VARIANTS],
                        ]
                        for c in own
                    ],
                ),
            ]
        out += [
            "",
            f"### {label}: fixed rows exact after the timed steps (torch.equal)",
            "",
            table(
                header,
                [
                    [f"{c.fraction:g}", str(c.k), *[yes_no(c.exact.get(v)) for v in VARIANTS]]
                    for c in own
                ],
            ),
        ]
        errors += [
            f"- {label}, frozen {c.fraction:g}, {v}: {e}" for c in own for v, e in c.errors.items()
        ]
    for cell in compile_cells:
        label = OPTIMIZERS[cell.optimizer]
        rows = []
        for variant in COMPILE_VARIANTS:
            compiled = f"{variant} compiled"
            rows.append(
                [
                    variant,
                    time_cell_text(cell, variant),
                    time_cell_text(cell, compiled),
                    yes_no(cell.exact.get(compiled)),
                    cell.compile_status.get(variant, "not built"),
                ]
            )
        out += [
            "",
            (
                f"## {label}: torch.compile of forward + loss at frozen {cell.fraction:g} "
                f"(k={cell.k}), median ms/step (ratio to eager plain)"
            ),
            "",
            table(["variant", "eager", "compiled", "exact", "compile"], rows),
        ]
        errors += [f"- compile, {label}, {v}: {e}" for v, e in cell.errors.items()]
    if errors:
        out += ["", "## Errors", "", *errors]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument(
        "--gpu-size",
        action="store_true",
        help=f"V={GPU_SIZE.vocab}, d={GPU_SIZE.dim}, {GPU_SIZE.tokens} tokens",
    )
    sizes.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: V={QUICK_SIZE.vocab}, d={QUICK_SIZE.dim}, "
        f"{QUICK_SIZE.tokens} tokens, 3 rounds",
    )
    parser.add_argument("--vocab", type=int, help="override the vocabulary size V")
    parser.add_argument("--dim", type=int, help="override the embedding width d")
    parser.add_argument("--tokens", type=int, help="override the tokens per batch")
    parser.add_argument(
        "--layer",
        choices=["embedding", "bag", "linear"],
        default="embedding",
        help="the constrained layer: an nn.Embedding lookup, an nn.EmbeddingBag (mean) over "
        f"bags of {BAG_SIZE} tokens, or an nn.Linear output head "
        "(dim -> vocab; its output is tokens x vocab, so pass fewer --tokens)",
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="default: %(default)s")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 0.9, 0.99],
        help="frozen fractions of the rows (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=int, help="timed rounds (default 15, 3 with --quick)")
    parser.add_argument("--warmup", type=int, help="warmup steps (default 3, 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile'd steps of plain and the constrained variants",
    )
    parser.add_argument("--compile-fraction", type=float, default=0.9)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--memory-fractions",
        type=float,
        nargs="+",
        help="measure peak memory at these of --fractions only "
        "(default: all; with --quick the largest, to keep the smoke test short)",
    )
    parser.add_argument(
        "--memory-jobs",
        type=int,
        default=2,
        help="memory processes at once (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    # The memory subprocess: one variant, one cell, result as JSON on stdout.
    parser.add_argument("--measure-memory", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fractions = [*args.fractions, args.compile_fraction]
    if args.fraction is not None:
        fractions.append(args.fraction)
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        parser.error(f"Expected frozen fractions in [0, 1]. Got {fractions}.")
    if args.measure_memory is not None and (args.fraction is None or args.optimizer is None):
        parser.error("--measure-memory needs --fraction and --optimizer.")
    return args


def make_config(args: argparse.Namespace) -> Config:
    """Return the configuration the arguments select."""
    base = GPU_SIZE if args.gpu_size else QUICK_SIZE if args.quick else CPU_SIZE
    size = Size(
        vocab=args.vocab or base.vocab,
        dim=args.dim or base.dim,
        tokens=args.tokens or base.tokens,
    )
    rounds = args.rounds if args.rounds is not None else 3 if args.quick else 15
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 3
    return Config(
        size=size,
        device=torch.device(args.device),
        dtype=DTYPES[args.dtype],
        rounds=rounds,
        warmup=warmup,
        seed=args.seed,
        layer=args.layer,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the Markdown report and return the exit status."""
    args = parse_args(argv)
    config = make_config(args)
    torch.manual_seed(config.seed)
    if args.measure_memory is not None:
        print(
            json.dumps(measure_memory(config, args.measure_memory, args.fraction, args.optimizer))
        )
        return 0
    fused_reason = fused_unsupported(config)
    optimizers = [o for o in OPTIMIZERS if o != "adamw-fused" or fused_reason is None]
    cells = []
    for fraction in args.fractions:
        for optimizer in optimizers:
            cells.append(run_cell(config, fraction, optimizer))
            release_memory()
    compile_cells = []
    if args.compile:
        for optimizer in optimizers:
            compile_cells.append(run_compile_cell(config, args.compile_fraction, optimizer))
            release_memory()
    if not args.no_memory:
        memory_fractions = args.memory_fractions or (
            [max(args.fractions)] if args.quick else args.fractions
        )
        measure_all_memory(config, cells, memory_fractions, args.memory_jobs)
    print(report(config, cells, compile_cells, fused_reason))
    if args.json is not None:
        raw = {
            "device": str(config.device),
            "device_name": device_name(config.device),
            "torch": torch.__version__,
            "layer": config.layer,
            "size": asdict(config.size),
            "dtype": str(config.dtype),
            "rounds": config.rounds,
            "warmup": config.warmup,
            "seed": config.seed,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "fused_unsupported": fused_reason,
            "cells": [asdict(cell) for cell in cells],
            "compile_cells": [asdict(cell) for cell in compile_cells],
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
