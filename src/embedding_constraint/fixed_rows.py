"""The `FixedRows` parametrization: some rows of a tensor held at reference values.

The stored tensor (``parametrizations.<name>.original``) holds only the free rows, so an
optimizer never sees, decays or keeps state for the fixed ones. Reading the parametrized
tensor puts the reference rows and the free rows together: `FixedRows.forward` is the plain
read, which every fast read in `embedding_constraint.reads` is tested against.

Both live in one buffer, ``[reference; free]``: the reference tensor and the stored parameter
are its two parts (views). A lookup then gathers from the whole buffer at once. Whatever
separates them (assigning ``.data``, ``load_state_dict(assign=True)``, a ``.to()`` that
`fix_rows` did not see) costs speed, never correctness: the lookup then gathers from each.

Beside the class live the small helpers every read needs: `parametrization_list`,
`constrained` (the constraint and stored rows of a module that `FixedRows` alone constrains),
`composable_only` (whether a transform is active that only plain torch operations support),
`sharded` (FSDP2's DTensors) and `fast_readable`, the one gate of every fast forward: the
constraint and stored rows when a fast read may take them, else None.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from embedding_constraint.torch_internals import fsdp_managed, functorch_transform_active

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "FixedRows",
    "composable_only",
    "constrained",
    "fast_readable",
    "gathered",
    "meta_on_some_rank",
    "parametrization_list",
    "shard_like",
    "sharded",
]


def parametrization_list(module: nn.Module, attr: str) -> ParametrizationList:
    """Return the parametrizations of ``module.<attr>`` (which must be parametrized)."""
    plist = module.parametrizations[attr]  # type: ignore[index]
    if not isinstance(plist, ParametrizationList):
        raise TypeError(f"Expected {attr!r} to be parametrized. Got {type(plist).__name__}.")
    return plist


def constrained(module: nn.Module, attr: str = "weight") -> tuple[FixedRows, Tensor] | None:
    """Return the `FixedRows` on ``module.<attr>`` and its stored rows, or None if it has none.

    Raises:
        ValueError: another parametrization is registered after `FixedRows` on it. It would
            transform the fixed rows too, so they would no longer be exact.
    """
    if not parametrize.is_parametrized(module, attr):
        return None
    plist = parametrization_list(module, attr)
    constraint = plist[0]
    if not isinstance(constraint, FixedRows):
        return None
    if len(plist) != 1:
        kinds = [type(p).__name__ for p in plist]
        raise ValueError(
            f"Expected FixedRows to be the only parametrization of {attr!r}. Got {kinds}: a "
            "parametrization registered after FixedRows transforms the fixed rows too, so "
            "they would not stay exact. Register it on another tensor, or bake() first."
        )
    free = plist.original
    assert isinstance(free, Tensor)
    return constraint, free


def composable_only(*tensors: Tensor | None) -> bool:
    """Whether only plain torch operations may read the weight now.

    True under a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) and when a tensor
    carries a forward-mode tangent: the fast reads' autograd functions support neither, and
    their tensors have no memory to compare. The plain read (`FixedRows.forward` and the
    module's own forward) is made of operations that support both. True as well for a tensor
    on the meta device (a module moved there for its shapes): the plain read gives them.
    """
    if functorch_transform_active():
        return True
    if any(t is not None and t.is_meta for t in tensors):
        return True  # shapes only, with the constraint's tables elsewhere (`FixedRows._apply`)
    return any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None  # type: ignore[no-untyped-call]
        for t in tensors
    )


def fast_readable(module: nn.Module, *others: Tensor | None) -> tuple[FixedRows, Tensor] | None:
    """Return `constrained` ``module.weight`` if a fast read may take it now, else None.

    None also when only the plain read may (see `composable_only`; ``others`` are the read's
    other tensors, checked with the weight's), for sharded rows (see `sharded`) and while the
    module has an option set that the fast reads do not honour (`plain_options`): the
    module's own forward then reads the weight through the parametrization.
    """
    found = constrained(module)
    if found is None or plain_options(module):
        return None
    constraint, free = found
    if composable_only(free, constraint.reference, *others) or sharded(free, constraint.reference):
        return None
    if not free.shape[0] and fsdp_managed(module):
        # Every row fixed, under FSDP2: nothing to train, and FSDP2's reduce-scatter fails on
        # an empty gradient. Read without a path to the free rows: FSDP2 skips a parameter
        # that gets no gradient (DDP, which needs one, gets it through the graph).
        return constraint, free.detach()
    return found


def plain_options(module: nn.Module) -> bool:
    """Whether ``module`` has an option set that no fast read honours.

    ``max_norm`` (``nn.Embedding`` and ``nn.EmbeddingBag`` renormalize the rows they look up,
    in the weight they read) and ``sparse`` (a sparse gradient), set at any time, even after
    `fix_rows` (which refuses them): checked at each read.
    """
    return getattr(module, "max_norm", None) is not None or bool(getattr(module, "sparse", False))


def _is_dtensor(tensor: object) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``DTensor``, without importing ``torch.distributed.tensor``.

    A DTensor exists only once its module is imported, so the class is looked up there:
    importing it with this package would cost more than half a second of every import.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def sharded(*tensors: Tensor | None) -> bool:
    """Whether a tensor is a ``DTensor``: a parameter at rest under FSDP2 (``fully_shard``).

    FSDP2 gives a module plain, gathered parameters during its forward and sharded
    ``DTensor`` ones outside it (``state_dict()``, a read of ``module.weight`` between steps,
    a parent module reading a child's weight). The fast reads work on gathered rows only; on a
    ``DTensor`` they step aside for the plain read, which `FixedRows.forward` answers with a
    ``DTensor`` laid out as the unconstrained weight would be.
    """
    return any(_is_dtensor(t) for t in tensors)


def gathered(tensor: Tensor) -> Tensor:
    """``tensor`` whole: a ``DTensor``'s full tensor (a collective: every rank must call it).

    On the meta device on any rank (see `meta_on_some_rank`), a meta tensor of its shape on
    every rank, with no other collective.
    """
    if not _is_dtensor(tensor):
        return tensor
    if meta_on_some_rank(tensor):
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    return tensor.full_tensor()


def meta_on_some_rank(tensor: DTensor) -> bool:
    """Whether ``tensor``'s shard lies on the meta device on any rank of its mesh.

    One all-reduce of a flag, which every rank of the mesh makes, a meta one too: a rank
    with values then does not wait in a gather that a meta rank (accelerate's
    ``cpu_ram_efficient_loading`` keeps the model there on all ranks but the first) would
    skip, since a collective on the meta device sends nothing.
    """
    import torch.distributed as dist

    mesh = tensor.device_mesh
    flag = torch.tensor([int(tensor.is_meta)], device=mesh.device_type)
    for dim in range(mesh.ndim):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return bool(flag.item())


def shard_like(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor`` (whole, the same on every rank) laid out as ``like``: sharded if it is a
    ``DTensor`` (each rank keeps its part, nothing is sent), else as it is."""
    if not _is_dtensor(like):
        return tensor
    from torch.distributed.tensor import DTensor, Replicate  # loaded: `like` is one

    mesh = like.device_mesh
    whole = DTensor.from_local(tensor, mesh, [Replicate()] * mesh.ndim, run_check=False)
    out: Tensor = whole.redistribute(mesh, like.placements)
    return out


class _ScatterRows(torch.autograd.Function):
    """Interleave fixed and free rows into one tensor; gradients reach the free rows only.

    Equal to ``cat((reference, free)).index_select(0, slot)`` (the composable read that
    `FixedRows.forward` uses under transforms) with one copy of the weight instead of two:
    one gather by ``slot`` from ``joined``, the block ``[reference; free]`` when the two share
    it (see `FixedRows.joined`), else the two copied to their rows (the gather is the faster;
    docs/performance.md). Its backward is one ``index_select``, itself differentiable: double
    backward works.
    """

    @staticmethod
    def forward(
        ctx: Any,
        free: Tensor,
        reference: Tensor,
        rows: Tensor,
        free_rows: Tensor,
        joined: Tensor | None,
        slot: Tensor,
    ) -> Tensor:
        # A table, not a value of the graph: kept on ctx, not saved, so that the node can run
        # backward more than once, as torch's CatBackward can (tied holders share one read,
        # `embedding_constraint.tied_reads`, and each may have a loss of its own).
        ctx.free_rows = free_rows
        if joined is not None:
            return joined.index_select(0, slot)
        out = free.new_empty((reference.shape[0] + free.shape[0], *free.shape[1:]))
        out.index_copy_(0, rows, reference)
        out.index_copy_(0, free_rows, free)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        grad_free = grad.index_select(0, ctx.free_rows) if ctx.needs_input_grad[0] else None
        return grad_free, None, None, None, None, None


# Most spare rows that an accelerator's lookup backward spreads dropped lookups over.
_SPARE_ROWS = 1024


def _spare_rows(device: torch.device, fixed: int) -> int:
    """How many spare rows the lookup backward sends lookups of fixed rows to.

    The CPU kernel skips lookups of its padding row without reading their gradient: one
    spare row, named the padding row. Accelerator kernels sum each row's lookups in sequence
    (the padding row's too, dropped only afterwards), so one spare row taking most of a batch
    would be one long serial sum: spread the fixed rows over many spare rows instead.
    """
    return 1 if device.type == "cpu" else max(1, min(fixed, _SPARE_ROWS))


def _as_rows(rows: object, count: int) -> Tensor:
    """Validate ``rows`` as distinct, non-negative integer indices, one per reference row."""
    if isinstance(rows, Tensor):
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
            raise TypeError(
                f"Expected `rows` to hold integers. Got a tensor of dtype {rows.dtype}."
            )
        index = rows.detach().to(device="cpu", dtype=torch.int64)
    elif isinstance(rows, Sequence) and not isinstance(rows, str | bytes):
        bad = [r for r in rows if not isinstance(r, int) or isinstance(r, bool)]
        if bad:
            raise TypeError(
                "Expected `rows` to hold integers. "
                f"Got an element of type {type(bad[0]).__name__}: {bad[0]!r}."
            )
        index = torch.tensor(list(rows), dtype=torch.int64)
    else:
        raise TypeError(
            "Expected `rows` to be a 1-D integer tensor or a sequence of ints. "
            f"Got {type(rows).__name__}."
        )
    if index.dim() != 1:
        raise ValueError(f"Expected `rows` to be 1-D. Got a tensor of shape {tuple(index.shape)}.")
    if index.numel() != count:
        raise ValueError(
            f"Expected `rows` to name one row per reference row ({count}). "
            f"Got {index.numel()} rows."
        )
    if index.numel() and int(index.min()) < 0:
        raise ValueError(f"Expected `rows` to be non-negative. Got {int(index.min())}.")
    unique, counts = torch.unique(index, return_counts=True)
    if unique.numel() != index.numel():
        raise ValueError(
            f"Expected `rows` to be distinct. Got duplicates: {unique[counts > 1].tolist()}."
        )
    return index


def _sorted_by_row(
    reference: Tensor, rows: Tensor | Sequence[int] | None
) -> tuple[Tensor | None, Tensor, bool]:
    """``(index, reference, copied)``: the rows sorted (None for a prefix), the reference's
    rows in their order, and whether that took a copy.

    Sorted rows make the prefix case recognisable and the layout canonical.
    """
    if rows is None:
        return None, reference, False
    index, order = torch.sort(_as_rows(rows, reference.shape[0]))
    copied = not torch.equal(order, torch.arange(order.numel()))
    if copied:
        reference = reference[order.to(reference.device)]
    if torch.equal(index, torch.arange(index.numel())):
        return None, reference, copied
    return index, reference, copied


def _extremes(reference: Tensor) -> Tensor:
    """The largest and smallest value of ``reference`` in float64 on the host (0, 0 if empty)."""
    if not reference.numel():
        return torch.zeros(2, dtype=torch.float64)
    # Two reductions (NaN propagates through both) rather than a mask of the whole tensor.
    return torch.stack((reference.amax(), reference.amin())).to("cpu", torch.float64)


def _check_finite(
    reference: Tensor,
    extremes: Tensor,
    dtype: torch.dtype,
    target: str = "the dtype of the tensor it constrains",
    argument: str = "reference",
) -> None:
    """Raise if a value of ``reference`` is NaN or Inf, or becomes Inf in ``dtype``.

    ``extremes`` are its `_extremes`: converting is monotonic, so if they stay finite in
    ``dtype``, every value does. ``argument`` names the reference in the message.
    """
    if bool(torch.isfinite(extremes.to(dtype)).all()):
        return
    finite = torch.isfinite(reference.to(dtype))
    bad = (~finite).reshape(reference.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    shown = f"[{', '.join(map(str, bad[:10]))}{', ...' if len(bad) > 10 else ''}]"
    if dtype == reference.dtype:
        raise ValueError(f"Expected `{argument}` to be finite. Got NaN or Inf in rows {shown}.")
    raise ValueError(
        f"Expected `{argument}` to be finite in {dtype}, {target}. "
        f"Got values in rows {shown} that are too large for it."
    )


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _keeps_state(method: _Method) -> _Method:
    """Run ``method``, which builds what `FixedRows` keeps (the reference, its index tables,
    the block), without a graph and outside inference mode, whatever mode its caller is in.

    A read or a load under ``torch.inference_mode`` (an evaluation) would otherwise leave
    inference tensors, which a later training step saves for backward and torch refuses there,
    where a plain module trains on. (Leaving inference mode turns gradients back on: hence
    ``no_grad`` inside it.)
    """

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.no_grad():
            return method(*args, **kwargs)

    return cast(_Method, run)


class RowConstraint(nn.Module):
    """A parametrization that holds rows of a tensor at reference values: `FixedRows`, and the
    tensor-parallel shard's (`embedding_constraint.tensor_parallel`). `is_fixed` asks this."""


class FixedRows(RowConstraint):
    r"""Hold rows of a tensor at reference values while the other rows train.

    Register it with `torch.nn.utils.parametrize.register_parametrization`. The
    stored parameter then holds only the free rows; reading the tensor returns the
    reference rows at their positions and the free rows everywhere else
    (``cat(reference, free)`` when the fixed rows are a prefix).

    The reference is copied into a buffer, so later changes to the caller's tensor change
    nothing, and it follows ``.to(device/dtype)`` with the module. At registration the
    reference and the free rows are put into one block of memory, ``[reference; free]``, so
    that the reads of `embedding_constraint.reads` take the weight without assembling it (see
    `rejoin`). When registered, it is converted to the dtype and device of the tensor it
    constrains: in a lower precision than the reference (bfloat16, say), the fixed rows are
    the rounded reference.

    A later dtype conversion of the module (``.double()``, ``.half()``, a Lightning
    precision) converts the fixed rows with it, as any buffer: narrowing rounds them once
    (refused where a value would overflow), widening keeps the values they held, not the
    wider reference they may have come from. The constraint keeps no second copy of the
    reference to restore it from; `reset_reference` puts exact values back, and the Lightning
    callback calls it when the fit starts, from the copy it holds anyway.

    For the reads (the package's own API, not a user's): `joined`, `gradient_rows`, `spare`,
    `places` and `reference_for` give the block ``[reference; free]`` and its index tables.

    Args:
        reference (Tensor): the fixed rows' values, shape ``(k, *trailing)``, where
            ``trailing`` is the constrained tensor's shape after the row dimension.
        rows (Tensor or sequence of int, optional): the positions of the fixed rows, one per
            reference row: ``weight[rows[i]]`` is held at ``reference[i]``. Default: ``None``,
            the first ``k`` rows.

    Raises:
        TypeError: ``reference`` is not a floating-point tensor, or ``rows`` does not hold
            integers.
        ValueError: ``reference`` is 0-d, on the meta device or holds NaN or Inf; ``rows``
            is not 1-D, has a different count than ``reference``, is negative or has
            duplicates. When registered (see `check_compatible`): the tensor is not
            floating-point, has another trailing shape, fewer rows than ``reference`` or
            fewer than ``max(rows) + 1`` rows, or a reference value would be infinite in its
            dtype. (A tensor on the meta device is constrained there: `right_inverse`.)

    Examples:

        >>> import torch
        >>> from torch import nn
        >>> from torch.nn.utils import parametrize
        >>> from embedding_constraint import FixedRows
        >>> emb = nn.Embedding(5, 3)
        >>> reference = torch.zeros(2, 3)
        >>> _ = parametrize.register_parametrization(emb, "weight", FixedRows(reference))
        >>> emb.parametrizations.weight.original.shape  # only the free rows are stored
        torch.Size([3, 3])
        >>> torch.equal(emb.weight[:2], reference)
        True
    """

    def __init__(self, reference: Tensor, rows: Tensor | Sequence[int] | None = None) -> None:
        self._init(reference, rows, copy=True)

    @classmethod
    def borrowing(
        cls,
        reference: Tensor,
        rows: Tensor | Sequence[int] | None = None,
        *,
        argument: str = "reference",
    ) -> FixedRows:
        """Like the constructor, but keep ``reference`` itself until registration copies it.

        For callers that register at once (`fix_rows`): registration copies the reference
        into the block ``[reference; free]`` anyway, so a private copy made before it would
        only raise the peak memory of registering. ``argument``: how the messages of the
        checks name the reference (the caller's own argument: ``"constraint"``, ``"old.bias"``).
        """
        constraint = cls.__new__(cls)
        constraint._init(reference, rows, copy=False, argument=argument)
        return constraint

    def _init(
        self,
        reference: Tensor,
        rows: Tensor | Sequence[int] | None,
        copy: bool,
        argument: str = "reference",
    ) -> None:
        super().__init__()
        if not isinstance(reference, Tensor):
            raise TypeError(
                f"Expected `{argument}` to be a torch.Tensor. Got {type(reference).__name__}."
            )
        if not reference.is_floating_point():
            raise TypeError(
                f"Expected `{argument}` to be floating-point. "
                f"Got a tensor of dtype {reference.dtype}."
            )
        if reference.dim() == 0:
            raise ValueError(f"Expected `{argument}` to have a row dimension. Got a 0-d tensor.")
        if reference.is_meta:
            raise ValueError(
                f"Expected `{argument}` to hold values. Got a tensor on the meta device, which "
                "has none: load or compute the reference first, then constrain."
            )
        # Its largest and smallest values (host memory): whether it stays finite in a tensor's
        # dtype is known from these two alone (`check_compatible`).
        self._extremes = _extremes(reference)
        _check_finite(reference, self._extremes, reference.dtype, argument=argument)
        index, reference, copied = _sorted_by_row(reference.detach(), rows)
        if copy and not copied:  # one private copy, however the rows came
            reference = reference.clone(memory_format=torch.contiguous_format)
        # Tensors of the constraint, but no buffers: DDP broadcasts every buffer at every
        # forward, and these never change. `_apply` moves them with the module; the state dict
        # holds the reference and rows as extra state (`get_extra_state`).
        self.reference = reference
        self.rows = index
        # Derived at registration (`right_inverse`), when the row count is known, so not saved:
        # `free_rows`, the complement of `rows`; `slot[r]`, row r's place in [reference; free].
        self.free_rows: Tensor | None = None
        self.slot: Tensor | None = None
        # `grad_row[r]`: where the lookup backward sends row r's gradient (see `_Lookup`), and
        # how many spare rows that uses.
        self.grad_row: Tensor | None = None
        self.spare = 1
        # The one buffer holding [reference; free] once registered (see `_join`), or None.
        self._joined_buffer: Tensor | None = None

    @property
    def reference_is_parameter(self) -> bool:
        """Whether the reference is held as a frozen parameter (see `hold_reference_as_parameter`)."""
        return "reference" in self._parameters

    @torch.no_grad()
    def hold_reference_as_parameter(self) -> None:
        """Hold the reference as a frozen parameter (``requires_grad=False``), for FSDP2.

        ``fully_shard`` shards the parameters it finds, so a reference held this way is
        sharded with the free rows: each rank keeps ``1 / world_size`` of it at rest, and
        FSDP2 gathers it with them for the forward (its all-gather carries the fixed rows, as it
        would an unconstrained weight's; its reduce-scatter carries the free rows' gradients
        only). It gets no gradient, so no optimizer changes it. The reference leaves the
        block ``[reference; free]`` (FSDP2 keeps the two in storage of its own anyway). Call it
        after registration and before ``fully_shard``; once is enough, a second call does
        nothing.
        """
        if self.reference_is_parameter:
            return
        reference = self.reference.clone(memory_format=torch.contiguous_format)
        self._joined_buffer = None
        del self.reference
        self.register_parameter("reference", nn.Parameter(reference, requires_grad=False))

    @torch.no_grad()
    def reset_reference(
        self, reference: Tensor, rows: Tensor | Sequence[int] | None = None
    ) -> None:
        """Copy ``reference`` into the fixed rows again, in the dtype they have now.

        A dtype conversion of the module converts the fixed rows with it (see the class
        docstring): after ``.double()`` of a module constrained in float32 they hold the
        float32-rounded reference. This puts the exact values back: ``reference`` rounded
        once to the current dtype. A reference held as a parameter (FSDP2, see
        `hold_reference_as_parameter`) is converted with the parameters and left as it is;
        its values are still checked.

        Args:
            reference (Tensor): the fixed rows' values, as given to the constructor.
            rows (Tensor or sequence of int, optional): their positions, as given to the
                constructor (in any order, ``reference``'s). Default: ``None``, the first rows.

        Raises:
            ValueError: ``rows`` are not the constraint's fixed rows, ``reference`` has
                another shape, or a value is NaN or Inf or too large for the current dtype.
                Nothing is copied.
        """
        index, ordered, _ = _sorted_by_row(reference.detach(), rows)
        mine = self.rows
        if (index is None) != (mine is None) or (
            index is not None and mine is not None and not torch.equal(index, mine.cpu())
        ):
            raise ValueError(
                "Expected `rows` to be the constraint's fixed rows "
                f"{self.fixed_row_indices().tolist()[:10]}. Got other rows."
            )
        if ordered.shape != self.reference.shape:
            raise ValueError(
                f"Expected `reference` of shape {tuple(self.reference.shape)}. "
                f"Got {tuple(ordered.shape)}."
            )
        extremes = _extremes(reference)
        _check_finite(  # in the order given: the rows the message names are the caller's
            reference,
            extremes,
            self.reference.dtype,
            "the dtype of the fixed rows now (the run's dtype, in a Lightning fit)",
        )
        if not self.reference_is_parameter:
            self.reference.copy_(ordered)
        self._extremes = extremes

    @property
    def num_fixed(self) -> int:
        """Number of fixed rows."""
        return self.reference.shape[0]

    def fixed_row_indices(self) -> Tensor:
        """Return the positions of the fixed rows (int64, on the reference's device)."""
        if self.rows is None:
            return torch.arange(self.num_fixed, device=self.reference.device)
        return self.rows

    def check_compatible(
        self, tensor: Tensor, *, argument: str = "reference", tensor_name: str = "the tensor"
    ) -> None:
        """Raise if ``tensor`` cannot be constrained by these rows; change nothing.

        ``argument`` and ``tensor_name`` say in the messages what the caller's user called
        the reference and the tensor (``"constraint"``, ``"`target.weight`"``).

        Raises:
            TypeError: ``tensor`` is not floating-point, or is a sharded ``DTensor`` (FSDP2
                ran first).
            ValueError: the trailing shape differs, ``tensor`` has fewer rows than the
                reference, a fixed row lies past its last row, or a reference value overflows
                ``tensor``'s dtype.
        """
        if tensor.dim() == 0:
            raise ValueError("Expected a tensor with a row dimension. Got a 0-d tensor.")
        if _is_dtensor(tensor):
            raise TypeError(
                "Expected a tensor that is not sharded. Got a DTensor (placements "
                f"{tuple(tensor.placements)}): fully_shard (FSDP2) or tensor parallelism ran "
                "before the constraint, so this rank holds a shard, not the rows to fix. Fix "
                "the rows first, then shard: fix_rows(...) before fully_shard(...) (in "
                "Lightning, EmbeddingConstraint registers in setup, before configure_model)."
            )
        if not tensor.is_floating_point():
            raise TypeError(
                "Expected a floating-point tensor to constrain. Got a tensor of dtype "
                f"{tensor.dtype}: it could not hold the reference's values exactly."
            )
        if tensor.shape[1:] != self.reference.shape[1:]:
            expected = ", ".join(["k", *map(str, tensor.shape[1:])])
            raise ValueError(
                f"Expected `{argument}` to have rows of shape {tuple(tensor.shape[1:])} (a "
                f"reference of shape ({expected})), as {tensor_name} of shape "
                f"{tuple(tensor.shape)} has. Got a reference of shape "
                f"{tuple(self.reference.shape)}."
            )
        if self.num_fixed > tensor.shape[0]:
            raise ValueError(
                f"Expected `{argument}` to have at most as many rows as {tensor_name} of shape "
                f"{tuple(tensor.shape)}. Got {self.num_fixed} rows in `{argument}` and "
                f"{tensor.shape[0]} in {tensor_name}."
            )
        if self.rows is not None and int(self.rows.max()) >= tensor.shape[0]:
            raise ValueError(
                f"Expected `rows` below {tensor.shape[0]}, the row count of {tensor_name} of "
                f"shape {tuple(tensor.shape)}. Got row {int(self.rows.max())}."
            )
        _check_finite(
            self.reference,
            self._extremes,
            tensor.dtype,
            f"the dtype of {tensor_name}",
            argument=argument,
        )

    def forward(self, free: Tensor) -> Tensor:
        """Return the full tensor: reference rows at their positions, ``free`` elsewhere.

        For a ``DTensor`` of free rows (FSDP2 outside the module's forward), a ``DTensor`` of
        the full tensor with ``free``'s mesh and placements: what the unconstrained parameter
        would be.
        """
        if _is_dtensor(free):
            return self._forward_sharded(free)
        return self._read(free)

    def reference_for(self, free: Tensor) -> Tensor:
        """The reference as a read of ``free`` takes it: whole, in ``free``'s dtype.

        FSDP2 with a mixed-precision policy gathers the free rows in its ``param_dtype``
        (bfloat16, say), as it would an unconstrained weight; a reference it does not manage
        (not `hold_reference_as_parameter`) is cast alike for the forward, and stays exact.
        """
        reference = self.reference
        if free.is_meta:  # shapes only (see `_apply`); nothing gathered
            return torch.empty(reference.shape, dtype=free.dtype, device="meta")
        if _is_dtensor(reference):  # sharded alone (free rows in another FSDP2 group)
            reference = gathered(reference)
        return reference if reference.dtype == free.dtype else reference.to(free.dtype)

    def _read(self, free: Tensor) -> Tensor:
        """The plain read of unsharded ``free`` rows."""
        reference = self.reference_for(free)
        if self.rows is None:
            return torch.cat((reference, free))
        if self.free_rows is None or self.slot is None:
            raise RuntimeError(
                "FixedRows has not been registered: its free rows are not known yet."
            )
        if composable_only(free):
            return torch.cat((reference, free)).index_select(0, self.slot.to(free.device))
        out: Tensor = _ScatterRows.apply(  # type: ignore[no-untyped-call]
            free, reference, self.rows, self.free_rows, self.joined(free), self.slot
        )
        return out

    def _forward_sharded(self, free: DTensor) -> Tensor:
        """`forward` for free rows sharded by FSDP2: gather them, read, shard the result.

        A read outside the forward (a state dict, an evaluation between steps) needs the
        rows of the weight's shard on this rank, which in general lie in other ranks' shards
        of the free rows: it pays one all-gather of them, and first one all-reduce of a flag
        (`meta_on_some_rank`). Where a rank holds its shard on the meta device, every rank
        reads a meta ``DTensor`` of the weight's shape and layout instead, and gathers
        nothing. The steps are differentiable: a gradient reaches the free rows' shards.
        """
        self._release_if_left(free)
        if meta_on_some_rank(free):
            shapes = torch.empty(free.shape, dtype=free.dtype, device="meta")
            return shard_like(self._read(shapes), free)
        return shard_like(self._read(free.full_tensor()), free)

    @_keeps_state
    def right_inverse(self, tensor: Tensor) -> Tensor:
        """Return the free rows of ``tensor``, the part that is stored and trained.

        Called by ``register_parametrization`` and when the tensor is assigned. Converts the
        reference to ``tensor``'s dtype and device, and puts it and the returned free rows
        into one new buffer, ``[reference; free]``.
        """
        self.check_compatible(tensor)
        if tensor.is_meta:
            return self._meta_free_rows(tensor)
        if self.rows is None:
            free = self._join(tensor[self.num_fixed :])
        else:
            self.rows = self.rows.to(tensor.device)
            self._derive_layout(tensor.shape[0])
            assert self.free_rows is not None
            free = self._join(tensor, self.free_rows)
        self._derive_grad_rows(tensor.shape[0])
        return free

    @_keeps_state
    def _meta_free_rows(self, tensor: Tensor) -> Tensor:
        """`right_inverse` of a tensor on the meta device (a model built there, as torchtitan
        and Lightning's ``init_module(empty_init=True)`` build one): free rows of its shape
        there, the reference and the tables kept with their values where they are, as for a
        constrained module moved to the meta device. ``to_empty()`` then moves them to the
        module's device and joins them with the free rows (`rejoin`), which the module's own
        initialisation and a checkpoint then fill."""
        total = tensor.shape[0]
        self.reference = self.reference.to(dtype=tensor.dtype)
        self._joined_buffer = None
        if self.rows is not None:
            self._derive_layout(total)
        self._derive_grad_rows(total)
        return tensor.new_empty((total - self.num_fixed, *tensor.shape[1:]))

    @_keeps_state
    def _join(self, free: Tensor, rows: Tensor | None = None) -> Tensor:
        """Copy the reference and ``free`` (its ``rows`` if given) into one new buffer.

        The buffer takes ``free``'s dtype and device (the reference is converted on the way),
        and lies in shared memory if ``free`` does (``share_memory()``: processes that train
        one model together keep doing so); the reference buffer becomes its first part, and
        the free part is returned. The caller makes the stored parameter that view (torch's
        ``set_``), which keeps the Parameter object.
        """
        if self.reference_is_parameter:  # FSDP2 shards it on its own: no shared buffer
            return free.clone() if rows is None else free.index_select(0, rows)
        count = free.shape[0] if rows is None else rows.numel()
        buffer = free.new_empty((self.num_fixed + count, *free.shape[1:]))
        if free.device.type == "cpu" and free.is_shared():  # type: ignore[no-untyped-call]
            buffer.share_memory_()  # type: ignore[no-untyped-call]  # untyped in torch
        buffer[: self.num_fixed] = self.reference
        if rows is None:
            buffer[self.num_fixed :] = free
        else:
            torch.index_select(free, 0, rows, out=buffer[self.num_fixed :])
        self.reference = buffer[: self.num_fixed]
        self._joined_buffer = buffer
        return buffer[self.num_fixed :]

    def joined(self, free: Tensor) -> Tensor | None:
        """Return ``[reference; free]`` as one tensor if the two share one buffer, else None.

        The rows are in slot order (reference rows, then free rows), not the weight's order
        when the fixed rows are scattered. No copy is made. Under torch.compile, which cannot
        see storage pointers, this is always None.
        """
        if torch.compiler.is_compiling() or _is_dtensor(free):
            return None
        self._release_if_left(free)
        buffer = self._joined_buffer
        if buffer is None:
            return None
        reference = self.reference
        # `buffer` keeps its memory allocated, so a tensor at these addresses lies in it.
        if (
            free.data_ptr() != buffer.data_ptr() + reference.numel() * buffer.element_size()
            or reference.shape[0] + free.shape[0] != buffer.shape[0]
            or free.shape[1:] != buffer.shape[1:]
            or free.dtype != buffer.dtype
            or free.device != buffer.device
            or not (free.is_contiguous() and reference.is_contiguous())
        ):
            return None
        return buffer

    def _release_if_left(self, free: Tensor | None = None) -> None:
        """Let the joined buffer go if the reference, or the stored ``free`` rows, no longer
        lie in it.

        When the stored rows have left it (FSDP2 keeps them in storage of its own, as does an
        assignment of ``.data``), the buffer would hold the whole weight's memory for the
        reference alone: the reference gets a compact copy, and the buffer goes. The stored
        rows are a Parameter; a plain tensor read in their place (``functional_call`` with
        other values) is a read of those values, after which the stored rows are back: the
        buffer stays.
        """
        buffer = self._joined_buffer
        if buffer is None:
            return
        if (
            self.reference.data_ptr() != buffer.data_ptr()
            or self.reference.shape[1:] != buffer.shape[1:]
        ):
            self._joined_buffer = None
        elif free is not None and (
            _is_dtensor(free)
            or (
                isinstance(free, nn.Parameter)
                and free.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
            )
        ):
            self._compact_reference()

    @_keeps_state
    def _compact_reference(self) -> None:
        """Give the reference memory of its own and let the joined buffer go."""
        self.reference = self.reference.clone(memory_format=torch.contiguous_format)
        self._joined_buffer = None

    def _apply(self, fn: Any, recurse: bool = True) -> FixedRows:
        """Move the reference and the index tables where ``fn`` sends a tensor like them, with
        their values.

        ``fn`` is what ``.to()``, ``.cuda()``, ``.double()``, ``to_empty()`` and the like apply
        to every tensor of a module. Only where it sends one is taken from it, by applying it
        to an empty tensor like the reference: ``to_empty`` would give the fixed rows
        uninitialised memory, and the meta device has no memory at all, so the reference and
        the tables stay where they are for it (a read on the meta device gives meta tensors;
        a later ``to_empty`` brings them back, exact). A reference held as a parameter (FSDP2,
        `hold_reference_as_parameter`) is moved the same way, and stays the same Parameter.

        Raises:
            ValueError: a reference value would be infinite in the dtype ``fn`` converts to
                (``.half()`` of a reference past 65504). Nothing is converted: the module's
                children are converted before its own tensors, so this comes first.
        """
        # Asked of an empty tensor: no values are touched, and a sharded reference (a DTensor)
        # is not sliced, which could take a collective.
        probe = torch.empty(0, dtype=self.reference.dtype, device=self.reference.device)
        target = fn(probe)
        if target.dtype != self.reference.dtype and target.dtype.is_floating_point:
            _check_finite(
                self.reference,
                self._extremes,
                target.dtype,
                "the dtype the module is being converted to (the run's dtype, in a Lightning "
                "fit); the module is left as it was",
            )
        # A reference held as a parameter follows the same rule: it is the one copy of the
        # fixed rows, which no checkpoint restores (accelerate's cpu_ram_efficient_loading moves
        # the model to the meta device, then loads the plain weights).
        held = self._parameters.pop("reference") if self.reference_is_parameter else None
        try:
            super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # untyped in torch
        finally:
            if held is not None:
                self._parameters["reference"] = held
        if target.device.type != "meta":
            if held is not None:
                self._apply_to_held(fn, held)
            else:
                self.reference = self.reference.to(device=target.device, dtype=target.dtype)
            for name in ("rows", "free_rows", "slot"):
                table = getattr(self, name)
                if table is not None:
                    setattr(self, name, table.to(target.device))
        self._release_if_left()  # `.to()` may have moved the reference out of the buffer
        if self.grad_row is not None:  # the spare rows suit the device: derive them anew
            self._derive_grad_rows(self.grad_row.numel())
        return self

    @torch.no_grad()
    def _apply_to_held(self, fn: Any, held: nn.Parameter) -> None:
        """``fn`` on a reference held as a parameter, its values kept: what ``fn`` gives (the
        device, the dtype, shared or pinned memory), filled with the reference's values, which
        ``to_empty`` would leave uninitialised. The same Parameter object, as torch's own
        conversion keeps it."""
        source = held.detach()
        moved = fn(source)
        if moved is not source:  # a new tensor (`share_memory_` works in place)
            moved.copy_(source.to(device=moved.device, dtype=moved.dtype))
            held.data = moved

    @torch.no_grad()
    def rejoin(self, free: Tensor) -> None:
        """Put the reference and the stored ``free`` rows back into one buffer, if apart.

        `fix_rows` calls this after the module's ``.to()``, ``.double()`` and the like and
        after ``deepcopy``, which move or copy the two separately. ``free`` (the stored
        Parameter) stays the same object, so optimizers keep training it; its values and the
        reference's are unchanged. Does nothing if they already share a buffer, if either has
        no rows, or if they live on different devices or in different dtypes.
        """
        if (
            not _is_dtensor(free)  # FSDP2's: it keeps its shards where it wants them
            and not self.reference_is_parameter
            and self.joined(free) is None
            and self.num_fixed
            and free.shape[0]
            and free.device == self.reference.device
            and free.dtype == self.reference.dtype
            and free.shape[1:] == self.reference.shape[1:]
        ):
            free.set_(self._join(free))  # type: ignore[call-overload]

    @_keeps_state
    def _derive_layout(self, total: int) -> None:
        """Set ``free_rows`` and ``slot`` from ``rows`` for a tensor of ``total`` rows."""
        assert self.rows is not None
        device = self.rows.device
        keep = torch.ones(total, dtype=torch.bool, device=device)
        keep[self.rows] = False
        self.free_rows = keep.nonzero().flatten()
        slot = torch.empty(total, dtype=torch.int64, device=device)
        slot[self.rows] = torch.arange(self.num_fixed, device=device)
        slot[self.free_rows] = torch.arange(self.num_fixed, total, device=device)
        self.slot = slot

    @_keeps_state
    def _derive_grad_rows(self, total: int) -> None:
        """Set ``grad_row`` from ``slot`` for a tensor of ``total`` rows (see `_Lookup`)."""
        fixed, device = self.num_fixed, self.reference.device
        slot = torch.arange(total, device=device) if self.slot is None else self.slot
        self.spare = _spare_rows(device, fixed)
        self.grad_row = torch.where(slot < fixed, total - fixed + slot % self.spare, slot - fixed)

    def places(self, ids: Tensor) -> Tensor | None:
        """Return each of ``ids``' place in ``[reference; free]``; None for a prefix (an id is
        its own place).

        The ids are looked up in the table of places with ``F.embedding``, so ids that a plain
        lookup rejects (negative, too large, not int64/int32) fail here with its error, where
        Python-style indexing would wrap negative ids or read bool ids as masks.
        """
        if self.slot is None:
            return None
        return nn.functional.embedding(ids, self.slot.unsqueeze(1)).squeeze(-1)

    def gradient_rows(self, free: Tensor) -> Tensor:
        """Return ``grad_row`` for a tensor of ``free``'s free rows, derived if out of date."""
        total = self.num_fixed + free.shape[0]
        if self.grad_row is None or self.grad_row.numel() != total:
            # Registration, `.to()` and loading derive it; an assignment of another shape
            # to the stored rows (`load_state_dict(assign=True)`, say) would not.
            self._derive_grad_rows(total)
        assert self.grad_row is not None
        return self.grad_row

    def get_extra_state(self) -> dict[str, Tensor | None]:
        """The reference and the fixed rows' positions, for ``state_dict()``."""
        return {"reference": self.reference, "rows": self.rows}

    @_keeps_state
    def set_extra_state(self, state: Any) -> None:
        """Load a reference and positions saved by `get_extra_state` (torch's own format).

        The reference is copied in place (it stays in the block ``[reference; free]``); other
        positions for the same number of rows re-derive the layout.
        """
        reference, rows = state["reference"], state["rows"]
        if reference is self.reference and rows is self.rows:  # our own, given back
            return
        if not isinstance(reference, Tensor) or reference.shape != self.reference.shape:
            got = tuple(reference.shape) if isinstance(reference, Tensor) else reference
            raise ValueError(
                f"Expected a saved reference of shape {tuple(self.reference.shape)}. Got {got}."
            )
        if reference.is_meta or self.reference.is_meta:  # shapes only: no values to take
            return
        self.reference.copy_(reference)
        self._extremes = _extremes(self.reference)
        same_rows = (rows is None and self.rows is None) or (
            rows is not None and self.rows is not None and torch.equal(rows.cpu(), self.rows.cpu())
        )
        if same_rows or self.grad_row is None:
            self.rows = None if rows is None else rows.to(self.reference.device)
            return
        total = self.grad_row.numel()
        self.rows = None if rows is None else rows.to(self.reference.device)
        self.free_rows = self.slot = None
        if self.rows is not None:
            self._derive_layout(total)
        self._derive_grad_rows(total)

    def extra_repr(self) -> str:
        where = "prefix" if self.rows is None else "rows"
        return f"fixed={self.num_fixed} ({where}), trailing_shape={tuple(self.reference.shape[1:])}"
