"""Batched top-k gather of history rows, differentiable (backward scatter-adds)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from ._common import (FLOAT_DTYPES, backend_for, check_hist_index, check_same_device,
                      check_tensor, cpu_call, kernels, layout)

__all__ = ["topk_gather", "scatter_add_rows"]


def check_idx_range(idx: Tensor, L: int) -> None:
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= L):
        raise ValueError(f"idx must lie in [-1, L={L}) (-1 marks an empty slot), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")


@torch.library.custom_op("fastattn::topk_gather", mutates_args=())
def _topk_gather(values: Tensor, idx: Tensor, hist_index: Optional[Tensor],
                 backend: str) -> Tensor:
    U, L, Dv = values.shape
    B, K = idx.shape
    _, hist = layout(B, U, L, None, hist_index, values.device)
    check_idx_range(idx, L)
    if backend == "torch":
        return ref.topk_gather(values, idx, hist)
    v, ix = values.contiguous(), idx.contiguous()
    if backend == "triton":
        return kernels("triton").gather_rows(v, ix, hist)
    out = torch.empty(B, K, Dv, dtype=values.dtype)
    if out.numel():
        # Rows are copied as raw bytes, so one kernel serves every dtype.
        cpu_call(backend, "gather_rows", v.view(torch.uint8), ix, hist, out.view(torch.uint8))
    return out


@_topk_gather.register_fake
def _(values, idx, hist_index, backend):
    return values.new_empty(idx.shape[0], idx.shape[1], values.shape[2])


def scatter_add_rows(grad: Tensor, idx: Tensor, hist: Tensor, U: int, L: int,
                     backend: str) -> Tensor:
    """grad (B, K, R) -> (U, L, R): row (b, j) added at (hist[b], idx[b, j]) when idx >= 0.

    The adjoint of the gather; also the last step of every backward that produces one
    gradient per selected row (the attention backward). ``hist`` is materialised.
    """
    B, K, R = grad.shape
    if backend == "torch":
        return ref.topk_gather_backward(grad, idx, hist, U, L)
    ix = idx.contiguous()
    if backend == "triton":
        return kernels("triton").scatter_add_rows(grad.contiguous(), ix, hist, U, L)
    # The CPU kernels accumulate in fp32/fp64; half grads are widened, then narrowed back.
    acc = grad.dtype if grad.dtype in (torch.float32, torch.float64) else torch.float32
    g = grad.to(acc).contiguous()
    out = torch.zeros(U, L, R, dtype=acc)
    if g.numel() and out.numel():
        cpu_call(backend, "scatter_add_rows", g, ix, hist, out)
    return out.to(grad.dtype)


@torch.library.custom_op("fastattn::topk_gather_backward", mutates_args=())
def _topk_gather_backward(grad: Tensor, idx: Tensor, hist_index: Optional[Tensor], U: int,
                          L: int, backend: str) -> Tensor:
    _, hist = layout(grad.shape[0], U, L, None, hist_index, grad.device)
    return scatter_add_rows(grad, idx, hist, U, L, backend)


@_topk_gather_backward.register_fake
def _(grad, idx, hist_index, U, L, backend):
    return grad.new_empty(U, L, grad.shape[2])


def _gather_setup(ctx, inputs, output):
    values, idx, hist_index, backend = inputs
    ctx.save_for_backward(idx, hist_index)
    ctx.U, ctx.L = values.shape[0], values.shape[1]
    ctx.backend = backend


def _gather_backward(ctx, grad):
    idx, hist_index = ctx.saved_tensors
    gv = torch.ops.fastattn.topk_gather_backward(grad, idx, hist_index, ctx.U, ctx.L,
                                                 ctx.backend)
    return gv, None, None, None


torch.library.register_autograd("fastattn::topk_gather", _gather_backward,
                                setup_context=_gather_setup)


def _scatter_setup(ctx, inputs, output):
    grad, idx, hist_index, U, L, backend = inputs
    ctx.save_for_backward(idx, hist_index)
    ctx.backend = backend


def _scatter_backward(ctx, grad_values):
    # The adjoint of a scatter-add is the gather: gives double backward through topk_gather.
    idx, hist_index = ctx.saved_tensors
    return (torch.ops.fastattn.topk_gather(grad_values, idx, hist_index, ctx.backend),
            None, None, None, None, None)


torch.library.register_autograd("fastattn::topk_gather_backward", _scatter_backward,
                                setup_context=_scatter_setup)


def topk_gather(values: Tensor, idx: Tensor, *, hist_index: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """Gather the top-k rows of each query's history.

    Args:
        values: (U, L, Dv) float history rows.
        idx: (B, k) int64 positions in [-1, L); -1 (an empty top-k slot) gives a zero row.
        hist_index: (B,) int history row of each query (default: row b when U == B, row 0
            when U == 1).

    Returns:
        (B, k, Dv) in ``values``' dtype. Differentiable in ``values``: the backward
        scatter-adds into (U, L, Dv) (deterministically on CPU).
    """
    check_tensor("values", values, dtypes=FLOAT_DTYPES, ndim=3, what=" (U, L, Dv)")
    check_tensor("idx", idx, dtypes=(torch.int64,), ndim=2, what=" (B, k)")
    B, U = idx.shape[0], values.shape[0]
    check_hist_index(hist_index, B, U)
    dev = check_same_device(values=values, idx=idx, hist_index=hist_index)
    return torch.ops.fastattn.topk_gather(values, idx, hist_index, backend_for(dev, backend))
