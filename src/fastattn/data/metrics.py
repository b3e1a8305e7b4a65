"""CTR metrics: rank AUC (ties averaged), group AUC (per-user, as in DIN), NDCG@k per group
(list-wise, e.g. per page of candidates) and log loss.

All vectorised torch: one sort by (group, score), tie runs averaged with scatter-adds.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["auc", "auc_bootstrap", "gauc", "ndcg", "log_loss"]


def _check(scores: Tensor, labels: Tensor, groups: Optional[Tensor] = None) -> None:
    for name, t in (("scores", scores), ("labels", labels)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-d tensor (S,), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must "
                         "have the same shape (S,)")
    if not scores.dtype.is_floating_point and scores.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"scores must be a float or integer tensor, got {scores.dtype}")
    if scores.dtype.is_floating_point and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    if bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError("labels must hold only 0 and 1")
    if groups is not None:
        if not isinstance(groups, Tensor) or groups.shape != scores.shape or \
                groups.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"groups must be an int tensor of shape {tuple(scores.shape)}")


def _group_auc(scores: Tensor, labels: Tensor,
               groups: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-group rank AUC: (auc (G,) float64, positives (G,), negatives (G,)); groups are
    the distinct values of ``groups`` in ascending order; AUC is NaN where a class is
    missing. Tied scores within a group share their average rank (Mann-Whitney U)."""
    scores, labels, groups = scores.cpu(), labels.cpu().double(), groups.cpu().long()
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    g, s, y = groups[order], scores[order], labels[order]
    n = g.shape[0]
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.clone()
    new_run[1:] |= s[1:] != s[:-1]
    grp = torch.cumsum(new_group, 0) - 1
    run = torch.cumsum(new_run, 0) - 1
    starts = new_group.nonzero().flatten()
    rank = (torch.arange(n) - starts[grp] + 1).double()               # 1-based within group
    n_runs, G = int(run[-1]) + 1, starts.shape[0]
    run_mean = (torch.zeros(n_runs, dtype=torch.float64).scatter_add_(0, run, rank)
                / torch.bincount(run, minlength=n_runs).double())
    rank = run_mean[run]
    pos = torch.zeros(G, dtype=torch.float64).scatter_add_(0, grp, y)
    size = torch.bincount(grp, minlength=G).double()
    neg = size - pos
    rank_sum = torch.zeros(G, dtype=torch.float64).scatter_add_(0, grp, y * rank)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg), pos, neg


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of ``scores`` (S,) against ``labels`` (S,) in {0, 1}: the
    probability that a random positive outscores a random negative, ties counting 1/2.
    ValueError if either class is absent."""
    _check(scores, labels)
    if scores.numel() == 0:
        raise ValueError("auc needs at least one positive and one negative label, got none")
    value, pos, neg = _group_auc(scores, labels, torch.zeros_like(scores, dtype=torch.int64))
    if pos[0] == 0 or neg[0] == 0:
        raise ValueError(f"auc needs both classes, got {int(pos[0])} positives and "
                         f"{int(neg[0])} negatives")
    return float(value[0])


def auc_bootstrap(scores: Tensor, labels: Tensor, groups: Optional[Tensor] = None, *,
                  rounds: int = 1000, seed: int = 0) -> Tensor:
    """AUCs of bootstrap resamples: (rounds, R) float64 for ``scores`` (R, S) (or (S,): R = 1)
    of R models on the same samples against ``labels`` (S,).

    Every model is scored on the same resamples, so the spread of a difference of two
    columns is the paired comparison's (much tighter than either AUC's own spread when the
    models rank alike). With ``groups`` (S,) int (e.g. users) whole groups are resampled,
    which keeps the correlation of a group's samples (candidates sharing one history).
    A resample that lacks a class gives NaN. Deterministic in ``seed``."""
    if scores.dim() == 1:
        scores = scores[None]
    if scores.dim() != 2:
        raise ValueError(f"scores must be (R, S) or (S,), got {tuple(scores.shape)}")
    for row in scores:
        _check(row, labels, groups)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    S = labels.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    if groups is None:
        groups = torch.arange(S)
    _, gid = torch.unique(groups.cpu(), return_inverse=True)
    order = torch.argsort(gid, stable=True)                 # samples grouped
    size = torch.bincount(gid)
    start = torch.cumsum(size, 0) - size
    G = size.shape[0]
    pick = torch.randint(0, G, (rounds, G), generator=gen)   # groups drawn per round
    n = size[pick].reshape(-1)
    first = start[pick].reshape(-1)
    # the samples of every drawn group: first + 0..n-1, flattened round-major
    offs = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    idx = order[torch.repeat_interleave(first, n) + offs]
    rnd = torch.repeat_interleave(torch.arange(rounds), size[pick].sum(1))
    y = labels.cpu()[idx]
    out = torch.empty(rounds, scores.shape[0], dtype=torch.float64)
    for r, row in enumerate(scores.cpu()):
        value, pos, neg = _group_auc(row[idx], y, rnd)
        out[:, r] = torch.where((pos > 0) & (neg > 0), value, float("nan"))
    return out


def gauc(scores: Tensor, labels: Tensor, groups: Tensor) -> float:
    """Group AUC (DIN): the mean of per-group AUCs weighted by group size, over the
    groups (e.g. users) that have both a positive and a negative. ValueError if none has."""
    _check(scores, labels, groups)
    if scores.numel() == 0:
        raise ValueError("gauc needs a group with both a positive and a negative label, got none")
    value, pos, neg = _group_auc(scores, labels, groups)
    ok = (pos > 0) & (neg > 0)
    if not bool(ok.any()):
        raise ValueError("gauc needs a group with both a positive and a negative label")
    weight = (pos + neg)[ok]
    return float((value[ok] * weight).sum() / weight.sum())


def ndcg(scores: Tensor, labels: Tensor, groups: Tensor, k: int = 10) -> float:
    """Mean NDCG@k over the groups (e.g. pages) of ``scores`` (S,) that have a positive.

    Within a group, items are ranked by descending score (ties by their order in the input);
    DCG@k = sum over the top k of label / log2(rank + 1), divided by the DCG@k of the
    ideal order. Binary ``labels`` (S,), ``groups`` (S,) int. ValueError if no group has
    a positive label."""
    _check(scores, labels, groups)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    s, y, g = scores.cpu().double(), labels.cpu().double(), groups.cpu().long()
    _, gid = torch.unique(g, return_inverse=True)

    def dcg(key: Tensor) -> Tensor:
        # sort by (group, key descending): stable sorts, key first
        order = torch.argsort(-key, stable=True)
        order = order[torch.argsort(gid[order], stable=True)]
        gs = gid[order]
        start = torch.ones_like(gs, dtype=torch.bool)
        start[1:] = gs[1:] != gs[:-1]
        first = torch.cummax(torch.where(start, torch.arange(gs.shape[0]), 0), 0).values
        rank = torch.arange(gs.shape[0]) - first                    # 0-based within group
        gain = torch.where(rank < k, y[order] / torch.log2(rank.double() + 2), 0.0)
        return torch.zeros(int(gid.max()) + 1 if gid.numel() else 0,
                           dtype=torch.float64).scatter_add_(0, gs, gain)

    real, ideal = dcg(s), dcg(y)
    ok = ideal > 0
    if not bool(ok.any()):
        raise ValueError("ndcg needs a group with a positive label")
    return float((real[ok] / ideal[ok]).mean())


def log_loss(probs: Tensor, labels: Tensor, *, logits: bool = False, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of ``probs`` (S,) in [0, 1] (clamped to [eps, 1 - eps]),
    or of raw ``logits`` when ``logits=True`` (numerically stable), against labels (S,)."""
    _check(probs, labels)
    x, y = probs.double(), labels.double()
    if logits:
        return float(F.binary_cross_entropy_with_logits(x, y))
    if bool(((x < 0) | (x > 1)).any()):
        raise ValueError("probs must lie in [0, 1] (pass logits=True for raw scores)")
    return float(F.binary_cross_entropy(x.clamp(eps, 1 - eps), y))
