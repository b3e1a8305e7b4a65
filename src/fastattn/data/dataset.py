"""CTRDataset: behaviour logs in CSR form plus the impressions to score, batched for models.

Behaviours are stored once, user by user (CSR): user u owns rows
``user_offsets[u]:user_offsets[u + 1]`` of ``beh_items`` / ``beh_cats`` / ``beh_ts``, in
timestamp order. A sample (impression) points into that log instead of copying a history:
its history is the first ``sample_hist_len[s]`` behaviours of user ``sample_user[s]``. So a
history of 10,000 behaviours costs nothing per sample, and many samples of one user at
different times share one log.

Batches are built by index arithmetic (offsets + arange, masked), never by a Python loop
over behaviours or rows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .batch import Batch

__all__ = ["CTRDataset"]

_INT_FIELDS = ("beh_items", "beh_cats", "beh_ts", "user_offsets", "sample_user",
               "sample_hist_len", "sample_item", "sample_cat", "item_cat")


@dataclass(eq=False)
class CTRDataset:
    """Behaviour logs and impressions (see the module docstring for the layout).

    Behaviours, N rows, CSR by user, each user's rows in timestamp order (ties: file or
    generation order):
        beh_items (N,) int64 item ids in 1..n_items (0 is padding, never a real id);
        beh_cats (N,) int64 category ids in 1..n_cats; beh_ts (N,) int64 timestamps;
        user_offsets (n_users + 1,) int64, non-decreasing, from 0 to N.
    Samples, S rows:
        sample_user (S,) int64 in 0..n_users-1; sample_hist_len (S,) int64, at most that
        user's behaviour count; sample_item / sample_cat (S,) int64 candidate ids;
        sample_label (S,) float32 in {0, 1}.
    item_cat (n_items + 1,) int64: the category of each item id (item_cat[0] = 0).
    user_ids[u], item_ids[i], cat_ids[c]: the raw id behind each contiguous id, or None.
        item_ids and cat_ids have a None at index 0 (padding), so they index like item_cat.
    sample_ts (S,) int64 or None: each sample's timestamp when known (the CSV label form).
    Text-described behaviours (BAHE), both optional:
        beh_type (N,) int64 in 0..n_types-1 or None: each behaviour's type (click,
        purchase, ...); type_names[t] its raw name when known.
        item_tokens (n_items + 1, K) int64 or None: each item's token string, right-padded
        with 0 (row 0, the padding item, all 0); token_names[v] the raw token of id v
        (None at 0) when known.

    The constructor checks shapes, dtypes, id ranges and time order (vectorised, O(N + S)).
    """

    beh_items: Tensor
    beh_cats: Tensor
    beh_ts: Tensor
    user_offsets: Tensor
    sample_user: Tensor
    sample_hist_len: Tensor
    sample_item: Tensor
    sample_cat: Tensor
    sample_label: Tensor
    n_users: int
    n_items: int
    n_cats: int
    item_cat: Tensor
    user_ids: Optional[List[str]] = None
    item_ids: Optional[List[Optional[str]]] = None
    cat_ids: Optional[List[Optional[str]]] = None
    sample_ts: Optional[Tensor] = None
    beh_type: Optional[Tensor] = None
    item_tokens: Optional[Tensor] = None
    type_names: Optional[List[str]] = None
    token_names: Optional[List[Optional[str]]] = None

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        for name in _INT_FIELDS:
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int64 or t.dim() != 1:
                raise TypeError(f"{name} must be a 1-d int64 tensor, got {t.dtype} "
                                f"of shape {tuple(t.shape)}")
        if not isinstance(self.sample_label, Tensor) or self.sample_label.dtype != torch.float32:
            raise TypeError("sample_label must be a float32 tensor in {0, 1}")
        for name in ("n_users", "n_items", "n_cats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TypeError(f"{name} must be a non-negative int, got {v!r}")
        N, S = self.beh_items.shape[0], self.sample_user.shape[0]
        for name in ("beh_cats", "beh_ts"):
            if getattr(self, name).shape[0] != N:
                raise ValueError(f"{name} must have shape (N,)=({N},) like beh_items, got "
                                 f"{tuple(getattr(self, name).shape)}")
        for name in ("sample_hist_len", "sample_item", "sample_cat", "sample_label"):
            if tuple(getattr(self, name).shape) != (S,):
                raise ValueError(f"{name} must have shape (S,)=({S},) like sample_user, got "
                                 f"{tuple(getattr(self, name).shape)}")
        if self.sample_ts is not None and (self.sample_ts.dtype != torch.int64
                                           or tuple(self.sample_ts.shape) != (S,)):
            raise ValueError(f"sample_ts must be None or an int64 tensor of shape ({S},)")
        off = self.user_offsets
        if off.shape[0] != self.n_users + 1:
            raise ValueError(f"user_offsets must have shape (n_users + 1,)=({self.n_users + 1},),"
                             f" got {tuple(off.shape)}")
        if off[0] != 0 or off[-1] != N or bool((off[1:] < off[:-1]).any()):
            raise ValueError(f"user_offsets must be non-decreasing from 0 to N={N}")
        if tuple(self.item_cat.shape) != (self.n_items + 1,):
            raise ValueError(f"item_cat must have shape (n_items + 1,)=({self.n_items + 1},), "
                             f"got {tuple(self.item_cat.shape)}")
        _check_range("beh_items", self.beh_items, 1, self.n_items)
        _check_range("beh_cats", self.beh_cats, 1, self.n_cats)
        _check_range("sample_item", self.sample_item, 1, self.n_items)
        _check_range("sample_cat", self.sample_cat, 1, self.n_cats)
        _check_range("sample_user", self.sample_user, 0, self.n_users - 1)
        _check_range("item_cat[1:]", self.item_cat[1:], 1, self.n_cats)
        if self.item_cat[0] != 0:
            raise ValueError("item_cat[0] must be 0 (the padding item)")
        if not (torch.equal(self.item_cat[self.beh_items], self.beh_cats)
                and torch.equal(self.item_cat[self.sample_item], self.sample_cat)):
            raise ValueError("beh_cats / sample_cat must equal item_cat of their items")
        if S:
            user_len = (off[1:] - off[:-1])[self.sample_user]
            if bool(((self.sample_hist_len < 0) | (self.sample_hist_len > user_len)).any()):
                raise ValueError("sample_hist_len must lie in [0, behaviours of sample_user]")
            if bool(((self.sample_label != 0) & (self.sample_label != 1)).any()):
                raise ValueError("sample_label must hold only 0 and 1")
        if N > 1:
            # a decrease is allowed only where a new user's rows start
            starts = torch.zeros(N, dtype=torch.bool)
            starts[off[1:-1][off[1:-1] < N]] = True
            bad = (self.beh_ts[1:] < self.beh_ts[:-1]) & ~starts[1:]
            if bool(bad.any()):
                row = int(bad.nonzero()[0]) + 1
                raise ValueError(f"beh_ts must be non-decreasing within each user; row {row} "
                                 "goes back in time")
        self._validate_text(N)

    def _validate_text(self, N: int) -> None:
        if self.beh_type is not None:
            t = self.beh_type
            if not isinstance(t, Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (N,):
                raise ValueError(f"beh_type must be None or an int64 tensor of shape (N,)=({N},)")
            if t.numel() and int(t.min()) < 0:
                raise ValueError("beh_type must hold type ids >= 0")
        tok = self.item_tokens
        if tok is not None:
            if (not isinstance(tok, Tensor) or tok.dtype != torch.int64 or tok.dim() != 2
                    or tok.shape[0] != self.n_items + 1):
                raise ValueError(f"item_tokens must be None or an int64 tensor of shape "
                                 f"(n_items + 1, K)=({self.n_items + 1}, K)")
            if tok.numel() and (int(tok.min()) < 0 or bool((tok[0] != 0).any())):
                raise ValueError("item_tokens must hold token ids >= 0 (0 = padding) and "
                                 "row 0 (the padding item) must be all 0")

    @property
    def n_types(self) -> int:
        """Number of behaviour types (1 without beh_type)."""
        if self.beh_type is None:
            return 1
        known = len(self.type_names) if self.type_names is not None else 0
        return max(known, int(self.beh_type.max()) + 1 if self.beh_type.numel() else 1)

    @property
    def vocab_size(self) -> int:
        """Token ids run 0..vocab_size-1 (0 without item_tokens)."""
        if self.item_tokens is None:
            return 0
        known = len(self.token_names) if self.token_names is not None else 0
        return max(known, int(self.item_tokens.max()) + 1 if self.item_tokens.numel() else 1)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self.sample_user.shape[0]

    @property
    def n_behaviours(self) -> int:
        return self.beh_items.shape[0]

    def user_lengths(self) -> Tensor:
        """(n_users,) int64: each user's number of behaviours."""
        return self.user_offsets[1:] - self.user_offsets[:-1]

    def history_lengths(self) -> Tensor:
        """(S,) int64: each sample's full history length (``sample_hist_len``)."""
        return self.sample_hist_len

    def subset(self, sample_idx: Tensor) -> "CTRDataset":
        """The same behaviours with the chosen samples: ``sample_idx`` (K,) int64 indices
        (any order, repeats allowed) or an (S,) bool mask."""
        if not isinstance(sample_idx, Tensor):
            raise TypeError(f"sample_idx must be a tensor, got {type(sample_idx).__name__}")
        if sample_idx.dtype == torch.bool:
            if tuple(sample_idx.shape) != (len(self),):
                raise ValueError(f"a boolean sample_idx must have shape (S,)=({len(self)},), "
                                 f"got {tuple(sample_idx.shape)}")
            sample_idx = sample_idx.nonzero().flatten()
        elif sample_idx.dtype not in (torch.int32, torch.int64) or sample_idx.dim() != 1:
            raise TypeError("sample_idx must be a 1-d int64 index tensor or an (S,) bool mask")
        sample_idx = sample_idx.to(torch.int64)
        _check_range("sample_idx", sample_idx, -len(self), len(self) - 1)
        pick = lambda t: None if t is None else t[sample_idx]  # noqa: E731
        return replace(self, sample_user=pick(self.sample_user),
                       sample_hist_len=pick(self.sample_hist_len),
                       sample_item=pick(self.sample_item), sample_cat=pick(self.sample_cat),
                       sample_label=pick(self.sample_label), sample_ts=pick(self.sample_ts))

    def split(self, test_frac: float = 0.2, seed: int = 0,
              by: str = "user") -> Tuple["CTRDataset", "CTRDataset"]:
        """(train, test), deterministic in ``seed``: the samples of :meth:`split_mask`'s
        False / True entries. Samples keep their relative order on each side."""
        test = self.split_mask(test_frac, seed, by)
        return self.subset(~test), self.subset(test)

    def split_mask(self, test_frac: float = 0.2, seed: int = 0, by: str = "user") -> Tensor:
        """(S,) bool: True for the test samples of :meth:`split` (e.g. to read per-sample
        side information, such as the synthetic set's click probabilities, of one side).

        by="user": ``round(test_frac * users)`` of the users that have samples (at least one,
        at most all but one) give all their samples to test, the rest to train, so no user's
        behaviours inform both sides. by="sample": a random ``test_frac`` of the samples.
        """
        if not 0.0 < float(test_frac) < 1.0:
            raise ValueError(f"test_frac must lie in (0, 1), got {test_frac}")
        gen = torch.Generator().manual_seed(int(seed))
        if by == "user":
            users = torch.unique(self.sample_user)
            if users.numel() < 2:
                raise ValueError(f"split(by='user') needs samples of >= 2 users, got "
                                 f"{users.numel()}")
            n_test = min(max(round(test_frac * users.numel()), 1), users.numel() - 1)
            test_users = users[torch.randperm(users.numel(), generator=gen)[:n_test]]
            is_test = torch.zeros(self.n_users, dtype=torch.bool)
            is_test[test_users] = True
            return is_test[self.sample_user]
        if by == "sample":
            if len(self) < 2:
                raise ValueError(f"split(by='sample') needs >= 2 samples, got {len(self)}")
            n_test = min(max(round(test_frac * len(self)), 1), len(self) - 1)
            test = torch.zeros(len(self), dtype=torch.bool)
            test[torch.randperm(len(self), generator=gen)[:n_test]] = True
            return test
        raise ValueError(f"by must be 'user' or 'sample', got {by!r}")

    # ------------------------------------------------------------------ batching
    def batch(self, sample_idx: Tensor, max_len: Optional[int] = None,
              share_histories: bool = False) -> Batch:
        """The Batch of samples ``sample_idx`` (B,).

        Training layout (default): U == B, hist_index None; row b's history is sample b's
        history truncated to its ``max_len`` most recent behaviours, oldest → newest,
        right-padded with 0 to L = the longest (truncated) history in the batch (at least
        1, so an all-empty batch still has a padding column).
        ``share_histories=True``: one row per distinct (user, history length) in the batch,
        ordered by (user, length), and ``hist_index`` (B,) mapping each sample to its row;
        the candidates of one impression then share one history instead of copies of it
        (for evaluation and serving; the model outputs are the same).
        """
        _check_max_len(max_len)
        idx = sample_idx.to(torch.int64)
        user = self.sample_user[idx]
        hist = self.sample_hist_len[idx]
        hist_index = None
        if share_histories:
            N1 = self.n_behaviours + 1
            keys, hist_index = torch.unique(user * N1 + hist, return_inverse=True)
            user, hist = keys // N1, keys % N1
        items, cats, lengths, types = self._histories(user, hist, max_len)
        return Batch(hist_items=items, hist_cats=cats, lengths=lengths,
                     target_item=self.sample_item[idx], target_cat=self.sample_cat[idx],
                     label=self.sample_label[idx], hist_index=hist_index, hist_types=types)

    def _histories(self, user: Tensor, hist: Tensor,
                   max_len: Optional[int]) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """Right-padded (U, L) items and categories, (U,) lengths and (U, L) behaviour types
        (None without beh_type) of the first ``hist`` behaviours of each ``user``, cut to
        the ``max_len`` most recent."""
        n = hist if max_len is None else hist.clamp(max=max_len)
        L = max(int(n.max()) if n.numel() else 0, 1)
        # history = rows [start, start + n) of the CSR log; the window ends at the sample's
        # history end, so truncation keeps the most recent behaviours
        start = self.user_offsets[user] + hist - n                     # (U,)
        col = torch.arange(L)
        valid = col[None, :] < n[:, None]                              # (U, L)
        if self.n_behaviours == 0:     # nothing to gather from: all padding
            pad = torch.zeros(user.shape[0], L, dtype=torch.int64)
            return pad, pad.clone(), n.clone(), None if self.beh_type is None else pad.clone()
        rows = torch.where(valid, start[:, None] + col[None, :], 0).view(-1)
        zero = torch.zeros((), dtype=torch.int64)
        # index_select on the flat rows: ~100x faster on CPU than advanced indexing of the
        # long log with a 2-d index
        items = torch.where(valid, self.beh_items.index_select(0, rows).view_as(valid), zero)
        cats = torch.where(valid, self.beh_cats.index_select(0, rows).view_as(valid), zero)
        types = None if self.beh_type is None else torch.where(
            valid, self.beh_type.index_select(0, rows).view_as(valid), zero)
        return items, cats, n.clone(), types

    def batches(self, batch_size: int, max_len: Optional[int] = None, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False,
                share_histories: bool = False) -> Iterator[Batch]:
        """Batches of ``batch_size`` samples in order (or in a permutation seeded by
        ``seed`` when ``shuffle``); the last one is smaller unless ``drop_last``.
        See :meth:`batch` for the layouts (sharing pays off when a user's samples are
        adjacent, as in the synthetic and CSV data sets). With ``share_histories`` and
        ``shuffle`` the permutation is of whole users (each user's samples stay adjacent, in
        order), so a training batch encodes each of its users' histories once."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        S = len(self)
        gen = torch.Generator().manual_seed(int(seed))
        if not shuffle:
            order = torch.arange(S)
        elif share_histories:
            rank = torch.randperm(self.n_users, generator=gen)
            order = torch.argsort(rank[self.sample_user], stable=True)
        else:
            order = torch.randperm(S, generator=gen)
        stop = S - S % batch_size if drop_last else S
        for lo in range(0, stop, batch_size):
            yield self.batch(order[lo:lo + batch_size], max_len, share_histories)

    # ------------------------------------------------------------------ features
    def category_counts(self, max_len: Optional[int] = None,
                        sample_idx: Optional[Tensor] = None) -> Tensor:
        """(S,) or (K,) int64: how many behaviours of each sample's history (its ``max_len``
        most recent, or all) are in the sample's target category.

        The count-based oracle of the synthetic data and a SIM-hard-style feature.
        Vectorised: behaviours are keyed by ``cat * (N + 1) + row`` and sorted once; a
        history is a row range of the CSR log, so each count is two binary searches.
        """
        _check_max_len(max_len)
        idx = torch.arange(len(self)) if sample_idx is None else sample_idx.to(torch.int64)
        hist = self.sample_hist_len[idx]
        n = hist if max_len is None else hist.clamp(max=max_len)
        end = self.user_offsets[self.sample_user[idx]] + hist
        N1 = self.n_behaviours + 1
        keys, _ = torch.sort(self.beh_cats * N1 + torch.arange(self.n_behaviours))
        base = self.sample_cat[idx] * N1
        return (torch.searchsorted(keys, base + end) - torch.searchsorted(keys, base + end - n))

    def stats(self) -> dict:
        """Sizes, positive rate and history-length summary (min / median / max)."""
        h = self.sample_hist_len
        S = len(self)
        return {
            "users": self.n_users, "items": self.n_items, "cats": self.n_cats,
            "behaviours": self.n_behaviours, "samples": S,
            "positive_rate": float(self.sample_label.mean()) if S else float("nan"),
            "hist_len_min": int(h.min()) if S else 0,
            "hist_len_median": float(h.double().median()) if S else 0.0,
            "hist_len_max": int(h.max()) if S else 0,
        }


def _check_range(name: str, t: Tensor, lo: int, hi: int) -> None:
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got values in "
                         f"[{int(t.min())}, {int(t.max())}]")


def _check_max_len(max_len) -> None:
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                or max_len < 1):
        raise ValueError(f"max_len must be None or an int >= 1, got {max_len!r}")
