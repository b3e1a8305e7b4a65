"""EdgeRec data (issue 17): click and exposure sequences with per-behaviour detail features,
and pages of candidates to re-rank.

Each user has a **click sequence** (items clicked, oldest → newest) with click detail
features, an **exposure sequence** (items shown but not clicked) with exposure detail
features, and ``pages_per_user`` **pages** (one request each) of ``page_size`` candidates
with click labels. A page is the group of the list-wise metrics (GAUC, NDCG@k).

Generative model (one ``numpy.random.Generator`` seeded by ``config.seed``):

1. **Items**: ``n_items`` items, Zipf popularity over shuffled ranks, categories by a
   random permutation of ``i mod n_cats`` (as :mod:`fastattn.data.synthetic`).
2. **Users**: distinct categories, uniform: ``n_interests`` *interests* (weights
   ~ Dirichlet(1)), ``n_decoys`` *decoys* (click-bait the user taps and leaves at once)
   and one *latent* interest (cards the user lingers on but has not clicked yet).
3. **Clicks** (length uniform in [min_clicks, max_clicks]): an item of an interest (by its
   weight) with probability p_click_interest, of a decoy with p_click_decoy, else a
   popular item. Detail features (``click_details`` = 3): log dwell time
   ~ N(dwell_shift · genuine, 1), scroll depth ~ clip(N(0.3 + 0.4 · genuine, 0.25), 0, 1)
   and add-to-cart ~ Bernoulli(0.25 if genuine else 0.03), where *genuine* = the click is
   on an interest. Decoys and interests are clicked about as often, so **the items alone
   do not tell a user's interests from their decoys; the detail features do**.
4. **Exposures** (length uniform in [min_exposures, max_exposures]): an item of the
   latent interest with p_exp_latent, of an interest with p_exp_interest, of a decoy with
   p_exp_decoy, else a popular item. Detail features (``exposure_details`` = 2): log
   exposure duration ~ N(dwell_shift · lingered, 1) and scrolled-back ~ Bernoulli(0.3 if
   lingered else 0.05), where *lingered* = latent or interest item.
5. **Pages**: each candidate is an item of an interest (p 0.3), a decoy (0.25), the
   latent interest (0.15) or a popular item. Click label ~ Bernoulli(sigmoid(logit)),
       logit = label_bias + w_interest · n_interests · weight(c) + w_latent · [c latent]
               + w_decoy · [c decoy] + w_pop · z(log popularity) + label_noise · ε,
   so interest and latent candidates are clicked, decoy ones less than popular items.

Everything is stored dense (small sets for reference training and tests): clicks
(n_users, max_clicks), exposures (n_users, max_exposures), pages (n_pages, page_size).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .batch import Batch, recent

__all__ = ["EdgeRecConfig", "EdgeRecBatch", "EdgeRecData", "make_edgerec",
           "CLICK_DETAILS", "EXPOSURE_DETAILS"]

#: Names of the detail feature columns.
CLICK_DETAILS = ("log_dwell", "scroll_depth", "add_to_cart")
EXPOSURE_DETAILS = ("log_exposure", "scrolled_back")


@dataclass
class EdgeRecBatch(Batch):
    """A :class:`Batch` whose history is the click sequence, plus the exposure sequence.

    Batch fields: ``hist_items``/``hist_cats`` (U, Lc) clicks, ``lengths`` (U,) their
    counts, ``target_item``/``target_cat`` (B,) candidates, ``label`` (B,) or None,
    ``hist_index`` (B,) the user of each candidate (None: U == B or U == 1).
    Added: ``hist_details`` (U, Lc, Fc) float click details; ``exp_items``/``exp_cats``
    (U, Le) exposures (0 = padding), ``exp_lengths`` (U,), ``exp_details`` (U, Le, Fe);
    ``page`` (B,) int64 page id of each candidate (the group of GAUC / NDCG), or None.
    """

    hist_details: Optional[Tensor] = None
    exp_items: Optional[Tensor] = None
    exp_cats: Optional[Tensor] = None
    exp_lengths: Optional[Tensor] = None
    exp_details: Optional[Tensor] = None
    page: Optional[Tensor] = None

    def truncate(self, max_len: int) -> "EdgeRecBatch":
        """Keep each user's ``max_len`` most recent clicks (and their details)."""
        out = super().truncate(max_len)
        if self.hist_details is None:
            return out
        return replace(out, hist_details=recent(self.hist_details, self.lengths, max_len))


@dataclass(frozen=True)
class EdgeRecConfig:
    """Parameters of the generative model in the module docstring (all ints >= 1 except
    where said, probabilities in [0, 1])."""

    n_users: int = 3000
    n_items: int = 3000
    n_cats: int = 60
    n_interests: int = 3
    n_decoys: int = 2
    min_clicks: int = 10
    max_clicks: int = 40
    min_exposures: int = 20
    max_exposures: int = 80
    pages_per_user: int = 4
    page_size: int = 10
    seed: int = 0
    zipf_exponent: float = 1.0
    p_click_interest: float = 0.45
    p_click_decoy: float = 0.4
    p_exp_latent: float = 0.15
    p_exp_interest: float = 0.15
    p_exp_decoy: float = 0.15
    dwell_shift: float = 1.5
    label_bias: float = -1.0
    w_interest: float = 2.0
    w_latent: float = 1.5
    w_decoy: float = -1.0
    w_pop: float = 0.3
    label_noise: float = 0.3

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_cats", "n_interests", "n_decoys", "min_clicks",
                     "max_clicks", "min_exposures", "max_exposures", "pages_per_user",
                     "page_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EdgeRecConfig.{name} must be an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"EdgeRecConfig.seed must be an int, got {self.seed!r}")
        if self.n_interests + self.n_decoys + 1 > self.n_cats or self.n_items < self.n_cats:
            raise ValueError(f"need n_interests + n_decoys + 1 <= n_cats <= n_items, got "
                             f"{self.n_interests} + {self.n_decoys} + 1, {self.n_cats}, "
                             f"{self.n_items}")
        for lo, hi in (("min_clicks", "max_clicks"), ("min_exposures", "max_exposures")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} ({getattr(self, lo)}) must be <= {hi} "
                                 f"({getattr(self, hi)})")
        for group in (("p_click_interest", "p_click_decoy"),
                      ("p_exp_latent", "p_exp_interest", "p_exp_decoy")):
            ps = [getattr(self, n) for n in group]
            if min(ps) < 0 or sum(ps) > 1:
                raise ValueError(f"{', '.join(group)} must be >= 0 with a sum <= 1, got {ps}")
        if self.zipf_exponent < 0 or self.label_noise < 0:
            raise ValueError("zipf_exponent and label_noise must be >= 0")


@dataclass(eq=False)
class EdgeRecData:
    """Dense EdgeRec data (module docstring); ``batches`` yields :class:`EdgeRecBatch`.

    Per user u (n_users rows): ``click_items``/``click_cats`` (U, Lc) int64,
    ``click_details`` (U, Lc, Fc) float32, ``click_len`` (U,); ``exp_items``/``exp_cats``
    (U, Le), ``exp_details`` (U, Le, Fe), ``exp_len`` (U,). Per page p (n_pages rows):
    ``page_user`` (P,), ``cand_items``/``cand_cats`` (P, page_size), ``labels``
    (P, page_size) float32 in {0, 1}. Padding ids and details are 0.
    """

    click_items: Tensor
    click_cats: Tensor
    click_details: Tensor
    click_len: Tensor
    exp_items: Tensor
    exp_cats: Tensor
    exp_details: Tensor
    exp_len: Tensor
    page_user: Tensor
    cand_items: Tensor
    cand_cats: Tensor
    labels: Tensor
    n_items: int
    n_cats: int

    @property
    def n_users(self) -> int:
        return self.click_items.shape[0]

    @property
    def n_pages(self) -> int:
        return self.page_user.shape[0]

    @property
    def page_size(self) -> int:
        return self.cand_items.shape[1]

    def __len__(self) -> int:
        """Number of samples (candidates)."""
        return self.cand_items.numel()

    def split(self, test_frac: float = 0.2, seed: int = 0) -> Tuple["EdgeRecData", "EdgeRecData"]:
        """(train, test) by user: a random ``test_frac`` of the users and all their pages."""
        train_users, test_users = self.split_users(test_frac, seed)
        return self.subset(train_users), self.subset(test_users)

    def split_users(self, test_frac: float = 0.2, seed: int = 0) -> Tuple[Tensor, Tensor]:
        """The (train, test) user indices of :meth:`split`, each sorted."""
        if not 0 < test_frac < 1:
            raise ValueError(f"test_frac must lie in (0, 1), got {test_frac!r}")
        perm = torch.randperm(self.n_users, generator=torch.Generator().manual_seed(seed))
        n_test = max(1, int(round(test_frac * self.n_users)))
        return torch.sort(perm[n_test:]).values, torch.sort(perm[:n_test]).values

    def subset(self, users: Tensor) -> "EdgeRecData":
        """The data of ``users`` (int64 indices), users renumbered 0.. in that order."""
        users = torch.sort(users.to(torch.int64)).values
        new_id = torch.full((self.n_users,), -1, dtype=torch.int64)
        new_id[users] = torch.arange(users.shape[0])
        keep = new_id[self.page_user] >= 0
        per_user = {k: getattr(self, k)[users] for k in
                    ("click_items", "click_cats", "click_details", "click_len", "exp_items",
                     "exp_cats", "exp_details", "exp_len")}
        return EdgeRecData(**per_user, page_user=new_id[self.page_user[keep]],
                           cand_items=self.cand_items[keep], cand_cats=self.cand_cats[keep],
                           labels=self.labels[keep], n_items=self.n_items, n_cats=self.n_cats)

    def batch(self, pages: Tensor, *, full_width: bool = False) -> EdgeRecBatch:
        """The batch of ``pages`` (int64 indices): each distinct user's sequences once
        (U rows, cut to the longest valid length, or with ``full_width`` kept at the
        stored widths max_clicks / max_exposures: fixed shapes), the pages' candidates
        flattened (B = len(pages) · page_size) with ``hist_index`` and ``page``."""
        users, inverse = torch.unique(self.page_user[pages], return_inverse=True)
        lc = max(int(self.click_len[users].max()), 1)
        le = max(int(self.exp_len[users].max()), 1)
        if full_width:
            lc, le = self.click_items.shape[1], self.exp_items.shape[1]
        P = self.page_size
        return EdgeRecBatch(
            hist_items=self.click_items[users, :lc], hist_cats=self.click_cats[users, :lc],
            lengths=self.click_len[users], target_item=self.cand_items[pages].reshape(-1),
            target_cat=self.cand_cats[pages].reshape(-1),
            label=self.labels[pages].reshape(-1), hist_index=inverse.repeat_interleave(P),
            hist_details=self.click_details[users, :lc], exp_items=self.exp_items[users, :le],
            exp_cats=self.exp_cats[users, :le], exp_lengths=self.exp_len[users],
            exp_details=self.exp_details[users, :le], page=pages.repeat_interleave(P))

    def batches(self, pages_per_batch: int, *, shuffle: bool = False,
                seed: int = 0) -> Iterator[EdgeRecBatch]:
        """Batches of ``pages_per_batch`` pages (the last one may be smaller)."""
        if isinstance(pages_per_batch, bool) or not isinstance(pages_per_batch, int) \
                or pages_per_batch < 1:
            raise ValueError(f"pages_per_batch must be an int >= 1, got {pages_per_batch!r}")
        order = (torch.randperm(self.n_pages, generator=torch.Generator().manual_seed(seed))
                 if shuffle else torch.arange(self.n_pages))
        for lo in range(0, self.n_pages, pages_per_batch):
            yield self.batch(order[lo:lo + pages_per_batch])

    def stats(self) -> Dict[str, float]:
        return {"users": self.n_users, "pages": self.n_pages, "page_size": self.page_size,
                "samples": len(self), "positive_rate": float(self.labels.mean()),
                "mean_clicks": float(self.click_len.float().mean()),
                "mean_exposures": float(self.exp_len.float().mean())}


def _zipf_items(rng, cfg: EdgeRecConfig):
    """(popularity (I,), category of each item (I,) in 1..C, item sampler by category)."""
    I, C = cfg.n_items, cfg.n_cats
    pop = (rng.permutation(I) + 1.0) ** -cfg.zipf_exponent
    pop /= pop.sum()
    item_cat = rng.permutation(np.arange(I) % C) + 1
    cdf_all = np.cumsum(pop)
    by_cat = [np.flatnonzero(item_cat == c) for c in range(1, C + 1)]
    cdf_cat = [np.cumsum(pop[ix]) for ix in by_cat]

    def of_cat(cats: np.ndarray) -> np.ndarray:
        out = np.empty(cats.shape[0], dtype=np.int64)
        for c in np.unique(cats):
            sel = cats == c
            cdf = cdf_cat[c - 1]
            j = np.searchsorted(cdf, rng.random(int(sel.sum())) * cdf[-1], side="right")
            out[sel] = by_cat[c - 1][np.minimum(j, cdf.shape[0] - 1)] + 1
        return out

    def popular(n: int) -> np.ndarray:
        j = np.searchsorted(cdf_all, rng.random(n) * cdf_all[-1], side="right")
        return np.minimum(j, I - 1) + 1

    return pop, item_cat, of_cat, popular


def make_edgerec(config: Optional[EdgeRecConfig] = None, *, return_truth: bool = False,
                 **overrides):
    """An :class:`EdgeRecData` drawn from the model in the module docstring.

    ``config`` (default ``EdgeRecConfig()``) with fields replaced by ``overrides``, e.g.
    ``make_edgerec(n_users=200, seed=3)``. With ``return_truth`` also a dict: click_prob
    (n_pages, page_size), interests (U, n_interests), decoys (U, n_decoys), latent (U,).
    """
    cfg = config if config is not None else EdgeRecConfig()
    if not isinstance(cfg, EdgeRecConfig):
        raise TypeError(f"config must be an EdgeRecConfig, got {type(cfg).__name__}")
    unknown = set(overrides) - {f.name for f in fields(EdgeRecConfig)}
    if unknown:
        raise TypeError(f"unknown EdgeRecConfig fields: {sorted(unknown)}")
    cfg = replace(cfg, **overrides)
    rng = np.random.default_rng(cfg.seed)
    U, C, K, Dk = cfg.n_users, cfg.n_cats, cfg.n_interests, cfg.n_decoys
    pop, item_cat, of_cat, popular = _zipf_items(rng, cfg)

    # 2. users: interests, decoys and a latent interest, distinct categories
    cats = np.argsort(rng.random((U, C)), axis=1)[:, :K + Dk + 1] + 1
    interests, decoys, latent = cats[:, :K], cats[:, K:K + Dk], cats[:, K + Dk]
    w = rng.dirichlet(np.ones(K), size=U)                              # (U, K)

    def pick(owner: np.ndarray, table: np.ndarray, weights=None) -> np.ndarray:
        if weights is None:
            return table[owner, rng.integers(0, table.shape[1], owner.shape[0])]
        cdf = np.cumsum(weights[owner], axis=1)
        j = (rng.random(owner.shape[0])[:, None] > cdf).sum(1)
        return table[owner, np.minimum(j, table.shape[1] - 1)]

    def sequence(lo: int, hi: int, kinds: Dict[str, float]):
        """Per user a sequence of lengths U{lo..hi}; each position one of ``kinds`` (by
        probability, the rest 'popular'). Returns (items, kind codes, lengths) dense."""
        n = rng.integers(lo, hi + 1, size=U)
        owner = np.repeat(np.arange(U), n)
        r = rng.random(owner.shape[0])
        kind = np.full(owner.shape[0], -1)
        edge = 0.0
        for code, p in enumerate(kinds.values()):
            kind[(r >= edge) & (r < edge + p)] = code
            edge += p
        cat = np.zeros(owner.shape[0], dtype=np.int64)
        for code, name in enumerate(kinds):
            sel = kind == code
            if name == "interest":
                cat[sel] = pick(owner[sel], interests, w)
            elif name == "decoy":
                cat[sel] = pick(owner[sel], decoys)
            else:
                cat[sel] = latent[owner[sel]]
        items = np.empty(owner.shape[0], dtype=np.int64)
        topical = kind >= 0
        items[topical] = of_cat(cat[topical])
        items[~topical] = popular(int((~topical).sum()))
        pos = np.arange(owner.shape[0]) - np.repeat(np.cumsum(n) - n, n)
        dense = np.zeros((U, hi), dtype=np.int64)
        dense[owner, pos] = items
        kinds_dense = np.full((U, hi), -2)
        kinds_dense[owner, pos] = kind
        return dense, kinds_dense, n

    # 3. clicks and their detail features
    c_items, c_kind, c_len = sequence(cfg.min_clicks, cfg.max_clicks,
                                      {"interest": cfg.p_click_interest,
                                       "decoy": cfg.p_click_decoy})
    genuine = (c_kind == 0).astype(np.float64)
    valid_c = c_kind > -2
    c_det = np.stack([rng.normal(cfg.dwell_shift * genuine, 1.0),
                      np.clip(rng.normal(0.3 + 0.4 * genuine, 0.25), 0, 1),
                      (rng.random(genuine.shape) < np.where(genuine > 0, 0.25, 0.03))
                      .astype(np.float64)], -1) * valid_c[..., None]

    # 4. exposures and their detail features
    e_items, e_kind, e_len = sequence(cfg.min_exposures, cfg.max_exposures,
                                      {"latent": cfg.p_exp_latent,
                                       "interest": cfg.p_exp_interest,
                                       "decoy": cfg.p_exp_decoy})
    lingered = ((e_kind == 0) | (e_kind == 1)).astype(np.float64)
    valid_e = e_kind > -2
    e_det = np.stack([rng.normal(cfg.dwell_shift * lingered, 1.0),
                      (rng.random(lingered.shape) < np.where(lingered > 0, 0.3, 0.05))
                      .astype(np.float64)], -1) * valid_e[..., None]

    # 5. pages of candidates and their labels
    P, S = cfg.pages_per_user, cfg.page_size
    owner = np.repeat(np.arange(U), P * S)
    r = rng.random(owner.shape[0])
    cand_cat = np.zeros(owner.shape[0], dtype=np.int64)
    is_int, is_dec, is_lat = r < 0.3, (r >= 0.3) & (r < 0.55), (r >= 0.55) & (r < 0.7)
    cand_cat[is_int] = pick(owner[is_int], interests, w)
    cand_cat[is_dec] = pick(owner[is_dec], decoys)
    cand_cat[is_lat] = latent[owner[is_lat]]
    topical = is_int | is_dec | is_lat
    cand = np.empty(owner.shape[0], dtype=np.int64)
    cand[topical] = of_cat(cand_cat[topical])
    cand[~topical] = popular(int((~topical).sum()))
    cand_cat = item_cat[cand - 1]
    weight = (w[owner] * (interests[owner] == cand_cat[:, None])).sum(1)
    log_pop = np.log(pop)
    mean = (pop * log_pop).sum()
    z_pop = (log_pop - mean) / max(np.sqrt((pop * (log_pop - mean) ** 2).sum()), 1e-12)
    logit = (cfg.label_bias + cfg.w_interest * K * weight
             + cfg.w_latent * (cand_cat == latent[owner])
             + cfg.w_decoy * (decoys[owner] == cand_cat[:, None]).any(1)
             + cfg.w_pop * z_pop[cand - 1] + cfg.label_noise * rng.standard_normal(owner.shape[0]))
    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(owner.shape[0]) < prob).astype(np.float32)

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    cat_of = np.concatenate([[0], item_cat])
    data = EdgeRecData(
        click_items=t(c_items), click_cats=t(cat_of[c_items]), click_details=f(c_det),
        click_len=t(c_len), exp_items=t(e_items), exp_cats=t(cat_of[e_items]),
        exp_details=f(e_det), exp_len=t(e_len), page_user=t(np.repeat(np.arange(U), P)),
        cand_items=t(cand.reshape(U * P, S)), cand_cats=t(cand_cat.reshape(U * P, S)),
        labels=torch.from_numpy(label.reshape(U * P, S)), n_items=cfg.n_items, n_cats=C)
    if not return_truth:
        return data
    return data, {"click_prob": f(prob.reshape(U * P, S)), "interests": t(interests),
                  "decoys": t(decoys), "latent": t(latent), "config": asdict(cfg)}
