"""EdgeRec's reliable attention (issue 17): detail features steer the weights, not the values.

Each behaviour has an item representation and detail features (dwell time, scroll depth,
add-to-cart, ...). The attention weights come from the keys item ⊕ details; the weights are
applied to the pure item representations (EdgeRec's "noninvasive" values), so the detail
features sharpen relevance without mixing into what is returned.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .attention import ETAAttention, TargetAttention

__all__ = ["ReliableAttention"]


class ReliableAttention(nn.Module):
    """Target attention with keys = item ⊕ detail features and values = item.

    Args:
        item_dim: width of the item representations (the values).
        detail_dim: width of the per-behaviour detail features (keys only).
        embed_dim, heads, query_dim, bias, backend: as :class:`TargetAttention`
            (``query_dim`` defaults to ``item_dim``: the candidate item queries).
        topk: None for dense attention (:class:`TargetAttention`), or the ETA retrieval size
            (:class:`ETAAttention`, with ``hash_bits`` and ``seed``): hashing then runs on
            the item ⊕ detail keys too.

    ``forward(query (B, query_dim), items (U, L, item_dim), details (U, L, detail_dim),
    lengths=None (U,), hist_index=None (B,), hist_rows=None) -> (B, embed_dim)``. Indexed
    form: ``items`` (N, item_dim) and ``details`` (N, detail_dim) are tables whose row n is
    one (item, details) behaviour, and ``hist_rows`` (U, L) picks them (details usually
    differ per event, so the table is per event, not per distinct item). The wrapped module
    is ``self.attention``: its k_proj reads item ⊕ details, its v_proj the item only.
    """

    def __init__(self, item_dim: int, detail_dim: int, embed_dim: int, heads: int = 1, *,
                 query_dim: Optional[int] = None, bias: bool = True,
                 topk: Optional[int] = None, hash_bits: int = 256, seed: int = 0,
                 backend: Optional[str] = None):
        super().__init__()
        if item_dim < 1 or detail_dim < 0:
            raise ValueError(f"item_dim ({item_dim}) must be >= 1 and detail_dim "
                             f"({detail_dim}) >= 0")
        self.item_dim, self.detail_dim = item_dim, detail_dim
        dims = dict(query_dim=query_dim or item_dim, key_dim=item_dim + detail_dim,
                    value_dim=item_dim, bias=bias, backend=backend)
        if topk is None:
            self.attention: TargetAttention = TargetAttention(embed_dim, heads, **dims)
        else:
            self.attention = ETAAttention(embed_dim, heads, topk=topk, hash_bits=hash_bits,
                                          seed=seed, **dims)

    def keys(self, items: Tensor, details: Tensor) -> Tensor:
        """item ⊕ details, with the shapes checked."""
        for name, t, d in (("items", items, self.item_dim), ("details", details,
                                                             self.detail_dim)):
            if not isinstance(t, Tensor) or t.dim() < 2 or t.shape[-1] != d:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must be (U, L, {d}) histories or an (N, {d}) table, "
                                 f"got {shape}")
        if items.shape[:-1] != details.shape[:-1]:
            raise ValueError(f"details must have the rows of items {tuple(items.shape[:-1])} "
                             f"(one per behaviour), got {tuple(details.shape)}")
        return torch.cat([items, details.to(items.dtype)], -1)

    def forward(self, query: Tensor, items: Tensor, details: Tensor, *,
                lengths: Optional[Tensor] = None, hist_index: Optional[Tensor] = None,
                hist_rows: Optional[Tensor] = None) -> Tensor:
        return self.attention(query, self.keys(items, details), items, lengths=lengths,
                              hist_index=hist_index, hist_rows=hist_rows)
