"""SIM (hard search): Pi et al., "Search-based User Interest Modeling with Lifelong
Sequential Behavior Data for Click-Through Rate Prediction", CIKM 2020 (arXiv 2006.05639).

General Search Unit (hard): keep the behaviours whose category equals the target's, the
``sim_len`` most recent of them; Exact Search Unit: target attention over those, each
key the behaviour's embedding concatenated with an embedding of its time interval to the
target (the paper's z_j = [e_j, e_t_j]), plus dense target attention over the short
recent history; MLP head.
Simplified: the GSU sorts each request's histories by category (what SIM's prebuilt
user-behaviour tree stores) instead of reading a stored index; the time interval is
counted in behaviours (how many came after, log2-bucketed: :func:`interval_buckets`), as
the batches carry no timestamps; one-head attention by default. With ``dedup`` (the
default) only the behaviours the GSU keeps are embedded, each distinct one once.

Issue 18: without the interval embedding the ESU's softmax average says only whether the
target's category is present, and at L=1,000 most categories are; AUC fell from L=200 to
L=1,000 (0.640 to 0.608). With it the ESU reads how recent the category's behaviours are
(the 64 most recent of a frequent category are all recent), and AUC rises (0.650 to
0.662, ``fastattn-train`` defaults, 2 epochs).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..ops import topk_gather
from .base import CTRModel, Histories, check_positive_int, history_rows, lookup

__all__ = ["SIMHard", "category_search", "interval_buckets"]


def interval_buckets(idx: Tensor, lengths: Tensor, n_buckets: int) -> Tensor:
    """SIM's time-interval feature in behaviours: the bucket (B, n) int64 of how many
    behaviours came after position ``idx`` (B, n) of a history of valid length ``lengths``
    (B,): Δ = lengths - 1 - idx (0 = the most recent), bucket 1 + ⌊log2(Δ + 1)⌋ capped at
    ``n_buckets``; 0 where ``idx`` is -1 (an empty slot)."""
    delta = (lengths.to(torch.int64)[:, None] - 1 - idx).clamp(min=0)
    b = 1 + torch.log2(delta.to(torch.float64) + 1).floor().to(torch.int64)
    return torch.where(idx >= 0, b.clamp(max=n_buckets), 0)


def category_search(hist_cats: Tensor, lengths: Tensor, target_cat: Tensor, n: int,
                    n_cats: int, hist_index: Optional[Tensor] = None) -> Tensor:
    """SIM-hard GSU: positions (B, n) int64 of the ``n`` most recent valid behaviours whose
    category equals ``target_cat[b]``, most recent first, -1 in empty slots.

    hist_cats (U, L) and target_cat (B,) hold ids in [0, n_cats]; lengths (U,); candidate b
    searches history ``hist_index[b]`` (default: b when U == B, the shared row 0 when
    U == 1). With shared histories, like SIM's category-indexed behaviour tree, the
    histories are sorted once by
    (history, category, position) and each candidate binary-searches its category's run:
    O(U·L·log(U·L) + B·(log(U·L) + n)), with nothing of size B×L.
    """
    U, L = hist_cats.shape
    B = target_cat.shape[0]
    dev = hist_cats.device
    if L == 0:
        return torch.full((B, n), -1, dtype=torch.int64, device=dev)
    pos = torch.arange(L, device=dev)
    if hist_index is None and U == B:
        # Training layout (one history per candidate): a masked top-k over positions is
        # O(B·L) and several times cheaper than sorting every history.
        match = (hist_cats == target_cat[:, None]) & (pos < lengths[:, None])
        val, at = torch.where(match, pos, -1).topk(min(n, L), dim=1)   # most recent first
        idx = torch.where(val >= 0, at, -1)
        return torch.nn.functional.pad(idx, (0, n - idx.shape[1]), value=-1)
    ncat = n_cats + 2                      # categories 0..n_cats, then a sentinel for padding
    cat = torch.where(pos < lengths[:, None], hist_cats.to(torch.int64), ncat - 1)
    key = (torch.arange(U, device=dev)[:, None] * ncat + cat) * (L + 1) + pos     # (U, L)
    sorted_key, order = key.flatten().sort()
    rows = history_rows(hist_index, B, U, dev)
    first = (rows * ncat + target_cat.to(torch.int64)) * (L + 1)   # the run's smallest key
    lo = torch.searchsorted(sorted_key, first)
    hi = torch.searchsorted(sorted_key, first + L)                  # positions are < L
    j = torch.arange(n, device=dev)
    take = (hi[:, None] - 1 - j).clamp(min=0)                       # the run's end = most recent
    return torch.where(j < (hi - lo)[:, None], order[take] % L, -1)


class SIMHard(CTRModel):
    """SIM-hard: category-matched retrieval of up to ``sim_len`` behaviours (gathered with
    :func:`fastattn.ops.topk_gather`) + target attention over them, + short-term target
    attention (``short_len=0`` drops it). Head features [target, esu, target ⊙ esu, short,
    target ⊙ short]. ``time_buckets``: the ESU keys' time-interval embedding has this many
    log2 buckets (16: intervals up to 2**15 behaviours apart; 0: no interval embedding,
    the keys are the behaviour embeddings alone)."""

    name = "sim"

    def __init__(self, n_items: int, n_cats: int, embed_dim: int = 16,
                 mlp: Sequence[int] = (200, 80), short_len: Optional[int] = 50,
                 backend: Optional[str] = None, *, heads: int = 1, sim_len: int = 64,
                 time_buckets: int = 16, dedup: bool = True):
        super().__init__(n_items, n_cats, embed_dim, mlp, short_len, backend, heads=heads,
                         dedup=dedup)
        check_positive_int("sim_len", sim_len)
        check_positive_int("time_buckets", time_buckets, allow_zero=True)
        self.sim_len, self.time_buckets = sim_len, time_buckets
        # SIM's ESU keys: [behaviour embedding, time-interval embedding] (paper §4.2)
        self.time_emb = nn.Embedding(time_buckets + 1, embed_dim, padding_idx=0) \
            if time_buckets else None
        self.esu_attn = self.attention(self.dim + (embed_dim if time_buckets else 0))
        self._config.update(sim_len=sim_len, time_buckets=time_buckets)
        self.build_head(n_matched=1 if self.short_attn is None else 2)

    def search(self, batch: Batch) -> Tensor:
        """The GSU positions (B, sim_len) of ``batch`` (see :func:`category_search`)."""
        return category_search(batch.hist_cats, batch.lengths, batch.target_cat, self.sim_len,
                               self.n_cats, batch.hist_index)

    def logits_and_reg(self, batch: Batch):
        idx = self.search(batch)                                         # (B, sim_len)
        count = (idx >= 0).sum(1)              # the GSU packs its hits first, -1 after
        window = self.short_window(batch)
        extra = [window.ids] if window else []
        target_ids = (batch.target_item, batch.target_cat)
        U, L = batch.hist_items.shape
        rows = history_rows(batch.hist_index, len(batch), U, idx.device)
        if self.dedup:
            # Only the GSU's picks are read: gather their ids (B, sim_len) and embed those
            # (each distinct one once), instead of embedding the whole (U, L) history.
            pos = idx.clamp(min=0)
            if not L:
                items, cats = torch.zeros_like(idx), torch.zeros_like(idx)
            elif batch.hist_index is None and U == len(batch):   # history b: no flat index
                items, cats = batch.hist_items.gather(1, pos), batch.hist_cats.gather(1, pos)
            else:
                items, cats = (batch.hist_items[rows[:, None], pos],
                               batch.hist_cats[rows[:, None], pos])
            # with time intervals each position's key differs: dense (B, sim_len) keys
            h = self.histories(items, cats, count) if self.time_emb is None \
                else Histories(items, cats, None, count)
            target, picked, *short = self.embed_many(target_ids, h.ids, *extra)
        else:
            target, keys, *short = self.embed_many(target_ids, (batch.hist_items,
                                                                batch.hist_cats), *extra)
            picked = topk_gather(keys, idx, hist_index=batch.hist_index,
                                 backend=self.backend)                    # (B, sim_len, D)
            h = None
        if self.time_emb is not None:
            interval = lookup(self.time_emb, interval_buckets(idx, batch.lengths[rows],
                                                              self.time_buckets), self.backend)
            picked = torch.cat([picked, interval.to(picked.dtype)], dim=-1)
        esu = self.esu_attn(target, picked, lengths=count,
                            hist_rows=None if h is None else h.hist_rows)
        matched = [esu]
        if window is not None:
            matched.append(self.short_interest(batch, target, short[0], window))
        return self.score(target, matched), None
