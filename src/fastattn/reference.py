"""Pure-PyTorch definition of every fastattn op: the spec in code.

Every backend is tested against these functions, and they are the last-resort backend
(``FASTATTN_BACKEND=torch``). They favour clarity over speed, but never copy a shared
history B times (they index it through ``hist_index``).

Inputs here are assumed valid (the op layer in :mod:`fastattn.ops` checks them);
``lengths`` and ``hist_index`` may be ``None`` with the meaning of DESIGN.md §3.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "words_for_bits", "sentinel_distance", "default_hist_index", "default_lengths",
    "make_planes", "simhash_sign", "popcount64", "hamming_distance", "hamming_topk",
    "topk_gather", "topk_gather_backward",
]


def words_for_bits(nbits: int) -> int:
    """W = ceil(NB / 64): int64 words per signature."""
    return (nbits + 63) // 64


def sentinel_distance(words: int) -> int:
    """Distance reported for empty top-k slots: 64·W + 1, larger than any real distance."""
    return 64 * words + 1


def default_hist_index(batch: int, histories: int, device) -> Tensor:
    """hist_index when None: row b reads history b (U == B) or the shared history 0 (U == 1)."""
    if histories == batch:
        return torch.arange(batch, dtype=torch.int64, device=device)
    if histories == 1:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    raise ValueError(f"hist_index is None, so the number of histories U={histories} must equal "
                     f"the number of queries B={batch} or be 1")


def default_lengths(histories: int, length: int, device) -> Tensor:
    return torch.full((histories,), length, dtype=torch.int64, device=device)


# --------------------------------------------------------------------------- SimHash

def make_planes(dim: int, nbits: int, generator: Optional[torch.Generator] = None,
                dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Gaussian random hyperplanes (D, NB) for :func:`simhash_sign`."""
    return torch.randn(dim, nbits, generator=generator, dtype=dtype, device=device)


# Bit weights 2**j for j in [0, 64) as int64 (bit 63 is the sign bit: -2**63).
def _bit_weights(device) -> Tensor:
    w = torch.ones(64, dtype=torch.int64, device=device) << torch.arange(64, device=device)
    return w


def simhash_sign(x: Tensor, planes: Tensor) -> Tensor:
    """x (..., D) float, planes (D, NB) float -> (..., W) int64.

    Bit j (word j // 64, bit j % 64, LSB first) is 1 iff (x @ planes)[..., j] > 0, computed
    with fp32 accumulation (fp64 for fp64 inputs). Bits at positions >= NB are 0. NaN
    projections compare false, so a NaN input gives 0 bits.
    """
    acc = torch.float64 if (x.dtype == torch.float64 or planes.dtype == torch.float64) \
        else torch.float32
    nbits = planes.shape[1]
    words = words_for_bits(nbits)
    proj = x.to(acc) @ planes.to(acc)                          # (..., NB)
    bits = (proj > 0).to(torch.int64)
    pad = words * 64 - nbits
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*bits.shape[:-1], words, 64)
    # Sum of distinct powers of two == bitwise OR; int64 wraps for bit 63 as intended.
    return (bits * _bit_weights(x.device)).sum(-1)


# --------------------------------------------------------------------------- Hamming

_M1, _M2, _M4, _H01 = (0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F,
                       0x0101010101010101)


def popcount64(x: Tensor) -> Tensor:
    """Popcount of each int64 element, as int32 (torch has no popcount op).

    SWAR bit count: the masks have bit 63 clear, so arithmetic right shifts are harmless,
    and the final byte sum (<= 64) cannot reach the sign bit.
    """
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return ((x * _H01) >> 56).to(torch.int32)


def hamming_distance(q_sig: Tensor, k_sig: Tensor) -> Tensor:
    """q_sig (..., W), k_sig (..., L, W) -> (..., L) int32, broadcasting the leading dims."""
    x = torch.bitwise_xor(q_sig.unsqueeze(-2), k_sig)          # (..., L, W)
    return popcount64(x).sum(-1, dtype=torch.int32)


_CHUNK = 64  # queries per distance chunk in the oracle: bounds its (chunk, L, W) temporaries


def hamming_topk(q_sig: Tensor, k_sig: Tensor, k: int, lengths: Optional[Tensor] = None,
                 hist_index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """q_sig (B, W), k_sig (U, L, W) -> (dist (B, k) int32, idx (B, k) int64).

    The k valid positions of each query's history with the smallest Hamming distance,
    ordered by (distance, position) ascending. Missing slots: idx = -1, dist = 64·W + 1.
    """
    B, W = q_sig.shape
    U, L, _ = k_sig.shape
    dev = q_sig.device
    hist = default_hist_index(B, U, dev) if hist_index is None else hist_index
    lens = default_lengths(U, L, dev) if lengths is None else lengths
    sentinel = sentinel_distance(W)
    dist = torch.full((B, k), sentinel, dtype=torch.int32, device=dev)
    idx = torch.full((B, k), -1, dtype=torch.int64, device=dev)
    if B == 0 or L == 0:
        return dist, idx
    # Distances per history in query chunks: never (B, L, W), and (B, L) only in the oracle.
    d = torch.empty(B, L, dtype=torch.int64, device=dev)
    for u in torch.unique(hist).tolist():
        rows = (hist == u).nonzero().squeeze(1)
        for c in range(0, rows.numel(), _CHUNK):
            r = rows[c:c + _CHUNK]
            d[r] = hamming_distance(q_sig[r], k_sig[u].unsqueeze(0)).to(torch.int64)
    pos = torch.arange(L, device=dev)
    valid = pos.unsqueeze(0) < lens[hist].unsqueeze(1)         # (B, L)
    # Unique sort key (distance, position); invalid positions go past every valid one.
    key = torch.where(valid, d * L + pos, torch.full_like(d, (sentinel + 1) * L))
    kk = min(k, L)
    top_key, top_pos = torch.topk(key, kk, dim=1, largest=False, sorted=True)
    ok = top_key < (sentinel + 1) * L
    dist[:, :kk] = torch.where(ok, top_key // L, torch.full_like(top_key, sentinel)).to(torch.int32)
    idx[:, :kk] = torch.where(ok, top_pos, torch.full_like(top_pos, -1))
    return dist, idx


# --------------------------------------------------------------------------- gather

def topk_gather(values: Tensor, idx: Tensor, hist_index: Optional[Tensor] = None) -> Tensor:
    """values (U, L, Dv), idx (B, k) -> (B, k, Dv); idx = -1 gives a zero row."""
    B = idx.shape[0]
    U, L, Dv = values.shape
    hist = default_hist_index(B, U, values.device) if hist_index is None else hist_index
    # Row U·L of the flattened table is an appended zero row: the target of idx = -1.
    table = torch.cat([values.reshape(U * L, Dv), values.new_zeros(1, Dv)])
    flat = torch.where(idx >= 0, hist.unsqueeze(1) * L + idx, U * L)
    return table[flat]


def topk_gather_backward(grad: Tensor, idx: Tensor, hist_index: Optional[Tensor],
                         U: int, L: int) -> Tensor:
    """grad (B, k, Dv) -> grad of values (U, L, Dv): scatter-add of the rows with idx >= 0."""
    B, K, Dv = grad.shape
    hist = default_hist_index(B, U, grad.device) if hist_index is None else hist_index
    out = torch.zeros(U * L, Dv, dtype=grad.dtype, device=grad.device)
    ok = (idx >= 0).reshape(-1)
    flat = (hist.unsqueeze(1) * L + idx.clamp(min=0)).reshape(-1)
    out.index_add_(0, flat[ok], grad.reshape(B * K, Dv)[ok])
    return out.reshape(U, L, Dv)


# --------------------------------------------------------------------------- attention

def default_scale(head_dim: int) -> float:
    return head_dim ** -0.5


def _masked_softmax(s: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor]:
    """Softmax over the last dim restricted to ``valid``; rows with no valid entry give
    zeros (and logsumexp -inf) instead of NaN, in value and in gradient."""
    if s.shape[-1] == 0:
        return s, s.new_full(s.shape[:-1], float("-inf"))
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m).masked_fill(~valid, 0.0)
    z = e.sum(-1, keepdim=True)
    p = e / torch.where(z > 0, z, torch.ones_like(z))
    return p, (m + torch.log(z)).squeeze(-1)


def topk_attention(q: Tensor, keys: Tensor, values: Tensor, idx: Tensor,
                   hist_index: Optional[Tensor] = None,
                   scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Exact softmax attention of each query over its selected behaviours.

    q (B, H, Dh), keys (U, L, H, Dh), values (U, L, H, Dv), idx (B, K) with -1 for empty
    slots -> (out (B, H, Dv), lse (B, H)): out = Σ_j softmax_j(scale·q·k_j)·v_j over the
    slots with idx >= 0; a query with none gets zeros and lse = -inf.
    """
    B, H, Dh = q.shape
    U, L = keys.shape[:2]
    Dv = values.shape[-1]
    scale = default_scale(Dh) if scale is None else scale
    K = idx.shape[1]
    kg = topk_gather(keys.reshape(U, L, H * Dh), idx, hist_index).reshape(B, K, H, Dh)
    vg = topk_gather(values.reshape(U, L, H * Dv), idx, hist_index).reshape(B, K, H, Dv)
    s = torch.einsum("bhd,bkhd->bhk", q, kg) * scale
    p, lse = _masked_softmax(s, (idx >= 0).unsqueeze(1))
    return torch.einsum("bhk,bkhd->bhd", p, vg), lse


def eta_attention(q: Tensor, keys: Tensor, values: Tensor, q_sig: Tensor, k_sig: Tensor, k: int,
                  lengths: Optional[Tensor] = None, hist_index: Optional[Tensor] = None,
                  scale: Optional[float] = None) -> Tensor:
    """ETA: Hamming top-k retrieval, then exact attention over the k retrieved behaviours.

    q (B, D) | (B, H, Dh); keys (U, L, D) | (U, L, H, Dh); values (U, L, Dv) | (U, L, H, Dv);
    q_sig (B, W), k_sig (U, L, W) -> (B, Dv) | (B, H, Dv).
    """
    _, idx = hamming_topk(q_sig, k_sig, k, lengths, hist_index)
    single = q.dim() == 2
    if single:
        q, keys, values = q.unsqueeze(1), keys.unsqueeze(2), values.unsqueeze(2)
    out, _ = topk_attention(q, keys, values, idx, hist_index, scale)
    return out.squeeze(1) if single else out


def target_attention(q: Tensor, keys: Tensor, values: Tensor, lengths: Optional[Tensor] = None,
                     hist_index: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Dense target attention over every valid position (the baseline ETA approximates).

    Shapes as in :func:`eta_attention`. Each history is read once for all its queries.
    """
    single = q.dim() == 2
    if single:
        q, keys, values = q.unsqueeze(1), keys.unsqueeze(2), values.unsqueeze(2)
    B, H, Dh = q.shape
    U, L = keys.shape[:2]
    scale = default_scale(Dh) if scale is None else scale
    hist = default_hist_index(B, U, q.device) if hist_index is None else hist_index
    lens = default_lengths(U, L, q.device) if lengths is None else lengths
    out = q.new_zeros(B, H, values.shape[-1])
    pos = torch.arange(L, device=q.device)
    for u in torch.unique(hist).tolist():
        rows = (hist == u).nonzero().squeeze(1)
        s = torch.einsum("bhd,lhd->bhl", q[rows], keys[u]) * scale
        p, _ = _masked_softmax(s, (pos < lens[u]).view(1, 1, L))
        out = out.index_copy(0, rows, torch.einsum("bhl,lhd->bhd", p, values[u]))
    return out.squeeze(1) if single else out


def topk_attention_backward_slots(grad_out: Tensor, q: Tensor, keys: Tensor, values: Tensor,
                                  idx: Tensor, hist_index: Optional[Tensor], out: Tensor,
                                  lse: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Analytic backward of :func:`topk_attention`, one gradient per selected row.

    Returns dq (B, H, Dh), dk_slots (B, K, H, Dh), dv_slots (B, K, H, Dv) (zero for empty
    slots); scatter-adding the slots through (hist_index, idx) gives d keys / d values.
    With p_j = exp(scale·q·k_j − lse): dv_j = p_j·g, ds_j = p_j·(g·v_j − g·out),
    dq = scale·Σ_j ds_j·k_j, dk_j = scale·ds_j·q.
    """
    B, H, Dh = q.shape
    U, L = keys.shape[:2]
    Dv = values.shape[-1]
    K = idx.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    g, q, keys, values, out, lse = (t.to(acc) for t in (grad_out, q, keys, values, out, lse))
    kg = topk_gather(keys.reshape(U, L, H * Dh), idx, hist_index).reshape(B, K, H, Dh)
    vg = topk_gather(values.reshape(U, L, H * Dv), idx, hist_index).reshape(B, K, H, Dv)
    s = torch.einsum("bhd,bkhd->bhk", q, kg) * scale
    valid = (idx >= 0).unsqueeze(1)
    p = torch.where(valid, torch.exp(s - lse.unsqueeze(-1)), torch.zeros_like(s))
    dv_slots = torch.einsum("bhk,bhd->bkhd", p, g)
    dp = torch.einsum("bhd,bkhd->bhk", g, vg)
    ds = p * (dp - (g * out).sum(-1, keepdim=True))
    dq = torch.einsum("bhk,bkhd->bhd", ds, kg) * scale
    dk_slots = torch.einsum("bhk,bhd->bkhd", ds, q) * scale
    return dq, dk_slots, dv_slots
