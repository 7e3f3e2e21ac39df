"""Vocabulary changes: `align` two token lists, `expand` a module's rows to the new one.

`align` pairs the rows of the tokens two vocabularies share and lists the tokens added and
removed. `expand` builds a new ``nn.Embedding``, ``nn.EmbeddingBag`` or ``nn.Linear`` head
with one row per new token: shared rows copied exactly, added rows initialised; `append` does
it for tokens added at the end, given their count.
`reference_for` gives the shared rows and their new positions, ready for
`fix_rows`.

The Hugging Face integration and the callback build on the pieces here rather than repeating
them: `align_named`, `shared_reference` (the body of `reference_for`, with the caller's
argument names), `check_init_options`, `fresh_rows`, `fresh_bias` and `grow` (the row growth
`expand` and `expand_vocabulary` share), `INITS`. They are the package's own API: public to
its files, not exported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from embedding_constraint.fix_rows import SUPPORTED_MODULES

__all__ = ["Alignment", "align", "append", "expand", "reference_for"]

# How `expand` fills added rows: a named strategy, or a callable given a zero tensor of shape
# (num_added, *trailing) that fills it in place (returning None) or returns the new rows.
Init: TypeAlias = Literal["mean", "normal", "zeros"] | Callable[[Tensor], Tensor | None]

_M = TypeVar("_M", bound=nn.Module)

INITS = ("mean", "normal", "zeros")
# Scale of the old rows' covariance for "mean": small enough that new rows sit at the mean,
# large enough that they differ from each other (as transformers' mean_resizing does).
_COVARIANCE_SCALE = 1e-5
_SHOWN = 10


@dataclass(frozen=True, eq=False)
class Alignment:
    """How the rows of an old vocabulary map onto a new one; built by `align`.

    ``old_rows[i]`` and ``new_rows[i]`` are the rows of the same token in the old and the
    new vocabulary, for every token in both, ordered by new row. Compare alignments field by
    field (``torch.equal`` for the tensors): ``==`` is identity.

    Args:
        old_rows (Tensor): int64, 1-D: the shared tokens' rows in the old vocabulary.
        new_rows (Tensor): int64, 1-D, increasing: the same tokens' rows in the new vocabulary.
        added (tuple): tokens of the new vocabulary not in the old, in new-vocabulary order.
        removed (tuple): tokens of the old vocabulary not in the new, in old-vocabulary order.
    """

    old_rows: Tensor
    new_rows: Tensor
    added: tuple[Hashable, ...]
    removed: tuple[Hashable, ...]

    @property
    def old_size(self) -> int:
        """Number of tokens in the old vocabulary."""
        return self.old_rows.numel() + len(self.removed)

    @property
    def new_size(self) -> int:
        """Number of tokens in the new vocabulary."""
        return self.new_rows.numel() + len(self.added)


def _index(vocab: object, name: str) -> tuple[Sequence[Hashable], dict[Hashable, int]]:
    """Validate ``vocab`` as a non-empty sequence of distinct hashable tokens; map token -> row."""
    if isinstance(vocab, str | bytes | bytearray):
        raise TypeError(
            f"Expected `{name}` to be a sequence of tokens (a list or tuple, say). "
            f"Got {type(vocab).__name__} {vocab[:20]!r}: a string is not a vocabulary; "
            "pass a list of tokens."
        )
    if not isinstance(vocab, Sequence):
        raise TypeError(
            f"Expected `{name}` to be a sequence of tokens (a list or tuple, say). "
            f"Got {type(vocab).__name__}."
        )
    if len(vocab) == 0:
        raise ValueError(f"Expected `{name}` to hold at least one token. Got an empty sequence.")
    index: dict[Hashable, int] = {}
    duplicates: dict[int, list[int]] = {}  # first row -> every row of that token
    for row, token in enumerate(vocab):
        try:
            seen = token in index
        except TypeError:
            raise TypeError(
                f"Expected `{name}` to hold hashable tokens. "
                f"Got an unhashable {type(token).__name__} at position {row}: {token!r}."
            ) from None
        if seen:
            first = index[token]
            duplicates.setdefault(first, [first]).append(row)
        else:
            index[token] = row
    if duplicates:
        shown = [f"{vocab[first]!r} at rows {rows}" for first, rows in duplicates.items()]
        more = ", ..." if len(shown) > _SHOWN else ""
        raise ValueError(
            f"Expected `{name}` to hold distinct tokens. "
            f"Got {len(shown)} duplicated: {', '.join(shown[:_SHOWN])}{more}."
        )
    return vocab, index


def align_named(old: object, new: object, old_name: str, new_name: str) -> Alignment:
    """`align`, naming the two vocabularies ``old_name`` and ``new_name`` in its messages."""
    old_vocab, old_index = _index(old, old_name)
    new_vocab, new_index = _index(new, new_name)
    old_rows: list[int] = []
    new_rows: list[int] = []
    added: list[Hashable] = []
    for new_row, token in enumerate(new_vocab):
        old_row = old_index.get(token)
        if old_row is None:
            added.append(token)
        else:
            old_rows.append(old_row)
            new_rows.append(new_row)
    return Alignment(
        old_rows=torch.tensor(old_rows, dtype=torch.int64),
        new_rows=torch.tensor(new_rows, dtype=torch.int64),
        added=tuple(added),
        removed=tuple(token for token in old_vocab if token not in new_index),
    )


def align(old: Sequence[Hashable], new: Sequence[Hashable]) -> Alignment:
    r"""Pair the rows of the tokens two vocabularies share; list those added and removed.

    Tokens are matched by ``hash`` and ``==``, as dict keys are (so ``1``, ``1.0`` and
    ``True`` are one token). A token's row is its position in its vocabulary.

    Args:
        old (sequence of hashable): the old vocabulary, one distinct token per row.
        new (sequence of hashable): the new vocabulary, one distinct token per row.

    Returns:
        Alignment: ``old_rows``/``new_rows`` for the shared tokens (ordered by new row),
        ``added`` (in ``new`` order) and ``removed`` (in ``old`` order).

    Raises:
        TypeError: ``old`` or ``new`` is not a sequence (a set, a str, ``None``), or holds an
            unhashable token.
        ValueError: ``old`` or ``new`` is empty or holds duplicate tokens.

    Examples:

        >>> from embedding_constraint.vocab import align
        >>> al = align(["<pad>", "a", "b", "c"], ["<pad>", "c", "x", "a"])
        >>> al.old_rows.tolist(), al.new_rows.tolist()
        ([0, 3, 1], [0, 1, 3])
        >>> al.added, al.removed
        (('x',), ('b',))
    """
    return align_named(old, new, "old", "new")


def _standard_normal(
    shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Standard normal samples in ``like``'s dtype and on its device.

    With a generator they are drawn on the generator's device, so a CPU generator gives the
    same numbers whatever device the weight is on.
    """
    if generator is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    noise = torch.randn(shape, dtype=like.dtype, device=generator.device, generator=generator)
    return noise.to(like.device)


def fresh_rows(old: Tensor, count: int, init: Init, generator: torch.Generator | None) -> Tensor:
    """``count`` new rows for a tensor whose old rows are ``old``, shape ``(n, *trailing)``."""
    shape = (count, *old.shape[1:])
    if callable(init):
        rows = old.new_zeros(shape)
        result = init(rows)
        if result is None:
            return rows
        if not isinstance(result, Tensor):
            raise TypeError(
                f"Expected `init` to fill its argument and return None, or return a tensor. "
                f"Got {type(result).__name__}."
            )
        if result.shape != shape:
            raise ValueError(
                f"Expected `init` to return a tensor of shape {shape}. "
                f"Got a tensor of shape {tuple(result.shape)}."
            )
        return result.detach().to(dtype=old.dtype, device=old.device)
    if init == "zeros":
        return old.new_zeros(shape)
    # Statistics in float32 at least: bfloat16 sums and a bfloat16 Cholesky are too coarse.
    x = old.reshape(old.shape[0], -1).to(torch.promote_types(old.dtype, torch.float32))
    mean = x.mean(dim=0)
    if init == "normal":
        std = x.std(dim=0, correction=0)
        rows = mean + std * _standard_normal((count, x.shape[1]), x, generator)
    else:
        centered = x - mean
        covariance = centered.T @ centered / x.shape[0]
        # cholesky(c * S) = sqrt(c) * cholesky(S); factorising S avoids tiny pivots.
        factor, info = torch.linalg.cholesky_ex(covariance)
        if int(info) == 0 and bool(factor.isfinite().all()):
            noise = _standard_normal((count, x.shape[1]), x, generator)
            rows = mean + math.sqrt(_COVARIANCE_SCALE) * (noise @ factor.T)
        else:  # not positive definite (fewer rows than dimensions, a constant dimension)
            rows = mean.expand(count, -1)
    return rows.reshape(shape).to(old.dtype)


def fresh_bias(old: Tensor, count: int, init: Init, generator: torch.Generator | None) -> Tensor:
    """``count`` new bias entries: zeros, normal like the old ones, or else their mean."""
    if init == "zeros":
        return old.new_zeros(count)
    if init == "normal":
        return fresh_rows(old, count, init, generator)
    mean = old.to(torch.promote_types(old.dtype, torch.float32)).mean()
    return mean.expand(count).to(old.dtype)


def grow(old: Tensor, alignment: Alignment, added_rows: Tensor, fresh: Tensor | None) -> Tensor:
    """The new tensor: shared rows copied from ``old``, ``fresh`` at ``added_rows``."""
    new = old.new_empty((alignment.new_size, *old.shape[1:]))
    device = old.device
    new.index_copy_(
        0, alignment.new_rows.to(device), old.index_select(0, alignment.old_rows.to(device))
    )
    if fresh is not None:
        new.index_copy_(0, added_rows.to(device), fresh)
    return new


def check_init_options(init: object, generator: object) -> None:
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(
                f"Expected `init` to be one of {', '.join(map(repr, INITS))} or a callable. "
                f"Got {init!r}."
            )
    elif not callable(init):
        raise TypeError(
            f"Expected `init` to be one of {', '.join(map(repr, INITS))} or a callable. "
            f"Got {type(init).__name__}."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"Expected `generator` to be a torch.Generator or None. Got {type(generator).__name__}."
        )


def _check_module(module: object) -> nn.Embedding | nn.EmbeddingBag | nn.Linear:
    names = "nn.Embedding, nn.EmbeddingBag or nn.Linear"
    if not isinstance(module, SUPPORTED_MODULES):
        raise TypeError(f"Expected `old_module` to be an {names}. Got {type(module).__name__}.")
    if parametrize.is_parametrized(module):
        raise ValueError(
            "Expected `old_module` to be a plain module. Got one with parametrized "
            f"{[n for n in ('weight', 'bias') if parametrize.is_parametrized(module, n)]} "
            "(by fix_rows, say); expand a baked copy: "
            "expand(bake(copy.deepcopy(old_module)), ...)."
        )
    if type(module) not in SUPPORTED_MODULES:
        raise TypeError(
            f"Expected `old_module` to be an {names}. Got {type(module).__name__}, a subclass: "
            "its constructor may take other arguments, so expand cannot rebuild it."
        )
    if not module.weight.is_floating_point():
        raise TypeError(
            "Expected `old_module` to have a floating-point weight. "
            f"Got a weight of dtype {module.weight.dtype}."
        )
    return module


def expand(
    old_module: _M,
    old_vocab: Sequence[Hashable],
    new_vocab: Sequence[Hashable],
    *,
    init: Init = "mean",
    generator: torch.Generator | None = None,
) -> _M:
    r"""Return a new module with one row per token of ``new_vocab``; shared rows copied exactly.

    Supports ``nn.Embedding`` and ``nn.EmbeddingBag`` (rows are embeddings) and ``nn.Linear``
    output heads (rows are output features; the bias grows with them). The new module has the
    same class and settings (``padding_idx`` remapped to the padding token's new row;
    ``max_norm``, ``norm_type``, ``scale_grad_by_freq``, ``sparse``, ``mode``,
    ``include_last_offset``), the old weight's dtype, device and ``requires_grad``, and the
    old module's training mode. ``old_module`` is not changed.

    A token in both vocabularies gets its old row, bit for bit (and, for ``nn.Linear``, its
    old bias entry). A removed token's row is not carried over. An added token's row is
    initialised by ``init``, from statistics of all old rows but the padding row:

    * ``"mean"``: drawn from a normal around the old rows' mean with covariance
      ``1e-5 * Cov(old rows)``, computed in float32 (float64 for a float64 weight); the plain
      mean where that covariance is not positive definite (fewer old rows than dimensions,
      say). This is the approach of transformers' ``resize_token_embeddings(mean_resizing=True)``.
      New bias entries get the old entries' mean.
    * ``"normal"``: drawn per dimension from a normal with the old rows' per-dimension mean
      and (population) standard deviation; new bias entries likewise from the old entries'.
    * ``"zeros"``: zeros, for the bias too.
    * a callable: called once, with a zero tensor of shape ``(num_added, *trailing)`` in the
      weight's dtype and on its device; it fills that tensor in place and returns ``None``, or
      returns the new rows in that shape (``nn.init.normal_`` works either way). It draws from
      its own random source, not ``generator``. New bias entries get the old entries' mean.

    ``init`` is not called when ``new_vocab`` adds no token. A tied output head is expanded on
    its own; tie the new modules again afterwards.

    Args:
        old_module (nn.Module): an ``nn.Embedding``, ``nn.EmbeddingBag`` or ``nn.Linear``
            (not a subclass, not parametrized) with one row per token of ``old_vocab``.
        old_vocab (sequence of hashable): the tokens of ``old_module``'s rows, in order.
        new_vocab (sequence of hashable): the tokens of the new module's rows, in order.
        init (str or callable, optional): ``"mean"``, ``"normal"``, ``"zeros"`` or a callable,
            as above. Default: ``"mean"``.
        generator (torch.Generator, optional): the random source of ``"mean"`` and
            ``"normal"``; the same seed gives bit-identical modules. Default: ``None``, the
            global generator of the weight's device.

    Returns:
        nn.Module: a new module of ``old_module``'s class.

    Raises:
        TypeError: ``old_module`` is not one of the supported classes (a subclass included),
            its weight is not floating-point, a vocabulary is not a sequence or holds an
            unhashable token, ``init`` is neither a known name nor callable, ``generator`` is
            not a ``torch.Generator``, or a callable ``init`` returns something not a tensor.
        ValueError: ``old_module`` is parametrized; a vocabulary is empty or has duplicates;
            ``len(old_vocab)`` differs from the module's row count; ``init`` is an unknown
            name; the padding token is not in ``new_vocab``; ``init`` is ``"mean"`` or
            ``"normal"`` and an old row it reads (a dropped token's too; not the padding row)
            holds NaN or Inf; or a callable ``init`` returns a tensor of the wrong shape.

    Examples:

        >>> import torch
        >>> from torch import nn
        >>> from embedding_constraint.vocab import expand
        >>> old = nn.Embedding(3, 4, padding_idx=0)
        >>> new = expand(old, ["<pad>", "a", "b"], ["a", "z", "b", "<pad>"],
        ...              generator=torch.Generator().manual_seed(0))
        >>> new.weight.shape, new.padding_idx
        (torch.Size([4, 4]), 3)
        >>> torch.equal(new.weight[[0, 2, 3]], old.weight[[1, 2, 0]])
        True
    """
    return cast(_M, _build(_plan(old_module, old_vocab, new_vocab, init, generator)))


@dataclass(frozen=True, eq=False)
class _Expansion:
    """A checked `expand`: the module it starts from and the new module's tensors."""

    module: nn.Embedding | nn.EmbeddingBag | nn.Linear
    rows: int
    padding_idx: int | None
    weight: Tensor
    bias: Tensor | None


def _plan(
    old_module: object,
    old_vocab: Sequence[Hashable],
    new_vocab: Sequence[Hashable],
    init: Init,
    generator: torch.Generator | None,
) -> _Expansion:
    """Every check of `expand`, and the new module's tensors: nothing is built yet."""
    module = _check_module(old_module)
    check_init_options(init, generator)
    alignment = align_named(old_vocab, new_vocab, "old_vocab", "new_vocab")
    kind = type(module).__name__
    weight = module.weight.detach()
    if alignment.old_size != weight.shape[0]:
        raise ValueError(
            f"Expected `old_vocab` to hold one token per row of the {kind} "
            f"({weight.shape[0]} rows). Got {alignment.old_size} tokens."
        )
    padding_idx, new_padding_idx = _padding(module, alignment, old_vocab)
    keep = torch.ones(alignment.new_size, dtype=torch.bool)
    keep[alignment.new_rows] = False
    added_rows = keep.nonzero().flatten()
    count = added_rows.numel()
    with torch.no_grad():
        stats = weight
        if padding_idx is not None and weight.shape[0] > 1:
            # The padding row is not a token's embedding (often zeros): leave it out.
            stats = torch.cat((weight[:padding_idx], weight[padding_idx + 1 :]))
        fresh = None
        if count:
            if init in ("mean", "normal"):
                _check_finite(stats, old_vocab, padding_idx, "`old_module.weight`", init)
            fresh = fresh_rows(stats, count, init, generator)
        new_weight = grow(weight, alignment, added_rows, fresh)
        new_bias = None
        if isinstance(module, nn.Linear) and module.bias is not None:
            bias = module.bias.detach()
            added_bias = None
            if count:
                if init != "zeros":
                    _check_finite(bias, old_vocab, None, "`old_module.bias`", init)
                added_bias = fresh_bias(bias, count, init, generator)
            new_bias = grow(bias, alignment, added_rows, added_bias)
    return _Expansion(module, alignment.new_size, new_padding_idx, new_weight, new_bias)


def _padding(
    module: nn.Module, alignment: Alignment, old_vocab: Sequence[Hashable]
) -> tuple[int | None, int | None]:
    """An embedding's padding row in the old vocabulary and in the new one (both None
    without one); refused if the new vocabulary drops the padding token."""
    if not isinstance(module, nn.Embedding | nn.EmbeddingBag) or module.padding_idx is None:
        return None, None
    padding_idx = module.padding_idx
    kept = (alignment.old_rows == padding_idx).nonzero().flatten()
    if kept.numel() == 0:
        raise ValueError(
            f"Expected `new_vocab` to keep the padding token {old_vocab[padding_idx]!r} "
            f"(row {padding_idx}, the {type(module).__name__}'s padding_idx). Got a "
            "vocabulary without it; add it to `new_vocab`, or expand a copy with "
            "padding_idx=None."
        )
    return padding_idx, int(alignment.new_rows[kept[0]])


def _check_finite(
    rows: Tensor, vocab: Sequence[Hashable], skipped: int | None, name: str, init: Init
) -> None:
    """Refuse NaN or Inf in the old rows an ``init`` reads: it would reach every added row.

    ``skipped`` is the row left out of ``rows`` (the padding row), so that the message names
    the tokens of the rows as ``vocab`` numbers them.
    """
    flat = rows.reshape(rows.shape[0], -1) if rows.dim() else rows.reshape(-1, 1)
    bad = (~flat.isfinite()).any(dim=1).nonzero().flatten().tolist()
    if not bad:
        return
    if skipped is not None:
        bad = [r + (r >= skipped) for r in bad]
    shown = ", ".join(f"{vocab[r]!r} (row {r})" for r in bad[:_SHOWN])
    more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    raise ValueError(
        f"Expected finite values in the rows of {name} that init={init!r} reads (every old "
        f"row, dropped tokens too: they would reach every added row). Got NaN or Inf in "
        f"{len(bad)} rows: {shown}{more}. Replace them, or use init='zeros' or a callable."
    )


def _build(plan: _Expansion) -> nn.Module:
    """The new module of `_plan`'s module's class and settings, holding its tensors."""
    module = plan.module
    new: nn.Module
    if isinstance(module, nn.Embedding):
        new = nn.Embedding(
            plan.rows,
            module.embedding_dim,
            padding_idx=plan.padding_idx,
            max_norm=module.max_norm,
            norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq,
            sparse=module.sparse,
            _weight=plan.weight,
            _freeze=not module.weight.requires_grad,
        )
    elif isinstance(module, nn.EmbeddingBag):
        new = nn.EmbeddingBag(
            plan.rows,
            module.embedding_dim,
            max_norm=module.max_norm,
            norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq,
            mode=module.mode,
            sparse=module.sparse,
            _weight=plan.weight,
            include_last_offset=module.include_last_offset,
            padding_idx=plan.padding_idx,
        )
        new.weight.requires_grad_(module.weight.requires_grad)
    else:
        # On the meta device the constructor's random initialisation costs nothing and draws
        # nothing from the global generator; both parameters are replaced right after.
        new = nn.Linear(
            module.in_features,
            plan.rows,
            bias=plan.bias is not None,
            device="meta",
            dtype=plan.weight.dtype,
        )
        new.weight = nn.Parameter(plan.weight, requires_grad=module.weight.requires_grad)
        if plan.bias is not None:
            assert module.bias is not None  # a bias only where the old module has one
            new.bias = nn.Parameter(plan.bias, requires_grad=module.bias.requires_grad)
    new.train(module.training)
    return new


def append(
    old_module: _M,
    count: int,
    *,
    init: Init = "mean",
    generator: torch.Generator | None = None,
) -> _M:
    r"""Return a new module with ``count`` rows added after the old ones; old rows copied exactly.

    `expand` for the common case of tokens appended at the end of a vocabulary: no token lists
    needed. The old rows keep their positions, so they are a prefix of the new module's rows:
    constrain them with ``fix_rows(new, old.weight)`` (or ``fix_rows(new, old)`` for a head's
    weight and bias) or ``EmbeddingConstraint(new, old)``. ``init`` and ``generator`` are those
    of `expand`.

    Args:
        old_module (nn.Module): an ``nn.Embedding``, ``nn.EmbeddingBag`` or ``nn.Linear``.
        count (int): how many rows to add, 0 or more.
        init (str or callable, optional): how to fill the added rows; see `expand`.
            Default: ``"mean"``.
        generator (torch.Generator, optional): the random source of ``init``; see `expand`.

    Returns:
        nn.Module: a new module of ``old_module``'s class with ``count`` more rows.

    Raises:
        TypeError: ``count`` is not an int; or see `expand`.
        ValueError: ``count`` is negative; or see `expand`.

    Examples:

        >>> import torch
        >>> from torch import nn
        >>> from embedding_constraint.vocab import append
        >>> old = nn.Embedding(1000, 8)
        >>> new = append(old, 50, generator=torch.Generator().manual_seed(0))
        >>> new.weight.shape, torch.equal(new.weight[:1000], old.weight)
        (torch.Size([1050, 8]), True)
    """
    given: object = count  # checked at run time: callers may not be typed
    if not isinstance(given, int) or isinstance(given, bool):
        raise TypeError(f"Expected `count` to be an int. Got {type(given).__name__}.")
    if count < 0:
        raise ValueError(f"Expected `count` to be 0 or more. Got {count}.")
    rows = _check_module(old_module).weight.shape[0]
    return expand(old_module, range(rows), range(rows + count), init=init, generator=generator)


def _check_one_token_per_row(vocab: str, tensor: str, tokens: int, rows: int) -> None:
    """Raise unless a vocabulary of ``tokens`` tokens names each of ``rows`` rows once.

    ``vocab`` and ``tensor`` say, for the message, which arguments they are.
    """
    if tokens == rows:
        return
    spare = (
        " (for rows past the vocabulary, an embedding padded to a multiple of 64 say, add "
        "placeholder tokens that name them)"
        if tokens < rows
        else ""
    )
    raise ValueError(
        f"Expected {vocab} to name one token per row of {tensor} ({rows}). Got {tokens} "
        f"tokens: a missing or extra token would shift every row after it{spare}."
    )


@dataclass(frozen=True)
class ReferenceNames:
    """How the messages of `shared_reference` name its inputs (the caller's arguments)."""

    old_vocab: str = "`alignment`'s old vocabulary"
    old_weight: str = "`old_weight`"
    new_vocab: str = "`alignment`'s new vocabulary"
    new_weight: str = "`new_weight`"


def shared_reference(
    old_weight: Tensor,
    alignment: Alignment,
    new_rows: int | None = None,
    names: ReferenceNames = ReferenceNames(),
) -> Tensor:
    """A detached copy of ``old_weight``'s rows of the tokens both vocabularies share.

    Checked: ``old_weight`` has a row dimension and one row per old token, and (given) the
    tensor the reference is for has ``new_rows`` rows, one per new token.

    Raises:
        ValueError: one of the above does not hold.
    """
    if old_weight.dim() == 0:
        raise ValueError(f"Expected {names.old_weight} to have a row dimension. Got a 0-d tensor.")
    _check_one_token_per_row(
        names.old_vocab, names.old_weight, alignment.old_size, old_weight.shape[0]
    )
    if new_rows is not None:
        _check_one_token_per_row(names.new_vocab, names.new_weight, alignment.new_size, new_rows)
    with torch.no_grad():
        return old_weight.detach().index_select(0, alignment.old_rows.to(old_weight.device))


def reference_for(
    old_weight: Tensor, alignment: Alignment, *, new_weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Return the shared tokens' old rows and their new positions, for `fix_rows`.

    With ``reference, rows = reference_for(old_module.weight, alignment)``,
    ``fix_rows(new_module, reference, rows=rows)`` holds every token the two vocabularies
    share at its old value, in its new row, while the added rows train.

    Args:
        old_weight (Tensor): the old module's weight, one row per token of the old vocabulary.
        alignment (Alignment): the alignment of the old and new vocabularies (`align`).
        new_weight (Tensor, optional): the weight the reference is for (the new module's),
            checked to have one row per token of the new vocabulary: with a new vocabulary a
            token short or long, ``rows`` would name shifted rows, and `fix_rows` could not
            tell. Default: ``None``, not checked (a module made by `expand` has those rows).

    Returns:
        tuple[Tensor, Tensor]: ``(reference, rows)``: a detached copy of ``old_weight``'s rows
        of the shared tokens, and their rows in the new vocabulary (int64, CPU).

    Raises:
        TypeError: ``old_weight`` is not a tensor, ``alignment`` not an `Alignment`, or
            ``new_weight`` neither a tensor nor ``None``.
        ValueError: ``old_weight`` does not have one row per token of the old vocabulary, or
            ``new_weight`` one per token of the new vocabulary.

    Examples:

        >>> import torch
        >>> from torch import nn
        >>> from embedding_constraint import fix_rows
        >>> from embedding_constraint.vocab import align, expand, reference_for
        >>> old_vocab, new_vocab = ["a", "b", "c"], ["c", "new", "a"]
        >>> al = align(old_vocab, new_vocab)
        >>> old = nn.Embedding(3, 2)
        >>> new = expand(old, old_vocab, new_vocab)
        >>> reference, rows = reference_for(old.weight, al, new_weight=new.weight)
        >>> rows.tolist()
        [0, 2]
        >>> new = fix_rows(new, reference, rows=rows)
        >>> torch.equal(new.weight[[0, 2]], old.weight[[2, 0]])
        True
    """
    if not isinstance(old_weight, Tensor):
        raise TypeError(
            f"Expected `old_weight` to be a torch.Tensor. Got {type(old_weight).__name__}."
        )
    if not isinstance(alignment, Alignment):
        raise TypeError(f"Expected `alignment` to be an Alignment. Got {type(alignment).__name__}.")
    if new_weight is not None and not isinstance(new_weight, Tensor):
        raise TypeError(
            f"Expected `new_weight` to be a torch.Tensor or None. Got {type(new_weight).__name__}."
        )
    if new_weight is not None and new_weight.dim() == 0:
        raise ValueError("Expected `new_weight` to have a row dimension. Got a 0-d tensor.")
    new_rows = None if new_weight is None else new_weight.shape[0]
    return shared_reference(old_weight, alignment, new_rows), alignment.new_rows.clone()
