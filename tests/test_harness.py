"""The differential harness: every fast read against the plain ``cat`` read.

One table of read paths (`PATHS`) drives every check, as torch's OpInfo tests do: a new fast
path joins the table and gets them all. Each case builds a module, constrains it with
`fix_rows` (prefix or scattered rows; the reference and the free rows joined in one buffer or
apart) and compares it with the unconstrained module whose weight is given by `plain_read`,
the reference rows and the free rows put together with nothing but ``cat`` and
``index_select``. Checked: values, first gradients (free rows, float inputs, other
parameters), double gradients (a gradient penalty), ``torch.func`` (``grad``, ``vmap``,
``jvp``), forward-mode AD, ``torch.compile`` and bad ids (the same kind of error, the module
unchanged). The tensor-parallel reads (``tp-*``: `parallelize_fixed`, or `fix_rows` on the
shards) run on a one-rank mesh against the unconstrained module parallelized the same way, the
plain read done in ``DTensor`` operations; where torch has no rule for a ``DTensor`` (``torch.func``,
gradcheck), the constrained read fails as the unconstrained one does.

On the CPU by default; ``EMBEDDING_CONSTRAINT_TEST_DEVICE=cuda`` runs it on a GPU, where the
reads take their accelerator paths (``tests/benchmarks/gpu_check.sh`` does).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from support import stored
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)
from torch.func import functional_call

from embedding_constraint import fix_rows
from embedding_constraint.tensor_parallel import parallelize_fixed

DEVICE = torch.device(os.environ.get("EMBEDDING_CONSTRAINT_TEST_DEVICE", "cpu"))
VOCAB, DIM, FIXED = 10, 4, 4
LAYOUTS: dict[str, list[int] | None] = {"prefix": None, "scattered": [8, 1, 4, 5]}
STORAGE = ("joined", "apart")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
IDS = torch.tensor([[0, 1, 9, 8], [8, 5, 6, 2], [3, 3, 7, 4]])


def plain_read(reference: Tensor, free: Tensor, rows: list[int] | None) -> Tensor:
    """The reference rows at ``rows`` (default: first), the free rows elsewhere, in order."""
    weight = torch.cat((reference, free))
    if rows is None:
        return weight
    total = weight.shape[0]
    free_rows = [r for r in range(total) if r not in rows]
    places = torch.empty(total, dtype=torch.int64)
    places[rows] = torch.arange(len(rows))
    places[free_rows] = torch.arange(len(rows), total)
    return weight.index_select(0, _like(places.to(DEVICE), weight))


def plain_parallel_read(reference: Tensor, stored: DTensor, rows: list[int] | None) -> DTensor:
    """`plain_read` of a tensor-parallel weight, in torch's ``DTensor`` operations: the free
    rows of ``stored`` (the whole weight's shard, fixed rows included) taken with
    ``index_select``, read with the reference as above and laid out as ``stored`` is."""
    fixed = range(reference.shape[0]) if rows is None else rows
    free_rows = torch.tensor([r for r in range(stored.shape[0]) if r not in fixed], device=DEVICE)
    free = stored.index_select(0, _like(free_rows, stored))
    weight = plain_read(_like(reference, stored), free, rows)
    assert isinstance(weight, DTensor)
    return weight.redistribute(stored.device_mesh, stored.placements)


def _like(tensor: Tensor, weight: Tensor) -> Tensor:
    """``tensor`` replicated on ``weight``'s mesh where ``weight`` is a DTensor."""
    if isinstance(weight, DTensor):
        return distribute_tensor(tensor, weight.device_mesh, [Replicate()])
    return tensor


class _Tied(nn.Module):
    """An embedding and an output head that share one Parameter."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, dtype=dtype)
        self.head = nn.Linear(DIM, VOCAB, bias=False, dtype=dtype)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        out: Tensor = self.head(torch.tanh(self.emb(ids)))
        return out


class _Reader(nn.Module):
    """A module of its own that reads its weight as a tensor: the generic read."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, DIM, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.t().sin()


def _ids(dtype: torch.dtype) -> tuple[Tensor, ...]:
    return (IDS,)


def _features(dtype: torch.dtype) -> tuple[Tensor, ...]:
    return (torch.randn(3, 2, DIM, dtype=dtype),)


def _bag_sum(dtype: torch.dtype) -> tuple[Tensor, ...]:
    input = torch.tensor([0, 5, 9, 8, 8, 2, 7, 1, 6, 4, 3, 9])
    return input, torch.tensor([0, 3, 3, 7, 9]), torch.rand(12, dtype=dtype)


def _bag_repeats(dtype: torch.dtype) -> tuple[Tensor, ...]:
    # Rows looked up once, twice and three times, in an order that sorting moves around.
    return torch.tensor([0, 8, 6, 2, 1, 8, 1, 3, 9, 5, 1, 3]), torch.tensor([0, 5])


def _bag_1d(dtype: torch.dtype) -> tuple[Tensor, ...]:
    return torch.tensor([0, 5, 9, 8, 8, 2, 7, 1, 6, 4, 3, 9]), torch.tensor([0, 3, 3, 7, 9])


@dataclass(frozen=True)
class Path:
    """A read path: how to build the module, its inputs, and which inputs take ids."""

    make: Callable[[torch.dtype], nn.Module]
    inputs: Callable[[torch.dtype], tuple[Tensor, ...]]
    name: str = "weight"  # the constrained parameter, dotted under the module
    takes_ids: bool = False  # the first input holds row ids
    # Tensor parallelism on a one-rank mesh: the style that shards the module, and whether
    # it shards before the constraint (`fix_rows` on the shards) or after (`parallelize_fixed`).
    parallel: Callable[[], ParallelStyle] | None = None
    sharded_first: bool = False


PATHS = {
    "lookup": Path(lambda d: nn.Embedding(VOCAB, DIM, dtype=d), _ids, takes_ids=True),
    "lookup-options": Path(
        lambda d: nn.Embedding(VOCAB, DIM, padding_idx=8, scale_grad_by_freq=True, dtype=d),
        _ids,
        takes_ids=True,
    ),
    "bag-sum": Path(
        lambda d: nn.EmbeddingBag(VOCAB, DIM, mode="sum", dtype=d), _bag_sum, takes_ids=True
    ),
    "bag-mean": Path(
        lambda d: nn.EmbeddingBag(VOCAB, DIM, mode="mean", padding_idx=9, dtype=d),
        _bag_1d,
        takes_ids=True,
    ),
    "bag-freq": Path(
        lambda d: nn.EmbeddingBag(VOCAB, DIM, mode="sum", scale_grad_by_freq=True, dtype=d),
        _bag_repeats,
        takes_ids=True,
    ),
    "bag-max": Path(
        lambda d: nn.EmbeddingBag(VOCAB, DIM, mode="max", dtype=d), _ids, takes_ids=True
    ),
    "head": Path(lambda d: nn.Linear(DIM, VOCAB, dtype=d), _features),
    "tied": Path(_Tied, _ids, name="emb.weight", takes_ids=True),
    "generic": Path(_Reader, _features),
    "tp-lookup": Path(
        lambda d: nn.Embedding(VOCAB, DIM, dtype=d),
        _ids,
        takes_ids=True,
        parallel=lambda: RowwiseParallel(input_layouts=Replicate()),
    ),
    "tp-lookup-sharded-first": Path(
        lambda d: nn.Embedding(VOCAB, DIM, dtype=d),
        _ids,
        takes_ids=True,
        parallel=lambda: RowwiseParallel(input_layouts=Replicate()),
        sharded_first=True,
    ),
    "tp-lookup-columns": Path(
        lambda d: nn.Embedding(VOCAB, DIM, dtype=d),
        _ids,
        takes_ids=True,
        parallel=lambda: ColwiseParallel(output_layouts=Replicate()),
    ),
    "tp-head": Path(
        lambda d: nn.Linear(DIM, VOCAB, dtype=d),
        _features,
        parallel=lambda: ColwiseParallel(output_layouts=Replicate()),
    ),
    "tp-head-columns": Path(
        lambda d: nn.Linear(DIM, VOCAB, dtype=d),
        _features,
        parallel=lambda: RowwiseParallel(input_layouts=Replicate()),
    ),
}


@pytest.fixture(autouse=True)
def _one_rank_group(request: pytest.FixtureRequest) -> Iterator[None]:
    """A process group of one rank around each case of a tensor-parallel path."""
    callspec = getattr(request.node, "callspec", None)
    path = callspec.params.get("path") if callspec is not None else None
    if path is None or PATHS[path].parallel is None:
        yield
        return
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    store = dist.HashStore()  # type: ignore[attr-defined]
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclass
class Case:
    """A constrained module and its plain twin, with what it takes to compare them."""

    path: Path
    fast: nn.Module
    plain: nn.Module
    reference: Tensor
    rows: list[int] | None
    dtype: torch.dtype

    @property
    def free(self) -> Tensor:
        owner, _, attr = self.path.name.rpartition(".")
        return stored(self.fast.get_submodule(owner), attr)

    @property
    def free_key(self) -> str:
        owner, _, attr = self.path.name.rpartition(".")
        return f"{owner}.parametrizations.{attr}.original".lstrip(".")

    def inputs(self) -> tuple[Tensor, ...]:
        torch.manual_seed(1)
        inputs = (t.to(DEVICE) for t in self.path.inputs(self.dtype))
        return tuple(t.requires_grad_() if t.is_floating_point() else t for t in inputs)

    def run_plain(self, free: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:
        weight: Tensor
        if isinstance(free, DTensor):
            weight = plain_parallel_read(self.reference, free, self.rows)
        else:
            weight = plain_read(self.reference, free, self.rows)
        out: Tensor = functional_call(self.plain, {self.path.name: weight}, inputs)
        return out

    def others(self, module: nn.Module) -> list[Tensor]:
        """The module's parameters other than the constrained one (a head's bias)."""
        return [
            p
            for n, p in module.named_parameters()
            if not n.endswith(("weight", "parametrizations.weight.original"))
        ]

    def tolerances(self) -> dict[str, Any]:
        # bfloat16 keeps 8 bits: products split in two (the head with its parts apart) round
        # a few units of the last place differently.
        return {"rtol": 5e-2, "atol": 5e-2} if self.dtype == torch.bfloat16 else {}


def make_case(path: str, layout: str, storage: str, dtype: torch.dtype) -> Case:
    torch.manual_seed(0)
    spec = PATHS[path]
    plain = spec.make(dtype).to(DEVICE)
    fast = copy.deepcopy(plain)
    owner, _, attr = spec.name.rpartition(".")
    trailing = getattr(plain.get_submodule(owner), attr).shape[1:]
    reference = torch.randn(FIXED, *trailing, dtype=dtype).to(DEVICE)
    if spec.parallel is None:
        fix_rows(fast, reference, name=spec.name, rows=LAYOUTS[layout])
    else:
        mesh = init_device_mesh(DEVICE.type, (1,))
        parallelize_module(plain, mesh, spec.parallel())
        if spec.sharded_first:
            parallelize_module(fast, mesh, spec.parallel())
            fix_rows(fast, reference, name=spec.name, rows=LAYOUTS[layout])
        else:
            fix_rows(fast, reference, name=spec.name, rows=LAYOUTS[layout])
            parallelize_fixed(fast, mesh, spec.parallel())
    case = Case(spec, fast, plain, reference, LAYOUTS[layout], dtype)
    with torch.no_grad():
        case.free.copy_(_randn_like(case.free))
        if storage == "apart":
            case.free.data = case.free.data.clone()
    return case


def assert_close(got: Any, expected: Any, **tolerances: Any) -> None:
    """``torch.testing.assert_close``, with DTensors compared by value: a gradient of a
    tensor-parallel weight may come in another placement than the plain read's."""
    if isinstance(got, DTensor) or isinstance(expected, DTensor):
        assert type(got) is type(expected)
        got, expected = got.full_tensor(), expected.full_tensor()
    torch.testing.assert_close(got, expected, **tolerances)


def _randn_like(tensor: Tensor) -> Tensor:
    """``torch.randn_like``, for a DTensor too: random values in its local shard."""
    if isinstance(tensor, DTensor):
        local = torch.randn_like(tensor.to_local())
        return DTensor.from_local(local, tensor.device_mesh, tensor.placements)
    return torch.randn_like(tensor)


def _loss(out: Tensor) -> Tensor:
    """Not linear in the output, so second derivatives are not all zero."""
    probe = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype, device=out.device)
    probe = probe.reshape(out.shape)
    return (out * out.tanh() * probe).sum()


def _differentiable(
    case: Case, module: nn.Module, free: Tensor, inputs: tuple[Tensor, ...]
) -> list[Tensor]:
    return [free, *(t for t in inputs if t.requires_grad), *case.others(module)]


CASES = [
    pytest.param(path, layout, storage, dtype, id=f"{path}-{layout}-{storage}-{dtype}")
    for path in PATHS
    for layout in LAYOUTS
    for storage in STORAGE
    for dtype in DTYPES
]


@pytest.mark.parametrize(("path", "layout", "storage", "dtype"), CASES)
def test_values_gradients_and_double_gradients(
    path: str, layout: str, storage: str, dtype: str
) -> None:
    case = make_case(path, layout, storage, DTYPES[dtype])
    free = case.free.detach().clone().requires_grad_()
    fast_in, plain_in = case.inputs(), case.inputs()
    fast_wrt = _differentiable(case, case.fast, case.free, fast_in)
    plain_wrt = _differentiable(case, case.plain, free, plain_in)

    def firsts(out: Tensor, wrt: list[Tensor]) -> tuple[Tensor, ...]:
        return torch.autograd.grad(_loss(out), wrt, create_graph=True)

    try:
        out_plain = case.run_plain(free, plain_in)
        firsts_plain = firsts(out_plain, plain_wrt)
    except (RuntimeError, NotImplementedError) as error:  # no kernel in torch for this case
        with pytest.raises(type(error)):
            firsts(case.fast(*fast_in), fast_wrt)
        return
    out_fast = case.fast(*fast_in)
    assert_close(out_fast, out_plain, **case.tolerances())
    firsts_fast = firsts(out_fast, fast_wrt)
    for got, expected in zip(firsts_fast, firsts_plain, strict=True):
        assert_close(got, expected, **case.tolerances())

    if case.dtype == torch.bfloat16:
        # Second derivatives of a bfloat16 loss amplify single roundings past any tolerance
        # that would still catch a wrong formula; float32 and float64 check them.
        return

    # A gradient penalty: the gradients' own gradients. Where the plain read has none (torch
    # does not differentiate an embedding bag's backward), the fast read fails the same way.
    def seconds(firsts: tuple[Tensor, ...], wrt: list[Tensor]) -> tuple[Tensor | None, ...]:
        penalty = torch.stack([(g.float() ** 2).sum() for g in firsts]).sum()
        grads: tuple[Tensor | None, ...] = torch.autograd.grad(penalty, wrt, allow_unused=True)
        return grads

    try:
        seconds_plain = seconds(firsts_plain, plain_wrt)
    except (RuntimeError, NotImplementedError) as error:
        with pytest.raises(type(error)):
            seconds(firsts_fast, fast_wrt)
        return
    for second, expected_second in zip(seconds(firsts_fast, fast_wrt), seconds_plain, strict=True):
        assert (second is None) == (expected_second is None)
        if second is not None:
            assert_close(second, expected_second, **case.tolerances())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", [p for p in PATHS if p not in ("lookup-options", "bag-freq")])
def test_gradcheck_and_gradgradcheck_in_float64(path: str, layout: str) -> None:
    # (lookup-options and bag-freq are left out: padding_idx and scale_grad_by_freq change
    # their gradients on purpose, so they are no derivatives; the test above compares them
    # with the plain read.)
    case = make_case(path, layout, "joined", torch.float64)
    inputs = case.inputs()
    floats = [t for t in inputs if t.requires_grad]

    def call(read: Callable[[Tensor, tuple[Tensor, ...]], Tensor]) -> Callable[..., Tensor]:
        def run(free: Tensor, *floats_in: Tensor) -> Tensor:
            it = iter(floats_in)
            return read(free, tuple(next(it) if t.requires_grad else t for t in inputs))

        return run

    def fast_read(free: Tensor, args: tuple[Tensor, ...]) -> Tensor:
        out: Tensor = functional_call(case.fast, {case.free_key: free}, args)
        return out

    fast, plain = call(fast_read), call(case.run_plain)
    free = case.free.detach().clone().requires_grad_()
    for check in (torch.autograd.gradcheck, torch.autograd.gradgradcheck):
        plain_error = _error_of(lambda: check(plain, (free, *floats)))  # noqa: B023
        if plain_error is None:
            assert check(fast, (free, *floats))
        else:  # torch does not differentiate an embedding bag's backward, checks no DTensor
            with pytest.raises(plain_error):
                check(fast, (free, *floats))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
# torch's own vmap of the plain embedding bag, in both reads:
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_torch_func_grad_vmap_jvp_and_forward_ad(path: str, layout: str) -> None:
    case = make_case(path, layout, "joined", torch.float64)
    inputs = case.inputs()
    detached = tuple(t.detach() for t in inputs)

    def fast(free: Tensor) -> Tensor:
        out: Tensor = functional_call(case.fast, {case.free_key: free}, detached)
        return out

    def plain(free: Tensor) -> Tensor:
        return case.run_plain(free, detached)

    free = case.free.detach().clone()
    tangent = _randn_like(free)
    batch = torch.stack((free, free.flip(0)))

    def forward_mode(read: Callable[[Tensor], Tensor]) -> Tensor | None:
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(free, tangent)  # type: ignore[no-untyped-call]
            out: Tensor | None = forward_ad.unpack_dual(read(dual)).tangent  # type: ignore[no-untyped-call]
            return out

    transforms: dict[str, Callable[[Callable[[Tensor], Tensor]], Any]] = {
        "grad": lambda read: torch.func.grad(lambda f: _loss(read(f)))(free),
        "vmap": lambda read: torch.func.vmap(read)(batch),
        "jvp": lambda read: torch.func.jvp(read, (free,), (tangent,)),
        "forward-ad": forward_mode,
    }
    for name, transform in transforms.items():
        try:
            expected = transform(plain)
        except (RuntimeError, NotImplementedError) as error:  # torch has no rule for the op
            with pytest.raises(type(error)):
                transform(fast)
            continue
        got = transform(fast)
        assert type(got) is type(expected), name
        assert_close(got, expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_autocast_matches_the_plain_read(path: str, layout: str, storage: str, dtype: str) -> None:
    # Under autocast to bfloat16 every read casts what the plain module's operations would
    # cast, and nothing else: float32 products run in bfloat16, float64 ones stay float64
    # (autocast leaves float64 alone). The dtypes of the output and the gradients are compared
    # exactly, the values at bfloat16's tolerance for float32 modules.
    case = make_case(path, layout, storage, DTYPES[dtype])
    free = case.free.detach().clone().requires_grad_()
    fast_in, plain_in = case.inputs(), case.inputs()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out_fast = case.fast(*fast_in)
        out_plain = case.run_plain(free, plain_in)
    assert out_fast.dtype == out_plain.dtype
    tolerances: dict[str, Any] = {"rtol": 5e-2, "atol": 5e-2} if dtype == "float32" else {}
    assert_close(out_fast, out_plain, **tolerances)
    fast_wrt = _differentiable(case, case.fast, case.free, fast_in)
    plain_wrt = _differentiable(case, case.plain, free, plain_in)
    got = torch.autograd.grad(_loss(out_fast.float()), fast_wrt)
    expected = torch.autograd.grad(_loss(out_plain.float()), plain_wrt)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype
        assert_close(g, e, **tolerances)


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_torch_compile_matches_the_plain_read(path: str, layout: str, storage: str) -> None:
    # The whole forward compiled in one graph (no break back to eager), its values and first
    # gradients against the plain read run eagerly. aot_eager traces what inductor would
    # compile and runs it as traced, so a path dynamo or AOTAutograd traces wrongly fails here.
    torch._dynamo.reset()
    case = make_case(path, layout, storage, torch.float32)
    free = case.free.detach().clone().requires_grad_()
    fast_in, plain_in = case.inputs(), case.inputs()

    def forward(*args: Tensor) -> Tensor:
        out: Tensor = case.fast(*args)
        return out

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    out_fast = compiled(*fast_in)
    out_plain = case.run_plain(free, plain_in)
    assert_close(out_fast, out_plain)
    fast_wrt = _differentiable(case, case.fast, case.free, fast_in)
    plain_wrt = _differentiable(case, case.plain, free, plain_in)
    got = torch.autograd.grad(_loss(out_fast), fast_wrt)
    expected = torch.autograd.grad(_loss(out_plain), plain_wrt)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e)


BAD_IDS = {
    "negative": lambda ids: ids.masked_fill(ids == 8, -1),
    "too-large": lambda ids: ids.masked_fill(ids == 8, VOCAB),
    "uint8": lambda ids: ids.to(torch.uint8),
    "bool": lambda ids: ids > 4,
    "float": lambda ids: ids.float(),
}


def _error_of(call: Callable[[], Any]) -> type[BaseException] | None:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the kind of error is what is compared
        return type(error)
    return None


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", [p for p, spec in PATHS.items() if spec.takes_ids])
def test_bad_ids_fail_as_in_the_plain_module(path: str, layout: str, bad: str) -> None:
    if DEVICE.type != "cpu" and bad in ("negative", "too-large"):
        pytest.skip("a device-side assert; tests/test_cuda.py checks it, one process per run")
    case = make_case(path, layout, "joined", torch.float32)
    ids, *rest = case.inputs()
    bad_inputs = (BAD_IDS[bad](ids), *rest)
    plain_error = _error_of(lambda: case.run_plain(case.free.detach(), bad_inputs))
    before = {k: v.clone() for k, v in case.fast.state_dict().items()}
    if plain_error is None:  # accepted by the plain module: the same values
        with torch.no_grad():
            expected = case.run_plain(case.free.detach(), bad_inputs)
            assert_close(case.fast(*bad_inputs), expected)
    else:
        with pytest.raises(plain_error):
            case.fast(*bad_inputs)
    after = case.fast.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_random_layouts_and_ids_match_the_plain_read(data: st.DataObject) -> None:
    # The tables above, drawn at random: vocabulary size, fixed rows in any order (a prefix
    # sometimes), ids in and out of range, for the lookup, a sum bag and the head.
    vocab = data.draw(st.integers(2, 12), label="vocab")
    fixed = data.draw(st.integers(1, vocab), label="fixed")
    order = data.draw(st.permutations(range(vocab)), label="order")
    rows = None if data.draw(st.booleans(), label="prefix") else list(order[:fixed])
    path = data.draw(st.sampled_from(["lookup", "bag", "head"]), label="path")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    plain: nn.Module
    if path == "lookup":
        plain = nn.Embedding(vocab, 3, dtype=torch.float64)
    elif path == "bag":
        plain = nn.EmbeddingBag(vocab, 3, mode="sum", dtype=torch.float64)
    else:
        plain = nn.Linear(3, vocab, dtype=torch.float64)
    fast = copy.deepcopy(plain)
    reference = torch.randn(fixed, 3, dtype=torch.float64)
    fix_rows(fast, reference, rows=rows)
    free = stored(fast).detach().clone().requires_grad_()
    if path == "head":
        inputs: tuple[Tensor, ...] = (torch.randn(4, 3, dtype=torch.float64),)
    else:
        ids = data.draw(st.lists(st.integers(-2, vocab + 1), min_size=2, max_size=8), label="ids")
        shape = (1, len(ids)) if path == "bag" else (len(ids),)
        inputs = (torch.tensor(ids).reshape(shape),)

    def plain_read_of(f: Tensor) -> Tensor:
        out: Tensor = functional_call(plain, {"weight": plain_read(reference, f, rows)}, inputs)
        return out

    plain_error = _error_of(lambda: plain_read_of(free))
    if plain_error is not None:
        with pytest.raises(plain_error):
            fast(*inputs)
        return
    out_fast, out_plain = fast(*inputs), plain_read_of(free)
    assert_close(out_fast, out_plain)
    (grad_fast,) = torch.autograd.grad(_loss(out_fast), [stored(fast)])
    (grad_plain,) = torch.autograd.grad(_loss(out_plain), [free])
    assert_close(grad_fast, grad_plain)


@pytest.mark.parametrize("inputs_need_grad", [True, False], ids=["input-grad", "no-input-grad"])
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_changing_the_stored_rows_before_the_backward_acts_as_the_plain_module(
    path: str, layout: str, storage: str, inputs_need_grad: bool
) -> None:
    # An optimizer step or an EMA update between the forward and the backward. Where the plain
    # module's backward does not read its weight (a lookup's, a bag's sum or mean, a head's
    # weight gradient), the fast read's does not either: the plain read's gradients, which do
    # not depend on the rows' values. Where it does (a head's input gradient, a bag's
    # per-sample weights' gradient), the fast read may raise the plain module's error.
    case = make_case(path, layout, storage, torch.float32)

    def inputs() -> tuple[Tensor, ...]:
        given = case.inputs()
        return given if inputs_need_grad else tuple(t.detach() for t in given)

    def backward_after_change(out: Tensor, change: Tensor, wrt: list[Tensor]) -> tuple[Tensor, ...]:
        with torch.no_grad():
            change.add_(1.0)
        return torch.autograd.grad(_loss(out), wrt, allow_unused=True, materialize_grads=True)

    def raises_inplace_error(run: Callable[[], object]) -> bool:
        try:
            run()
        except RuntimeError as error:
            if "modified by an inplace operation" not in str(error):
                raise
            return True
        return False

    plain_in = inputs()
    weight = case.plain.get_parameter(case.path.name)
    plain_wrt = [weight, *(t for t in plain_in if t.requires_grad)]
    plain_raises = raises_inplace_error(
        lambda: backward_after_change(case.plain(*plain_in), weight, plain_wrt)
    )
    free = case.free.detach().clone().requires_grad_()
    read_in, fast_in = inputs(), inputs()
    read_wrt = _differentiable(case, case.plain, free, read_in)
    expected = backward_after_change(case.run_plain(free, read_in), free, read_wrt)
    fast_wrt = _differentiable(case, case.fast, case.free, fast_in)
    out = case.fast(*fast_in)
    got: tuple[Tensor, ...] = ()

    def fast_backward() -> None:
        nonlocal got
        got = backward_after_change(out, case.free, fast_wrt)

    if plain_raises:  # the fast read may raise too (only the plain module's error)
        if raises_inplace_error(fast_backward):
            return
    else:
        fast_backward()
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e)


# Every option of the module classes that the fast reads stand in for (their `__constants__`),
# set after fix_rows, with the paths that take it. The fast read honours an option (gives the
# plain read's values, gradients and errors with it) or steps aside for the module's own forward
# while it is set; either way the result is the plain read's. Shape attributes
# (``num_embeddings``, ``in_features``, ...) are not read by the plain forward either.
OPTIONS_AFTER_FIX_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "lookup-max-norm": ("lookup", {"max_norm": 1.0}),
    "lookup-max-norm-l1": ("lookup", {"max_norm": 1.0, "norm_type": 1.0}),
    "lookup-norm-type": ("lookup", {"norm_type": 1.0}),
    "lookup-sparse": ("lookup", {"sparse": True}),
    "lookup-scale-grad": ("lookup", {"scale_grad_by_freq": True}),
    "lookup-padding": ("lookup", {"padding_idx": 9}),
    "lookup-padding-negative": ("lookup", {"padding_idx": -1}),
    "lookup-padding-too-large": ("lookup", {"padding_idx": VOCAB}),
    "lookup-padding-too-small": ("lookup", {"padding_idx": -VOCAB - 1}),
    "lookup-no-padding": ("lookup-options", {"padding_idx": None}),
    "lookup-no-scale-grad": ("lookup-options", {"scale_grad_by_freq": False}),
    "lookup-shape": ("lookup", {"num_embeddings": 3, "embedding_dim": 7}),
    "bag-max-norm": ("bag-sum", {"max_norm": 1.0}),
    "bag-max-norm-l1": ("bag-mean", {"max_norm": 1.0, "norm_type": 1.0}),
    "bag-norm-type": ("bag-mean", {"norm_type": 1.0}),
    "bag-sparse": ("bag-mean", {"sparse": True}),
    "bag-sparse-sum": ("bag-sum", {"sparse": True}),
    "bag-scale-grad": ("bag-sum", {"scale_grad_by_freq": True}),
    "bag-mean-to-sum": ("bag-mean", {"mode": "sum"}),
    "bag-mean-to-max": ("bag-mean", {"mode": "max"}),
    "bag-sum-to-max": ("bag-sum", {"mode": "max"}),
    "bag-max-to-mean": ("bag-max", {"mode": "mean"}),
    "bag-unknown-mode": ("bag-mean", {"mode": "median"}),
    "bag-last-offset": ("bag-sum", {"include_last_offset": True}),
    "bag-padding": ("bag-sum", {"padding_idx": 9}),
    "bag-padding-negative": ("bag-sum", {"padding_idx": -2}),
    "bag-padding-too-large": ("bag-mean", {"padding_idx": VOCAB}),
    "bag-padding-too-small": ("bag-mean", {"padding_idx": -VOCAB - 1}),
    "bag-no-padding": ("bag-mean", {"padding_idx": None}),
    "bag-shape": ("bag-sum", {"num_embeddings": 3, "embedding_dim": 7}),
    "head-no-bias": ("head", {"bias": None}),
    "head-shape": ("head", {"in_features": 7, "out_features": 2}),
}


def test_every_module_option_is_checked_after_fix_rows() -> None:
    # A torch release that adds an option to one of these classes fails here until the fast
    # read either honours it (and a case above shows it) or steps aside for it.
    from embedding_constraint.reads import FAST_FORWARDS

    covered: dict[type[nn.Module], set[str]] = {cls: set() for cls in FAST_FORWARDS}
    for path, options in OPTIONS_AFTER_FIX_ROWS.values():
        covered[type(PATHS[path].make(torch.float32))] |= set(options)
    for cls, names in covered.items():
        assert set(getattr(cls, "__constants__", ())) <= names, cls.__name__


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("option", OPTIONS_AFTER_FIX_ROWS)
# torch's own warning for a sparse gradient reaching a dense one, in both reads:
@pytest.mark.filterwarnings("ignore:.*sparse:UserWarning")
def test_options_set_after_fix_rows_match_the_plain_read(
    option: str, layout: str, storage: str
) -> None:
    path, options = OPTIONS_AFTER_FIX_ROWS[option]
    case = make_case(path, layout, storage, torch.float64)
    before = {name: getattr(case.fast, name) for name in options}
    for module in (case.fast, case.plain):
        for name, value in options.items():
            setattr(module, name, value)
    free = case.free.detach().clone().requires_grad_()
    fast_in, plain_in = case.inputs(), case.inputs()

    def run(read: Callable[[], Tensor], wrt: list[Tensor]) -> tuple[Tensor, ...]:
        out = read()
        return (
            out,
            *torch.autograd.grad(_loss(out), wrt, allow_unused=True, materialize_grads=True),
        )

    fast_wrt = _differentiable(case, case.fast, case.free, fast_in)
    plain_wrt = _differentiable(case, case.plain, free, plain_in)
    plain_error = _error_of(lambda: run(lambda: case.run_plain(free, plain_in), plain_wrt))
    if plain_error is NotImplementedError and options.get("sparse") and case.rows is not None:
        # Torch takes no sparse gradient through the scattered plain read above (its
        # index_select). The chain rule through the whole weight read as a leaf gives the free
        # rows' gradient: the unconstrained module's, at the free rows.
        got = run(lambda: case.fast(*fast_in), fast_wrt)
        whole = plain_read(case.reference, free, case.rows).detach().requires_grad_()
        out = functional_call(case.plain, {case.path.name: whole}, plain_in)
        grads = torch.autograd.grad(_loss(out), [whole, *plain_wrt[1:]], allow_unused=True)
        free_rows = [r for r in range(whole.shape[0]) if r not in case.rows]
        expected = (out, grads[0].to_dense()[free_rows], *grads[1:])
        for g, e in zip(got, expected, strict=True):
            assert_close(g.to_dense() if g.is_sparse else g, e)
    elif plain_error is not None:
        with pytest.raises(plain_error):
            run(lambda: case.fast(*fast_in), fast_wrt)
    else:
        got = run(lambda: case.fast(*fast_in), fast_wrt)
        expected = run(lambda: case.run_plain(free, plain_in), plain_wrt)
        for g, e in zip(got, expected, strict=True):
            assert_close(g, e)
    # Checked at every forward: with the options back as they were, the fast read is back.
    for module in (case.fast, case.plain):
        for name, value in before.items():
            setattr(module, name, value)
    free = case.free.detach().clone().requires_grad_()
    assert_close(case.fast(*fast_in), case.run_plain(free, plain_in))
