"""Drop-in target-attention modules: dense (DIN-style) and ETA (SimHash top-k).

Both own the same Q/K/V projections (and, with several heads, the same output projection),
so a trained ``TargetAttention`` state dict loads into an ``ETAAttention`` and the model
switches from dense to retrieval attention without retraining its projections.

Both take histories in either form: dense (U, L, key_dim) behaviour rows, or indexed, a
table (N, key_dim) of distinct behaviours plus ``hist_rows`` (U, L) (see
:func:`fastattn.unique_rows`). The indexed form projects (and, for ETA, hashes) each table
row once, however often the batch's histories repeat it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import eta_attention, make_planes, simhash_sign, target_attention
from ..ops._common import (check_hist_rows, check_lengths, check_signature, checked_lengths,
                           checked_rows)

__all__ = ["TargetAttention", "ETAAttention"]


class TargetAttention(nn.Module):
    """Dense target attention of candidate items over behaviour histories.

    Args:
        embed_dim: attention width E (split into ``heads`` heads of E / heads).
        heads: number of heads; with more than one, an output projection E -> E is added.
        query_dim, key_dim, value_dim: input widths (default E; ``value_dim`` defaults to
            ``key_dim``).
        bias: whether the projections have a bias.
        backend: force a kernel backend for the indexed form and ETA (default: the best
            for the tensors' device; the dense form is SDPA).

    ``forward(query (B, query_dim), keys (U, L, key_dim), values=None (U, L, value_dim),
    lengths=None (U,), hist_index=None (B,)) -> (B, E)``; ``values`` default to ``keys``.
    Indexed: ``forward(query, table (N, key_dim), values_table=None (N, value_dim),
    hist_rows=(U, L), lengths=..., hist_index=...)``.
    A history with no valid position gives a zero vector (then the output projection).
    """

    def __init__(self, embed_dim: int, heads: int = 1, *, query_dim: Optional[int] = None,
                 key_dim: Optional[int] = None, value_dim: Optional[int] = None,
                 bias: bool = True, backend: Optional[str] = None):
        super().__init__()
        if embed_dim < 1 or heads < 1 or embed_dim % heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of heads "
                             f"({heads})")
        query_dim = query_dim or embed_dim
        key_dim = key_dim or embed_dim
        value_dim = value_dim or key_dim
        self.embed_dim, self.heads, self.backend = embed_dim, heads, backend
        self.q_proj = nn.Linear(query_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(key_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(value_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias) if heads > 1 else None

    def _split(self, x: Tensor) -> Tensor:
        """(..., E) -> (..., H, E/H), or unchanged with one head (the single-head op path)."""
        if self.heads == 1:
            return x
        return x.unflatten(-1, (self.heads, self.embed_dim // self.heads))

    def _merge(self, out: Tensor) -> Tensor:
        if self.heads == 1:
            return out
        return self.out_proj(out.flatten(-2))

    def project(self, query: Tensor, keys: Tensor, values: Optional[Tensor]):
        q = self.q_proj(query)
        k = self.k_proj(keys)
        v = self.v_proj(keys if values is None else values)
        return q, k, v

    # Indexed histories of at most this many (position, feature) elements are gathered and
    # run through SDPA: there a few MB of gathered rows cost less than the fixed per-call
    # overhead of the fused op (its forward and backward custom ops, ~0.5 ms on CPU).
    # Larger ones (long histories) go through the fused op, which never gathers.
    gather_below = 1 << 20

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None, *,
                lengths: Optional[Tensor] = None, hist_index: Optional[Tensor] = None,
                hist_rows: Optional[Tensor] = None) -> Tensor:
        q, k, v = self.project(query, keys, values)
        if hist_rows is not None and 0 < k.shape[0] and \
                hist_rows.numel() * self.embed_dim <= self.gather_below:
            # The fused op would check the rows it reads; the gather must refuse the same
            # inputs (a -1 or an out-of-table row at a valid position) before clamping.
            U, L = check_hist_rows(hist_rows).shape
            checked_rows(hist_rows, checked_lengths(check_lengths(lengths, U), U, L,
                                                    hist_rows.device), k.shape[0])
            rows = hist_rows.clamp(min=0)     # positions past lengths are masked anyway
            # F.embedding: its backward is a plain index-add (advanced indexing's sorts)
            k, v = F.embedding(rows, k), F.embedding(rows, v)
            hist_rows = None
        out = target_attention(self._split(q), self._split(k), self._split(v),
                               lengths=lengths, hist_index=hist_index, hist_rows=hist_rows,
                               backend=self.backend)
        return self._merge(out)

    @staticmethod
    def history_length(keys: Tensor, hist_rows: Optional[Tensor]) -> int:
        """L of a call: from the (U, L, ·) histories, or from hist_rows (indexed form)."""
        return keys.shape[1] if hist_rows is None else hist_rows.shape[1]


class ETAAttention(TargetAttention):
    """ETA target attention: SimHash the projected query and keys, keep each query's ``topk``
    nearest behaviours by Hamming distance, and attend exactly over those.

    Args (beyond :class:`TargetAttention`):
        topk: behaviours attended per query.
        hash_bits: SimHash bits per signature (one signature per query / behaviour, shared
            by all heads).
        seed: seed of the hashing hyperplanes, a (E, hash_bits) buffer saved in the state dict.
        backend: force a kernel backend (default: the best for the tensors' device).

    When the history is no longer than ``topk`` (L <= topk) every valid behaviour would be
    retrieved, so the module runs exact dense attention instead: same result, no hashing.
    In the indexed form (a table plus ``hist_rows``) each table row is projected and hashed
    once: one signature per distinct behaviour.
    For serving (ETA+), :meth:`precompute_key_signatures` hashes item embeddings once; pass
    the signatures of the table's rows (indexed form) or of every position (dense form) as
    ``key_signatures`` while the weights stay frozen.
    """

    def __init__(self, embed_dim: int, heads: int = 1, *, topk: int = 64, hash_bits: int = 256,
                 seed: int = 0, backend: Optional[str] = None, **kwargs):
        super().__init__(embed_dim, heads, backend=backend, **kwargs)
        if topk < 1 or hash_bits < 1:
            raise ValueError(f"topk ({topk}) and hash_bits ({hash_bits}) must be >= 1")
        self.topk, self.hash_bits = topk, hash_bits
        planes = make_planes(embed_dim, hash_bits, torch.Generator().manual_seed(seed))
        self.register_buffer("planes", planes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A TargetAttention checkpoint has the same projections and no planes: keep ours.
        state_dict.setdefault(prefix + "planes", self.planes)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sign(self, x: Tensor) -> Tensor:
        """SimHash signatures (..., W) of projected vectors x (..., E)."""
        return simhash_sign(x, self.planes, backend=self.backend)

    @torch.no_grad()
    def precompute_key_signatures(self, item_embeddings: Tensor) -> Tensor:
        """ETA+: signatures (N, W) of the projected keys of item embeddings (N, key_dim).

        Valid as long as ``k_proj`` and ``planes`` do not change; gather the rows of the
        table's behaviours into ``key_signatures`` (N, W) (indexed form), or of every
        position (U, L, W) (dense form), for :meth:`forward`.
        """
        return self.sign(self.k_proj(item_embeddings))

    def _check_key_signatures(self, key_signatures: Optional[Tensor], keys: Tensor,
                              hist_rows: Optional[Tensor]) -> None:
        """key_signatures: (N, W) with hist_rows, else (U, L, W), W = ceil(hash_bits / 64)."""
        if key_signatures is None:
            return
        W = (self.hash_bits + 63) // 64
        lead = tuple(keys.shape[:1] if hist_rows is not None else keys.shape[:2])
        form = "(N, W) like the keys table" if hist_rows is not None else "(U, L, W)"
        check_signature("key_signatures", key_signatures, ndim=len(lead) + 1,
                        shape=f"shape {form}")
        if tuple(key_signatures.shape) != lead + (W,):
            raise ValueError(f"key_signatures must be {form} = {lead + (W,)}, got "
                             f"{tuple(key_signatures.shape)}")

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None, *,
                lengths: Optional[Tensor] = None, hist_index: Optional[Tensor] = None,
                hist_rows: Optional[Tensor] = None,
                key_signatures: Optional[Tensor] = None) -> Tensor:
        # Checked on both paths (unused by the dense one), so a call that is wrong for one
        # history length is wrong for all.
        self._check_key_signatures(key_signatures, keys, hist_rows)
        if self.history_length(keys, hist_rows) <= self.topk:
            return super().forward(query, keys, values, lengths=lengths, hist_index=hist_index,
                                   hist_rows=hist_rows)
        q, k, v = self.project(query, keys, values)
        q_sig = self.sign(q.detach())
        k_sig = self.sign(k.detach()) if key_signatures is None else key_signatures
        out = eta_attention(self._split(q), self._split(k), self._split(v), q_sig, k_sig,
                            self.topk, lengths=lengths, hist_index=hist_index,
                            hist_rows=hist_rows, backend=self.backend)
        return self._merge(out)
