"""SimHash signatures, numba CPU kernel.

Calling convention: docs/kernel_api.md (C++ table, minus ``nthreads``). Inputs are contiguous,
already-checked numpy arrays; the output is preallocated and written in place.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["simhash_sign", "simhash_sign_rows"]

# Rows per parallel task: they share one pass over `planes`, so each (D, NB) row of planes is
# loaded once per 4 rows of x instead of once per row.
_ROWS = 4


@njit(parallel=True, cache=True, nogil=True)
def _sign(x, rows, gathered, planes, out):
    """out[n] = bits of (x[r] @ planes) > 0 with r = rows[n] if gathered else n."""
    N = out.shape[0]
    D = x.shape[1]
    NB = planes.shape[1]
    W = out.shape[1]
    ntasks = (N + _ROWS - 1) // _ROWS
    for task in prange(ntasks):
        r0 = task * _ROWS
        nr = min(_ROWS, N - r0)
        # The accumulator takes x's dtype, so f32 inputs accumulate in f32 and f64 in f64,
        # as the spec asks (numba keeps f32 * f32 + f32 in f32). The j loop is contiguous in
        # both planes and acc, so it vectorises.
        acc = np.zeros((_ROWS, NB), dtype=x.dtype)
        for dd in range(D):
            for r in range(nr):
                xv = x[rows[r0 + r] if gathered else r0 + r, dd]
                for j in range(NB):
                    acc[r, j] += xv * planes[dd, j]
        for r in range(nr):
            for w in range(W):
                word = np.int64(0)
                for bit in range(min(64, NB - w * 64)):
                    if acc[r, w * 64 + bit] > 0:
                        # bit 63 lands on the int64 sign bit, as in the reference.
                        word |= np.int64(1) << np.int64(bit)
                out[r0 + r, w] = word


@njit(cache=True, nogil=True)
def simhash_sign(x, planes, out):
    """out[n] = bits of (x[n] @ planes) > 0, packed LSB-first into W int64 words.

    x (N, D) f32/f64, planes (D, NB) same dtype, out (N, W) int64. Bit j sits in word j // 64
    at bit j % 64; bits >= NB are 0; a NaN projection gives 0 (NaN > 0 is false).
    """
    _sign(x, np.empty(0, dtype=np.int64), False, planes, out)


@njit(cache=True, nogil=True)
def simhash_sign_rows(x, planes, rows, out):
    """The gathered form: out[i] = the signature of x[rows[i]]; x (N, D) a table, rows (M,)
    int64 in [0, N) (checked by the caller), out (M, W)."""
    _sign(x, rows, True, planes, out)
