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

Very wide signatures (W >= 512 words, 32768 bits) have more distance bins than a program's
histogram can hold (:data:`MAX_BINS`); they take :func:`_topk_by_distances` instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._bits import device_guard, next_pow2, popcount64, use_hw_popcount

__all__ = ["hamming_distance", "hamming_topk", "hamming_topk_rows"]

# The most histogram bins (BLOCK_B·NBINS int32) one top-k program holds: 128 KB, which fits
# the 227 KB of shared memory a block may use on H100/H200 next to its cumsum. Beyond it
# (W >= 512 at BLOCK_B = 1; query tiles stop at W >= 128) compiling still succeeds but the
# launch fails for lack of shared memory.
MAX_BINS = 32768


@triton.jit
def _key_tile(k_ptr, rows_ptr, offs_l, valid, offs_w, W: tl.constexpr, INDEXED: tl.constexpr):
    """Signature words (BLOCK, WP) int64 of the positions offs_l of one history.

    Dense (INDEXED false): k_ptr points at the history's first word, position l's words are
    k_ptr[l*W : (l+1)*W]; rows_ptr is unused. Indexed: k_ptr is the (N, W) table and
    rows_ptr the history's row map, position l's words are k_ptr[rows[l]*W : ...]; the row
    map is only loaded where valid, and an invalid position reads nothing (its row is
    masked, whatever value the map holds there). Padded words and invalid rows are 0.
    """
    if INDEXED:
        row = tl.load(rows_ptr + offs_l, mask=valid, other=0)
    else:
        row = offs_l.to(tl.int64)
    ptrs = k_ptr + row[:, None] * W + offs_w[None, :]
    m = valid[:, None] & (offs_w[None, :] < W)
    return tl.load(ptrs, mask=m, other=0)


@triton.jit
def _tile_distances(k_tile, q_tile, HW_POPC: tl.constexpr):
    """Distances (BLOCK_B, BLOCK) int32 of BLOCK_B queries (BLOCK_B, WP) to a key tile
    (BLOCK, WP): the key tile is loaded once and serves every query of the tile."""
    return tl.sum(popcount64(k_tile[None, :, :] ^ q_tile[:, None, :], HW_POPC), axis=2)


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
    kt = _key_tile(k_ptr + krow * L * W, k_ptr, offs_l, valid, offs_w, W, False)
    d = tl.sum(_tile_distances(kt, q[None, :], HW_POPC), axis=0)   # (1, BLOCK_L) -> (BLOCK_L,)
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
def _hamming_topk_kernel(q_ptr, k_ptr, rows_ptr, len_ptr, hist_ptr, dist_ptr, idx_ptr, B, L,
                         topk, CHUNK, S, W: tl.constexpr, WP: tl.constexpr,
                         NBINS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK1: tl.constexpr,
                         BLOCK2: tl.constexpr, HW_POPC: tl.constexpr, INDEXED: tl.constexpr):
    """Program (t, s): queries [t·BLOCK_B, (t+1)·BLOCK_B) over positions
    [s·CHUNK, (s+1)·CHUNK) of their history, into out[b, s, :topk] (out is (B, S, topk)).

    The launcher guarantees that the queries of one tile share their history (BLOCK_B = 1,
    or one shared history U = 1), so each key tile is loaded once for all of them.
    """
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    rb = tl.arange(0, BLOCK_B)
    b = t * BLOCK_B + rb                               # (BLOCK_B,) query rows
    row_ok = b < B
    u = tl.load(hist_ptr + t * BLOCK_B)                # the tile's (shared) history
    n_valid = tl.load(len_ptr + u).to(tl.int32)        # positions [0, n_valid) are valid
    c0 = (s * CHUNK).to(tl.int32)                      # this program's positions [c0, c1)
    c1 = tl.minimum(c0 + CHUNK, n_valid)
    # Slots that get a real position, per query row (0 for rows past B).
    kk = tl.where(row_ok, tl.maximum(tl.minimum(c1 - c0, topk), 0), 0)
    if INDEXED:                                        # k: (N, W) table, rows: (U, L)
        k_hist_ptr = k_ptr
        rows_hist_ptr = rows_ptr + u * L
    else:                                              # k: (U, L, W); rows_ptr unused
        k_hist_ptr = k_ptr + u * L * W
        rows_hist_ptr = rows_ptr
    offs_w = tl.arange(0, WP)
    q = tl.load(q_ptr + b[:, None] * W + offs_w[None, :],
                mask=row_ok[:, None] & (offs_w < W)[None, :], other=0)     # (BLOCK_B, WP)
    bins = tl.arange(0, NBINS)
    # Row r's histogram lives in bins [r·NBINS, (r+1)·NBINS) of one flat histogram.
    row_bins = (rb * NBINS)[:, None]
    out_row = (b * S + s) * topk                       # (BLOCK_B,) first slot of each row

    # ---- pass 1: histogram of the valid distances, per query row.
    hist = tl.zeros((BLOCK_B * NBINS,), dtype=tl.int32)
    for l0 in range(c0, c1, BLOCK1):
        offs = l0 + tl.arange(0, BLOCK1)
        valid = offs < c1
        d = _tile_distances(_key_tile(k_hist_ptr, rows_hist_ptr, offs, valid, offs_w, W,
                                      INDEXED), q, HW_POPC)
        m = row_ok[:, None] & valid[None, :]
        hist += tl.histogram(tl.reshape(d + row_bins, (BLOCK_B * BLOCK1,)), BLOCK_B * NBINS,
                             mask=tl.reshape(m, (BLOCK_B * BLOCK1,)))

    # ---- threshold and slot bases, per row.
    hist2 = tl.reshape(hist, (BLOCK_B, NBINS))
    cum = tl.cumsum(hist2, axis=1)
    # kk == 0 (no valid position, or a row past B) makes T = 0 and selects nothing below.
    T = tl.min(tl.where(cum >= kk[:, None], bins[None, :], NBINS), axis=1)      # (BLOCK_B,)
    # base[d] = first slot of distance d (exclusive cumsum); pass 2 adds the positions of
    # distance d it has already passed, so base[d] + in-block rank is the final slot.
    base = tl.reshape(cum - hist2, (BLOCK_B * NBINS,))

    # ---- pass 2: place the selected positions.
    # Strictly-earlier mask for the in-block rank among equal distances.
    i2 = tl.arange(0, BLOCK2)
    earlier = (i2[None, :] < i2[:, None])[None, :, :]  # [., i, j]: j comes before i
    n_done = tl.zeros((BLOCK_B,), dtype=tl.int32)
    l0 = c0
    # Stop as soon as every row has its kk slots: the tail of the chunk is then skipped.
    while (l0 < c1) & (tl.sum((n_done < kk).to(tl.int32), axis=0) > 0):
        offs = l0 + i2
        valid = offs < c1
        d = _tile_distances(_key_tile(k_hist_ptr, rows_hist_ptr, offs, valid, offs_w, W,
                                      INDEXED), q, HW_POPC)               # (BLOCK_B, BLOCK2)
        # Only d <= T can be selected; clamping the rest keeps gather indices in range.
        cand = row_ok[:, None] & valid[None, :] & (d <= T[:, None])
        dc = tl.where(cand, d, 0)
        same = (dc[:, :, None] == dc[:, None, :]) & cand[:, None, :] & earlier
        rank = tl.sum(same.to(tl.int32), axis=2)
        flat = tl.reshape(dc + row_bins, (BLOCK_B * BLOCK2,))
        slot = tl.reshape(tl.gather(base, flat, axis=0), (BLOCK_B, BLOCK2)) + rank
        # For d < T, slot < cum[d] <= cum[T - 1] < kk always holds. For d == T the slot is
        # cum[T - 1] + rank among equal, so "slot < kk" keeps exactly the first
        # kk - count(d < T) positions at distance T, in position order.
        sel = cand & (slot < kk[:, None])
        dst = out_row[:, None] + slot
        tl.store(dist_ptr + dst, d, mask=sel)
        tl.store(idx_ptr + dst, tl.broadcast_to(offs.to(tl.int64)[None, :], (BLOCK_B, BLOCK2)),
                 mask=sel)
        base += tl.histogram(flat, BLOCK_B * NBINS,
                             mask=tl.reshape(cand, (BLOCK_B * BLOCK2,)))
        n_done += tl.sum(sel.to(tl.int32), axis=1)
        l0 += BLOCK2

    # ---- tail: slots [kk, topk) are empty.
    k_lo = tl.min(tl.where(row_ok, kk, topk), axis=0)
    for s0 in range((k_lo // BLOCK1) * BLOCK1, topk, BLOCK1):
        offs = s0 + tl.arange(0, BLOCK1)
        m = row_ok[:, None] & (offs[None, :] >= kk[:, None]) & (offs < topk)[None, :]
        dst = out_row[:, None] + offs[None, :]
        tl.store(dist_ptr + dst, tl.full((BLOCK_B, BLOCK1), 64 * W + 1, tl.int32), mask=m)
        tl.store(idx_ptr + dst, tl.full((BLOCK_B, BLOCK1), -1, tl.int64), mask=m)


def _sm_count(dev: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the interpreter: 1, it gains nothing)."""
    if dev.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(dev).multi_processor_count


def topk_plan(B: int, U: int, L: int, W: int, topk: int, sms: int,
              block_b: Optional[int] = None, splits: Optional[int] = None):
    """(BLOCK_B, S): queries per program and programs per history (split of L).

    * Many queries on one shared history (U = 1, B ≥ 4 programs per SM): BLOCK_B = 4
      queries per program, so each key tile is loaded once for four queries (queries of
      different histories share nothing, so they keep one program each).
    * Few programs (fewer than 2 per SM, e.g. B = 1-16): L is split into S chunks of at
      least max(2048, 8·topk) positions, each chunk's top-k is a program of its own, and
      the S partial top-k lists are merged (B·S·topk candidates, a small sort).

    ``block_b`` / ``splits`` force either choice (tests run the tiled and split paths on
    the interpreter; a split is still capped so each chunk has at least one position).
    """
    if block_b is None:
        tile = U == 1 and B >= 4 * 4 * sms and 4 * next_pow2(64 * W + 1) <= MAX_BINS
        block_b = 4 if tile else 1
    if block_b > 1 and U != 1:
        raise ValueError("query tiles need one shared history (U == 1)")
    programs = triton.cdiv(B, block_b) if B else 1
    if splits is None:
        min_chunk = max(2048, 8 * topk)
        splits = 1
        if programs < 2 * sms and L >= 2 * min_chunk:
            splits = min(triton.cdiv(2 * sms, programs), L // min_chunk)
    splits = max(1, min(int(splits), max(L, 1)))
    return block_b, splits


def _topk_launch(q, k, rows, lengths, hist_index, topk, L, indexed, block_b=None,
                 splits=None):
    """Shared launcher of the dense and indexed top-k: outputs, early exits, tiling, the
    split of L and the merge of the partial lists."""
    B, W = q.shape
    topk = int(topk)
    dev = q.device
    empty = 64 * W + 1
    # L == 0, or an empty table (then every length is 0): no valid position anywhere.
    if B == 0 or topk == 0 or L == 0 or (indexed and k.shape[0] == 0):
        return (torch.full((B, topk), empty, dtype=torch.int32, device=dev),
                torch.full((B, topk), -1, dtype=torch.int64, device=dev))
    U = lengths.shape[0]
    if next_pow2(64 * W + 1) > MAX_BINS:
        return _topk_by_distances(q, k, rows, lengths, hist_index, topk, L, indexed)
    BLOCK_B, S = topk_plan(B, U, L, W, topk, _sm_count(dev), block_b, splits)
    WP = next_pow2(W)
    NBINS = next_pow2(64 * W + 1)
    # Pass 1 is cheap per element (load, popcount, histogram): a wide block. Pass 2 pays a
    # BLOCK2×BLOCK2 rank comparison per query: a narrow one. Both shrink for short
    # histories and for query tiles (the register tile holds BLOCK_B rows).
    CHUNK = triton.cdiv(L, S)
    BLOCK1 = max(16, min(1024 // (WP * BLOCK_B), next_pow2(CHUNK)))
    BLOCK2 = max(16, min(64 // BLOCK_B, next_pow2(CHUNK)))
    CHUNK = triton.cdiv(CHUNK, BLOCK1) * BLOCK1      # chunks start on block boundaries
    S = triton.cdiv(L, CHUNK)
    dist = torch.empty((B, S, topk), dtype=torch.int32, device=dev)
    idx = torch.empty((B, S, topk), dtype=torch.int64, device=dev)
    with device_guard(q):
        _hamming_topk_kernel[(triton.cdiv(B, BLOCK_B), S)](
            q, k, rows, lengths, hist_index, dist, idx, B, L, topk, CHUNK, S,
            W=W, WP=WP, NBINS=NBINS, BLOCK_B=BLOCK_B, BLOCK1=BLOCK1, BLOCK2=BLOCK2,
            HW_POPC=use_hw_popcount(), INDEXED=indexed, num_warps=4)
    if S == 1:
        return dist.view(B, topk), idx.view(B, topk)
    # Merge: each chunk's list is ordered by (distance, position) and positions are unique,
    # so the order key orders the union exactly; empty slots last.
    dist, idx = dist.view(B, S * topk), idx.view(B, S * topk)
    key = _order_key(dist, idx, idx >= 0, L)
    order = torch.topk(key, topk, dim=1, largest=False, sorted=True).indices
    return dist.gather(1, order), idx.gather(1, order)


_NEVER = torch.iinfo(torch.int64).max      # the key of no position: after every real one


def _order_key(dist: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
               L: int) -> torch.Tensor:
    """int64 key distance·(L+1) + position where ``valid`` (``_NEVER`` elsewhere): its
    ascending order is the contract's (distance, position) order."""
    return torch.where(valid, dist.to(torch.int64) * (L + 1) + pos, _NEVER)


def _topk_by_distances(q, k, rows, lengths, hist_index, topk, L, indexed):
    """The top-k of signatures too wide for the histogram (> MAX_BINS bins): distances of
    chunks of L from the distance kernel, merged chunk by chunk with ``torch.topk`` on
    :func:`_order_key`, as the L split's partial lists are. Memory stays O(B·chunk) (plus a
    (U, chunk, W) copy of the histories' chunk), never (B, L)."""
    B, W = q.shape
    dev = q.device
    U = lengths.shape[0]
    best = torch.full((B, topk), _NEVER, dtype=torch.int64, device=dev)
    qi = torch.arange(B, device=dev)
    n_valid = lengths[hist_index]
    chunk = max(1, min(L, (1 << 22) // B, (1 << 24) // max(U * W, 1)))
    for c0 in range(0, L, chunk):
        pos = torch.arange(c0, min(L, c0 + chunk), device=dev)
        if indexed:          # rows past a length may hold anything: read row 0 there
            r = torch.where(pos < lengths[:, None], rows[:, c0:c0 + chunk], 0)
            sig = k[r]
        else:
            sig = k[:, c0:c0 + chunk].contiguous()
        d = hamming_distance(q, sig, qi, hist_index)             # (B, chunk)
        key = _order_key(d, pos, pos < n_valid[:, None], L)
        best = torch.topk(torch.cat([best, key], 1), topk, dim=1, largest=False,
                          sorted=True).values
    empty = best == _NEVER
    dist = torch.where(empty, 64 * W + 1, best // (L + 1)).to(torch.int32)
    return dist, torch.where(empty, -1, best % (L + 1))


def hamming_topk(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor,
                 hist_index: torch.Tensor, topk: int, *, block_b: Optional[int] = None,
                 splits: Optional[int] = None):
    """q (B, W), k (U, L, W) int64, lengths (U,), hist_index (B,) int64.

    Returns (dist (B, topk) int32, idx (B, topk) int64): the topk valid positions of each
    query's history with the smallest distance, ordered by (distance, position); empty
    slots hold idx = -1 and dist = 64·W + 1. ``block_b``/``splits`` force the tiling
    (see :func:`topk_plan`).
    """
    # rows is unused by the dense kernel: k stands in for the pointer.
    return _topk_launch(q, k, k, lengths, hist_index, topk, k.shape[1], False, block_b,
                        splits)


def hamming_topk_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor,
                      lengths: torch.Tensor, hist_index: torch.Tensor, topk: int, *,
                      block_b: Optional[int] = None, splits: Optional[int] = None):
    """q (B, W), k (N, W) int64 table, rows (U, L) int64, lengths (U,), hist_index (B,).

    Position l of history u has signature k[rows[u, l]]; positions l >= lengths[u] are never
    read (rows may hold anything there, e.g. -1). Returns what
    ``hamming_topk(q, k[rows], lengths, hist_index, topk)`` returns: positions l, not table
    rows, ordered by (distance, position), empty slots idx = -1 and dist = 64·W + 1.
    """
    return _topk_launch(q, k, rows, lengths, hist_index, topk, rows.shape[1], True, block_b,
                        splits)
