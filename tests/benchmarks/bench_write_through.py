"""Time what `WriteThrough` costs where user code reads a constrained weight itself.

The fast reads (a constrained module's own forward) never build the weight. Code that reads
``module.weight`` itself does: a custom tied head (``F.linear(hidden, embedding.weight)``), a
model that scales or slices its embedding's weight. That read is a `WriteThrough` (so that
in-place writes into it reach the stored rows), a tensor subclass: each operation on it pays a
``__torch_function__`` call. One training step of such a head: the read, ``F.linear`` of a batch
of hidden states by the ``(vocab, dim)`` weight, a cross-entropy loss, backward and an
``AdamW(lr=1e-3, weight_decay=0.01)`` step. The variants:

- ``plain``: an unconstrained ``nn.Embedding``, its weight read as it is.
- ``raw-read``: ``fix_rows`` with scattered fixed rows, the weight read through the
  parametrization itself (``parametrization_list(emb, "weight")()``, a plain tensor): what the
  read costs without the subclass.
- ``write-through``: the same module read as users read it, ``emb.weight`` (a `WriteThrough`).

All three are built once, warmed up, then timed round-robin, one step each per round, each
round starting with the next variant, so that drift of a shared machine hits them alike; the
table shows medians over rounds and each variant's ratio to ``raw-read`` in the same rounds. Run from the repository root::

    python tests/benchmarks/bench_write_through.py          # CPU size, about a minute
    python tests/benchmarks/bench_write_through.py --quick  # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from embedding_constraint import fix_rows
from embedding_constraint.fixed_rows import parametrization_list

Step = Callable[[], None]


def _step(read: Callable[[], Tensor], params: list[Tensor], hidden: Tensor, target: Tensor) -> Step:
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = nn.functional.linear(hidden, read())
        loss = nn.functional.cross_entropy(logits, target)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    return step


def variants(vocab: int, dim: int, tokens: int, fixed: int) -> dict[str, Step]:
    """The three steps of one size, on inputs made with a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=generator)
    target = torch.randint(0, vocab, (tokens,), generator=generator)
    rows = torch.randperm(vocab, generator=generator)[:fixed]
    reference = torch.randn(fixed, dim, generator=generator)
    plain = nn.Embedding(vocab, dim)
    raw = fix_rows(nn.Embedding(vocab, dim), reference, rows=rows)
    users = fix_rows(nn.Embedding(vocab, dim), reference, rows=rows)
    raw_read = parametrization_list(raw, "weight")
    return {
        "plain": _step(lambda: plain.weight, list(plain.parameters()), hidden, target),
        "raw-read": _step(lambda: cast(Tensor, raw_read()), list(raw.parameters()), hidden, target),
        "write-through": _step(
            lambda: cast(Tensor, users.weight), list(users.parameters()), hidden, target
        ),
    }


def timed(steps: dict[str, Step], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, round by round."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(rounds):
        # Each round starts with the next variant: on the CPU the step that follows another
        # variant's runs measurably faster or slower than one in a row of its own.
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: V=500, d=8, 3 rounds")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--fixed", type=float, default=0.9, help="fraction of rows fixed")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.dim, args.tokens, args.rounds, args.warmup = 500, 8, 64, 3, 1
    torch.manual_seed(0)
    fixed = int(args.vocab * args.fixed)
    times = timed(variants(args.vocab, args.dim, args.tokens, fixed), args.rounds, args.warmup)
    base = times["raw-read"]
    print(
        f"# Head reading the weight itself: V={args.vocab}, d={args.dim}, "
        f"{args.tokens} tokens, {fixed} rows fixed (scattered), torch {torch.__version__}, "
        f"CPU threads {torch.get_num_threads()}, medians of {args.rounds} rounds"
    )
    print("| variant | ms per step | ratio to raw-read |")
    print("|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        print(f"| {name} | {1e3 * statistics.median(values):.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
