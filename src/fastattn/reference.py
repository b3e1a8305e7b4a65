"""Pure-PyTorch definition of every fastattn op: the spec in code.

Every backend is tested against these functions, and they are the last-resort backend
(``FASTATTN_BACKEND=torch``). They favour clarity over speed, but never copy a shared
history B times (they index it through ``hist_index``).

Inputs here are assumed valid (the op layer in :mod:`fastattn.ops` checks them);
``lengths`` and ``hist_index`` may be ``None`` with the meaning of DESIGN.md §3.

Indexed histories (``hist_rows``): keys, values and key signatures are row tables (N, ...)
and position l of history u is table row ``hist_rows[u, l]`` (DESIGN.md §4, "Indexed
histories"). The indexed form of every op is defined as the dense op below on the histories
:func:`history_from_table` builds (the fused backends never build them); only
:func:`hamming_topk` takes ``hist_rows`` itself, as the torch backend of the indexed op.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "words_for_bits", "sentinel_distance", "default_hist_index", "default_lengths",
    "make_planes", "simhash_sign", "popcount64", "hamming_distance", "hamming_topk",
    "topk_gather", "topk_gather_backward", "history_from_table", "unique_rows",
    "masked_mean", "masked_mean_backward",
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


# --------------------------------------------------------------------------- indexed histories

def history_from_table(table: Tensor, hist_rows: Tensor,
                       lengths: Optional[Tensor] = None) -> Tensor:
    """The dense histories (U, L, ...) an indexed call stands for: ``table[hist_rows[u, l]]``
    at valid positions (l < lengths[u], default L, and a row >= 0), zeros elsewhere.

    table (N, ...), hist_rows (U, L) int. This is the definition of the indexed form, so
    it materialises what the fused backends never do.
    """
    U, L = hist_rows.shape
    rows = hist_rows.to(torch.int64)
    valid = rows >= 0
    if lengths is not None:
        valid &= torch.arange(L, device=rows.device) < lengths.to(torch.int64)[:, None]
    if table.shape[0] == 0:
        return table.new_zeros(U, L, *table.shape[1:])
    out = table[torch.where(valid, rows, torch.zeros_like(rows))]
    keep = valid.reshape(U, L, *([1] * (table.dim() - 1)))
    return torch.where(keep, out, torch.zeros_like(out))


def unique_rows(ids: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """ids (U, L) int -> (unique_ids (N,), hist_rows (U, L) int64).

    ``unique_ids`` are the distinct ids at valid positions (l < lengths[u], default L) in
    order of first occurrence, row-major; ``hist_rows[u, l]`` is the row of ``ids[u, l]``
    in it, -1 at positions past the length. So ``unique_ids[hist_rows]`` gives back the
    valid ids, and a table of N rows (one per distinct behaviour) plus ``hist_rows`` is
    the indexed form of the histories.
    """
    U, L = ids.shape
    dev = ids.device
    lens = default_lengths(U, L, dev) if lengths is None else lengths.to(torch.int64)
    valid = torch.arange(L, device=dev) < lens[:, None]
    flat = ids[valid]                                             # row-major valid ids
    uniq, inv = torch.unique(flat, sorted=True, return_inverse=True)
    n = flat.shape[0]
    first = torch.full((uniq.shape[0],), n, dtype=torch.int64, device=dev)
    first = first.scatter_reduce(0, inv, torch.arange(n, device=dev), "amin")
    order = torch.argsort(first)                                  # first-occurrence order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=dev)
    hist_rows = torch.full((U, L), -1, dtype=torch.int64, device=dev)
    hist_rows[valid] = rank[inv]
    return uniq[order], hist_rows


# --------------------------------------------------------------------------- SimHash

def make_planes(dim: int, nbits: int, generator: Optional[torch.Generator] = None,
                dtype: torch.dtype = torch.float32, device=None, *,
                orthogonal: bool = False) -> Tensor:
    """Gaussian random hyperplanes (D, NB) for :func:`simhash_sign`.

    The draws are rounded to bfloat16 values (stored in ``dtype``): SimHash needs random
    directions, not 24-bit ones, and planes exact in bf16 let the C++ AMX path sign fp32
    rows with two bf16 tile products instead of three (DESIGN §7).
    ``orthogonal``: super-bit planes (Ji et al., NeurIPS 2012): the columns, in consecutive
    groups of D, are orthogonalised (QR of each group), keeping each column's Gaussian
    length. Each column is still a uniformly random direction, so every bit is a SimHash
    bit; within a group the bits are decorrelated, which lowers the variance of the
    Hamming-distance estimate of the angle.

    With a ``generator`` the planes are drawn (and orthogonalised) on the generator's device
    and then moved to ``device`` (default: the default device), so one seed gives the same
    planes everywhere: a model built under ``torch.device("cuda")`` with a CPU generator
    signs exactly like its CPU copy (and does not fail on the generator's device)."""
    target = torch.device(device) if device is not None else torch.get_default_device()
    planes = torch.randn(dim, nbits, generator=generator, dtype=torch.float32,
                         device=generator.device if generator is not None else target)
    if orthogonal:
        for lo in range(0, nbits, dim):
            g = planes[:, lo:lo + dim]
            q, r = torch.linalg.qr(g.double())
            d = torch.diagonal(r).sign()
            d = torch.where(d == 0, 1.0, d)
            planes[:, lo:lo + dim] = (q * d * g.double().norm(dim=0)).float()
    return planes.to(torch.bfloat16).to(dtype=dtype, device=target)


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
                 hist_index: Optional[Tensor] = None,
                 hist_rows: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """q_sig (B, W), k_sig (U, L, W) -> (dist (B, k) int32, idx (B, k) int64).

    The k valid positions of each query's history with the smallest Hamming distance,
    ordered by (distance, position) ascending. Missing slots: idx = -1, dist = 64·W + 1.
    Indexed: k_sig is a table (N, W) and ``hist_rows`` (U, L) maps positions to its rows.
    """
    B, W = q_sig.shape
    if hist_rows is not None:
        k_sig = history_from_table(k_sig, hist_rows, lengths)
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


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The contract's accumulation type (DESIGN §7): fp64 for fp64, fp32 for everything else
    (fp32 and the half types)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    slots with idx >= 0; a query with none gets zeros and lse = -inf. out has q's dtype, lse
    the accumulation dtype (fp32 for fp32 and half inputs, fp64 for fp64).
    """
    B, H, Dh = q.shape
    U, L = keys.shape[:2]
    Dv = values.shape[-1]
    scale = default_scale(Dh) if scale is None else scale
    K = idx.shape[1]
    # Half inputs accumulate in fp32 (the kernels' and the backward's type): in bf16 the
    # weights miss 1 by ~2^-8 and the backward's g·v_j − g·out no longer cancels.
    acc = accumulation_dtype(q.dtype)
    kg = topk_gather(keys.reshape(U, L, H * Dh), idx, hist_index).reshape(B, K, H, Dh).to(acc)
    vg = topk_gather(values.reshape(U, L, H * Dv), idx, hist_index).reshape(B, K, H, Dv).to(acc)
    s = torch.einsum("bhd,bkhd->bhk", q.to(acc), kg) * scale
    p, lse = _masked_softmax(s, (idx >= 0).unsqueeze(1))
    return torch.einsum("bhk,bkhd->bhd", p, vg).to(q.dtype), lse


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
    acc = accumulation_dtype(q.dtype)
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


# --------------------------------------------------------------------------- MIMN
#
# One MIMN step (DESIGN.md §5) for every batch row; rows whose step is padding keep their
# state. Shapes: x_t (B, Dx); controller state h (B, Hc); read r (B, D); memory M (B, m, D);
# cumulative write weights g (B, m); MIU channel states S (B, m, Hs).

class MIMNState(NamedTuple):
    h: Tensor   # (B, Hc) controller GRU state
    r: Tensor   # (B, D) last read vector
    M: Tensor   # (B, m, D) memory
    g: Tensor   # (B, m) cumulative (MUR-adjusted) write weights
    S: Tensor   # (B, m, Hs) MIU channel states


class MIMNParams(NamedTuple):
    """The weights of ``fastattn.nn.MIMNEncoder``, in its submodules' own layouts."""
    ctrl_w_ih: Tensor   # (3Hc, Dx + D) controller nn.GRUCell, gates (r, z, n)
    ctrl_w_hh: Tensor   # (3Hc, Hc)
    ctrl_b_ih: Tensor   # (3Hc,)
    ctrl_b_hh: Tensor   # (3Hc,)
    heads_w: Tensor     # (4D + 2, Hc) columns [k_r (D), beta_r, k_w (D), beta_w, e (D), a (D)]
    heads_b: Tensor     # (4D + 2,)
    mem0: Tensor        # (m, D) initial memory
    mur_w: Optional[Tensor]     # (m, m) MUR nn.Linear, or None without MUR
    mur_b: Optional[Tensor]     # (m,)
    miu_w_ih: Optional[Tensor]  # (3Hs, D + Dx) MIU nn.GRUCell fed [M_t(i), x_t], or None
    miu_w_hh: Optional[Tensor]  # (3Hs, Hs)
    miu_b_ih: Optional[Tensor]  # (3Hs,)
    miu_b_hh: Optional[Tensor]  # (3Hs,)
    miu_k: int                  # channels the MIU updates per step (0: no MIU)


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
             b_hh: Tensor) -> Tensor:
    """torch.nn.GRUCell: gates (r, z, n); the reset gate multiplies the hidden projection."""
    gi = x @ w_ih.t() + b_ih
    gh = h @ w_hh.t() + b_hh
    ir, iz, in_ = gi.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r = torch.sigmoid(ir + hr)
    z = torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return (1 - z) * n + z * h


def split_heads(head: Tensor, D: int):
    """Raw head outputs (B, 4D + 2) -> k_r, beta_r, k_w, beta_w, e, a, activated."""
    kr, br, kw, bw, e, a = torch.split(head, [D, 1, D, 1, D, D], dim=-1)
    softplus = torch.nn.functional.softplus
    return (torch.tanh(kr), softplus(br) + 1, torch.tanh(kw), softplus(bw) + 1,
            torch.sigmoid(e), torch.tanh(a))


def content_weights(key: Tensor, beta: Tensor, memory: Tensor) -> Tensor:
    """softmax_i(beta · cos(key, M(i))), cos(u, v) = u·v / max(|u||v|, 1e-8).

    key (B, D), beta (B, 1), memory (B, m, D) -> (B, m). Zero rows or keys give cos = 0.
    """
    norm = torch.linalg.vector_norm   # its gradient at 0 is 0 (a bare sqrt's is NaN)
    dots = torch.einsum("bd,bmd->bm", key, memory)
    denom = torch.clamp(norm(key, dim=-1, keepdim=True) * norm(memory, dim=-1), min=1e-8)
    return torch.softmax(beta * dots / denom, dim=-1)


def ntm_read_write(memory: Tensor, usage: Tensor, head: Tensor,
                   mur_w: Optional[Tensor] = None,
                   mur_b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 3–6 of a MIMN step: content addressing, read, MUR, erase/add write.

    memory (B, m, D), usage g (B, m), head (B, 4D + 2) raw outputs of the heads Linear,
    mur_w (m, m) / mur_b (m,) or None -> (read (B, D), memory' (B, m, D), usage' (B, m),
    read_weights (B, m)).
    """
    D = memory.shape[-1]
    kr, br, kw, bw, e, a = split_heads(head, D)
    wr = content_weights(kr, br, memory)
    ww = content_weights(kw, bw, memory)
    read = torch.einsum("bm,bmd->bd", wr, memory)
    if mur_w is not None:
        P = torch.softmax(usage @ mur_w.t() + mur_b, dim=-1)
        ww = ww * P
        ww = ww / ww.sum(-1, keepdim=True)
    usage = usage + ww
    memory = memory * (1 - ww.unsqueeze(-1) * e.unsqueeze(1)) + ww.unsqueeze(-1) * a.unsqueeze(1)
    return read, memory, usage, wr


def miu_channels(read_weights: Tensor, k: int) -> Tensor:
    """(B, m) bool: the k channels with the largest read weight, ties to the smaller index."""
    order = torch.sort(read_weights, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(read_weights, dtype=torch.bool).scatter(1, order, True)


def miu_gather_gru(memory: Tensor, x: Tensor, S: Tensor, read_weights: Tensor, k: int,
                   w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """Step 7: the k channels with the largest read weight update their state with one GRU
    shared by all channels, fed [M_t(i), x_t]; the other channels keep theirs.

    memory (B, m, D) (after this step's write), x (B, Dx), S (B, m, Hs), read_weights (B, m)
    -> S' (B, m, Hs). The selection is discrete: no gradient flows to read_weights.
    """
    if k < 1:
        return S
    B, m, D = memory.shape
    inp = torch.cat([memory, x.unsqueeze(1).expand(B, m, x.shape[-1])], dim=-1)
    new = gru_cell(inp.reshape(B * m, inp.shape[-1]), S.reshape(B * m, S.shape[-1]), w_ih,
                   w_hh, b_ih, b_hh).reshape(S.shape)   # explicit widths: B = 0 works
    return torch.where(miu_channels(read_weights, k).unsqueeze(-1), new, S)


def mimn_step(x_t: Tensor, state: MIMNState, p: MIMNParams,
              valid: Optional[Tensor] = None) -> Tuple[Tensor, MIMNState]:
    """Steps 1–7 for one event per row. valid (B,) bool: rows with False keep their state
    and read zeros. Returns (read (B, D), state')."""
    h = gru_cell(torch.cat([x_t, state.r], -1), state.h, p.ctrl_w_ih, p.ctrl_w_hh,
                 p.ctrl_b_ih, p.ctrl_b_hh)
    head = h @ p.heads_w.t() + p.heads_b
    r, M, g, wr = ntm_read_write(state.M, state.g, head, p.mur_w, p.mur_b)
    S = state.S
    if p.miu_k >= 1:
        S = miu_gather_gru(M, x_t, S, wr, p.miu_k, p.miu_w_ih, p.miu_w_hh, p.miu_b_ih,
                           p.miu_b_hh)
    new = MIMNState(h, r, M, g, S)
    if valid is None:
        return r, new
    keep = [valid.view(-1, *([1] * (t.dim() - 1))) for t in new]
    new = MIMNState(*(torch.where(v, n, o) for v, n, o in zip(keep, new, state)))
    return torch.where(valid.unsqueeze(-1), r, torch.zeros_like(r)), new


def mimn_initial_state(p: MIMNParams, batch: int, Hs: int) -> MIMNState:
    """h = r = g = 0, S = 0, M = mem0 broadcast over the batch (a view, no copy)."""
    m, D = p.mem0.shape
    Hc = p.ctrl_w_hh.shape[1]
    z = p.mem0.new_zeros
    return MIMNState(z(batch, Hc), z(batch, D), p.mem0.expand(batch, m, D), z(batch, m),
                     z(batch, m, Hs))


def mimn_scan(x: Tensor, lengths: Optional[Tensor], p: MIMNParams,
              state0: MIMNState) -> Tuple[Tensor, MIMNState]:
    """All T steps: x (B, T, Dx), lengths (B,) (default T) -> (reads (B, T, D), state_T).

    Steps t >= lengths[b] are padding: row b's state is unchanged and its read is 0.
    """
    B, T, _ = x.shape
    state = state0
    reads = []
    for t in range(T):
        valid = None if lengths is None else (lengths > t)
        r, state = mimn_step(x[:, t], state, p, valid)
        reads.append(r)
    D = p.mem0.shape[1]
    out = torch.stack(reads, 1) if reads else x.new_zeros(B, 0, D)
    return out, state


def mimn_reg_loss(g: Tensor) -> Tensor:
    """Memory Utilization Regularization: mean over rows of Σ_i (g(i) − mean_i g)², g (B, m)."""
    return (g - g.mean(-1, keepdim=True)).square().sum(-1).mean()


def gru_scan(x: Tensor, lengths: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
             b_hh: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """Varlen GRU over x (B, T, I) with torch.nn.GRU's equations (:func:`gru_cell`), every
    state returned: out (B, T, H). Steps t >= lengths[b] (default T) output 0 and leave row
    b's state unchanged; h0 (B, H) defaults to zeros."""
    B, T, _ = x.shape
    H = w_hh.shape[1]
    h = x.new_zeros(B, H) if h0 is None else h0
    outs = []
    for t in range(T):
        h_new = gru_cell(x[:, t], h, w_ih, w_hh, b_ih, b_hh)
        if lengths is not None:
            valid = (lengths > t)[:, None]
            h = torch.where(valid, h_new, h)
            outs.append(torch.where(valid, h_new, torch.zeros_like(h_new)))
        else:
            h = h_new
            outs.append(h_new)
    return torch.stack(outs, 1) if outs else x.new_zeros(B, 0, H)


# --------------------------------------------------------------------------- pooling (BAHE)

def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """x (N, K, D), mask (N, K) bool -> (N, D): the mean of the rows x[n, k] with mask[n, k].

    A row with no valid token pools to zeros. Masked-out tokens are never read (a NaN or inf
    there does not reach the output), which is why this selects rather than multiplies.
    """
    keep = mask.unsqueeze(-1)
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
    count = mask.sum(1, dtype=x.dtype).clamp(min=1)
    return total / count.unsqueeze(-1)


def masked_mean_backward(grad: Tensor, mask: Tensor) -> Tensor:
    """grad (N, D), mask (N, K) bool -> grad of x (N, K, D): grad[n] / count[n] at valid
    tokens, zeros elsewhere."""
    count = mask.sum(1, dtype=grad.dtype).clamp(min=1)
    g = (grad / count.unsqueeze(-1)).unsqueeze(1)
    return torch.where(mask.unsqueeze(-1), g, torch.zeros((), dtype=grad.dtype,
                                                          device=grad.device))
