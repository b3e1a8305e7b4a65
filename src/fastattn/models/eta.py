"""ETA-Net: Chen et al., "Efficient Long Sequential User Data Modeling for Click-Through
Rate Prediction" (ETA, Efficient Target Attention), arXiv 2209.12212.

Long-term interest: :class:`fastattn.nn.ETAAttention` over the whole history (SimHash the
projected target and behaviours, keep the ``topk`` nearest behaviours by Hamming distance,
exact softmax attention over those); short-term interest: dense target attention over the
``short_len`` most recent behaviours; MLP head. Training embeds, projects and hashes each
distinct behaviour of a batch once (the indexed form, ``dedup=True``). Serving (ETA+):
:meth:`ETANet.item_signatures` hashes every item once, and
``forward(batch, key_signatures=table)`` reads the signatures of the batch's behaviours
from that table.
Simplified: one SimHash signature per behaviour shared by all heads; only item and category
features; no side features of the behaviours (action type). Added to the paper: SIM's
time-interval embedding for the retrieved behaviours and the head's soft-share feature
(``time_buckets``, ``share_feature``; docs/DESIGN.md).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..nn import ETAAttention
from .base import CTRModel, check_positive_int, history_rows
from .sim import interval_buckets

__all__ = ["ETANet"]


class ETANet(CTRModel):
    """ETA over the long history + dense attention over the recent one.

    Args (beyond :class:`CTRModel`): ``topk`` behaviours retrieved per target, ``hash_bits``
    SimHash bits (256 = the paper's 4 int64 words), ``seed`` of the hashing hyperplanes,
    ``hash_input`` what is hashed (``"projected"``: the attention's projected query and
    keys; ``"raw"``: the embeddings, see :class:`fastattn.nn.ETAAttention`).
    ``short_len=0`` drops the short-term branch. Head features [target, long,
    target ⊙ long, short, target ⊙ short, share].
    ``share_feature`` (default True; False: off): the head also reads, per head of the
    long-term attention, log(c / (1 + n)), with c the soft count of retrieved behaviours
    that score as high as the best one (:func:`fastattn.nn.log_soft_count`, the log of the
    softmax's denominator over its max) and n the history's valid length: how much of the
    history matches the target, which the softmax average normalises away.
    ``time_buckets`` (default 16; 0: off): the long-term attention's keys add SIM's
    time-interval embedding (:func:`fastattn.models.sim.interval_buckets`), for the
    retrieved behaviours only (``ETAAttention(position_ids=, position_table=)``); retrieval still
    hashes the behaviour embedding only (``ETAAttention(hash_dims=D)``), so the table of
    distinct (item, category) rows and ETA+ item signatures stay as without it. ``orthogonal_planes`` (default True): super-bit SimHash
    planes (:func:`fastattn.make_planes`).

    Defaults (issue 18, measured with ``fastattn-train --retrieval --epoch-auc``): at
    ``topk=64`` the AUC fell from L=200 to L=1,000 (0.639 to 0.610): softmax attention over
    the retrieved set reads how many behaviours match the target only up to k, and the
    planted long-term interests hold hundreds of behaviours at L=1,000. ``topk=256`` reads
    them (0.640 at L=200, 0.653 at L=1,000); ``hash_bits=256`` raises recall@k against the
    exact attention top-k (0.61 to 0.73 at k=64, L=1,000); orthogonal planes raise
    recall@64 further (0.806 to 0.819 counted by score, 0.777 to 0.791 by position).
    ``time_buckets=16`` (the default) raises AUC (0.640 to 0.655 at L=200, 0.650 to
    0.671-0.677 at L=1,000, 2 epochs); attended through ``position_ids`` (the interval's
    share of the scores one number per bucket) it costs 7-26% of the training throughput
    per CPU-second at L=1,000 (a per-position (item, category, bucket) table cost ~40%).
    ``share_feature=True`` (the default) raises AUC at L=1,000 from 0.664 to 0.685 (mean of
    training seeds 0-4; seed 0: 0.671 to 0.684); the history length alone as the feature
    gives 0.678, the soft count alone 0.656-0.678.
    """

    name = "eta"

    def __init__(self, n_items: int, n_cats: int, embed_dim: int = 16,
                 mlp: Sequence[int] = (200, 80), short_len: Optional[int] = 50,
                 backend: Optional[str] = None, *, heads: int = 1, topk: int = 256,
                 hash_bits: int = 256, seed: int = 0, hash_input: str = "projected",
                 time_buckets: int = 16, orthogonal_planes: bool = True,
                 share_feature: bool = True, dedup: bool = True):
        super().__init__(n_items, n_cats, embed_dim, mlp, short_len, backend, heads=heads,
                         dedup=dedup)
        check_positive_int("topk", topk)
        check_positive_int("hash_bits", hash_bits)
        check_positive_int("time_buckets", time_buckets, allow_zero=True)
        if not isinstance(share_feature, bool):
            raise TypeError(f"share_feature must be a bool, got {type(share_feature).__name__}")
        self.share_feature = share_feature
        self.time_buckets = time_buckets
        self.time_emb = nn.Embedding(time_buckets + 1, embed_dim, padding_idx=0) \
            if time_buckets else None
        kd = self.dim + (embed_dim if time_buckets else 0)
        self.long_attn = ETAAttention(self.dim, heads, topk=topk, hash_bits=hash_bits, seed=seed,
                                      backend=backend, query_dim=self.dim, key_dim=kd,
                                      hash_input=hash_input,
                                      orthogonal_planes=orthogonal_planes,
                                      hash_dims=self.dim)
        self._config.update(topk=topk, hash_bits=hash_bits, seed=seed, hash_input=hash_input,
                            time_buckets=time_buckets,
                            orthogonal_planes=bool(orthogonal_planes),
                            share_feature=share_feature)
        self.build_head(n_matched=1 if self.short_attn is None else 2,
                        other_dim=heads if share_feature else 0)

    @torch.no_grad()
    def item_signatures(self, item_cat: Tensor) -> Tensor:
        """ETA+: SimHash signatures (n_items + 1, W) int64 of every item as a behaviour.

        ``item_cat`` (n_items + 1,) int is each item id's category (entry 0: padding).
        Pass the table as ``key_signatures`` to :meth:`forward`, which reads the rows of
        the batch's behaviours; valid while the embeddings, the key projection and the
        planes stay unchanged (and the batch's categories are ``item_cat`` of its items).
        """
        n = self.n_items + 1
        if not isinstance(item_cat, Tensor) or item_cat.dtype not in (torch.int32, torch.int64) \
                or tuple(item_cat.shape) != (n,):
            raise ValueError(f"item_cat must be an int64 tensor of shape (n_items + 1,)=({n},) "
                             f"mapping item ids to category ids, got "
                             f"{getattr(item_cat, 'dtype', type(item_cat).__name__)} "
                             f"{tuple(getattr(item_cat, 'shape', ()))}")
        if int(item_cat.min()) < 0 or int(item_cat.max()) > self.n_cats:
            raise ValueError(f"item_cat must hold category ids in [0, {self.n_cats}]")
        items = torch.arange(n, device=item_cat.device)
        return self.long_attn.precompute_key_signatures(self.embed(items, item_cat))

    def interval_ids(self, batch: Batch) -> Optional[Callable[[Tensor], Tensor]]:
        """The long-term attention's ``position_ids`` (None without ``time_buckets``):
        positions idx (B, n) of each candidate's history -> their time-interval buckets
        (B, n), rows of ``time_emb`` (:func:`fastattn.models.sim.interval_buckets`; 0 at
        empty slots)."""
        if self.time_emb is None:
            return None
        U = batch.hist_items.shape[0]
        lens = batch.lengths[history_rows(batch.hist_index, len(batch), U,
                                          batch.lengths.device)]
        return lambda idx: interval_buckets(idx, lens, self.time_buckets)

    def logits_and_reg(self, batch: Batch, key_signatures: Optional[Tensor] = None):
        """``key_signatures`` (n_items + 1, W): the table of :meth:`item_signatures` (ETA+)."""
        n = self.n_items + 1
        if key_signatures is not None and (not isinstance(key_signatures, Tensor)
                                           or key_signatures.dim() != 2
                                           or key_signatures.shape[0] != n):
            raise ValueError(f"key_signatures must be the (n_items + 1, W)=({n}, W) table of "
                             f"item_signatures(), got "
                             f"{tuple(getattr(key_signatures, 'shape', ()))}")
        h = self.histories(batch.hist_items, batch.hist_cats, batch.lengths)
        window = self.short_window(batch)
        target, keys, *short = self.embed_many((batch.target_item, batch.target_cat), h.ids,
                                               *([window.ids] if window else []))
        sigs = None if key_signatures is None else key_signatures[h.items]
        long = self.long_attn(target, keys, lengths=batch.lengths,
                              hist_index=batch.hist_index, hist_rows=h.hist_rows,
                              key_signatures=sigs, position_ids=self.interval_ids(batch),
                              position_table=None if self.time_emb is None
                              else self.time_emb.weight, return_mass=self.share_feature)
        other = []
        if self.share_feature:
            long, log_mass = long
            U = batch.hist_items.shape[0]
            n = batch.lengths[history_rows(batch.hist_index, len(batch), U,
                                           batch.lengths.device)]
            other.append(log_mass - torch.log1p(n.to(log_mass.dtype))[:, None])
        matched = [long]
        if window is not None:
            matched.append(self.short_interest(batch, target, short[0], window))
        return self.score(target, matched, other), None
