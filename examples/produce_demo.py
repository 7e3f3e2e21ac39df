"""The produce demo: grow a trained embedding's vocabulary with and without the constraint.

A 2-D embedding of six fruits and six vegetables is trained, with PyTorch Lightning, to
predict one item of a triple from the other two; triples never mix fruits and vegetables, so
each kind forms a cluster. A fruit/vegetable classifier is then fitted to those twelve
coordinates: the "downstream model" that depends on them.

Four items arrive (lemon, kiwi, pumpkin, pepper) and the embedding is expanded two ways:

* retrained: a fresh model trained from scratch on the bigger dataset. The new items find their
  kind, but the old items move wherever the new random start takes them, so the classifier
  fitted to the old coordinates may no longer read them.
* constrained: ``vocab.expand`` copies the old rows into a 16-row embedding (new rows start at
  the old rows' mean) and ``EmbeddingConstraint.from_vocabularies`` holds every old item at its
  old coordinates, bit for bit, while the four new rows train. The classifier keeps working
  unchanged, and the new items still settle with their kind.

The demo writes ``produce_demo.png`` (one panel per embedding) and prints a summary table for
one seed, then runs the same expansion over several seeds and reports how far retraining moved
the old items and how often the classifier lost them, next to the constrained expansion. It
exits with status 1 if, for any seed, an old item moved in the constrained expansion or a new
item settled nearer the other kind's centroid.

Run it with ``nox -s demo`` or
``python examples/produce_demo.py [--outdir DIR] [--epochs N] [--seed N] [--seeds N]``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from embedding_constraint import EmbeddingConstraint
from embedding_constraint.vocab import expand

if TYPE_CHECKING:  # matplotlib is imported where the figure is drawn: `--help` runs without it
    from matplotlib.axes import Axes

FRUITS = ("apple", "orange", "banana", "strawberry", "mango", "pear")
VEGETABLES = ("broccoli", "cabbage", "carrot", "cauliflower", "spinach", "parsnip")
NEW_FRUITS = ("lemon", "kiwi")
NEW_VEGETABLES = ("pumpkin", "pepper")
KINDS = ("fruit", "vegetable")
KIND = {
    **dict.fromkeys(FRUITS + NEW_FRUITS, "fruit"),
    **dict.fromkeys(VEGETABLES + NEW_VEGETABLES, "vegetable"),
}

OLD_ITEMS = FRUITS + VEGETABLES
# Alphabetical, so the old items are not a prefix of the new vocabulary: the new items sit
# between them, and `EmbeddingConstraint.from_vocabularies` finds each old item's new row.
NEW_ITEMS = tuple(sorted(OLD_ITEMS + NEW_FRUITS + NEW_VEGETABLES))
ADDED = tuple(item for item in NEW_ITEMS if item not in OLD_ITEMS)

FIGURE_NAME = "produce_demo.png"
BATCH_SIZE = 64
LEARNING_RATE = 0.05
REPULSION = 0.3
SPREAD = 0.7
COLOURS = {"fruit": "tab:orange", "vegetable": "tab:green"}

Limits = tuple[tuple[float, float], tuple[float, float]]  # (x0, x1), (y0, y1)
Box = tuple[float, float, float, float]  # left, bottom, right, top, in points
Direction = tuple[float, float]


def triples(vocab: Sequence[str], groups: Sequence[Sequence[str]]) -> Tensor:
    """Every ordered triple of distinct items within one group, as rows of ``vocab`` indices."""
    index = {item: row for row, item in enumerate(vocab)}
    rows = [
        [index[item] for item in triple]
        for group in groups
        for triple in itertools.permutations(group, 3)
    ]
    return torch.tensor(rows, dtype=torch.int64)


class TripleModel(pl.LightningModule):
    """Predict the first item of a triple from the other two.

    The context is the mean of the two context items' embeddings; an item's logit is minus its
    squared distance to the context. The output reads the embedding table too, so items that
    share contexts (one kind) gather and the two kinds push apart.

    Every triple of a kind occurs equally often, so the data cannot tell two fruits apart and
    the loss alone would stack each kind on one point. A small repulsion between all rows
    (``crowding``) spreads them out so the figure stays readable.
    """

    def __init__(self, embedding: nn.Embedding, lr: float = LEARNING_RATE) -> None:
        super().__init__()
        self.embedding = embedding
        self.lr = lr

    @override
    def forward(self, context: Tensor) -> Tensor:
        centre: Tensor = self.embedding(context).mean(dim=1)
        table = self.embedding.weight
        return -(centre.unsqueeze(1) - table).square().sum(dim=-1)

    @override
    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (triple,) = batch
        loss = nn.functional.cross_entropy(self(triple[:, 1:]), triple[:, 0])
        return loss + REPULSION * self.crowding()

    def crowding(self) -> Tensor:
        """How close items sit to each other: a Gaussian kernel over every pair of rows."""
        table = self.embedding.weight
        gaps = (table.unsqueeze(0) - table.unsqueeze(1)).square().sum(dim=-1)
        pairs = ~torch.eye(table.shape[0], dtype=torch.bool, device=table.device)
        return torch.exp(-gaps[pairs] / SPREAD**2).sum() / table.shape[0]

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _child(generator: torch.Generator) -> torch.Generator:
    """A generator seeded from ``generator``: each random draw has its own stream."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator().manual_seed(seed)


def _fresh_embedding(size: int, generator: torch.Generator) -> nn.Embedding:
    # Passing the weight skips nn.Embedding's own initialisation, which draws from the global
    # generator.
    return nn.Embedding(size, 2, _weight=torch.randn(size, 2, generator=generator))


def _coordinates(embedding: nn.Embedding, vocab: Sequence[str]) -> dict[str, Tensor]:
    weight = embedding.weight.detach()
    return {item: weight[row].clone() for row, item in enumerate(vocab)}


def _stack(points: dict[str, Tensor], items: Sequence[str]) -> Tensor:
    return torch.stack([points[item] for item in items])


@dataclass(frozen=True)
class KindClassifier:
    """Logistic regression, fruit (1) against vegetable (0), on 2-D coordinates."""

    weight: Tensor
    bias: Tensor

    @classmethod
    def fit(cls, points: Tensor, kinds: Sequence[str]) -> KindClassifier:
        """Fit to ``points`` (n, 2) labelled ``kinds``; a little L2 keeps separable data finite."""
        x = points.detach().double()
        y = torch.tensor([kind == "fruit" for kind in kinds], dtype=torch.float64)
        weight = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=0.1)
        for _ in range(500):
            optimizer.zero_grad()
            logits = x @ weight + bias
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
            penalty = weight.square().sum() * 1e-3
            total: Tensor = loss + penalty
            torch.autograd.backward(total)
            optimizer.step()
        return cls(weight.detach(), bias.detach())

    def fruit_logit(self, points: Tensor) -> Tensor:
        """Positive where the classifier says fruit."""
        return points.double() @ self.weight + self.bias

    def predict(self, points: Tensor) -> list[str]:
        """The kind of each of ``points`` (n, 2)."""
        return ["fruit" if float(z) > 0 else "vegetable" for z in self.fruit_logit(points)]

    def accuracy(self, points: dict[str, Tensor], items: Sequence[str]) -> float:
        """The fraction of ``items`` whose coordinates in ``points`` it classifies right."""
        predicted = self.predict(_stack(points, items))
        return sum(p == KIND[item] for p, item in zip(predicted, items, strict=True)) / len(items)


@dataclass(frozen=True)
class Expansion:
    """How one expanded embedding compares with the original.

    Attributes:
        name: ``"retrained"`` or ``"constrained"``.
        coordinates: every item's 2-D coordinates in the expanded embedding.
        max_old_change: the largest absolute change of an old item's coordinate.
        old_unchanged: whether every old item's coordinates are bit for bit the original's.
        placed: for each new item, the kind whose old-item centroid is nearest.
        old_accuracy: the original classifier's accuracy on the old items here.
        new_accuracy: the original classifier's accuracy on the new items here.
    """

    name: str
    coordinates: dict[str, Tensor]
    max_old_change: float
    old_unchanged: bool
    placed: dict[str, str]
    old_accuracy: float
    new_accuracy: float

    @property
    def misplaced(self) -> list[str]:
        """New items whose nearest old-item centroid is the other kind's."""
        return [item for item, kind in self.placed.items() if kind != KIND[item]]


@dataclass(frozen=True)
class Summary:
    """What a run of the demo produced.

    Attributes:
        figure: where the PNG with one panel per embedding goes (`run` draws it).
        seed: the seed of the run.
        epochs: epochs per fit.
        original: every old item's coordinates in the original embedding.
        original_accuracy: the classifier's accuracy on the original coordinates.
        retrained: the expansion trained from scratch.
        constrained: the expansion with the old rows held by ``EmbeddingConstraint``.
        classifier: the fruit/vegetable classifier fitted to the original coordinates.
    """

    figure: Path
    seed: int
    epochs: int
    original: dict[str, Tensor]
    original_accuracy: float
    retrained: Expansion
    constrained: Expansion
    classifier: KindClassifier

    @property
    def problems(self) -> list[str]:
        """Why the constrained expansion failed the demo's promise; empty when it kept it."""
        problems = []
        constrained = self.constrained
        if not constrained.old_unchanged:
            problems.append(
                "the constraint did not hold: old items moved in the constrained expansion "
                f"(largest change {constrained.max_old_change:.6g})"
            )
        if constrained.old_accuracy != self.original_accuracy:
            problems.append(
                f"the classifier's old-item accuracy changed from {self.original_accuracy:.0%} "
                f"to {constrained.old_accuracy:.0%} in the constrained expansion"
            )
        for item in constrained.misplaced:
            problems.append(
                f"{item} ({KIND[item]}) settled nearest the {constrained.placed[item]} centroid "
                "in the constrained expansion"
            )
        return problems

    def table(self) -> str:
        """The summary as a plain-text table."""
        retrained, constrained = self.retrained, self.constrained
        rows = [
            ("", "original", "retrained", "constrained"),
            (
                "largest change of an old item",
                "-",
                f"{retrained.max_old_change:.4g}",
                f"{constrained.max_old_change!r}",
            ),
            (
                "old items bit for bit unchanged",
                "-",
                _yes(retrained.old_unchanged),
                _yes(constrained.old_unchanged),
            ),
        ]
        rows += [
            (
                f"nearest centroid: {item} ({KIND[item]})",
                "-",
                _mark(retrained.placed[item], KIND[item]),
                _mark(constrained.placed[item], KIND[item]),
            )
            for item in ADDED
        ]
        rows += [
            (
                "classifier accuracy, old items",
                f"{self.original_accuracy:.0%}",
                f"{retrained.old_accuracy:.0%}",
                f"{constrained.old_accuracy:.0%}",
            ),
            (
                "classifier accuracy, new items",
                "-",
                f"{retrained.new_accuracy:.0%}",
                f"{constrained.new_accuracy:.0%}",
            ),
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join([row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, 4)])
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _mark(placed: str, kind: str) -> str:
    return placed if placed == kind else f"{placed} (wrong)"


def _centroids(points: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each kind's centroid of the old items in ``points``."""
    return {
        kind: _stack(points, [i for i in OLD_ITEMS if KIND[i] == kind]).mean(dim=0)
        for kind in KINDS
    }


def _compare(
    name: str,
    coordinates: dict[str, Tensor],
    original: dict[str, Tensor],
    centroids: dict[str, Tensor],
    classifier: KindClassifier,
) -> Expansion:
    old, new = _stack(original, OLD_ITEMS), _stack(coordinates, OLD_ITEMS)
    placed = {
        item: min(KINDS, key=lambda kind: float((coordinates[item] - centroids[kind]).norm()))
        for item in ADDED
    }
    return Expansion(
        name=name,
        coordinates=coordinates,
        max_old_change=float((new - old).abs().max()),
        # Compare the bits, not the values: equal values could still differ in sign of zero.
        old_unchanged=torch.equal(new.view(torch.int32), old.view(torch.int32)),
        placed=placed,
        old_accuracy=classifier.accuracy(coordinates, OLD_ITEMS),
        new_accuracy=classifier.accuracy(coordinates, ADDED),
    )


def run(
    outdir: Path | str,
    epochs: int,
    seed: int,
    progress_bar: bool | None = None,
    announce: Callable[[str], None] | None = None,
) -> Summary:
    """Train, expand both ways, compare, and draw the figure into ``outdir``.

    Args:
        outdir: the folder for the figure; created if missing.
        epochs: epochs for each of the three fits.
        seed: seeds every random draw (initialisations, shuffling, new rows); the same seed
            gives the same result.
        progress_bar: show Lightning's progress bar during the fits. Default: when standard
            output is a terminal.
        announce: called with one line per finished fit (``print``, say). Default: silent.

    Returns:
        The summary of the run.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    summary = expand_once(outdir, epochs, seed, progress_bar, announce)
    _draw(summary, summary.classifier)
    return summary


def sweep(
    outdir: Path | str,
    epochs: int,
    seeds: Sequence[int],
    announce: Callable[[str], None] | None = None,
) -> list[Summary]:
    """Run the expansion (no figure) once per seed; see `sweep_report`."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return [expand_once(outdir, epochs, seed, False, announce) for seed in seeds]


def expand_once(
    outdir: Path,
    epochs: int,
    seed: int,
    progress_bar: bool | None = None,
    announce: Callable[[str], None] | None = None,
) -> Summary:
    """Train the original, retrain from scratch, expand with the constraint; compare."""
    show_bar = sys.stdout.isatty() if progress_bar is None else progress_bar
    # Every random draw comes from a generator of its own, so the run does not depend on (or
    # change) the global random state.
    generator = torch.Generator().manual_seed(seed)

    def fit(
        label: str, model: TripleModel, data: Tensor, callbacks: Sequence[pl.Callback] = ()
    ) -> None:
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            deterministic=True,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=show_bar,
            default_root_dir=outdir,
            callbacks=list(callbacks),
        )
        shuffle = _child(generator)
        start = time.perf_counter()
        trainer.fit(
            model, DataLoader(TensorDataset(data), BATCH_SIZE, shuffle=True, generator=shuffle)
        )
        if announce is not None:
            rows = model.embedding.num_embeddings
            seconds = time.perf_counter() - start
            announce(f"seed {seed}: {label} ({rows} items, {epochs} epochs) in {seconds:.1f} s")

    data_1 = triples(OLD_ITEMS, [FRUITS, VEGETABLES])
    data_2 = triples(NEW_ITEMS, [FRUITS + NEW_FRUITS, VEGETABLES + NEW_VEGETABLES])

    model = TripleModel(_fresh_embedding(len(OLD_ITEMS), _child(generator)))
    fit("trained the original", model, data_1)
    original = _coordinates(model.embedding, OLD_ITEMS)
    classifier = KindClassifier.fit(_stack(original, OLD_ITEMS), [KIND[i] for i in OLD_ITEMS])
    original_accuracy = classifier.accuracy(original, OLD_ITEMS)

    retrained_model = TripleModel(_fresh_embedding(len(NEW_ITEMS), _child(generator)))
    fit("retrained from scratch", retrained_model, data_2)
    retrained = _coordinates(retrained_model.embedding, NEW_ITEMS)

    embedding_2 = expand(
        model.embedding, OLD_ITEMS, NEW_ITEMS, init="mean", generator=_child(generator)
    )
    model_2 = TripleModel(embedding_2)
    constraint = EmbeddingConstraint.from_vocabularies(
        model_2.embedding, model.embedding, OLD_ITEMS, NEW_ITEMS
    )
    fit("expanded with the constraint", model_2, data_2, callbacks=[constraint])
    constrained = _coordinates(model_2.embedding, NEW_ITEMS)

    return Summary(
        figure=outdir / FIGURE_NAME,
        seed=seed,
        epochs=epochs,
        original=original,
        original_accuracy=original_accuracy,
        retrained=_compare("retrained", retrained, original, _centroids(retrained), classifier),
        # The original centroids: the constrained expansion claims the old items did not move.
        constrained=_compare(
            "constrained", constrained, original, _centroids(original), classifier
        ),
        classifier=classifier,
    )


def sweep_report(summaries: Sequence[Summary]) -> str:
    """What the expansions over several seeds did, as a few lines of text."""
    count = len(summaries)
    seeds = [s.seed for s in summaries]
    moved = [s.retrained.max_old_change for s in summaries]
    retrained_acc = [s.retrained.old_accuracy for s in summaries]
    kept = sum(s.retrained.old_accuracy == s.original_accuracy for s in summaries)
    unchanged = sum(s.constrained.old_unchanged for s in summaries)
    constrained_kept = sum(s.constrained.old_accuracy == s.original_accuracy for s in summaries)
    placed = sum(not s.constrained.misplaced for s in summaries)
    header = (
        f"Over {count} seeds ({min(seeds)} to {max(seeds)}), {summaries[0].epochs} epochs per fit:"
    )
    retrained = (
        f"  retrained:   old items moved by {min(moved):.2f} to {max(moved):.2f} (largest "
        "coordinate change per seed); the classifier fitted to the original kept every old "
        f"item in {kept} of {count} seeds (old-item accuracy {min(retrained_acc):.0%} to "
        f"{max(retrained_acc):.0%})"
    )
    constrained = (
        f"  constrained: old items bit for bit unchanged in {unchanged} of {count} seeds; the "
        f"classifier kept every old item in {constrained_kept} of {count}; the new items "
        f"settled with their kind in {placed} of {count}"
    )
    return f"{header}\n{retrained}\n{constrained}"


def _limits(points: Sequence[Tensor]) -> Limits:
    """Square limits around ``points`` with a margin, so equal-aspect panels are alike."""
    stacked = torch.cat([p.reshape(-1, 2) for p in points]).double()
    low, high = stacked.min(dim=0).values, stacked.max(dim=0).values
    centre = (low + high) / 2
    half = float((high - low).max()) / 2 * 1.25 + 0.1
    x, y = float(centre[0]), float(centre[1])
    return (x - half, x + half), (y - half, y + half)


# Label layout in points: the panel's approximate width, the label's distance from its marker,
# and the approximate size of a character and of a marker.
_PANEL_POINTS = 330.0
_LABEL_GAP = 7.0
_CHAR_WIDTH = 5.0
_TEXT_HEIGHT = 9.0
_MARKER = 5.0
_COMPASS: tuple[Direction, ...] = tuple(
    (math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)) for k in range(8)
)


def _alignment(direction: Direction) -> tuple[str, str]:
    dx, dy = direction
    horizontal = "left" if dx > 0.4 else "right" if dx < -0.4 else "center"
    vertical = "bottom" if dy > 0.4 else "top" if dy < -0.4 else "center"
    return horizontal, vertical


def _label_box(x: float, y: float, text: str, direction: Direction) -> Box:
    """The box, in points, of ``text`` set at ``direction`` from a marker at ``(x, y)``."""
    ax, ay = x + _LABEL_GAP * direction[0], y + _LABEL_GAP * direction[1]
    width = _CHAR_WIDTH * len(text)
    horizontal, vertical = _alignment(direction)
    left = {"left": ax, "right": ax - width, "center": ax - width / 2}[horizontal]
    bottom = {"bottom": ay, "top": ay - _TEXT_HEIGHT, "center": ay - _TEXT_HEIGHT / 2}[vertical]
    return (left, bottom, left + width, bottom + _TEXT_HEIGHT)


def _overlap(a: Box, b: Box) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(width, 0.0) * max(height, 0.0)


def _label_cost(
    box: Box, direction: Direction, outward: Tensor, taken: Sequence[Box], frame: Box
) -> float:
    """Area of ``box`` over markers and labels, twice that outside ``frame``, less outwardness."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    covered = sum(_overlap(box, other) for other in taken)
    outside = area - _overlap(box, frame)
    return (
        covered
        + 2 * outside
        - (direction[0] * float(outward[0]) + direction[1] * float(outward[1]))
    )


def _label_directions(
    points: dict[str, Tensor], limits: Limits, fixed: dict[str, Direction] | None = None
) -> dict[str, Direction]:
    """Place each label in the compass direction where it covers the least of the others.

    Labels in ``fixed`` keep their direction (so old items are labelled alike in the original
    and the constrained panel); the others are placed one by one, avoiding markers, labels
    placed before them and the panel's edge, and pointing away from their kind's centre when
    several directions are free.
    """
    fixed = fixed or {}
    (x0, x1), (y0, y1) = limits
    scale = _PANEL_POINTS / (x1 - x0)  # points per data unit; the panels are square
    at = {item: (float(p[0]) * scale, float(p[1]) * scale) for item, p in points.items()}
    frame = (x0 * scale, y0 * scale, x1 * scale, y1 * scale)
    taken = [(x - _MARKER, y - _MARKER, x + _MARKER, y + _MARKER) for x, y in at.values()]
    directions: dict[str, Direction] = {}
    for item in sorted(points, key=lambda item: item not in fixed):
        x, y = at[item]
        centre = _stack(points, [i for i in points if KIND[i] == KIND[item]]).mean(dim=0)
        outward = points[item] - centre
        outward = outward / max(float(outward.norm()), 1e-9)
        candidates = [fixed[item]] if item in fixed else list(_COMPASS)
        costs = {
            d: _label_cost(_label_box(x, y, item, d), d, outward, taken, frame) for d in candidates
        }
        best = min(costs, key=costs.__getitem__)
        directions[item] = best
        taken.append(_label_box(x, y, item, best))
    return directions


def _panel(
    axes: Axes,
    title: str,
    points: dict[str, Tensor],
    classifier: KindClassifier,
    limits: Limits,
    labels: dict[str, Direction],
) -> None:
    (x0, x1), (y0, y1) = limits
    # The original classifier's verdict, shaded: it is applied to every panel unchanged.
    xs, ys = torch.linspace(x0, x1, 200), torch.linspace(y0, y1, 200)
    grid_x, grid_y = torch.meshgrid(xs, ys, indexing="xy")
    logit = classifier.fruit_logit(torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2))
    is_fruit = (logit > 0).double().reshape(grid_x.shape)
    axes.contourf(
        grid_x.numpy(),
        grid_y.numpy(),
        is_fruit.numpy(),
        levels=[-0.5, 0.5, 1.5],
        colors=[COLOURS["vegetable"], COLOURS["fruit"]],
        alpha=0.12,
    )
    axes.contour(
        grid_x.numpy(),
        grid_y.numpy(),
        is_fruit.numpy(),
        levels=[0.5],
        colors="grey",
        linestyles="dashed",
        linewidths=1,
    )
    for item, point in points.items():
        new = item in ADDED
        x, y = float(point[0]), float(point[1])
        axes.scatter(
            [x],
            [y],
            s=160 if new else 60,
            marker="*" if new else "o",
            color=COLOURS[KIND[item]],
            edgecolors="black",
            linewidths=0.8 if new else 0.4,
            zorder=3,
        )
        direction = labels[item]
        horizontal, vertical = _alignment(direction)
        axes.annotate(
            item,
            (x, y),
            xytext=(_LABEL_GAP * direction[0], _LABEL_GAP * direction[1]),
            textcoords="offset points",
            ha=horizontal,
            va=vertical,
            fontsize=8,
            fontweight="bold" if new else "normal",
            zorder=4,
        )
    axes.set_xlim(x0, x1)
    axes.set_ylim(y0, y1)
    axes.set_aspect("equal", adjustable="box")
    axes.set_title(title, fontsize=10)


def _draw(summary: Summary, classifier: KindClassifier) -> None:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    retrained, constrained = summary.retrained, summary.constrained
    # One scale for all three panels, so distances compare across them.
    limits = _limits(
        [
            *summary.original.values(),
            *retrained.coordinates.values(),
            *constrained.coordinates.values(),
        ]
    )
    old_labels = _label_directions(summary.original, limits)
    figure = Figure(figsize=(13, 5.8), layout="constrained")
    left, middle, right = figure.subplots(1, 3)
    _panel(
        left,
        f"original: 12 items\nclassifier accuracy {summary.original_accuracy:.0%}",
        summary.original,
        classifier,
        limits,
        old_labels,
    )
    # Where each old item was: a faint marker and an arrow to where retraining put it.
    for item in OLD_ITEMS:
        (x0, y0), (x1, y1) = summary.original[item].tolist(), retrained.coordinates[item].tolist()
        middle.scatter([x0], [y0], s=60, color=COLOURS[KIND[item]], alpha=0.25, zorder=2)
        middle.annotate(
            "",
            (x1, y1),
            xytext=(x0, y0),
            arrowprops={"arrowstyle": "->", "color": "grey", "alpha": 0.6, "linewidth": 0.8},
            zorder=2,
        )
    _panel(
        middle,
        f"retrained from scratch: 16 items\nold items moved up to {retrained.max_old_change:.3g}; "
        f"classifier: old {retrained.old_accuracy:.0%}, new {retrained.new_accuracy:.0%}",
        retrained.coordinates,
        classifier,
        limits,
        _label_directions(retrained.coordinates, limits),
    )
    _panel(
        right,
        f"constrained (EmbeddingConstraint): 16 items\nold items moved "
        f"{constrained.max_old_change!r}; classifier: old {constrained.old_accuracy:.0%}, "
        f"new {constrained.new_accuracy:.0%}",
        constrained.coordinates,
        classifier,
        limits,
        _label_directions(constrained.coordinates, limits, fixed=old_labels),
    )
    for axes in (left, middle, right):
        axes.set_xlabel("dimension 1", fontsize=9)
    left.set_ylabel("dimension 2", fontsize=9)
    handles = [
        Line2D([], [], marker="o", linestyle="", color=COLOURS["fruit"], label="fruit"),
        Line2D([], [], marker="o", linestyle="", color=COLOURS["vegetable"], label="vegetable"),
        Line2D(
            [],
            [],
            marker="*",
            markersize=12,
            linestyle="",
            color="white",
            markeredgecolor="black",
            label="new item",
        ),
        Line2D(
            [], [], marker="o", linestyle="", color="grey", alpha=0.3, label="original position"
        ),
        Patch(facecolor=COLOURS["fruit"], alpha=0.25, label="classifier (fit to original): fruit"),
        Patch(
            facecolor=COLOURS["vegetable"],
            alpha=0.25,
            label="classifier (fit to original): vegetable",
        ),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9)
    figure.suptitle(
        f"Expanding a 2-D produce embedding (seed {summary.seed}, {summary.epochs} epochs per fit)",
        fontsize=12,
    )
    figure.savefig(summary.figure, dpi=110)


def _quiet_lightning() -> None:
    """Keep Lightning's notices (devices, tips, small-dataset warnings) off the console."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (
        ".*isinstance\\(treespec, LeafSpec\\)",  # Lightning's call of a deprecated torch API
        ".*does not have many workers",
        ".*available but not used",
        "The number of training batches .* is smaller than the logging interval",
    ):
        warnings.filterwarnings("ignore", message=message)


def main(argv: list[str] | None = None) -> int:
    """Run the demo from the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        description="Expand a trained produce embedding with and without EmbeddingConstraint."
    )
    parser.add_argument(
        "--outdir", type=Path, default=Path("demo-output"), help="default: ./demo-output"
    )
    parser.add_argument("--epochs", type=_positive, default=60, help="epochs per fit; default: 60")
    parser.add_argument("--seed", type=int, default=0, help="the pictured run's seed; default: 0")
    parser.add_argument(
        "--seeds",
        type=_count,
        default=8,
        help="seeds the expansion runs over for the summary, from --seed on (0: none); default: 8",
    )
    args = parser.parse_args(argv)
    _quiet_lightning()

    summary = run(args.outdir, args.epochs, args.seed, announce=print)
    print()
    print(summary.table())
    print()
    more = [args.seed + k for k in range(1, args.seeds)]
    summaries = [summary, *sweep(args.outdir, args.epochs, more, announce=print)]
    if args.seeds > 1:
        print()
        print(sweep_report(summaries))
        print()
    problems = [f"seed {s.seed}: {problem}" for s in summaries for problem in s.problems]
    for problem in problems:
        print(f"produce demo FAILED: {problem}", file=sys.stderr)
    if not problems:
        print(
            "The constrained expansion kept every old item bit for bit and placed every new "
            "item with its kind" + (f", in all {len(summaries)} seeds." if args.seeds > 1 else ".")
        )
    print(f"Figure: {summary.figure.absolute()}")
    return 1 if problems else 0


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count of seeds, 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of epochs, got {value}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
