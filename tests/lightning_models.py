"""Small LightningModules for the callback tests, in both Lightning flavours.

The body is written once (`_Body`) and put in front of each flavour's LightningModule.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as L
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import embedding_constraint
import embedding_constraint.lightning


class _Body:
    """Predict a token's class (token % classes) from its embedding."""

    save_hyperparameters: Any
    log: Any
    __call__: Any

    def __init__(
        self,
        vocab: int = 10,
        dim: int = 4,
        classes: int = 3,
        lr: float = 0.1,
        tie: bool = False,
        fail_at_step: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embedding = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab if tie else classes)
        if tie:
            self.head.weight = self.embedding.weight
        self.classes = classes
        self.lr = lr
        self.fail_at_step = fail_at_step
        self.steps = 0

    def forward(self, tokens: Tensor) -> Tensor:
        out: Tensor = self.head(torch.tanh(self.embedding(tokens)))
        return out

    def _loss(self, batch: list[Tensor]) -> Tensor:
        (tokens,) = batch
        target = tokens % self.classes
        return nn.functional.cross_entropy(self(tokens), target)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("training_step failed on purpose")
        return self._loss(batch)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch)

    def predict_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        out: Tensor = self(batch[0])
        return out

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.1)


class PLModel(_Body, pl.LightningModule):
    """The test model for `pytorch_lightning`."""


class LModel(_Body, L.LightningModule):
    """The test model for `lightning.pytorch`."""


@dataclass(frozen=True)
class Flavour:
    """One Lightning package: its Trainer, model, callback and ModelCheckpoint."""

    name: str
    package: Any
    model: type[Any]
    callback: type[Any]

    def trainer(self, **kwargs: Any) -> Any:
        defaults: dict[str, Any] = {
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
        }
        return self.package.Trainer(**{**defaults, **kwargs})


FLAVOURS = {
    "pytorch_lightning": Flavour(
        "pytorch_lightning", pl, PLModel, embedding_constraint.EmbeddingConstraint
    ),
    "lightning.pytorch": Flavour(
        "lightning.pytorch", L, LModel, embedding_constraint.lightning.EmbeddingConstraint
    ),
}


def tokens(vocab: int = 10, size: int = 64, seed: int = 0) -> Tensor:
    """Token ids covering every row of a `vocab`-sized embedding."""
    return torch.randint(0, vocab, (size,), generator=torch.Generator().manual_seed(seed))


def loader(vocab: int = 10, size: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader[Any]:
    """Batches of `tokens(vocab, size, seed)`, in order."""
    return DataLoader(TensorDataset(tokens(vocab, size, seed)), batch_size=batch_size)


def cpu_deepspeed(flavour: Flavour, **kwargs: Any) -> Any:
    """Lightning's ``DeepSpeedStrategy(**kwargs)``, made to run on the CPU (``DS_ACCELERATOR=cpu``).

    Lightning refuses it without CUDA: ``setup_environment`` wants a ``CUDAAccelerator``,
    ``setup_distributed`` wants a device index per rank, and ``deepspeed.initialize`` gets
    ``root_device.index`` (None on the CPU). This skips those three checks (and the
    ``reset_seed`` in ``setup_distributed``, a no-op without ``seed_everything``): the engine,
    its ZeRO optimizer, the hooks and the checkpoints are Lightning's and DeepSpeed's own code.
    """
    strategies = importlib.import_module(f"{flavour.name}.strategies")

    class CPUDeepSpeedStrategy(strategies.DeepSpeedStrategy):  # type: ignore[misc,name-defined]
        def setup_environment(self) -> None:
            strategies.DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        @property
        def root_device(self) -> torch.device:
            return torch.device("cpu", self.local_rank)

    return CPUDeepSpeedStrategy(process_group_backend="gloo", **kwargs)
