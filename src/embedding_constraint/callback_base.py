"""The Lightning-flavour-independent body of `EmbeddingConstraint`.

`pytorch_lightning` and `lightning.pytorch` each have their own `Callback` class, and each
package documents its own for its Trainer. Both flavours of `EmbeddingConstraint` are this
mixin put in front of their `Callback`, so the hooks and their logic exist once.

Hooks used, in the order Lightning calls them during ``fit``:

- ``setup(stage="fit")``: register the constraint. This runs before ``configure_optimizers``,
  before ``configure_model`` (where a ModelParallelStrategy user calls ``fully_shard``) and
  before the strategy wraps the model (DDP), so all of them see only the free rows. The hook
  ``on_fit_start`` would be too late: by then DDP has recorded the full-size parameter and
  shrinking it makes DDP fail ("parameters that were not used in producing the loss").
  On several processes it then checks that every rank holds the same reference and fixed
  rows (`check_same_on_every_rank`, one small collective).
- ``on_load_checkpoint`` (resuming): refuse optimizer state saved for the full weight, and a
  ModelParallelStrategy resume from one file, which Lightning loads past the plain keys.
- ``on_fit_start``: check that the module that trains is the one constrained (a
  ``LightningModule.setup`` or ``configure_model`` that runs after ``setup`` may replace it;
  ``parallelize_fixed`` there, for tensor parallelism, keeps it constrained, shard by shard).
- ``on_fit_end``, ``on_exception`` and ``teardown``: bake the result into a plain weight, so a
  finished, failed or interrupted fit (an exception in ``training_step``, Ctrl-C, the learning
  rate or batch size finder that leaves from inside ``on_fit_start``) leaves a plain module
  (a plain sharded one under FSDP2 or tensor parallelism). Under DeepSpeed at ZeRO stage
  1 to 3, the fit's engine then refuses ``save_checkpoint``: it holds the stored rows that
  the bake replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import Self, override

from embedding_constraint.distributed import check_same_on_every_rank
from embedding_constraint.fix_rows import (
    SUPPORTED_MODULES,
    check_reference,
    constraint_of,
    fix_rows_before_optimizers,
    is_fixed,
    references_of,
    stored_rows,
)
from embedding_constraint.fixed_rows import FixedRows
from embedding_constraint.fsdp import bake_fully_sharded
from embedding_constraint.tensor_parallel import bake_parallelized, parallelized
from embedding_constraint.vocab import ReferenceNames, align_named, shared_reference

__all__ = ["EmbeddingConstraintHooks"]

# To mypy the mixin is a `pytorch_lightning` Callback, so that `@override` checks each hook
# against Lightning's signature (the two packages' `Callback` classes are the same code); at
# runtime it is a plain class, and each flavour puts its own `Callback` behind it.
if TYPE_CHECKING:
    from pytorch_lightning import Callback as _Base
else:
    _Base = object

# Strategies refused, and why. Each flattens the module's parameters into flat shards of its
# own, so the stored free rows would no longer be the tensor the parametrization reads.
# ModelParallelStrategy (FSDP2, `fully_shard` in configure_model) keeps each parameter a
# DTensor of its own shape, and is supported. DeepSpeedStrategy is too, at every ZeRO stage:
# stages 1 and 2 flatten a copy of the parameters for the optimizer, not the module's tensors,
# and stage 3 partitions each parameter (the stored free rows) and gathers it for each read.
_REFUSED_STRATEGIES = {
    "FSDPStrategy": (
        "FSDP1 flattens parameters into FlatParameters (with use_orig_params=True too: its "
        "views are rebuilt from the flat shard), which the constraint cannot read. Use "
        "ModelParallelStrategy (FSDP2) and call torch.distributed.fsdp.fully_shard in the "
        "LightningModule's configure_model: EmbeddingConstraint supports it."
    ),
    "XLAFSDPStrategy": (
        "XLA's FSDP flattens parameters into flat shards, which the constraint cannot read. "
        "Use ModelParallelStrategy (FSDP2) or DDP."
    ),
}


# Lightning's callbacks that copy the model in their own `setup` (by class name, as in either
# package; `EMAWeightAveraging` is a `WeightAveraging`).
_AVERAGING = {"StochasticWeightAveraging", "WeightAveraging"}


def _preview(rows: Tensor) -> str:
    """The first rows of ``rows``, for a message."""
    shown = ", ".join(str(int(r)) for r in rows[:10])
    return f"[{shown}{', ...' if rows.numel() > 10 else ''}]"


def _label(name: str, attr: str, references: dict[str, Tensor]) -> str:
    """How a message names one reference of the argument ``name``: old, old.bias."""
    return name if list(references) == ["weight"] else f"{name}.{attr}"


def _counted(constraint: FixedRows) -> str:
    """How parameter counts (Lightning's model summary: ``parameters()``) see the fixed rows."""
    values = constraint.reference.numel()
    if constraint.reference_is_parameter:
        return (
            f"The {values} fixed values are a frozen parameter: a model summary counts them "
            "as non-trainable."
        )
    return (
        f"The {values} fixed values are held outside parameters(): a model summary counts "
        f"{values} parameters fewer than the plain model, neither trainable nor non-trainable."
    )


def _tensor_parallel(root: nn.Module, name: str) -> bool:
    """Whether ``name`` under ``root`` is constrained by `parallelize_fixed` (its shard)."""
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name)
    return any(m is owner and a == attr for m, a in parallelized(owner))


def _shards_in_configure_model(strategy: type) -> bool:
    """Whether the strategy is Lightning's FSDP2 one, whose user calls ``fully_shard``."""
    return any(base.__name__ == "ModelParallelStrategy" for base in strategy.__mro__)


def _zero_stage(strategy: object) -> int | None:
    """The ZeRO stage of Lightning's ``DeepSpeedStrategy`` (None: another strategy)."""
    if not any(base.__name__ == "DeepSpeedStrategy" for base in type(strategy).__mro__):
        return None
    config = getattr(strategy, "config", None) or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _refuse_saves_from_the_fit_engine(strategy: object) -> None:
    """Make the DeepSpeed engine of a fit at ZeRO stage 1 to 3 refuse ``save_checkpoint``.

    The bake at the end of the fit gives the module a new plain Parameter in place of the
    stored free rows, which that engine (Lightning keeps it, and saves from it) still holds:
    at stages 1 and 2 it would write a checkpoint that its ``zero_to_fp32`` cannot
    consolidate, at stage 3 fail inside its own code. Only this engine instance changes
    (``trainer.save_checkpoint`` with any ``weights_only``, and direct calls); the next fit,
    ``validate`` or ``test`` makes a new one. Nothing is written before the refusal.
    """
    stage = _zero_stage(strategy)
    engine: Any = getattr(strategy, "model", None)
    if not stage or not any(b.__name__ == "DeepSpeedEngine" for b in type(engine).__mro__):
        return  # stage 0 saves the module's (plain) state dict; or no engine was made

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"Expected no checkpoint from the DeepSpeed engine (ZeRO stage {stage}) of a fit "
            "that EmbeddingConstraint has baked. Got trainer.save_checkpoint (or "
            "engine.save_checkpoint) after that fit: the callback baked the weight into a "
            "new plain parameter at its end, which the engine does not hold (it holds the "
            "stored free rows), so the checkpoint would not match the model. Save during the "
            "fit (ModelCheckpoint(save_last=True) saves its end), or save the model's state "
            "dict after it (under ZeRO-3 inside "
            "deepspeed.zero.GatheredParameters(list(model.parameters())))."
        )

    engine.save_checkpoint = refuse


class EmbeddingConstraintHooks(_Base):
    """Hold rows of a module's weight at reference values for the duration of a fit.

    See the flavour classes ``embedding_constraint.EmbeddingConstraint`` (``pytorch_lightning``)
    and ``embedding_constraint.lightning.EmbeddingConstraint`` (``lightning.pytorch``).
    """

    # The flavour's rank-zero logger, set by each flavour class.
    _info: ClassVar[Callable[..., Any]]

    def __init__(
        self,
        target: nn.Module,
        constraint: Tensor | nn.Module,
        *,
        rows: Tensor | Sequence[int] | None = None,
        shard_reference: bool = True,
    ) -> None:
        references = self._references_from(target, constraint, "constraint")
        self._configure(target, references, rows, shard_reference, "constraint")

    def _configure(
        self,
        target: nn.Module,
        references: dict[str, Tensor],
        rows: Tensor | Sequence[int] | None,
        shard_reference: bool,
        argument: str,
    ) -> None:
        if not isinstance(shard_reference, bool):
            raise TypeError(
                f"Expected `shard_reference` to be a bool. Got {type(shard_reference).__name__}."
            )
        for attr, reference in references.items():
            label = _label(argument, attr, references)
            check_reference(
                target, reference, name=attr, rows=rows, argument=label, module_argument="target"
            )
        self.target = target
        # Private copies: training the module the reference came from changes nothing here.
        # In host memory: they are read once per fit, when `setup` copies them into the
        # module, and on an accelerator they would take its memory for the whole fit.
        self.references = {a: r.detach().to("cpu", copy=True) for a, r in references.items()}
        self.rows = (
            None if rows is None else (rows.clone() if isinstance(rows, Tensor) else list(rows))
        )
        # Under ModelParallelStrategy: FSDP2 shards the reference with the free rows (1 / world
        # size of it per rank, gathered each forward) rather than every rank keeping it whole.
        self.shard_reference = shard_reference
        self._fixed: list[tuple[nn.Module, str]] = []
        # The target's dotted name in the LightningModule, once `setup` has found it.
        self._name: str | None = None
        # Optimizer states of a checkpoint being resumed, until they are checked.
        self._resumed_optimizer_states: list[Any] = []

    @classmethod
    def from_vocabularies(
        cls,
        target: nn.Module,
        old: Tensor | nn.Module,
        old_vocab: Sequence[Hashable],
        new_vocab: Sequence[Hashable],
        *,
        shard_reference: bool = True,
    ) -> Self:
        """Hold every token of both vocabularies at its old row, wherever it now sits.

        Args:
            target (nn.Module): the module for ``new_vocab``, one row per token.
            old (Tensor or nn.Module): the trained module (or its weight) for ``old_vocab``.
            old_vocab (sequence of hashable): the tokens of ``old``'s rows, in order.
            new_vocab (sequence of hashable): the tokens of ``target``'s rows, in order.
            shard_reference (bool, optional): as in the constructor. Default: ``True``.

        Returns:
            The callback, with ``rows`` set to the shared tokens' new positions.

        Raises:
            TypeError: ``target`` is not an ``nn.Embedding``, ``nn.EmbeddingBag`` or
                ``nn.Linear``, or its weight is not floating-point or is a sharded
                ``DTensor`` (``fully_shard`` ran first); ``old`` is neither a tensor nor a
                module of ``target``'s class (a module constrained by `fix_rows` is of
                another class: `bake` it), or is not floating-point; a vocabulary is not a
                sequence (a str, a set, ``None``) or holds an unhashable token;
                ``shard_reference`` is not a bool.
            ValueError: ``old_vocab`` does not name one token per row of ``old``, or
                ``new_vocab`` one per row of ``target`` (a token missing or extra shifts
                every row after it); a vocabulary is empty or has duplicates; ``old`` is 0-d
                or on the meta device, or the rows it holds for the shared tokens do not fit
                ``target``'s (another row shape; NaN, Inf or a value too large for
                ``target``'s dtype); an ``old`` module has more rows than ``target`` (the
                arguments swapped), or only one of the two has a bias; ``target``'s weight
                or bias is already constrained (by `fix_rows`: `bake` it first), or
                ``target`` uses ``sparse=True`` or ``max_norm``.

        Examples:

            >>> from torch import nn
            >>> from embedding_constraint import EmbeddingConstraint
            >>> old, new = nn.Embedding(3, 2), nn.Embedding(4, 2)
            >>> callback = EmbeddingConstraint.from_vocabularies(
            ...     new, old, ["a", "b", "c"], ["c", "x", "a", "b"]
            ... )
            >>> callback.rows.tolist()
            [0, 2, 3]
        """
        # `vocab.reference_for`, with this method's argument names.
        old_references = cls._references_from(target, old, "old")
        alignment = align_named(old_vocab, new_vocab, "old_vocab", "new_vocab")
        weight = target.weight
        assert isinstance(weight, Tensor)  # a supported module (`_references_from`)
        references = {
            attr: shared_reference(
                value,
                alignment,
                weight.shape[0],
                ReferenceNames(
                    "`old_vocab`", f"`{_label('old', attr, old_references)}`", "`new_vocab`",
                    "`target`",
                ),
            )
            for attr, value in old_references.items()
        }  # fmt: skip
        # The rows held only are checked: a NaN in a removed token's row is no fault.
        callback = cls.__new__(cls)
        callback._configure(target, references, alignment.new_rows, shard_reference, "old")
        return callback

    @staticmethod
    def _references_from(target: nn.Module, given: object, argument: str) -> dict[str, Tensor]:
        """The reference tensors the user's argument ``argument`` gives, by attribute."""
        if not isinstance(target, SUPPORTED_MODULES):
            raise TypeError(
                "Expected `target` to be an nn.Embedding, nn.EmbeddingBag or nn.Linear. "
                f"Got {type(target).__name__}."
            )
        return references_of(
            target,
            given,
            argument=argument,
            module_argument="target",
            call="EmbeddingConstraint(new_module, old_module)",
        )

    @property
    @override
    def state_key(self) -> str:
        """Distinct per target, so several constraints share one Trainer.

        Once the fit has set up, the target's dotted name in the LightningModule (the same in
        every run of the same code, so checkpoints find their callback again); before, the
        target's identity.
        """
        where = self._name or f"{type(self.target).__name__}@{id(self.target):x}"
        fixed = self.references["weight"].shape[0]
        return f"{type(self).__qualname__}{{target={where}, fixed={fixed}}}"

    # -- state, in checkpoints --------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """Where the fixed rows are (None: the first ones), so that a fit resumed from the
        checkpoint can check that it fixes the same rows."""
        if self.rows is None:
            return {"rows": None}
        # Sorted, on the host: the same rows given in another order are the same layout.
        return {"rows": torch.as_tensor(self.rows, dtype=torch.int64).cpu().sort().values}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint whose fixed rows lie elsewhere (the same number of them).

        Its optimizer state is one row per free row, so it would load without an error and
        hand each free row another row's moments. (Checkpoints from before this check hold
        no ``rows``: nothing to compare.)

        Raises:
            RuntimeError: the checkpoint was saved with the fixed rows at other positions.
        """
        if "rows" not in state_dict:
            return
        fixed = self.references["weight"].shape[0]
        saved, mine = state_dict["rows"], self.state_dict()["rows"]
        saved = torch.arange(fixed) if saved is None else torch.as_tensor(saved).cpu().sort().values
        mine = torch.arange(fixed) if mine is None else mine
        if not torch.equal(saved, mine):
            raise RuntimeError(
                f"Expected a checkpoint saved with the fixed rows this fit has, at "
                f"{_preview(mine)}. Got one saved with them at {_preview(saved)}: its optimizer "
                "state belongs to other free rows. Resume with the rows it was saved with, or "
                "start a new fit from its weights (model.load_state_dict(checkpoint"
                "['state_dict']), no ckpt_path)."
            )

    # -- hooks ------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Register the constraint before optimizers are created and the model is wrapped.

        Raises:
            RuntimeError: the strategy flattens parameters into shards of its own
                (``FSDPStrategy``, ``XLAFSDPStrategy``).
            ValueError: ``target`` is not a submodule of ``pl_module``; another
                EmbeddingConstraint in ``trainer.callbacks`` holds the same tensor of
                ``target``; a ``StochasticWeightAveraging`` or ``WeightAveraging`` callback
                comes before this one in ``trainer.callbacks`` (it would copy the
                unconstrained weight); ``target``'s weight is held by a module outside
                ``pl_module`` too (a tie to a head the LightningModule does not hold), or a
                module tied to it uses ``sparse=True`` or ``max_norm``; on several processes,
                the ranks hold different references or fixed rows, or some ranks constrain a
                tensor the others do not (`check_same_on_every_rank`).
            TypeError, ValueError: ``target`` changed since the callback was made so that it
                no longer passes the constructor's checks (constrained meanwhile, converted
                to a dtype that cannot hold the reference, sharded).
        """
        if stage != "fit" or self._fixed:
            return
        strategy = type(trainer.strategy)
        for base in strategy.__mro__:
            if base.__name__ in _REFUSED_STRATEGIES:
                raise RuntimeError(
                    "Expected a strategy that keeps each parameter a tensor of its own (single "
                    "device, DDP, ModelParallelStrategy, DeepSpeedStrategy). Got "
                    f"{strategy.__name__}, which shards "
                    "them into flat buffers. " + _REFUSED_STRATEGIES[base.__name__]
                )
        prefix = self._qualified_name(pl_module)
        self._check_other_callbacks(trainer)
        self._name = prefix
        for attr, reference in self.references.items():
            name = f"{prefix}.{attr}" if prefix else attr
            fix_rows_before_optimizers(pl_module, reference, name=name, rows=self.rows)
            constraint = constraint_of(pl_module, name)
            if self.shard_reference and _shards_in_configure_model(strategy):
                # FSDP2 in configure_model, next: shard the reference with the free rows.
                constraint.hold_reference_as_parameter()
            self._fixed.append((pl_module, name))
            total = getattr(self.target, attr).shape[0]
            type(self)._info(
                f"EmbeddingConstraint: {name} has {reference.shape[0]} fixed and "
                f"{total - reference.shape[0]} free rows. {_counted(constraint)}"
            )
        # The processes of this fit (not of any process group there is: ranks may run fits of
        # their own). DDP broadcasts rank 0's parameters, but the reference is none: one built
        # from a per-rank seed or file would keep the ranks' fixed rows apart for the whole fit.
        if getattr(trainer, "world_size", 1) > 1:
            check_same_on_every_rank(pl_module)

    @override
    def on_load_checkpoint(
        self, trainer: Any, pl_module: nn.Module, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse to resume optimizer state that was saved for the full, unconstrained weight,
        and a ModelParallelStrategy fit from a one-file checkpoint.

        Most strategies restore the checkpoint before they create the optimizers: the states
        are then checked in ``on_fit_start``, which runs after that and before they are loaded.
        ModelParallelStrategy loads a one-file checkpoint parameter by parameter under the
        module's own names (``...parametrizations.weight.original``), past the state-dict
        hooks that give the plain keys: it stops at the first constrained tensor (``KeyError``)
        or, with ``strict_loading=False``, skips them, and the fit would go on from the free
        rows it has. That second case arrives here, after the load: refuse it.

        Raises:
            RuntimeError: under ``ModelParallelStrategy``, ``ckpt_path`` is one file, not a
                distributed checkpoint; once the optimizers exist, the checkpoint's optimizer
                state has other rows than the stored free rows (saved without the
                constraint, or with other fixed rows).
        """
        path = trainer.ckpt_path
        if (
            self._fixed
            and _shards_in_configure_model(type(trainer.strategy))
            and isinstance(path, str | PathLike)
            and Path(path).is_file()
        ):
            raise RuntimeError(
                "Expected a distributed checkpoint (a directory) to resume a "
                f"ModelParallelStrategy fit with fixed rows. Got the one-file checkpoint {path}: "
                "Lightning loads it under the parameters' own names, which skips the "
                "constrained tensors (their keys are the plain ones) when strict loading is off, "
                "so the free rows would not be resumed. Resume from a distributed checkpoint "
                "(ModelParallelStrategy(save_distributed_checkpoint=True), the default), or load "
                "the file's 'state_dict' into the model before fit and start without ckpt_path."
            )
        self._resumed_optimizer_states = checkpoint.get("optimizer_states") or []
        if trainer.optimizers:
            self._check_optimizer_states(trainer)

    @override
    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        """Check that the module that trains is the one constrained in ``setup``, and the
        optimizer state of a checkpoint being resumed.

        Raises:
            RuntimeError: a tensor constrained in ``setup`` is no longer constrained in
                ``pl_module`` (``LightningModule.setup`` or ``configure_model`` replaced the
                target), or ``target`` sits under another name than in ``setup``; the
                optimizer state of the checkpoint being resumed has other rows than the
                stored free rows (saved without the constraint, or with other fixed rows).
            ValueError: ``target`` is no longer a submodule of ``pl_module`` while a
                constrained copy of it is (``copy.deepcopy`` in ``configure_model``); a
                reference value is too large for the dtype the strategy converted the
                weights to after ``setup`` (``"16-true"`` precision, say).
        """
        for root, name in self._fixed:
            if root is not pl_module or not (is_fixed(pl_module, name)):
                raise RuntimeError(
                    f"Expected {name!r} to be constrained when the fit starts. Got a module "
                    "without the constraint: LightningModule.setup or configure_model, which "
                    "run after the callback's setup, replaced the target. Build the target in "
                    "__init__ (or before fit), and pass that module to EmbeddingConstraint."
                )
        if self._fixed and self._qualified_name(pl_module) != self._name:
            raise RuntimeError(
                f"Expected the target to stay at {self._name!r} in the "
                f"{type(pl_module).__name__}. Got it moved or replaced after the callback's setup."
            )
        self._refresh_references()
        self._check_optimizer_states(trainer)

    @override
    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Bake the trained rows into a plain weight."""
        self._release(trainer)

    @override
    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        """Bake, so a failed or interrupted fit leaves a plain module."""
        self._release(trainer)

    @override
    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Bake, for exits that skip ``on_fit_end`` (the tuners')."""
        self._release(trainer)

    # -- helpers ----------------------------------------------------------------------------

    def _refresh_references(self) -> None:
        """Copy the references into the fixed rows again, in the dtype the weights have now.

        `setup` registers before the strategy converts the module to the run's precision
        (``64-true``, ``bf16-true``), which converts the fixed rows it was given: a float64
        reference registered on a float32 module would be its float32 rounding widened again.
        Copied from the callback's own copy, they are the reference rounded once, or exact.
        (A reference held as a parameter for FSDP2 is converted with the parameters. Under
        tensor parallelism, ``parallelize_fixed`` in ``configure_model`` laid each rank's slice
        of the reference out after the conversion: there is nothing to refresh.)
        """
        for root, name in self._fixed:
            if _tensor_parallel(root, name):
                continue
            kept = self.references[name.rpartition(".")[2]]
            constraint_of(root, name).reset_reference(kept, rows=self.rows)

    def _check_optimizer_states(self, trainer: Any) -> None:
        """Raise if the optimizer state being resumed has other rows than the stored ones."""
        states, self._resumed_optimizer_states = self._resumed_optimizer_states, []
        # Under tensor parallelism the stored shard holds every row, as the unconstrained
        # weight's does: optimizer state of that weight fits it.
        stored = {
            id(p): name
            for root, name in self._fixed
            if not _tensor_parallel(root, name)
            for p in [stored_rows(root, name)]
        }
        for optimizer, state in zip(trainer.optimizers, states, strict=False):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for index, param in enumerate(params):
                if id(param) not in stored:
                    continue
                for key, value in state.get("state", {}).get(index, {}).items():
                    if (
                        isinstance(value, Tensor)
                        and value.dim() == param.dim()
                        and value.shape[1:] == param.shape[1:]
                        and value.shape[0] != param.shape[0]
                    ):
                        raise RuntimeError(
                            f"Expected the checkpoint's optimizer state for {stored[id(param)]!r} "
                            f"to have one row per free row ({param.shape[0]}). Got {key!r} with "
                            f"{value.shape[0]} rows: the checkpoint was saved without "
                            "EmbeddingConstraint (or with other fixed rows). Resume with the "
                            "callbacks it was saved with, or start a new fit from its weights "
                            "(model.load_state_dict(checkpoint['state_dict']), no ckpt_path)."
                        )

    def _check_other_callbacks(self, trainer: Any) -> None:
        """Refuse, before anything changes, callbacks that would conflict with this one."""
        callbacks = list(trainer.callbacks)
        mine = callbacks.index(self)
        for index, other in enumerate(callbacks):
            if other is self:
                continue
            if isinstance(other, EmbeddingConstraintHooks) and other.target is self.target:
                shared = sorted(set(other.references) & set(self.references))
                if shared:
                    raise ValueError(
                        f"Expected one EmbeddingConstraint per tensor. Got two on the same "
                        f"{type(self.target).__name__}'s {shared}: give one callback all the "
                        "fixed rows (rows= lists them all)."
                    )
            averaging = {c.__name__ for c in type(other).__mro__} & _AVERAGING
            if index < mine and averaging:
                name = type(other).__name__
                raise ValueError(
                    f"Expected EmbeddingConstraint before {name} in `callbacks`. Got it after: "
                    f"{name} copies the model in its own setup, which would copy the "
                    "unconstrained weight. List EmbeddingConstraint first."
                )

    def _qualified_name(self, pl_module: nn.Module) -> str:
        for name, module in pl_module.named_modules(remove_duplicate=False):
            if module is self.target:
                return str(name)
        raise ValueError(
            f"Expected `target` to be a submodule of the {type(pl_module).__name__} being fit. "
            f"Got a {type(self.target).__name__} that it does not contain."
        )

    def _release(self, trainer: Any) -> None:
        if self._fixed:
            _refuse_saves_from_the_fit_engine(trainer.strategy)
        while self._fixed:
            root, name = self._fixed.pop()
            if _tensor_parallel(root, name):
                # Sharded by `parallelize_fixed` in configure_model: a plain DTensor weight.
                bake_parallelized(root, name=name)
            elif is_fixed(root, name):
                # `bake`, and under FSDP2 the baked weight joins the group that trained it,
                # so the model evaluates and fits again as a plain sharded one.
                bake_fully_sharded(root, name=name)
