"""The batch every model takes, in both layouts.

Training layout: one history per row (U == B). Serving layout: one user, many candidates
(U == 1, B candidates), or any candidates→histories map through ``hist_index``.

Histories are right-padded and ordered oldest → newest: history u is valid at positions
0 <= l < lengths[u], and position lengths[u] - 1 is its most recent behaviour. Item and
category ids start at 1; id 0 is padding (its embedding row is never trained).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Batch", "recent"]


def recent(seq: Tensor, lengths: Tensor, n: int) -> Tensor:
    """The last ``n`` valid entries of each right-padded row of ``seq`` (U, L, ...).

    Returns (U, min(n, L), ...), right-padded with 0 and still oldest → newest; the new
    lengths are ``lengths.clamp(max=n)``.
    """
    U, L = seq.shape[:2]
    n = min(n, L)
    if n == L:
        return seq
    lengths = lengths.to(torch.int64)
    start = (lengths - n).clamp(min=0)                              # (U,)
    pos = start[:, None] + torch.arange(n, device=seq.device)       # (U, n)
    valid = pos < lengths[:, None]
    pos = torch.where(valid, pos, torch.zeros_like(pos))
    index = pos.reshape(U, n, *([1] * (seq.dim() - 2))).expand(U, n, *seq.shape[2:])
    out = seq.gather(1, index)
    mask = valid.reshape(U, n, *([1] * (seq.dim() - 2)))
    return torch.where(mask, out, torch.zeros_like(out))


@dataclass
class Batch:
    """Inputs of a CTR model.

    hist_items, hist_cats: (U, L) int64 behaviour item / category ids (0 = padding).
    lengths: (U,) int64 valid history lengths (0 allowed: an empty history).
    target_item, target_cat: (B,) int64 candidate item / category ids.
    label: (B,) float click labels in {0, 1}, or None at serving time.
    hist_index: (B,) int64 history row of each candidate; None means U == B (row b) or
        U == 1 (every candidate shares history 0).
    hist_types: (U, L) int64 behaviour type of each position (0 at padding), or None when
        the data has no behaviour types (BAHE's feature-parallel encoding reads it).
    """

    hist_items: Tensor
    hist_cats: Tensor
    lengths: Tensor
    target_item: Tensor
    target_cat: Tensor
    label: Optional[Tensor] = None
    hist_index: Optional[Tensor] = None
    hist_types: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.target_item.shape[0]

    def to(self, device) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device)
                                for f in fields(self) if getattr(self, f.name) is not None})

    def truncate(self, max_len: int) -> "Batch":
        """Keep each history's ``max_len`` most recent behaviours (DIN's short history)."""
        return replace(self, hist_items=recent(self.hist_items, self.lengths, max_len),
                       hist_cats=recent(self.hist_cats, self.lengths, max_len),
                       lengths=self.lengths.clamp(max=max_len),
                       hist_types=None if self.hist_types is None
                       else recent(self.hist_types, self.lengths, max_len))
