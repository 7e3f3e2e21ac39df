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
class's methods.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import Tensor, nn

from embedding_constraint.fix_rows import (
    _check_lookup_options,
    bake,
    fix_rows,
    fixed_tensors,
    is_fixed,
)
from embedding_constraint.vocab import (
    Init,
    _align,
    _check_options,
    _fresh_bias,
    _fresh_rows,
    _grow,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["expand_vocabulary"]

_Model = TypeVar("_Model", bound="PreTrainedModel")

# The config fields that name a token by its id: they follow their token to its new id.
_TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


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


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(str(name) for name, module in model.named_modules() if module is target)


def _holders(model: nn.Module, param: Tensor) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) under ``model`` holding ``param`` (tied weights: several)."""
    return [
        (module, attr)
        for module in model.modules()
        for attr, value in module._parameters.items()
        if value is param
    ]


def _set_rows(module: nn.Module, rows: int) -> None:
    """Keep a module's size attribute in step with its weight's row count."""
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        module.num_embeddings = rows
    elif isinstance(module, nn.Linear):
        module.out_features = rows


def _remapped_ids(
    model: nn.Module, old_tokens: Sequence[Hashable], new_index: dict[Hashable, int]
) -> list[tuple[object, str, int | list[int]]]:
    """The (config, field, new value) of every token id that moves with its token.

    Ids outside the old vocabulary name none of its tokens and are left as they are.

    Raises:
        ValueError: a token named by an id is not in the new vocabulary.
    """
    configs = [getattr(model, "config", None), getattr(model, "generation_config", None)]
    text = getattr(configs[0], "get_text_config", None)
    if callable(text):
        configs.append(text())
    changes: list[tuple[object, str, int | list[int]]] = []
    for config in configs:
        if config is None:
            continue
        for field in _TOKEN_ID_FIELDS:
            value = getattr(config, field, None)
            listed = value if isinstance(value, list) else [value]
            ids = [i for i in listed if isinstance(i, int) and 0 <= i < len(old_tokens)]
            if len(ids) != len(listed):
                continue
            moved = []
            for i in ids:
                if old_tokens[i] not in new_index:
                    raise ValueError(
                        f"Expected `new_vocab` to keep the token {old_tokens[i]!r} (id {i}, the "
                        f"model's {field}). Got a vocabulary without it: add it to `new_vocab`, "
                        f"or set config.{field} first."
                    )
                moved.append(new_index[old_tokens[i]])
            changes.append((config, field, moved if isinstance(value, list) else moved[0]))
    return changes


def expand_vocabulary(
    model: _Model,
    old_vocab: object,
    new_vocab: object,
    *,
    init: Init = "mean",
    generator: torch.Generator | None = None,
) -> _Model:
    r"""Grow ``model``'s vocabulary to ``new_vocab``, holding the old tokens' rows fixed.

    The input embedding and the output head (and its bias, if any) get one row per token of
    ``new_vocab``. A token that both vocabularies hold keeps its old row, bit for bit, at its
    new id, and `fix_rows` holds it there while the model trains; a removed token's row is
    dropped (so are rows past the end of ``old_vocab``, which name no token); an added
    token's row is initialised by ``init`` and trains. A tied model stays tied (one
    Parameter, constrained once); an untied head is constrained with its own old rows.
    ``config.vocab_size`` and the token ids in the config and generation config
    (``pad_token_id``, ``bos_token_id``, ...) follow the new vocabulary.

    The modules are resized in place, so their class, hooks and other attributes stay.
    Train with anything (a plain loop, ``transformers.Trainer``, Lightning, accelerate);
    create the optimizer afterwards. ``save_pretrained`` writes a plain checkpoint (a tied
    matrix once) that loads without this library; `bake` turns the model into a plain one.
    ``model.tie_weights()`` and ``model.resize_token_embeddings()`` keep working: the model
    gets its own two methods that keep the old rows constrained (added rows are free).

    Args:
        model (PreTrainedModel): a model with ``get_input_embeddings()`` returning an
            ``nn.Embedding`` and, optionally, ``get_output_embeddings()`` returning an
            ``nn.Linear`` head (or None).
        old_vocab: the model's vocabulary: a tokenizer (its ``get_vocab()``), a token -> id
            mapping, or a sequence of tokens in id order.
        new_vocab: the new vocabulary, in one of the same forms.
        init (str or callable, optional): how added tokens' rows start; see
            `embedding_constraint.vocab.expand`. Default: ``"mean"``, the approach of
            transformers' ``mean_resizing``.
        generator (torch.Generator, optional): the random source of ``init``. Default: the
            global generator of the weight's device.

    Returns:
        PreTrainedModel: ``model``, resized and constrained in place.

    Raises:
        TypeError: ``model`` has no ``get_input_embeddings``, its input embedding is not an
            ``nn.Embedding`` or its head not an ``nn.Linear``, a weight is not floating
            point, a vocabulary is not one of the forms above, or see
            `embedding_constraint.vocab.expand` for ``init`` and ``generator``.
        ValueError: the embedding or head is already constrained; a weight is on the meta
            device; ``old_vocab`` has more tokens than the embedding has rows, or gaps in
            its ids; the head has another row count than the embedding; a vocabulary is
            empty or has duplicates; ``new_vocab`` drops the padding token or a token named
            by a config id; or the embedding is sparse or has ``max_norm``. The model is
            left unchanged.

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
    given: object = model  # checked at run time: callers may not be typed
    get_input = getattr(model, "get_input_embeddings", None)
    if not isinstance(given, nn.Module) or not callable(get_input):
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
        if any(is_fixed(module, n) for n in ("weight", "bias") if hasattr(module, n)):
            raise ValueError(
                f"Expected a model whose {what} is not constrained yet. Got one that is "
                "(expanded or fix_rows'd before): bake(model) first, then expand it again."
            )
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
    _check_lookup_options(embedding)
    _check_options(init, generator)
    old_tokens = _tokens(old_vocab, "old_vocab")
    new_tokens = _tokens(new_vocab, "new_vocab")
    alignment = _align(old_tokens, new_tokens, "old_vocab", "new_vocab")
    old_tokens = cast(Sequence[Hashable], old_tokens)  # `_align` checked both
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
        kept = (alignment.old_rows == old_padding).nonzero().flatten()
        if kept.numel() == 0:
            token = old_tokens[old_padding] if old_padding < len(old_tokens) else None
            raise ValueError(
                f"Expected `new_vocab` to keep the padding token {token!r} (row "
                f"{old_padding}, the input embedding's padding_idx). Got a vocabulary without "
                "it: add it to `new_vocab`."
            )
        new_padding = int(alignment.new_rows[kept[0]])
    id_changes = _remapped_ids(model, old_tokens, new_index)

    # The new tensors, computed before anything changes.
    keep = torch.ones(alignment.new_size, dtype=torch.bool)
    keep[alignment.new_rows] = False
    added = keep.nonzero().flatten()
    old_rows = alignment.old_rows
    new_tensors: list[tuple[Tensor, Tensor, Tensor]] = []  # (old Parameter, new, reference)
    with torch.no_grad():
        grown = [embedding.weight] if tied or head is None else [embedding.weight, head.weight]
        for param in grown:
            tokens = param.detach()[: alignment.old_size]
            stats = tokens
            if old_padding is not None and param is embedding.weight and rows > 1:
                # The padding row is not a token's embedding (often zeros): leave it out.
                stats = torch.cat((tokens[:old_padding], tokens[old_padding + 1 :]))
            fresh = _fresh_rows(stats, added.numel(), init, generator) if added.numel() else None
            reference = tokens.index_select(0, old_rows.to(tokens.device))
            new_tensors.append((param, _grow(tokens, alignment, added, fresh), reference))
        if head is not None and head.bias is not None:
            bias = head.bias.detach()[: alignment.old_size]
            fresh = _fresh_bias(bias, added.numel(), init, generator) if added.numel() else None
            reference = bias.index_select(0, old_rows.to(bias.device))
            new_tensors.append((head.bias, _grow(bias, alignment, added, fresh), reference))

    # Nothing below can fail on user input: the model changes only from here on.
    names = []
    for old, new, reference in new_tensors:
        replacement = nn.Parameter(new)  # trains, also where the old one was frozen (PEFT)
        holders = _holders(model, old)
        for holder, attr in holders:
            setattr(holder, attr, replacement)
            _set_rows(holder, alignment.new_size)
        names.append((f"{_name_of(model, holders[0][0])}.{holders[0][1]}", reference))
    embedding.padding_idx = new_padding
    _set_vocab_size(model, rows, alignment.new_size)
    for config, field, value in id_changes:
        setattr(config, field, value)
    for name, reference in names:
        fix_rows(model, reference, name=name, rows=alignment.new_rows)
    _keep_constraints_through_hf_methods(model)
    return model


def _set_vocab_size(model: nn.Module, old: int, size: int) -> None:
    """Set the vocabulary size in the config, and on the models that keep it as an attribute."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", None)
    for target in (config, text() if callable(text) else None):
        if target is not None and hasattr(target, "vocab_size"):
            target.vocab_size = size
    # Own attributes only (`__dict__`): a wrapper (PEFT's) forwards attribute reads to its model.
    for module in model.modules():
        if module.__dict__.get("vocab_size") == old:
            module.__dict__["vocab_size"] = size


@contextmanager
def _constraints_lifted(model: nn.Module) -> Iterator[None]:
    """Bake every constrained tensor under ``model``; afterwards constrain the same rows again.

    Each tensor is constrained again by its name, with its reference and rows: the same
    Parameter where it is still there (an optimizer keeps training it), else the one that
    replaced it (a resized module's). A name whose tensor is constrained by then (tied, since,
    to one constrained first) is left as it is, as tying leaves a plain model one weight.
    """
    held = [(name, c.reference, c.rows) for name, c in fixed_tensors(model)]
    if not held:
        yield
        return
    bake(model)
    before = {name: model.get_parameter(name) for name, _, _ in held}
    try:
        yield
    finally:
        same = [h for h in held if _parameter(model, h[0]) is before[h[0]]]
        for name, reference, rows in same + [h for h in held if h not in same]:
            if _parameter(model, name) is not None and not is_fixed(model, name):
                fix_rows(model, reference, name=name, rows=rows)


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


def _tie_weights(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``tie_weights`` of a model that `expand_vocabulary` constrained."""
    with _constraints_lifted(model):
        return type(model).tie_weights(model, *args, **kwargs)  # type: ignore[attr-defined]


def _resize_token_embeddings(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``resize_token_embeddings`` of a model that `expand_vocabulary` constrained.

    Raises:
        ValueError: the new size leaves out a fixed row of the input embedding or the head.
    """
    bound = _RESIZE.bind(*args, **kwargs).arguments
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    size = bound.get("new_num_tokens") or embedding.weight.shape[0]
    multiple = bound.get("pad_to_multiple_of")
    if multiple:
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


def _keep_constraints_through_hf_methods(model: nn.Module) -> None:
    """Give the model its own ``tie_weights`` and ``resize_token_embeddings`` (module docstring).

    The outermost modules under ``model`` (``model`` itself, or the model inside a wrapper
    such as PEFT's) whose class has both get them: an inner one (``LlamaModel`` inside
    ``LlamaForCausalLM``) does not hold the tied head, so it could not bake the tie. Set on the
    instance, never the class: other models of the class are not touched, and a deep copy gets
    methods bound to itself (``functools.partial`` copies its arguments).
    """
    methods = {"tie_weights": _tie_weights, "resize_token_embeddings": _resize_token_embeddings}
    if all(callable(getattr(type(model), name, None)) for name in methods):
        for name, method in methods.items():
            object.__setattr__(model, name, functools.partial(method, model))
        return
    for child in model.children():
        _keep_constraints_through_hf_methods(child)
