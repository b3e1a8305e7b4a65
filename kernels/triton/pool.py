"""Masked mean pooling (BAHE) and its backward (DESIGN.md §4, masked_mean).

A program owns a tile of BLOCK_N rows by BLOCK_D columns and walks the K tokens, so each
output element is summed in token order by one program (deterministic, no atomics).
Masked tokens are not loaded. Half-precision inputs accumulate in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import device_guard, next_pow2

__all__ = ["masked_mean_fwd", "masked_mean_bwd"]


def _tiles(N: int, D: int):
    BLOCK_D = min(next_pow2(max(D, 1)), 128)
    BLOCK_N = max(1, min(next_pow2(max(N, 1)), 2048 // BLOCK_D))
    return BLOCK_N, BLOCK_D


@triton.jit
def _fwd_kernel(x_ptr, m_ptr, out_ptr, N, K, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                F64: tl.constexpr):
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mn = n < N
    md = d < D
    if F64:
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k in range(0, K):
        valid = tl.load(m_ptr + n * K + k, mask=mn, other=0) != 0
        v = tl.load(x_ptr + (n * K + k)[:, None] * D + d[None, :],
                    mask=valid[:, None] & md[None, :], other=0)
        acc += v.to(acc.dtype)
        cnt += valid.to(tl.int32)
    acc = acc / tl.maximum(cnt, 1).to(acc.dtype)[:, None]
    tl.store(out_ptr + n[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mn[:, None] & md[None, :])


@triton.jit
def _bwd_kernel(g_ptr, m_ptr, dx_ptr, N, K, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                F64: tl.constexpr):
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mn = n < N
    md = d < D
    cnt = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k in range(0, K):
        cnt += (tl.load(m_ptr + n * K + k, mask=mn, other=0) != 0).to(tl.int32)
    g = tl.load(g_ptr + n[:, None] * D + d[None, :], mask=mn[:, None] & md[None, :], other=0)
    if F64:
        g = g.to(tl.float64) / tl.maximum(cnt, 1).to(tl.float64)[:, None]
    else:
        g = g.to(tl.float32) / tl.maximum(cnt, 1).to(tl.float32)[:, None]
    for k in range(0, K):
        valid = tl.load(m_ptr + n * K + k, mask=mn, other=0) != 0
        val = tl.where(valid[:, None], g, 0.0)
        tl.store(dx_ptr + (n * K + k)[:, None] * D + d[None, :],
                 val.to(dx_ptr.dtype.element_ty), mask=mn[:, None] & md[None, :])


def masked_mean_fwd(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (N, K, D) float, mask (N, K) uint8 -> (N, D), x's dtype."""
    N, K, D = x.shape
    out = torch.zeros((N, D), dtype=x.dtype, device=x.device)
    if N == 0 or D == 0 or K == 0:
        return out
    BLOCK_N, BLOCK_D = _tiles(N, D)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))
    with device_guard(x):
        _fwd_kernel[grid](x, mask, out, N, K, D, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                          F64=x.dtype == torch.float64, num_warps=4)
    return out


def masked_mean_bwd(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """grad (N, D) float, mask (N, K) uint8 -> dx (N, K, D), grad's dtype."""
    N, D = grad.shape
    K = mask.shape[1]
    dx = torch.zeros((N, K, D), dtype=grad.dtype, device=grad.device)
    if N == 0 or D == 0 or K == 0:
        return dx
    BLOCK_N, BLOCK_D = _tiles(N, D)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))
    with device_guard(grad):
        _bwd_kernel[grid](grad, mask, dx, N, K, D, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                          F64=grad.dtype == torch.float64, num_warps=4)
    return dx
