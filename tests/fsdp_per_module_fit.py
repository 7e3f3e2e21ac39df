"""Train a constrained model sharded per module, torchtitan's way, then bake it and train on.

Run by tests/test_fsdp.py as a script (``--world 2`` spawns 2 gloo ranks; ``--world 1`` is the
one-process reference). ``fully_shard`` goes on the token embedding, on each block, on the output
head (or on the embedding and the head together when they are tied: FSDP2 wants a tied
parameter in one group) and then on the root. Each layout trains, bakes into its FSDP2 groups
(`bake_fully_sharded`), evaluates and trains on; every rank saves what the test compares.
``ddp-*`` layouts train under DDP instead. A layout with a recipe (`RECIPES`) trains with a
mixed-precision or CPU offload policy, accumulates gradients without sync or clips them, before
the bake and after. A ``bf16-*`` layout also trains an unconstrained FSDP2 model under the same
policy beside it (the oracle): its fixed rows get no gradient and are put back after each step,
until the bake. A layout that raises saves its error, so that the others still run.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from embedding_constraint import bake, fix_rows
from embedding_constraint.fsdp import bake_fully_sharded, prepare_fully_shard

sys.path.insert(0, str(Path(__file__).parent))

from support import script_main

VOCAB, DIM = 10, 4
WORLD, BATCH, STEPS, MORE = 2, 4, 3, 2  # BATCH per rank; one process takes WORLD * BATCH
ROWS = [9, 0, 4, 2, 7, 5]  # the embedding's fixed rows, scattered
HEAD_ROWS = [8, 3]  # the untied head's
# Baked by `bake` (which hands a sharded module to `bake_fully_sharded`); the others by
# `bake_fully_sharded` itself.
PLAIN_BAKE = {"untied-keep", "tied-keep"}
# name: (tie, reshard_after_forward, prepare_fully_shard, fixed rows of the embedding)
LAYOUTS: dict[str, tuple[bool, bool, bool, list[int]]] = {
    "untied-reshard": (False, True, True, ROWS),
    "untied-keep": (False, False, False, ROWS),
    "tied-reshard": (True, True, False, ROWS),
    "tied-keep": (True, False, True, ROWS),
    "no-row-fixed": (False, True, True, []),
    "every-row-fixed": (False, True, True, list(range(VOCAB))),
    "ddp-no-row-fixed": (False, True, False, []),
    "ddp-every-row-fixed": (False, True, False, list(range(VOCAB))),
    "bf16-reshard": (False, True, True, ROWS),
    "bf16-keep": (True, False, False, ROWS),
    "bf16-all-reshard": (False, True, False, ROWS),
    "bf16-all-keep": (True, False, True, ROWS),
    "offload-reshard": (False, True, True, ROWS),
    "offload-keep": (True, False, False, ROWS),
    "accumulate-reshard": (False, True, False, ROWS),
    "accumulate-keep": (True, False, True, ROWS),
    "clip-reshard": (False, True, True, ROWS),
    "clip-keep": (True, False, False, ROWS),
}
# What a layout trains with besides: "bf16", a MixedPrecisionPolicy (bfloat16 parameters,
# float32 reduction); "offload", a CPUOffloadPolicy; "accumulate", MICRO micro-batches a step,
# the gradients synced on the last only; "clip", clip_grad_norm_ to MAX_NORM before SGD's step
# (AdamW's step would hardly change with the gradients' scale). The oracle's norm leaves out
# its fixed rows (no gradient), one process's has no fixed rows to leave out (no parameters).
ALL = frozenset({"bf16", "offload", "accumulate", "clip"})
RECIPES: dict[str, frozenset[str]] = {
    "bf16-reshard": frozenset({"bf16"}),
    "bf16-keep": frozenset({"bf16"}),
    "bf16-all-reshard": ALL,
    "bf16-all-keep": ALL,
    "offload-reshard": frozenset({"offload"}),
    "offload-keep": frozenset({"offload"}),
    "accumulate-reshard": frozenset({"accumulate"}),
    "accumulate-keep": frozenset({"accumulate"}),
    "clip-reshard": frozenset({"clip"}),
    "clip-keep": frozenset({"clip"}),
}
MICRO, MAX_NORM = 2, 0.4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, DIM)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + torch.tanh(self.linear(hidden))


class Titan(nn.Module):
    """A token embedding, blocks and an output head, named as torchtitan names them."""

    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(), Block()])
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.tok_embeddings(tokens)
        for layer in self.layers:
            hidden = layer(hidden)
        logits = self.output(hidden[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def references(layout: str) -> dict[str, Tensor]:
    """The fixed rows' values: one generator, so every process draws the same."""
    generator = torch.Generator().manual_seed(7)
    fixed = LAYOUTS[layout][3]
    return {
        "tok_embeddings.weight": torch.randn(len(fixed), DIM, generator=generator),
        "output.weight": torch.randn(len(HEAD_ROWS), DIM, generator=generator),
    }


def build(layout: str) -> Titan:
    tie, _, _, rows = LAYOUTS[layout]
    torch.manual_seed(0)
    model = Titan(tie)
    refs = references(layout)
    fix_rows(model, refs["tok_embeddings.weight"], name="tok_embeddings.weight", rows=rows)
    if not tie:
        fix_rows(model.output, refs["output.weight"], rows=HEAD_ROWS)
    return model


def build_oracle(layout: str) -> Titan:
    """The unconstrained model that `build` constrains: its weights, the fixed rows set in."""
    tie, _, _, rows = LAYOUTS[layout]
    torch.manual_seed(0)
    model = Titan(tie)
    refs = references(layout)
    with torch.no_grad():
        model.tok_embeddings.weight[rows] = refs["tok_embeddings.weight"]
        if not tie:
            model.output.weight[HEAD_ROWS] = refs["output.weight"]
    return model


# The oracle's parameters with fixed rows: each with their mask and values, laid out like it.
Frozen = list[tuple[Tensor, Tensor, Tensor]]


def frozen_rows(oracle: Titan, layout: str) -> Frozen:
    """The oracle's fixed rows, sharded as FSDP2 shards the parameter that holds them."""
    tie, _, _, rows = LAYOUTS[layout]
    refs = references(layout)
    frozen: Frozen = []
    for name, at in [("tok_embeddings", rows)] + ([] if tie else [("output", HEAD_ROWS)]):
        param = oracle.get_submodule(name).weight
        assert isinstance(param, DTensor)
        mask = torch.zeros(param.shape, dtype=torch.bool)
        mask[at] = True
        values = torch.zeros(param.shape)
        values[at] = refs[f"{name}.weight"]
        frozen.append(
            (
                param,
                distribute_tensor(mask, param.device_mesh, param.placements),
                distribute_tensor(values, param.device_mesh, param.placements),
            )
        )
    return frozen


def batches(steps: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, WORLD * BATCH, 5), generator=generator)


def train(
    model: nn.Module,
    rank: int,
    world: int,
    steps: int,
    seed: int,
    recipe: frozenset[str] = frozenset(),
    frozen: Frozen | None = None,
    unsynced: list[bool] | None = None,
) -> list[float]:
    """Train ``steps`` steps as ``recipe`` says; the total gradient norm of each, if it clips.

    ``frozen`` rows (the oracle's) get no gradient, before the clip, and their values back
    after each step. After each micro-batch but the last, ``unsynced`` gets whether no
    parameter (FSDP2's shard) has a gradient yet.
    """
    params = list(model.parameters())
    optimizer: torch.optim.Optimizer
    if "clip" in recipe:
        optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    micro = MICRO if "accumulate" in recipe else 1
    norms = []
    for batch in batches(steps, seed):
        local = batch[rank * BATCH : (rank + 1) * BATCH] if world > 1 else batch
        optimizer.zero_grad()
        for i, part in enumerate(local.chunk(micro)):
            if isinstance(model, FSDPModule):  # reduce-scatter after the last micro-batch only
                model.set_requires_gradient_sync(i == micro - 1)
            (model(part) / micro).backward()  # each rank's mean; FSDP2 and DDP average the ranks
            if i < micro - 1 and unsynced is not None:  # the shards have no gradient yet
                unsynced.append(all(p.grad is None for p in model.parameters()))
        for param, mask, _ in frozen or []:
            assert param.grad is not None
            param.grad.masked_fill_(mask, 0)
        if "clip" in recipe:
            norm = nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            norms.append(float(norm.full_tensor() if isinstance(norm, DTensor) else norm))
        optimizer.step()
        with torch.no_grad():
            for param, mask, values in frozen or []:
                param.copy_(torch.where(mask, values, param))
    return norms


def evaluate(model: nn.Module, rank: int, world: int) -> float:
    """This rank's loss on its part of one batch (the mean over the ranks is one process's)."""
    (batch,) = batches(1, seed=11)
    local = batch[rank * BATCH : (rank + 1) * BATCH] if world > 1 else batch
    with torch.no_grad():
        loss = float(model(local))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # with reshard_after_forward=False the rows stay gathered
    return loss


def full_state(model: nn.Module) -> dict[str, Tensor]:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, Tensor)}


def dtypes(model: nn.Module) -> dict[str, str]:
    """The dtype each parameter is stored in (FSDP2's shards)."""
    return {name: str(param.dtype) for name, param in model.named_parameters()}


def shard(model: Titan, layout: str, *, constrained: bool = True) -> None:
    tie, reshard, prepare, _ = LAYOUTS[layout]
    recipe = RECIPES.get(layout, frozenset())
    options: dict[str, Any] = {"reshard_after_forward": reshard}
    if "bf16" in recipe:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if "offload" in recipe:
        # Pinned memory needs an accelerator; on the CPU the shards stay where they are.
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    if prepare and constrained:
        prepare_fully_shard(model)
    if tie:
        fully_shard([model.tok_embeddings, model.output], **options)
    else:
        fully_shard(model.tok_embeddings, **options)
    for layer in model.layers:
        fully_shard(layer, **options)
    if not tie:
        fully_shard(model.output, **options)
    fully_shard(model, **options)


def fit(layout: str, rank: int, world: int) -> dict[str, Any]:
    """Train, bake, evaluate and train on; what the test compares."""
    model = build(layout)
    recipe = RECIPES.get(layout, frozenset())
    result: dict[str, Any] = {"initial": full_state(model), "unsynced": []}
    ddp = layout.startswith("ddp-")
    trained: nn.Module = model
    if world > 1 and ddp:
        trained = DistributedDataParallel(model)
    elif world > 1:
        shard(model, layout)
    result["norms"] = train(trained, rank, world, STEPS, 3, recipe, unsynced=result["unsynced"])
    result["trained"] = full_state(model)
    result["stored"] = dtypes(model)
    if world > 1 and not ddp and layout not in PLAIN_BAKE:
        bake_fully_sharded(model)
    else:
        bake(model)
        if (
            world > 1 and ddp
        ):  # DDP registered hooks on the constrained Parameters: wrap the baked ones anew
            trained = DistributedDataParallel(model)
    result["classes"] = {
        name: [c.__name__ for c in type(module).__mro__]
        for name, module in model.named_modules()
        if name in ("tok_embeddings", "output")
    }
    result["plain"] = [n for n, _ in model.named_parameters()]
    result["val_loss"] = evaluate(trained, rank, world)
    result["more_norms"] = train(trained, rank, world, MORE, 5, recipe, unsynced=result["unsynced"])
    result["after"] = full_state(model)
    result["baked_stored"] = dtypes(model)
    return result


def fit_oracle(layout: str, rank: int, world: int) -> dict[str, Any]:
    """`fit` for the unconstrained model under the same policy: rows frozen until the bake."""
    model = build_oracle(layout)
    recipe = RECIPES[layout]
    result: dict[str, Any] = {"initial": full_state(model)}
    shard(model, layout, constrained=False)
    frozen = frozen_rows(model, layout)
    result["norms"] = train(model, rank, world, STEPS, 3, recipe, frozen=frozen)
    result["trained"] = full_state(model)
    result["val_loss"] = evaluate(model, rank, world)
    result["more_norms"] = train(model, rank, world, MORE, 5, recipe)
    result["after"] = full_state(model)
    return result


def fit_all(rank: int, world: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for layout in LAYOUTS:
        mixed = "bf16" in RECIPES.get(layout, frozenset())
        if world == 1 and mixed:
            continue  # compared with the oracle, under the same policy
        try:
            results[layout] = fit(layout, rank, world)
            if mixed:
                results[layout]["oracle"] = fit_oracle(layout, rank, world)
        except Exception as error:  # noqa: BLE001 - the test shows it, the others go on
            last = traceback.format_exception_only(error)[-1].strip()
            results[layout] = {"error": last}
    return results


if __name__ == "__main__":
    script_main(fit_all, WORLD)
