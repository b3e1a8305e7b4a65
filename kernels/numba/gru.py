"""gru_scan's recurrence as numba CPU kernels (DESIGN.md §4 "gru_scan").

Calling convention: docs/kernel_api.md, "gru_scan" (C++ list, minus ``nthreads``). Like the
MIMN kernels: a ``prange`` over independent rows, each running its steps in order (the
result does not depend on the thread count), math in float64 whatever the array dtype (one
compiled signature; f32 arrays go through mimn's ``_as_f64``). The backward recomputes each
step's gates from h_{t-1} = out[b, t-1] instead of storing them.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .mimn import _as_f64, _sigmoid

__all__ = ["gru_scan_fwd", "gru_scan_bwd"]


@njit(cache=True, nogil=True)
def _hidden(w_hh, b_hh, h, hp):
    """hp = W_hh h + b_hh."""
    G, H = w_hh.shape
    for c in range(G):
        s = b_hh[c]
        for k in range(H):
            s += w_hh[c, k] * h[k]
        hp[c] = s


@njit(parallel=True, cache=True, nogil=True)
def _gru_scan_fwd(xp, lengths, w_hh, b_hh, h0, out):
    B, T, G = xp.shape
    H = G // 3
    for b in prange(B):
        hp = np.empty(G)
        h = np.empty(H)
        h[:] = h0[b]
        n_steps = lengths[b]
        for t in range(n_steps):
            _hidden(w_hh, b_hh, h, hp)
            for j in range(H):
                r = _sigmoid(xp[b, t, j] + hp[j])
                z = _sigmoid(xp[b, t, H + j] + hp[H + j])
                n = math.tanh(xp[b, t, 2 * H + j] + r * hp[2 * H + j])
                h[j] = (1.0 - z) * n + z * h[j]
            out[b, t] = h
        out[b, n_steps:] = 0.0


@njit(parallel=True, cache=True, nogil=True)
def _gru_scan_bwd(d_out, xp, out, lengths, w_hh, b_hh, h0, dxp, dhp, dh0):
    B, T, G = xp.shape
    H = G // 3
    for b in prange(B):
        hp = np.empty(G)
        dh = np.zeros(H)
        hprev = np.empty(H)
        n_steps = lengths[b]
        for t in range(n_steps - 1, -1, -1):
            if t > 0:
                hprev[:] = out[b, t - 1]
            else:
                hprev[:] = h0[b]
            _hidden(w_hh, b_hh, hprev, hp)
            for j in range(H):
                r = _sigmoid(xp[b, t, j] + hp[j])
                z = _sigmoid(xp[b, t, H + j] + hp[H + j])
                n = math.tanh(xp[b, t, 2 * H + j] + r * hp[2 * H + j])
                g = dh[j] + d_out[b, t, j]
                dan = g * (1.0 - z) * (1.0 - n * n)
                dar = dan * hp[2 * H + j] * r * (1.0 - r)
                daz = g * (hprev[j] - n) * z * (1.0 - z)
                dxp[b, t, j] = dar
                dhp[b, t, j] = dar
                dxp[b, t, H + j] = daz
                dhp[b, t, H + j] = daz
                dxp[b, t, 2 * H + j] = dan
                dhp[b, t, 2 * H + j] = dan * r
                dh[j] = g * z
            for c in range(G):   # dh += W_hhᵀ dg, in a fixed order
                gc = dhp[b, t, c]
                for k in range(H):
                    dh[k] += gc * w_hh[c, k]
        dh0[b] = dh
        dxp[b, n_steps:] = 0.0
        dhp[b, n_steps:] = 0.0


def gru_scan_fwd(*args):
    """(f32 or f64 arrays) xp (B, T, 3H), lengths (B,), w_hh (3H, H), b_hh (3H,), h0 (B, H)
    -> out (B, T, H) in place, 0 past each row's length."""
    return _as_f64(_gru_scan_fwd, 5, args)


def gru_scan_bwd(*args):
    """(f32 or f64 arrays) d_out, xp, out, lengths, w_hh, b_hh, h0 -> dxp (B, T, 3H),
    dhp (B, T, 3H), dh0 (B, H) in place."""
    return _as_f64(_gru_scan_bwd, 7, args)
