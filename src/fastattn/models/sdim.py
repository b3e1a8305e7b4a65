"""SDIM: Cao et al., "Sampling Is All You Need on Modeling Long-Term User Behaviors for
CTR Prediction", CIKM 2022 (arXiv 2205.10249).

Hash the target and every behaviour embedding with ``n_hashes`` SimHash functions of
``hash_width`` bits; per hash function, the behaviours whose code equals the target's
collide with it; the long-term interest is the mean over hash functions of the mean
embedding of the colliding behaviours (0 when none collide). Plus dense target attention
over the recent history; MLP head. SDIM's bucket trick makes the long-term part cost
O(L · n_hashes · D) per user, independent of the number of candidates: each user's
behaviours are summed per (hash function, bucket) once, then each target reads its buckets.
Simplified: the collision average is normalised by the count (SDIM normalises the bucket
sum by its L2 norm); all hash bits come from one :func:`fastattn.ops.simhash_sign` call
with one seeded planes buffer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.batch import Batch
from ..ops import make_planes, simhash_sign
from .base import CTRModel, check_positive_int, history_rows, weighted_rows

__all__ = ["SDIM", "hash_codes", "bucket_interest"]


def hash_codes(sig: Tensor, n_hashes: int, width: int) -> Tensor:
    """Split packed SimHash words (..., W) int64 into ``n_hashes`` codes (..., n_hashes)
    in [0, 2**width): code h reads bits h·width .. h·width + width - 1 (bit j in word
    j // 64 at bit j % 64, least significant first), its first bit as the code's bit 0."""
    # One shift and mask per code, not per bit (n_hashes·width bits, 3x the work at w=3).
    # A code that straddles two words keeps only the 64 - shift bits its word has (int64's
    # >> is arithmetic: the sign would fill the rest) and takes the others from the next.
    start = torch.arange(n_hashes, device=sig.device) * width
    word, shift = start // 64, start % 64
    mask = (1 << width) - 1
    if all(h * width % 64 + width <= 64 for h in range(n_hashes)):   # no code straddles
        return (sig[..., word] >> shift) & mask                       # (..., n_hashes)
    straddle = shift + width > 64
    low = torch.where(straddle, (1 << (64 - shift).clamp(max=63)) - 1, mask)
    nxt = torch.clamp(word + 1, max=sig.shape[-1] - 1)
    high = (sig[..., nxt] << torch.where(straddle, 64 - shift, 0)) & mask
    return ((sig[..., word] >> shift) & low) | torch.where(straddle, high, 0)


def bucket_interest(keys: Tensor, key_codes: Tensor, lengths: Tensor, query_codes: Tensor,
                    n_buckets: int, hist_index: Optional[Tensor] = None,
                    hist_rows: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Mean over hash functions of the mean valid behaviour colliding with each query.

    keys (U, L, D) float, key_codes (U, L, H) and query_codes (B, H) int64 in
    [0, n_buckets), lengths (U,); query b reads history ``hist_index[b]`` (default b when
    U == B, 0 when U == 1). Indexed form: with ``hist_rows`` (U, L), keys (N, D) and
    key_codes (N, H) are the tables of the distinct behaviours, hashed once each. Returns
    (B, D), differentiable in ``keys``. Cost with shared histories (serving), independent
    of the number of queries per history: one index-add of U·L rows per hash function into
    (U·H·n_buckets, D) bucket sums, then B·H row reads. ``backend`` runs the indexed
    training layout's weighted row sum (:func:`.base.weighted_rows`).
    """
    B, H = query_codes.shape
    D = keys.shape[-1]
    dev = keys.device
    if hist_rows is not None:
        U, L = hist_rows.shape
        N = keys.shape[0]
        if N == 0:                                 # no valid behaviour anywhere
            return keys.new_zeros(B, D)
        rows = hist_rows.clamp(min=0)              # padding is masked by lengths below
        valid = torch.arange(L, device=dev) < lengths[:, None]                # (U, L)
        if hist_index is None and U == B and \
                N * (H * n_buckets + D) <= 8 * L * (H + D):
            return _collisions_by_row(keys, key_codes, rows, valid, query_codes, n_buckets)
        # (U, L, H) per position, in the narrowest dtype the codes fit (uint8 for w <= 8:
        # 8x less to gather, compare and mask than int64 at long L); no floats
        key_codes = key_codes.to(torch.uint8 if n_buckets <= 256 else torch.int32)[rows]
    else:
        U, L = keys.shape[:2]
        valid = torch.arange(L, device=dev) < lengths[:, None]                # (U, L)
    nb = H * n_buckets
    if hist_index is None and U == B:
        # Training layout (one history per query): weigh each behaviour by how many of the
        # query's buckets it falls in, 1 / (bucket size · H) each: O(B·L·H) compares and one
        # weighted sum per query, far cheaper than building B bucket tables that serve one.
        hit = (key_codes == query_codes.to(key_codes.dtype)[:, None, :]) & valid[..., None]
        weight = 1 / (hit.sum(1).clamp(min=1) * H).to(keys.dtype)                 # (B, H)
        share = torch.bmm(hit.to(keys.dtype), weight[:, :, None])[..., 0]         # (B, L)
        if hist_rows is not None:     # the weighted sum reads the table rows in place
            return weighted_rows(keys, rows, share, backend)
        return torch.bmm(share[:, None, :], keys)[:, 0]
    if hist_rows is not None:
        keys = keys[rows]             # shared histories (serving): U rows, not B
    masked = (keys * valid[..., None].to(keys.dtype)).reshape(U * L, D)
    weight = valid.reshape(U * L).to(keys.dtype)
    # Row of bucket (u, h, code) in the flat (U·H·n_buckets, D) table.
    slot = torch.arange(U, device=dev)[:, None, None] * nb \
        + torch.arange(H, device=dev) * n_buckets + key_codes                  # (U, L, H)
    sums, counts = keys.new_zeros(U * nb, D), keys.new_zeros(U * nb)
    # One index_add per hash function: reads the keys H times but never materialises an
    # (U, L, H, D) copy or index (which at L = 10,000 costs gigabytes and dominates).
    for h in range(H):
        idx = slot[..., h].reshape(U * L)
        sums = sums.index_add(0, idx, masked)
        counts = counts.index_add(0, idx, weight)
    rows = history_rows(hist_index, B, U, keys.device)
    flat = rows[:, None] * nb + torch.arange(H, device=keys.device) * n_buckets + query_codes
    s = sums[flat]                                                    # (B, H, D)
    c = counts[flat]                                                  # (B, H)
    return (s / c.clamp(min=1)[..., None]).mean(1)    # an empty bucket's sum is 0: mean 0


def _collisions_by_row(table: Tensor, codes: Tensor, rows: Tensor, valid: Tensor,
                       query_codes: Tensor, n_buckets: int) -> Tensor:
    """:func:`bucket_interest` in the indexed training layout (query b reads history b),
    per distinct row instead of per position: three small GEMMs over (B, N) instead of
    (B, L, H) compares, masks and weights, the better when the table has few rows (N) for
    the histories' length (L), as a batch of long histories over a catalogue has.

    table (N, D), codes (N, H), rows (B, L) clamped, valid (B, L), query_codes (B, H).
    With c[b, n] the valid occurrences of row n in history b and onehot(n) its codes' one-hot
    (H·n_buckets,): bucket sizes c @ onehot, each row's share Σ_h [hit] / (size·H), and the
    interest Σ_n c[b, n] share[b, n] table[n] (differentiable in ``table``)."""
    B, H = query_codes.shape
    N = table.shape[0]
    dt = table.dtype
    count = torch.zeros(B, N, dtype=dt, device=table.device).scatter_add_(1, rows,
                                                                          valid.to(dt))
    onehot = F.one_hot(codes, n_buckets).to(dt).reshape(N, H * n_buckets)
    want = F.one_hot(query_codes, n_buckets).to(dt)                          # (B, H, nb)
    size = ((count @ onehot).view(B, H, n_buckets) * want).sum(-1)           # (B, H)
    weight = want / (size.clamp(min=1) * H)[..., None]
    share = count * (weight.reshape(B, H * n_buckets) @ onehot.T)            # (B, N)
    return share @ table


class SDIM(CTRModel):
    """SDIM: hash-collision interest over the whole history + short-term target attention
    (``short_len=0`` drops it).

    Args (beyond :class:`CTRModel`): ``n_hashes`` hash functions of ``hash_width`` bits
    each, hyperplanes (D, n_hashes·hash_width) drawn from ``seed`` (the ``planes`` buffer,
    saved in the state dict). Head features [target, sdim, target ⊙ sdim, short,
    target ⊙ short].
    """

    name = "sdim"

    def __init__(self, n_items: int, n_cats: int, embed_dim: int = 16,
                 mlp: Sequence[int] = (200, 80), short_len: Optional[int] = 50,
                 backend: Optional[str] = None, *, heads: int = 1, n_hashes: int = 16,
                 hash_width: int = 3, seed: int = 0, dedup: bool = True):
        super().__init__(n_items, n_cats, embed_dim, mlp, short_len, backend, heads=heads,
                         dedup=dedup)
        check_positive_int("n_hashes", n_hashes)
        check_positive_int("hash_width", hash_width)
        if hash_width > 16:
            raise ValueError(f"hash_width must be <= 16 (2**hash_width buckets per hash "
                             f"function and user), got {hash_width}")
        self.n_hashes, self.hash_width = n_hashes, hash_width
        planes = make_planes(self.dim, n_hashes * hash_width, torch.Generator().manual_seed(seed))
        self.register_buffer("planes", planes)
        self._config.update(n_hashes=n_hashes, hash_width=hash_width, seed=seed)
        self.build_head(n_matched=1 if self.short_attn is None else 2)

    def codes(self, x: Tensor) -> Tensor:
        """Bucket codes (..., n_hashes) in [0, 2**hash_width) of embeddings x (..., D)."""
        sig = simhash_sign(x, self.planes, backend=self.backend)
        return hash_codes(sig, self.n_hashes, self.hash_width)

    def logits_and_reg(self, batch: Batch):
        h = self.histories(batch.hist_items, batch.hist_cats, batch.lengths)
        window = self.short_window(batch)
        target, keys, *short = self.embed_many((batch.target_item, batch.target_cat), h.ids,
                                               *([window.ids] if window else []))
        matched = [bucket_interest(keys, self.codes(keys), batch.lengths, self.codes(target),
                                   2 ** self.hash_width, batch.hist_index, h.hist_rows,
                                   self.backend)]
        if window is not None:
            matched.append(self.short_interest(batch, target, short[0], window))
        return self.score(target, matched), None
