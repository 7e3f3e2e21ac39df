"""Hugging Face models: `expand_vocabulary` grows a model's vocabulary, old tokens held fixed.

An integration on top of `fix_rows`: it resizes a ``transformers`` model's input embedding
and output head in place (their modules, hooks and subclasses stay), puts the old tokens' rows
at their new ids, initialises the added tokens' rows and constrains the old ones. Models are
reached through ``get_input_embeddings`` / ``get_output_embeddings``, never by attribute names,
and ``transformers`` itself is never imported here: the module costs nothing where it is unused.

A constrained model's ``tie_weights`` and ``resize_token_embeddings`` would read the
embedding's weight as a Parameter, which it no longer is. `expand_vocabulary` therefore gives
the model instance its own two methods, which bake, call the model's class's method, and
constrain the same rows again (`_constraints_lifted`); with nothing constrained they are the
class's methods, and ``tie_weights`` with every tie already in place returns at once (no
bake). Its ``save_pretrained`` saves a state dict given
by parameter names (DeepSpeed ZeRO-3's, from ``Trainer.save_model``) with plain keys
(`plain_keys`). `keep_constraints_through_hf_methods` installs the three, for `fix_rows` too.

`expand_vocabulary` plans (`_plan_expansion`: every check, every new tensor computed), then
applies the plan (`_apply_expansion`), which nothing the user passed can make fail.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from embedding_constraint.fix_rows import (
    bake,
    check_lookup_options,
    fix_rows,
    fix_rows_before_optimizers,
    fixed_tensors,
    held_outside,
    holders_of,
    is_fixed,
)
from embedding_constraint.fixed_rows import FixedRows
from embedding_constraint.state_dict import plain_keys
from embedding_constraint.vocab import (
    INITS,
    Alignment,
    Init,
    align_named,
    check_init_options,
    fresh_bias,
    fresh_rows,
    grow,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["expand_vocabulary"]

_Model = TypeVar("_Model", bound="PreTrainedModel")

# How `expand_vocabulary` starts added tokens: `vocab.expand`'s inits, and "pieces" (the mean of
# the rows of the pieces the old tokenizer splits a token's text into), which needs a tokenizer.
ExpansionInit: TypeAlias = Init | Literal["pieces"]
_PIECES = "pieces"

# The config fields that name a token by its id: they follow their token to its new id.
_TOKEN_ID_FIELDS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
)


def _tokens(vocab: object, name: str) -> object:
    """The tokens of ``vocab`` in id order: from a tokenizer, a token -> id mapping, or as given.

    A sequence is returned as it is (`vocab.align` validates it).
    """
    get_vocab = getattr(vocab, "get_vocab", None)
    if callable(get_vocab):  # a tokenizer: its whole vocabulary, added tokens included
        vocab = get_vocab()
    if not isinstance(vocab, Mapping):
        return vocab
    ids = list(vocab.values())
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        bad = next(i for i in ids if not isinstance(i, int) or isinstance(i, bool))
        raise TypeError(f"Expected `{name}` to map tokens to int ids. Got an id {bad!r}.")
    if sorted(ids) != list(range(len(ids))):
        missing = sorted(set(range(len(ids))) - set(ids))[:10]
        raise ValueError(
            f"Expected `{name}` to give the {len(ids)} tokens the ids 0 to {len(ids) - 1}, one "
            f"each. Got ids that skip {missing} or repeat: a vocabulary with gaps has no row "
            "order to follow."
        )
    tokens: list[Hashable] = [None] * len(ids)
    for token, i in vocab.items():
        tokens[i] = token
    return tokens


def _is_tokenizer(vocab: object) -> bool:
    """Whether ``vocab`` can split text (a transformers tokenizer, slow or fast)."""
    return all(
        callable(getattr(vocab, name, None))
        for name in ("get_vocab", "encode", "convert_tokens_to_string")
    )


def _check_init(init: object, generator: object, old_vocab: object) -> None:
    """Refuse an unknown ``init``, and ``"pieces"`` without the old tokenizer to split with.

    Raises:
        TypeError, ValueError: see `expand_vocabulary`.
    """
    names = ", ".join(map(repr, (*INITS, _PIECES)))
    if isinstance(init, str) and init not in (*INITS, _PIECES):
        raise ValueError(f"Expected `init` to be one of {names} or a callable. Got {init!r}.")
    if not isinstance(init, str) and not callable(init):
        raise TypeError(
            f"Expected `init` to be one of {names} or a callable. Got {type(init).__name__}."
        )
    if init == _PIECES and not _is_tokenizer(old_vocab):
        raise TypeError(
            "Expected `old_vocab` to be the old tokenizer (with get_vocab, encode and "
            "convert_tokens_to_string) for init='pieces', which splits each added token's "
            f"text into the old tokenizer's pieces. Got {type(old_vocab).__name__}: pass the "
            "tokenizer itself, or another init ('mean')."
        )
    check_init_options("mean" if init == _PIECES else init, generator)


def _added_pieces(
    old_vocab: Any, new_vocab: Any, added: Sequence[Hashable], old_size: int, padding: int | None
) -> list[list[int] | None]:
    """For each added token, the old ids of the pieces the old tokenizer splits its text into.

    The text is ``convert_tokens_to_string([token])`` of the new tokenizer (of the old one when
    ``new_vocab`` is not a tokenizer), so a byte-level ``"Ġab"`` is ``" ab"``, split with its
    space. None (fall back to the mean) for a special token of the new tokenizer (its spelling
    says nothing of its use), and where the split is empty or holds a special token of the old
    tokenizer (``[UNK]``: an unknown piece), the padding id or an id past ``old_size``.

    Raises:
        TypeError: an added token is not a string.
    """
    speller = new_vocab if _is_tokenizer(new_vocab) else old_vocab
    special = (
        set(getattr(new_vocab, "all_special_tokens", None) or ()) if speller is new_vocab else set()
    )
    unusable = {*(getattr(old_vocab, "all_special_ids", None) or ()), padding}
    found: list[list[int] | None] = []
    for token in added:
        if not isinstance(token, str):
            raise TypeError(
                "Expected the added tokens to be strings for init='pieces' (their text is split "
                f"by the old tokenizer). Got {type(token).__name__} {token!r}."
            )
        if token in special:
            found.append(None)
            continue
        ids = list(
            old_vocab.encode(speller.convert_tokens_to_string([token]), add_special_tokens=False)
        )
        usable = all(type(i) is int and 0 <= i < old_size and i not in unusable for i in ids)
        found.append(ids if ids and usable else None)
    return found


def _rows_from_pieces(
    tokens: Tensor,
    stats: Tensor,
    pieces: list[list[int] | None],
    is_bias: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """The added rows (or bias entries) of init="pieces": the mean of the pieces' old rows
    (``tokens``, by old id), in float32 at least; the rest as init="mean" makes them from
    ``stats``."""
    wide = torch.promote_types(tokens.dtype, torch.float32)
    fresh = tokens.new_empty((len(pieces), *tokens.shape[1:]))
    for i, ids in enumerate(pieces):
        if ids is not None:
            rows = tokens.index_select(0, torch.tensor(ids, device=tokens.device))
            fresh[i] = rows.to(wide).mean(dim=0).to(tokens.dtype)
    fallback = [i for i, ids in enumerate(pieces) if ids is None]
    if fallback:
        make = fresh_bias if is_bias else fresh_rows
        at = torch.tensor(fallback, device=tokens.device)
        fresh.index_copy_(0, at, make(stats, len(fallback), "mean", generator))
    return fresh


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(str(name) for name, module in model.named_modules() if module is target)


def _set_rows(module: nn.Module, rows: int) -> None:
    """Keep a module's size attribute in step with its weight's row count."""
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        module.num_embeddings = rows
    elif isinstance(module, nn.Linear):
        module.out_features = rows


def _moved_id(
    i: int, field: str, old_tokens: Sequence[Hashable], rows: int, new_index: dict[Hashable, int]
) -> int:
    """The new id of the token ``i`` names; ids that name no row (GPT-2's 50256 in a tiny
    config, -100) are left as they are.

    Raises:
        ValueError: ``i`` names a row past the old vocabulary (dropped), or a token that is not
            in the new vocabulary.
    """
    if not 0 <= i < rows:
        return i
    if i >= len(old_tokens):
        raise ValueError(
            f"Expected the model's {field} to name a token of `old_vocab`. Got id {i}, a row "
            f"past its {len(old_tokens)} tokens, which expand_vocabulary drops: set {field} "
            "to a token's id, or pass the whole vocabulary."
        )
    token = old_tokens[i]
    if token not in new_index:
        raise ValueError(
            f"Expected `new_vocab` to keep the token {token!r} (id {i}, the model's {field}). "
            f"Got a vocabulary without it: add it to `new_vocab`, or change {field} first."
        )
    return new_index[token]


def _remapped_ids(
    model: nn.Module, old_tokens: Sequence[Hashable], rows: int, new_index: dict[Hashable, int]
) -> list[tuple[object, str, object]]:
    """The (config, field, new value) of every token id in the config and generation config.

    Besides `_TOKEN_ID_FIELDS`: the generation config's other ``*_token_id`` fields (Whisper's
    ``no_timestamps_token_id``; only ``generate`` reads them), and in every config the token
    maps Whisper's generation config holds (``lang_to_id``, ``task_to_id``: any ``*_to_id``
    dict), ``forced_decoder_ids`` (``[position, id]`` pairs) and the id lists of
    ``bad_words_ids``, ``force_words_ids`` and ``sequence_bias``.

    Raises:
        ValueError: see `_moved_id`.
    """

    def move(i: int, field: str) -> int:
        return _moved_id(i, field, old_tokens, rows, new_index)

    def ids(value: object) -> bool:
        return isinstance(value, list) and all(type(i) is int for i in value)

    changes: list[tuple[object, str, object]] = []
    for label, config in _configs(model):
        for field, value in list(getattr(config, "__dict__", {}).items()):
            moved: object = None
            generation = label == "generation_config" and field.endswith("_token_id")
            if field in _TOKEN_ID_FIELDS or generation:
                if type(value) is int:
                    moved = move(value, field)
                elif ids(value):
                    moved = [move(i, field) for i in value]
            elif field.endswith("_to_id") and isinstance(value, dict):
                moved = {
                    k: move(i, f"{field}[{k!r}]") if type(i) is int else i for k, i in value.items()
                }
            elif field == "forced_decoder_ids" and isinstance(value, list):
                moved = [
                    [pair[0], move(pair[1], field)]
                    if isinstance(pair, list | tuple) and len(pair) == 2 and type(pair[1]) is int
                    else pair
                    for pair in value
                ]
            elif field in ("bad_words_ids", "force_words_ids") and isinstance(value, list):
                moved = _moved_nested(value, field, move)
            elif field == "sequence_bias" and isinstance(value, dict):
                moved = {
                    tuple(_moved_nested(list(k), field, move)) if isinstance(k, tuple) else k: b
                    for k, b in value.items()
                }
            elif field == "sequence_bias" and isinstance(value, list):
                moved = [
                    [_moved_nested(entry[0], field, move), *entry[1:]]
                    if isinstance(entry, list | tuple) and entry and isinstance(entry[0], list)
                    else entry
                    for entry in value
                ]
            if moved is not None:
                changes.append((config, field, moved))
    return changes


def _moved_nested(value: list[Any], field: str, move: Any) -> list[Any]:
    """``value`` with every int in it, at any depth of lists, moved by ``move``."""
    return [
        move(i, field)
        if type(i) is int
        else _moved_nested(i, field, move)
        if isinstance(i, list)
        else i
        for i in value
    ]


def _configs(model: nn.Module) -> list[tuple[str, object]]:
    """The model's config, generation config and text config (where it is another), named."""
    config = getattr(model, "config", None)
    found = [("config", config), ("generation_config", getattr(model, "generation_config", None))]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        sub = text()
        attrs = getattr(config, "__dict__", {})
        found.append((next((f"config.{k}" for k, v in attrs.items() if v is sub), "config"), sub))
    distinct: list[tuple[str, object]] = []
    for name, found_config in found:
        if found_config is not None and all(found_config is not c for _, c in distinct):
            distinct.append((name, found_config))
    return distinct


def _check_unmoved_ids(
    model: nn.Module, old_tokens: Sequence[Hashable], rows: int, new_index: dict[Hashable, int]
) -> None:
    """Refuse a config token id that expand_vocabulary does not move if its token would move.

    Any ``*_token_id`` / ``*_token_index`` field besides `_TOKEN_ID_FIELDS` (ESM's
    ``mask_token_id``, Llava's ``image_token_index``): modules may have copied it at init
    (ESM's embeddings), so it is not rewritten. Its token may keep its id; ids that name no
    row are left as they are.

    Raises:
        ValueError: such a field's token would move, be dropped, or lies past the old
            vocabulary.
    """
    for label, config in _configs(model):
        for field, value in getattr(config, "__dict__", {}).items():
            if field in _TOKEN_ID_FIELDS or not field.endswith(("_token_id", "_token_index")):
                continue
            if label == "generation_config" and field.endswith("_token_id"):
                continue  # `_remapped_ids` moves it
            for i in value if isinstance(value, list) else [value]:
                if type(i) is not int or not 0 <= i < rows:
                    continue
                if i >= len(old_tokens):
                    got = (
                        f"Got id {i}, a row past its {len(old_tokens)} tokens, which "
                        "expand_vocabulary drops"
                    )
                elif old_tokens[i] not in new_index:
                    got = f"Got a `new_vocab` without {old_tokens[i]!r}"
                elif new_index[old_tokens[i]] != i:
                    got = f"Got it at id {new_index[old_tokens[i]]} in `new_vocab`"
                else:
                    continue
                token = f", the token {old_tokens[i]!r}" if i < len(old_tokens) else ""
                raise ValueError(
                    f"Expected {label}.{field} ({i}{token}) to name a token of `old_vocab` "
                    f"that keeps its id: expand_vocabulary does not move {field}, which "
                    f"modules may have copied. {got}. Keep that token at id {i} in "
                    f"`new_vocab`, or clear {field}, expand, and set it (and every module's "
                    "copy of it) yourself."
                )


def _position_padding(model: nn.Module, embeddings: list[nn.Module], padding: int) -> str | None:
    """The name of another module whose padding_idx is the padding id too, or None.

    Models that count positions from the padding id keep it as their position embedding's own
    ``padding_idx`` (RoBERTa's nn.Embedding, M2M100's sinusoidal module), which a moved
    padding token would no longer match. Not counted: a module that holds the input embedding
    (Llama's base model keeps the id to build it; RoBERTa's embeddings module is named by its
    position embedding), and one whose ``forward`` takes no token ids (XGLM's position
    embedding is given positions, Whisper's encoder audio features).
    """
    holders = {
        id(m) for m in model.modules() if any(c is e for c in m.children() for e in embeddings)
    }
    for name, module in model.named_modules():
        value = getattr(module, "padding_idx", None)
        if type(value) is not int or value != padding or any(module is e for e in embeddings):
            continue
        if isinstance(module, nn.Embedding) or (
            id(module) not in holders and _given_token_ids(module)
        ):
            return str(name)
    return None


def _given_token_ids(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes token ids (``input_ids``; assumed where it has no
    signature to read). Whisper's encoder keeps a ``padding_idx`` it never uses, and takes
    audio features."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return "input_ids" in parameters


# The methods by which transformers names a model's tables indexed by token ids, beside its
# input embedding: each module's own input embedding (Marian's untied decoder keeps its own)
# and Gemma 3n's and Gemma 4's per-layer table, which their resize_token_embeddings resizes.
_TABLE_GETTERS = (
    "get_input_embeddings",
    "get_decoder_input_embeddings",
    "get_per_layer_input_embeddings",
)


def _id_tables(
    model: nn.Module, embedding: nn.Module, head: nn.Module | None
) -> list[nn.Embedding]:
    """The model's other nn.Embedding tables indexed by the same token ids, once each.

    Found by `_TABLE_GETTERS` on every module; a table sharing the embedding's or the head's
    weight is moved with it already.
    """
    taken = [embedding.weight, *((head.weight,) if head is not None else ())]
    tables: list[nn.Embedding] = []
    for module in model.modules():
        for getter in _TABLE_GETTERS:
            method = getattr(module, getter, None)
            if not callable(method):
                continue
            try:
                table = method()
            except (AttributeError, NotImplementedError, ValueError, TypeError):
                continue  # Marian's decoder getter refuses where the embedding is shared
            if not isinstance(table, nn.Embedding) or not isinstance(table.weight, Tensor):
                continue
            if any(table.weight is t for t in taken):
                continue
            taken.append(table.weight)
            tables.append(table)
    return tables


def _check_per_token_tensors(
    model: nn.Module, head: nn.Module | None, moved: list[Tensor], sizes: set[int]
) -> None:
    """Refuse a per-token tensor that is not among ``moved``.

    Searched: the whole model's lookup tables (nn.Embedding, nn.EmbeddingBag), buffers and
    Parameters a module holds as its own attribute (not an nn.Linear's, a convolution's or a
    norm's weight and bias: a layer of the model's width may have as many rows as there are
    tokens); and every tensor of the head and of the modules holding it (ESM's head bias
    beside a bias-free head). One entry per token: the first dimension, or the only one larger
    than 1, is one of ``sizes`` (the row counts of the moved tensors).

    Raises:
        ValueError: such a tensor exists.
    """
    near_head = [] if head is None else [head]
    near_head += [m for m in model.modules() if any(c is head for c in m.children())]
    layers = (nn.Linear, nn.modules.conv._ConvNd, nn.LayerNorm, nn.RMSNorm)
    for prefix, owner in model.named_modules():
        searched = (
            any(owner is m for m in near_head)
            or isinstance(owner, nn.Embedding | nn.EmbeddingBag)
            or not isinstance(owner, layers)
        )
        if not searched:
            continue
        for kind, tensors in (("Parameter", owner._parameters), ("buffer", owner._buffers)):
            for attr, tensor in tensors.items():
                if tensor is None or tensor.dim() == 0 or any(tensor is t for t in moved):
                    continue
                count = next(
                    (n for n in sizes if n in (tensor.shape[0], tensor.numel())),
                    None,
                )
                if count is not None and (tensor.shape[0] == count or tensor.shape[-1] == count):
                    name = f"{prefix}.{attr}" if prefix else attr
                    raise ValueError(
                        "Expected the model to have no per-token tensor but the ones "
                        "expand_vocabulary moves (the input embedding, the output head's "
                        "weight and bias, final_logits_bias, the tables transformers' "
                        f"{', '.join(_TABLE_GETTERS)} name). Got {name}, a {kind} of shape "
                        f"{tuple(tensor.shape)}, one entry per token ({count}): it would need "
                        "re-sorting and resizing with the vocabulary, which expand_vocabulary "
                        "does not do for it. Resize the model yourself (resize_token_embeddings "
                        "and a re-sort of that tensor), or make that tensor another size."
                    )


def _check_plain(model: nn.Module, module: nn.Module, what: str) -> None:
    """Refuse an input embedding or head whose weight or bias is not a Parameter it holds.

    A parametrized tensor is computed from others: resizing it would resize nothing stored.
    `FixedRows` among them: the model is constrained already (by an earlier
    `expand_vocabulary`, or `fix_rows`), and expanding it again would re-sort re-sorted rows.

    Raises:
        ValueError: the module is parametrized, or a hook computes its weight or bias.
    """
    prefix = _name_of(model, module)
    if parametrize.is_parametrized(module):
        plists = cast(nn.ModuleDict, module.parametrizations)
        if any(is_fixed(module, attr) for attr in plists):
            raise ValueError(
                f"Expected a model whose {what} is not constrained yet. Got one whose {what} is "
                "already constrained (by an earlier expand_vocabulary, or by fix_rows): its "
                "old rows are held fixed and already at their new ids. To expand it again, "
                "bake(model) first, then expand_vocabulary(model, <the vocabulary it has now: "
                "the earlier call's new_vocab>, new_vocab)."
            )
        found = ", ".join(
            f"{prefix}.{attr} ({', '.join(type(p).__name__ for p in cast(Any, plists[attr]))})"
            for attr in plists
        )
        raise ValueError(
            f"Expected the {what} to have no parametrization. Got {found}: its tensor is "
            "computed from others, which expand_vocabulary cannot resize and re-sort. Remove "
            "it first (torch.nn.utils.parametrize.remove_parametrizations(module, name), "
            "leave_parametrized=True keeps its values), expand, then register it again."
        )
    for attr in ("weight", "bias"):
        value = getattr(module, attr, None)
        if value is not None and module._parameters.get(attr) is not value:
            raise ValueError(
                f"Expected {prefix}.{attr} to be a Parameter that the {what} holds. Got a "
                f"{type(value).__name__} computed by other means (a forward pre-hook, as "
                "torch.nn.utils.weight_norm's): remove that first, then expand."
            )


def _vocabulary_modules(model: object) -> tuple[nn.Embedding, nn.Linear | None]:
    """The model's input embedding and output head (None if it has none), checked.

    Raises:
        TypeError, ValueError: see `expand_vocabulary`.
    """
    get_input = getattr(model, "get_input_embeddings", None)
    if not isinstance(model, nn.Module) or not callable(get_input):
        raise TypeError(
            "Expected `model` to be a transformers PreTrainedModel (a torch.nn.Module with "
            f"get_input_embeddings()). Got {type(model).__name__}."
        )
    embedding = get_input()
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(
            "Expected model.get_input_embeddings() to be an nn.Embedding. "
            f"Got {type(embedding).__name__}."
        )
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None and not isinstance(head, nn.Linear):
        raise TypeError(
            "Expected model.get_output_embeddings() to be an nn.Linear head or None. "
            f"Got {type(head).__name__}."
        )
    for module, what in ((embedding, "input embedding"), (head, "output head")):
        if module is None:
            continue
        _check_plain(model, module, what)
        weight = module.weight
        if not weight.is_floating_point():
            raise TypeError(
                f"Expected the {what}'s weight to be floating point. Got {weight.dtype}."
            )
        if weight.is_meta:
            raise ValueError(
                f"Expected the {what}'s weight to hold values. Got one on the meta device: "
                "load the model's weights first (from_pretrained, or to_empty() and load)."
            )
    for param, what in (
        (embedding.weight, "input embedding"),
        (getattr(head, "weight", None), "output head"),
    ):
        if param is not None and held_outside(model, param, "_parameters"):
            raise ValueError(
                f"Expected the {what}'s weight to be held only by modules under `model`. Got "
                "one that a module outside it holds too (a head tied to it, a shared "
                "embedding): resizing it here would leave that module with the old one. Pass "
                "the whole model (the one with the head)."
            )
    return embedding, head


def expand_vocabulary(
    model: _Model,
    old_vocab: object,
    new_vocab: object,
    *,
    init: ExpansionInit = "mean",
    generator: torch.Generator | None = None,
) -> _Model:
    r"""Grow ``model``'s vocabulary to ``new_vocab``, holding the old tokens' rows fixed.

    The input embedding and the output head (and its bias, if any) get one row per token of
    ``new_vocab``. A token that both vocabularies hold keeps its old row, bit for bit, at its
    new id, and `fix_rows` holds it there while the model trains; a removed token's row is
    dropped (so are rows past the end of ``old_vocab``, which name no token); an added
    token's row is initialised by ``init`` and trains. A tied model stays tied (one
    Parameter, constrained once); an untied head is constrained with its own old rows.
    The model's other tables indexed by the same token ids (an untied Marian decoder's
    embedding, Gemma 3n's and Gemma 4's ``embed_tokens_per_layer``: the ones transformers'
    ``get_input_embeddings`` of any module, ``get_decoder_input_embeddings`` and
    ``get_per_layer_input_embeddings`` name) are re-sorted, grown and constrained as the input
    embedding. ``config.vocab_size`` and the other vocabulary-size fields
    (``decoder_vocab_size``, ``vocab_size_per_layer_input``) with the modules' copies of them
    (XLM's ``n_words``), the token ids in the config and generation config
    (``pad_token_id``, ``bos_token_id``, ..., Whisper's ``lang_to_id``, ``task_to_id``,
    ``forced_decoder_ids``, ``no_timestamps_token_id``, ``bad_words_ids``), the embedding's
    ``padding_idx`` and a ``final_logits_bias`` (BART's) follow the new vocabulary.

    The modules are resized in place, so their class, hooks and other attributes stay.
    Train with anything (a plain loop, ``transformers.Trainer``, Lightning, accelerate);
    create the optimizer afterwards. ``save_pretrained`` writes a plain checkpoint (a tied
    matrix once) that loads without this library; `bake` turns the model into a plain one.
    ``model.tie_weights()`` and ``model.resize_token_embeddings()`` keep working: the model
    gets its own two methods that keep the old rows constrained (added rows are free; after a
    resize, create the optimizer anew, as for a plain model).

    Args:
        model (PreTrainedModel): a model with ``get_input_embeddings()`` returning an
            ``nn.Embedding`` and, optionally, ``get_output_embeddings()`` returning an
            ``nn.Linear`` head (or None).
        old_vocab: the model's vocabulary: a tokenizer (its ``get_vocab()``), a token -> id
            mapping, or a sequence of tokens in id order.
        new_vocab: the new vocabulary, in one of the same forms.
        init (str or callable, optional): how added tokens' rows start: ``"mean"``,
            ``"normal"``, ``"zeros"`` or a callable, as in `embedding_constraint.vocab.expand`,
            or ``"pieces"``: each added token's rows (input embedding, untied head, head bias,
            the other token tables) are the mean of the old rows of the pieces the old
            tokenizer splits the token's text into (``old_vocab`` must be that tokenizer). The
            text is the new tokenizer's ``convert_tokens_to_string([token])`` (the old one's
            where ``new_vocab`` is a list or mapping), so a byte-level ``"Ġab"`` is split as
            ``" ab"``. A token it cannot split (a special token of the new tokenizer, an empty
            split, a piece that is ``[UNK]`` or another special token of the old one) starts as
            ``"mean"`` starts it. Default: ``"mean"``, the approach of transformers'
            ``mean_resizing``.
        generator (torch.Generator, optional): the random source of ``init``. Default: the
            global generator of the weight's device.

    Returns:
        PreTrainedModel: ``model``, resized and constrained in place.

    Raises:
        TypeError: ``model`` has no ``get_input_embeddings``, its input embedding is not an
            ``nn.Embedding`` or its head not an ``nn.Linear``, a weight is not floating
            point, a vocabulary is not one of the forms above, ``final_logits_bias`` is a
            Parameter rather than a buffer, ``init="pieces"`` is given an ``old_vocab`` that
            is not a tokenizer or a ``new_vocab`` that adds a token that is not a string, or
            see `embedding_constraint.vocab.expand` for ``init`` and ``generator``.
        ValueError: the embedding or head is already constrained (an earlier
            ``expand_vocabulary``: bake first, then expand from the vocabulary it has now) or
            has another parametrization (``weight_norm``), or a hook computes its weight; a
            row of a kept token holds NaN or Inf, or one that ``init`` reads (``"mean"`` and
            ``"normal"`` read every old token's, dropped ones included; ``"pieces"`` the
            pieces', and every old token's where a token falls back), or ``init`` gives
            NaN or Inf; a weight is on the meta device; ``old_vocab`` has more tokens than the embedding has rows, or gaps in
            its ids; the head has another row count than the embedding; a vocabulary is
            empty or has duplicates; ``new_vocab`` drops the padding token or a token named
            by a config id; a config id or the padding row lies past the old vocabulary;
            the padding token moves where a position embedding counts from it (RoBERTa,
            M2M100); another ``*_token_id`` / ``*_token_index`` config field (ESM's
            ``mask_token_id``) names a token that moves or is dropped; the head or a module
            holding it has another per-token tensor (ESM's head bias beside a bias-free
            head), or a lookup table, buffer or module's own Parameter elsewhere has one
            entry per token; a second token table has fewer rows than ``old_vocab`` has
            tokens; a config's ``*vocab*offset*`` (Gemma 3n's image tokens) starts another
            vocabulary below the new size; a module outside ``model`` shares its embedding (an inner model was
            passed); or the embedding is sparse or has ``max_norm``. Everything is checked
            before the first change: the model is left unchanged.

    Examples:

        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from embedding_constraint.transformers import expand_vocabulary
        >>> config = LlamaConfig(vocab_size=6, hidden_size=8, intermediate_size=16,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> model = LlamaForCausalLM(config)
        >>> old = model.get_input_embeddings().weight.detach().clone()
        >>> old_vocab = ["<s>", "</s>", "a", "b", "c", "d"]
        >>> new_vocab = ["<s>", "</s>", "d", "c", "b", "a", "apple", "banana"]
        >>> model = expand_vocabulary(model, old_vocab, new_vocab)
        >>> model.config.vocab_size
        8
        >>> torch.equal(model.get_input_embeddings().weight[[5, 2]], old[[2, 5]])
        True
    """
    return _apply_expansion(model, _plan_expansion(model, old_vocab, new_vocab, init, generator))


@dataclass(frozen=True)
class _Grown:
    """A tensor of the input embedding or head, grown: it replaces ``old`` on every holder."""

    old: Tensor  # the Parameter it replaces
    new: Tensor
    reference: Tensor  # the old tokens' rows, in the order of the alignment's ``new_rows``
    name: str  # the first holder's dotted name, as fix_rows gets it
    holders: list[tuple[nn.Module, str]]


@dataclass(frozen=True)
class _Expansion:
    """A checked `expand_vocabulary`, its new tensors computed: nothing of it applied yet."""

    rows: int  # the embedding's row count before
    size: int  # after
    new_rows: Tensor  # the old tokens' new ids, the rows to hold fixed
    tensors: list[_Grown]
    old_padding: int | None
    new_padding: int | None
    id_changes: list[tuple[object, str, object]]
    logits_bias: tuple[nn.Module, str, Tensor] | None  # its owner, name and new value


def _plan_expansion(
    model: nn.Module,
    old_vocab: object,
    new_vocab: object,
    init: ExpansionInit,
    generator: torch.Generator | None,
) -> _Expansion:
    """Check everything `expand_vocabulary` checks and compute its new tensors; change nothing.

    Raises:
        TypeError, ValueError: see `expand_vocabulary`.
    """
    embedding, head = _vocabulary_modules(model)
    tables = _id_tables(model, embedding, head)
    for table in tables:
        _check_table(model, table)
    for lookup in (embedding, *tables):
        for holder, _ in holders_of(model, lookup.weight):
            check_lookup_options(holder)
    _check_init(init, generator, old_vocab)
    old_tokens = _tokens(old_vocab, "old_vocab")
    new_tokens = _tokens(new_vocab, "new_vocab")
    alignment = align_named(old_tokens, new_tokens, "old_vocab", "new_vocab")
    old_tokens = cast(Sequence[Hashable], old_tokens)  # `align_named` checked both
    new_tokens = cast(Sequence[Hashable], new_tokens)
    rows = embedding.weight.shape[0]
    if alignment.old_size > rows:
        raise ValueError(
            f"Expected `old_vocab` to have at most {rows} tokens, one per row of the input "
            f"embedding. Got {alignment.old_size}."
        )
    tied = head is not None and head.weight is embedding.weight
    if head is not None and not tied and head.weight.shape[0] != rows:
        raise ValueError(
            f"Expected the output head to have one row per row of the input embedding ({rows}). "
            f"Got {head.weight.shape[0]}."
        )
    new_index = {token: i for i, token in enumerate(new_tokens)}
    old_padding = new_padding = embedding.padding_idx
    if old_padding is not None:
        new_padding = _moved_id(old_padding, "padding_idx", old_tokens, rows, new_index)
        user = _position_padding(
            model, [h for h, _ in holders_of(model, embedding.weight)], old_padding
        )
        if new_padding != old_padding and user is not None:
            raise ValueError(
                f"Expected `new_vocab` to keep the padding token {old_tokens[old_padding]!r} at "
                f"id {old_padding}. Got it at {new_padding}: {user} has that id as its "
                "padding_idx too (position ids count from it, as in RoBERTa and M2M100), so "
                "moving it would change every position. Keep the padding token's id."
            )
    for table in tables:
        if table.weight.shape[0] < alignment.old_size:
            raise ValueError(
                f"Expected {_name_of(model, table)}, a table indexed by the model's token ids, "
                f"to have a row for each of the {alignment.old_size} tokens of `old_vocab`. Got "
                f"{table.weight.shape[0]} rows: expand_vocabulary cannot move the tokens past "
                "them. Pass only the tokens it has rows for, or resize it first."
            )
    id_changes = _remapped_ids(model, old_tokens, rows, new_index)
    _check_unmoved_ids(model, old_tokens, rows, new_index)
    _check_vocab_offsets(model, alignment.new_size)
    sizes = {rows, *(t.weight.shape[0] for t in tables)}
    size_changes = _vocab_size_fields(model, sizes, alignment.new_size)
    logits_bias = _final_logits_bias(model, rows)
    moved = [embedding.weight, *((head.weight, head.bias) if head is not None else ())]
    moved += [t.weight for t in tables]
    if logits_bias is not None:
        moved.append(logits_bias[0].get_buffer(logits_bias[1]))
    _check_per_token_tensors(model, head, moved, sizes)

    keep = torch.ones(alignment.new_size, dtype=torch.bool)
    keep[alignment.new_rows] = False
    added = keep.nonzero().flatten()
    old_rows = alignment.old_rows
    grown = [(embedding.weight, "input embedding's rows")]
    grown += [(t.weight, f"rows of {_name_of(model, t)}") for t in tables]
    lookups = [embedding.weight, *(t.weight for t in tables)]
    if head is not None and not tied:
        grown.append((head.weight, "output head's rows"))
    if head is not None and head.bias is not None:
        grown.append((head.bias, "output head's bias entries"))
    pieces = None
    if init == _PIECES:
        pieces = _added_pieces(
            old_vocab, new_vocab, alignment.added, alignment.old_size, old_padding
        )
    tensors = []
    with torch.no_grad():
        for param, what in grown:
            is_bias = head is not None and param is head.bias
            tokens = param.detach()[: alignment.old_size]
            reference = tokens.index_select(0, old_rows.to(tokens.device))
            bad = _non_finite(reference, old_rows)
            if bad:
                raise ValueError(
                    f"Expected the {what} of the tokens `new_vocab` keeps to be finite: they are "
                    f"held fixed. Got NaN or Inf in those of {_listed(bad, old_tokens, new_index)}. "
                    "Fix those rows first, or leave their tokens out of `new_vocab`."
                )
            fresh = None
            if added.numel():
                ids = torch.arange(alignment.old_size)
                stats = tokens
                if old_padding is not None and any(param is w for w in lookups) and rows > 1:
                    # The padding row is not a token's embedding (often zeros): leave it out.
                    stats = torch.cat((tokens[:old_padding], tokens[old_padding + 1 :]))
                    ids = torch.cat((ids[:old_padding], ids[old_padding + 1 :]))
                if pieces is not None:
                    _check_pieces_finite(tokens, stats, ids, pieces, what, old_tokens, new_index)
                    fresh = _rows_from_pieces(tokens, stats, pieces, is_bias, generator)
                    tensors.append(_grown(model, param, tokens, reference, alignment, added, fresh))
                    continue
                # `fresh_rows` reads the rows for "mean" and "normal"; `fresh_bias` reads the
                # entries for every init but "zeros" (their mean, for a callable init too).
                reads = init != "zeros" if is_bias else init in ("mean", "normal")
                bad = _non_finite(stats, ids) if reads else []
                if bad:
                    reader = f"init={init!r}" if isinstance(init, str) else "their mean"
                    raise ValueError(
                        f"Expected the {what} that {reader} reads to be finite: those of "
                        "every token of `old_vocab` (dropped ones too, the padding row left "
                        "out) start the added tokens'. Got NaN or Inf in those of "
                        f"{_listed(bad, old_tokens, new_index)}: it would reach every added "
                        "token. Fix those rows first, or pass init='zeros'."
                    )
                make = fresh_bias if is_bias else fresh_rows
                fresh = make(stats, added.numel(), cast(Init, init), generator)  # not pieces
                if not bool(fresh.isfinite().all()):
                    raise ValueError(
                        f"Expected `init` to give finite rows. Got NaN or Inf in the {what} it "
                        "gave the added tokens."
                    )
            tensors.append(_grown(model, param, tokens, reference, alignment, added, fresh))
        new_bias = None
        if logits_bias is not None:
            bias_owner, bias_name, bias_value = logits_bias
            zeros = bias_value.new_zeros((*bias_value.shape[:-1], added.numel()))  # as HF pads
            by_token = grow(bias_value.movedim(-1, 0), alignment, added, zeros.movedim(-1, 0))
            new_bias = (bias_owner, bias_name, by_token.movedim(0, -1).contiguous())
    return _Expansion(
        rows,
        alignment.new_size,
        alignment.new_rows,
        tensors,
        old_padding,
        new_padding,
        id_changes + size_changes,
        new_bias,
    )


def _grown(
    model: nn.Module,
    param: Tensor,
    tokens: Tensor,
    reference: Tensor,
    alignment: Alignment,
    added: Tensor,
    fresh: Tensor | None,
) -> _Grown:
    """``param`` grown: ``tokens`` (its old tokens' rows) re-sorted, ``fresh`` added; checked
    against the constraint fix_rows will register."""
    new = grow(tokens, alignment, added, fresh)
    if alignment.old_rows.numel():
        FixedRows.borrowing(reference, rows=alignment.new_rows).check_compatible(new)
    holders = holders_of(model, param)
    name = f"{_name_of(model, holders[0][0])}.{holders[0][1]}"
    return _Grown(param, new, reference, name, holders)


def _check_pieces_finite(
    tokens: Tensor,
    stats: Tensor,
    ids: Tensor,
    pieces: list[list[int] | None],
    what: str,
    old_tokens: Sequence[Hashable],
    new_index: dict[Hashable, int],
) -> None:
    """Refuse NaN or Inf in the rows init="pieces" reads: the pieces' (``tokens``, by old id),
    and where a token falls back to the mean, every row of ``stats`` (``ids`` names them).

    Raises:
        ValueError: one of those rows holds NaN or Inf.
    """
    read = sorted({i for found in pieces if found is not None for i in found})
    bad = set(_non_finite(tokens[read], torch.tensor(read, dtype=torch.int64)) if read else [])
    if any(found is None for found in pieces):
        bad.update(_non_finite(stats, ids))
    if bad:
        raise ValueError(
            f"Expected the {what} that init='pieces' reads to be finite: those of the pieces "
            "the old tokenizer splits the added tokens into, and, where a token has none, those "
            "of every token of `old_vocab` (dropped ones too, the padding row left out). Got "
            f"NaN or Inf in those of {_listed(sorted(bad), old_tokens, new_index)}: it would "
            "reach the added tokens. Fix those rows first, or pass init='zeros'."
        )


def _apply_expansion(model: _Model, plan: _Expansion) -> _Model:
    """Apply a `_Expansion` (`_plan_expansion` checked it: nothing here fails on user input)."""
    for grown in plan.tensors:
        replacement = nn.Parameter(grown.new)  # trains, also where the old one was frozen (PEFT)
        for holder, attr in grown.holders:
            setattr(holder, attr, replacement)
            _set_rows(holder, plan.size)
            if isinstance(holder, nn.Embedding) and holder.padding_idx == plan.old_padding:
                holder.padding_idx = plan.new_padding  # every holder: BART's encoder and decoder
    if plan.logits_bias is not None:
        owner, bias_name, bias = plan.logits_bias
        owner.register_buffer(bias_name, bias)
    _set_vocab_size(model, plan.rows, plan.size, plan.id_changes)
    for config, field, value in plan.id_changes:
        setattr(config, field, value)
    if plan.new_rows.numel():  # no shared token: nothing to hold
        for grown in plan.tensors:
            fix_rows(model, grown.reference, name=grown.name, rows=plan.new_rows)
    keep_constraints_through_hf_methods(model)
    return model


def _non_finite(values: Tensor, ids: Tensor) -> list[int]:
    """The ids (``ids[i]`` names row ``i`` of ``values``) of the rows holding NaN or Inf."""
    bad = ~values.isfinite()
    if bad.dim() > 1:
        bad = bad.flatten(1).any(dim=1)
    return [int(i) for i in ids[bad.cpu()]] if bool(bad.any()) else []


def _listed(ids: list[int], old_tokens: Sequence[Hashable], new_index: dict[Hashable, int]) -> str:
    """The first tokens of old ``ids``, with their ids, for a message."""
    listed = [
        f"{old_tokens[i]!r} (id {i}{'' if old_tokens[i] in new_index else ', dropped'})"
        for i in ids[:10]
    ]
    return ", ".join(listed) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def _final_logits_bias(model: nn.Module, rows: int) -> tuple[nn.Module, str, Tensor] | None:
    """BART's (mBART's, Marian's, ...) ``final_logits_bias`` buffer, one entry per token.

    It is re-sorted with the rows, its added entries zero, as transformers' resizing pads it.

    Raises:
        TypeError: it is a Parameter (trained): expand_vocabulary would have to constrain it.
    """
    for name, module in model.named_modules():
        value = module._buffers.get("final_logits_bias")
        if value is not None and value.shape[-1] == rows:
            return module, "final_logits_bias", value.detach()
        if module._parameters.get("final_logits_bias") is not None:
            raise TypeError(
                f"Expected {name}.final_logits_bias to be a buffer, as transformers makes it. "
                "Got a Parameter: expand_vocabulary does not constrain it."
            )
    return None


def _set_vocab_size(
    model: nn.Module, old: int, size: int, changes: list[tuple[object, str, object]]
) -> None:
    """Set the vocabulary size in the config, and on the modules that keep a copy of it.

    A module's copy: an own attribute (``__dict__``: a wrapper, PEFT's, forwards attribute
    reads to its model) named as a vocabulary-size field the plan changes, or as an alias of
    one (XLM's ``n_words``), holding that field's old value (``vocab_size``: ``old``).
    """
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", None)
    copies = {"vocab_size": old}
    for target in (config, text() if callable(text) else None):
        if target is not None and hasattr(target, "vocab_size"):
            target.vocab_size = size
    for target, field, _ in changes:
        if "vocab_size" not in field:
            continue
        copies[field] = getattr(target, field)
        aliases = getattr(target, "attribute_map", {})
        copies.update({alias: copies[field] for alias, to in aliases.items() if to == field})
    for target in (config, text() if callable(text) else None):
        aliases = getattr(target, "attribute_map", {})
        copies.update({alias: old for alias, to in aliases.items() if to == "vocab_size"})
    for module in model.modules():
        for name, value in copies.items():
            if type(module.__dict__.get(name)) is int and module.__dict__[name] == value:
                module.__dict__[name] = size


def _vocab_size_fields(
    model: nn.Module, sizes: set[int], size: int
) -> list[tuple[object, str, object]]:
    """The (config, field, ``size``) of the other vocabulary-size fields of the config and text
    config: a ``*vocab_size*`` field (Marian's ``decoder_vocab_size``, Gemma 3n's
    ``vocab_size_per_layer_input``) holding the row count of a moved tensor (``sizes``)."""
    changes: list[tuple[object, str, object]] = []
    for label, config in _configs(model):
        if label == "generation_config":
            continue
        for field, value in getattr(config, "__dict__", {}).items():
            vocab_size = field != "vocab_size" and "vocab_size" in field
            if vocab_size and type(value) is int and value in sizes:
                changes.append((config, field, size))
    return changes


def _check_vocab_offsets(model: nn.Module, size: int) -> None:
    """Refuse a config (a sub-config too) that starts another vocabulary inside the new one.

    Gemma 3n's ``vision_config.vocab_offset``: the ids from it on are image tokens, so an
    added token there would be read as one.

    Raises:
        ValueError: a ``*vocab*offset*`` field is below the new vocabulary's size.
    """
    seen: list[object] = []

    def visit(config: object, label: str) -> None:
        if any(config is c for c in seen):
            return
        seen.append(config)
        for field, value in getattr(config, "__dict__", {}).items():
            if hasattr(value, "to_dict") and hasattr(value, "__dict__"):
                visit(value, f"{label}.{field}")
            elif "vocab" in field and "offset" in field and type(value) is int and value < size:
                raise ValueError(
                    f"Expected no other vocabulary to start inside the new one ({size} "
                    f"tokens). Got {label}.{field} = {value}: the ids from {value} on are "
                    "another vocabulary's (image or audio tokens), which added tokens would "
                    "join. Expand the text model alone, or move that vocabulary yourself."
                )

    config = getattr(model, "config", None)
    if config is not None:
        visit(config, "config")


def _check_table(model: nn.Module, table: nn.Embedding) -> None:
    """Refuse a second token table that expand_vocabulary cannot resize (as the embedding)."""
    _check_plain(model, table, f"table {_name_of(model, table)}")
    weight = table.weight
    if not weight.is_floating_point() or weight.is_meta:
        raise ValueError(
            f"Expected {_name_of(model, table)}, a table indexed by token ids, to hold floating "
            f"point values. Got a {weight.dtype} weight{' on the meta device' if weight.is_meta else ''}."
        )
    if held_outside(model, weight, "_parameters"):
        raise ValueError(
            f"Expected {_name_of(model, table)}'s weight to be held only by modules under "
            "`model`. Got one that a module outside it holds too: pass the whole model."
        )


@contextmanager
def _constraints_lifted(model: nn.Module) -> Iterator[None]:
    """Bake every constrained tensor under ``model``; afterwards constrain the same rows again.

    Each tensor is constrained again by its name, with its reference and rows; the tensors
    whose Parameter is still the one that was baked come first (after ``tie_weights``, the
    tied-to weight before the one tied to it), then the ones replaced meanwhile (by a resize).
    A name whose tensor is constrained by then (tied, since, to one constrained first) is
    left as it is, as tying leaves a plain model one weight. The Parameters that stay are the
    ones an optimizer holds, with state of the free rows' shape: that state is no reason to
    refuse (`fix_rows_before_optimizers`).
    """
    held = {name: (c.reference, c.rows) for name, c in fixed_tensors(model)}
    if not held:
        yield
        return
    bake(model)
    before = {name: model.get_parameter(name) for name in held}
    try:
        yield
    finally:
        kept = [name for name in held if _parameter(model, name) is before[name]]
        for name in kept + [name for name in held if name not in kept]:
            if _parameter(model, name) is not None and not is_fixed(model, name):
                reference, rows = held[name]
                fix_rows_before_optimizers(model, reference, name=name, rows=rows)


def _parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


_RESIZE = inspect.Signature(
    [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in (
            ("new_num_tokens", None),
            ("pad_to_multiple_of", None),
            ("mean_resizing", True),
        )
    ]
)


def _stored_as(model: nn.Module, name: str) -> object | None:
    """What holds the tensor ``name`` names: its parametrization list if it is constrained
    (a tie shares it), else its Parameter; None where ``name`` names neither."""
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    if parametrize.is_parametrized(module, attr):
        return cast(nn.ModuleDict, module.parametrizations)[attr]
    return module._parameters.get(attr)


def _ties_in_place(model: nn.Module) -> bool:
    """Whether every tie the model's class would make holds already: both names of each pair
    in ``get_expanded_tied_weights_keys(all_submodels=True)`` (and in ``all_tied_weights_keys``,
    which ``tie_weights(recompute_mapping=False)`` reads) read one stored tensor."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if not callable(expand):
        return False
    pairs = dict(expand(all_submodels=True))
    pairs.update(getattr(model, "all_tied_weights_keys", None) or {})
    for target, source in pairs.items():
        stored = _stored_as(model, source)
        if stored is None or _stored_as(model, target) is not stored:
            return False
    return True


def _tie_weights(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``tie_weights`` of a model that `expand_vocabulary` constrained.

    With every tie the class declares in place (one shared constraint, or one shared plain
    Parameter), it returns at once: the class would only set each tied weight to what it
    reads already, and a bake and a new constraint would be needless work (accelerate's
    ``fsdp2_prepare_model`` ties on the meta device under ``cpu_ram_efficient_loading``,
    where they work too: the reference keeps its values). Otherwise, and
    for ``from_pretrained``'s call with ``missing_keys`` (which the class also reads to drop
    or swap ties), it bakes, ties and constrains again (`_constraints_lifted`).
    """
    loading = (args[0] if args else kwargs.get("missing_keys")) is not None
    if not loading and _ties_in_place(model):
        return None
    with _constraints_lifted(model):
        return type(model).tie_weights(model, *args, **kwargs)  # type: ignore[attr-defined]


def _resize_token_embeddings(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``resize_token_embeddings`` of a model that `expand_vocabulary` constrained.

    Raises:
        ValueError: the new size leaves out a fixed row of the input embedding or the head.
    """
    bound = _RESIZE.bind(*args, **kwargs).arguments
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    for argument in ("new_num_tokens", "pad_to_multiple_of"):
        value = bound.get(argument)
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"Expected `{argument}` to be a positive int or None. Got {value!r}.")
    size = bound.get("new_num_tokens")
    size = embedding.weight.shape[0] if size is None else size
    multiple = bound.get("pad_to_multiple_of")
    if multiple is not None:
        size = math.ceil(size / multiple) * multiple
    vocab_modules = {id(embedding), id(model.get_output_embeddings())}  # type: ignore[operator]
    for name, constraint in fixed_tensors(model):
        owner = model.get_submodule(name.rpartition(".")[0])
        needed = int(constraint.fixed_row_indices().max()) + 1 if constraint.num_fixed else 0
        if id(owner) in vocab_modules and needed > size:
            raise ValueError(
                f"Expected a new size of at least {needed}: {name!r} holds row {needed - 1} "
                f"fixed. Got {size}. Resize to at least {needed} rows, or bake(model) first."
            )
    with _constraints_lifted(model):
        return type(model).resize_token_embeddings(model, *args, **kwargs)  # type: ignore[attr-defined]


def _save_pretrained(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` of a constrained model: a ``state_dict`` given by parameter names
    is saved with plain keys (`plain_keys`).

    ``Trainer.save_model`` under DeepSpeed ZeRO-3 passes the dict that DeepSpeed consolidates
    by walking each module's parameters: a constrained tensor's stored rows under
    ``parametrizations.<name>.original``, which a plain model's ``from_pretrained`` would not
    find. A dict with plain keys (the model's own ``state_dict()``) is saved as it is.
    """
    save = type(model).save_pretrained  # type: ignore[attr-defined]
    bound = inspect.signature(save).bind(model, *args, **kwargs)
    state = bound.arguments.get("state_dict")
    if state is not None:
        bound.arguments["state_dict"] = plain_keys(model, state)
    return save(*bound.args, **bound.kwargs)


def keep_constraints_through_hf_methods(model: nn.Module) -> None:
    """Give a constrained Hugging Face model its own ``tie_weights``, ``resize_token_embeddings``
    and ``save_pretrained``.

    The first two bake, call the model's class's method, and constrain the same rows again
    (module docstring), but for ``tie_weights`` with the ties in place; ``save_pretrained``
    gives a state dict passed to it plain keys; with nothing constrained they are the class's
    methods. `expand_vocabulary` calls it, and so may `fix_rows` (with the root it was given):
    a model constrained by name keeps the methods working. A module without such a model
    under it is left as it is.

    The outermost modules under ``model`` (``model`` itself, or the model inside a wrapper
    such as PEFT's) whose class has both get them: an inner one (``LlamaModel`` inside
    ``LlamaForCausalLM``) does not hold the tied head, so it could not bake the tie. Set on the
    instance, never the class: other models of the class are not touched, and a deep copy gets
    methods bound to itself (``functools.partial`` copies its arguments).
    """
    methods = {
        "tie_weights": _tie_weights,
        "resize_token_embeddings": _resize_token_embeddings,
        "save_pretrained": _save_pretrained,
    }
    if all(callable(getattr(type(model), name, None)) for name in methods):
        for name, method in methods.items():
            object.__setattr__(model, name, functools.partial(method, model))
        return
    for child in model.children():
        keep_constraints_through_hf_methods(child)
