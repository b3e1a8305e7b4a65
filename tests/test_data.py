"""fastattn.data: CTRDataset batching and splits, the synthetic generator, CSV logs, metrics."""
from __future__ import annotations

import itertools
import math
from dataclasses import fields

import pytest
import torch

from fastattn.data import (Batch, CTRDataset, SyntheticConfig, auc, gauc, load_csv, log_loss,
                           make_synthetic, save_csv)

SMALL = dict(n_users=60, n_items=500, n_cats=20, min_len=5, max_len=300,
             candidates_per_user=4)


@pytest.fixture(scope="module")
def small():
    return make_synthetic(**SMALL, seed=1)


def tensors(ds):
    return {f.name: getattr(ds, f.name) for f in fields(ds)
            if isinstance(getattr(ds, f.name), torch.Tensor)}


def user_rows(ds, u):
    return range(int(ds.user_offsets[u]), int(ds.user_offsets[u + 1]))


def naive_history(ds, s, max_len=None):
    """Sample s's history as item / category lists, one behaviour at a time."""
    rows = list(user_rows(ds, int(ds.sample_user[s])))[:int(ds.sample_hist_len[s])]
    if max_len is not None:
        rows = rows[len(rows) - min(max_len, len(rows)):]
    return [int(ds.beh_items[r]) for r in rows], [int(ds.beh_cats[r]) for r in rows]


# ---------------------------------------------------------------- synthetic generator

def test_synthetic_deterministic_by_seed(small):
    again = make_synthetic(SyntheticConfig(**SMALL, seed=1))
    for name, t in tensors(small).items():
        assert torch.equal(t, getattr(again, name)), name
    other = make_synthetic(**SMALL, seed=2)
    assert not torch.equal(small.user_offsets, other.user_offsets)
    assert not torch.equal(small.sample_item, other.sample_item)


def test_synthetic_shapes_dtypes_ranges(small):
    ds, cfg = small, SyntheticConfig(**SMALL)
    N, S = ds.n_behaviours, len(ds)
    assert (ds.n_users, ds.n_items, ds.n_cats) == (cfg.n_users, cfg.n_items, cfg.n_cats)
    assert S == cfg.n_users * cfg.candidates_per_user
    for name, t in tensors(ds).items():
        assert t.dtype == (torch.float32 if name == "sample_label" else torch.int64), name
    assert ds.beh_items.shape == ds.beh_cats.shape == ds.beh_ts.shape == (N,)
    assert ds.user_offsets.shape == (cfg.n_users + 1,) and int(ds.user_offsets[-1]) == N
    assert int(ds.beh_items.min()) >= 1 and int(ds.beh_items.max()) <= ds.n_items
    assert int(ds.sample_item.min()) >= 1 and int(ds.sample_item.max()) <= ds.n_items
    assert ds.item_cat.shape == (ds.n_items + 1,) and int(ds.item_cat[0]) == 0
    assert torch.equal(ds.beh_cats, ds.item_cat[ds.beh_items])
    assert torch.equal(ds.sample_cat, ds.item_cat[ds.sample_item])
    assert torch.equal(torch.unique(ds.item_cat[1:]), torch.arange(1, ds.n_cats + 1))
    assert set(ds.sample_label.unique().tolist()) <= {0.0, 1.0}


def test_synthetic_time_order_and_history_lengths(small):
    ds, cfg = small, SyntheticConfig(**SMALL)
    lengths = ds.user_lengths()
    assert int(lengths.min()) >= cfg.min_len and int(lengths.max()) <= cfg.max_len
    assert torch.equal(ds.sample_hist_len, lengths[ds.sample_user])   # scored after the last
    for u in range(ds.n_users):
        ts = ds.beh_ts[ds.user_offsets[u]:ds.user_offsets[u + 1]]
        assert bool((ts[1:] > ts[:-1]).all())
    long = make_synthetic(n_users=3, n_items=500, n_cats=20, min_len=10_000, max_len=10_000)
    assert long.user_lengths().tolist() == [10_000] * 3
    assert int(long.history_lengths().max()) == 10_000


def test_synthetic_label_balance():
    ds = make_synthetic(n_users=400, n_items=5000, n_cats=100, max_len=2000, seed=3)
    assert 0.3 <= float(ds.sample_label.mean()) <= 0.6


def test_synthetic_only_long_histories_reveal_the_signal():
    """Share of the target's category in the whole history ranks clicks clearly better
    than its share in the last 50 behaviours (the planted long-term interests)."""
    ds = make_synthetic(n_users=300, n_items=5000, n_cats=100, min_len=200, max_len=3000)
    full = ds.category_counts() / ds.history_lengths()
    last50 = ds.category_counts(max_len=50) / ds.history_lengths().clamp(max=50)
    auc_full, auc_50 = auc(full, ds.sample_label), auc(last50, ds.sample_label)
    assert auc_full >= auc_50 + 0.05, (auc_full, auc_50)
    assert auc_full > 0.65


def test_synthetic_truth_and_config_checks():
    ds, truth = make_synthetic(**SMALL, return_truth=True)
    assert truth["click_prob"].shape == (len(ds),)
    w = truth["interest_weights"]
    assert torch.allclose(w.sum(1), torch.ones(ds.n_users))
    assert bool(((truth["interests"] == 0) == (w == 0)).all())
    with pytest.raises(TypeError, match="unknown"):
        make_synthetic(n_user=3)
    with pytest.raises(ValueError, match="min_len"):
        SyntheticConfig(min_len=10, max_len=5)
    with pytest.raises(ValueError, match="n_cats"):
        SyntheticConfig(n_items=10, n_cats=20)


# ---------------------------------------------------------------- CTRDataset

def test_category_counts_match_naive(small):
    for max_len in (None, 7):
        counts = small.category_counts(max_len=max_len)
        for s in range(0, len(small), 7):
            _, cats = naive_history(small, s, max_len)
            assert int(counts[s]) == cats.count(int(small.sample_cat[s]))


@pytest.mark.parametrize("max_len", [None, 1, 40])
def test_batch_matches_naive_histories(small, max_len):
    idx = torch.tensor([5, 0, 17, 17, 200, 3])
    b = small.batch(idx, max_len=max_len)
    assert isinstance(b, Batch) and b.hist_index is None
    want = [naive_history(small, int(s), max_len) for s in idx]
    L = max(len(items) for items, _ in want)
    assert b.hist_items.shape == b.hist_cats.shape == (len(idx), L)      # not max_len
    for r, (items, cats) in enumerate(want):
        n = len(items)
        assert int(b.lengths[r]) == n
        assert b.hist_items[r, :n].tolist() == items and b.hist_cats[r, :n].tolist() == cats
        assert not bool(b.hist_items[r, n:].any()) and not bool(b.hist_cats[r, n:].any())
    assert torch.equal(b.target_item, small.sample_item[idx])
    assert torch.equal(b.target_cat, small.sample_cat[idx])
    assert torch.equal(b.label, small.sample_label[idx])
    if max_len is not None:   # most recent behaviours, as Batch.truncate keeps them
        full = small.batch(idx).truncate(max_len)
        assert torch.equal(full.hist_items, b.hist_items) and torch.equal(full.lengths, b.lengths)


def test_batch_shared_histories(small):
    idx = torch.arange(0, 40)                     # 10 users x 4 candidates, user-major
    for max_len in (None, 30):
        dense = small.batch(idx, max_len)
        shared = small.batch(idx, max_len, share_histories=True)
        assert shared.hist_items.shape[0] == 10 and shared.hist_index.tolist() == \
            torch.arange(10).repeat_interleave(4).tolist()
        # every sample sees the same history as in the training layout
        assert torch.equal(shared.hist_items[shared.hist_index], dense.hist_items)
        assert torch.equal(shared.hist_cats[shared.hist_index], dense.hist_cats)
        assert torch.equal(shared.lengths[shared.hist_index], dense.lengths)
        assert torch.equal(shared.target_item, dense.target_item)
    b = next(small.batches(12, share_histories=True))
    assert b.hist_index is not None and b.hist_items.shape[0] == 3


def test_batch_empty_histories():
    ds = CTRDataset(beh_items=torch.tensor([3]), beh_cats=torch.tensor([1]),
                    beh_ts=torch.tensor([0]), user_offsets=torch.tensor([0, 1, 1]),
                    sample_user=torch.tensor([0, 1]), sample_hist_len=torch.tensor([0, 0]),
                    sample_item=torch.tensor([1, 2]), sample_cat=torch.tensor([1, 1]),
                    sample_label=torch.tensor([1.0, 0.0]), n_users=2, n_items=3, n_cats=1,
                    item_cat=torch.tensor([0, 1, 1, 1]))
    b = ds.batch(torch.tensor([0, 1]))
    assert b.hist_items.shape == (2, 1) and b.lengths.tolist() == [0, 0]
    assert not bool(b.hist_items.any())


def test_batches_sizes_order_and_shuffle(small):
    S = len(small)                                   # 240
    plain = list(small.batches(64))
    assert [len(b) for b in plain] == [64, 64, 64, 48]
    assert torch.equal(torch.cat([b.target_item for b in plain]), small.sample_item)
    assert [len(b) for b in small.batches(64, drop_last=True)] == [64, 64, 64]
    assert [len(b) for b in small.batches(S)] == [S]
    for b in small.batches(50, max_len=20):
        assert int(b.lengths.max()) <= 20 and b.hist_items.shape[1] == int(b.lengths.max())

    def order(seed):
        return torch.cat([b.target_item * 1000 + b.lengths
                          for b in small.batches(64, shuffle=True, seed=seed)])
    a, again, other = order(0), order(0), order(1)
    assert torch.equal(a, again) and not torch.equal(a, other)
    key = small.sample_item * 1000 + small.sample_hist_len
    assert torch.equal(a.sort().values, key.sort().values)      # each sample exactly once
    with pytest.raises(ValueError, match="batch_size"):
        next(small.batches(0))
    with pytest.raises(ValueError, match="max_len"):
        small.batch(torch.tensor([0]), max_len=0)


def test_split_by_user_disjoint_and_deterministic(small):
    train, test = small.split(0.25, seed=4)
    tr_users, te_users = set(train.sample_user.tolist()), set(test.sample_user.tolist())
    assert not tr_users & te_users
    assert tr_users | te_users == set(small.sample_user.tolist())
    assert len(te_users) == round(0.25 * small.n_users)
    assert len(train) + len(test) == len(small)
    assert train.beh_items is small.beh_items                 # behaviours are shared
    train2, test2 = small.split(0.25, seed=4)
    assert torch.equal(test.sample_user, test2.sample_user)
    assert torch.equal(train.sample_item, train2.sample_item)
    _, test3 = small.split(0.25, seed=5)
    assert not torch.equal(test.sample_user, test3.sample_user)
    tr, te = small.split(0.1, by="sample")
    assert len(te) == round(0.1 * len(small)) and len(tr) + len(te) == len(small)
    with pytest.raises(ValueError, match="test_frac"):
        small.split(1.0)
    with pytest.raises(ValueError, match="by"):
        small.split(0.2, by="time")


def test_subset_and_stats(small):
    mask = small.sample_label == 1
    pos = small.subset(mask)
    assert len(pos) == int(mask.sum()) and bool((pos.sample_label == 1).all())
    picked = small.subset(torch.tensor([3, 1]))
    assert picked.sample_item.tolist() == [int(small.sample_item[3]), int(small.sample_item[1])]
    st = small.stats()
    assert st["samples"] == len(small) and st["behaviours"] == small.n_behaviours
    assert st["hist_len_min"] <= st["hist_len_median"] <= st["hist_len_max"]
    assert st["positive_rate"] == pytest.approx(float(small.sample_label.mean()))


def test_dataset_validation(small):
    bad_ts = small.beh_ts.clone()
    bad_ts[[1, 2]] = bad_ts[[2, 1]]
    with pytest.raises(ValueError, match="non-decreasing within each user"):
        CTRDataset(**{**tensors(small), "beh_ts": bad_ts, "n_users": small.n_users,
                      "n_items": small.n_items, "n_cats": small.n_cats})
    with pytest.raises(ValueError, match="sample_hist_len"):
        CTRDataset(**{**tensors(small), "sample_hist_len": small.sample_hist_len + 1,
                      "n_users": small.n_users, "n_items": small.n_items,
                      "n_cats": small.n_cats})
    with pytest.raises(ValueError, match="item_cat of their items"):
        CTRDataset(**{**tensors(small), "beh_cats": small.beh_cats % small.n_cats + 1,
                      "n_users": small.n_users, "n_items": small.n_items,
                      "n_cats": small.n_cats})
    with pytest.raises(ValueError, match="beh_items"):
        CTRDataset(**{**tensors(small), "n_users": small.n_users, "n_items": 3,
                      "item_cat": small.item_cat[:4], "n_cats": small.n_cats})


# ---------------------------------------------------------------- metrics

def brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_ranks_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200,), generator=g).float()      # many ties
    labels = (torch.rand(200, generator=g) < 0.4).float()
    assert auc(scores, labels) == pytest.approx(brute_auc(scores.tolist(), labels.tolist()))
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.ones(4), torch.tensor([0.0, 1.0, 1.0, 0.0])) == 0.5
    groups = torch.randint(0, 7, (200,), generator=g)
    want, weight = 0.0, 0
    for k in range(7):
        m = groups == k
        if 0 < labels[m].sum() < m.sum():
            want += brute_auc(scores[m].tolist(), labels[m].tolist()) * int(m.sum())
            weight += int(m.sum())
    assert gauc(scores, labels, groups) == pytest.approx(want / weight)
    with pytest.raises(ValueError, match="both classes"):
        auc(torch.rand(3), torch.ones(3))
    with pytest.raises(ValueError, match="0 and 1"):
        auc(torch.rand(3), torch.tensor([0.0, 2.0, 1.0]))


def test_log_loss():
    p, y = torch.tensor([0.9, 0.2, 0.5]), torch.tensor([1.0, 0.0, 1.0])
    want = -(math.log(0.9) + math.log(0.8) + math.log(0.5)) / 3
    assert log_loss(p, y) == pytest.approx(want)
    assert log_loss(torch.logit(p), y, logits=True) == pytest.approx(want)
    assert math.isfinite(log_loss(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])))
    with pytest.raises(ValueError, match="logits=True"):
        log_loss(torch.tensor([2.0]), torch.tensor([1.0]))


# ---------------------------------------------------------------- CSV

def write(tmp_path, text, name="log.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_round_trip_synthetic(small, tmp_path):
    path = tmp_path / "syn.csv"
    save_csv(small, path)
    back = load_csv(path, negatives=3, seed=2)
    raw_items = torch.tensor([int(back.item_ids[i]) for i in back.beh_items.tolist()])
    raw_cats = torch.tensor([int(back.cat_ids[c]) for c in back.beh_cats.tolist()])
    assert torch.equal(raw_items, small.beh_items) and torch.equal(raw_cats, small.beh_cats)
    assert torch.equal(back.beh_ts, small.beh_ts)
    assert torch.equal(back.user_offsets, small.user_offsets)
    assert back.user_ids == [str(u) for u in range(small.n_users)]
    # click-log samples: per user the last behaviour (label 1) and 3 negatives
    assert len(back) == 4 * small.n_users and back.stats()["positive_rate"] == 0.25
    for ds in (small, back):   # behaviours that are not the positive samples: no label form
        with pytest.raises(ValueError, match="labels=False"):
            save_csv(ds, tmp_path / "x.csv", labels=True)


def test_csv_click_log_form(tmp_path):
    path = write(tmp_path, "item,user,timestamp,category,extra\n"
                 "i1,u1,10,c1,x\n i2 ,u1,5,c2,x\ni3,u2,7,c1,x\n\ni1,u1,10,c1,x\n"
                 "i4,u3,1,c3,x\ni5,u3,2,c3,x\n")
    ds = load_csv(path, negatives=2, seed=0)
    assert ds.n_behaviours == 6                            # every row, nothing dropped
    assert ds.user_ids == ["u1", "u2", "u3"] and ds.item_ids[1:] == ["i1", "i2", "i3", "i4", "i5"]
    assert ds.cat_ids[1:] == ["c1", "c2", "c3"]
    assert ds.user_lengths().tolist() == [3, 1, 2]
    assert [ds.item_ids[i] for i in ds.beh_items[:3].tolist()] == ["i2", "i1", "i1"]
    assert ds.beh_ts.tolist() == [5, 10, 10, 7, 1, 2]
    # users with >= 2 behaviours: u1 and u3, each positive + 2 negatives
    assert ds.sample_user.tolist() == [0, 0, 0, 2, 2, 2]
    assert ds.sample_hist_len.tolist() == [2, 2, 2, 1, 1, 1]
    assert ds.sample_label.tolist() == [1, 0, 0, 1, 0, 0]
    assert ds.sample_item[0] == ds.beh_items[2] and ds.sample_item[3] == ds.beh_items[5]
    assert bool((ds.sample_item[[1, 2]] != ds.sample_item[0]).all())
    assert bool((ds.sample_item[[4, 5]] != ds.sample_item[3]).all())
    assert torch.equal(ds.sample_cat, ds.item_cat[ds.sample_item])
    assert load_csv(path, negatives=0).sample_label.tolist() == [1, 1]


def test_csv_label_form_and_round_trip(tmp_path):
    path = write(tmp_path, "user,item,category,timestamp,label\n"
                 "a,x,c1,5,1\na,y,c2,3,0\na,z,c1,5,1\nb,x,c1,9,0\na,x,c1,7,1\na,y,c2,9,0\n")
    ds = load_csv(path)
    rows = 6
    assert len(ds) == rows                                 # every row is a sample
    assert ds.n_behaviours == int(ds.sample_label.sum()) == 3
    assert ds.sample_label.tolist() == [1, 0, 1, 0, 1, 0]
    # history = label-1 rows strictly before: ts 5 -> none, 3 -> none, 7 -> two at ts 5
    assert ds.sample_hist_len.tolist() == [0, 0, 0, 0, 2, 3]
    assert ds.user_lengths().tolist() == [3, 0]
    b = ds.batch(torch.tensor([4]))
    assert [ds.item_ids[i] for i in b.hist_items[0].tolist()] == ["x", "z"]
    save_csv(ds, tmp_path / "again.csv", labels=True)
    back = load_csv(tmp_path / "again.csv")
    for name, t in tensors(ds).items():
        assert torch.equal(t, getattr(back, name)), name
    assert (back.user_ids, back.item_ids, back.cat_ids) == (ds.user_ids, ds.item_ids, ds.cat_ids)


HEADER = "user,item,category,timestamp,label\n"


@pytest.mark.parametrize("body, line, what", [
    ("a,x,c,1,1\nb,y,c,2\n", 3, "missing field"),
    ("a,x,c,1,1\nb,y,c,2,1,9\n", 3, "too many fields"),
    ("a,x,c,1,1\n ,y,c,2,1\n", 3, "empty user id"),
    ("a,,c,1,1\n", 2, "empty item id"),
    ("a,x,c,1,1\n\na,x,c,1.5,1\n", 4, "timestamp '1.5' is not an integer"),
    ("a,x,c,1,1\nb,y,c,2,yes\n", 3, "label 'yes' is not 0 or 1"),
    ("a,x,c,1,1\nb,x,d,2,1\n", 3, "item 'x' has category 'd' here but 'c' on line 2"),
])
def test_csv_bad_rows_name_file_and_line(tmp_path, body, line, what):
    path = write(tmp_path, HEADER + body)
    with pytest.raises(ValueError) as err:
        load_csv(path)
    msg = str(err.value)
    assert str(path) in msg and f"line {line}:" in msg and what in msg, msg


def test_csv_bad_header(tmp_path):
    with pytest.raises(ValueError, match=r"line 1: header misses column\(s\) category, timestamp"):
        load_csv(write(tmp_path, "user,item,time\na,b,1\n"))
    with pytest.raises(ValueError, match="empty file"):
        load_csv(write(tmp_path, ""))
    with pytest.raises(ValueError, match="twice"):
        load_csv(write(tmp_path, "user,item,category,timestamp,User\na,b,c,1,a\n"))
    with pytest.raises(ValueError, match="negatives"):
        load_csv(write(tmp_path, HEADER), negatives=-1)


def test_synthetic_variants():
    """The 'long' variant moves the clicks' signal to the long-term interests, 'recent' to
    the current interest; an unknown variant is refused; overrides still apply."""
    from fastattn.data import VARIANTS
    kw = dict(n_users=300, n_items=2000, n_cats=100, min_len=200, max_len=2000)
    gain = {}
    for v in ("long", "recent"):
        ds, truth = make_synthetic(variant=v, return_truth=True, **kw)
        assert truth["config"]["w_long"] == VARIANTS[v]["w_long"]
        full = ds.category_counts() / ds.history_lengths()
        last50 = ds.category_counts(max_len=50) / ds.history_lengths().clamp(max=50)
        gain[v] = auc(full, ds.sample_label) - auc(last50, ds.sample_label)
    assert gain["long"] > 0.1 and gain["recent"] < 0.0, gain
    with pytest.raises(ValueError, match="variant"):
        make_synthetic(variant="nope", **kw)
    _, truth = make_synthetic(variant="long", w_long=2.0, return_truth=True, **SMALL)
    assert truth["config"]["w_long"] == 2.0


def test_auc_bootstrap():
    """Per-row AUCs of resamples (whole groups with groups), the same resamples for every
    row: a row equal to another has a zero-spread difference; deterministic in seed; the
    spread shrinks with the sample count; split_mask is split's test side."""
    from fastattn.data.metrics import auc_bootstrap
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(4000, generator=g) < 0.4).float()
    s = y + torch.randn(4000, generator=g)
    noisy = s + 0.5 * torch.randn(4000, generator=g)
    users = torch.arange(4000) // 8
    boot = auc_bootstrap(torch.stack([s, s.clone(), noisy]), y, users, rounds=200, seed=1)
    assert boot.shape == (200, 3) and not torch.isnan(boot).any()
    assert torch.equal(boot[:, 0], boot[:, 1])
    assert torch.equal(boot, auc_bootstrap(torch.stack([s, s, noisy]), y, users, rounds=200,
                                           seed=1))
    assert abs(float(boot[:, 0].mean()) - auc(s, y)) < 0.005
    small = auc_bootstrap(s[:400], y[:400], rounds=200)
    assert small.shape == (200, 1) and small.std() > 2 * boot[:, 0].std()
    assert (boot[:, 0] - boot[:, 2]).std() < boot[:, 0].std()      # paired: tighter
    with pytest.raises(ValueError, match="rounds"):
        auc_bootstrap(s, y, rounds=0)
    ds = make_synthetic(**SMALL)
    mask = ds.split_mask(0.3, seed=5)
    _, test = ds.split(0.3, seed=5)
    assert torch.equal(ds.sample_item[mask], test.sample_item)


def test_shuffled_shared_batches_hold_whole_users():
    ds = make_synthetic(**SMALL)
    seen = []
    for b in ds.batches(3 * 4, shuffle=True, seed=2, share_histories=True):
        assert b.hist_items.shape[0] == 3            # 4 candidates per user: 3 users
        seen.append(b.target_item)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.sort(ds.sample_item).values)
