"""DIN, the dense baseline: Zhou et al., "Deep Interest Network for Click-Through Rate
Prediction", KDD 2018 (arXiv 1706.06978).

Target attention of the candidate over the user's most recent behaviours, then an MLP.
Simplified: the attention is scaled dot-product attention with Q/K/V projections
(:class:`fastattn.nn.TargetAttention`, softmax-normalised) instead of DIN's MLP
"activation unit" with unnormalised weights; PReLU instead of Dice; no mini-batch aware
regularisation; features are only item and category ids.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..data.batch import Batch
from .base import CTRModel

__all__ = ["DIN"]


class DIN(CTRModel):
    """DIN: one target attention over the ``short_len`` most recent behaviours
    (``short_len=None``: the whole history). Head features [target, a, target ⊙ a]."""

    name = "din"

    def __init__(self, n_items: int, n_cats: int, embed_dim: int = 16,
                 mlp: Sequence[int] = (200, 80), short_len: Optional[int] = 50,
                 backend: Optional[str] = None, *, heads: int = 1, dedup: bool = True):
        if short_len == 0:
            raise ValueError("DIN needs its attention: short_len must be >= 1 or None "
                             "(the whole history), got 0")
        super().__init__(n_items, n_cats, embed_dim, mlp, short_len, backend, heads=heads,
                         dedup=dedup)
        self.build_head(n_matched=1)

    def logits_and_reg(self, batch: Batch):
        window = self.short_window(batch)
        target, keys = self.embed_many((batch.target_item, batch.target_cat), window.ids)
        return self.score(target, [self.short_interest(batch, target, keys, window)]), None
