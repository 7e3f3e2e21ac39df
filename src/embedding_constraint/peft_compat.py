"""Ties as PEFT finds them: a constrained head tied to the input embedding stays tied by name.

PEFT (``_get_module_names_tied_with_embedding``) finds the modules tied to the input embedding
by name: it gathers every module's ``_tied_weights_keys`` (``{"lm_head.weight":
"model.embed_tokens.weight"}``) and keeps the entries whose source is a name under which
``named_parameters(remove_duplicate=False)`` lists a Parameter of ``get_input_embeddings()``.
While constrained, that Parameter is listed as ``...parametrizations.weight.original``, so no
entry matches and PEFT wraps the embedding alone (``trainable_token_indices``,
``ensure_weight_tying``).

`declare_constrained_ties` gives the tied head's parametrized class (made by
``torch.nn.utils.parametrize`` for that one module) a ``_tied_weights_keys`` of its own,
``{"weight": "parametrizations.weight.original"}``: PEFT reads it as ``lm_head.weight`` tied to
the Parameter the embedding holds, so it finds the head as it does on a plain model. It lives
on the parametrized class, so `bake` (which gives the module its class back) removes it, and it
is computed at each read: where the weight is not constrained it is empty, and the model's own
entry (``lm_head.weight`` -> ``model.embed_tokens.weight``) is left to speak. transformers reads
``_tied_weights_keys`` of ``PreTrainedModel`` submodules only (a head is not one) and, when
saving, only its keys, which name ``lm_head.weight`` as the model's own entry does.
"""

from __future__ import annotations

from typing import cast

from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from embedding_constraint.fix_rows import holds_parametrizations
from embedding_constraint.fixed_rows import FixedRows

__all__ = ["declare_constrained_ties"]


def _constrained_names(module: nn.Module) -> dict[str, str]:
    """``{name: "parametrizations.<name>.original"}`` for each tensor `fix_rows` constrains."""
    if not holds_parametrizations(module):  # (not a wrapper that forwards to one)
        return {}
    plists = module.parametrizations
    assert isinstance(plists, nn.ModuleDict)
    return {
        name: f"parametrizations.{name}.original"
        for name, plist in plists.items()
        if isinstance(cast(ParametrizationList, plist)[0], FixedRows)
    }


def _tied_weights_keys(self: nn.Module) -> dict[str, str] | None:
    return _constrained_names(self) or None


def declare_constrained_ties(model: nn.Module) -> list[str]:
    """Make each constrained module tied to ``model``'s input embedding name its tie as PEFT reads it.

    Call it after constraining (`expand_vocabulary`, `fix_rows` by name, and again after any
    call that constrains anew, as ``tie_weights`` does). Modules whose class (or a base) has a
    ``_tied_weights_keys`` of its own, and the input embedding itself, are left as they are.

    Args:
        model (nn.Module): a model with ``get_input_embeddings()``; without one, nothing is done.

    Returns:
        list[str]: the names of the modules that now declare their tie.
    """
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    if not isinstance(embedding, nn.Module) or not _constrained_names(embedding):
        return []
    sources = {id(p) for p in embedding.parameters()}
    declared = []
    for name, module in model.named_modules():
        if module is embedding:
            continue
        names = _constrained_names(module)
        plists = module.parametrizations if names else None
        if plists is None or not any(id(plists[n].original) in sources for n in names):
            continue
        cls = type(module)
        if "_tied_weights_keys" not in vars(cls) and hasattr(cls, "_tied_weights_keys"):
            continue  # a class that names its own ties
        cls._tied_weights_keys = property(_tied_weights_keys)
        declared.append(name)
    return declared
