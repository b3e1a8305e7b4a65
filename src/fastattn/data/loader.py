"""CSV behaviour logs ⇄ CTRDataset.

Format: a header row naming the columns ``user``, ``item``, ``category``, ``timestamp`` and
optionally ``label`` (any order, case-insensitive; other columns are ignored), then one
row per event. Ids are arbitrary strings (surrounding spaces stripped) mapped to contiguous
ids in first-seen order: users 0..n_users-1, items 1..n_items, categories 1..n_cats (0 is
padding). Timestamps are integers. Each item must keep one category. Empty lines are
skipped; every other row must be valid, else ValueError names the file, the line and the
fault. Nothing is dropped: every row becomes a behaviour and/or a sample.

Two forms:
* **No label column** (click logs, the DIN Amazon/Taobao preprocessing): every row is a
  behaviour. Each user with >= 2 behaviours gives one positive sample, their last
  behaviour, whose history is all earlier ones, followed by ``negatives`` samples with the
  same history and label 0: items drawn uniformly among all items except the positive
  (seeded by ``seed``), with their categories. A user's last behaviour is its most recent
  (file order among equal timestamps).
* **With a label column** (impression logs, 0/1): rows with label 1 are behaviours; every
  row is a sample, in file order, whose history is its user's label-1 behaviours strictly
  before its timestamp.

Optional text columns (BAHE): ``tokens``, an item's text as whitespace-separated tokens
(each item must keep one token string; tokens get ids 1..V in first-seen order, 0 is
padding), giving ``item_tokens``; ``behaviour_type``, any string per row (types get ids
0..T-1 in first-seen order), giving ``beh_type``. Without these columns the result is as
before (``item_tokens`` and ``beh_type`` None).
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Union

import numpy as np
import torch

from .dataset import CTRDataset

__all__ = ["load_csv", "save_csv"]

_REQUIRED = ("user", "item", "category", "timestamp")
_OPTIONAL = ("label", "tokens", "behaviour_type")
PathLike = Union[str, "os.PathLike[str]"]


def _ids(raw: Dict[str, int], first: int) -> List:
    """Raw ids in contiguous-id order; ``first`` = 1 puts None at index 0 (padding)."""
    return [None] * first + list(raw)


def load_csv(path: PathLike, *, negatives: int = 1, seed: int = 0,
             delimiter: str = ",") -> CTRDataset:
    """Read a behaviour log (see the module docstring for the format and the two forms)."""
    if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 0:
        raise ValueError(f"negatives must be an int >= 0, got {negatives!r}")
    name = os.fspath(path)
    users: Dict[str, int] = {}
    items: Dict[str, int] = {}
    cats: Dict[str, int] = {}
    item_cat: List[int] = [0]
    item_line: List[int] = [0]
    u_col: List[int] = []
    i_col: List[int] = []
    c_col: List[int] = []
    t_col: List[int] = []
    y_col: List[int] = []
    item_text: List[List[int]] = [[]]
    vocab: Dict[str, int] = {}
    types: Dict[str, int] = {}
    b_col: List[int] = []
    with open(name, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{name}: empty file; expected a header row naming the columns "
                             f"{', '.join(_REQUIRED)}[, label]")
        keys = [h.strip().lower() for h in header]
        missing = [c for c in _REQUIRED if c not in keys]
        if missing:
            raise ValueError(f"{name}, line 1: header misses column(s) {', '.join(missing)} "
                             f"(got {', '.join(header)})")
        for c in _REQUIRED + _OPTIONAL:
            if keys.count(c) > 1:
                raise ValueError(f"{name}, line 1: header names column {c!r} twice")
        iu, ii, ic, it = (keys.index(c) for c in _REQUIRED)
        il, itok, ib = (keys.index(c) if c in keys else None for c in _OPTIONAL)
        width = len(keys)
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) != width:
                fault = "missing field(s)" if len(row) < width else "too many fields"
                raise ValueError(f"{name}, line {line}: {fault}: expected {width} "
                                 f"({', '.join(header)}), got {len(row)}")
            u, i, c = row[iu].strip(), row[ii].strip(), row[ic].strip()
            for col, v in (("user", u), ("item", i), ("category", c)):
                if not v:
                    raise ValueError(f"{name}, line {line}: empty {col} id")
            try:
                t = int(row[it])
            except ValueError:
                raise ValueError(f"{name}, line {line}: timestamp {row[it]!r} is not an "
                                 "integer") from None
            if il is not None:
                y = row[il].strip()
                if y not in ("0", "1"):
                    raise ValueError(f"{name}, line {line}: label {row[il]!r} is not 0 or 1")
                y_col.append(int(y))
            cid = cats.setdefault(c, len(cats) + 1)
            text = ([vocab.setdefault(w, len(vocab) + 1) for w in row[itok].split()]
                    if itok is not None else [])
            iid = items.get(i)
            if iid is None:
                iid = items[i] = len(items) + 1
                item_cat.append(cid)
                item_line.append(line)
                item_text.append(text)
            elif item_cat[iid] != cid:
                raise ValueError(f"{name}, line {line}: item {i!r} has category {c!r} here "
                                 f"but {_ids(cats, 1)[item_cat[iid]]!r} on line "
                                 f"{item_line[iid]}")
            elif item_text[iid] != text:
                raise ValueError(f"{name}, line {line}: item {i!r} has tokens "
                                 f"{row[itok].strip()!r} here but other tokens on line "
                                 f"{item_line[iid]}")
            if ib is not None:
                b = row[ib].strip()
                if not b:
                    raise ValueError(f"{name}, line {line}: empty behaviour_type")
                b_col.append(types.setdefault(b, len(types)))
            u_col.append(users.setdefault(u, len(users)))
            i_col.append(iid)
            c_col.append(cid)
            t_col.append(t)

    user = np.asarray(u_col, dtype=np.int64)
    item = np.asarray(i_col, dtype=np.int64)
    cat = np.asarray(c_col, dtype=np.int64)
    ts = np.asarray(t_col, dtype=np.int64)
    n_users, n_items = len(users), len(items)
    if il is None:
        beh = np.ones(user.shape[0], dtype=bool)
    else:
        beh = np.asarray(y_col, dtype=np.int64) == 1
    rows = np.flatnonzero(beh)
    order = rows[np.lexsort((ts[rows], user[rows]))]   # stable: ties keep file order
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user[rows], minlength=n_users))])

    if il is None:
        count = np.diff(offsets)
        who = np.flatnonzero(count >= 2)
        if who.size and negatives and n_items < 2:
            raise ValueError(f"{name}: negatives={negatives} needs >= 2 distinct items, got "
                             f"{n_items}")
        last = order[offsets[who + 1] - 1]                             # positive rows
        k = 1 + negatives
        s_user = np.repeat(who, k)
        s_hist = np.repeat(count[who] - 1, k)
        s_item = np.repeat(item[last], k).reshape(-1, k)
        if negatives:
            rng = np.random.default_rng(seed)
            draw = rng.integers(1, max(n_items, 2), size=(who.size, negatives))
            pos = s_item[:, :1]
            s_item[:, 1:] = draw + (draw >= pos)          # uniform over items != positive
        s_item = s_item.reshape(-1)
        s_label = np.tile(np.r_[1.0, np.zeros(negatives)], who.size)
        s_ts = np.repeat(ts[last], k)
    else:
        # history = label-1 rows of the user strictly before the sample: sort samples
        # (kind 0) before behaviours (kind 1) at equal (user, ts) and count behaviours
        S = user.shape[0]
        ev_user = np.concatenate([user, user[rows]])
        ev_ts = np.concatenate([ts, ts[rows]])
        kind = np.concatenate([np.zeros(S, dtype=np.int64), np.ones(rows.size, np.int64)])
        ev = np.lexsort((kind, ev_ts, ev_user))
        before = np.cumsum(kind[ev]) - kind[ev]           # behaviours ahead of each event
        at = np.empty_like(ev)
        at[ev] = np.arange(ev.size)
        s_user = user
        s_hist = before[at[:S]] - offsets[user]
        s_item = item
        s_label = np.asarray(y_col, dtype=np.float32)
        s_ts = ts

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    item_cat_arr = np.asarray(item_cat, dtype=np.int64)
    tokens = None
    if itok is not None:
        K = max(1, max(len(x) for x in item_text))
        tokens = np.zeros((len(item_text), K), dtype=np.int64)
        for r, x in enumerate(item_text):
            tokens[r, :len(x)] = x
    return CTRDataset(
        beh_items=t(item[order]), beh_cats=t(cat[order]), beh_ts=t(ts[order]),
        user_offsets=t(offsets), sample_user=t(s_user), sample_hist_len=t(s_hist),
        sample_item=t(s_item), sample_cat=t(item_cat_arr[s_item]),
        sample_label=torch.from_numpy(np.asarray(s_label, dtype=np.float32)),
        n_users=n_users, n_items=n_items, n_cats=len(cats), item_cat=t(item_cat_arr),
        user_ids=_ids(users, 0), item_ids=_ids(items, 1), cat_ids=_ids(cats, 1),
        sample_ts=t(s_ts),
        beh_type=None if ib is None else t(np.asarray(b_col, dtype=np.int64)[order]),
        type_names=None if ib is None else list(types),
        item_tokens=None if tokens is None else t(tokens),
        token_names=None if itok is None else _ids(vocab, 1))


def save_csv(dataset: CTRDataset, path: PathLike, *, labels: bool = False,
             delimiter: str = ",") -> None:
    """Write ``dataset`` in the format :func:`load_csv` reads, with raw ids where known.

    labels=False: the behaviours, user by user in time order (columns user, item,
    category, timestamp); loading gives the same behaviours (users without behaviours
    cannot be written) and the click-log samples. labels=True: the label form, one row per
    sample at ``sample_ts``; it needs a dataset whose behaviours are exactly its label-1
    samples (as :func:`load_csv` makes from a labelled file), and then loading gives the
    same behaviours and samples. ValueError otherwise. Items' token strings and
    behaviour types are written as the ``tokens`` / ``behaviour_type`` columns when the
    dataset has them (raw names where known, else ``t<id>`` / the type id).
    """
    ds = dataset
    if not isinstance(ds, CTRDataset):
        raise TypeError(f"dataset must be a CTRDataset, got {type(ds).__name__}")
    user_of_row = torch.repeat_interleave(torch.arange(ds.n_users), ds.user_lengths())
    if labels:
        if ds.sample_ts is None:
            raise ValueError("save_csv(labels=True) needs sample_ts (the time of each sample), "
                             "which this dataset lacks; use labels=False")
        pos = ds.sample_label == 1
        a = _sorted_events(user_of_row, ds.beh_ts, ds.beh_items)
        b = _sorted_events(ds.sample_user[pos], ds.sample_ts[pos], ds.sample_item[pos])
        if a.shape != b.shape or not torch.equal(a, b):
            raise ValueError("save_csv(labels=True) writes behaviours as the label-1 rows, but "
                             "this dataset's behaviours are not exactly its positive samples "
                             "(synthetic data or a subset?); use labels=False")
        cols = (ds.sample_user, ds.sample_item, ds.sample_cat, ds.sample_ts,
                ds.sample_label.to(torch.int64))
        if ds.beh_type is not None:
            raise ValueError("save_csv(labels=True) cannot write behaviour types (samples "
                             "have none); use labels=False")
    else:
        cols = (user_of_row, ds.beh_items, ds.beh_cats, ds.beh_ts)
    names = [ds.user_ids, ds.item_ids, ds.cat_ids]
    header = list(_REQUIRED) + (["label"] if labels else [])
    lists = [c.tolist() for c in cols]
    for j in range(3):
        if names[j] is not None:
            lists[j] = [names[j][v] for v in lists[j]]
    if ds.item_tokens is not None:
        tok = ds.token_names
        text = [" ".join(tok[v] if tok is not None else f"t{v}" for v in row if v)
                for row in ds.item_tokens.tolist()]
        header.append("tokens")
        lists.append([text[i] for i in cols[1].tolist()])
    if ds.beh_type is not None:
        tn = ds.type_names
        header.append("behaviour_type")
        lists.append([tn[v] if tn is not None else str(v) for v in ds.beh_type.tolist()])
    with open(os.fspath(path), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(zip(*lists))


def _sorted_events(user, ts, item) -> torch.Tensor:
    """(n, 3) rows (user, ts, item) in lexicographic order, to compare two event sets."""
    x = torch.stack([user, ts, item], 1)
    for col in (2, 1, 0):
        x = x[torch.argsort(x[:, col], stable=True)]
    return x
