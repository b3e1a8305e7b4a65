"""Top-k row gather and its backward scatter-add, numba CPU kernels.

Calling convention: docs/kernel_api.md (C++ table, minus ``nthreads``). Inputs are contiguous,
already-checked numpy arrays; outputs are preallocated and written in place.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["gather_rows", "scatter_add_rows", "last_matches"]

# Parts the destination rows of scatter_add_rows are split into (row mod _PARTS): enough to
# keep any realistic thread count busy when the destinations are spread out.
_PARTS = 256


@njit(parallel=True, cache=True, nogil=True)
def gather_rows(values, idx, hist_index, out):
    """out[b, j] = values[hist_index[b], idx[b, j]] as raw bytes; idx -1 gives zero bytes.

    values (U, L, R) uint8, idx (B, K) int64, hist_index (B,) int64, out (B, K, R) uint8.
    Working on bytes makes one compiled signature serve every dtype (the op layer views the
    tensors as uint8), and a zero byte pattern is +0.0 / 0 in every dtype.
    """
    B, K, R = out.shape
    # Flatten (b, j) so that small B with large K still spreads over all threads.
    for t in prange(B * K):
        b = t // K
        j = t - b * K
        l = idx[b, j]
        if l < 0:
            for c in range(R):
                out[b, j, c] = 0
        else:
            h = hist_index[b]
            # A plain byte-copy loop: LLVM turns it into memcpy.
            for c in range(R):
                out[b, j, c] = values[h, l, c]


@njit(parallel=True, cache=True, nogil=True)
def scatter_add_rows(grad, idx, hist_index, out):
    """out[hist_index[b], idx[b, j]] += grad[b, j] for every idx[b, j] >= 0.

    grad (B, K, Dv) f32/f64, idx (B, K) int64, hist_index (B,) int64, out (U, L, Dv) same
    dtype as grad, zero-filled by the caller.

    Deterministic and race-free without atomics: destination rows are split into _PARTS
    parts (row number mod _PARTS), a stable counting sort lists each part's entries in (b, j)
    order, and one task per part adds them. Every output element is thus summed by a single
    thread in (b, j) order, so the result is bit-identical whatever the thread count. The
    part count is a constant rather than numba.get_num_threads(): that call would stop the
    function from being cached, and a fixed count keeps results independent of threads.
    """
    B, K, Dv = grad.shape
    L = out.shape[1]
    n = B * K
    flat = out.reshape(out.shape[0] * L, Dv)
    g = grad.reshape(n, Dv)
    # Flat destination row of each entry, -1 for empty slots.
    dest = np.empty(n, dtype=np.int64)
    for t in prange(n):
        b = t // K
        l = idx[b, t - b * K]
        dest[t] = hist_index[b] * L + l if l >= 0 else -1
    # Stable counting sort of the entries by part (serial: O(B*K) index work, tiny next to
    # the B*K*Dv additions).
    start = np.zeros(_PARTS + 1, dtype=np.int64)
    for t in range(n):
        if dest[t] >= 0:
            start[dest[t] % _PARTS + 1] += 1
    for p in range(_PARTS):
        start[p + 1] += start[p]
    cursor = start[:_PARTS].copy()
    order = np.empty(start[_PARTS], dtype=np.int64)
    for t in range(n):
        r = dest[t]
        if r >= 0:
            p = r % _PARTS
            order[cursor[p]] = t
            cursor[p] += 1
    for p in prange(_PARTS):
        for i in range(start[p], start[p + 1]):
            t = order[i]
            r = dest[t]
            for c in range(Dv):
                flat[r, c] += g[t, c]


@njit(parallel=True, cache=True, nogil=True)
def last_matches(values, lengths, target, hist_index, out):
    """out[b] (n,) = the n most recent positions l < lengths[h] of values[h] (h =
    hist_index[b]) holding target[b], most recent first, -1 after (SIM-hard's search).

    values (U, L) int64, lengths (U,), target (B,), hist_index (B,) int64, out (B, n) int64.
    """
    B, n = out.shape
    for b in prange(B):
        h = hist_index[b]
        t = target[b]
        j = 0
        l = lengths[h] - 1
        while l >= 0 and j < n:
            if values[h, l] == t:
                out[b, j] = l
                j += 1
            l -= 1
        while j < n:
            out[b, j] = -1
            j += 1
