"""Batched top-k gather of history rows, differentiable (backward scatter-adds)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import reference as ref
from ._common import (FLOAT_DTYPES, backend_for, check_hist_index, check_hist_rows,
                      check_same_device, check_table, check_tensor, checked_hist_index, cpu_call,
                      kernels, require_range, slot_rows)

__all__ = ["topk_gather", "scatter_add_rows", "slot_layout"]


def check_idx_range(idx: Tensor, L: int) -> None:
    require_range("idx", idx, -1, L - 1, f"[-1, L={L})", " (-1 marks an empty slot)")


def slot_layout(idx: Tensor, hist_index: Optional[Tensor], hist_rows: Optional[Tensor],
                rows_shape: Sequence[int], device, *,
                checked: bool = False) -> Tuple[Tensor, Tensor, int, int]:
    """Where the selected slots live: (idx, hist, U, L) for the dense kernels, values checked
    (``checked``: idx and hist_index were already checked by the caller, e.g. they come from
    a retrieval over the same histories, and only the indexed form's rows are).

    Dense form: the histories (U, L, ...) themselves. Indexed form: the table (N, ...) is read
    as one history of N rows, and each slot's position becomes its table row
    ``hist_rows[hist[b], idx[b, j]]`` (so every dense kernel, its backward scatter included,
    serves the indexed form unchanged, and the gradient lands in the table's (N, ...) rows).
    """
    B = idx.shape[0]
    U, L = rows_shape if hist_rows is None else hist_rows.shape
    if checked:
        hist = (ref.default_hist_index(B, U, device) if hist_index is None
                else hist_index.to(torch.int64).contiguous())
    else:
        hist = checked_hist_index(hist_index, B, U, device)
        check_idx_range(idx, L)
    if hist_rows is None:
        return idx, hist, U, L
    n = rows_shape[0]
    return (slot_rows(hist_rows, hist, idx, n), torch.zeros(B, dtype=torch.int64, device=device),
            1, n)


def gather_rows(values: Tensor, idx: Tensor, hist: Tensor, backend: str) -> Tensor:
    """values (U, L, R), idx (B, K) checked, hist (B,) materialised -> (B, K, R)."""
    B, K = idx.shape
    if backend == "torch":
        return ref.topk_gather(values, idx, hist)
    v, ix = values.contiguous(), idx.contiguous()
    if backend == "triton":
        return kernels("triton").gather_rows(v, ix, hist)
    out = torch.empty(B, K, values.shape[2], dtype=values.dtype)
    if out.numel():
        # Rows are copied as raw bytes, so one kernel serves every dtype.
        cpu_call(backend, "gather_rows", v.view(torch.uint8), ix, hist, out.view(torch.uint8))
    return out


@torch.library.custom_op("fastattn::topk_gather", mutates_args=())
def _topk_gather(values: Tensor, idx: Tensor, hist_index: Optional[Tensor],
                 hist_rows: Optional[Tensor], backend: str) -> Tensor:
    ix, hist, U, L = slot_layout(idx, hist_index, hist_rows, values.shape[:-1], values.device)
    return gather_rows(values.reshape(U, L, values.shape[-1]), ix, hist, backend)


@_topk_gather.register_fake
def _(values, idx, hist_index, hist_rows, backend):
    return values.new_empty(idx.shape[0], idx.shape[1], values.shape[-1])


def scatter_add_rows(grad: Tensor, idx: Tensor, hist: Tensor, U: int, L: int,
                     backend: str, out: Optional[Tensor] = None) -> Tensor:
    """grad (B, K, R) -> (U, L, R): row (b, j) added at (hist[b], idx[b, j]) when idx >= 0.

    The adjoint of the gather; also the last step of every backward that produces one
    gradient per selected row (the attention backward). ``hist`` is materialised. With
    ``out`` (U, L, R) the rows are added into it in place (a backward in slot chunks) and
    it is returned as is; otherwise a new tensor of ``grad``'s dtype.
    """
    B, K, R = grad.shape
    if backend == "torch":
        new = ref.topk_gather_backward(grad, idx, hist, U, L)
    elif backend == "triton":
        new = kernels("triton").scatter_add_rows(grad.contiguous(), idx.contiguous(), hist, U, L)
    else:
        # The CPU kernels accumulate in fp32/fp64; half grads are widened, then narrowed.
        acc = ref.accumulation_dtype(grad.dtype)
        g = grad.to(acc).contiguous()
        dst = torch.zeros(U, L, R, dtype=acc) if out is None else out
        if g.numel() and dst.numel():
            cpu_call(backend, "scatter_add_rows", g, idx.contiguous(), hist, dst)
        return dst if out is not None else dst.to(grad.dtype)
    return new if out is None else out.add_(new)


@torch.library.custom_op("fastattn::topk_gather_backward", mutates_args=())
def _topk_gather_backward(grad: Tensor, idx: Tensor, hist_index: Optional[Tensor],
                          hist_rows: Optional[Tensor], rows_shape: List[int],
                          backend: str) -> Tensor:
    ix, hist, U, L = slot_layout(idx, hist_index, hist_rows, rows_shape, grad.device)
    return scatter_add_rows(grad, ix, hist, U, L, backend).reshape(*rows_shape, grad.shape[2])


@_topk_gather_backward.register_fake
def _(grad, idx, hist_index, hist_rows, rows_shape, backend):
    return grad.new_empty(*rows_shape, grad.shape[2])


def _gather_setup(ctx, inputs, output):
    values, idx, hist_index, hist_rows, backend = inputs
    ctx.save_for_backward(idx, hist_index, hist_rows)
    ctx.rows_shape = list(values.shape[:-1])
    ctx.backend = backend


def _gather_backward(ctx, grad):
    idx, hist_index, hist_rows = ctx.saved_tensors
    gv = torch.ops.fastattn.topk_gather_backward(grad, idx, hist_index, hist_rows,
                                                 ctx.rows_shape, ctx.backend)
    return gv, None, None, None, None


torch.library.register_autograd("fastattn::topk_gather", _gather_backward,
                                setup_context=_gather_setup)


def _scatter_setup(ctx, inputs, output):
    grad, idx, hist_index, hist_rows, rows_shape, backend = inputs
    ctx.save_for_backward(idx, hist_index, hist_rows)
    ctx.backend = backend


def _scatter_backward(ctx, grad_values):
    # The adjoint of a scatter-add is the gather: gives double backward through topk_gather.
    idx, hist_index, hist_rows = ctx.saved_tensors
    return (torch.ops.fastattn.topk_gather(grad_values, idx, hist_index, hist_rows,
                                           ctx.backend),
            None, None, None, None, None)


torch.library.register_autograd("fastattn::topk_gather_backward", _scatter_backward,
                                setup_context=_scatter_setup)


def topk_gather(values: Tensor, idx: Tensor, *, hist_index: Optional[Tensor] = None,
                hist_rows: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Gather the top-k rows of each query's history.

    Args:
        values: (U, L, Dv) float history rows; or, with ``hist_rows``, a table (N, Dv).
        idx: (B, k) int64 positions in [-1, L); -1 (an empty top-k slot) gives a zero row.
        hist_index: (B,) int history row of each query (default: row b when U == B, row 0
            when U == 1).
        hist_rows: (U, L) int32/int64, the indexed form: position l of history u is table
            row ``hist_rows[u, l]``. A selected position must hold a row in [0, N).

    Returns:
        (B, k, Dv) in ``values``' dtype. Differentiable in ``values``: the backward
        scatter-adds into (U, L, Dv), or into the table's (N, Dv) rows (deterministically
        on CPU).
    """
    check_tensor("values", values, dtypes=FLOAT_DTYPES)
    check_table("values", values, hist_rows, 2, "(N, Dv)")
    check_tensor("idx", idx, dtypes=(torch.int64,), ndim=2, what=" (B, k)")
    B = idx.shape[0]
    U = values.shape[0] if hist_rows is None else check_hist_rows(hist_rows).shape[0]
    check_hist_index(hist_index, B, U)
    dev = check_same_device(values=values, idx=idx, hist_index=hist_index, hist_rows=hist_rows)
    return torch.ops.fastattn.topk_gather(values, idx, hist_index, hist_rows,
                                          backend_for(dev, backend))
