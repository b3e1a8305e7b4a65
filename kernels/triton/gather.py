"""Top-k row gather and its backward scatter-add (DESIGN.md §4, topk_gather).

Row (b, j) of the output is values[hist_index[b], idx[b, j]], or zeros when idx = -1.
Shared histories (U = 1) are read in place through hist_index, never copied per query.

The backward scatter-adds grad rows into (U, L, Dv) with ``tl.atomic_add``: several queries
may select the same (history, position). Half-precision grads are accumulated in an fp32
buffer (atomic adds in bf16/fp16 lose too much and are not available on every GPU) and
cast back at the end. Atomic float adds make the summation order, hence the last bits of
fp32 results, run-dependent; fp64 and exact-sum cases are unaffected in practice.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import device_guard, next_pow2

__all__ = ["gather_rows", "scatter_add_rows"]


def _tiles(rows: int, Dv: int, elem_size: int):
    """(BLOCK_R, BLOCK_D): 2048-element tiles (16 per thread at 4 warps, ~70 registers on
    sm_90 with the 64-bit per-row addresses), full-width rows when Dv is small, up to
    512 bytes of a row per tile."""
    BLOCK_D = min(next_pow2(Dv), max(16, 512 // elem_size))
    BLOCK_R = max(1, min(next_pow2(rows), 2048 // BLOCK_D))
    return BLOCK_R, BLOCK_D


@triton.jit
def _tile_rows(idx_ptr, hist_ptr, R, K, L, Dv, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile of the flattened (B * K, Dv) slot rows r = b * K + j: the rows,
    the columns, their masks, which rows hold a real slot (idx >= 0), and the offset of
    each slot's history row (hist_index[b], idx[b, j]) in the (U, L, Dv) table."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = r < R
    mask_d = offs_d < Dv
    pos = tl.load(idx_ptr + r, mask=mask_r, other=-1)
    u = tl.load(hist_ptr + r // K, mask=mask_r, other=0)
    take = mask_r & (pos >= 0)
    row = (u * L + tl.where(take, pos, 0)) * Dv
    return r, offs_d, mask_r, mask_d, take, row


@triton.jit
def _gather_kernel(v_ptr, idx_ptr, hist_ptr, out_ptr, R, K, L, Dv,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r, offs_d, mask_r, mask_d, take, src = _tile_rows(idx_ptr, hist_ptr, R, K, L, Dv,
                                                      BLOCK_R, BLOCK_D)
    # idx = -1 rows load nothing and store zeros (not 0 * row: that would keep NaN/inf).
    vals = tl.load(v_ptr + src[:, None] + offs_d[None, :],
                   mask=take[:, None] & mask_d[None, :], other=0)
    tl.store(out_ptr + r[:, None] * Dv + offs_d[None, :], vals,
             mask=mask_r[:, None] & mask_d[None, :])


def gather_rows(values: torch.Tensor, idx: torch.Tensor,
                hist_index: torch.Tensor) -> torch.Tensor:
    """values (U, L, Dv), idx (B, K) int64, hist_index (B,) int64 -> (B, K, Dv), values' dtype."""
    U, L, Dv = values.shape
    B, K = idx.shape
    out = torch.empty((B, K, Dv), dtype=values.dtype, device=values.device)
    R = B * K
    if R == 0 or Dv == 0:
        return out
    if L == 0:                      # only idx = -1 can occur: all zero rows
        return out.zero_()
    BLOCK_R, BLOCK_D = _tiles(R, Dv, values.element_size())
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(Dv, BLOCK_D))
    with device_guard(values):
        _gather_kernel[grid](values, idx, hist_index, out, R, K, L, Dv,
                             BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4)
    return out


@triton.jit
def _scatter_add_kernel(g_ptr, idx_ptr, hist_ptr, out_ptr, R, K, L, Dv,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r, offs_d, mask_r, mask_d, take, dst = _tile_rows(idx_ptr, hist_ptr, R, K, L, Dv,
                                                      BLOCK_R, BLOCK_D)
    m = take[:, None] & mask_d[None, :]
    g = tl.load(g_ptr + r[:, None] * Dv + offs_d[None, :], mask=m, other=0)
    # The destination buffer's dtype decides the add (fp32 for half grads).
    g = g.to(out_ptr.dtype.element_ty)
    tl.atomic_add(out_ptr + dst[:, None] + offs_d[None, :], g, mask=m, sem="relaxed")


def scatter_add_rows(grad: torch.Tensor, idx: torch.Tensor, hist_index: torch.Tensor,
                     U: int, L: int) -> torch.Tensor:
    """grad (B, K, Dv), idx (B, K) int64, hist_index (B,) int64 -> (U, L, Dv), grad's dtype.

    out[hist_index[b], idx[b, j]] += grad[b, j] for every idx >= 0.
    """
    B, K, Dv = grad.shape
    half = grad.dtype in (torch.float16, torch.bfloat16)
    acc_dtype = torch.float32 if half else grad.dtype
    out = torch.zeros((U, L, Dv), dtype=acc_dtype, device=grad.device)
    R = B * K
    if R > 0 and Dv > 0 and U * L > 0:
        BLOCK_R, BLOCK_D = _tiles(R, Dv, 4 if half else grad.element_size())
        grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(Dv, BLOCK_D))
        with device_guard(grad):
            _scatter_add_kernel[grid](grad, idx, hist_index, out, R, K, L, Dv,
                                      BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4)
    return out.to(grad.dtype) if half else out
