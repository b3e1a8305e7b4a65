"""Softmax attention over the top-k retrieved history rows (ETA), numba CPU kernels.

Calling convention: docs/kernel_api.md, "Attention over retrieved rows" (C++ table, minus
``nthreads``). Inputs are contiguous, already-checked numpy arrays, all floats of one dtype
(f32 or f64); outputs are preallocated by the caller (out / dq / dk_slots / dv_slots
zero-filled, lse filled with -inf) and written in place.

Rows are read in place from the history through (hist_index[b], idx[b, j]): nothing
(B, K, D) is gathered, so a shared history (U = 1) is never copied per query. Each query b
writes only its own rows of every output, so the parallel loop over queries needs no
atomics and the result does not depend on the thread count.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["topk_attention_fwd", "topk_attention_bwd"]

# Queries handled by one parallel task: the per-task score scratch is allocated once per
# task rather than once per query, and tasks stay small enough to balance when queries
# have different numbers of valid slots.
_TASK = 16

# Reassociation lets LLVM split the float dot products over Dh/Dv into vector lanes (a
# strict left-to-right sum cannot be vectorised); contraction allows FMA. Deliberately not
# the full fastmath set: 'ninf'/'nnan' would let LLVM assume away the -inf of empty rows.
_FM = {"reassoc", "contract"}


@njit(inline="always", fastmath=_FM)
def _dot(a, b, zero):
    """a . b over the (contiguous, equally long) 1-D rows a and b, accumulated in the
    dtype of ``zero``."""
    acc = zero
    for d in range(a.shape[0]):
        acc += a[d] * b[d]
    return acc


@njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
def topk_attention_fwd(q, keys, values, idx, hist_index, scale, out, lse):
    """out[b, h] = sum_j softmax_j(scale * q[b, h] . k_j) * v_j and lse[b, h] its
    log-sum-exp, over the valid slots j (idx[b, j] >= 0), with
    k_j = keys[hist_index[b], idx[b, j], h] and v_j = values[same, h].

    q (B, H, Dh), keys (U, L, H, Dh), values (U, L, H, Dv), idx (B, K) int64,
    hist_index (B,) int64, scale float, out (B, H, Dv) zeros, lse (B, H) -inf.
    A query with no valid slot leaves out = 0 and lse = -inf untouched.

    Two passes per (b, h): scores into a K-long scratch (keeping their max), then
    exp(s - max) weights accumulated straight into out and normalised once at the end.
    """
    B, H, _ = q.shape
    K = idx.shape[1]
    # Typed constants keep every scalar (scores, max, exp weights) in the input dtype: a
    # Python float or -np.inf would promote the f32 path to f64 (f64 exp, mixed loops).
    zero = q.dtype.type(0)
    neg_inf = q.dtype.type(-np.inf)
    sc = q.dtype.type(scale)
    ntasks = (B + _TASK - 1) // _TASK
    for task in prange(ntasks):
        s = np.empty(K, dtype=q.dtype)
        for b in range(task * _TASK, min(B, (task + 1) * _TASK)):
            u = hist_index[b]
            for h in range(H):
                qr = q[b, h]
                m = neg_inf
                for j in range(K):
                    l = idx[b, j]
                    if l >= 0:
                        sj = sc * _dot(qr, keys[u, l, h], zero)
                        s[j] = sj
                        if sj > m:
                            m = sj
                if m == neg_inf:
                    continue  # no valid slot
                o = out[b, h]
                z = zero
                for j in range(K):
                    l = idx[b, j]
                    if l >= 0:
                        e = np.exp(s[j] - m)
                        z += e
                        v = values[u, l, h]
                        for d in range(o.shape[0]):
                            o[d] += e * v[d]
                rz = q.dtype.type(1) / z
                for d in range(o.shape[0]):
                    o[d] *= rz
                lse[b, h] = m + np.log(z)


@njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
def topk_attention_bwd(grad_out, q, keys, values, idx, hist_index, out, lse, scale,
                       dq, dk_slots, dv_slots):
    """Backward of topk_attention_fwd, one gradient per selected slot.

    grad_out / out (B, H, Dv), lse (B, H) from the forward; dq (B, H, Dh),
    dk_slots (B, K, H, Dh), dv_slots (B, K, H, Dv) zero-filled by the caller (empty slots
    and queries with no valid slot keep their zeros); dv_slots may be dk_slots (keys are
    the values): it then gets both gradients. With p_j = exp(s_j - lse) recomputed
    from the stored lse (no softmax kept from the forward):
    dv_j = p_j g; ds_j = p_j (g . v_j - g . out); dq = scale sum_j ds_j k_j;
    dk_j = scale ds_j q. One pass over the slots reads each k_j and v_j once.
    """
    B, H, _ = q.shape
    K = idx.shape[1]
    zero = q.dtype.type(0)
    sc = q.dtype.type(scale)
    for b in prange(B):
        u = hist_index[b]
        for h in range(H):
            lse_bh = lse[b, h]
            if lse_bh == -np.inf:
                continue  # no valid slot: every gradient stays 0
            qr = q[b, h]
            g = grad_out[b, h]
            gout = _dot(g, out[b, h], zero)
            dqr = dq[b, h]
            for j in range(K):
                l = idx[b, j]
                if l < 0:
                    continue
                kr = keys[u, l, h]
                vr = values[u, l, h]
                p = q.dtype.type(np.exp(sc * _dot(qr, kr, zero) - lse_bh))
                ds = p * (_dot(g, vr, zero) - gout)
                c = sc * ds
                # Added (into zeros), so dv_slots may be dk_slots itself (tied keys/values).
                dvr = dv_slots[b, j, h]
                for d in range(dvr.shape[0]):
                    dvr[d] += p * g[d]
                dkr = dk_slots[b, j, h]
                for d in range(dkr.shape[0]):
                    dkr[d] += c * qr[d]
                    dqr[d] += c * kr[d]
