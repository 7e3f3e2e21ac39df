"""`EmbeddingConstraint` in a Lightning Trainer: lifecycle, failures, checkpoints, precision."""

from __future__ import annotations

import copy
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightning_models import FLAVOURS, Flavour, loader, tokens
from support import assert_tree_unchanged, snapshot_tree
from torch import Tensor, nn

from embedding_constraint import is_fixed


@pytest.fixture(params=list(FLAVOURS))
def flavour(request: pytest.FixtureRequest) -> Flavour:
    return FLAVOURS[request.param]


@pytest.fixture
def pl_flavour() -> Flavour:
    return FLAVOURS["pytorch_lightning"]


# Vocabularies and a reference with a NaN at old row 2 ("c"), for `from_vocabularies`.
_TOKENS, _NEW_TOKENS = ["a", "b", "c", "d"], ["x", "a", "b", "c", "d"]
_NAN = torch.zeros(4, 2)
_NAN[2, 1] = float("nan")


def _trained_reference(vocab: int = 6, dim: int = 4) -> nn.Embedding:
    torch.manual_seed(123)
    return nn.Embedding(vocab, dim)


def _assert_plain(module: nn.Module) -> None:
    assert type(module.weight) is nn.Parameter
    assert not hasattr(module, "parametrizations")
    assert type(module) in (nn.Embedding, nn.Linear, nn.EmbeddingBag)


def test_fit_keeps_old_rows_and_leaves_a_plain_module(flavour: Flavour) -> None:
    old = _trained_reference()
    model = flavour.model(vocab=10, dim=4)
    before = model.embedding.weight.detach().clone()
    param = model.embedding.weight
    flavour.trainer(callbacks=[flavour.callback(model.embedding, old)]).fit(model, loader())
    _assert_plain(model.embedding)
    assert model.embedding.weight is param
    assert torch.equal(model.embedding.weight[:6], old.weight)
    assert not torch.equal(model.embedding.weight[6:], before[6:]), "free rows did not train"
    assert list(model.state_dict()) == list(flavour.model(vocab=10, dim=4).state_dict())


def test_the_reference_is_copied_at_construction(pl_flavour: Flavour) -> None:
    old = _trained_reference()
    expected = old.weight.detach().clone()
    model = pl_flavour.model()
    callback = pl_flavour.callback(model.embedding, old)
    with torch.no_grad():
        old.weight.add_(1.0)
    pl_flavour.trainer(callbacks=[callback], max_epochs=1).fit(model, loader())
    assert torch.equal(model.embedding.weight[:6], expected)


def test_a_tensor_reference_and_scattered_rows(pl_flavour: Flavour) -> None:
    reference = torch.randn(3, 4)
    model = pl_flavour.model()
    callback = pl_flavour.callback(model.embedding, reference, rows=[9, 2, 5])
    pl_flavour.trainer(callbacks=[callback], max_epochs=1).fit(model, loader())
    assert torch.equal(model.embedding.weight[[9, 2, 5]], reference)


def test_optimizer_state_exists_only_for_free_rows(pl_flavour: Flavour) -> None:
    model = pl_flavour.model()
    seen: dict[str, Any] = {}

    class Spy(pl_flavour.package.Callback):  # type: ignore[name-defined,misc]
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            (optimizer,) = trainer.optimizers
            seen["shapes"] = sorted(tuple(s["exp_avg"].shape) for s in optimizer.state.values())

    callback = pl_flavour.callback(model.embedding, torch.zeros(7, 4))
    pl_flavour.trainer(callbacks=[callback, Spy()], max_epochs=1).fit(model, loader())
    assert seen["shapes"] == sorted([(3, 4), (3, 4), (3,)])


def test_linear_head_weight_and_bias_from_a_module(pl_flavour: Flavour) -> None:
    torch.manual_seed(1)
    old_head = nn.Linear(4, 3)
    model = pl_flavour.model(classes=5)
    callback = pl_flavour.callback(model.head, old_head)
    pl_flavour.trainer(callbacks=[callback], max_epochs=1).fit(model, loader())
    _assert_plain(model.head)
    assert torch.equal(model.head.weight[:3], old_head.weight)
    assert torch.equal(model.head.bias[:3], old_head.bias)


def test_two_callbacks_embedding_and_head(flavour: Flavour) -> None:
    old = _trained_reference()
    old_head = nn.Linear(4, 2)
    model = flavour.model(classes=3)
    callbacks = [flavour.callback(model.embedding, old), flavour.callback(model.head, old_head)]
    assert callbacks[0].state_key != callbacks[1].state_key
    flavour.trainer(callbacks=callbacks, max_epochs=1).fit(model, loader())
    assert torch.equal(model.embedding.weight[:6], old.weight)
    assert torch.equal(model.head.weight[:2], old_head.weight)
    assert torch.equal(model.head.bias[:2], old_head.bias)


def test_tied_head_reads_the_constrained_weight_and_the_tie_survives(flavour: Flavour) -> None:
    old = _trained_reference()
    model = flavour.model(tie=True)
    seen: list[bool] = []

    class Check(flavour.package.Callback):  # type: ignore[name-defined,misc]
        def on_train_batch_end(self, *args: Any) -> None:
            seen.append(torch.equal(model.head.weight[:6], old.weight))

    flavour.trainer(callbacks=[flavour.callback(model.embedding, old), Check()]).fit(
        model, loader()
    )
    assert len(seen) == 16
    assert all(seen)
    assert model.head.weight is model.embedding.weight
    assert torch.equal(model.head.weight[:6], old.weight)


def test_construction_rejects_bad_input(pl_flavour: Flavour) -> None:
    model = pl_flavour.model()
    cls = pl_flavour.callback
    cases: list[tuple[Any, Any, type[Exception], str]] = [
        (model.embedding, np.zeros((2, 4)), TypeError, "Got ndarray"),
        (model.embedding, [[0.0] * 4], TypeError, "Got list"),
        (model.embedding, None, TypeError, "Got NoneType"),
        (model.embedding, torch.zeros(2, 5), ValueError, r"rows of shape \(4,\).*Got .*\(2, 5\)"),
        (
            model.embedding,
            torch.zeros(11, 4),
            ValueError,
            r"`target.weight`.*Got 11 rows .* and 10 in",
        ),
        (model.embedding, nn.Linear(4, 2), TypeError, "Expected `constraint` to be an Embedding"),
        (nn.Conv1d(1, 1, 1), torch.zeros(1, 1), TypeError, "Got Conv1d"),
        (model.head, nn.Linear(4, 2, bias=False), ValueError, "bias exactly when"),
        (nn.Embedding(5, 4, sparse=True), torch.zeros(1, 4), ValueError, "sparse=True"),
    ]
    for target, constraint, error, match in cases:
        with pytest.raises(error, match=match):
            cls(target, constraint)
    with pytest.raises(ValueError, match="Expected `rows` to be distinct"):
        cls(model.embedding, torch.zeros(2, 4), rows=[1, 1])


def _constrained(module: nn.Module) -> nn.Module:
    from embedding_constraint import fix_rows

    return fix_rows(module, torch.zeros(1, 4))


def _head_with_an_infinite_bias() -> nn.Linear:
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.bias[1] = float("inf")
    return head


@pytest.mark.parametrize(
    ("target", "constraint", "error", "match"),
    [
        (nn.Embedding(5, 4), torch.tensor(1.0), ValueError, r"`constraint` to have a row dim"),
        (nn.Embedding(5, 4), torch.zeros(2, 4).long(), TypeError, r"`constraint` to be floati"),
        (nn.Embedding(5, 4), torch.zeros(2, 4, device="meta"), ValueError, r"`constraint` to h"),
        (nn.Embedding(5, 4), _NAN.repeat(1, 2), ValueError, r"`constraint` to be finite.*\[2\]"),
        (
            nn.Embedding(5, 4),
            torch.tensor([[0.0] * 4, [1e300] * 4], dtype=torch.float64),
            ValueError,
            r"`constraint` to be finite in torch\.float32, the dtype of `target.weight`.*rows \[1\]",
        ),
        (nn.Linear(4, 5), nn.Linear(3, 2), ValueError, r"`constraint.weight` to have rows of s"),
        (
            nn.Linear(4, 5),
            _head_with_an_infinite_bias(),
            ValueError,
            r"`constraint.bias` to be finite. Got NaN or Inf in rows \[1\]",
        ),
        (
            _constrained(nn.Embedding(5, 4)),
            torch.zeros(2, 4),
            ValueError,
            r"`target.weight` to be unco",
        ),
        (
            _constrained(nn.Embedding(5, 4)),
            nn.Embedding(2, 4),
            ValueError,
            r"`target.weight` to be unco",
        ),
    ],
    ids=[
        "0-d",
        "int",
        "meta",
        "NaN",
        "overflows-target-dtype",
        "head-other-width",
        "head-bias-Inf",
        "target-constrained",
        "target-constrained-module",
    ],
)
def test_construction_names_the_argument_at_fault(
    pl_flavour: Flavour, target: nn.Module, constraint: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        pl_flavour.callback(target, constraint)


def test_target_outside_the_model_fails_at_setup_and_leaves_it_plain(pl_flavour: Flavour) -> None:
    model = pl_flavour.model()
    stranger = nn.Embedding(10, 4)
    trainer = pl_flavour.trainer(callbacks=[pl_flavour.callback(stranger, torch.zeros(2, 4))])
    with pytest.raises(ValueError, match="Expected `target` to be a submodule of the PLModel"):
        trainer.fit(model, loader())
    _assert_plain(model.embedding)
    _assert_plain(stranger)


def test_sharded_strategy_is_refused_at_setup(pl_flavour: Flavour) -> None:
    from pytorch_lightning.strategies import FSDPStrategy

    # (DeepSpeedStrategy: taken at every ZeRO stage; tests/test_deepspeed.py.)
    class XLAFSDPStrategy:  # Lightning's needs torch_xla: a class of its name stands in for it
        pass

    model = pl_flavour.model()
    callback = pl_flavour.callback(model.embedding, torch.zeros(2, 4))
    for strategy in (FSDPStrategy, XLAFSDPStrategy):
        fake = SimpleNamespace(strategy=object.__new__(strategy))
        with pytest.raises(RuntimeError, match=f"Got {strategy.__name__}, which shards them"):
            callback.setup(fake, model, "fit")
        _assert_plain(model.embedding)


def test_exception_in_training_step_leaves_a_plain_exact_module(flavour: Flavour) -> None:
    old = _trained_reference()
    model = flavour.model(fail_at_step=3)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        flavour.trainer(callbacks=[flavour.callback(model.embedding, old)]).fit(model, loader())
    _assert_plain(model.embedding)
    assert torch.equal(model.embedding.weight[:6], old.weight)


@pytest.fixture
def restore_sigint() -> Iterator[None]:
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.mark.usefixtures("restore_sigint")
def test_keyboard_interrupt_leaves_a_plain_exact_module(pl_flavour: Flavour) -> None:
    old = _trained_reference()
    model = pl_flavour.model()

    class Interrupt(pl_flavour.package.Callback):  # type: ignore[name-defined,misc]
        def on_train_batch_end(self, *args: Any) -> None:
            raise KeyboardInterrupt

    trainer = pl_flavour.trainer(callbacks=[pl_flavour.callback(model.embedding, old), Interrupt()])
    with pytest.raises(SystemExit):
        trainer.fit(model, loader())
    _assert_plain(model.embedding)
    assert torch.equal(model.embedding.weight[:6], old.weight)


def test_learning_rate_finder_then_fit(pl_flavour: Flavour) -> None:
    from pytorch_lightning.tuner.tuning import Tuner

    old = _trained_reference()
    model = pl_flavour.model()
    trainer = pl_flavour.trainer(callbacks=[pl_flavour.callback(model.embedding, old)])
    Tuner(trainer).lr_find(model, train_dataloaders=loader(), min_lr=1e-3, num_training=8)
    _assert_plain(model.embedding)
    assert torch.equal(model.embedding.weight[:6], old.weight)
    trainer.fit(model, loader())
    _assert_plain(model.embedding)
    assert torch.equal(model.embedding.weight[:6], old.weight)


def test_validate_test_predict_around_fit_and_a_second_fit(pl_flavour: Flavour) -> None:
    old = _trained_reference()
    model = pl_flavour.model()
    callback = pl_flavour.callback(model.embedding, old)
    trainer = pl_flavour.trainer(callbacks=[callback], max_epochs=1)
    trainer.validate(model, loader())
    _assert_plain(model.embedding)
    trainer.fit(model, loader(), loader())
    first = model.embedding.weight.detach().clone()
    trainer.test(model, loader())
    predictions = trainer.predict(model, loader())
    assert torch.equal(predictions[0], model(tokens()[:8]))
    second = pl_flavour.trainer(callbacks=[callback], max_epochs=1)
    second.fit(model, loader())
    _assert_plain(model.embedding)
    assert torch.equal(model.embedding.weight[:6], old.weight)
    assert not torch.equal(model.embedding.weight[6:], first[6:])


def test_info_line_names_the_parameter_and_row_counts(
    pl_flavour: Flavour, caplog: pytest.LogCaptureFixture
) -> None:
    model = pl_flavour.model()
    with caplog.at_level(logging.INFO):
        pl_flavour.trainer(
            callbacks=[pl_flavour.callback(model.embedding, torch.zeros(4, 4))], max_epochs=1
        ).fit(model, loader())
    lines = [r.getMessage() for r in caplog.records if "EmbeddingConstraint" in r.getMessage()]
    expected = (
        "EmbeddingConstraint: embedding.weight has 4 fixed and 6 free rows. The 16 fixed values "
        "are held outside parameters(): a model summary counts 16 parameters fewer than the "
        "plain model, neither trainable nor non-trainable."
    )
    assert lines == [expected]


def test_model_summary_during_the_fit_leaves_the_fixed_rows_out(
    flavour: Flavour, caplog: pytest.LogCaptureFixture
) -> None:
    # What docs/lightning.md states: Lightning's ModelSummary sums `parameters()`, which hold
    # the free rows only, so 6 x 4 fixed values are missing from both counts.
    import importlib

    summary = importlib.import_module(f"{flavour.name}.utilities.model_summary").ModelSummary
    model = flavour.model(vocab=10, dim=4)
    plain = summary(model)
    assert (plain.total_parameters, plain.trainable_parameters) == (55, 55)
    counts: dict[str, int] = {}

    class Count(flavour.package.Callback):  # type: ignore[name-defined,misc]
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            during = summary(pl_module)
            counts["total"] = during.total_parameters
            counts["trainable"] = during.trainable_parameters

    callback = flavour.callback(model.embedding, torch.zeros(6, 4))
    with caplog.at_level(logging.INFO):
        flavour.trainer(callbacks=[callback, Count()], max_epochs=1).fit(model, loader())
    assert counts == {"total": 55 - 24, "trainable": 55 - 24}
    (line,) = [r.getMessage() for r in caplog.records if "EmbeddingConstraint" in r.getMessage()]
    assert "a model summary counts 24 parameters fewer than the plain model" in line
    after = summary(model)  # baked: the plain model's counts again
    assert (after.total_parameters, after.trainable_parameters) == (55, 55)


def test_checkpoint_loads_into_a_plain_module(flavour: Flavour, tmp_path: Path) -> None:
    old = _trained_reference()
    model = flavour.model()
    checkpoint = flavour.package.callbacks.ModelCheckpoint(
        dirpath=tmp_path, save_top_k=-1, every_n_epochs=1
    )
    trainer = flavour.trainer(
        callbacks=[flavour.callback(model.embedding, old), checkpoint],
        enable_checkpointing=True,
        max_epochs=2,
    )
    trainer.fit(model, loader())
    first = min(tmp_path.glob("epoch=0*.ckpt"))
    state = torch.load(first, weights_only=True)["state_dict"]
    assert set(state) == set(flavour.model().state_dict())
    loaded = flavour.model.load_from_checkpoint(first)
    _assert_plain(loaded.embedding)
    assert torch.equal(loaded.embedding.weight[:6], old.weight)
    assert not torch.equal(loaded.embedding.weight, model.embedding.weight), "mid-training state"


@pytest.mark.parametrize("split", [1, 2])
def test_resume_from_checkpoint_equals_an_uninterrupted_run(
    pl_flavour: Flavour, tmp_path: Path, split: int
) -> None:
    old = _trained_reference()

    def run(max_epochs: int, init: dict[str, Tensor], ckpt: Path | None = None) -> Any:
        model = pl_flavour.model()
        model.load_state_dict(init)
        trainer = pl_flavour.trainer(
            callbacks=[pl_flavour.callback(model.embedding, old)],
            max_epochs=max_epochs,
            deterministic=True,
        )
        trainer.fit(model, loader(), ckpt_path=ckpt)
        return model, trainer

    torch.manual_seed(0)
    init = pl_flavour.model().state_dict()
    whole, _ = run(3, init)
    _, partial = run(split, init)
    path = tmp_path / "partial.ckpt"
    partial.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    exp_avg = [s["exp_avg"].shape for s in checkpoint["optimizer_states"][0]["state"].values()]
    # Free rows only: the embedding's 4 free rows, then the head's weight and bias.
    assert exp_avg == [(4, 4), (3, 4), (3,)]
    resumed, _ = run(3, init, ckpt=path)
    _assert_plain(resumed.embedding)
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        ("32-true", torch.float32),
        ("64-true", torch.float64),
        ("bf16-mixed", torch.float32),
        ("16-mixed", torch.float32),
        ("bf16-true", torch.bfloat16),
    ],
)
def test_precision(pl_flavour: Flavour, precision: str, dtype: torch.dtype) -> None:
    old = _trained_reference()
    model = pl_flavour.model()
    callbacks = [pl_flavour.callback(model.embedding, old)]
    if precision == "16-mixed" and not torch.cuda.is_available():
        # Lightning has no float16 AMP on the CPU: it says so and runs bf16-mixed.
        with pytest.warns(UserWarning, match="AMP with fp16 is not supported on CPU"):
            trainer = pl_flavour.trainer(callbacks=callbacks, precision=precision, max_epochs=1)
    else:
        trainer = pl_flavour.trainer(callbacks=callbacks, precision=precision, max_epochs=1)
    trainer.fit(model, loader())
    _assert_plain(model.embedding)
    assert model.embedding.weight.dtype == dtype
    # The reference is held in the weight's dtype: rounded once, then exact.
    assert torch.equal(model.embedding.weight[:6], old.weight.to(dtype))


def test_64_true_keeps_a_float64_reference_exact(pl_flavour: Flavour) -> None:
    # The callback registers before Lightning converts the module to float64: the fixed rows
    # must come out as the float64 reference, not as its float32 rounding widened again.
    old = _trained_reference().double()
    with torch.no_grad():
        old.weight.add_(1e-12)  # below float32's resolution: lost if rounded through it
    model = pl_flavour.model()
    trainer = pl_flavour.trainer(
        callbacks=[pl_flavour.callback(model.embedding, old)], precision="64-true", max_epochs=1
    )
    trainer.fit(model, loader())
    assert model.embedding.weight.dtype == torch.float64
    assert torch.equal(model.embedding.weight[:6], old.weight)


def test_a_precision_whose_dtype_cannot_hold_the_reference_is_refused(pl_flavour: Flavour) -> None:
    reference = torch.full((2, 4), 1e5)  # past float16's largest, 65504
    model = pl_flavour.model()
    callbacks = [pl_flavour.callback(model.embedding, reference)]
    trainer = pl_flavour.trainer(callbacks=callbacks, precision="16-true", max_epochs=1)
    # Refused at Lightning's conversion of the module, before anything is converted.
    with pytest.raises(ValueError, match=r"finite in torch\.float16.*the run's dtype"):
        trainer.fit(model, loader())
    _assert_plain(model.embedding)


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_resume_in_another_precision_than_the_reference(
    pl_flavour: Flavour, tmp_path: Path, precision: str
) -> None:
    # Lightning loads the checkpoint before it converts the module: its fixed rows are in the
    # run's precision, the module's reference still in the reference's.
    old = _trained_reference()
    if precision == "64-true":
        old = old.double()
    model = pl_flavour.model()
    callbacks = [pl_flavour.callback(model.embedding, old)]
    trainer = pl_flavour.trainer(callbacks=callbacks, precision=precision, max_epochs=1)
    trainer.fit(model, loader())
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    resumed = pl_flavour.model()
    callbacks = [pl_flavour.callback(resumed.embedding, old)]
    trainer = pl_flavour.trainer(callbacks=callbacks, precision=precision, max_epochs=2)
    trainer.fit(resumed, loader(), ckpt_path=path)
    _assert_plain(resumed.embedding)
    dtype = resumed.embedding.weight.dtype
    assert torch.equal(resumed.embedding.weight[:6], old.weight.to(dtype))


def test_resuming_with_the_same_rows_in_another_order_is_accepted(
    pl_flavour: Flavour, tmp_path: Path
) -> None:
    reference = torch.randn(2, 4)
    model = pl_flavour.model()
    callback = pl_flavour.callback(model.embedding, reference, rows=[5, 2])
    trainer = pl_flavour.trainer(callbacks=[callback], max_epochs=1)
    trainer.fit(model, loader())
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    resumed = pl_flavour.model()
    callback = pl_flavour.callback(resumed.embedding, reference.flip(0), rows=[2, 5])
    pl_flavour.trainer(callbacks=[callback], max_epochs=2).fit(resumed, loader(), ckpt_path=path)
    assert torch.equal(resumed.embedding.weight[[5, 2]], reference)


def test_resuming_with_other_fixed_rows_is_refused(pl_flavour: Flavour, tmp_path: Path) -> None:
    # The same number of fixed rows elsewhere: the checkpoint's optimizer state belongs to
    # other free rows, and would be handed to these silently.
    old = _trained_reference()
    model = pl_flavour.model()
    trainer = pl_flavour.trainer(callbacks=[pl_flavour.callback(model.embedding, old)])
    trainer.fit(model, loader())
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]["embedding.weight"]
    rows = [4, 5, 6, 7, 8, 9]
    resumed = pl_flavour.model()
    callback = pl_flavour.callback(resumed.embedding, saved[rows].clone(), rows=rows)
    trainer = pl_flavour.trainer(callbacks=[callback], max_epochs=3)
    with pytest.raises(RuntimeError, match=r"at \[4, 5, 6, 7, 8, 9\]. Got .* at \[0, 1, 2"):
        trainer.fit(resumed, loader(), ckpt_path=path)
    # Refused before a step: plain, with the weights Lightning loaded before the callbacks'
    # state (as after any failure to resume), not trained from them.
    _assert_plain(resumed.embedding)
    assert torch.equal(resumed.embedding.weight, saved)


def test_accumulation_clipping_and_scheduler(pl_flavour: Flavour) -> None:
    old = _trained_reference()

    class Scheduled(pl_flavour.model):  # type: ignore[name-defined,misc]
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
            return [optimizer], [scheduler]

    model = Scheduled()
    before = model.embedding.weight.detach().clone()
    trainer = pl_flavour.trainer(
        callbacks=[pl_flavour.callback(model.embedding, old)],
        accumulate_grad_batches=3,
        gradient_clip_val=0.01,
        max_epochs=3,
    )
    trainer.fit(model, loader())
    assert torch.equal(model.embedding.weight[:6], old.weight)
    assert not torch.equal(model.embedding.weight[6:], before[6:])
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] < 0.5


def test_manual_optimization(pl_flavour: Flavour) -> None:
    old = _trained_reference()

    class Manual(pl_flavour.model):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            loss: Tensor = self._loss(batch)
            self.manual_backward(loss)
            optimizer.step()
            return loss

    model = Manual()
    before = model.embedding.weight.detach().clone()
    pl_flavour.trainer(callbacks=[pl_flavour.callback(model.embedding, old)]).fit(model, loader())
    assert torch.equal(model.embedding.weight[:6], old.weight)
    assert not torch.equal(model.embedding.weight[6:], before[6:])


# -- vocabularies -----------------------------------------------------------------------------


def test_from_vocabularies_keeps_old_tokens_rows_in_their_new_positions(flavour: Flavour) -> None:
    from embedding_constraint import vocab

    old_tokens = ["pear", "apple", "kiwi", "fig", "plum", "lime"]
    # Re-sorted, two tokens added in between old ones, one ("fig") removed.
    new_tokens = ["apple", "banana", "kiwi", "lime", "mango", "pear", "plum", "date", "cherry", "x"]
    old = _trained_reference()
    model = flavour.model(vocab=10, dim=4)
    callback = flavour.callback.from_vocabularies(model.embedding, old, old_tokens, new_tokens)
    flavour.trainer(callbacks=[callback]).fit(model, loader())
    _assert_plain(model.embedding)
    alignment = vocab.align(old_tokens, new_tokens)
    assert alignment.removed == ("fig",)
    for token in ["pear", "apple", "kiwi", "plum", "lime"]:
        new_row, old_row = new_tokens.index(token), old_tokens.index(token)
        assert torch.equal(model.embedding.weight[new_row], old.weight[old_row]), token


def test_from_vocabularies_for_a_linear_head_fixes_weight_and_bias(pl_flavour: Flavour) -> None:
    torch.manual_seed(2)
    old_head = nn.Linear(4, 3)
    model = pl_flavour.model(classes=5)
    callback = pl_flavour.callback.from_vocabularies(
        model.head, old_head, ["a", "b", "c"], ["c", "x", "a", "y", "b"]
    )
    pl_flavour.trainer(callbacks=[callback], max_epochs=1).fit(model, loader())
    assert torch.equal(model.head.weight[[2, 4, 0]], old_head.weight)
    assert torch.equal(model.head.bias[[2, 4, 0]], old_head.bias)


@pytest.mark.parametrize(
    ("new_tokens", "given"),
    # "x" first: the shared tokens sit at rows 1..4 of `target`; one token short they would
    # be fixed at 0..3, one too many at rows `target` does not have.
    [(["x", "a", "b", "c"], 4), (["x", "a", "b", "c", "d", "y"], 6)],
    ids=["short", "long"],
)
def test_from_vocabularies_refuses_a_new_vocabulary_of_another_length(
    flavour: Flavour, new_tokens: list[str], given: int
) -> None:
    old, target = nn.Embedding(4, 2), nn.Embedding(5, 2)
    before = target.weight.detach().clone()
    with pytest.raises(
        ValueError,
        match=rf"Expected `new_vocab` to name one token per row of `target` \(5\)\. "
        rf"Got {given} tokens",
    ):
        flavour.callback.from_vocabularies(target, old, ["a", "b", "c", "d"], new_tokens)
    _assert_plain(target)
    assert torch.equal(target.weight, before)


def test_from_vocabularies_with_a_new_vocabulary_of_the_targets_length(pl_flavour: Flavour) -> None:
    old, target = nn.Embedding(4, 2), nn.Embedding(5, 2)
    callback = pl_flavour.callback.from_vocabularies(
        target, old, ["a", "b", "c", "d"], ["x", "a", "b", "c", "d"]
    )
    assert torch.as_tensor(callback.rows).tolist() == [1, 2, 3, 4]
    assert torch.equal(callback.references["weight"], old.weight)


@pytest.mark.parametrize(
    ("old", "old_vocab", "new_vocab", "error", "match"),
    [
        (nn.Embedding(4, 2), "abcd", _NEW_TOKENS, TypeError, r"Expected `old_vocab` to be a seq"),
        (nn.Embedding(4, 2), _TOKENS, "xabcd", TypeError, r"Expected `new_vocab` to be a seq"),
        (nn.Embedding(4, 2), _TOKENS, None, TypeError, r"`new_vocab` to be a .*Got NoneType"),
        (nn.Embedding(4, 2), [], _NEW_TOKENS, ValueError, r"`old_vocab` to hold at least one"),
        (nn.Embedding(4, 2), list("abad"), _NEW_TOKENS, ValueError, r"`old_vocab` to hold dist"),
        ("abc", _TOKENS, _NEW_TOKENS, TypeError, r"Expected `old` to be a torch\.Tensor or a mod"),
        (None, _TOKENS, _NEW_TOKENS, TypeError, r"Expected `old` to be .*Got NoneType"),
        (nn.Linear(2, 4), _TOKENS, _NEW_TOKENS, TypeError, r"`old` to be an Embedding like `ta"),
        (torch.tensor(1.0), _TOKENS, _NEW_TOKENS, ValueError, r"`old` to have a row dimension"),
        (torch.zeros(4, 2).long(), _TOKENS, _NEW_TOKENS, TypeError, r"`old` to be floating-poi"),
        (torch.zeros(4, 3), _TOKENS, _NEW_TOKENS, ValueError, r"`old` to have rows of shape \(2"),
        (_NAN, _TOKENS, _NEW_TOKENS, ValueError, r"`old` to be finite. Got NaN or Inf in rows \[2"),
    ],
    ids=[
        "old_vocab-str",
        "new_vocab-str",
        "new_vocab-None",
        "old_vocab-empty",
        "old_vocab-duplicates",
        "old-str",
        "old-None",
        "old-other-class",
        "old-0-d",
        "old-int",
        "old-other-width",
        "old-NaN",
    ],
)
def test_from_vocabularies_names_the_argument_at_fault(
    pl_flavour: Flavour,
    old: Any,
    old_vocab: Any,
    new_vocab: Any,
    error: type[Exception],
    match: str,
) -> None:
    target = nn.Embedding(5, 2)
    before = target.weight.detach().clone()
    with pytest.raises(error, match=match):
        pl_flavour.callback.from_vocabularies(target, old, old_vocab, new_vocab)
    _assert_plain(target)
    assert torch.equal(target.weight, before)


def test_from_vocabularies_accepts_a_nan_in_a_row_that_is_not_fixed(pl_flavour: Flavour) -> None:
    # "c" (old row 2, the NaN) is removed: its row is not held.
    callback = pl_flavour.callback.from_vocabularies(
        nn.Embedding(5, 2), _NAN, _TOKENS, ["x", "a", "b", "d", "y"]
    )
    assert torch.as_tensor(callback.rows).tolist() == [1, 2, 3]
    assert torch.equal(callback.references["weight"], _NAN[[0, 1, 3]])


def test_from_vocabularies_names_old_for_a_head_without_its_bias(pl_flavour: Flavour) -> None:
    with pytest.raises(ValueError, match=r"Expected `old` to have a bias exactly when `target`"):
        pl_flavour.callback.from_vocabularies(
            nn.Linear(2, 3), nn.Linear(2, 2, bias=False), ["a", "b"], ["a", "b", "c"]
        )


def test_from_vocabularies_checks_the_old_vocabulary_against_the_old_rows() -> None:
    flavour = FLAVOURS["pytorch_lightning"]
    old, new = nn.Embedding(4, 2), nn.Embedding(5, 2)
    with pytest.raises(ValueError, match=r"one token per row of `old` \(4\). Got 3 tokens"):
        flavour.callback.from_vocabularies(new, old, ["a", "b", "c"], ["a", "b", "c", "d", "e"])


# -- the other Lightning package --------------------------------------------------------------


@pytest.mark.parametrize(
    ("trainer_of", "callback_of"),
    [("lightning.pytorch", "pytorch_lightning"), ("pytorch_lightning", "lightning.pytorch")],
)
def test_a_trainer_runs_the_other_packages_callback_too(trainer_of: str, callback_of: str) -> None:
    # What docs/lightning.md states for the Lightning version under test.
    torch.manual_seed(0)
    old = nn.Embedding(6, 4)
    model = FLAVOURS[trainer_of].model(vocab=10, dim=4)
    callback = FLAVOURS[callback_of].callback(model.embedding, old)
    FLAVOURS[trainer_of].trainer(callbacks=[callback], max_epochs=1).fit(model, loader())
    assert type(model.embedding.weight) is nn.Parameter
    assert torch.equal(model.embedding.weight[:6], old.weight)


# -- copies taken during a fit ----------------------------------------------------------------


def test_a_snapshot_taken_during_a_fit_survives_the_bake_at_its_end() -> None:
    flavour = FLAVOURS["pytorch_lightning"]
    torch.manual_seed(0)
    old = nn.Embedding(6, 4)
    model = flavour.model(vocab=10, dim=4)
    snapshots: list[Any] = []

    class Snapshot(flavour.package.Callback):  # type: ignore[name-defined,misc]
        def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
            snapshots.append(copy.deepcopy(pl_module))  # an EMA or best-model copy

    callbacks = [flavour.callback(model.embedding, old), Snapshot()]
    flavour.trainer(callbacks=callbacks, max_epochs=1).fit(model, loader())
    assert type(model.embedding.weight) is nn.Parameter
    (snapshot,) = snapshots
    assert is_fixed(snapshot, "embedding.weight")
    ids = torch.arange(10)
    torch.testing.assert_close(snapshot.embedding(ids), snapshot.embedding.weight.detach())
    assert torch.equal(snapshot.embedding.weight[:6], old.weight)


# -- optimizers and checkpoints of an earlier plain fit ---------------------------------------


def test_the_callback_ignores_the_optimizer_of_an_earlier_fit() -> None:
    # A plain fit first, its Trainer (and AdamW, with full-size state) still alive: the
    # constrained fit makes its own optimizer after setup, so the old one is no reason to refuse.
    flavour = FLAVOURS["pytorch_lightning"]
    torch.manual_seed(0)
    model = flavour.model(vocab=10, dim=4)
    first = flavour.trainer(max_epochs=1)
    first.fit(model, loader())
    (optimizer,) = first.optimizers
    assert optimizer.state[model.embedding.weight]["exp_avg"].shape == (10, 4)
    reference = model.embedding.weight[:6].detach().clone()
    callback = flavour.callback(model.embedding, reference)
    flavour.trainer(callbacks=[callback], max_epochs=1).fit(model, loader())
    assert torch.equal(model.embedding.weight[:6], reference)


def _fit_plain_and_save(flavour: Flavour, path: Path) -> Any:
    torch.manual_seed(0)
    model = flavour.model(vocab=10, dim=4)
    trainer = flavour.trainer(max_epochs=1)
    trainer.fit(model, loader())
    trainer.save_checkpoint(path)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS.values(), ids=list(FLAVOURS))
def test_resuming_a_plain_checkpoint_with_the_constraint_names_the_cause(
    flavour: Flavour, tmp_path: Path
) -> None:
    path = tmp_path / "plain.ckpt"
    trained = _fit_plain_and_save(flavour, path)
    reference = trained.embedding.weight[:6].detach().clone()
    model = flavour.model(vocab=10, dim=4)
    callback = flavour.callback(model.embedding, reference)
    trainer = flavour.trainer(callbacks=[callback], max_epochs=2)
    with pytest.raises(
        RuntimeError, match=r"optimizer state for 'embedding.weight'.*saved without"
    ):
        trainer.fit(model, loader(), ckpt_path=path)
    assert type(model.embedding.weight) is nn.Parameter  # baked on the way out


# -- the target, other callbacks, state keys, swapped arguments -------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS.values(), ids=list(FLAVOURS))
def test_a_target_replaced_in_the_modules_setup_fails_loudly(flavour: Flavour) -> None:
    class Replacing(flavour.model):  # type: ignore[name-defined,misc]
        def setup(self, stage: str) -> None:
            self.embedding = nn.Embedding(10, 4)  # runs after the callback's setup

    model = Replacing(vocab=10, dim=4)
    callback = flavour.callback(model.embedding, nn.Embedding(6, 4))
    with pytest.raises(
        RuntimeError, match=r"'embedding.weight' to be constrained.*configure_model"
    ):
        flavour.trainer(callbacks=[callback], max_epochs=1).fit(model, loader())


@pytest.mark.parametrize("flavour", FLAVOURS.values(), ids=list(FLAVOURS))
def test_two_callbacks_on_one_weight_fail_before_touching_it(flavour: Flavour) -> None:
    model = flavour.model(vocab=10, dim=4)
    before = snapshot_tree(model)
    first = flavour.callback(model.embedding, torch.zeros(2, 4))
    second = flavour.callback(model.embedding, torch.ones(3, 4), rows=[7, 8, 9])
    with pytest.raises(ValueError, match=r"one EmbeddingConstraint per tensor.*\['weight'\]"):
        flavour.trainer(callbacks=[first, second], max_epochs=1).fit(model, loader())
    assert_tree_unchanged(model, before)


AVERAGING = {
    "StochasticWeightAveraging": {"swa_lrs": 0.01},
    "EMAWeightAveraging": {},  # a WeightAveraging: it copies the model in its setup too
}


@pytest.mark.parametrize("averaging", AVERAGING)
@pytest.mark.parametrize("flavour", FLAVOURS.values(), ids=list(FLAVOURS))
def test_weight_averaging_listed_first_is_refused(flavour: Flavour, averaging: str) -> None:
    model = flavour.model(vocab=10, dim=4)
    before = snapshot_tree(model)
    other = getattr(flavour.package.callbacks, averaging)(**AVERAGING[averaging])
    callback = flavour.callback(model.embedding, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=f"EmbeddingConstraint before {averaging}"):
        flavour.trainer(callbacks=[other, callback], max_epochs=1).fit(model, loader())
    assert_tree_unchanged(model, before)


@pytest.mark.slow
def test_stochastic_weight_averaging_listed_after_keeps_the_rows_exact() -> None:
    flavour = FLAVOURS["pytorch_lightning"]
    torch.manual_seed(0)
    old = nn.Embedding(6, 4)
    model = flavour.model(vocab=10, dim=4)
    swa = flavour.package.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    callback = flavour.callback(model.embedding, old)
    flavour.trainer(callbacks=[callback, swa], max_epochs=3).fit(model, loader())
    assert type(model.embedding.weight) is nn.Parameter
    assert torch.equal(model.embedding.weight[:6], old.weight)


def test_state_keys_differ_for_same_shaped_targets() -> None:
    flavour = FLAVOURS["pytorch_lightning"]
    model = flavour.model(vocab=10, dim=4, classes=10)
    on_embedding = flavour.callback(model.embedding, torch.zeros(2, 4))
    on_head = flavour.callback(model.head, torch.zeros(2, 4))
    assert on_embedding.state_key != on_head.state_key
    flavour.trainer(callbacks=[on_embedding, on_head], max_epochs=1).fit(model, loader())
    assert "target=embedding" in on_embedding.state_key
    assert "target=head" in on_head.state_key


def test_swapped_arguments_are_named() -> None:
    flavour = FLAVOURS["pytorch_lightning"]
    old, new = nn.Embedding(6, 4), nn.Embedding(10, 4)
    with pytest.raises(
        ValueError, match=r"arguments may be swapped.*EmbeddingConstraint\(new_module, old_module\)"
    ):
        flavour.callback(old, new)
