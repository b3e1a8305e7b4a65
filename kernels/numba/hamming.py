"""Hamming distance and fused Hamming top-k (ETA retrieval), numba CPU kernels.

Calling convention: docs/kernel_api.md (C++ table, minus ``nthreads``). Inputs are contiguous,
already-checked numpy arrays; outputs are preallocated and written in place.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._bits import popcount64, prefetch

__all__ = ["hamming_distance", "hamming_topk", "hamming_topk_rows"]

# Queries handled by one parallel task of hamming_topk. Each task allocates its scratch once,
# so this amortises the allocation; it is small enough that uneven history lengths still
# balance across threads.
_TOPK_TASK = 8

# Prefetch distance, in positions, of the indexed (row-map) distance loop.
_PREFETCH = 16


@njit(inline="always")
def _distances(q, b, kh, n, d):
    """d[l] = Hamming distance of query b to the signature kh[l*W : (l+1)*W], for l < n.

    kh is one history's (L, W) keys flattened to 1-D. Indexing it as W*l + w with W a
    compile-time constant (one branch per common W) and no runtime offset lets LLVM see
    the stride-W interleaved loads and vectorise across positions (vpopcntq on AVX-512, a
    nibble lookup on AVX2). Measured at W = 4: 3-D indexing, a variable-trip loop over W,
    or even a runtime base offset added to the flat index all leave the loop scalar and
    about 2x slower (LLVM then cannot prove the loads consecutive), hence the per-history
    1-D view the callers pass.
    """
    W = q.shape[1]
    if W == 1:
        q0 = q[b, 0]
        for l in range(n):
            d[l] = popcount64(q0 ^ kh[l])
    elif W == 2:
        q0 = q[b, 0]
        q1 = q[b, 1]
        for l in range(n):
            i = 2 * l
            d[l] = popcount64(q0 ^ kh[i]) + popcount64(q1 ^ kh[i + 1])
    elif W == 3:
        q0 = q[b, 0]
        q1 = q[b, 1]
        q2 = q[b, 2]
        for l in range(n):
            i = 3 * l
            d[l] = (popcount64(q0 ^ kh[i]) + popcount64(q1 ^ kh[i + 1])
                    + popcount64(q2 ^ kh[i + 2]))
    elif W == 4:
        q0 = q[b, 0]
        q1 = q[b, 1]
        q2 = q[b, 2]
        q3 = q[b, 3]
        for l in range(n):
            i = 4 * l
            d[l] = (popcount64(q0 ^ kh[i]) + popcount64(q1 ^ kh[i + 1])
                    + popcount64(q2 ^ kh[i + 2]) + popcount64(q3 ^ kh[i + 3]))
    else:
        for l in range(n):
            i = W * l
            s = 0
            for w in range(W):
                s += popcount64(q[b, w] ^ kh[i + w])
            d[l] = s


@njit(inline="always")
def _histogram(d, n, sub, hist):
    """hist[v] = #{l < n : d[l] == v}.

    Four sub-histograms filled round-robin: consecutive equal distances (common with few
    hash bits) would otherwise serialise on one counter's load-increment-store chain.
    """
    sub[:, :] = 0
    n4 = n - n % 4
    for l in range(0, n4, 4):
        sub[0, d[l]] += 1
        sub[1, d[l + 1]] += 1
        sub[2, d[l + 2]] += 1
        sub[3, d[l + 3]] += 1
    for l in range(n4, n):
        sub[0, d[l]] += 1
    for v in range(hist.shape[0]):
        hist[v] = sub[0, v] + sub[1, v] + sub[2, v] + sub[3, v]


@njit(parallel=True, cache=True, nogil=True)
def hamming_distance(q, k, qi, ki, out):
    """out[n, l] = popcount(q[qi[n]] ^ k[ki[n], l]) summed over the W words.

    q (Nq, W) int64, k (Nk, L, W) int64, qi/ki (N,) int64, out (N, L) int32.
    """
    N, L = out.shape
    for n in prange(N):
        _distances(q, qi[n], k[ki[n]].reshape(-1), L, out[n])


@njit(inline="always")
def _distances_rows(q, b, kf, rows, n, d):
    """d[l] = Hamming distance of query b to table row rows[l], for l < n.

    kf is the (N, W) signature table flattened to 1-D, rows one history's row map. Same
    per-W branches as _distances with the loads indirected through rows[l]; LLVM still
    vectorises them (vpgatherqq + vpopcntq on AVX-512). The rows are random lines of a
    table in L3 or DRAM, invisible to the hardware prefetcher, so each iteration prefetches
    the row _PREFETCH positions ahead, clamped to the last valid position: only rows[:n] is
    ever read, padding entries of the map are never dereferenced. Measured at
    B = U = 256, L = 16384, W = 4, N = 351k: the prefetch makes hamming_topk_rows ~14%
    faster; gathering each history into a contiguous scratch and running _distances on it
    instead is ~20% slower than this loop.
    """
    W = q.shape[1]
    last = n - 1
    if W == 1:
        q0 = q[b, 0]
        for l in range(n):
            prefetch(kf, rows[min(l + _PREFETCH, last)])
            d[l] = popcount64(q0 ^ kf[rows[l]])
    elif W == 2:
        q0 = q[b, 0]
        q1 = q[b, 1]
        for l in range(n):
            prefetch(kf, 2 * rows[min(l + _PREFETCH, last)])
            i = 2 * rows[l]
            d[l] = popcount64(q0 ^ kf[i]) + popcount64(q1 ^ kf[i + 1])
    elif W == 3:
        q0 = q[b, 0]
        q1 = q[b, 1]
        q2 = q[b, 2]
        for l in range(n):
            prefetch(kf, 3 * rows[min(l + _PREFETCH, last)])
            i = 3 * rows[l]
            d[l] = (popcount64(q0 ^ kf[i]) + popcount64(q1 ^ kf[i + 1])
                    + popcount64(q2 ^ kf[i + 2]))
    elif W == 4:
        q0 = q[b, 0]
        q1 = q[b, 1]
        q2 = q[b, 2]
        q3 = q[b, 3]
        for l in range(n):
            prefetch(kf, 4 * rows[min(l + _PREFETCH, last)])
            i = 4 * rows[l]
            d[l] = (popcount64(q0 ^ kf[i]) + popcount64(q1 ^ kf[i + 1])
                    + popcount64(q2 ^ kf[i + 2]) + popcount64(q3 ^ kf[i + 3]))
    else:
        for l in range(n):
            # 5+ words: a row often spans two cache lines, prefetch both ends.
            j = W * rows[min(l + _PREFETCH, last)]
            prefetch(kf, j)
            prefetch(kf, j + W - 1)
            i = W * rows[l]
            s = 0
            for w in range(W):
                s += popcount64(q[b, w] ^ kf[i + w])
            d[l] = s


@njit(inline="always")
def _select_topk(d, n, topk, sentinel, sub, hist, dist_row, idx_row):
    """Write the topk smallest d[:n] (by (distance, position)) to dist_row/idx_row.

    Distances are small integers (0..64W), so instead of a heap or a sort this is a counting
    sort: histogram the distances, find the threshold distance t at which the cumulative
    count reaches kk = min(topk, n), then one pass in position order drops every position
    with distance < t, and the first (kk - #{d < t}) positions with distance t, straight
    into their final slot. Ties therefore stay in position order with no comparison at all.
    Slots [kk, topk) get idx -1 and dist sentinel. sub (4, sentinel) and hist (sentinel,)
    are scratch.
    """
    kk = min(topk, n)
    if kk > 0:
        _histogram(d, n, sub, hist)
        # Threshold t: #{d < t} = below < kk <= #{d <= t}.
        below = 0
        t = 0
        while below + hist[t] < kk:
            below += hist[t]
            t += 1
        # Turn the counts of distances < t into write cursors (exclusive prefix sum);
        # distance t's cursor starts right after them and stops at kk.
        pos = 0
        for v in range(t):
            c = hist[v]
            hist[v] = pos
            pos += c
        hist[t] = below
        filled = 0
        for l in range(n):
            v = np.int64(d[l])
            if v < t or (v == t and hist[t] < kk):
                p = hist[v]
                hist[v] = p + 1
                idx_row[p] = l
                dist_row[p] = v
                filled += 1
                if filled == kk:
                    break
    for p in range(max(kk, 0), topk):
        idx_row[p] = -1
        dist_row[p] = sentinel


@njit(parallel=True, cache=True, nogil=True)
def _topk(q, keys, rows, L, lengths, hist_index, topk, out_dist, out_idx, dtype_of_d):
    """The top-k of both forms. Dense (rows empty): keys (U, L*W), history u's keys flat in
    row u. Indexed: keys (N, W), position l of history u is row rows[u, l]. dtype_of_d, an
    empty array, gives the distance scratch its dtype (:func:`_distance_dtype`).

    Selection: a counting sort over the distances (_select_topk), so no heap and no sort.
    Memory per task: L distances + 64W+1 counters; nothing B x L.
    """
    B = q.shape[0]
    W = q.shape[1]
    indexed = rows.shape[0] > 0
    sentinel = 64 * W + 1
    kf = keys.reshape(-1)
    ntasks = (B + _TOPK_TASK - 1) // _TOPK_TASK
    for task in prange(ntasks):
        d = np.empty(L, dtype=dtype_of_d.dtype)
        hist = np.empty(sentinel, dtype=np.int64)
        sub = np.empty((4, sentinel), dtype=np.int32)
        for b in range(task * _TOPK_TASK, min(B, (task + 1) * _TOPK_TASK)):
            h = hist_index[b]
            n = min(lengths[h], L)
            if min(topk, n) > 0:
                if indexed:
                    _distances_rows(q, b, kf, rows[h], n, d)
                else:
                    _distances(q, b, keys[h], n, d)     # a 1-D view of history h's keys
            _select_topk(d, n, topk, sentinel, sub, hist, out_dist[b], out_idx[b])


_NO_ROWS = np.empty((0, 0), dtype=np.int64)


def _distance_dtype(W):
    """uint16 holds every distance for W <= 1023 (NB <= 65472 bits); halving the scratch
    versus uint32 keeps it in L1/L2 for histories of tens of thousands. Wider signatures
    (64 W >= 65536 would wrap) take uint32."""
    return np.empty(0, dtype=np.uint16 if 64 * W <= 0xFFFF else np.uint32)


def hamming_topk(q, k, lengths, hist_index, topk, out_dist, out_idx):
    """Per query b: the topk valid positions of history hist_index[b] with the smallest
    Hamming distance, ordered by (distance, position); empty slots get idx -1 and
    dist 64*W + 1.

    q (B, W) int64, k (U, L, W) int64, lengths (U,) int64, hist_index (B,) int64,
    out_dist (B, topk) int32, out_idx (B, topk) int64.
    """
    U, L, W = k.shape
    _topk(q, k.reshape(U, L * W), _NO_ROWS, L, lengths, hist_index, topk, out_dist, out_idx,
          _distance_dtype(W))


def hamming_topk_rows(q, k, rows, lengths, hist_index, topk, out_dist, out_idx):
    """hamming_topk over indexed histories: position l of history u has signature
    k[rows[u, l]]. Same output as hamming_topk(q, k[rows], ...) (positions l, not table
    rows); positions l >= lengths[u] are never read, so rows may hold anything there.

    q (B, W) int64, k (N, W) int64 table, rows (U, L) int64, lengths (U,) int64,
    hist_index (B,) int64, out_dist (B, topk) int32, out_idx (B, topk) int64.
    """
    if rows.shape[0] == 0:          # no history at all: every query's slots are empty
        out_idx[:] = -1
        out_dist[:] = 64 * q.shape[1] + 1
        return
    _topk(q, k, rows, rows.shape[1], lengths, hist_index, topk, out_dist, out_idx,
          _distance_dtype(q.shape[1]))
