"""Masked mean pooling (BAHE) and its backward, numba CPU kernels.

Calling convention: docs/kernel_api.md (C++ table, minus ``nthreads``). Inputs are contiguous,
already-checked numpy arrays; outputs are preallocated and written in place.
"""
from __future__ import annotations

from numba import njit, prange

__all__ = ["masked_mean_fwd", "masked_mean_bwd"]


@njit(parallel=True, cache=True, nogil=True)
def masked_mean_fwd(x, mask, out):
    """out[n] = mean of x[n, k] over mask[n, k] != 0, zeros when no token is valid.

    x (N, K, D) f32/f64, mask (N, K) uint8, out (N, D) x's dtype. One row per task, summed in
    token order (deterministic for every thread count); masked tokens are never read.
    """
    N, K, D = x.shape
    for n in prange(N):
        c = 0
        for d in range(D):
            out[n, d] = 0
        for k in range(K):
            if mask[n, k] != 0:
                c += 1
                for d in range(D):
                    out[n, d] += x[n, k, d]
        if c > 1:
            for d in range(D):
                out[n, d] /= c


@njit(parallel=True, cache=True, nogil=True)
def masked_mean_bwd(grad, mask, dx):
    """dx[n, k] = grad[n] / max(count[n], 1) where mask[n, k] != 0, zeros elsewhere.

    grad (N, D) f32/f64, mask (N, K) uint8, dx (N, K, D) grad's dtype.
    """
    N, K, D = dx.shape
    for n in prange(N):
        c = 0
        for k in range(K):
            if mask[n, k] != 0:
                c += 1
        c = max(c, 1)
        for k in range(K):
            if mask[n, k] != 0:
                for d in range(D):
                    dx[n, k, d] = grad[n, d] / c
            else:
                for d in range(D):
                    dx[n, k, d] = 0
