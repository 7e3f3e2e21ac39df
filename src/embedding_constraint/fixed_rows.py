"""The `FixedRows` parametrization: some rows of a tensor held at reference values.

The stored tensor (``parametrizations.<name>.original``) holds only the free rows, so an
optimizer never sees, decays or keeps state for the fixed ones. Reading the parametrized
tensor puts the reference rows and the free rows together.

Both live in one buffer, ``[reference; free]``: the reference buffer and the stored parameter
are its two parts (views). A lookup then gathers from the whole buffer at once. Whatever
separates them (assigning ``.data``, ``load_state_dict(assign=True)``, a ``.to()`` that
`fix_rows` did not see) costs speed, never correctness: the lookup then gathers from each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from embedding_constraint.reads import _Bag, _Linear, _Lookup, _ScatterRows

__all__ = ["FixedRows"]


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


class FixedRows(nn.Module):
    r"""Hold rows of a tensor at reference values while the other rows train.

    Register it with `torch.nn.utils.parametrize.register_parametrization`. The
    stored parameter then holds only the free rows; reading the tensor returns the
    reference rows at their positions and the free rows everywhere else
    (``cat(reference, free)`` when the fixed rows are a prefix).

    The reference is copied into a buffer, so later changes to the caller's tensor change
    nothing, and it follows ``.to(device/dtype)`` with the module. At registration the
    reference and the free rows are put into one block of memory, ``[reference; free]``, so
    that `lookup`, `bag` and `linear` read the weight without assembling it (see `rejoin`). When registered, it is
    converted to the dtype and device of the tensor it constrains: in a lower precision
    than the reference (bfloat16, say), the fixed rows are the rounded reference.

    Args:
        reference (Tensor): the fixed rows' values, shape ``(k, *trailing)``, where
            ``trailing`` is the constrained tensor's shape after the row dimension.
        rows (Tensor or sequence of int, optional): the positions of the fixed rows, one per
            reference row: ``weight[rows[i]]`` is held at ``reference[i]``. Default: ``None``,
            the first ``k`` rows.

    Raises:
        TypeError: ``reference`` is not a floating-point tensor, or ``rows`` does not hold
            integers.
        ValueError: ``reference`` is 0-d or holds NaN or Inf; ``rows`` is not 1-D, has a
            different count than ``reference``, is negative or has duplicates. When
            registered: the tensor has another trailing shape, fewer rows than ``reference``
            or fewer than ``max(rows) + 1`` rows.

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

    reference: Tensor
    rows: Tensor | None
    free_rows: Tensor | None
    slot: Tensor | None
    grad_row: Tensor | None

    def __init__(self, reference: Tensor, rows: Tensor | Sequence[int] | None = None) -> None:
        self._init(reference, rows, copy=True)

    @classmethod
    def _borrowing(cls, reference: Tensor, rows: Tensor | Sequence[int] | None = None) -> FixedRows:
        """Like the constructor, but keep ``reference`` itself until registration copies it.

        For callers that register at once (`fix_rows`): registration copies the reference
        into the block ``[reference; free]`` anyway, so a private copy made before it would
        only raise the peak memory of registering.
        """
        constraint = cls.__new__(cls)
        constraint._init(reference, rows, copy=False)
        return constraint

    def _init(self, reference: Tensor, rows: Tensor | Sequence[int] | None, copy: bool) -> None:
        super().__init__()
        if not isinstance(reference, Tensor):
            raise TypeError(
                f"Expected `reference` to be a torch.Tensor. Got {type(reference).__name__}."
            )
        if not reference.is_floating_point():
            raise TypeError(
                "Expected `reference` to be a floating-point tensor. "
                f"Got a tensor of dtype {reference.dtype}."
            )
        if reference.dim() == 0:
            raise ValueError("Expected `reference` to have a row dimension. Got a 0-d tensor.")
        # Two reductions (NaN propagates through both) rather than a mask of the whole tensor.
        extremes = torch.stack((reference.amax(), reference.amin())) if reference.numel() else None
        if extremes is not None and not bool(torch.isfinite(extremes).all()):
            finite = torch.isfinite(reference)
            bad = (~finite).reshape(reference.shape[0], -1).any(dim=1).nonzero().flatten()
            raise ValueError(
                "Expected `reference` to be finite. "
                f"Got NaN or Inf in reference rows {bad.tolist()}."
            )
        index = None if rows is None else _as_rows(rows, reference.shape[0])
        reference = reference.detach()
        copied = False
        if index is not None:
            # Sorted rows make the prefix case recognisable and the layout canonical.
            index, order = torch.sort(index)
            if not torch.equal(order, torch.arange(order.numel())):
                reference, copied = reference[order.to(reference.device)], True
            if torch.equal(index, torch.arange(index.numel())):
                index = None
        if copy and not copied:  # one private copy, however the rows came
            reference = reference.clone(memory_format=torch.contiguous_format)
        self.register_buffer("reference", reference)
        self.register_buffer("rows", index)
        # Derived at registration (`right_inverse`), when the row count is known, so not saved:
        # `free_rows`, the complement of `rows`; `slot[r]`, row r's place in [reference; free].
        self.register_buffer("free_rows", None, persistent=False)
        self.register_buffer("slot", None, persistent=False)
        # `grad_row[r]`: where the lookup backward sends row r's gradient (see `_Lookup`), and
        # how many spare rows that uses.
        self.register_buffer("grad_row", None, persistent=False)
        self._spare = 1
        # The one buffer holding [reference; free] once registered (see `_join`), or None.
        self._joined_buffer: Tensor | None = None

    @property
    def num_fixed(self) -> int:
        """Number of fixed rows."""
        return self.reference.shape[0]

    def fixed_row_indices(self) -> Tensor:
        """Return the positions of the fixed rows (int64, on the reference's device)."""
        if self.rows is None:
            return torch.arange(self.num_fixed, device=self.reference.device)
        return self.rows

    def check_compatible(self, tensor: Tensor) -> None:
        """Raise if ``tensor`` cannot be constrained by these rows; change nothing.

        Raises:
            ValueError: the trailing shape differs, ``tensor`` has fewer rows than the
                reference, or a fixed row lies past its last row.
        """
        if tensor.dim() == 0:
            raise ValueError("Expected a tensor with a row dimension. Got a 0-d tensor.")
        if tensor.shape[1:] != self.reference.shape[1:]:
            expected = ", ".join(["k", *map(str, tensor.shape[1:])])
            raise ValueError(
                f"Expected a reference of shape ({expected}) for a tensor of shape "
                f"{tuple(tensor.shape)}. Got a reference of shape {tuple(self.reference.shape)}."
            )
        if self.num_fixed > tensor.shape[0]:
            raise ValueError(
                f"Expected at most {tensor.shape[0]} reference rows for a tensor of shape "
                f"{tuple(tensor.shape)}. Got {self.num_fixed}."
            )
        if self.rows is not None and int(self.rows.max()) >= tensor.shape[0]:
            raise ValueError(
                f"Expected `rows` below {tensor.shape[0]}, the row count of a tensor of shape "
                f"{tuple(tensor.shape)}. Got row {int(self.rows.max())}."
            )

    def forward(self, free: Tensor) -> Tensor:
        """Return the full tensor: reference rows at their positions, ``free`` elsewhere."""
        if self.rows is None:
            return torch.cat((self.reference, free))
        if self.free_rows is None:
            raise RuntimeError(
                "FixedRows has not been registered: its free rows are not known yet."
            )
        out: Tensor = _ScatterRows.apply(  # type: ignore[no-untyped-call]
            free, self.reference, self.rows, self.free_rows
        )
        return out

    @torch.no_grad()
    def right_inverse(self, tensor: Tensor) -> Tensor:
        """Return the free rows of ``tensor``, the part that is stored and trained.

        Called by ``register_parametrization`` and when the tensor is assigned. Converts the
        reference to ``tensor``'s dtype and device, and puts it and the returned free rows
        into one new buffer, ``[reference; free]``.
        """
        self.check_compatible(tensor)
        if self.rows is None:
            free = self._join(tensor[self.num_fixed :])
        else:
            self.rows = self.rows.to(tensor.device)
            self._derive_layout(tensor.shape[0])
            assert self.free_rows is not None
            free = self._join(tensor, self.free_rows)
        self._derive_grad_rows(tensor.shape[0])
        return free

    def _join(self, free: Tensor, rows: Tensor | None = None) -> Tensor:
        """Copy the reference and ``free`` (its ``rows`` if given) into one new buffer.

        The buffer takes ``free``'s dtype and device (the reference is converted on the way)
        and the reference buffer becomes its first part; the free part is returned. The caller
        makes the stored parameter that view (torch's ``set_``), which keeps the Parameter
        object.
        """
        count = free.shape[0] if rows is None else rows.numel()
        buffer = free.new_empty((self.num_fixed + count, *free.shape[1:]))
        buffer[: self.num_fixed] = self.reference
        if rows is None:
            buffer[self.num_fixed :] = free
        else:
            torch.index_select(free, 0, rows, out=buffer[self.num_fixed :])
        self.reference = buffer[: self.num_fixed]
        self._joined_buffer = buffer
        return buffer[self.num_fixed :]

    def _joined(self, free: Tensor) -> Tensor | None:
        """Return ``[reference; free]`` as one tensor if the two share one buffer, else None.

        The rows are in slot order (reference rows, then free rows), not the weight's order
        when the fixed rows are scattered. No copy is made. Under torch.compile, which cannot
        see storage pointers, this is always None.
        """
        if torch.compiler.is_compiling():
            return None
        self._release_if_left()
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

    def _release_if_left(self) -> None:
        """Let the joined buffer go if the reference no longer lies in it."""
        buffer = self._joined_buffer
        if buffer is not None and (
            self.reference.data_ptr() != buffer.data_ptr()
            or self.reference.shape[1:] != buffer.shape[1:]
        ):
            self._joined_buffer = None

    def _apply(self, fn: Any, recurse: bool = True) -> FixedRows:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # untyped in torch
        self._release_if_left()  # `.to()` may have moved the reference out of the buffer
        if self.grad_row is not None:  # the spare rows suit the device: derive them anew
            self._derive_grad_rows(self.grad_row.numel())
        return self

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
            self._joined(free) is None
            and self.num_fixed
            and free.shape[0]
            and free.device == self.reference.device
            and free.dtype == self.reference.dtype
            and free.shape[1:] == self.reference.shape[1:]
        ):
            free.set_(self._join(free))  # type: ignore[call-overload]

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

    def _derive_grad_rows(self, total: int) -> None:
        """Set ``grad_row`` from ``slot`` for a tensor of ``total`` rows (see `_Lookup`)."""
        fixed, device = self.num_fixed, self.reference.device
        slot = torch.arange(total, device=device) if self.slot is None else self.slot
        self._spare = _spare_rows(device, fixed)
        self.grad_row = torch.where(slot < fixed, total - fixed + slot % self._spare, slot - fixed)

    def _grad_rows(self, free: Tensor) -> Tensor:
        """Return ``grad_row`` for a tensor of ``free``'s free rows, derived if out of date."""
        total = self.num_fixed + free.shape[0]
        if self.grad_row is None or self.grad_row.numel() != total:
            # Registration, `.to()` and loading derive it; an assignment of another shape
            # to the stored rows (`load_state_dict(assign=True)`, say) would not.
            self._derive_grad_rows(total)
        assert self.grad_row is not None
        return self.grad_row

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # A state dict in the parametrization's own format may bring other `rows` (with their
        # reference and free rows): derive the layout from what was loaded.
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._release_if_left()  # `assign=True` replaces the reference
        if self.rows is not None and self.free_rows is not None:
            self._derive_layout(self.num_fixed + self.free_rows.numel())
        if self.grad_row is not None:
            self._derive_grad_rows(self.grad_row.numel())

    def lookup(
        self,
        indices: Tensor,
        free: Tensor,
        padding_idx: int | None = None,
        scale_grad_by_freq: bool = False,
    ) -> Tensor:
        """Return ``F.embedding(indices, weight)`` without building the weight.

        Fixed rows are gathered from the reference, free rows from ``free``; the gradient
        reaches only the free rows that ``indices`` names, so the cost of a lookup and its
        backward follows the batch and the number of free rows, not the vocabulary.
        ``fix_rows`` makes a constrained ``nn.Embedding`` look up through this.

        Args:
            indices (Tensor): row indices, any shape.
            free (Tensor): the stored free rows (``parametrizations.weight.original``).
            padding_idx (int, optional): a row whose lookups get no gradient, as in
                ``nn.Embedding``. Default: ``None``.
            scale_grad_by_freq (bool, optional): scale each free row's gradient by the inverse
                of its frequency in ``indices``, as in ``nn.Embedding``. Default: ``False``.

        Returns:
            Tensor: shape ``(*indices.shape, *trailing)``.
        """
        if not free.shape[0]:
            # Nothing to train; read the weight so the result still depends on `free`.
            return nn.functional.embedding(indices, self(free), padding_idx)
        if not self.num_fixed:
            # Nothing fixed: exactly the plain lookup, at the plain lookup's cost.
            return nn.functional.embedding(
                indices, free, padding_idx, scale_grad_by_freq=scale_grad_by_freq
            )
        grad_row = self._grad_rows(free)
        # For a prefix, an index is its own slot (passed as None: autograd.Function inputs
        # must be distinct tensors for torch.compile).
        slot = None if self.slot is None else self.slot[indices]
        out: Tensor = _Lookup.apply(  # type: ignore[no-untyped-call]
            free,
            self.reference,
            self._joined(free),
            indices,
            slot,
            grad_row,
            self._spare,
            padding_idx,
            scale_grad_by_freq,
        )
        return out

    def bag(
        self,
        input: Tensor,
        free: Tensor,
        offsets: Tensor | None = None,
        *,
        mode: str = "mean",
        per_sample_weights: Tensor | None = None,
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        scale_grad_by_freq: bool = False,
    ) -> Tensor:
        """Return ``F.embedding_bag(input, weight, offsets, ...)`` without building the weight.

        For ``mode="sum"`` and ``"mean"``, the bags are reduced from the block that holds the
        reference and the free rows, and the gradient reaches only the free rows that the bags
        name, as in `lookup`. ``mode="max"``, a reference and free rows that are apart (see
        `rejoin`) and torch.compile read the weight. ``fix_rows`` makes a constrained
        ``nn.EmbeddingBag`` reduce its bags through this. The arguments are those of
        ``nn.functional.embedding_bag``.

        Args:
            input (Tensor): row indices, 1-D with ``offsets`` or 2-D (bags of equal size).
            free (Tensor): the stored free rows (``parametrizations.weight.original``).
            offsets (Tensor, optional): where each bag starts in a 1-D ``input``.
            mode (str, optional): ``"sum"``, ``"mean"`` or ``"max"``. Default: ``"mean"``.
            per_sample_weights (Tensor, optional): a weight per index (``"sum"`` only).
            include_last_offset (bool, optional): ``offsets`` ends with the input's length.
            padding_idx (int, optional): a row whose lookups count for nothing.
            scale_grad_by_freq (bool, optional): scale gradients by the inverse frequency of
                their row in ``input``.

        Returns:
            Tensor: shape ``(bags, *trailing)``.
        """
        joined = None
        if self.num_fixed and free.shape[0] and mode != "max":
            joined = self._joined(free)
        if joined is None:
            weight = self(free) if self.num_fixed else free
            return nn.functional.embedding_bag(
                input,
                weight,
                offsets,
                mode=mode,
                per_sample_weights=per_sample_weights,
                include_last_offset=include_last_offset,
                padding_idx=padding_idx,
                scale_grad_by_freq=scale_grad_by_freq,
            )
        grad_row = self._grad_rows(free)
        if padding_idx is not None and padding_idx < 0:
            padding_idx += grad_row.numel()
        # Target rows: the free rows, one row for padding lookups, then the spare rows.
        free_rows = free.shape[0]
        target_input = grad_row[input]
        target_input = target_input + (target_input >= free_rows)
        target_padding = None
        if padding_idx is not None:
            target_input = target_input.masked_fill(input == padding_idx, free_rows)
            target_padding = free_rows
        slot_input = input if self.slot is None else self.slot[input].to(input.dtype)
        # (For scattered rows, reading the padding row's slot is a device sync on a GPU.)
        slot_padding = None if padding_idx is None else self._slot_of(padding_idx)
        options = (
            mode,
            include_last_offset,
            slot_padding,
            target_padding,
            scale_grad_by_freq,
            free_rows + 1 + self._spare,
        )
        out: Tensor = _Bag.apply(  # type: ignore[no-untyped-call]
            free,
            joined,
            slot_input,
            target_input.to(input.dtype),
            offsets,
            per_sample_weights,
            options,
        )
        return out

    def _slot_of(self, row: int) -> int:
        """Return ``row``'s place in ``[reference; free]``."""
        return row if self.slot is None else int(self.slot[row])

    def linear(self, input: Tensor, free: Tensor, bias: Tensor | None = None) -> Tensor:
        """Return ``F.linear(input, weight, bias)`` without building the weight.

        For fixed rows that are a prefix, the weight is ``[reference; free]``: it is read in
        place from the buffer that holds both, and the weight gradient is computed for the free
        rows only (a plain layer computes it for every row, then the parametrization drops the
        fixed ones). If the two are apart (see `rejoin`) or under torch.compile, the output
        features of fixed rows come from the reference and those of free rows from ``free``,
        side by side. Scattered rows read the weight. ``fix_rows`` makes a constrained
        ``nn.Linear`` compute its output through this.

        Args:
            input (Tensor): shape ``(*, in_features)``.
            free (Tensor): the stored free rows (``parametrizations.weight.original``).
            bias (Tensor, optional): added to the output. Default: ``None``.

        Returns:
            Tensor: shape ``(*, out_features)``.
        """
        if not self.num_fixed:
            return nn.functional.linear(input, free, bias)
        if not free.shape[0] or self.rows is not None:
            # Scattered rows would need the output's features reordered, a copy as large as
            # the output and dearer than the weight gradient saved: read the weight instead.
            return nn.functional.linear(input, self(free), bias)
        joined = self._joined(free)
        if joined is not None:  # the weight, in place
            device = input.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            out: Tensor = _Linear.apply(input, free, joined, bias, dtype)  # type: ignore[no-untyped-call]
            return out
        fixed = self.num_fixed
        bias_fixed, bias_free = (None, None) if bias is None else (bias[:fixed], bias[fixed:])
        return torch.cat(
            (
                nn.functional.linear(input, self.reference, bias_fixed),
                nn.functional.linear(input, free, bias_free),
            ),
            -1,
        )

    def extra_repr(self) -> str:
        where = "prefix" if self.rows is None else "rows"
        return f"fixed={self.num_fixed} ({where}), trailing_shape={tuple(self.reference.shape[1:])}"
