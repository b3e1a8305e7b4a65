"""Hamming distance and fused Hamming top-k over SimHash signatures (DESIGN.md §4).

Signatures are int64 (..., W). A history tile is loaded as a (BLOCK, WP) block, WP = W
rounded up to a power of two, so each row's W words come in one contiguous load; padded
words are masked to 0 and XOR with a 0 query word, so they add nothing to the distance.

``hamming_topk`` never materialises the B×L distance matrix. One program owns one query:

1. pass 1 streams the valid part of the history and builds a histogram of distances
   (distances lie in [0, 64·W], so NBINS = next_pow2(64·W + 1) bins, a few hundred
   int32 counters in registers);
2. an inclusive cumsum of the histogram gives the threshold T, the smallest distance
   whose cumulative count reaches kk = min(topk, valid length), and start[d], the first
   output slot of distance d (exclusive cumsum);
3. pass 2 recomputes the distances and writes every selected position straight to its
   final slot start[d] + (rank among equal distances so far). Positions are visited in
   increasing order, so ranks among equal distances follow position order, which is the
   required (distance, position) tie-break. All positions with d < T are selected; of
   those with d == T only the first kk - count(d < T).

The rank of a position among equal distances = a running per-distance counter (a register
vector, read with ``tl.gather``) + its rank inside the current block (a BLOCK×BLOCK
comparison, which is why pass 2 uses a smaller block than pass 1).

``hamming_topk_rows`` is the same kernel over *indexed* histories (``INDEXED`` constexpr):
position l of history u has signature k[rows[u, l]] of an (N, W) table, so one table
serves histories that share items without materialising the (U, L, W) gather.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import device_guard, next_pow2, popcount64, use_hw_popcount

__all__ = ["hamming_distance", "hamming_topk", "hamming_topk_rows"]


@triton.jit
def _tile_distance(k_ptr, rows_ptr, q_words, offs_l, valid, offs_w, W: tl.constexpr,
                   HW_POPC: tl.constexpr, INDEXED: tl.constexpr):
    """Distances (BLOCK,) int32 of the positions offs_l of one history to one query.

    Dense (INDEXED false): k_ptr points at the history's first word, position l's words are
    k_ptr[l*W : (l+1)*W]; rows_ptr is unused. Indexed: k_ptr is the (N, W) table and
    rows_ptr the history's row map, position l's words are k_ptr[rows[l]*W : ...]; the row
    map is only loaded where valid, and an invalid position reads nothing (its row is
    masked, whatever value the map holds there). q_words is the query (WP,) int64.
    """
    if INDEXED:
        row = tl.load(rows_ptr + offs_l, mask=valid, other=0)
    else:
        row = offs_l.to(tl.int64)
    ptrs = k_ptr + row[:, None] * W + offs_w[None, :]
    m = valid[:, None] & (offs_w[None, :] < W)
    k = tl.load(ptrs, mask=m, other=0)
    return tl.sum(popcount64(k ^ q_words[None, :], HW_POPC), axis=1)


# --------------------------------------------------------------------------- distance

@triton.jit
def _hamming_distance_kernel(q_ptr, k_ptr, qi_ptr, ki_ptr, out_ptr, L,
                             W: tl.constexpr, WP: tl.constexpr, BLOCK_L: tl.constexpr,
                             HW_POPC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_w = tl.arange(0, WP)
    qrow = tl.load(qi_ptr + n)
    krow = tl.load(ki_ptr + n)
    q = tl.load(q_ptr + qrow * W + offs_w, mask=offs_w < W, other=0)
    valid = offs_l < L
    d = _tile_distance(k_ptr + krow * L * W, k_ptr, q, offs_l, valid, offs_w, W, HW_POPC,
                       False)
    tl.store(out_ptr + n * L + offs_l, d, mask=valid)


def hamming_distance(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor,
                     ki: torch.Tensor) -> torch.Tensor:
    """q (Nq, W), k (Nk, L, W) int64; qi, ki (N,) int64 row maps -> (N, L) int32.

    out[n, l] = popcount(q[qi[n]] ^ k[ki[n], l]) summed over the W words.
    """
    N = qi.shape[0]
    _, L, W = k.shape
    out = torch.empty((N, L), dtype=torch.int32, device=q.device)
    if N == 0 or L == 0:
        return out
    if W == 0:                      # NB == 0: every distance is 0
        return out.zero_()
    # Cap the tile at ~4K words so wide signatures do not blow up the register file.
    BLOCK_L = max(16, min(1024, next_pow2(L), 4096 // next_pow2(W)))
    grid = (N, triton.cdiv(L, BLOCK_L))
    with device_guard(q):
        _hamming_distance_kernel[grid](
            q, k, qi, ki, out, L, W=W, WP=next_pow2(W), BLOCK_L=BLOCK_L,
            HW_POPC=use_hw_popcount(), num_warps=4)
    return out


# --------------------------------------------------------------------------- top-k

@triton.jit
def _hamming_topk_kernel(q_ptr, k_ptr, rows_ptr, len_ptr, hist_ptr, dist_ptr, idx_ptr, L,
                         topk, W: tl.constexpr, WP: tl.constexpr, NBINS: tl.constexpr,
                         BLOCK1: tl.constexpr, BLOCK2: tl.constexpr,
                         HW_POPC: tl.constexpr, INDEXED: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    u = tl.load(hist_ptr + b)
    n_valid = tl.load(len_ptr + u).to(tl.int32)       # positions [0, n_valid) are valid
    kk = tl.minimum(n_valid, topk)                     # slots that get a real position
    if INDEXED:                                        # k: (N, W) table, rows: (U, L)
        k_hist_ptr = k_ptr
        rows_hist_ptr = rows_ptr + u * L
    else:                                              # k: (U, L, W); rows_ptr unused
        k_hist_ptr = k_ptr + u * L * W
        rows_hist_ptr = rows_ptr
    offs_w = tl.arange(0, WP)
    q = tl.load(q_ptr + b * W + offs_w, mask=offs_w < W, other=0)
    bins = tl.arange(0, NBINS)

    # ---- pass 1: histogram of the valid distances.
    hist = tl.zeros((NBINS,), dtype=tl.int32)
    for l0 in range(0, n_valid, BLOCK1):
        offs = l0 + tl.arange(0, BLOCK1)
        valid = offs < n_valid
        d = _tile_distance(k_hist_ptr, rows_hist_ptr, q, offs, valid, offs_w, W, HW_POPC,
                           INDEXED)
        hist += tl.histogram(d, NBINS, mask=valid)

    # ---- threshold and slot bases.
    cum = tl.cumsum(hist, axis=0)
    # kk == 0 (no valid position or topk == 0) makes T = 0 and selects nothing below.
    T = tl.min(tl.where(cum >= kk, bins, NBINS), axis=0)
    # base[d] = first slot of distance d (exclusive cumsum); pass 2 adds the positions of
    # distance d it has already passed, so base[d] + in-block rank is the final slot.
    base = cum - hist

    # ---- pass 2: place the selected positions.
    # Strictly-earlier mask for the in-block rank among equal distances.
    i2 = tl.arange(0, BLOCK2)
    earlier = i2[None, :] < i2[:, None]                # [i, j]: j comes before i
    n_done = tl.zeros((), dtype=tl.int32)
    l0 = tl.zeros((), dtype=tl.int32)
    # Stop as soon as all kk slots are written: the tail of the history is then skipped.
    while (l0 < n_valid) & (n_done < kk):
        offs = l0 + i2
        valid = offs < n_valid
        d = _tile_distance(k_hist_ptr, rows_hist_ptr, q, offs, valid, offs_w, W, HW_POPC,
                           INDEXED)
        # Only d <= T can be selected; clamping the rest keeps gather indices in range.
        cand = valid & (d <= T)
        dc = tl.where(cand, d, 0)
        same = (dc[:, None] == dc[None, :]) & cand[None, :] & earlier
        rank = tl.sum(same.to(tl.int32), axis=1)
        slot = tl.gather(base, dc, axis=0) + rank
        # For d < T, slot < cum[d] <= cum[T - 1] < kk always holds. For d == T the slot is
        # cum[T - 1] + rank among equal, so "slot < kk" keeps exactly the first
        # kk - count(d < T) positions at distance T, in position order.
        sel = cand & (slot < kk)
        tl.store(dist_ptr + b * topk + slot, d, mask=sel)
        tl.store(idx_ptr + b * topk + slot, offs.to(tl.int64), mask=sel)
        base += tl.histogram(dc, NBINS, mask=cand)
        n_done += tl.sum(sel.to(tl.int32), axis=0)
        l0 += BLOCK2

    # ---- tail: slots [kk, topk) are empty.
    for s0 in range((kk // BLOCK1) * BLOCK1, topk, BLOCK1):
        offs = s0 + tl.arange(0, BLOCK1)
        m = (offs >= kk) & (offs < topk)
        tl.store(dist_ptr + b * topk + offs, tl.full((BLOCK1,), 64 * W + 1, tl.int32), mask=m)
        tl.store(idx_ptr + b * topk + offs, tl.full((BLOCK1,), -1, tl.int64), mask=m)


def _topk_launch(q, k, rows, lengths, hist_index, topk, L, indexed):
    """Shared launcher of the dense and indexed top-k: outputs, early exits, block sizes."""
    B, W = q.shape
    topk = int(topk)
    dev = q.device
    # L == 0, or an empty table (then every length is 0): no valid position anywhere.
    if B == 0 or topk == 0 or L == 0 or (indexed and k.shape[0] == 0):
        return (torch.full((B, topk), 64 * W + 1, dtype=torch.int32, device=dev),
                torch.full((B, topk), -1, dtype=torch.int64, device=dev))
    dist = torch.empty((B, topk), dtype=torch.int32, device=dev)
    idx = torch.empty((B, topk), dtype=torch.int64, device=dev)
    WP = next_pow2(W)
    NBINS = next_pow2(64 * W + 1)
    # Pass 1 is cheap per element (load, popcount, histogram): a wide block. Pass 2 pays a
    # BLOCK2×BLOCK2 rank comparison: a narrow one. Both shrink for short histories.
    BLOCK1 = max(16, min(1024 // WP, next_pow2(L)))
    BLOCK2 = max(16, min(64, next_pow2(L)))
    with device_guard(q):
        _hamming_topk_kernel[(B,)](
            q, k, rows, lengths, hist_index, dist, idx, L, topk,
            W=W, WP=WP, NBINS=NBINS, BLOCK1=BLOCK1, BLOCK2=BLOCK2,
            HW_POPC=use_hw_popcount(), INDEXED=indexed, num_warps=4)
    return dist, idx


def hamming_topk(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor,
                 hist_index: torch.Tensor, topk: int):
    """q (B, W), k (U, L, W) int64, lengths (U,), hist_index (B,) int64.

    Returns (dist (B, topk) int32, idx (B, topk) int64): the topk valid positions of each
    query's history with the smallest distance, ordered by (distance, position); empty
    slots hold idx = -1 and dist = 64·W + 1.
    """
    # rows is unused by the dense kernel: k stands in for the pointer.
    return _topk_launch(q, k, k, lengths, hist_index, topk, k.shape[1], False)


def hamming_topk_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor,
                      lengths: torch.Tensor, hist_index: torch.Tensor, topk: int):
    """q (B, W), k (N, W) int64 table, rows (U, L) int64, lengths (U,), hist_index (B,).

    Position l of history u has signature k[rows[u, l]]; positions l >= lengths[u] are never
    read (rows may hold anything there, e.g. -1). Returns what
    ``hamming_topk(q, k[rows], lengths, hist_index, topk)`` returns: positions l, not table
    rows, ordered by (distance, position), empty slots idx = -1 and dist = 64·W + 1.
    """
    return _topk_launch(q, k, rows, lengths, hist_index, topk, rows.shape[1], True)
