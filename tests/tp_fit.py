"""Train a constrained model under tensor parallelism (`parallelize_fixed`), then bake it and train on.

Run by tests/test_tensor_parallel.py as a script: ``--world 2`` spawns 2 gloo ranks that
parallelize the model (a vocabulary-parallel embedding and head, as torchtitan lays them out),
``--world 1`` trains the same constrained model in one process. Both ranks of a tensor-parallel
group see the whole batch. ``--world 4`` adds ``fully_shard`` over 2 data-parallel groups of 2
tensor-parallel ranks (2-D FSDP2 x tensor parallel, torchtitan's layout), each group taking half
of every batch, and HSDP (``fully_shard`` on a 2 x 2 replicate x shard mesh, no tensor
parallelism), each rank taking a quarter. ``--lightning`` fits through Lightning's
``ModelParallelStrategy(tensor_parallel_size=2)`` instead (its launcher runs this command again
for the other rank). A layout that raises saves its error, so that the others still run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)
from torch.multiprocessing.spawn import spawn

from embedding_constraint import bake, fix_rows, is_fixed
from embedding_constraint.fixed_rows import parametrization_list
from embedding_constraint.fsdp import prepare_fully_shard
from embedding_constraint.tensor_parallel import bake_parallelized, parallelize_fixed

sys.path.insert(0, str(Path(__file__).parent))

from support import in_process_group

VOCAB, DIM, HIDDEN = 10, 4, 6
WORLD, BATCH, STEPS, MORE = 2, 8, 3, 2
ROWS = [9, 0, 4, 2, 7, 5]  # the embedding's fixed rows, scattered over both ranks' slices
HEAD_ROWS = [8, 3]  # the head's (weight and bias: a reference module)
CONSTRAINED = ("tok_embeddings.weight", "output.weight", "output.bias")
# name: (the embedding's fixed rows, the embedding's style, the head's output layout)
LAYOUTS: dict[str, tuple[list[int] | None, str, str]] = {
    "vocab-replicated-logits": (ROWS, "rowwise", "replicate"),
    "vocab-loss-parallel": (ROWS, "rowwise", "loss-parallel"),
    "prefix": (None, "rowwise", "replicate"),
    "embedding-dim": (ROWS, "colwise", "replicate"),
}
# Also constrained after torch's parallelize_module sharded the plain model (``--world 2``).
CONSTRAINED_AFTER = ("vocab-replicated-logits", "embedding-dim")
# Also under HSDP, without tensor parallelism (``--world 4``).
HSDP = ("vocab-replicated-logits", "prefix")
# Under 2-D FSDP2 x tensor parallel (``--world 4``): (fully_shard on the embedding and the head
# too, not on the root alone; reshard_after_forward).
RECIPES_2D: dict[str, tuple[bool, bool]] = {
    "vocab-replicated-logits": (True, True),
    "vocab-loss-parallel": (True, False),
    "prefix": (False, True),
    "embedding-dim": (True, True),
}


class Titan(nn.Module):
    """A token embedding, a feed-forward block and an output head, named as torchtitan does."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.w1 = nn.Linear(DIM, HIDDEN)
        self.w2 = nn.Linear(HIDDEN, DIM)
        self.output = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.tok_embeddings(tokens)
        hidden = hidden + self.w2(torch.tanh(self.w1(hidden)))
        logits: Tensor = self.output(hidden)
        return logits


def loss_of(logits: Tensor, tokens: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def references(rows: list[int] | None) -> tuple[Tensor, nn.Linear]:
    """The fixed rows' values: one generator, so every process draws the same."""
    generator = torch.Generator().manual_seed(7)
    embedding = torch.randn(len(ROWS if rows is None else rows), DIM, generator=generator)
    head = nn.Linear(DIM, len(HEAD_ROWS))
    with torch.no_grad():
        head.weight.copy_(torch.randn(len(HEAD_ROWS), DIM, generator=generator))
        head.bias.copy_(torch.randn(len(HEAD_ROWS), generator=generator))
    return embedding, head


def build(layout: str) -> Titan:
    rows = LAYOUTS[layout][0]
    torch.manual_seed(0)
    model = Titan()
    embedding, head = references(rows)
    fix_rows(model.tok_embeddings, embedding, rows=rows)
    fix_rows(model.output, head, rows=HEAD_ROWS)  # weight and bias
    return model


def plan(layout: str) -> dict[str, ParallelStyle]:
    """torchtitan's plan: the embedding split by vocabulary, the head by its output rows."""
    _, embedding, logits = LAYOUTS[layout]
    styles: dict[str, ParallelStyle] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate())
        if embedding == "rowwise"
        else ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "w1": ColwiseParallel(),
        "w2": RowwiseParallel(),
    }
    if logits == "loss-parallel":  # logits stay split by vocabulary; the loss takes them so
        styles["output"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    else:
        styles["output"] = ColwiseParallel(output_layouts=Replicate())
    return styles


def batches(steps: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, BATCH, 5), generator=generator)


def step_loss(model: nn.Module, tokens: Tensor, layout: str) -> Tensor:
    split = isinstance(model.get_submodule("output").weight, DTensor)
    with loss_parallel() if LAYOUTS[layout][2] == "loss-parallel" and split else nullcontext():
        loss = loss_of(model(tokens), tokens)
        loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
    return loss


def train(
    model: nn.Module, steps: int, seed: int, layout: str, part: tuple[int, int] = (0, 1)
) -> list[float]:
    """Train on the batches; ``part`` (rank, ranks): of each batch, the rank's share."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    losses = []
    rank, ranks = part
    for tokens in batches(steps, seed):
        optimizer.zero_grad()
        loss = step_loss(model, tokens[rank::ranks], layout)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # over DTensors under TP
        optimizer.step()
        loss = loss.full_tensor() if isinstance(loss, DTensor) else loss.detach()
        if ranks > 1:  # the whole batch's loss: the mean of the ranks' shares
            dist.all_reduce(loss)
            loss = loss / dist.get_world_size()
        losses.append(float(loss))
    return losses


def penalty_gradients(model: nn.Module, tokens: Tensor, layout: str) -> dict[str, Tensor]:
    """The gradients of a gradient penalty (second derivatives), whole, by plain name; of the
    constrained tensors, at their free rows only (the fixed rows of a tensor-parallel stored
    tensor, whose gradients are zero, checked here; those of a plain twin's weight)."""
    named = dict(model.named_parameters())
    split = isinstance(model.get_submodule("output").weight, DTensor)
    with loss_parallel() if LAYOUTS[layout][2] == "loss-parallel" and split else nullcontext():
        loss = loss_of(model(tokens), tokens)
        firsts = torch.autograd.grad(loss, list(named.values()), create_graph=True)
        free = [_free_rows(name, g, layout) for name, g in zip(named, firsts, strict=True)]
        penalty = torch.stack([(g**2).sum() for g in free]).sum()
        seconds = torch.autograd.grad(penalty, list(named.values()))
    out = {}
    for name, second in zip(named, seconds, strict=True):
        plain = name.replace("parametrizations.", "").removesuffix(".original")
        out[plain] = _free_rows(name, second, layout, zero_at_fixed=name != plain).detach()
    # The lookup alone: in the model, torch's own tensor-parallel backward gives the
    # embedding's gradient no graph (constrained or not); read alone, it keeps one.
    embedding = model.get_submodule("tok_embeddings")
    ((name, weight),) = embedding.named_parameters()
    hidden = embedding(tokens)
    (first,) = torch.autograd.grad((hidden * hidden.tanh()).sum(), [weight], create_graph=True)
    free_first = _free_rows(f"tok_embeddings.{name}", first, layout)
    (second,) = torch.autograd.grad((free_first**2).sum(), [weight])
    zero = name != "weight"
    out["lookup"] = _free_rows(f"tok_embeddings.{name}", second, layout, zero_at_fixed=zero)
    return out


def _free_rows(name: str, grad: Tensor, layout: str, *, zero_at_fixed: bool = False) -> Tensor:
    """``grad`` whole; of a constrained tensor, at its free rows (where it holds fixed ones:
    a tensor-parallel stored tensor, a plain twin's weight). ``zero_at_fixed``: check that
    the gradient at the fixed rows is zero."""
    whole = grad.full_tensor() if isinstance(grad, DTensor) else grad
    plain = name.replace("parametrizations.", "").removesuffix(".original")
    if plain not in CONSTRAINED or whole.shape[0] != VOCAB:
        return whole
    fixed = HEAD_ROWS if plain.startswith("output") else LAYOUTS[layout][0]
    fixed = list(range(len(ROWS))) if fixed is None else fixed
    assert not zero_at_fixed or not whole[fixed].any(), name
    return whole[[r for r in range(VOCAB) if r not in fixed]]


def full_state(model: nn.Module) -> dict[str, Tensor]:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, Tensor)}


def held(model: nn.Module) -> dict[str, Any]:
    """What this rank holds of each constrained tensor while it is constrained."""
    out: dict[str, Any] = {}
    for name in ("tok_embeddings", "output"):
        module = model.get_submodule(name)
        plist = parametrization_list(module, "weight")
        stored, weight, constraint = plist.original, module.weight, plist[0]
        assert isinstance(stored, DTensor)
        assert isinstance(weight, DTensor)
        out[name] = {
            "stored_type": type(stored).__name__,
            "stored_local": tuple(stored.to_local().shape),
            "rows": cast(Tensor, constraint.rows).tolist(),
            "reference": cast(Tensor, constraint.reference).clone(),
            "keys": list(module.state_dict()),
            "weight_placements": [str(p) for p in weight.placements],
        }
    return out


def fit(
    layout: str, world: int, mesh: DeviceMesh | None, *, constrain_after: bool = False
) -> dict[str, Any]:
    """Train, bake, train on; what the test compares. ``constrain_after``: torch's
    ``parallelize_module`` shards the plain model, then `fix_rows` constrains the shards (the
    order Hugging Face's ``tp_plan`` imposes)."""
    if constrain_after:
        assert mesh is not None
        torch.manual_seed(0)  # as `build` makes it, unconstrained
        model = Titan()
        parallelize_module(model, mesh, plan(layout))
        embedding, head = references(LAYOUTS[layout][0])
        fix_rows(model.tok_embeddings, embedding, rows=LAYOUTS[layout][0])
        fix_rows(model.output, head, rows=HEAD_ROWS)
    else:
        model = build(layout)
    if world > 1 and not constrain_after:
        assert mesh is not None
        parallelize_fixed(model, mesh, plan(layout))
    # A gradient penalty, against the same weights unconstrained in the same layout: torch's
    # own tensor-parallel second derivatives differ from one process's (by 30% here, for
    # unconstrained models too), so one process is no reference for them.
    tokens = batches(1, 11)[0]
    twin = build(layout)
    bake(twin)
    if world > 1:
        assert mesh is not None
        parallelize_module(twin, mesh, plan(layout))
    result: dict[str, Any] = {
        "penalty": penalty_gradients(model, tokens, layout),
        "penalty_unconstrained": penalty_gradients(twin, tokens, layout),
    }
    result["losses"] = train(model, STEPS, seed=3, layout=layout)
    result["trained"] = full_state(model)
    if world > 1:
        result["held"] = held(model)
        if not constrain_after:
            result["loads"] = loads(model, result["trained"])
        bake_parallelized(model)
    else:
        bake(model)
    result["plain"] = [n for n, _ in model.named_parameters()]
    result["more_losses"] = train(model, MORE, seed=5, layout=layout)
    result["after"] = full_state(model)
    return result


def loads(model: nn.Module, trained: dict[str, Tensor]) -> dict[str, Any]:
    """Load state dicts back into the trained tensor-parallel ``model``: what each left."""
    rank = dist.get_rank()
    full = StateDictOptions(full_state_dict=True)
    out: dict[str, Any] = {}
    # (torch's loading turns the given dict's tensors into the model's DTensors: a copy each)
    set_model_state_dict(model, dict(trained), options=full)  # every rank holds it whole
    out["full"] = full_state(model)
    from_first = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, dict(trained) if rank == 0 else {}, options=from_first)
    out["broadcast"] = full_state(model)
    # A sharded state dict whose fixed row is changed on one rank only: refused on both.
    sharded = get_model_state_dict(model)
    entry = sharded["tok_embeddings.weight"]
    assert isinstance(entry, DTensor)
    shard = entry.to_local()
    if rank == 0:
        with torch.no_grad():
            shard[held(model)["tok_embeddings"]["rows"][0]] += 1
    try:
        set_model_state_dict(model, sharded)
    except RuntimeError as error:
        out["tampered"] = str(error)
    out["after_tampered"] = full_state(model)
    # A sharded tensor of another vocabulary: refused on every rank alike (no rank waits).
    stored = model.get_parameter("tok_embeddings.parametrizations.weight.original")
    assert isinstance(stored, DTensor)
    other = distribute_tensor(torch.zeros(VOCAB - 2, DIM), stored.device_mesh, stored.placements)
    try:
        model.load_state_dict({"tok_embeddings.weight": other}, strict=False)
    except RuntimeError as error:
        out["other_vocabulary"] = str(error)
    out["after_refused"] = full_state(model)
    # A plain bfloat16 checkpoint holds the reference rounded: it loads (into a copy).
    twin = copy.deepcopy(model)
    set_model_state_dict(twin, {k: v.to(torch.bfloat16) for k, v in trained.items()}, options=full)
    out["bfloat16"] = full_state(twin)
    return out


def fit_2d(layout: str, mesh: DeviceMesh) -> dict[str, Any]:
    """`fit`, under ``fully_shard`` over the tensor-parallel model (2-D FSDP2 x tensor parallel):
    each data-parallel rank trains on its half of every batch."""
    model = build(layout)
    parallelize_fixed(model, mesh["tp"], plan(layout))
    per_module, reshard = RECIPES_2D[layout]
    if per_module:  # torchtitan's layout: the embedding and the head each in a group
        for name in ("tok_embeddings", "output"):
            fully_shard(model.get_submodule(name), mesh=mesh["dp"], reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh["dp"], reshard_after_forward=reshard)
    part = (mesh["dp"].get_local_rank(), mesh["dp"].size())
    result: dict[str, Any] = {"losses": train(model, STEPS, seed=3, layout=layout, part=part)}
    result["trained"] = full_state(model)
    stored = parametrization_list(model.tok_embeddings, "weight").original
    assert isinstance(stored, DTensor)
    result["stored"] = (tuple(stored.to_local().shape), stored.device_mesh.ndim)
    # Its sharded state dict loads back (the 2-D shards; the fixed rows in them are checked).
    # A full one would not, as for an unconstrained model: torch scatters no uneven 2-D shard.
    set_model_state_dict(model, get_model_state_dict(model))
    result["reloaded"] = full_state(model)
    bake(model)  # hands the weights to bake_parallelized: they join their FSDP2 groups
    result["plain"] = [n for n, _ in model.named_parameters()]
    result["classes"] = [
        type(model.get_submodule(n)).__name__ for n in ("tok_embeddings", "output")
    ]
    result["more_losses"] = train(model, MORE, seed=5, layout=layout, part=part)
    result["after"] = full_state(model)
    return result


def fit_hsdp(layout: str, mesh: DeviceMesh) -> dict[str, Any]:
    """`fit` without tensor parallelism, under HSDP (``fully_shard`` on a 2-D replicate x shard
    mesh, per module): each of the 4 ranks trains on its quarter of every batch. The
    ``prefix`` layout holds its references as parameters, sharded with the free rows."""
    model = build(layout)
    if layout == "prefix":
        prepare_fully_shard(model)
    for part in (model.tok_embeddings, model.output, model):
        fully_shard(part, mesh=mesh)
    share = (dist.get_rank(), dist.get_world_size())
    result: dict[str, Any] = {"losses": train(model, STEPS, seed=3, layout=layout, part=share)}
    result["trained"] = full_state(model)
    stored = parametrization_list(model.tok_embeddings, "weight").original
    assert isinstance(stored, DTensor)
    result["stored"] = [str(p) for p in stored.placements]
    bake(model)
    result["plain"] = [n for n, _ in model.named_parameters()]
    result["more_losses"] = train(model, MORE, seed=5, layout=layout, part=share)
    result["after"] = full_state(model)
    return result


def split_columns_error(mesh: DeviceMesh) -> str:
    """What a read says where ``fully_shard`` splits the columns of a column-split weight."""
    model = build("embedding-dim")
    styles = plan("embedding-dim")
    del styles["output"]  # the head keeps its plain constraint (FixedRows)
    parallelize_fixed(model, mesh["tp"], styles)
    fully_shard(model.tok_embeddings, mesh=mesh["dp"], shard_placement_fn=lambda _: Shard(1))
    before = [n for n, _ in model.named_parameters()]
    try:
        bake(model)  # refused before it changes anything (the head would bake first)
    except ValueError:
        if [n for n, _ in model.named_parameters()] != before or not is_fixed(model.output):
            return "bake changed the model before it refused"
    try:
        model.tok_embeddings.weight  # noqa: B018 - the read is the test
    except ValueError as error:
        return str(error)
    return "no error"


def fit_all(world: int) -> dict[str, Any]:
    two_d = world == 2 * WORLD
    mesh: DeviceMesh | None = None
    if two_d:
        mesh = init_device_mesh("cpu", (2, WORLD), mesh_dim_names=("dp", "tp"))
    elif world > 1:
        mesh = init_device_mesh("cpu", (world,))
    results: dict[str, Any] = {}
    if two_d:
        assert mesh is not None
        results["split-columns"] = split_columns_error(mesh)
    for layout in LAYOUTS:
        try:
            if two_d:
                assert mesh is not None
                results[layout] = fit_2d(layout, mesh)
            else:
                results[layout] = fit(layout, world, mesh)
        except Exception as error:  # noqa: BLE001 - the test shows it, the others go on
            results[layout] = {"error": "".join(traceback.format_exception(error))[-3000:]}
    for layout in HSDP if two_d else ():
        hsdp = init_device_mesh("cpu", (2, WORLD), mesh_dim_names=("replicate", "shard"))
        try:
            results[f"{layout}/hsdp"] = fit_hsdp(layout, hsdp)
        except Exception as error:  # noqa: BLE001 - the test shows it, the others go on
            results[f"{layout}/hsdp"] = {"error": "".join(traceback.format_exception(error))}
    for layout in CONSTRAINED_AFTER if world == WORLD else ():
        try:
            results[f"{layout}/after"] = fit(layout, world, mesh, constrain_after=True)
        except Exception as error:  # noqa: BLE001 - the test shows it, the others go on
            results[f"{layout}/after"] = {"error": "".join(traceback.format_exception(error))}
    return results


def run_rank(rank: int, world: int, out: Path) -> None:
    def body() -> None:
        torch.save(fit_all(world), out / f"rank{rank}.pt")

    in_process_group(body, "gloo", str(out / "group"), rank, world)


def lightning_fit(out: Path, *, callback: bool = False, data_parallel: int = 1) -> None:
    """Fit `Titan` with ModelParallelStrategy(tensor_parallel_size=2), constrained in __init__
    (``callback``: by EmbeddingConstraint callbacks, one per module, at setup). With
    ``data_parallel=2``, ``configure_model`` also calls ``fully_shard`` on the embedding, the
    head and the model over the data-parallel mesh (2-D), as Lightning's examples do."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from embedding_constraint.lightning import EmbeddingConstraint

    layout = "vocab-replicated-logits"

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if callback:
                torch.manual_seed(0)  # as `build` makes it, unconstrained
                self.model = Titan()
            else:
                self.model = build(layout)
            self.losses: list[float] = []

        def configure_model(self) -> None:
            mesh = self.device_mesh
            assert mesh is not None
            parallelize_fixed(self.model, mesh["tensor_parallel"], plan(layout))
            if data_parallel > 1:
                for part in (self.model.tok_embeddings, self.model.output, self.model):
                    fully_shard(part, mesh=mesh["data_parallel"])

        def training_step(self, batch: list[Tensor], index: int) -> Tensor:
            loss = loss_of(self.model(batch[0]), batch[0])
            whole = loss.detach().clone()  # the whole batch's: the mean of the ranks' shares
            dist.all_reduce(whole)
            self.losses.append(float(whole) / dist.get_world_size())
            return loss

        def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
            """Each data-parallel rank takes every other sample of a batch, as `fit_2d`'s."""
            mesh = self.device_mesh
            assert mesh is not None
            tokens = TensorDataset(batches(STEPS, seed=3).reshape(-1, 5))
            dp = mesh["data_parallel"]
            sampler: DistributedSampler[tuple[Tensor, ...]] = DistributedSampler(
                tokens, num_replicas=dp.size(), rank=dp.get_local_rank(), shuffle=False
            )
            return DataLoader(tokens, batch_size=BATCH // dp.size(), sampler=sampler)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)

        def on_train_end(self) -> None:
            self.trained = full_state(self.model)
            self.held = held(self.model)

    module = Module()
    callbacks: list[L.Callback] = []
    if callback:
        embedding, head = references(LAYOUTS[layout][0])
        callbacks = [
            EmbeddingConstraint(module.model.tok_embeddings, embedding, rows=LAYOUTS[layout][0]),
            EmbeddingConstraint(module.model.output, head, rows=HEAD_ROWS),
        ]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD * data_parallel,
        strategy=ModelParallelStrategy(
            data_parallel_size=data_parallel, tensor_parallel_size=WORLD
        ),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.5,
        use_distributed_sampler=False,  # train_dataloader gives each rank its samples
        callbacks=callbacks,
    )
    trainer.fit(module)
    if not callback:  # the callbacks bake at the end of the fit
        bake(module.model)  # hands the tensor-parallel weights to bake_parallelized
    plain = [n for n, _ in module.model.named_parameters()]
    result = {
        "losses": module.losses,
        "trained": module.trained,
        "held": module.held,
        "after_bake": full_state(module.model),
        "plain": plain,
        "weights": {  # a DTensor Parameter each: plain tensor-parallel weights
            name: isinstance(weight, DTensor) and isinstance(weight, nn.Parameter)
            for name in ("tok_embeddings", "output")
            for weight in [module.model.get_submodule(name).weight]
        },
    }
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    del trainer, module  # the DTensors hold the group: free them, then end it on every rank
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, choices=[1, WORLD, 2 * WORLD], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lightning", action="store_true")
    parser.add_argument("--callback", action="store_true", help="with --lightning")
    parser.add_argument("--data-parallel", type=int, choices=[1, 2], default=1)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.lightning:
        lightning_fit(args.out, callback=args.callback, data_parallel=args.data_parallel)
    elif args.world == 1:
        torch.save(fit_all(1), args.out / "rank0.pt")
    else:
        spawn(run_rank, args=(args.world, args.out), nprocs=args.world)  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
