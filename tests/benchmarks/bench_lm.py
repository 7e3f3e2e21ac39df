"""Time a language model's training step when only its embedding and output head train.

A ``LlamaForCausalLM`` built from a config (no download, random weights) grows its vocabulary
from ``old_vocab`` to ``vocab`` tokens; the body is frozen and only the input embedding and the
output head train, with the model's own causal-LM loss (cross entropy over the vocabulary) and
``AdamW(lr=1e-3, weight_decay=0.01)``. The old tokens' rows are to stay exact. Variants:

- ``plain``: every row trains (the baseline; the old rows drift).
- ``overwrite``: ``plain``, then the old rows are copied back after every step.
- ``peft``: PEFT's ``TrainableTokensConfig`` on the new tokens (embedding and head; on a tied
  model the head follows the embedding's adapter). Only with ``peft`` installed.
- ``floor``: hand-written, the cheapest exact model of the same computation this script knows:
  the weight a frozen tensor in vocabulary order, the new rows a Parameter of their own (a
  view of that tensor when they are the last rows; else copied into it before each step, a
  copy of the new rows only); the lookup gathers from the weight and sums the gradient of new
  rows only; the head is one product by the weight, and its weight gradient a product of the
  new rows' columns only.
- ``library``: ``fix_rows`` on the embedding and on the head (on a tied model one call on
  the root with ``name="model.embed_tokens.weight"``), ``rows=`` for a re-sorted vocabulary.

Axes: ``appended`` (the new tokens last) or ``resorted`` (the old tokens at seeded random
places of the new vocabulary), untied or tied head, float32 or bfloat16 weights (the whole
model in that dtype: the trained rows and AdamW's state are in it too), default or fused
AdamW. All variants of one configuration share the frozen body, are built once, and are timed
round-robin, one step each per round with the order rotated, on the same batches; the tables
give medians, and ratios as medians over the rounds of two variants' times in one round. Reported: ms/step and ratios to ``plain``, to
``floor`` and to ``peft``; the bytes of the embedding and head tensors each variant keeps and
of its optimizer state (and on CUDA the peak of a step over what is allocated before it); the
old rows exact (``torch.equal`` with their starting values after every step taken); the dtype
of the trained rows and of the optimizer state; the largest relative difference between
``library``'s and ``floor``'s losses, step by step. ``--profile`` adds where the step's
milliseconds go (forward, backward, optimizer; matrix products, loss, lookup, copies).

Run from the repository root (needs ``transformers``; ``peft`` for the ``peft`` column)::

    python tests/benchmarks/bench_lm.py --quick          # smoke test, seconds
    python tests/benchmarks/bench_lm.py --profile        # CPU size, minutes on 2 cores
    python tests/benchmarks/bench_lm.py --gpu-size --profile
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.profiler import DeviceType, ProfilerActivity, profile

from embedding_constraint import fix_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # the step benchmark's helpers, beside this file

VARIANTS = ("plain", "overwrite", "peft", "floor", "library")
LAYOUTS = ("appended", "resorted")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OPTIMIZERS = ("adamw", "adamw-fused")
LR = 1e-3
WEIGHT_DECAY = 0.01
MIB = 2**20
# Largest relative difference of `library`'s losses from `floor`'s that counts as equal (they
# compute the same products and steps, and have been equal bit for bit).
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class Size:
    """The model's shape and the batch."""

    old_vocab: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        """Tokens per batch."""
        return self.batch * self.seq


CPU_SIZE = Size(8000, 8192, hidden=256, layers=2, heads=4, intermediate=688, batch=2, seq=128)
QUICK_SIZE = Size(480, 512, hidden=32, layers=1, heads=2, intermediate=64, batch=2, seq=16)
# The H200 shape: Llama's 128000 -> 129280 tokens, hidden 4096, 16384 tokens a batch;
# two layers, so that the embedding and the head are most of the step, as they were there.
GPU_SIZE = Size(
    128_000, 129_280, hidden=4096, layers=2, heads=32, intermediate=14336, batch=4, seq=4096
)


@dataclass(frozen=True)
class Setting:
    """One configuration: the vocabulary's layout, tying, dtype and optimizer."""

    layout: str
    tied: bool
    dtype: str
    optimizer: str

    def label(self) -> list[str]:
        """The table's first columns."""
        return [self.layout, "tied" if self.tied else "untied", self.dtype, self.optimizer]


@dataclass
class Run:
    """What the script was asked to do."""

    size: Size
    device: torch.device
    rounds: int
    warmup: int
    seed: int
    settings: list[Setting]
    variants: list[str]


def peft_available() -> bool:
    """Whether ``peft`` can be imported."""
    return importlib.util.find_spec("peft") is not None


# --- the hand-written floor ---------------------------------------------------------------


class FloorWeight:
    """One weight of the floor: held in vocabulary order, the new rows a Parameter of their own.

    ``full`` is the weight the lookup and the head read (no graph). ``free`` holds the free rows:
    a view of ``full`` when they are the last rows (the optimizer then updates ``full`` in place),
    else a tensor of its own whose values `refresh` copies into ``full`` before each step.
    ``grad_row`` sends each id's gradient to its free row, or to a spare row that is dropped.
    """

    def __init__(self, weight: Tensor, fixed_rows: Tensor) -> None:
        total = weight.shape[0]
        keep = torch.ones(total, dtype=torch.bool, device=weight.device)
        keep[fixed_rows] = False
        self.free_rows = keep.nonzero().flatten()
        self.full = weight.detach().clone()
        k = fixed_rows.numel()
        self.prefix = bool(torch.equal(fixed_rows, torch.arange(k, device=weight.device)))
        self.k = k
        if self.prefix:
            self.free = nn.Parameter(self.full[k:])  # a view: no copy ever
        else:
            self.free = nn.Parameter(self.full.index_select(0, self.free_rows))
        n = self.free.shape[0]
        # On the CPU the kernel skips the padding row's lookups; on a GPU it sums each row's
        # lookups one after another, so the fixed ids are spread over many spare rows.
        cpu = weight.device.type == "cpu"
        self.spares = 1 if cpu else min(1024, max(k, 1))
        self.padding = n if cpu else -1
        grad_row = torch.empty(total, dtype=torch.long, device=weight.device)
        grad_row[self.free_rows] = torch.arange(n, device=weight.device)
        grad_row[fixed_rows] = n + torch.arange(k, device=weight.device) % self.spares
        self.grad_row = grad_row

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the free rows into ``full`` (nothing when ``free`` is a view of it)."""
        if not self.prefix:
            self.full.index_copy_(0, self.free_rows, self.free)

    def weight(self) -> Tensor:
        """The current full weight, in vocabulary order."""
        self.refresh()
        return self.full


class _FloorLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: Tensor, free: Tensor, w: FloorWeight) -> Tensor:
        ctx.w = w
        ctx.save_for_backward(ids)
        return nn.functional.embedding(ids, w.full)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        (ids,) = ctx.saved_tensors
        w: FloorWeight = ctx.w
        n = w.free.shape[0]
        rows = w.grad_row[ids]
        table = torch.ops.aten.embedding_dense_backward(grad, rows, n + w.spares, w.padding, False)
        return None, table[:n], None


class _FloorHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, free: Tensor, w: FloorWeight) -> Tensor:
        ctx.w = w
        ctx.save_for_backward(x)
        return nn.functional.linear(x, w.full)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor, None]:
        (x,) = ctx.saved_tensors
        w: FloorWeight = ctx.w
        grad_x = grad @ w.full if ctx.needs_input_grad[0] else None
        flat = grad.reshape(-1, grad.shape[-1])
        cols = flat[:, w.k :] if w.prefix else flat.gather(1, w.free_rows.expand(flat.shape[0], -1))
        grad_free = cols.t() @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_free, None


class FloorEmbedding(nn.Module):
    """The floor's lookup: one gather from the full weight; gradients for new rows only."""

    def __init__(self, w: FloorWeight) -> None:
        super().__init__()
        self.w = w
        self.free = w.free

    def forward(self, ids: Tensor) -> Tensor:
        out: Tensor = _FloorLookup.apply(ids, self.free, self.w)  # type: ignore[no-untyped-call]
        return out


class FloorHead(nn.Module):
    """The floor's head: one product by the full weight; a weight gradient for new rows only."""

    def __init__(self, w: FloorWeight) -> None:
        super().__init__()
        self.w = w
        self.free = w.free

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = _FloorHead.apply(x, self.free, self.w)  # type: ignore[no-untyped-call]
        return out


# --- the variants -------------------------------------------------------------------------


@dataclass
class Trainer:
    """One variant: its model, optimizer and step, how to read its weights and what it keeps."""

    name: str
    model: nn.Module  # called with input_ids= and labels=
    optimizer: torch.optim.Optimizer
    weights: Callable[[], list[Tensor]]  # the full weights, embedding first, vocabulary order
    kept: Callable[[], list[Tensor]]  # the embedding and head tensors it keeps
    before_step: Callable[[], None] | None = None
    after_step: Callable[[], None] | None = None
    losses: list[Tensor] = field(default_factory=list)
    exact: bool = True

    def forward(self, ids: Tensor) -> Tensor:
        """Return the loss of one batch."""
        if self.before_step is not None:
            self.before_step()
        loss: Tensor = self.model(input_ids=ids, labels=ids).loss
        return loss

    def update(self) -> None:
        """Step the optimizer, then clear the gradients."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()

    def step(self, ids: Tensor) -> None:
        """Take one training step on ``ids``."""
        loss = self.forward(ids)
        loss.backward()  # type: ignore[no-untyped-call]
        self.update()
        self.losses.append(loss.detach())


@dataclass
class Base:
    """What every variant of a setting starts from."""

    config: Any  # transformers.LlamaConfig
    model: Any  # a LlamaForCausalLM; its frozen body is shared with every variant
    embed: Tensor  # the starting weights, vocabulary order
    head: Tensor
    fixed_rows: Tensor  # where the old tokens sit in the new vocabulary
    new_rows: Tensor
    batches: list[Tensor]


def make_base(run: Run, setting: Setting) -> Base:
    """Build the model, the layout of the vocabulary and the batches, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size, device, dtype = run.size, run.device, DTYPES[setting.dtype]
    config = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max(size.seq, 64),
        tie_word_embeddings=setting.tied,
    )
    torch.manual_seed(run.seed)
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
    model = model.to(dtype)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(run.seed + 1)
    if setting.layout == "appended":
        fixed_rows = torch.arange(size.old_vocab)
    else:
        fixed_rows = torch.randperm(size.vocab, generator=generator)[: size.old_vocab]
    keep = torch.ones(size.vocab, dtype=torch.bool)
    keep[fixed_rows] = False
    new_rows = keep.nonzero().flatten()
    batches = [
        torch.randint(0, size.vocab, (size.batch, size.seq), generator=generator).to(device)
        for _ in range(run.warmup + run.rounds)
    ]
    embed = model.model.embed_tokens.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    # Only the body is shared from here on; let the base's own embedding and head go.
    model.model.embed_tokens = None
    model.lm_head = None
    return Base(config, model, embed, head, fixed_rows.to(device), new_rows.to(device), batches)


def skeleton(base: Base) -> tuple[Any, nn.Embedding, nn.Linear]:
    """A model sharing ``base``'s frozen body, with an embedding and a head of its own."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(base.config)
    body = base.model.model
    model.model.layers = body.layers
    model.model.norm = body.norm
    model.model.rotary_emb = body.rotary_emb
    vocab, hidden = base.embed.shape
    device, dtype = base.embed.device, base.embed.dtype
    embed = nn.Embedding(vocab, hidden, device=device, dtype=dtype)
    head = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        embed.weight.copy_(base.embed)
        head.weight.copy_(base.head)
    if base.config.tie_word_embeddings:
        head.weight = embed.weight
    model.model.embed_tokens = embed
    model.lm_head = head
    meta = [
        n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta
    ]
    assert not meta, f"left on the meta device: {meta}"
    return model, embed, head


def make_optimizer(params: Sequence[Tensor], optimizer: str) -> torch.optim.Optimizer:
    """Return the AdamW that ``optimizer`` names."""
    fused = True if optimizer == "adamw-fused" else None
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=fused)


T = TypeVar("T")


def unique(items: Iterable[T]) -> list[T]:
    """``items`` without repeats (tied weights)."""
    seen: dict[int, T] = {}
    for t in items:
        seen.setdefault(id(t), t)
    return list(seen.values())


def make_trainer(variant: str, base: Base, setting: Setting) -> Trainer:
    """Build ``variant`` from ``base``."""
    tied = setting.tied
    model, embed, head = skeleton(base)
    rows = base.fixed_rows
    appended = setting.layout == "appended"
    if variant in ("plain", "overwrite"):
        params = unique([embed.weight, head.weight])
        for p in params:
            p.requires_grad_(True)
        after_step: Callable[[], None] | None = None
        if variant == "overwrite":
            references = [base.embed.index_select(0, rows)]
            if not tied:
                references.append(base.head.index_select(0, rows))

            @torch.no_grad()
            def overwrite() -> None:
                for p, ref in zip(params, references, strict=True):
                    if appended:
                        p[: ref.shape[0]].copy_(ref)
                    else:
                        p.index_copy_(0, rows, ref)

            after_step = overwrite
        return Trainer(
            variant,
            model,
            make_optimizer(params, setting.optimizer),
            weights=lambda: params,
            kept=lambda: [*params, *(references if variant == "overwrite" else [])],
            after_step=after_step,
        )
    if variant == "peft":
        from peft import TrainableTokensConfig, get_peft_model

        targets = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
        peft_config = TrainableTokensConfig(
            token_indices=base.new_rows.tolist(), target_modules=targets
        )
        peft_model = get_peft_model(model, peft_config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        layers: list[Any] = unique([model.model.embed_tokens, model.lm_head])

        def peft_weights() -> list[Tensor]:
            with torch.no_grad():
                return [
                    layer.get_merged_weights(["default"]) for layer in layers[: 1 if tied else 2]
                ]

        def peft_kept() -> list[Tensor]:
            tensors = [embed.weight, head.weight, *params]
            tensors += [b for layer in layers for b in layer.buffers()]
            return tensors

        return Trainer(
            variant,
            peft_model,
            make_optimizer(params, setting.optimizer),
            weights=peft_weights,
            kept=peft_kept,
        )
    if variant == "floor":
        embed_weight = FloorWeight(base.embed, rows)
        head_weight = embed_weight if tied else FloorWeight(base.head, rows)
        model.model.embed_tokens = FloorEmbedding(embed_weight)
        model.lm_head = FloorHead(head_weight)
        floor_weights = unique([embed_weight, head_weight])
        params = [w.free for w in floor_weights]

        def refresh() -> None:
            for w in floor_weights:
                w.refresh()

        return Trainer(
            variant,
            model,
            make_optimizer(params, setting.optimizer),
            weights=lambda: [w.weight() for w in floor_weights],
            kept=lambda: [t for w in floor_weights for t in (w.full, w.free)],
            before_step=None if appended else refresh,
        )
    if variant == "library":
        where = None if appended else rows
        if tied:
            fix_rows(
                model,
                base.embed.index_select(0, rows),
                name="model.embed_tokens.weight",
                rows=where,
            )
        else:
            fix_rows(embed, base.embed.index_select(0, rows), rows=where)
            fix_rows(head, base.head.index_select(0, rows), rows=where)
        params = [p for p in model.parameters() if p.requires_grad]
        holders: list[nn.Module] = [embed] if tied else [embed, head]

        def library_kept() -> list[Tensor]:
            out = []
            for holder in holders:
                module: Any = holder
                plist = module.parametrizations.weight
                out += [plist.original, plist[0].reference]
            return out

        return Trainer(
            variant,
            model,
            make_optimizer(params, setting.optimizer),
            weights=lambda: [cast(Tensor, m.weight) for m in holders],
            kept=library_kept,
        )
    raise ValueError(f"Expected a variant in {VARIANTS}. Got {variant!r}.")


# --- measuring ----------------------------------------------------------------------------


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimizer's per-parameter state tensors (not the scalar step counts)."""
    return [
        v
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, Tensor) and v.dim()
    ]


def dtype_names(tensors: Iterable[Tensor]) -> str:
    """The dtypes among ``tensors``, short, ``/``-separated."""
    names = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
    return "/".join(names) or "-"


@dataclass
class Cell:
    """Results of one setting."""

    setting: Setting
    ms: dict[str, list[float]] = field(default_factory=dict)
    median_ms: dict[str, float] = field(default_factory=dict)
    kept_bytes: dict[str, int] = field(default_factory=dict)
    state_bytes: dict[str, int] = field(default_factory=dict)
    trained_dtype: dict[str, str] = field(default_factory=dict)
    state_dtype: dict[str, str] = field(default_factory=dict)
    exact: dict[str, bool] = field(default_factory=dict)
    step_peak_bytes: dict[str, int] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)
    loss_rel_diff: float | None = None  # library against floor, largest over the steps
    errors: dict[str, str] = field(default_factory=dict)

    def ratio(self, name: str, to: str) -> float | None:
        """The median over the rounds of ``name``'s time over ``to``'s in the same round.

        Both ran within one round, next to each other, so a burst of load from elsewhere on a
        shared machine hits the two alike; a median of such ratios resists bursts that cover
        many rounds better than a ratio of medians.
        """
        if name in self.ms and to in self.ms:
            pairs = zip(self.ms[name], self.ms[to], strict=True)
            return statistics.median(a / b for a, b in pairs)
        return None


def check_exact(trainer: Trainer, base: Base) -> bool:
    """Whether the old rows of every weight still equal their starting values."""
    with torch.no_grad():
        weights = trainer.weights()
        starts = [base.embed] if len(weights) == 1 else [base.embed, base.head]
        return all(
            torch.equal(w.index_select(0, base.fixed_rows), s.index_select(0, base.fixed_rows))
            for w, s in zip(weights, starts, strict=True)
        )


def timed_step(trainer: Trainer, ids: Tensor, device: torch.device) -> tuple[float, int | None]:
    """Take one step; return its ms and, on CUDA, its peak over what was allocated before it."""
    cuda = device.type == "cuda"
    bench_step.synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    trainer.step(ids)
    bench_step.synchronize(device)
    ms = (time.perf_counter() - start) * 1e3
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    return ms, peak


def run_cell(run: Run, setting: Setting) -> Cell:
    """Build every variant of ``setting``, time them interleaved, and check them."""
    cell = Cell(setting)
    base = make_base(run, setting)
    trainers: list[Trainer] = []
    for variant in run.variants:
        try:
            trainers.append(make_trainer(variant, base, setting))
        except (ValueError, TypeError, RuntimeError, ImportError) as error:
            cell.errors[variant] = f"{type(error).__name__}: {error}"
    peaks: dict[str, list[int]] = {t.name: [] for t in trainers}
    cell.ms = {t.name: [] for t in trainers}
    for index, ids in enumerate(base.batches):
        shift = index % len(trainers)
        order = [*trainers[shift:], *trainers[:shift]]
        for trainer in order[::-1] if index % 2 else order:
            ms, peak = timed_step(trainer, ids, run.device)
            if index >= run.warmup:
                cell.ms[trainer.name].append(ms)
                if peak is not None:
                    peaks[trainer.name].append(peak)
            trainer.exact = trainer.exact and check_exact(trainer, base)
    for trainer in trainers:
        name = trainer.name
        cell.median_ms[name] = statistics.median(cell.ms[name])
        if peaks[name]:
            cell.step_peak_bytes[name] = max(peaks[name])
        trained = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        state = state_tensors(trainer.optimizer)
        cell.kept_bytes[name] = storage_bytes(trainer.kept())
        cell.state_bytes[name] = storage_bytes(state)
        cell.trained_dtype[name] = dtype_names(trained)
        cell.state_dtype[name] = dtype_names(state)
        cell.exact[name] = trainer.exact
        cell.losses[name] = [float(loss) for loss in trainer.losses]
    if "library" in cell.losses and "floor" in cell.losses:
        lib, floor = cell.losses["library"], cell.losses["floor"]
        cell.loss_rel_diff = max(abs(a - b) / abs(b) for a, b in zip(lib, floor, strict=True))
    return cell


# --- where the time goes ------------------------------------------------------------------

CATEGORIES = {
    "products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int"),
    "loss": ("log_softmax", "nll_loss", "cross_entropy"),
    "lookup": ("aten::embedding",),
    "copies": (
        "aten::copy_",
        "aten::_to_copy",
        "aten::index_copy",
        "aten::index_select",
        "aten::cat",
        "aten::clone",
        "aten::fill_",
        "aten::zero_",
        "aten::index",
        "aten::gather",
        "aten::scatter",
    ),
    "attention": (
        "scaled_dot_product",
        "flash_attention",
        "efficient_attention",
        "cudnn_attention",
        "_softmax",
    ),
}


def category(op: str) -> str:
    """The category of a profiler operator name."""
    for name, patterns in CATEGORIES.items():
        if any(op.startswith(p) or (not p.startswith("aten::") and p in op) for p in patterns):
            return name
    return "other"


@dataclass
class Profile:
    """Where one variant's step goes: phase medians and operator self-time by category."""

    setting: Setting
    variant: str
    forward_ms: float
    backward_ms: float
    optimizer_ms: float
    categories_ms: dict[str, float]  # per step, forward and backward only


def profile_variant(
    trainer: Trainer, setting: Setting, batches: Sequence[Tensor], device: torch.device
) -> Profile:
    """Time the phases of ``batches`` steps and profile the operators of a few."""
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def clock() -> float:
        bench_step.synchronize(device)
        return time.perf_counter()

    for ids in batches:
        t0 = clock()
        loss = trainer.forward(ids)
        t1 = clock()
        loss.backward()  # type: ignore[no-untyped-call]
        t2 = clock()
        trainer.update()
        t3 = clock()
        phases["forward"].append((t1 - t0) * 1e3)
        phases["backward"].append((t2 - t1) * 1e3)
        phases["optimizer"].append((t3 - t2) * 1e3)
    activities = [ProfilerActivity.CPU]
    cuda = device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    # Each of a few steps profiled alone; the step with the median total stands for them (a
    # step that a burst of load elsewhere slowed does not).
    steps: list[dict[str, float]] = []
    for ids in batches[:5]:
        with profile(activities=activities) as prof:
            loss = trainer.forward(ids)
            loss.backward()  # type: ignore[no-untyped-call]
            bench_step.synchronize(device)
        trainer.update()
        totals: dict[str, float] = {}
        for event in prof.key_averages():
            # On CUDA an operator's self device time is its kernels' time, and the kernels are
            # listed again as events of their own: count the operators only.
            if cuda and event.device_type != DeviceType.CPU:
                continue
            us = event.self_device_time_total if cuda else event.self_cpu_time_total
            key = category(event.key)
            totals[key] = totals.get(key, 0.0) + us / 1e3
        steps.append(totals)
    steps.sort(key=lambda t: sum(t.values()))
    totals = steps[len(steps) // 2]
    return Profile(
        setting,
        trainer.name,
        statistics.median(phases["forward"]),
        statistics.median(phases["backward"]),
        statistics.median(phases["optimizer"]),
        totals,
    )


def run_profile(run: Run, setting: Setting, steps: int) -> list[Profile]:
    """Profile ``plain``, ``floor`` and ``library`` (and ``peft``) for ``setting``."""
    base = make_base(run, setting)
    out = []
    for variant in ("plain", "peft", "floor", "library"):
        if variant not in run.variants:
            continue
        trainer = make_trainer(variant, base, setting)
        batches = base.batches[: min(len(base.batches), steps)]
        for ids in batches[:2]:
            trainer.step(ids)
        out.append(profile_variant(trainer, setting, batches, run.device))
        del trainer
        release_memory()
    return out


# --- the report ---------------------------------------------------------------------------


def release_memory() -> None:
    """Free what the last setting built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fused_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``AdamW(fused=True)`` cannot run on this device and dtype, or ``None``."""
    param = nn.Parameter(torch.zeros(2, 2, device=device, dtype=dtype))
    try:
        opt = make_optimizer([param], "adamw-fused")
        param.grad = torch.zeros_like(param)
        opt.step()
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def ms_text(cell: Cell, name: str) -> str:
    """``ms (ratio to plain)``, or why there is none."""
    if name not in cell.median_ms:
        return "error" if name in cell.errors else "n/a"
    ratio = cell.ratio(name, "plain")
    return f"{cell.median_ms[name]:.2f}" + ("" if ratio is None else f" ({ratio:.2f})")


def ratio_text(value: float | None) -> str:
    """A ratio, or ``n/a``."""
    return "n/a" if value is None else f"{value:.3f}"


def mib_text(cell: Cell, name: str) -> str:
    """Kept tensors + optimizer state, MiB (ratio to plain), or ``n/a``."""
    if name not in cell.kept_bytes:
        return "n/a"
    total = cell.kept_bytes[name] + cell.state_bytes[name]
    text = f"{cell.kept_bytes[name] / MIB:.1f} + {cell.state_bytes[name] / MIB:.1f}"
    if "plain" in cell.kept_bytes:
        plain = cell.kept_bytes["plain"] + cell.state_bytes["plain"]
        text += f" ({total / plain:.2f})"
    return text


def report(run: Run, cells: Sequence[Cell], profiles: Sequence[Profile], note: str) -> str:
    """The Markdown report."""
    size = run.size
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        (
            f"# Language-model step: {bench_step.device_name(run.device)}, "
            f"torch {torch.__version__}, "
            f"LlamaForCausalLM V={size.old_vocab}->{size.vocab} hidden={size.hidden} "
            f"layers={size.layers} tokens={size.tokens} ({size.batch}x{size.seq}), "
            f"{run.rounds} interleaved rounds after {run.warmup} warmup, {today}"
        ),
    ]
    if note:
        out += ["", note]
    first = ["layout", "head", "dtype", "AdamW"]
    names = run.variants
    out += [
        "",
        (
            "## Median ms/step (ratio to plain); library against floor and peft (ratios: "
            "medians over the rounds of the two times in one round)"
        ),
        "",
        bench_step.table(
            [*first, *names, "library/floor", "library/peft", "floor/peft"],
            [
                [
                    *c.setting.label(),
                    *[ms_text(c, v) for v in names],
                    ratio_text(c.ratio("library", "floor")),
                    ratio_text(c.ratio("library", "peft")),
                    ratio_text(c.ratio("floor", "peft")),
                ]
                for c in cells
            ],
        ),
        "",
        "## Embedding and head tensors kept + optimizer state, MiB (ratio of the sum to plain)",
        "",
        bench_step.table(
            [*first, *names],
            [[*c.setting.label(), *[mib_text(c, v) for v in names]] for c in cells],
        ),
    ]
    if any(c.step_peak_bytes for c in cells):
        out += [
            "",
            "## Peak of a step over the memory allocated before it, MiB (ratio to plain)",
            "",
            bench_step.table(
                [*first, *names],
                [
                    [
                        *c.setting.label(),
                        *[
                            f"{c.step_peak_bytes[v] / MIB:.0f}"
                            + (
                                f" ({c.step_peak_bytes[v] / c.step_peak_bytes['plain']:.2f})"
                                if c.step_peak_bytes.get("plain")
                                else ""
                            )
                            if v in c.step_peak_bytes
                            else "n/a"
                            for v in names
                        ],
                    ]
                    for c in cells
                ],
            ),
        ]
    else:
        out += ["", "(The peak of a step is measured on CUDA only.)"]
    out += [
        "",
        (
            "## Old rows exact after every step; trained rows / optimizer state dtype; "
            "library's losses against floor's"
        ),
        "",
        bench_step.table(
            [*first, *[f"{v} exact" for v in names], "library rows / state", "library vs floor"],
            [
                [
                    *c.setting.label(),
                    *[bench_step.yes_no(c.exact.get(v)) for v in names],
                    f"{c.trained_dtype.get('library', '-')} / {c.state_dtype.get('library', '-')}",
                    "n/a" if c.loss_rel_diff is None else f"{c.loss_rel_diff:.1e}",
                ]
                for c in cells
            ],
        ),
    ]
    dtypes = {
        f"{v}: {c.trained_dtype[v]} / {c.state_dtype[v]}"
        for c in cells
        for v in names
        if v in c.trained_dtype and c.setting.dtype == "bfloat16"
    }
    if dtypes:
        out += [
            "",
            "bfloat16 settings, trained rows / optimizer state: " + "; ".join(sorted(dtypes)),
        ]
    errors = [
        f"- {' '.join(c.setting.label())}, {v}: {e}" for c in cells for v, e in c.errors.items()
    ]
    if profiles:
        cats = [*CATEGORIES, "other"]
        out += [
            "",
            (
                "## Where the step goes (phases synced, median ms; operators: self time per "
                "step in forward and backward, from torch.profiler)"
            ),
            "",
            bench_step.table(
                [*first, "variant", "forward", "backward", "optimizer", *cats],
                [
                    [
                        *p.setting.label(),
                        p.variant,
                        f"{p.forward_ms:.2f}",
                        f"{p.backward_ms:.2f}",
                        f"{p.optimizer_ms:.2f}",
                        *[f"{p.categories_ms.get(c, 0.0):.2f}" for c in cats],
                    ]
                    for p in profiles
                ],
            ),
        ]
    if errors:
        out += ["", "## Errors", "", *errors]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--gpu-size", action="store_true", help=f"{GPU_SIZE}")
    sizes.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_SIZE}, 2 rounds")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument(
        "--heads", nargs="+", choices=["untied", "tied"], default=["untied", "tied"]
    )
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, help="timed rounds (default 15, 2 with --quick)")
    parser.add_argument("--warmup", type=int, help="warmup steps (default 3, 1 with --quick)")
    parser.add_argument("--layers", type=int, help="override the number of layers")
    parser.add_argument("--seed", type=int, default=0)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="default: %(default)s")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also show where the step goes (plain, peft, floor, library) in the first "
        "setting of each layout",
    )
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    return parser.parse_args(argv)


def make_run(args: argparse.Namespace) -> tuple[Run, str]:
    """The run the arguments select, and a note on what was left out."""
    size = GPU_SIZE if args.gpu_size else QUICK_SIZE if args.quick else CPU_SIZE
    if args.layers:
        size = Size(**{**asdict(size), "layers": args.layers})
    device = torch.device(args.device)
    notes = []
    variants = list(args.variants)
    if "peft" in variants and not peft_available():
        variants.remove("peft")
        notes.append("peft is not installed: no `peft` column.")
    settings = []
    for layout, head, dtype, optimizer in itertools.product(
        args.layouts, args.heads, args.dtypes, args.optimizers
    ):
        if optimizer == "adamw-fused":
            reason = fused_unsupported(device, DTYPES[dtype])
            if reason is not None:
                notes.append(f"fused AdamW left out for {dtype} on {device}: {reason}")
                continue
        settings.append(Setting(layout, head == "tied", dtype, optimizer))
    rounds = args.rounds if args.rounds is not None else 2 if args.quick else 15
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 3
    run = Run(size, device, rounds, warmup, args.seed, settings, variants)
    return run, " ".join(dict.fromkeys(notes))


def cell_summary(cell: Cell) -> str:
    """One line on a finished cell, so that a run cut off by a time limit still leaves numbers."""
    floor = cell.median_ms.get("floor")
    parts = []
    for name, ms in cell.median_ms.items():
        ratio = f" ({ms / floor:.3f} of floor)" if floor else ""
        exact = "" if cell.exact.get(name, True) else " MOVED"
        parts.append(f"{name} {ms:.2f} ms{ratio}{exact}")
    parts += [f"{name}: {error}" for name, error in cell.errors.items()]
    return f"  {' '.join(cell.setting.label())}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the Markdown report and return the exit status."""
    args = parse_args(argv)
    if importlib.util.find_spec("transformers") is None:
        print("bench_lm.py needs transformers: pip install '.[peft]'", file=sys.stderr)
        return 2
    run, note = make_run(args)
    cells = []
    for setting in run.settings:
        print(f"running {' '.join(setting.label())}", file=sys.stderr, flush=True)
        cells.append(run_cell(run, setting))
        print(cell_summary(cells[-1]), file=sys.stderr, flush=True)
        release_memory()
    profiles: list[Profile] = []
    if args.profile:
        for layout in LAYOUTS:
            chosen = [s for s in run.settings if s.layout == layout][:1]
            for setting in chosen:
                profiles += run_profile(run, setting, args.profile_steps)
                release_memory()
    print(report(run, cells, profiles, note))
    if args.json is not None:
        raw = {
            "device_name": bench_step.device_name(run.device),
            "torch": torch.__version__,
            "size": asdict(run.size),
            "rounds": run.rounds,
            "warmup": run.warmup,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cells": [asdict(c) for c in cells],
            "profiles": [asdict(p) for p in profiles],
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    # Exit 1 if an exact variant moved an old row, or the library's losses left the floor's.
    moved = [c for c in cells for v in VARIANTS[1:] if c.exact.get(v) is False]
    apart = [
        c
        for c in cells
        if c.loss_rel_diff is not None and c.loss_rel_diff > LOSS_RTOL[DTYPES[c.setting.dtype]]
    ]
    return 1 if moved or apart else 0


if __name__ == "__main__":
    raise SystemExit(main())
