"""Deduplication of history ids into a signature table and row map, numba CPU kernel.

``unique_rows(ids, lengths, hist_rows) -> unique_ids`` turns (U, L) item ids into the
distinct ids (in order of first occurrence) and, per position, the index of its id in that
list, the ``rows`` argument of ``hamming_topk_rows``. Hash-based (no sort), parallel and
deterministic: see ``unique_rows``.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from ._bits import prefetch

__all__ = ["unique_rows"]

# Fewest flat positions (u * L + l) per parallel chunk: smaller inputs use fewer threads.
_MIN_CHUNK = 1 << 16
# Prefetch distance (keys) of the hash-table lookups.
_PREFETCH = 8

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


@njit(inline="always")
def _mix(key):
    """splitmix64 finaliser: a bijective 64-bit mixer whose low bits (the slot) depend on
    every bit of the key, so structured ids (multiples, sequences) still spread."""
    z = np.uint64(key)
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(inline="always")
def _insert(tab, mask, key, val):
    """Insert a key known to be absent into tab (slot s: tab[2s] key, tab[2s+1] value,
    value -1 = empty slot; keys are arbitrary int64, so emptiness lives in the value)."""
    s = np.int64(_mix(key) & np.uint64(mask))
    while tab[2 * s + 1] != -1:
        s = (s + 1) & mask
    tab[2 * s] = key
    tab[2 * s + 1] = val


@njit(inline="always")
def _grow(tab, mask):
    """A table of twice the capacity holding tab's entries."""
    cap = 2 * (mask + 1)
    new = np.empty(2 * cap, dtype=np.int64)
    new[1::2] = -1
    for s in range(mask + 1):
        v = tab[2 * s + 1]
        if v != -1:
            _insert(new, cap - 1, tab[2 * s], v)
    return new


@njit(nogil=True)
def _dedup(tab, nd, keys, a, b, out, uniq, ubase):
    """Look up keys[a:b] in order in the hash table tab holding nd distinct keys; a key not
    in it gets index nd (then nd + 1, ...) and is appended to uniq[ubase + index].
    out[i] = index of keys[i]. Returns the table (a new one when it had to grow) and nd.

    The probe loop is written out here, not in a helper taking the arrays: numba's IR
    inlining would incref/decref them on every key (~3x slower, measured).
    """
    cap = tab.shape[0] // 2
    mask = cap - 1
    last = b - 1
    for i in range(a, b):
        # The slot of the key _PREFETCH ahead (with the current mask; a hint only).
        ahead = keys[min(i + _PREFETCH, last)]
        prefetch(tab, 2 * np.int64(_mix(ahead) & np.uint64(mask)))
        key = keys[i]
        s = np.int64(_mix(key) & np.uint64(mask))
        while True:
            v = tab[2 * s + 1]
            if v == -1:                      # absent: insert as nd
                if 2 * (nd + 1) > cap:       # keep the load factor <= 1/2
                    tab = _grow(tab, mask)
                    cap *= 2
                    mask = cap - 1
                    _insert(tab, mask, key, nd)
                else:
                    tab[2 * s] = key
                    tab[2 * s + 1] = nd
                uniq[ubase + nd] = key
                out[i] = nd
                nd += 1
                break
            if tab[2 * s] == key:
                out[i] = v
                break
            s = (s + 1) & mask
    return tab, nd


@njit(inline="always")
def _new_table(cap):
    tab = np.empty(2 * cap, dtype=np.int64)
    tab[1::2] = -1
    return tab


@njit(parallel=True, cache=True, nogil=True)
def _unique_rows(ids, lengths, hist_rows, nchunks):
    """unique_rows with the positions cut into (at most) nchunks chunks."""
    U, L = ids.shape
    F = U * L
    idf = ids.reshape(-1)
    hrf = hist_rows.reshape(-1)
    C = max(1, min(nchunks, F // _MIN_CHUNK))
    bound = np.empty(C + 1, dtype=np.int64)     # chunk c: flat positions [bound[c], bound[c+1])
    for c in range(C + 1):
        bound[c] = F * c // C
    # start[c] = valid positions before chunk c: chunk c's distinct ids go to
    # local[start[c] : start[c] + nloc[c]].
    start = np.zeros(C + 1, dtype=np.int64)
    for c in range(C):
        f0 = bound[c]
        f1 = bound[c + 1]
        nv = 0
        if f1 > f0:
            for u in range(f0 // L, (f1 - 1) // L + 1):
                nv += max(min(f1 - u * L, L, lengths[u]) - max(f0 - u * L, 0), 0)
        start[c + 1] = start[c] + nv
    total = start[C]

    # ---- 1. per-chunk dedup.
    local = np.empty(total, dtype=np.int64)
    nloc = np.zeros(C, dtype=np.int64)
    for c in prange(C):
        f0 = bound[c]
        f1 = bound[c + 1]
        if f1 > f0:
            tab = _new_table(1024)
            nd = 0
            for u in range(f0 // L, (f1 - 1) // L + 1):
                lo = max(f0 - u * L, 0)
                hi = min(f1 - u * L, L)
                n = min(hi, max(lengths[u], lo))
                row = u * L
                tab, nd = _dedup(tab, nd, idf, row + lo, row + n, hrf, local, start[c])
                for l in range(n, hi):
                    hrf[row + l] = -1
            nloc[c] = nd

    if C == 1:
        return local[:nloc[0]].copy()

    # ---- 2. merge the chunks' distinct ids, in chunk order.
    gmap = np.empty(total, dtype=np.int64)          # chunk-local index -> global index
    uniq = np.empty(total, dtype=np.int64)
    # Room for chunk 0's ids at load <= 1/4, so the later chunks' new ids rarely force a
    # rehash.
    cap = 1024
    while cap < 4 * nloc[0]:
        cap *= 2
    tab = _new_table(cap)
    nd = 0
    for c in range(C):
        tab, nd = _dedup(tab, nd, local, start[c], start[c] + nloc[c], gmap, uniq, 0)

    # ---- 3. chunk-local -> global indices (chunk 0's local indices are global). Each of
    # chunks 1..C-1 is cut into C pieces so that all threads share the work.
    for j in prange((C - 1) * C):
        c = 1 + j // C
        s = j % C
        span = bound[c + 1] - bound[c]
        f0 = bound[c] + span * s // C
        f1 = bound[c] + span * (s + 1) // C
        base = start[c]
        if f1 > f0:
            for u in range(f0 // L, (f1 - 1) // L + 1):
                lo = max(f0 - u * L, 0)
                n = min(f1 - u * L, L, lengths[u])
                row = u * L
                for l in range(lo, n):
                    hrf[row + l] = gmap[base + hrf[row + l]]
    return uniq[:nd].copy()


def unique_rows(ids, lengths, hist_rows):
    """Distinct ids over the valid positions, in order of first occurrence (u, then l).

    ids (U, L) int64 (any values), lengths (U,) int64 in [0, L], hist_rows (U, L) int64
    output: hist_rows[u, l] = index of ids[u, l] in the result for l < lengths[u], -1 for
    l >= lengths[u]. Returns unique_ids (N,) int64.

    Hash tables (open addressing, linear probing, splitmix64, load factor <= 1/2). The
    flat positions u * L + l are cut into C consecutive chunks, one per numba thread:

    1. in parallel, each chunk dedups its ids with a private table: its distinct ids in
       order of first occurrence within the chunk, and per position a chunk-local index
       (written to hist_rows);
    2. sequentially, chunk after chunk, the chunks' distinct ids go through one table; an
       id not yet in it gets the next index. Chunks are consecutive and each chunk's list
       is in first-occurrence order, so this numbers the ids exactly in global
       first-occurrence order, whatever C is. Only each chunk's distinct ids are looked up
       here, not every position;
    3. in parallel, hist_rows maps chunk-local indices to global ones (chunk 0's are
       already global).

    The output is the same for every C (the thread count only changes the split), and
    C = 1 is the plain sequential single-table pass.
    """
    # The thread count is read here, not in the kernel: get_num_threads() inside @njit
    # makes the function uncacheable. It only sets the split, never the result.
    return _unique_rows(ids, lengths, hist_rows, get_num_threads())
