"""Synthetic long-history CTR data whose signal only long histories reveal.

Generative model (every draw from one ``numpy.random.Generator`` seeded by ``config.seed``,
so one seed gives identical tensors):

1. **Items.** ``n_items`` items; item i has popularity ∝ rank(i)^(-zipf_exponent) with the
   ranks a random permutation (so ids carry no popularity), and a category in
   1..n_cats, assigned by a random permutation of ``i mod n_cats`` (every category has
   ⌊n_items / n_cats⌋ or one more items). "An item of category c" below is drawn from the
   items of c in proportion to popularity; "a popular item" from all items likewise.
2. **Users.** User u has K_u ~ U{min_interests..max_interests} long-term interests:
   distinct categories drawn uniformly, with weights w_u ~ Dirichlet(interest_concentration)
   (summing to 1), and a history length n_u = ⌊exp(U(log min_len, log(max_len + 1)))⌋
   (log-uniform in [min_len, max_len]).
3. **Behaviours**, oldest → newest. The history is cut into sessions, each with its own
   short-term interest (a category drawn uniformly): a new session starts at each position
   with probability 1 / session_len, and the last ``recent_len`` positions form the final
   session, whose category is the user's **current interest** c*_u. Each behaviour is
   independently
     - long-term: an item of an interest category drawn by w_u, with probability p_long
       (p_long_recent inside the final ``recent_len`` positions);
     - short-term: an item of the session's category, with probability p_session
       (p_current_recent inside the final window);
     - otherwise a popular item (noise).
   So the long-term interests are spread sparsely over the whole history, while the
   most recent behaviours are dominated by the current interest: with the defaults the last
   50 behaviours hold about one long-term behaviour, a history of 1,000 about 450.
   Timestamps: a random start per user plus geometric gaps (mean ``mean_gap``), strictly
   increasing.
4. **Samples.** ``candidates_per_user`` candidates per user, scored after the last
   behaviour (``sample_hist_len = n_u``): with probability cand_long an item of an interest
   category (drawn by w_u), with probability cand_current an item of c*_u, otherwise a
   popular item. The label is Bernoulli(sigmoid(logit)) with
       logit = label_bias + w_long · w_u[c] + w_current · [c = c*_u]
               + w_pop · z(log popularity of the item) + label_noise · ε,   ε ~ N(0, 1),
   where c is the candidate's category, w_u[c] = 0 outside the user's interests and z
   standardises over items. The long-term term is the strongest one, and only the full
   history estimates w_u (its category shares are ≈ p_long · w_u); the last 50 behaviours
   mostly reveal c*_u. A count-based oracle (share of the candidate's category in the
   history) therefore ranks clearly better on the full history than on the last 50
   (tests/test_data.py checks the AUC gap). The default positive rate is about 0.4.
   With ``click_model="overlap"`` (the ``text`` variant, BAHE's rows) the logit reads the
   visible history instead of the hidden interests:
       logit = label_bias + w_share · share_u(c) + w_pop · z(...) + label_noise · ε,
   where share_u(c) is the share of category c among the user's ``label_window`` most
   recent behaviours (all of them when fewer): the overlap of the candidate's category
   tokens with the behaviours' tokens. Without noise and popularity terms (the ``text``
   variant) the click probability is a function of what a model reading ``label_window``
   behaviours sees, so its AUC (the oracle's) is reachable.
5. **Text and behaviour types** (BAHE), from a second generator seeded by (seed, 1), so
   they leave every draw above unchanged. Item i gets a token string of
   K_i ~ U{token_len_min..token_len_max} tokens: its category's ``cat_tokens`` tokens
   (ids 1 + (c - 1)·cat_tokens + j, shared by the category), then K_i - cat_tokens
   item-specific tokens drawn uniformly from ``item_vocab`` further ids
   (``item_tokens``, right-padded with 0). With ``n_behaviour_types`` > 1 every
   behaviour gets a type (0 = click, 1 = purchase, ...): uniform over all types, except that
   a behaviour in one of the user's long-term interest categories takes a non-click type
   (uniform over 1..T-1) with probability 0.7, so those types lean towards the interests.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import numpy as np
import torch

from .dataset import CTRDataset

__all__ = ["SyntheticConfig", "make_synthetic", "VARIANTS"]

# Named variants of the planted set (``make_synthetic(variant=...)``, ``fastattn-train
# --variant``): overrides of the SyntheticConfig defaults that move the label's signal
# between the long-term interests and the final window, to show each model's trade-off.
VARIANTS = {
    # the defaults: long-term interests are the strongest term, the current interest next
    "planted": {},
    # long-term interests dominate: stronger long-term term and candidates, a weak current
    # interest, fewer session behaviours diluting the interests' share of the history
    "long": dict(w_long=8.0, w_current=0.5, cand_long=0.5, cand_current=0.1, p_session=0.15),
    # the recent window dominates: the current interest drives the clicks, the long-term
    # interests add little
    "recent": dict(w_long=1.5, w_current=4.0, cand_long=0.2, cand_current=0.4),
    # BAHE's text rows: clicks follow the candidate category's share of the 128 most recent
    # behaviours (the longer text length's window), nothing hidden, so a model can reach
    # the oracle AUC; a short final window keeps the older behaviours in the signal
    "text": dict(click_model="overlap", label_window=128, w_share=12.0, label_bias=-2.0,
                 w_pop=0.0, label_noise=0.0, recent_len=30),
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generative model in the module docstring.

    Sizes: n_users, n_items, n_cats (n_items >= n_cats), candidates_per_user (samples per
        user), min_len / max_len (history length range, log-uniform; default up to 10,000).
    seed: the only source of randomness.
    zipf_exponent: item popularity ∝ rank^(-zipf_exponent).
    min_interests / max_interests: long-term interest categories per user (<= n_cats);
        interest_concentration: the Dirichlet parameter of their weights (smaller = more
        skewed).
    p_long / p_session: share of long-term / session behaviours before the final window
        (the rest are popular items); session_len: mean session length.
    recent_len: length of the final window dominated by the current interest;
        p_long_recent / p_current_recent: the long-term / current-interest shares inside it.
    cand_long / cand_current: share of candidates from the long-term interests / the
        current interest (the rest are popular items).
    label_bias, w_long, w_current, w_pop, label_noise: the hidden click model's logit.
    click_model: "planted" (step 4) or "overlap" (the candidate category's share of the
        ``label_window`` most recent behaviours, weighted by w_share, replaces the
        w_long and w_current terms).
    mean_gap: mean time between behaviours (timestamp units).
    token_len_min / token_len_max / cat_tokens / item_vocab: item token strings (step 5).
    n_behaviour_types: behaviour types per user's log (1: no beh_type).
    """

    n_users: int = 2000
    n_items: int = 20000
    n_cats: int = 200
    min_len: int = 50
    max_len: int = 10000
    candidates_per_user: int = 8
    seed: int = 0
    zipf_exponent: float = 1.0
    min_interests: int = 3
    max_interests: int = 5
    interest_concentration: float = 1.0
    p_long: float = 0.5
    p_session: float = 0.3
    session_len: float = 40.0
    recent_len: int = 100
    p_long_recent: float = 0.02
    p_current_recent: float = 0.8
    cand_long: float = 0.4
    cand_current: float = 0.2
    label_bias: float = -1.6
    w_long: float = 6.0
    w_current: float = 1.5
    w_pop: float = 0.3
    label_noise: float = 0.5
    mean_gap: float = 300.0
    click_model: str = "planted"
    label_window: int = 128
    w_share: float = 12.0
    token_len_min: int = 5
    token_len_max: int = 16
    cat_tokens: int = 3
    item_vocab: int = 1000
    n_behaviour_types: int = 1

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_cats", "min_len", "max_len",
                     "candidates_per_user", "min_interests", "max_interests", "recent_len",
                     "token_len_min", "token_len_max", "cat_tokens", "item_vocab",
                     "n_behaviour_types", "label_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SyntheticConfig.{name} must be an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SyntheticConfig.seed must be an int, got {self.seed!r}")
        if self.n_items < self.n_cats:
            raise ValueError(f"n_items ({self.n_items}) must be >= n_cats ({self.n_cats}) "
                             "so that every category has an item")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must be <= max_len ({self.max_len})")
        if not self.min_interests <= self.max_interests <= self.n_cats:
            raise ValueError("need min_interests <= max_interests <= n_cats, got "
                             f"{self.min_interests}, {self.max_interests}, {self.n_cats}")
        for a, b in (("p_long", "p_session"), ("p_long_recent", "p_current_recent"),
                     ("cand_long", "cand_current")):
            pa, pb = getattr(self, a), getattr(self, b)
            if pa < 0 or pb < 0 or pa + pb > 1:
                raise ValueError(f"{a} and {b} must be >= 0 with a sum <= 1, got {pa}, {pb}")
        for name in ("zipf_exponent", "label_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"SyntheticConfig.{name} must be >= 0")
        for name in ("interest_concentration", "mean_gap"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SyntheticConfig.{name} must be > 0")
        if not self.cat_tokens <= self.token_len_min <= self.token_len_max:
            raise ValueError("need cat_tokens <= token_len_min <= token_len_max, got "
                             f"{self.cat_tokens}, {self.token_len_min}, {self.token_len_max}")
        if self.click_model not in ("planted", "overlap"):
            raise ValueError(f"click_model must be 'planted' or 'overlap', got "
                             f"{self.click_model!r}")
        if self.session_len < 1:
            raise ValueError(f"session_len must be >= 1, got {self.session_len}")


class _BlockSampler:
    """Draws an index from block b (a contiguous range of a flat array) in proportion to
    the weights there, for many b at once: one searchsorted over ``b + cumulative share``."""

    def __init__(self, weights: np.ndarray, block: np.ndarray, n_blocks: int):
        # weights, block: (M,), entries grouped by block (block non-decreasing)
        self.start = np.searchsorted(block, np.arange(n_blocks), side="left")
        self.end = np.searchsorted(block, np.arange(n_blocks), side="right")
        cum = np.cumsum(weights)
        before = np.concatenate([[0.0], cum])[self.start][block]
        total = (cum[self.end - 1] - np.concatenate([[0.0], cum])[self.start])[block]
        self.key = block + (cum - before) / total
        self.key[self.end[self.end > self.start] - 1] = np.flatnonzero(self.end > self.start) + 1.0

    def draw(self, rng: np.random.Generator, b: np.ndarray) -> np.ndarray:
        x = b + (1.0 - rng.random(b.shape[0]))          # in (b, b + 1]
        idx = np.searchsorted(self.key, x, side="left")
        # rounding at the block edges can land one off: stay inside the block
        return np.clip(idx, self.start[b], self.end[b] - 1)


def _distinct_categories(rng, n_users: int, k: int, n_cats: int) -> np.ndarray:
    """(n_users, k) distinct categories per user, uniform, in chunks to bound memory."""
    out = np.empty((n_users, k), dtype=np.int64)
    chunk = max(1, (1 << 22) // n_cats)
    for lo in range(0, n_users, chunk):
        keys = rng.random((min(chunk, n_users - lo), n_cats))
        out[lo:lo + chunk] = np.argpartition(keys, k - 1, axis=1)[:, :k] + 1
    return out


def _text(cfg: SyntheticConfig, item_cat: np.ndarray, user_interests: np.ndarray,
          beh_cats: np.ndarray):
    """Step 5: item_tokens (n_items + 1, token_len_max) and beh_type (N,) or None."""
    rng = np.random.default_rng([cfg.seed, 1])
    I, Kc, K = item_cat.shape[0], cfg.cat_tokens, cfg.token_len_max
    length = rng.integers(cfg.token_len_min, K + 1, size=I)
    tokens = np.zeros((I + 1, K), dtype=np.int64)
    tokens[1:, :Kc] = 1 + (item_cat[:, None] - 1) * Kc + np.arange(Kc)
    own = 1 + cfg.n_cats * Kc + rng.integers(0, cfg.item_vocab, size=(I, K - Kc))
    tokens[1:, Kc:] = np.where(np.arange(Kc, K) < length[:, None], own, 0)
    T = cfg.n_behaviour_types
    if T == 1:
        return tokens, None
    N = beh_cats.shape[0]
    interest = (user_interests == beh_cats[:, None]).any(axis=1)
    engaged = interest & (rng.random(N) < 0.7)
    types = np.where(engaged, rng.integers(1, T, size=N), rng.integers(0, T, size=N))
    return tokens, types


def make_synthetic(config: Optional[SyntheticConfig] = None, *, return_truth: bool = False,
                   variant: str = "planted", **overrides):
    """A :class:`CTRDataset` drawn from the model in the module docstring.

    ``config`` (default ``SyntheticConfig()``) with the fields of ``VARIANTS[variant]``
    ("planted": none; "long": long-term interests dominate the clicks; "recent": the
    current interest does; "text": the candidate category's share of the recent behaviours
    does), then any field replaced by ``overrides``, e.g.
    ``make_synthetic(n_users=200, seed=3)``. Items carry token strings (``item_tokens``)
    and, with ``n_behaviour_types`` > 1, behaviours carry types (``beh_type``). With ``return_truth`` also returns a dict of the
    hidden variables: click_prob (S,) float32, interests (n_users, max_interests) int64
    (0 = unused slot), interest_weights (n_users, max_interests) float32, current_cat
    (n_users,) int64.
    """
    cfg = config if config is not None else SyntheticConfig()
    if not isinstance(cfg, SyntheticConfig):
        raise TypeError(f"config must be a SyntheticConfig, got {type(cfg).__name__}")
    unknown = set(overrides) - {f.name for f in fields(SyntheticConfig)}
    if unknown:
        raise TypeError(f"unknown SyntheticConfig fields: {sorted(unknown)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    cfg = replace(cfg, **{**VARIANTS[variant], **overrides})
    rng = np.random.default_rng(cfg.seed)
    U, I, C, Kmax = cfg.n_users, cfg.n_items, cfg.n_cats, cfg.max_interests

    # 1. items: Zipf popularity over shuffled ranks; balanced random categories
    pop = (rng.permutation(I) + 1.0) ** -cfg.zipf_exponent
    pop /= pop.sum()
    item_cat = rng.permutation(np.arange(I) % C) + 1                  # (I,) in 1..C
    by_cat = np.argsort(item_cat, kind="stable")                      # items grouped by cat
    in_cat = _BlockSampler(pop[by_cat], item_cat[by_cat] - 1, C)
    overall = _BlockSampler(pop, np.zeros(I, dtype=np.int64), 1)

    def item_of_cat(cats):          # cats in 1..C -> item ids in 1..I
        return by_cat[in_cat.draw(rng, cats - 1)] + 1

    def popular_items(n):
        return overall.draw(rng, np.zeros(n, dtype=np.int64)) + 1

    # 2. users: interests with Dirichlet weights, log-uniform history lengths
    K = rng.integers(cfg.min_interests, cfg.max_interests + 1, size=U)
    interests = _distinct_categories(rng, U, Kmax, C)
    used = np.arange(Kmax)[None, :] < K[:, None]
    w = rng.gamma(cfg.interest_concentration, size=(U, Kmax)) * used
    w = np.maximum(w, 1e-12 * used)          # a gamma draw can underflow to 0
    w /= w.sum(axis=1, keepdims=True)
    interests = np.where(used, interests, 0)
    interest_of = _BlockSampler(w[used], np.repeat(np.arange(U), K), U)  # used slots only

    def interest_cats(users):
        return interests[used][interest_of.draw(rng, users)]

    def draw(owner, p_long, p_short, short_cat):
        """For each row of ``owner`` (user ids): an item of one of the user's long-term
        interests (probability p_long), of the category short_cat (p_short), else a popular
        item. Returns (items, their categories)."""
        r = rng.random(owner.shape[0])
        is_long = r < p_long
        is_short = ~is_long & (r < p_long + p_short)
        cats = np.zeros(owner.shape[0], dtype=np.int64)
        cats[is_long] = interest_cats(owner[is_long])
        cats[is_short] = short_cat[is_short]
        items = np.empty(owner.shape[0], dtype=np.int64)
        topical = is_long | is_short
        items[topical] = item_of_cat(cats[topical])
        items[~topical] = popular_items(int((~topical).sum()))
        return items, item_cat[items - 1]

    lo, hi = np.log(cfg.min_len), np.log(cfg.max_len + 1)
    n = np.clip(np.floor(np.exp(rng.uniform(lo, hi, size=U))), cfg.min_len,
                cfg.max_len).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n)])
    N = int(offsets[-1])

    # 3. behaviours
    user = np.repeat(np.arange(U), n)                                 # (N,)
    from_end = offsets[user + 1] - 1 - np.arange(N)                   # 0 = most recent
    recent = from_end < cfg.recent_len
    new_session = rng.random(N) < 1.0 / cfg.session_len
    new_session[recent] = False
    new_session[from_end == np.minimum(n, cfg.recent_len)[user] - 1] = True  # final window
    new_session[offsets[:-1]] = True                                  # each user's first row
    session = np.cumsum(new_session) - 1
    session_cat = rng.integers(1, C + 1, size=int(session[-1]) + 1)
    current_cat = session_cat[session[offsets[1:] - 1]]               # (U,)

    items, cats = draw(user, np.where(recent, cfg.p_long_recent, cfg.p_long),
                       np.where(recent, cfg.p_current_recent, cfg.p_session),
                       session_cat[session])

    gaps = rng.geometric(min(1.0, 1.0 / cfg.mean_gap), size=N)
    csum = np.cumsum(gaps)
    t0 = rng.integers(1_500_000_000, 1_600_000_000, size=U)
    ts = t0[user] + csum - np.concatenate([[0], csum])[offsets[:-1]][user]

    # 4. samples: candidates after the last behaviour, labels from the hidden click model
    Cn = cfg.candidates_per_user
    s_user = np.repeat(np.arange(U), Cn)
    S = s_user.shape[0]
    s_item, s_cat = draw(s_user, cfg.cand_long, cfg.cand_current, current_cat[s_user])

    affinity = (w[s_user] * (interests[s_user] == s_cat[:, None])).sum(axis=1)
    # standardised under the popularity-weighted draw, so a popular item averages z = 0
    log_pop = np.log(pop)
    mean = (pop * log_pop).sum()
    z_pop = (log_pop - mean) / max(np.sqrt((pop * (log_pop - mean) ** 2).sum()), 1e-12)
    if cfg.click_model == "overlap":
        # share of each (user, category) among the user's label_window most recent ones
        win = from_end < cfg.label_window
        counts = np.zeros((U, C + 1))
        np.add.at(counts, (user[win], cats[win]), 1.0)
        share = counts[s_user, s_cat] / np.minimum(n, cfg.label_window)[s_user]
        signal = cfg.w_share * share
    else:
        signal = cfg.w_long * affinity + cfg.w_current * (s_cat == current_cat[s_user])
    logit = (cfg.label_bias + signal + cfg.w_pop * z_pop[s_item - 1]
             + cfg.label_noise * rng.standard_normal(S))
    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(S) < prob).astype(np.float32)

    # 5. text and behaviour types, from their own generator (the draws above are unchanged)
    item_tokens, beh_type = _text(cfg, item_cat, interests[user], cats)

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    ds = CTRDataset(
        beh_items=t(items), beh_cats=t(cats), beh_ts=t(ts), user_offsets=t(offsets),
        sample_user=t(s_user), sample_hist_len=t(n[s_user]), sample_item=t(s_item),
        sample_cat=t(s_cat), sample_label=torch.from_numpy(label),
        n_users=U, n_items=I, n_cats=C, item_cat=t(np.concatenate([[0], item_cat])),
        item_tokens=t(item_tokens), beh_type=None if beh_type is None else t(beh_type))
    if not return_truth:
        return ds
    return ds, {"click_prob": torch.from_numpy(prob.astype(np.float32)),
                "interests": t(interests), "interest_weights": torch.from_numpy(
                    w.astype(np.float32)), "current_cat": t(current_cat),
                "config": asdict(cfg)}
