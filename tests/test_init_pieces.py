"""`expand_vocabulary(..., init="pieces")`: added tokens start from their old pieces' rows.

Tokenizers are built by hand (a BPE model given its vocabulary and merges), so the pieces the
old tokenizer splits each added token into are known: ``abcd`` is ``ab`` + ``cd``, ``ba`` is
``b`` + ``a``; ``zz`` has no old piece (``[UNK]``) and ``<sep>`` is special: both fall back to
``init="mean"``. Models are the tiny ones of `test_transformers`.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

transformers = pytest.importorskip("transformers")

from test_expand_checks import _assert_unchanged, _snapshot
from test_transformers import _model, _quiet_transformers  # noqa: F401
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from embedding_constraint.transformers import expand_vocabulary

OLD_TOKENS = ["[PAD]", "[UNK]", "a", "b", "c", "d", "ab", "cd"]
OLD_MERGES = [("a", "b"), ("c", "d")]
# A retrained tokenizer: the old tokens re-sorted, two merges of old pieces added.
NEW_TOKENS = ["[PAD]", "[UNK]", "cd", "ab", "d", "c", "b", "a", "abcd", "ba"]
NEW_MERGES = [*OLD_MERGES, ("ab", "cd"), ("b", "a")]
PIECES = {"abcd": ["ab", "cd"], "ba": ["b", "a"]}
FALLBACK = ["zz", "<sep>"]  # no old piece for "z"; a special token


def _tokenizer(
    tokens: list[str], merges: list[tuple[str, str]], byte_level: bool = False
) -> Any:  # transformers is partly typed
    bpe = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="[UNK]")
    )
    if byte_level:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
    else:
        bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="[UNK]", pad_token="[PAD]"
    )


def _tokenizers() -> tuple[Any, Any]:
    old = _tokenizer(OLD_TOKENS, OLD_MERGES)
    new = _tokenizer(NEW_TOKENS, NEW_MERGES)
    new.add_tokens(["zz"])
    new.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    return old, new


def _old_tensors(model: Any) -> dict[str, Tensor]:
    head = model.get_output_embeddings()
    tensors = {"input": model.get_input_embeddings().weight.detach().clone()}
    if head.weight is not model.get_input_embeddings().weight:
        tensors["head"] = head.weight.detach().clone()
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().clone()
    return tensors


def _new_tensors(model: Any, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    """The expanded model's tensors of the same ``parts`` as `_old_tensors` found."""
    head = model.get_output_embeddings()
    tensors = {"input": model.get_input_embeddings().weight, "head": head.weight, "bias": head.bias}
    return {part: tensors[part].detach() for part in parts}


def _piece_mean(rows: Tensor, ids: list[int]) -> Tensor:
    return rows[ids].to(torch.float32).mean(dim=0).to(rows.dtype)


@pytest.mark.parametrize(("kind", "tied"), [("llama", True), ("llama", False), ("phi", False)])
def test_added_rows_are_the_mean_of_their_old_pieces_rows(kind: str, tied: bool) -> None:
    old_tokenizer, new_tokenizer = _tokenizers()
    model = _model(kind, tied, len(OLD_TOKENS))
    old = _old_tensors(model)
    expand_vocabulary(model, old_tokenizer, new_tokenizer, init="pieces")
    new = _new_tensors(model, old)
    old_ids, new_ids = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    assert sorted(new) == sorted(old)  # the head (untied) and the bias (Phi) are there too
    for token, pieces in PIECES.items():
        ids = [old_ids[p] for p in pieces]
        for part, rows in old.items():
            assert torch.equal(new[part][new_ids[token]], _piece_mean(rows, ids)), (token, part)
    for token in OLD_TOKENS:  # kept bit for bit at their new ids
        for part, rows in old.items():
            assert torch.equal(new[part][new_ids[token]], rows[old_ids[token]])
    head = model.get_output_embeddings()
    assert (
        model.get_input_embeddings().parametrizations.weight is head.parametrizations.weight
    ) == tied


def test_byte_level_tokens_are_split_with_their_leading_space() -> None:
    # "Ġab" is " ab": the old tokenizer splits it into "Ġa" + "b", not "a" + "b".
    old_tokens = ["[PAD]", "[UNK]", "Ġ", "a", "b", "Ġa"]
    old_tokenizer = _tokenizer(old_tokens, [("Ġ", "a")], byte_level=True)
    new_tokenizer = _tokenizer([*old_tokens, "Ġab"], [("Ġ", "a"), ("Ġa", "b")], byte_level=True)
    model = _model("llama", False, len(old_tokens))
    old = _old_tensors(model)
    expand_vocabulary(model, old_tokenizer, new_tokenizer, init="pieces")
    new = _new_tensors(model, old)
    for part, rows in old.items():
        assert torch.equal(new[part][6], _piece_mean(rows, [5, 4])), part


@pytest.mark.parametrize(("kind", "tied"), [("llama", True), ("llama", False), ("phi", False)])
def test_tokens_without_old_pieces_start_as_init_mean_starts_them(kind: str, tied: bool) -> None:
    old_tokenizer, new_tokenizer = _tokenizers()
    model = _model(kind, tied, len(OLD_TOKENS))
    reference = copy.deepcopy(model)
    parts = _old_tensors(model)
    expand_vocabulary(
        model,
        old_tokenizer,
        new_tokenizer,
        init="pieces",
        generator=torch.Generator().manual_seed(3),
    )
    # Only the fallback tokens added, in the same order: init="mean" draws the same noise.
    expand_vocabulary(
        reference,
        OLD_TOKENS,
        [*OLD_TOKENS, *FALLBACK],
        init="mean",
        generator=torch.Generator().manual_seed(3),
    )
    new, expected = _new_tensors(model, parts), _new_tensors(reference, parts)
    new_ids = new_tokenizer.get_vocab()
    for i, token in enumerate(FALLBACK):
        for part in new:
            assert torch.equal(new[part][new_ids[token]], expected[part][len(OLD_TOKENS) + i])


def test_a_list_of_new_tokens_is_read_with_the_old_tokenizer() -> None:
    old_tokenizer, _ = _tokenizers()
    model = _model("llama", False, len(OLD_TOKENS))
    old = _old_tensors(model)
    expand_vocabulary(model, old_tokenizer, [*OLD_TOKENS, "abcd", "zz"], init="pieces")
    new = _new_tensors(model, old)
    for part, rows in old.items():
        assert torch.equal(new[part][8], _piece_mean(rows, [6, 7])), part
    mean = old["input"].mean(dim=0)
    torch.testing.assert_close(new["input"][9], mean, rtol=0, atol=0.05)  # the fallback


@pytest.mark.parametrize(
    "old_vocab", [OLD_TOKENS, {t: i for i, t in enumerate(OLD_TOKENS)}], ids=["list", "mapping"]
)
def test_a_vocabulary_without_a_tokenizer_is_refused_and_changes_nothing(old_vocab: Any) -> None:
    _, new_tokenizer = _tokenizers()
    model = _model("llama", False, len(OLD_TOKENS))
    before = _snapshot(model)
    with pytest.raises(TypeError, match=r"`old_vocab` to be the old tokenizer.*init='pieces'"):
        expand_vocabulary(model, old_vocab, new_tokenizer, init="pieces")
    _assert_unchanged(model, before)


def test_an_added_token_that_is_not_a_string_is_refused_and_changes_nothing() -> None:
    old_tokenizer, _ = _tokenizers()
    model = _model("llama", False, len(OLD_TOKENS))
    before = _snapshot(model)
    with pytest.raises(TypeError, match=r"added tokens to be strings.*Got int 7"):
        expand_vocabulary(model, old_tokenizer, [*OLD_TOKENS, 7], init="pieces")
    _assert_unchanged(model, before)


def test_an_unknown_init_name_lists_pieces() -> None:
    old_tokenizer, new_tokenizer = _tokenizers()
    model = _model("llama", False, len(OLD_TOKENS))
    with pytest.raises(ValueError, match=r"one of 'mean', 'normal', 'zeros', 'pieces'.*'piece'"):
        expand_vocabulary(model, old_tokenizer, new_tokenizer, init="piece")  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["input", "head", "bias"])
def test_a_non_finite_row_a_piece_reads_is_refused_and_changes_nothing(where: str) -> None:
    old_tokenizer, _ = _tokenizers()
    model = _model("phi", False, len(OLD_TOKENS))
    head = model.get_output_embeddings()
    with torch.no_grad():
        if where == "bias":
            head.bias[7] = float("nan")
        else:
            {"input": model.get_input_embeddings().weight, "head": head.weight}[where][7, 1] = 1e999
    before = _snapshot(model)
    new_vocab = [t for t in OLD_TOKENS if t != "cd"] + ["abcd"]  # "cd" dropped, a piece of "abcd"
    with pytest.raises(ValueError, match=r"init='pieces' reads.*'cd' \(id 7, dropped\)"):
        expand_vocabulary(model, old_tokenizer, new_vocab, init="pieces")
    _assert_unchanged(model, before)


def test_a_non_finite_dropped_row_no_piece_reads_is_dropped() -> None:
    old_tokenizer, _ = _tokenizers()
    model = _model("llama", False, len(OLD_TOKENS))
    with torch.no_grad():
        model.get_input_embeddings().weight[4, 0] = float("nan")  # "c": no piece of "abcd"
    old = _old_tensors(model)
    new_vocab = [t for t in OLD_TOKENS if t != "c"] + ["abcd"]  # no fallback: no mean read
    expand_vocabulary(model, old_tokenizer, new_vocab, init="pieces")
    new = _new_tensors(model, old)
    assert torch.equal(new["input"][-1], _piece_mean(old["input"], [6, 7]))
    assert bool(new["input"].isfinite().all())


def test_a_non_finite_row_the_fallback_mean_reads_is_refused_and_changes_nothing() -> None:
    old_tokenizer, _ = _tokenizers()
    model = _model("llama", False, len(OLD_TOKENS))
    with torch.no_grad():
        model.get_input_embeddings().weight[4, 0] = float("inf")  # "c": dropped, no piece
    before = _snapshot(model)
    new_vocab = [t for t in OLD_TOKENS if t != "c"] + ["abcd", "zz"]  # "zz" reads every row
    with pytest.raises(ValueError, match=r"init='pieces' reads.*'c' \(id 4, dropped\)"):
        expand_vocabulary(model, old_tokenizer, new_vocab, init="pieces")
    _assert_unchanged(model, before)
