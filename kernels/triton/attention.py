"""Exact softmax attention over the top-k retrieved rows (DESIGN.md §4, eta_attention).

Calling convention in docs/kernel_api.md, "Attention over retrieved rows". One program owns
one (query b, head h). It reads its K selected rows of keys/values in place from the
history, row (hist_index[b], idx[b, j]) at element ((u·L + idx)·H + h)·D, so neither a
(B, K, D) copy nor a (B, L) score tensor ever exists, and a shared history (U = 1) is read,
not replicated.

Each query meets only K (typically 16..256) rows, one vector against a (BLOCK_K, D) tile:
a matrix-vector product. ``tl.dot`` would need ≥ 16 query rows to fill an MMA and does not
take fp64, so scores are broadcast-multiply-sums, exact in the accumulation dtype (fp32, or
fp64 for fp64 inputs); the kernel is bound by the gathered loads anyway.

Forward: K is walked in BLOCK_K slots with an online softmax (running max m, running sum l,
rescaled accumulator), so any K works with a register tile bounded by the launcher. It
stores lse = m + log(l), or -inf (and out = 0) when the query has no valid slot.

Backward (one pass over K, no atomics): p_j = exp(scale·q·k_j − lse) is recomputed from
lse; dv_j = p_j·g and dk_j = scale·ds_j·q go to their own (b, j, h) slot rows (the op layer
scatter-adds them into the history), dq accumulates in registers.

The scale is passed as two fp32 scalars (hi + lo): Triton types Python float arguments as
fp32, which would cost fp64 inputs ~1e-8 relative error; hi + lo carries ~48 bits.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ._bits import device_guard, next_pow2

__all__ = ["topk_attention_fwd", "topk_attention_bwd"]


def _split_scale(scale: float):
    """scale -> (hi, lo) fp32-representable floats with hi + lo == scale to ~2**-48."""
    # numpy rounds on the host: a torch.tensor here would land on the default device (a
    # host-to-device copy per call, which also breaks CUDA-graph capture).
    hi = float(np.float32(scale))
    lo = float(np.float32(float(scale) - hi))
    return hi, lo


def _config(K: int, Dh: int, Dv: int, fp64: bool):
    """(BLOCK_K, DH_P, DV_P, num_warps).

    The k and v tiles (BLOCK_K × D_P each) are live together in the accumulation dtype:
    4096 fp32 elements per tile (2048 fp64), 32 per thread at 4 warps. Compiled for sm_90
    (Triton 3.9) that is ~156 registers in the forward and ~230 in the backward, no
    spills, i.e. 3 resp. 2 programs per SM with 32-48 KB of gathered rows in flight per
    SM, enough to cover HBM latency; smaller tiles or 8 warps lower the registers but not
    the bytes in flight. K ≤ 64 with Dh ≤ 64 (K ≤ 128 with Dh ≤ 32) fits in one block,
    so no online-softmax rescaling happens at all. Small tiles use 2 warps: the SM's
    32-program limit still allows full occupancy.
    """
    DH_P, DV_P = next_pow2(Dh), next_pow2(Dv)
    budget = 2048 if fp64 else 4096
    BLOCK_K = max(1, min(next_pow2(K), 128, budget // max(DH_P, DV_P)))
    num_warps = 4 if BLOCK_K * max(DH_P, DV_P) >= 2048 else 2
    return BLOCK_K, DH_P, DV_P, num_warps


@triton.jit
def _load_slots(k_ptr, v_ptr, idx_ptr, b, h, u, K, L, H, Dh, Dv, offs_k, offs_dh, offs_dv,
                ACC: tl.constexpr):
    """Slots offs_k of query b: (valid (BK,), k tile (BK, DH_P), v tile (BK, DV_P)) in ACC.

    Empty slots (idx = -1) and slots past K load zeros and read no memory.
    """
    pos = tl.load(idx_ptr + b * K + offs_k, mask=offs_k < K, other=-1)
    valid = pos >= 0
    row = (u * L + tl.where(valid, pos, 0)) * H + h          # int64: idx is int64
    kt = tl.load(k_ptr + row[:, None] * Dh + offs_dh[None, :],
                 mask=valid[:, None] & (offs_dh < Dh)[None, :], other=0).to(ACC)
    vt = tl.load(v_ptr + row[:, None] * Dv + offs_dv[None, :],
                 mask=valid[:, None] & (offs_dv < Dv)[None, :], other=0).to(ACC)
    return valid, kt, vt


@triton.jit
def _topk_attn_fwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, hist_ptr, out_ptr, lse_ptr,
                          scale_hi, scale_lo, K, L, H, Dh, Dv,
                          BLOCK_K: tl.constexpr, DH_P: tl.constexpr, DV_P: tl.constexpr,
                          ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    bh = b * H + h
    # Adding to an ACC zero promotes both halves (the interpreter passes Python floats).
    scale = (tl.zeros((), ACC) + scale_hi) + scale_lo
    u = tl.load(hist_ptr + b)
    offs_dh = tl.arange(0, DH_P)
    offs_dv = tl.arange(0, DV_P)
    q = tl.load(q_ptr + bh * Dh + offs_dh, mask=offs_dh < Dh, other=0).to(ACC)

    m = tl.full((), float("-inf"), ACC)        # running max of the valid scores
    l = tl.zeros((), ACC)                       # running Σ exp(s - m)
    acc = tl.zeros((DV_P,), ACC)                # running Σ exp(s - m) · v
    for j0 in range(0, K, BLOCK_K):
        offs_k = j0 + tl.arange(0, BLOCK_K)
        valid, kt, vt = _load_slots(k_ptr, v_ptr, idx_ptr, b, h, u, K, L, H, Dh, Dv,
                                    offs_k, offs_dh, offs_dv, ACC)
        s = tl.where(valid, tl.sum(kt * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        # While no valid slot has been seen m_new is -inf; subtracting 0 instead keeps
        # exp(-inf - -inf) = NaN out: alpha = exp(-inf) = 0 and p = 0 for every slot.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        alpha = tl.exp(m - m_sub)
        p = tl.exp(s - m_sub)                   # 0 on empty slots (s = -inf)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new

    has = l > 0
    out = acc / tl.where(has, l, 1.0).to(ACC)
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0).to(ACC)), float("-inf"))
    tl.store(out_ptr + bh * Dv + offs_dv, out.to(out_ptr.dtype.element_ty),
             mask=offs_dv < Dv)
    tl.store(lse_ptr + bh, lse.to(lse_ptr.dtype.element_ty))


@triton.jit
def _topk_attn_bwd_kernel(g_ptr, q_ptr, k_ptr, v_ptr, idx_ptr, hist_ptr, out_ptr, lse_ptr,
                          dq_ptr, dk_ptr, dv_ptr, scale_hi, scale_lo, K, L, H, Dh, Dv,
                          BLOCK_K: tl.constexpr, DH_P: tl.constexpr, DV_P: tl.constexpr,
                          ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    bh = b * H + h
    # Adding to an ACC zero promotes both halves (the interpreter passes Python floats).
    scale = (tl.zeros((), ACC) + scale_hi) + scale_lo
    u = tl.load(hist_ptr + b)
    offs_dh = tl.arange(0, DH_P)
    offs_dv = tl.arange(0, DV_P)
    mask_dh = offs_dh < Dh
    mask_dv = offs_dv < Dv
    q = tl.load(q_ptr + bh * Dh + offs_dh, mask=mask_dh, other=0).to(ACC)
    g = tl.load(g_ptr + bh * Dv + offs_dv, mask=mask_dv, other=0).to(ACC)
    o = tl.load(out_ptr + bh * Dv + offs_dv, mask=mask_dv, other=0).to(ACC)
    lse = tl.load(lse_ptr + bh).to(ACC)
    delta = tl.sum(g * o, axis=0)               # g·out = Σ_j p_j dp_j

    dq = tl.zeros((DH_P,), ACC)
    for j0 in range(0, K, BLOCK_K):
        offs_k = j0 + tl.arange(0, BLOCK_K)
        valid, kt, vt = _load_slots(k_ptr, v_ptr, idx_ptr, b, h, u, K, L, H, Dh, Dv,
                                    offs_k, offs_dh, offs_dv, ACC)
        s = tl.sum(kt * q[None, :], axis=1) * scale
        # Masking before the exp keeps empty slots (and rows with lse = -inf, which have
        # no valid slot) from ever evaluating an overflowing exp.
        p = tl.exp(tl.where(valid, s - lse, float("-inf")))
        dp = tl.sum(vt * g[None, :], axis=1)
        ds = p * (dp - delta)
        dq += tl.sum(ds[:, None] * kt, axis=0)
        # Empty slots are written as explicit zeros (not 0·g, which would keep inf/NaN).
        slot = (b * K + offs_k) * H + h
        in_k = (offs_k < K)[:, None]
        dv = tl.where(valid[:, None], p[:, None] * g[None, :], 0.0)
        dk = tl.where(valid[:, None], (scale * ds)[:, None] * q[None, :], 0.0)
        tl.store(dv_ptr + slot[:, None] * Dv + offs_dv[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=in_k & mask_dv[None, :])
        tl.store(dk_ptr + slot[:, None] * Dh + offs_dh[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=in_k & mask_dh[None, :])
    tl.store(dq_ptr + bh * Dh + offs_dh, (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=mask_dh)


def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32,
                                                                        tl.float32)


def topk_attention_fwd(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       idx: torch.Tensor, hist_index: torch.Tensor, scale: float):
    """q (B, H, Dh), keys (U, L, H, Dh), values (U, L, H, Dv), idx (B, K) int64 (-1 =
    empty), hist_index (B,) int64 -> (out (B, H, Dv) in q's dtype, lse (B, H) fp32, fp64
    for fp64 inputs). A query with no valid slot gets out = 0 and lse = -inf."""
    B, H, Dh = q.shape
    L = keys.shape[1]
    Dv = values.shape[-1]
    K = idx.shape[1]
    lse_dtype, ACC = _acc(q.dtype)
    out = torch.empty((B, H, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H), dtype=lse_dtype, device=q.device)
    if B * H == 0:
        return out, lse
    BLOCK_K, DH_P, DV_P, num_warps = _config(K, Dh, Dv, q.dtype == torch.float64)
    s_hi, s_lo = _split_scale(scale)
    with device_guard(q):
        _topk_attn_fwd_kernel[(B, H)](
            q, keys, values, idx, hist_index, out, lse, s_hi, s_lo, K, L, H, Dh, Dv,
            BLOCK_K=BLOCK_K, DH_P=DH_P, DV_P=DV_P, ACC=ACC, num_warps=num_warps)
    return out, lse


def topk_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                       values: torch.Tensor, idx: torch.Tensor, hist_index: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float):
    """Gradients of topk_attention_fwd, given its (out, lse) and grad_out (B, H, Dv).

    Returns (dq (B, H, Dh), dk_slots (B, K, H, Dh), dv_slots (B, K, H, Dv)) in q's dtype:
    the gradient of each selected row, zeros for empty slots (the op layer scatter-adds
    the slots into (U, L, H, ·))."""
    B, H, Dh = q.shape
    L = keys.shape[1]
    Dv = values.shape[-1]
    K = idx.shape[1]
    _, ACC = _acc(q.dtype)
    dq = torch.empty_like(q)
    dk = torch.empty((B, K, H, Dh), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, K, H, Dv), dtype=q.dtype, device=q.device)
    if B * H == 0:
        return dq, dk, dv
    BLOCK_K, DH_P, DV_P, num_warps = _config(K, Dh, Dv, q.dtype == torch.float64)
    s_hi, s_lo = _split_scale(scale)
    with device_guard(q):
        _topk_attn_bwd_kernel[(B, H)](
            grad_out, q, keys, values, idx, hist_index, out, lse, dq, dk, dv,
            s_hi, s_lo, K, L, H, Dh, Dv,
            BLOCK_K=BLOCK_K, DH_P=DH_P, DV_P=DV_P, ACC=ACC, num_warps=num_warps)
    return dq, dk, dv
