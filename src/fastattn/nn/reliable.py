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

__all__ = ["ReliableAttention", "SequenceAdversarial"]


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


class SequenceAdversarial(nn.Module):
    """EdgeRec's sequence adversarial block: a selector picks the click-like part of the
    exposure sequence, a discriminator tells it from the click sequence.

    The selector is a :class:`ReliableAttention` over the exposures (keys item ⊕ details,
    values item) queried by the aggregated click sequence (masked mean of its item rows).
    "Fake" is the selector's output, "real" the click aggregate through the selector's own
    value path (v_proj, then out_proj with several heads): what the selector would return
    had it picked exactly the clicks, so both live in one space.
    ``forward`` returns ``(selected (B, embed_dim), d_loss, g_loss)``: ``d_loss`` (binary
    cross-entropy, real → 1, fake → 0) reaches only the discriminator (its inputs are
    detached); ``g_loss`` (fake → 1) reaches only the selector (it runs the discriminator
    with detached parameters). So one optimizer over the sum of the model loss, d_loss and
    g_loss trains both players.

    ``select(...)`` (same arguments) returns the selection alone (serving: no losses).

    Args: ``item_dim``, ``detail_dim``, ``embed_dim``, ``heads``, ``topk``, ``backend`` as
    :class:`ReliableAttention`; ``hidden``: width of the discriminator's hidden layer.
    """

    def __init__(self, item_dim: int, detail_dim: int, embed_dim: int, heads: int = 1, *,
                 hidden: int = 64, topk: Optional[int] = None, backend: Optional[str] = None):
        super().__init__()
        self.selector = ReliableAttention(item_dim, detail_dim, embed_dim, heads,
                                          query_dim=item_dim, topk=topk, backend=backend)
        self.discriminator = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(),
                                           nn.Linear(hidden, 1))

    @staticmethod
    def aggregate(items: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """Masked mean over the valid positions of items (B, L, D) -> (B, D); 0 if none."""
        if lengths is None:
            return items.mean(1) if items.shape[1] else items.new_zeros(items.shape[0],
                                                                          items.shape[2])
        valid = (torch.arange(items.shape[1], device=items.device)[None, :]
                 < lengths[:, None]).to(items.dtype)
        return (items * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)

    def _select(self, click_items: Tensor, exposure_items: Tensor, exposure_details: Tensor,
                click_lengths: Optional[Tensor], exposure_lengths: Optional[Tensor]):
        """(click aggregate (B, item_dim), selection (B, embed_dim))."""
        if click_items.dim() != 3 or click_items.shape[0] != exposure_items.shape[0]:
            raise ValueError(f"click_items must be (B, Lc, item_dim) with the B of "
                             f"exposure_items {tuple(exposure_items.shape)}, got "
                             f"{tuple(click_items.shape)}")
        query = self.aggregate(click_items, click_lengths)
        return query, self.selector(query, exposure_items, exposure_details,
                                    lengths=exposure_lengths)

    def select(self, click_items: Tensor, exposure_items: Tensor, exposure_details: Tensor,
               *, click_lengths: Optional[Tensor] = None,
               exposure_lengths: Optional[Tensor] = None) -> Tensor:
        """The selection (B, embed_dim) alone, without the discriminator (serving)."""
        return self._select(click_items, exposure_items, exposure_details, click_lengths,
                            exposure_lengths)[1]

    def forward(self, click_items: Tensor, exposure_items: Tensor, exposure_details: Tensor,
                *, click_lengths: Optional[Tensor] = None,
                exposure_lengths: Optional[Tensor] = None):
        query, selected = self._select(click_items, exposure_items, exposure_details,
                                       click_lengths, exposure_lengths)
        att = self.selector.attention
        real = att.v_proj(query) if att.out_proj is None else att.out_proj(att.v_proj(query))
        bce = nn.functional.binary_cross_entropy_with_logits
        d_real = self.discriminator(real.detach())
        d_fake = self.discriminator(selected.detach())
        d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        g_fake = torch.func.functional_call(self.discriminator, frozen, (selected,))
        g_loss = bce(g_fake, torch.ones_like(g_fake))
        return selected, d_loss, g_loss
