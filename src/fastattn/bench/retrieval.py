"""Retrieval quality of the long-history models on the planted synthetic set
(``fastattn-train --retrieval``).

Two measures on held-out samples, per trained model and history length:

* **ETA recall@k by bits**, for the model's k and each of ``recall_k`` (default 64): the
  share of the exact top-k (by the attention score q·k of the
  model's own projections) that SimHash top-k retrieval finds, over ``bits``-bit
  signatures (the model's own planes at its ``hash_bits``, fresh seeded planes of the same
  kind otherwise). ``recall`` counts by score (:func:`tie_aware_hits`: a history repeats
  items, and copies of one behaviour tie; either copy gives the same attention output);
  ``recall_positions`` requires the same positions.
  With it, ``tie_share``: the share of the retrieved slots filled from the group of
  positions tied at the cut-off distance when that group does not fit (the op breaks those
  ties to the smaller, i.e. older, position); and ``recent_share``, the share of retrieved
  positions among the ``short_len`` most recent (the recent window holds 5% of a
  1,000-behaviour history).
* **Planted-interest hit rate**: over the candidates whose category c is one of the user's
  planted long-term interests and appears in the history read, ``hit_rate`` is the share
  whose retrieved set holds a behaviour of c, and ``interest_recall`` the mean of
  (retrieved behaviours of c) / min(k, behaviours of c). What each model retrieves: ETA its
  SimHash top-k (``eta_exact``: the exact top-k, for reference), SIM its category search
  (by construction it finds c whenever c is present), SDIM the behaviours colliding with
  the target in at least one hash function (``interest_recall``: the share of its collision
  weight on behaviours of c), DIN its recent window. MIMN reads no behaviour set: no row.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import CTRDataset
from ..ops import hamming_distance, hamming_topk, make_planes, simhash_sign

__all__ = ["exact_topk", "simhash_topk", "tie_aware_hits", "retrieval_rows", "markdown", "DEFAULT_BITS"]

DEFAULT_BITS = (16, 32, 64, 128, 256)


def _valid(lengths: Tensor, L: int) -> Tensor:
    return torch.arange(L, device=lengths.device) < lengths[:, None]


def exact_topk(q: Tensor, k_proj: Tensor, lengths: Tensor, k: int) -> Tensor:
    """Positions (B, k) of the k largest scores q·key over valid positions, -1 past the
    history; q (B, E), k_proj (B, L, E) (training layout), lengths (B,)."""
    scores = torch.einsum("be,ble->bl", q, k_proj)
    valid = _valid(lengths, scores.shape[1])
    scores = scores.masked_fill(~valid, float("-inf"))
    kk = min(k, scores.shape[1])
    val, idx = scores.topk(kk, dim=1)
    idx = torch.where(torch.isfinite(val), idx, -1)
    return torch.nn.functional.pad(idx, (0, k - kk), value=-1)


def tie_aware_hits(scores: Tensor, idx: Tensor, exact: Tensor) -> Tensor:
    """Per row (B,), how many of the exact top-k the retrieved positions ``idx`` (B, k)
    (-1: empty) find, counting by score: a retrieved position with a score above the k-th
    exact score counts, and those tied with it count up to the exact top-k's own number of
    tied entries. Identical behaviours have identical keys and scores, so which copy
    either side kept does not matter (the attention output is the same). ``scores``
    (B, L) with -inf past the history; ``exact`` (B, k) as :func:`exact_topk`."""
    ok, eok = idx >= 0, exact >= 0
    n = eok.sum(1)
    thr = scores.gather(1, exact.clamp(min=0)).masked_fill(~eok, float("inf"))
    thr = thr.min(1, keepdim=True).values                       # the k-th exact score
    got = scores.gather(1, idx.clamp(min=0))
    above = ((got > thr) & ok).sum(1)
    tied = torch.minimum(((got == thr) & ok).sum(1),
                         ((scores.gather(1, exact.clamp(min=0)) == thr) & eok).sum(1))
    return torch.where(n > 0, above + tied, 0)


def simhash_topk(q: Tensor, k_proj: Tensor, lengths: Tensor, k: int, planes: Tensor):
    """SimHash top-k positions (B, k) (-1 past the history) and the tie share: the share of
    retrieved slots taken from the tied group at the cut-off distance when that group does
    not fit in the k slots (those are chosen by position, not by similarity)."""
    q_sig, k_sig = simhash_sign(q, planes), simhash_sign(k_proj, planes)
    dist, idx = hamming_topk(q_sig, k_sig, k, lengths=lengths)
    # all distances (B, L), to count the positions tied with the k-th retrieved one
    full = hamming_distance(q_sig, k_sig).to(torch.int64)
    valid = _valid(lengths, full.shape[1])
    filled = (idx >= 0).sum(1)
    last = dist.gather(1, (filled - 1).clamp(min=0)[:, None])[:, 0].to(torch.int64)
    tied_all = ((full == last[:, None]) & valid).sum(1)
    tied_in = ((dist.to(torch.int64) == last[:, None]) & (idx >= 0)).sum(1)
    overflow = (tied_all > tied_in) & (filled > 0)
    tie = torch.where(overflow, tied_in, 0).sum().item() / max(int(filled.sum()), 1)
    return idx, tie


def _interest_stats(idx: Optional[Tensor], weight: Optional[Tensor], cats: Tensor,
                    lengths: Tensor, target_cat: Tensor, planted: Tensor, k: int):
    """(hits, recall sum, count) over the candidates whose category is planted and present.

    ``idx`` (B, K) retrieved positions (-1: none), or ``weight`` (B, L) read weights."""
    L = cats.shape[1]
    is_c = (cats == target_cat[:, None]) & _valid(lengths, L)              # (B, L)
    n_c = is_c.sum(1)
    sel = planted & (n_c > 0)
    if idx is not None:
        got = is_c.gather(1, idx.clamp(min=0)) & (idx >= 0)
        n_got = got.sum(1)
        hit = n_got > 0
        rec = n_got.double() / n_c.clamp(max=k).clamp(min=1).double()
    else:
        on_c = (weight * is_c).sum(1)
        hit = on_c > 0
        rec = on_c.double() / weight.sum(1).clamp(min=1e-30).double()
    return int(hit[sel].sum()), float(rec[sel].sum()), int(sel.sum())


@torch.no_grad()
def retrieval_rows(name: str, model, test: CTRDataset, truth: Dict[str, Tensor],
                   max_len: int, bits: Sequence[int] = DEFAULT_BITS,
                   recall_k: Sequence[int] = (64,), batch_size: int = 256,
                   max_samples: int = 4096, seed: int = 0) -> List[Dict[str, object]]:
    """Rows of the retrieval-quality table for trained ``model`` (key ``name``) at
    ``max_len``: one ``interest`` row per retrieval (see the module docstring) and, for
    ETA, one ``recall`` row per bit count and k (the model's ``topk`` and each of
    ``recall_k``; ``default`` marks the model's own bits). ``truth`` is the
    ``return_truth`` dict of :func:`fastattn.data.make_synthetic` for the data ``test`` was
    split from; the first ``max_samples`` test samples are read, in batches of
    ``batch_size`` (training layout)."""
    if name not in ("eta", "sim", "sdim", "din"):
        return []
    if not isinstance(truth, dict) or "interests" not in truth:
        raise ValueError("truth must be make_synthetic(..., return_truth=True)'s dict")
    for what, vals in (("bits", bits), ("recall_k", recall_k)):
        for b in vals:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"{what} must be ints >= 1, got {list(vals)}")
    model.eval()
    interests = truth["interests"]
    n = min(len(test), max_samples)
    acc: Dict[str, List[float]] = {}
    rec: Dict[int, List[float]] = {}

    def add(key, vals):
        a = acc.setdefault(key, [0.0] * len(vals))
        for i, v in enumerate(vals):
            a[i] += v

    planes = {}
    if name == "eta":
        attn = model.long_attn
        for b in bits:
            planes[b] = attn.planes if b == attn.hash_bits else make_planes(
                attn.planes.shape[0], b, torch.Generator().manual_seed(seed + 1 + b),
                orthogonal=attn.orthogonal_planes)
    for lo in range(0, n, batch_size):
        batch = test.batch(torch.arange(lo, min(n, lo + batch_size)), max_len)
        cats, lengths, tcat = batch.hist_cats, batch.lengths, batch.target_cat
        users = test.sample_user[lo:lo + len(batch)]
        planted = (interests[users] == tcat[:, None]).any(1)
        L = cats.shape[1]
        if name == "eta":
            attn, k = model.long_attn, model.long_attn.topk
            target, keys = model.embed(batch.target_item, tcat), model.embed(batch.hist_items,
                                                                              cats)
            q = attn.q_proj(target)
            # the scores retrieval approximates: of the hashed key features (the behaviour
            # embedding; ETA's time-interval embedding is attended, not hashed)
            hd = attn.hash_dims
            kp = F.linear(keys[..., :hd], attn.k_proj.weight[:, :hd], attn.k_proj.bias)
            hq, hk = attn.hashed_query(target, q), attn.hashed_keys(keys)
            pos = torch.arange(L)[None, :]
            recent = pos >= (lengths[:, None] - (model.short_len or 0))
            scores = torch.einsum("be,ble->bl", q, kp).masked_fill(~_valid(lengths, L),
                                                                   float("-inf"))
            for kr in dict.fromkeys((k, *recall_k)):
                exact = exact_topk(q, kp, lengths, kr)
                if kr == k:
                    add("eta_exact", _interest_stats(exact, None, cats, lengths, tcat,
                                                     planted, k))
                for b in bits:
                    idx, tie = simhash_topk(hq, hk, lengths, kr, planes[b])
                    same = (idx[:, :, None] == exact[:, None, :]) & (idx[:, :, None] >= 0)
                    found = tie_aware_hits(scores, idx, exact).sum().item()
                    found_pos = same.any(2).sum().item()
                    denom = int((exact >= 0).sum())
                    in_recent = (recent.gather(1, idx.clamp(min=0)) & (idx >= 0)).sum().item()
                    r = rec.setdefault((kr, b), [0.0] * 6)
                    filled = int((idx >= 0).sum())
                    r[0] += found
                    r[1] += denom
                    r[2] += tie * filled
                    r[3] += in_recent
                    r[4] += filled
                    r[5] += found_pos
            idx, _ = simhash_topk(hq, hk, lengths, k, attn.planes)     # what the model reads
            add("eta", _interest_stats(idx, None, cats, lengths, tcat, planted, k))
        elif name == "sim":
            idx = model.search(batch)
            add("sim", _interest_stats(idx, None, cats, lengths, tcat, planted, model.sim_len))
        elif name == "din":
            k = model.short_len or L
            start = (lengths - k).clamp(min=0)
            idx = start[:, None] + torch.arange(min(k, L))[None, :]
            idx = torch.where(idx < lengths[:, None], idx, -1)
            add("din", _interest_stats(idx, None, cats, lengths, tcat, planted, k))
        elif name == "sdim":
            keys = model.embed(batch.hist_items, cats)
            kc, qc = model.codes(keys), model.codes(model.embed(batch.target_item, tcat))
            hit = (kc == qc[:, None, :]) & _valid(lengths, L)[..., None]           # (B, L, H)
            w = (hit.double() / hit.sum(1, keepdim=True).clamp(min=1)).sum(-1)
            add("sdim", _interest_stats(None, w, cats, lengths, tcat, planted, L))
    model.train()
    rows: List[Dict[str, object]] = []
    for key, (hits, recall, count) in acc.items():
        rows.append({"kind": "interest", "model": key, "max_len": max_len,
                     "hit_rate": hits / count if count else None,
                     "interest_recall": recall / count if count else None,
                     "candidates": count})
    for (kr, b), (found, denom, tie, recent, filled, found_pos) in sorted(rec.items()):
        rows.append({"kind": "recall", "model": name, "max_len": max_len, "bits": b, "k": kr,
                     "default": b == model.long_attn.hash_bits,
                     "recall": found / denom if denom else None,
                     "recall_positions": found_pos / denom if denom else None,
                     "tie_share": tie / filled if filled else None,
                     "recent_share": recent / filled if filled else None})
    return rows


def markdown(rows: Iterable[Dict[str, object]]) -> str:
    """The README tables: ETA recall@k by bits and L; the planted-interest hit rate."""
    rows = list(rows)
    out: List[str] = []
    rec = [r for r in rows if r["kind"] == "recall"]
    if rec:
        lengths = sorted({r["max_len"] for r in rec})
        out += ["| k | bits | " + " | ".join(f"recall@k L={n} (by position; ties, recent)"
                                            for n in lengths) + " |",
                "|---:|---:|" + "---:|" * len(lengths)]
        for kr, b in sorted({(r["k"], r["bits"]) for r in rec}):
            cell = {r["max_len"]: r for r in rec if r["bits"] == b and r["k"] == kr}
            mark = " (default)" if any(r["default"] for r in cell.values()) else ""
            out.append(f"| {kr} | {b}{mark} | " + " | ".join(
                f"{cell[n]['recall']:.3f} ({cell[n]['recall_positions']:.3f}; "
                f"{cell[n]['tie_share']:.2f}, "
                f"{cell[n]['recent_share']:.2f})" if n in cell else "-" for n in lengths) + " |")
    hit = [r for r in rows if r["kind"] == "interest"]
    if hit:
        lengths = sorted({r["max_len"] for r in hit})
        out += ["", "| retrieval | " + " | ".join(f"hit rate (recall) L={n}" for n in lengths)
                + " |", "|---|" + "---:|" * len(lengths)]
        for m in dict.fromkeys(r["model"] for r in hit):
            cell = {r["max_len"]: r for r in hit if r["model"] == m}
            out.append(f"| {m} | " + " | ".join(
                f"{cell[n]['hit_rate']:.3f} ({cell[n]['interest_recall']:.3f})"
                if n in cell and cell[n]["hit_rate"] is not None else "-" for n in lengths)
                + " |")
    return "\n".join(out)
