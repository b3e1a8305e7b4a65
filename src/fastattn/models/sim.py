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

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import Batch
from ..nn.attention import id_scores, id_weighted_sum
from ..ops import topk_gather
from ..ops._common import backend_for, cpu_call
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
                    n_cats: int, hist_index: Optional[Tensor] = None,
                    backend: Optional[str] = None) -> Tensor:
    """SIM-hard GSU: positions (B, n) int64 of the ``n`` most recent valid behaviours whose
    category equals ``target_cat[b]``, most recent first, -1 in empty slots.

    hist_cats (U, L) and target_cat (B,) hold ids in [0, n_cats]; lengths (U,); candidate b
    searches history ``hist_index[b]`` (default: b when U == B, the shared row 0 when
    U == 1). With shared histories, like SIM's category-indexed behaviour tree, the
    histories are sorted once by
    (history, category, position) and each candidate binary-searches its category's run:
    O(U·L·log(U·L) + B·(log(U·L) + n)), with nothing of size B×L.
    ``backend`` "cpp" or "numba" (the default on CPU): one kernel scans each candidate's
    history from its most recent behaviour back and stops at the n-th hit; "torch" (and
    CUDA tensors) the tensor forms above, the reference.
    """
    U, L = hist_cats.shape
    B = target_cat.shape[0]
    dev = hist_cats.device
    if L == 0:
        return torch.full((B, n), -1, dtype=torch.int64, device=dev)
    be = backend_for(dev, backend)
    if be in ("cpp", "numba"):
        out = torch.empty(B, n, dtype=torch.int64)
        cpu_call(be, "last_matches", hist_cats.to(torch.int64).contiguous(),
                 lengths.to(torch.int64).contiguous(), target_cat.to(torch.int64).contiguous(),
                 history_rows(hist_index, B, U, dev).contiguous(), out)
        return out
    pos = torch.arange(L, device=dev)
    if hist_index is None and U == B:
        # Training layout (one history per candidate): a masked top-k over positions is
        # O(B·L) and several times cheaper than sorting every history.
        match = (hist_cats == target_cat[:, None]) & (pos < lengths[:, None])
        val, at = torch.where(match, pos, -1).topk(min(n, L), dim=1)   # most recent first
        idx = torch.where(val >= 0, at, -1)
        return F.pad(idx, (0, n - idx.shape[1]), value=-1)
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
                               self.n_cats, batch.hist_index, self._backend)

    def logits_and_reg(self, batch: Batch):
        target, *matched = self.interests(batch)
        return self.score(target, matched), None

    def interests(self, batch: Batch) -> List[Tensor]:
        """[target (B, D), ESU interest (B, D), short-term interest (B, D) (none with
        ``short_len=0``)] of a checked batch."""
        if self.dedup and self.heads == 1:
            return self._interests_fused(batch)
        return self._interests_separate(batch)

    def _interests_fused(self, batch: Batch) -> List[Tensor]:
        """Both branches in one embedding lookup and one attention call (one head).

        The target, the GSU's picks and the short window are gathered as ids per candidate
        and looked up in one pass over the item and category tables; both attentions run
        in the input space (:meth:`TargetAttention.attend_inputs`) as two heads of one
        batched softmax over the (B, sim_len + short_len) rows, each head masked to its own
        positions. The ESU's interval embedding is never gathered per position: with 16
        buckets, its part of the scores is (W_kᵀ q)·t_τ per (query, bucket), read by each
        position's bucket, and its part of the ESU's weighted sum is the weights summed per
        bucket times the table (same values as the [e_j, t_j] keys)."""
        idx = self.search(batch)                                         # (B, n)
        B, n = idx.shape
        U, L = batch.hist_items.shape
        dev = idx.device
        own = batch.hist_index is None and U == B          # history b: no flat index
        rows = None if own else history_rows(batch.hist_index, B, U, dev)
        lens = batch.lengths if own else batch.lengths[rows]
        attns, pos = [self.esu_attn], [idx]
        if self.short_attn is not None:
            S = L if self.short_len is None else min(self.short_len, L)
            window = (lens - S).clamp(min=0)[:, None] + torch.arange(S, device=dev)
            pos.append(torch.where(window < lens[:, None], window, -1))
            attns.append(self.short_attn)
        pos = torch.cat(pos, 1) if len(pos) > 1 else idx                 # (B, T)
        valid = pos >= 0
        T = pos.shape[1]
        ids = []
        for hist, tgt in ((batch.hist_items, batch.target_item),
                          (batch.hist_cats, batch.target_cat)):
            if L:
                at = pos.clamp(min=0)
                got = hist.gather(1, at) if own else hist[rows[:, None], at]
                got = torch.where(valid, got.to(idx.dtype), 0)
            else:
                got = torch.zeros_like(pos)
            ids.append(torch.cat([tgt.to(idx.dtype), got.reshape(-1)]))   # (B + B·T,)
        # one lookup; split (not sliced) so that the backward joins the two gradients
        target, keys = self.embed(*ids).split([B, B * T])
        keys = keys.view(B, T, self.dim)
        qs = [a.q_proj(target) for a in attns]
        qk = [a.input_query(q) for a, q in zip(attns, qs)]   # ESU's: [behaviour, interval]
        scale = attns[0].input_scale
        qk_rows = torch.stack([k[:, :self.dim] for k in qk], 1)          # (B, H, D)
        extra = None                       # the interval embedding's part of the scores
        if self.time_emb is not None:
            # bucket 0 (padding) is a zero row that only weight-0 positions read: no grad
            table = self.time_emb.weight
            bucket = interval_buckets(idx, lens, self.time_buckets)
            if T > n:
                bucket = F.pad(bucket, (0, T - n))       # (B, T)
            interval_scores = id_scores(qk[0][:, self.dim:], table, bucket) * scale  # (B, T)
            extra = F.pad(interval_scores[:, None], (0, 0, 0, len(attns) - 1))
        j = torch.arange(T, device=dev)
        mask = torch.stack([valid & (j < n), valid & (j >= n)][:len(attns)], 1)   # (B, H, T)
        found = mask.any(-1)                                               # (B, H)
        mixed, weights = _RowsAttention.apply(qk_rows, keys, extra, mask, found, scale)
        mixed = list(mixed.unbind(1))                                     # H x (B, D)
        if self.time_emb is not None:
            mixed[0] = torch.cat([mixed[0], id_weighted_sum(weights[:, 0], bucket, table)], -1)
        return [target] + [a.output_of_inputs(q, m, found[:, h])
                           for h, (a, q, m) in enumerate(zip(attns, qs, mixed))]

    def _interests_separate(self, batch: Batch) -> List[Tensor]:
        """Each branch through its own module (any heads; ``dedup=False``: the whole
        history embedded, the picks gathered from it: the dense reference)."""
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
        return [target] + matched


class _RowsAttention(torch.autograd.Function):
    """H one-query heads over one set of rows per batch entry: scores (B, H, T) =
    scale · qk·keys + ``extra``, softmax over the positions ``mask`` (B, H, T) allows, heads
    with ``found`` False zeroed; returns (weights @ keys (B, H, D), weights). The backward
    gives the rows' gradient from both products in one batched product, without the
    per-product (B, T, D) gradients autograd would add up."""

    @staticmethod
    def forward(ctx, qk: Tensor, keys: Tensor, extra: Optional[Tensor], mask: Tensor,
                found: Tensor, scale: float):
        scores = torch.bmm(qk, keys.transpose(1, 2)).mul_(scale)
        if extra is not None:
            scores.add_(extra)
        # a finite fill: a head without positions gets a uniform average, zeroed by `found`
        weights = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min).softmax(-1)
        weights.mul_(found[:, :, None].to(weights.dtype))
        ctx.save_for_backward(qk, keys, weights)
        ctx.scale, ctx.extra = scale, extra is not None
        return torch.bmm(weights, keys), weights

    @staticmethod
    def backward(ctx, g_mixed: Tensor, g_weights: Optional[Tensor]):
        qk, keys, w = ctx.saved_tensors
        gw = torch.bmm(g_mixed, keys.transpose(1, 2))
        if g_weights is not None:
            gw = gw + g_weights
        # softmax backward; w is 0 at masked positions and in empty heads, so is ds
        ds = w * (gw - (w * gw).sum(-1, keepdim=True))
        ds_scaled = ds * ctx.scale
        g_qk = torch.bmm(ds_scaled, keys)
        g_keys = torch.bmm(torch.cat([w, ds_scaled], 1).transpose(1, 2),
                           torch.cat([g_mixed, qk], 1))
        return g_qk, g_keys, ds if ctx.extra else None, None, None, None
