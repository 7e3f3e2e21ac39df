"""On a CUDA device: the lookup, the buffer joined after ``.to("cuda")``, a Lightning fit.

Skipped where there is no CUDA device (CI has none). On a GPU machine:
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import torch
from lightning_models import FLAVOURS, loader
from support import constraint_of, stored
from torch import Tensor, nn
from torch.nn.utils import parametrize

from embedding_constraint import FixedRows, fix_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROWS: dict[str, list[int] | None] = {"prefix": None, "scattered": [8, 1, 4, 5]}
FIXED_AT = {"prefix": [0, 1, 2, 3], "scattered": [8, 1, 4, 5]}


def _joined_on_cuda(module: nn.Module) -> bool:
    joined = constraint_of(module).joined(stored(module))
    return joined is not None and joined.is_cuda


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("padding_idx", [None, 6], ids=["no-padding", "padding"])
@pytest.mark.parametrize("scale", [False, True], ids=["plain", "scale-grad-by-freq"])
def test_lookup_after_to_cuda_matches_reading_the_whole_weight(
    where: str, padding_idx: int | None, scale: bool
) -> None:
    torch.manual_seed(0)
    fast = nn.Embedding(10, 3, padding_idx=padding_idx, scale_grad_by_freq=scale)
    fast = fast.double()
    generic = copy.deepcopy(fast)
    reference = torch.randn(4, 3, dtype=torch.float64)
    fix_rows(fast, reference, rows=ROWS[where])
    parametrize.register_parametrization(generic, "weight", FixedRows(reference, rows=ROWS[where]))
    fast.cuda()
    generic.cuda()
    assert _joined_on_cuda(fast)
    indices = torch.tensor([[0, 1, 2, 9], [8, 8, 4, 6], [6, 5, 9, 9]], device="cuda")
    outs = []
    for module in (fast, generic):
        out = module(indices)
        weights = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype, device="cuda")
        torch.autograd.backward((out * weights.view_as(out)).sum())
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(stored(fast).grad, stored(generic).grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_training_on_cuda_keeps_fixed_rows_exact(
    where: str, dtype: torch.dtype, fused: bool
) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 64, device="cuda", dtype=dtype)
    reference = torch.randn(4, 64, device="cuda", dtype=dtype)
    fix_rows(emb, reference, rows=ROWS[where])
    free_before = stored(emb).detach().clone()
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1, weight_decay=0.1, fused=fused)
    for _ in range(5):
        opt.zero_grad()
        out = emb(torch.randint(0, 1000, (512,), device="cuda"))
        out.float().pow(2).mean().backward()
        opt.step()
    assert torch.equal(emb.weight[FIXED_AT[where]], reference)
    assert not torch.equal(stored(emb), free_before)
    assert _joined_on_cuda(emb)


@pytest.mark.parametrize("flavour_name", list(FLAVOURS))
def test_lightning_fit_on_the_gpu_trains_in_one_buffer(flavour_name: str) -> None:
    flavour = FLAVOURS[flavour_name]
    torch.manual_seed(123)
    old = nn.Embedding(6, 4)
    model = flavour.model(vocab=10, dim=4)
    seen: list[bool] = []

    class Watch(flavour.package.Callback):  # type: ignore[misc,name-defined]
        def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            # Registered on the CPU in setup, then moved to the GPU by the strategy.
            seen.append(_joined_on_cuda(pl_module.embedding))

    callbacks = [flavour.callback(model.embedding, old), Watch()]
    trainer = flavour.trainer(callbacks=callbacks, accelerator="gpu", max_epochs=1)
    trainer.fit(model, loader())
    assert seen
    assert all(seen)
    weight: Tensor = model.embedding.weight
    assert type(weight) is nn.Parameter
    assert torch.equal(weight[:6].cpu(), old.weight)


def test_the_callback_keeps_its_reference_in_host_memory() -> None:
    flavour = FLAVOURS["pytorch_lightning"]
    torch.manual_seed(123)
    old = nn.Embedding(6, 4, device="cuda")
    model = flavour.model(vocab=10, dim=4)
    callback = flavour.callback(model.embedding, old)
    assert callback.references["weight"].device.type == "cpu"
    flavour.trainer(callbacks=[callback], accelerator="gpu", max_epochs=1).fit(model, loader())
    # Lightning moves the model back to the CPU at the end of the fit.
    assert model.embedding.weight.device.type == "cpu"
    assert torch.equal(model.embedding.weight[:6], old.weight.cpu())


_BAD_IDS_SCRIPT = """
import sys, torch
from torch import nn
from embedding_constraint import fix_rows
kind, layout, bad, constrained = sys.argv[1:]
module = nn.Embedding(10, 3) if kind == "embedding" else nn.EmbeddingBag(10, 3, mode="sum")
if constrained == "yes":
    fix_rows(module, torch.zeros(4, 3), rows=None if layout == "prefix" else [8, 1, 4, 5])
module = module.cuda()
ids = torch.tensor([[0, 8, 9]], device="cuda")
ids = {"negative": ids - 1, "too-large": ids + 1, "uint8": ids.to(torch.uint8), "good": ids}[bad]
try:
    module(ids).sum().backward()
    torch.cuda.synchronize()
except Exception as error:
    print("FAILED", type(error).__name__, str(error).splitlines()[0][:200])
    sys.exit(1)
print("OK")
"""


@pytest.mark.parametrize("bad", ["negative", "too-large", "uint8", "good"])
@pytest.mark.parametrize("layout", ROWS)
@pytest.mark.parametrize("kind", ["embedding", "bag"])
def test_bad_ids_fail_on_cuda_as_in_the_plain_module(kind: str, layout: str, bad: str) -> None:
    # A device-side assert leaves the process's CUDA context unusable: one process per run.
    def run(constrained: str) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-c", _BAD_IDS_SCRIPT, kind, layout, bad, constrained]
        return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)

    plain, ours = run("no"), run("yes")
    assert (ours.returncode == 0) == (plain.returncode == 0), (plain.stdout, ours.stdout)
    if bad == "good":
        assert ours.returncode == 0, ours.stderr[-2000:]
    else:
        assert ours.returncode != 0
        # The same kind of error: a device-side assert for ids out of range, a dtype error.
        assert ours.stdout.split()[:2] == plain.stdout.split()[:2], (plain.stdout, ours.stdout)
