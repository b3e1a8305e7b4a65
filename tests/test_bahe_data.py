"""Token strings and behaviour types in the synthetic data and the CSV loader (BAHE)."""
import pytest
import torch

from fastattn.data import load_csv, make_synthetic, save_csv

SMALL = dict(n_users=30, n_items=80, n_cats=6, min_len=5, max_len=60)


def test_synthetic_tokens_and_types():
    ds = make_synthetic(**SMALL, seed=1, n_behaviour_types=3)
    again = make_synthetic(**SMALL, seed=1, n_behaviour_types=3)
    assert torch.equal(ds.item_tokens, again.item_tokens)            # deterministic
    assert torch.equal(ds.beh_type, again.beh_type)
    tok = ds.item_tokens
    assert tok.shape == (81, 16) and (tok[0] == 0).all()
    n = (tok[1:] != 0).sum(1)
    assert int(n.min()) >= 5 and int(n.max()) <= 16
    # the category's 3 tokens first, shared by all items of the category
    cats = ds.item_cat[1:]
    want = 1 + (cats[:, None] - 1) * 3 + torch.arange(3)
    assert torch.equal(tok[1:, :3], want)
    assert ds.n_types == 3 and set(ds.beh_type.tolist()) == {0, 1, 2}
    b = ds.batch(torch.arange(7))
    valid = torch.arange(b.hist_items.shape[1]) < b.lengths[:, None]
    assert b.hist_types.shape == b.hist_items.shape and (b.hist_types[~valid] == 0).all()
    assert b.truncate(3).hist_types.shape == (7, 3)


def test_text_leaves_the_other_draws_unchanged():
    plain = make_synthetic(**SMALL, seed=4)
    typed = make_synthetic(**SMALL, seed=4, n_behaviour_types=2, token_len_max=9)
    assert plain.beh_type is None and plain.batch(torch.arange(3)).hist_types is None
    for name in ("beh_items", "beh_ts", "sample_item", "sample_label", "item_cat"):
        assert torch.equal(getattr(plain, name), getattr(typed, name)), name
    with pytest.raises(ValueError, match="cat_tokens <= token_len_min"):
        make_synthetic(**SMALL, cat_tokens=6)


def test_csv_tokens_and_types(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,category,timestamp,tokens,behaviour_type\n"
                    "a,x,c1,1,red shoe,click\n"
                    "a,y,c2,2,blue hat big,buy\n"
                    "a,x,c1,3,red shoe,buy\n"
                    "b,z,c1,1,,click\n"
                    "b,y,c2,5,blue hat big,click\n")
    ds = load_csv(path, negatives=0)
    assert ds.token_names == [None, "red", "shoe", "blue", "hat", "big"]
    assert ds.item_tokens.tolist() == [[0, 0, 0], [1, 2, 0], [3, 4, 5], [0, 0, 0]]
    assert ds.type_names == ["click", "buy"]
    assert ds.beh_type.tolist() == [0, 1, 1, 0, 0]
    save_csv(ds, tmp_path / "again.csv")
    back = load_csv(tmp_path / "again.csv", negatives=0)
    assert torch.equal(back.item_tokens, ds.item_tokens) and torch.equal(back.beh_type, ds.beh_type)
    assert back.token_names == ds.token_names and back.type_names == ds.type_names
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,category,timestamp,tokens\na,x,c,1,red\na,x,c,2,blue\n")
    with pytest.raises(ValueError, match=r"line 3: item 'x' has tokens 'blue'"):
        load_csv(bad)
    plain = tmp_path / "plain.csv"
    plain.write_text("user,item,category,timestamp\na,x,c,1\na,y,c,2\n")
    ds = load_csv(plain)
    assert ds.item_tokens is None and ds.beh_type is None and ds.token_names is None


def test_synthetic_csv_round_trip_keeps_text(tmp_path):
    ds = make_synthetic(**SMALL, seed=2, n_behaviour_types=2)
    save_csv(ds, tmp_path / "s.csv")
    back = load_csv(tmp_path / "s.csv")
    # type names are the synthetic ids as strings, renumbered in first-seen order
    raw_types = torch.tensor([int(back.type_names[t]) for t in back.beh_type.tolist()])
    assert torch.equal(raw_types, ds.beh_type)
    # token ids are renumbered in first-seen order: compare the strings' structure
    n = lambda t: (t != 0).sum(1)  # noqa: E731
    raw = torch.tensor([int(back.item_ids[i]) for i in back.beh_items.tolist()])
    assert torch.equal(n(back.item_tokens)[back.beh_items], n(ds.item_tokens)[raw])


def test_text_variant_clicks_follow_the_visible_category_share():
    """variant="text": the click probability is sigmoid(bias + w_share · the candidate
    category's share of the label_window most recent behaviours), nothing hidden; the
    behaviours and candidates are the planted draws."""
    kw = dict(SMALL, n_behaviour_types=3, seed=2, label_window=20)
    ds, truth = make_synthetic(variant="text", return_truth=True, **kw)
    cfg = truth["config"]
    assert cfg["click_model"] == "overlap" and cfg["label_noise"] == 0.0
    share = ds.category_counts(max_len=20) / ds.history_lengths().clamp(max=20)
    want = torch.sigmoid(cfg["label_bias"] + cfg["w_share"] * share.double())
    torch.testing.assert_close(truth["click_prob"].double(), want, rtol=1e-6, atol=1e-7)
    base = make_synthetic(**kw, recent_len=cfg["recent_len"])
    for name in ("beh_items", "beh_type", "sample_item", "item_tokens"):
        assert torch.equal(getattr(ds, name), getattr(base, name)), name
    with pytest.raises(ValueError, match="click_model"):
        make_synthetic(**SMALL, click_model="hidden")
