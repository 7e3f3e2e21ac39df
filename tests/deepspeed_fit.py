"""Train a constrained model with raw ``deepspeed.initialize`` (2 gloo processes) or in one.

Run by tests/test_deepspeed.py as a script: ``--world 2`` spawns the ranks, which train at
ZeRO stages 0 to 3 in turn on the CPU (``DS_ACCELERATOR=cpu``), then, at stage 3, save a ZeRO
checkpoint, bake and train on with a new engine, then at stages 1 to 3 with ZeRO-Offload (the optimizer, and at stage 3 the
parameters, on the host); the parent then consolidates the checkpoint with DeepSpeed's
``zero_to_fp32`` and trains the same model in one process without DeepSpeed. Everything the
test compares is saved under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed  # type: ignore[import-untyped,import-not-found,unused-ignore]
import torch
from deepspeed.utils.zero_to_fp32 import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    get_fp32_state_dict_from_zero_checkpoint,
)
from torch import Tensor, nn
from torch.multiprocessing.spawn import spawn

from embedding_constraint import bake, fix_rows, is_fixed

sys.path.insert(0, str(Path(__file__).parent))

from support import in_process_group

VOCAB, DIM = 10, 4
WORLD, BATCH, STEPS = 2, 4, 4  # BATCH per rank; one process takes WORLD * BATCH
MORE = 2  # steps after the bake at stage 3, by a new engine
ROWS = [9, 0, 4, 2, 7, 5]  # the embedding's fixed rows; the head's are its first 6
ADAMW: dict[str, Any] = {"lr": 0.05, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
STAGES = (0, 1, 2, 3)
OFFLOADED = (1, 2, 3)  # trained again with ZeRO-Offload


class Net(nn.Module):
    """An embedding and a classifier head with a bias, both partly fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = torch.tanh(self.embedding(tokens).mean(1))
        return nn.functional.cross_entropy(self.head(hidden), tokens[:, 0])


def references() -> dict[str, Tensor]:
    """The fixed rows' values: one generator, so every process draws the same."""
    generator = torch.Generator().manual_seed(7)
    return {
        "embedding.weight": torch.randn(len(ROWS), DIM, generator=generator),
        "head.weight": torch.randn(6, DIM, generator=generator),
        "head.bias": torch.randn(6, generator=generator),
    }


def build() -> Net:
    torch.manual_seed(0)
    net = Net()
    refs = references()
    fix_rows(net.embedding, refs["embedding.weight"], rows=ROWS)
    old_head = nn.Linear(DIM, 6)
    with torch.no_grad():
        old_head.weight.copy_(refs["head.weight"])
        old_head.bias.copy_(refs["head.bias"])
    fix_rows(net.head, old_head)
    return net


def batches() -> list[Tensor]:
    """The global batches: rank r trains on rows r * BATCH to (r + 1) * BATCH of each."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (WORLD * BATCH, 3), generator=generator) for _ in range(STEPS)]


def config(stage: int, *, offload: bool = False) -> dict[str, Any]:
    """A DeepSpeed config that runs on the CPU without building ops, comparable to one process.

    ``offload``: ZeRO-Offload, the optimizer's state and step on the host (and at stage 3 the
    parameters too), with torch's AdamW there (DeepSpeed's fused CPU Adam needs a compiler).
    """
    zero: dict[str, Any] = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if stage == 3:
        # Partition every parameter, however small (by default those under 100k elements
        # stay whole on every rank, and nothing would be sharded here).
        zero["stage3_param_persistence_threshold"] = 0
    params = {**ADAMW, "betas": [0.9, 0.999], "torch_adam": True}
    return {
        "zero_force_ds_cpu_optimizer": False,
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        # DeepSpeed clips at 1.0 by default; one process does not.
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_optimization": zero,
    }


def plain_state(net: nn.Module) -> dict[str, Tensor]:
    """The model's state dict, gathered from ZeRO-3's partitions (a no-op at stages 0 to 2)."""
    with deepspeed.zero.GatheredParameters(list(net.parameters())):
        return {k: v.detach().clone() for k, v in net.state_dict().items()}


def train_rank(rank: int, stage: int, out: Path, *, offload: bool = False) -> dict[str, Any]:
    net = build()
    engine, *_ = deepspeed.initialize(
        model=net, model_parameters=net.parameters(), config=config(stage, offload=offload)
    )
    for tokens in batches():
        loss = engine(tokens[rank * BATCH : (rank + 1) * BATCH])
        engine.backward(loss)
        engine.step()
    result: dict[str, Any] = {"state_dict": plain_state(net)}
    if stage == 3 and not offload:
        stored: Any = dict(net.embedding.named_parameters())["parametrizations.weight.original"]
        result["partitioned"] = tuple(stored.shape), tuple(stored.ds_shape)
        engine.save_checkpoint(str(out / "checkpoint"), tag="end")
        # Read outside a forward, the constrained weight is gathered whole by the
        # parametrization's own module hooks (the unconstrained head's is not).
        result["read_outside_forward"] = net.embedding.weight.detach().clone()
        bake(net, name="embedding.weight")  # gathers the stored rows: every rank bakes
        with deepspeed.zero.GatheredParameters(list(net.parameters())):
            bake(net)  # the rest, gathered already
        baked: dict[str, Any] = {
            "plain": not is_fixed(net.embedding) and not is_fixed(net.head),
            "whole": {
                n: tuple(p.shape) for n, p in net.named_parameters() if "ds_id" not in vars(p)
            },
            "state_dict": plain_state(net),
        }
        # Trained on by a new engine, which partitions the baked weights too.
        engine.destroy()
        engine, *_ = deepspeed.initialize(
            model=net, model_parameters=net.parameters(), config=config(stage)
        )
        baked["partitioned"] = sorted(n for n, p in net.named_parameters() if p.numel() == 0)
        for tokens in batches()[:MORE]:
            loss = engine(tokens[rank * BATCH : (rank + 1) * BATCH])
            engine.backward(loss)
            engine.step()
        baked["more"] = plain_state(net)
        result["baked"] = baked
    return result


def rank_main(rank: int, out: Path) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))
    # The shared-memory all-reduce is DeepSpeed's for inference; building it compiles C++ for a
    # minute on a cold cache, and training does not use it.
    # (`deepspeed.comm.torch` as an attribute is torch itself: deepspeed.comm imports it.)
    comm: Any = importlib.import_module("deepspeed.comm.torch")
    comm.build_shm_op = lambda: None

    def body() -> dict[int | str, Any]:
        deepspeed.init_distributed(dist_backend="gloo")
        results: dict[int | str, Any] = {stage: train_rank(rank, stage, out) for stage in STAGES}
        for stage in OFFLOADED:
            results[f"{stage}-offload"] = train_rank(rank, stage, out, offload=True)
        return results

    results = in_process_group(body, "gloo", str(out / "store"), rank, WORLD)
    torch.save(results, out / f"rank{rank}.pt")


def one_process() -> dict[str, Tensor]:
    """The same training in one process, plain PyTorch: the whole batch, torch's AdamW."""
    net = build()
    optimizer = torch.optim.AdamW(net.parameters(), **ADAMW)
    for tokens in batches():
        optimizer.zero_grad()
        net(tokens).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def one_process_more(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`one_process`'s model (``state``), baked and trained on with a new AdamW."""
    net = Net()
    net.load_state_dict(state)
    optimizer = torch.optim.AdamW(net.parameters(), **ADAMW)
    for tokens in batches()[:MORE]:
        optimizer.zero_grad()
        net(tokens).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spawn(rank_main, args=(args.out,), nprocs=WORLD)  # type: ignore[no-untyped-call]
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(args.out / "checkpoint"), "end")
    single = one_process()
    torch.save(
        {
            "single": single,
            "single_more": one_process_more(single),
            "references": references(),
            "rows": ROWS,
            "consolidated": dict(consolidated),
        },
        args.out / "parent.pt",
    )


if __name__ == "__main__":
    main()
