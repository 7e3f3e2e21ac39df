"""`align`, `expand` and `reference_for`: vocabulary alignment, module growth, fixing shared rows."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from embedding_constraint import fix_rows
from embedding_constraint.vocab import Alignment, align, expand, reference_for

# Re-sorted: the added tokens "a", "dog", "zebra" interleave with the kept ones; "sat" is gone.
OLD = ["<pad>", "the", "cat", "sat", "on", "mat"]
NEW = ["<pad>", "a", "cat", "dog", "mat", "on", "the", "zebra"]
OLD_ROWS = [0, 2, 5, 4, 1]  # <pad>, cat, mat, on, the: their rows in OLD ...
NEW_ROWS = [0, 2, 4, 5, 6]  # ... and in NEW
ADDED_ROWS = [1, 3, 7]
DIM = 4

Snapshot = tuple[str, dict[str, Tensor], list[bool]]


def _snapshot(module: nn.Module) -> Snapshot:
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return repr(module), state, [p.requires_grad for p in module.parameters()]


def _assert_unchanged(module: nn.Module, before: Snapshot) -> None:
    text, state, requires_grad = before
    assert repr(module) == text
    now = module.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert [p.requires_grad for p in module.parameters()] == requires_grad


def _embedding(rows: int = len(OLD), dim: int = DIM, **kwargs: Any) -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(rows, dim, **kwargs)


def _from_weight(weight: Tensor, **kwargs: Any) -> nn.Embedding:
    emb = nn.Embedding(weight.shape[0], weight.shape[1], dtype=weight.dtype, **kwargs)
    with torch.no_grad():
        emb.weight.copy_(weight)
    return emb


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------- align


def test_align_resorted_vocabulary_with_interleaved_new_tokens() -> None:
    al = align(OLD, NEW)
    assert al.old_rows.dtype == al.new_rows.dtype == torch.int64
    assert al.old_rows.tolist() == OLD_ROWS
    assert al.new_rows.tolist() == NEW_ROWS
    assert al.added == ("a", "dog", "zebra")
    assert al.removed == ("sat",)
    assert (al.old_size, al.new_size) == (len(OLD), len(NEW))


def test_align_removed_tokens_only() -> None:
    al = align(list("abcdef"), ["f", "b"])
    assert al.old_rows.tolist() == [5, 1]
    assert al.new_rows.tolist() == [0, 1]
    assert al.added == ()
    assert al.removed == ("a", "c", "d", "e")


def test_align_non_string_hashable_tokens() -> None:
    old: list[Hashable] = [0, (1, "x"), frozenset({2}), 3.5, None]
    new: tuple[Hashable, ...] = (None, 7, (1, "x"), 0)
    al = align(old, new)
    assert al.old_rows.tolist() == [4, 1, 0]
    assert al.new_rows.tolist() == [0, 2, 3]
    assert al.added == (7,)
    assert al.removed == (frozenset({2}), 3.5)
    ranges = align(range(3), range(1, 5))
    assert ranges.old_rows.tolist() == [1, 2]
    assert ranges.new_rows.tolist() == [0, 1]
    assert ranges.added == (3, 4)


def test_align_disjoint_vocabularies_share_nothing() -> None:
    al = align(["a", "b"], ["c"])
    assert al.old_rows.shape == al.new_rows.shape == (0,)
    assert al.old_rows.dtype == torch.int64
    assert (al.added, al.removed) == (("c",), ("a", "b"))


@pytest.mark.parametrize(
    ("old", "new", "error", "match"),
    [
        ({"a", "b"}, ["a"], TypeError, r"`old` to be a sequence of tokens.*Got set"),
        (["a"], "ab", TypeError, r"`new` to be a sequence of tokens.*Got str 'ab'"),
        (None, ["a"], TypeError, r"`old` to be a sequence of tokens.*Got NoneType"),
        (["a"], {"a": 0}, TypeError, r"`new` to be a sequence of tokens.*Got dict"),
        (["a", ["b"]], ["a"], TypeError, r"`old` to hold hashable tokens.*list at position 1"),
        ([], ["a"], ValueError, r"`old` to hold at least one token"),
        (["a"], (), ValueError, r"`new` to hold at least one token"),
        (
            ["a", "b", "a", "c", "b", "a"],
            ["a"],
            ValueError,
            r"`old`.*distinct.*2 duplicated: 'a' at rows \[0, 2, 5\], 'b' at rows \[1, 4\]\.",
        ),
        (
            ["a"],
            ["x", 1, True],
            ValueError,
            r"`new` to hold distinct tokens\. Got 1 duplicated: 1 at rows \[1, 2\]\.",
        ),
    ],
    ids=["set", "str", "none", "dict", "unhashable", "empty-old", "empty-new", "dup", "1-is-True"],
)
def test_align_rejects_bad_vocabularies(
    old: Any, new: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        align(old, new)


UNIVERSE = st.lists(st.integers(-5, 30) | st.text(max_size=2), min_size=1, max_size=25, unique=True)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), universe=UNIVERSE)
def test_align_property_pairs_equal_tokens_and_partitions_the_rest(
    data: st.DataObject, universe: list[int | str]
) -> None:
    subset = st.lists(st.sampled_from(universe), min_size=1, unique=True)
    old = data.draw(subset, label="old")
    new = data.draw(subset, label="new")
    al = align(old, new)
    old_rows, new_rows = al.old_rows.tolist(), al.new_rows.tolist()
    assert len(old_rows) == len(new_rows) == len(set(old) & set(new))
    for i, j in zip(old_rows, new_rows, strict=True):
        assert new[j] == old[i]
    assert new_rows == sorted(set(new_rows))
    assert len(set(old_rows)) == len(old_rows)
    assert list(al.added) == [t for t in new if t not in old]
    assert list(al.removed) == [t for t in old if t not in new]
    added_rows = [j for j, t in enumerate(new) if t not in old]
    assert sorted([*new_rows, *added_rows]) == list(range(len(new)))


# ---------------------------------------------------------------------------------- expand


def test_expand_embedding_copies_shared_rows_and_remaps_padding() -> None:
    old_vocab = ["the", "cat", "<pad>", "sat", "on", "mat"]  # padding token in row 2
    old = _embedding(padding_idx=2, max_norm=3.0, norm_type=1.0, scale_grad_by_freq=True)
    before = _snapshot(old)
    new = expand(old, old_vocab, NEW, generator=_seeded())
    _assert_unchanged(old, before)
    assert type(new) is nn.Embedding
    assert new is not old
    assert (new.num_embeddings, new.embedding_dim) == (len(NEW), DIM)
    assert new.padding_idx == 0
    assert (new.max_norm, new.norm_type, new.scale_grad_by_freq, new.sparse) == (
        3.0,
        1.0,
        True,
        False,
    )
    al = align(old_vocab, NEW)
    assert torch.equal(new.weight[al.new_rows], old.weight[al.old_rows])
    assert torch.equal(new.weight[0], torch.zeros(DIM))  # the padding row, carried over
    assert bool(new.weight[ADDED_ROWS].ne(0).all())
    assert new.weight.requires_grad
    assert new.training


def test_expand_keeps_sparse_frozen_and_eval_mode() -> None:
    old = _embedding(sparse=True)
    old.weight.requires_grad_(False)
    old.eval()
    new = expand(old, OLD, NEW, generator=_seeded())
    assert new.sparse
    assert not new.weight.requires_grad
    assert not new.training


def test_expand_refuses_to_drop_the_padding_token() -> None:
    old = _embedding(padding_idx=3)
    before = _snapshot(old)
    with pytest.raises(ValueError, match=r"keep the padding token 'sat' \(row 3, the Embedding"):
        expand(old, OLD, NEW)
    _assert_unchanged(old, before)


def test_expand_embedding_bag_keeps_mode_and_looks_up_the_same_bags() -> None:
    torch.manual_seed(0)
    old = nn.EmbeddingBag(len(OLD), DIM, mode="max", include_last_offset=True, padding_idx=4)
    before = _snapshot(old)
    new = expand(old, OLD, NEW, generator=_seeded())
    _assert_unchanged(old, before)
    assert type(new) is nn.EmbeddingBag
    assert (new.num_embeddings, new.mode, new.include_last_offset) == (len(NEW), "max", True)
    assert new.padding_idx == 5  # "on": row 4 of OLD, row 5 of NEW
    al = align(OLD, NEW)
    assert torch.equal(new.weight[al.new_rows], old.weight[al.old_rows])
    to_new = dict(zip(al.old_rows.tolist(), al.new_rows.tolist(), strict=True))
    old_ids = torch.tensor([1, 2, 4, 5, 0, 2])
    offsets = torch.tensor([0, 3, 6])
    new_ids = torch.tensor([to_new[i] for i in old_ids.tolist()])
    assert torch.equal(new(new_ids, offsets), old(old_ids, offsets))


@pytest.mark.parametrize("bias", [True, False])
def test_expand_linear_head_grows_weight_rows_and_bias(bias: bool) -> None:
    torch.manual_seed(0)
    old = nn.Linear(DIM, len(OLD), bias=bias)
    before = _snapshot(old)
    new = expand(old, OLD, NEW, generator=_seeded())
    _assert_unchanged(old, before)
    assert type(new) is nn.Linear
    assert (new.in_features, new.out_features) == (DIM, len(NEW))
    assert new.weight.shape == (len(NEW), DIM)
    al = align(OLD, NEW)
    assert torch.equal(new.weight[al.new_rows], old.weight[al.old_rows])
    if not bias:
        assert set(new.state_dict()) == {"weight"}
        return
    assert new.bias.shape == (len(NEW),)
    assert torch.equal(new.bias[al.new_rows], old.bias[al.old_rows])
    mean = old.bias.detach().mean()
    assert torch.equal(new.bias[ADDED_ROWS], mean.expand(3))


# ------------------------------------------------------------------------------------ init


def test_mean_init_draws_around_the_mean_with_scaled_covariance() -> None:
    torch.manual_seed(1)
    weight = torch.randn(64, DIM) * torch.tensor([0.5, 1.0, 2.0, 0.1]) + 3.0
    old = _from_weight(weight)
    new = expand(old, list(range(64)), list(range(70)), init="mean", generator=_seeded(7))
    fresh = new.weight.detach()[64:]
    # The same draw, by hand: mean + z @ cholesky(1e-5 * cov).T with z from the same seed.
    mean = weight.mean(0)
    cov = (weight - mean).T @ (weight - mean) / 64
    z = torch.randn(6, DIM, generator=_seeded(7))
    expected = mean + z @ torch.linalg.cholesky(1e-5 * cov).T
    torch.testing.assert_close(fresh, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh, mean.expand(6, -1), rtol=0, atol=0.05)
    assert not torch.equal(fresh[0], fresh[1])


def test_mean_init_falls_back_to_the_mean_without_positive_definite_covariance() -> None:
    row = torch.tensor([1.5, -2.0, 0.25, 4.0])
    weight = torch.cat((torch.zeros(1, DIM), row.expand(4, -1)))  # padding row, then 4 equal rows
    old = _from_weight(weight, padding_idx=0)
    new = expand(old, ["<pad>", "a", "b", "c", "d"], ["<pad>", "a", "x", "b", "y", "c", "d"])
    # The padding row is left out of the statistics: the mean is `row`, not 0.8 * `row`.
    assert torch.equal(new.weight[[2, 4]], row.expand(2, -1))


def test_normal_init_matches_old_per_dimension_mean_and_std() -> None:
    torch.manual_seed(2)
    scale, shift = torch.tensor([0.1, 1.0, 10.0]), torch.tensor([5.0, 0.0, -3.0])
    weight = torch.randn(200, 3) * scale + shift
    old = _from_weight(weight)
    old_vocab = list(range(200))
    new = expand(old, old_vocab, list(range(4200)), init="normal", generator=_seeded())
    fresh = new.weight.detach()[200:]
    assert fresh.shape == (4000, 3)
    assert bool(fresh.isfinite().all())
    std = weight.std(0, correction=0)
    # 4000 draws: the sample mean is within std / 63 of the target, give or take; allow 6 times that.
    assert bool(((fresh.mean(0) - weight.mean(0)).abs() < 0.1 * std).all())
    torch.testing.assert_close(fresh.std(0), std, rtol=0.05, atol=0)


def test_normal_init_linear_bias_entries_are_drawn_like_the_old_ones() -> None:
    torch.manual_seed(3)
    old = nn.Linear(2, 100)
    with torch.no_grad():
        old.bias.copy_(torch.randn(100) * 2.0 - 7.0)
    new = expand(old, list(range(100)), list(range(3100)), init="normal", generator=_seeded())
    fresh = new.bias.detach()[100:]
    torch.testing.assert_close(fresh.mean(), old.bias.detach().mean(), rtol=0, atol=0.15)
    torch.testing.assert_close(fresh.std(), old.bias.detach().std(correction=0), rtol=0.05, atol=0)


def test_zeros_init_zeroes_new_rows_and_bias_entries() -> None:
    torch.manual_seed(0)
    old = nn.Linear(DIM, len(OLD))
    new = expand(old, OLD, NEW, init="zeros")
    assert torch.equal(new.weight[ADDED_ROWS], torch.zeros(3, DIM))
    assert torch.equal(new.bias[ADDED_ROWS], torch.zeros(3))


def test_callable_init_fills_in_place_or_returns_rows() -> None:
    seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def fill(rows: Tensor) -> None:
        seen.append((tuple(rows.shape), rows.dtype))
        rows.copy_(torch.arange(rows.numel(), dtype=rows.dtype).reshape(rows.shape))

    old = nn.Linear(DIM, len(OLD), dtype=torch.float64)
    new = expand(old, OLD, NEW, init=fill)
    assert seen == [((3, DIM), torch.float64)]  # once, for the weight only
    assert torch.equal(new.weight[ADDED_ROWS], torch.arange(12.0, dtype=torch.float64).view(3, 4))
    assert torch.equal(new.bias[ADDED_ROWS], old.bias.detach().mean().expand(3))

    returned = expand(_embedding(), OLD, NEW, init=lambda rows: torch.full(rows.shape, 2.5))
    assert torch.equal(returned.weight[ADDED_ROWS], torch.full((3, DIM), 2.5))

    drawn = expand(_embedding(), OLD, NEW, init=lambda t: nn.init.normal_(t, 10.0, 0.01))
    torch.testing.assert_close(
        drawn.weight[ADDED_ROWS], torch.full((3, DIM), 10.0), atol=0.1, rtol=0
    )


def test_init_is_not_called_without_added_tokens() -> None:
    def never(rows: Tensor) -> None:
        raise AssertionError("init called")

    old = _embedding()
    shuffled = OLD[::-1][:4]  # mat, on, sat, cat
    new = expand(old, OLD, shuffled, init=never)
    assert torch.equal(new.weight, old.weight[[5, 4, 3, 2]])


@pytest.mark.parametrize(
    ("init", "error", "match"),
    [
        ("uniform", ValueError, r"one of 'mean', 'normal', 'zeros' or a callable\. Got 'uniform'"),
        (3, TypeError, r"one of 'mean', 'normal', 'zeros' or a callable\. Got int"),
        (lambda rows: "no", TypeError, r"`init` to fill its argument.*Got str"),
        (lambda rows: torch.zeros(4, 3), ValueError, r"shape \(3, 4\)\. Got .*\(4, 3\)"),
    ],
    ids=["unknown-name", "not-callable", "returns-str", "returns-wrong-shape"],
)
def test_expand_rejects_bad_init(init: Any, error: type[Exception], match: str) -> None:
    old = _embedding()
    before = _snapshot(old)
    with pytest.raises(error, match=match):
        expand(old, OLD, NEW, init=init)
    _assert_unchanged(old, before)


def test_unknown_init_is_rejected_even_without_added_tokens() -> None:
    with pytest.raises(ValueError, match="Got 'Mean'"):
        expand(_embedding(), OLD, OLD, init="Mean")  # type: ignore[arg-type]


@pytest.mark.parametrize("init", ["mean", "normal"])
@pytest.mark.parametrize("kind", ["embedding", "linear"])
def test_same_seed_gives_bit_identical_modules(init: Any, kind: str) -> None:
    torch.manual_seed(0)
    old: nn.Embedding | nn.Linear = (
        nn.Embedding(40, DIM) if kind == "embedding" else nn.Linear(DIM, 40)
    )
    old_vocab, new_vocab = list(range(40)), list(range(-5, 45))
    rng_state = torch.get_rng_state()
    first = expand(old, old_vocab, new_vocab, init=init, generator=_seeded(11))
    second = expand(old, old_vocab, new_vocab, init=init, generator=_seeded(11))
    other = expand(old, old_vocab, new_vocab, init=init, generator=_seeded(12))
    assert torch.equal(torch.get_rng_state(), rng_state), "the global generator was used"
    for (name, a), b, c in zip(
        first.named_parameters(), second.parameters(), other.parameters(), strict=True
    ):
        assert torch.equal(a, b), name
        assert torch.equal(a[5:45], c[5:45]), name  # the shared rows
    assert not torch.equal(first.weight[:5], other.weight[:5]), "the seed made no difference"


@pytest.mark.parametrize("init", ["mean", "normal", "zeros"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_expand_keeps_dtype_and_device(init: Any, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    weight = torch.randn(len(OLD) * 4, 3, dtype=dtype)  # more rows than dims: "mean" draws
    old_vocab = [f"{t}{i}" for i in range(4) for t in OLD]
    new_vocab = ["fresh0", *old_vocab[::-1], "fresh1"]
    for old in (
        _from_weight(weight),
        nn.Linear(5, len(old_vocab), dtype=dtype),
    ):
        new = expand(old, old_vocab, new_vocab, init=init, generator=_seeded())
        for p_new, p_old in zip(new.parameters(), old.parameters(), strict=True):
            assert (p_new.dtype, p_new.device) == (dtype, p_old.device)
            assert torch.equal(p_new[1:-1], p_old.flip(0))
            assert bool(p_new[[0, -1]].isfinite().all())


def test_expand_rejects_unsupported_modules() -> None:
    class Scaled(nn.Embedding):
        pass

    conv = nn.Conv1d(2, 3, 1)
    with pytest.raises(
        TypeError, match=r"nn\.Embedding, nn\.EmbeddingBag or nn\.Linear\. Got Conv1d"
    ):
        expand(conv, OLD, NEW)
    sub = Scaled(len(OLD), DIM)
    before = _snapshot(sub)
    with pytest.raises(TypeError, match=r"Got Scaled, a subclass"):
        expand(sub, OLD, NEW)
    _assert_unchanged(sub, before)


def test_expand_rejects_a_parametrized_module() -> None:
    old = _embedding()
    fix_rows(old, torch.zeros(2, DIM))
    before = _snapshot(old)
    with pytest.raises(ValueError, match=r"plain module.*\['weight'\].*bake"):
        expand(old, OLD, NEW)
    _assert_unchanged(old, before)


@pytest.mark.parametrize(
    ("old_vocab", "new_vocab", "error", "match"),
    [
        (OLD[:-1], NEW, ValueError, r"`old_vocab` to hold one token per row of the Embedding \(6 rows\)\. Got 5"),
        ([*OLD, "extra"], NEW, ValueError, r"\(6 rows\)\. Got 7 tokens"),
        (OLD, [*NEW, "cat"], ValueError, r"`new_vocab` to hold distinct tokens.*'cat'"),
        ({*OLD}, NEW, TypeError, r"`old_vocab` to be a sequence"),
        (OLD, None, TypeError, r"`new_vocab` to be a sequence"),
        (OLD, [], ValueError, r"`new_vocab` to hold at least one token"),
    ],
    ids=["too-few", "too-many", "duplicate", "set", "none", "empty"],
)  # fmt: skip
def test_expand_rejects_bad_vocabularies(
    old_vocab: Any, new_vocab: Any, error: type[Exception], match: str
) -> None:
    old = _embedding()
    before = _snapshot(old)
    with pytest.raises(error, match=match):
        expand(old, old_vocab, new_vocab)
    _assert_unchanged(old, before)


def test_expand_rejects_a_bad_generator() -> None:
    with pytest.raises(TypeError, match=r"`generator` to be a torch\.Generator or None\. Got int"):
        expand(_embedding(), OLD, NEW, generator=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reference_for


def test_reference_for_gives_shared_rows_and_their_new_positions() -> None:
    old = _embedding()
    al = align(OLD, NEW)
    reference, rows = reference_for(old.weight, al)
    assert not reference.requires_grad
    assert torch.equal(reference, old.weight[OLD_ROWS])
    assert rows.tolist() == NEW_ROWS
    assert rows.dtype == torch.int64
    rows[0] = 99  # a copy: the alignment is not changed through it
    assert al.new_rows.tolist() == NEW_ROWS


@pytest.mark.parametrize(
    ("weight", "alignment", "error", "match"),
    [
        ([[0.0]], align(OLD, NEW), TypeError, r"`old_weight` to be a torch\.Tensor\. Got list"),
        (torch.zeros(6, 2), (OLD_ROWS, NEW_ROWS), TypeError, r"an Alignment\. Got tuple"),
        (
            torch.zeros(5, 2),
            align(OLD, NEW),
            ValueError,
            r"`alignment`'s old vocabulary to name one token per row of `old_weight` \(5\)\. Got 6",
        ),
        (torch.tensor(1.0), align(OLD, NEW), ValueError, r"`old_weight` to have a row dim"),
    ],
    ids=["not-tensor", "not-alignment", "rows", "0-d"],
)
def test_reference_for_rejects_bad_input(
    weight: Any, alignment: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        reference_for(weight, alignment)


@pytest.mark.parametrize("rows", [len(NEW) - 1, len(NEW) + 1], ids=["short", "long"])
def test_reference_for_checks_the_new_weight_against_the_new_vocabulary(rows: int) -> None:
    # One token short, the shared tokens' rows would all be off by the missing token.
    old = _embedding()
    with pytest.raises(
        ValueError,
        match=rf"`alignment`'s new vocabulary to name one token per row of `new_weight` "
        rf"\({rows}\)\. Got {len(NEW)} tokens",
    ):
        reference_for(old.weight, align(OLD, NEW), new_weight=torch.zeros(rows, DIM))


def test_reference_for_accepts_a_new_weight_of_the_new_vocabularys_length() -> None:
    old = _embedding()
    new = expand(old, OLD, NEW, generator=_seeded())
    reference, rows = reference_for(old.weight, align(OLD, NEW), new_weight=new.weight)
    assert torch.equal(reference, old.weight[OLD_ROWS])
    assert rows.tolist() == NEW_ROWS


@pytest.mark.parametrize(
    ("new_weight", "error", "match"),
    [
        ([[0.0]], TypeError, r"`new_weight` to be a torch\.Tensor or None\. Got list"),
        (torch.tensor(1.0), ValueError, r"`new_weight` to have a row dimension\. Got a 0-d"),
    ],
    ids=["not-tensor", "0-d"],
)
def test_reference_for_rejects_a_bad_new_weight(
    new_weight: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        reference_for(_embedding().weight, align(OLD, NEW), new_weight=new_weight)


@pytest.mark.parametrize("kind", ["embedding", "linear"])
def test_expand_then_fix_rows_keeps_shared_rows_exact_while_training(kind: str) -> None:
    torch.manual_seed(0)
    old: nn.Embedding | nn.Linear = (
        nn.Embedding(len(OLD), DIM, padding_idx=0) if kind == "embedding" else nn.Linear(DIM, 6)
    )
    al = align(OLD, NEW)
    new = expand(old, OLD, NEW, generator=_seeded())
    reference, rows = reference_for(old.weight, al)
    fix_rows(new, reference, rows=rows)
    before = new.weight.detach().clone()
    opt = torch.optim.AdamW(new.parameters(), lr=0.1, weight_decay=0.5)
    inputs = torch.arange(len(NEW)) if kind == "embedding" else torch.randn(5, DIM)
    for _ in range(4):
        opt.zero_grad()
        (new(inputs) - 1.0).pow(2).sum().backward()
        opt.step()
    assert torch.equal(new.weight[al.new_rows], old.weight[al.old_rows])
    assert not torch.equal(new.weight[ADDED_ROWS], before[ADDED_ROWS]), "added rows did not train"


def test_alignment_is_frozen() -> None:
    al = align(OLD, NEW)
    assert isinstance(al, Alignment)
    with pytest.raises(AttributeError):
        al.added = ()  # type: ignore[misc]
    assert al.new_size == len(NEW)


@pytest.mark.parametrize("init", ["mean", "normal"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_row_the_init_reads_is_refused_dropped_tokens_too(
    init: str, bad: float
) -> None:
    old = nn.Embedding(4, 3)
    with torch.no_grad():
        old.weight[2, 1] = bad  # "c", a token the new vocabulary drops
    before = old.weight.detach().clone()
    with pytest.raises(ValueError, match=r"init='(mean|normal)'.*1 rows: 'c' \(row 2\)"):
        expand(old, ["a", "b", "c", "d"], ["a", "b", "d", "new"], init=init)  # type: ignore[arg-type]  # a str of the two
    torch.testing.assert_close(old.weight.detach(), before, rtol=0, atol=0, equal_nan=True)
    # Zeros read no old row; the row stays out of the new module, which is finite.
    new = expand(old, ["a", "b", "c", "d"], ["a", "b", "d", "new"], init="zeros")
    assert bool(new.weight.isfinite().all())


def test_a_non_finite_padding_row_is_not_read_by_the_init() -> None:
    old = nn.Embedding(3, 2, padding_idx=0)
    with torch.no_grad():
        old.weight[0] = float("nan")
    new = expand(old, ["<pad>", "a", "b"], ["<pad>", "a", "b", "new"], init="mean")
    assert bool(new.weight[1:].isfinite().all())  # the padding row is copied as it is


def test_a_non_finite_head_bias_is_refused_where_the_init_reads_it() -> None:
    old = nn.Linear(2, 3)
    with torch.no_grad():
        old.bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"`old_module.bias`.*'y' \(row 1\)"):
        expand(old, ["x", "y", "z"], ["x", "z", "new"], init="mean")
    assert bool(expand(old, ["x", "y", "z"], ["x", "z", "new"], init="zeros").bias.isfinite().all())
