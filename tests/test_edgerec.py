"""EdgeRec (issue 17): the synthetic click/exposure data, NDCG, the edgerec model, its
torch.export re-ranker and the ablation helpers. Small shapes, a few steps each."""
import pytest
import torch

from fastattn.data import EdgeRecBatch, EdgeRecConfig, make_edgerec, ndcg
from fastattn.models import SEQUENCE_MODELS, EdgeRec, build
from fastattn.models.edgerec import (ABLATIONS, EdgeRecReranker, export_reranker,
                                     reranker_inputs)

SMALL = dict(n_users=40, n_items=80, n_cats=12, min_clicks=3, max_clicks=8,
             min_exposures=4, max_exposures=10, pages_per_user=2, page_size=5)


@pytest.fixture(scope="module")
def data():
    return make_edgerec(**SMALL)


def small_model(seed=0, backend=None, **kw):
    torch.manual_seed(seed)
    return build("edgerec", SMALL["n_items"], SMALL["n_cats"], embed_dim=4, mlp=(8,),
                 backend=backend, **kw)


def serving_batch(data, B=7, user=0, full_width=False):
    """One user's sequences (U == 1) and B candidates from the pages' pool."""
    one = data.batch(torch.tensor([2 * user]), full_width=full_width)
    return EdgeRecBatch(one.hist_items, one.hist_cats, one.lengths,
                        data.cand_items.reshape(-1)[:B], data.cand_cats.reshape(-1)[:B],
                        hist_details=one.hist_details, exp_items=one.exp_items,
                        exp_cats=one.exp_cats, exp_lengths=one.exp_lengths,
                        exp_details=one.exp_details)


# ---------------------------------------------------------------------- data

def test_data_shapes_and_determinism(data):
    again = make_edgerec(**SMALL)
    for name in ("click_items", "click_details", "exp_items", "exp_details", "cand_items",
                 "labels"):
        assert torch.equal(getattr(data, name), getattr(again, name)), name
    U = SMALL["n_users"]
    assert data.click_items.shape == (U, SMALL["max_clicks"])
    assert data.click_details.shape == (U, SMALL["max_clicks"], 3)
    assert data.exp_details.shape == (U, SMALL["max_exposures"], 2)
    assert data.cand_items.shape == (U * 2, 5) and len(data) == U * 10
    pos = torch.arange(SMALL["max_clicks"])
    pad = pos >= data.click_len[:, None]
    assert bool((data.click_items[pad] == 0).all()) and bool((data.click_items[~pad] > 0).all())
    assert bool((data.click_details[pad] == 0).all())
    assert int(data.click_len.min()) >= 3 and int(data.click_len.max()) <= 8
    # categories agree with the items'
    item_cat = torch.zeros(SMALL["n_items"] + 1, dtype=torch.int64)
    item_cat[data.cand_items.reshape(-1)] = data.cand_cats.reshape(-1)
    assert torch.equal(item_cat[data.cand_items], data.cand_cats)
    assert not torch.equal(make_edgerec(**{**SMALL, "seed": 1}).labels, data.labels)


def test_detail_features_carry_signal():
    """Clicks on a user's interests dwell longer than clicks on their decoys, and the item
    counts alone do not separate the two (both are clicked about as often)."""
    d, truth = make_edgerec(n_users=300, return_truth=True)
    valid = torch.arange(d.click_items.shape[1]) < d.click_len[:, None]
    on_interest = (d.click_cats[..., None] == truth["interests"][:, None, :]).any(-1) & valid
    on_decoy = (d.click_cats[..., None] == truth["decoys"][:, None, :]).any(-1) & valid
    dwell = d.click_details[..., 0]
    assert float(dwell[on_interest].mean()) - float(dwell[on_decoy].mean()) > 1.0
    ratio = on_decoy.sum() / on_interest.sum()
    assert 0.6 < float(ratio) < 1.2
    # decoy candidates are clicked less than interest candidates
    cand_interest = (d.cand_cats[..., None] == truth["interests"][d.page_user][:, None, :]).any(-1)
    cand_decoy = (d.cand_cats[..., None] == truth["decoys"][d.page_user][:, None, :]).any(-1)
    assert float(d.labels[cand_interest].mean()) > float(d.labels[cand_decoy].mean()) + 0.3


def test_split_and_batches(data):
    train, test = data.split(0.25, seed=0)
    assert train.n_users + test.n_users == data.n_users
    assert train.n_pages + test.n_pages == data.n_pages
    assert int(test.page_user.max()) < test.n_users
    pages = list(train.batches(7, shuffle=True, seed=1))
    assert sum(len(b) for b in pages) == len(train)
    b = pages[0]
    assert torch.equal(b.hist_index.unique(), torch.arange(b.hist_items.shape[0]))
    assert b.page.shape == b.target_item.shape
    short = b.truncate(2)
    assert short.hist_details.shape[:2] == short.hist_items.shape == (b.hist_items.shape[0], 2)
    last = (b.lengths - 1).clamp(min=0)
    rows = torch.arange(b.hist_items.shape[0])
    torch.testing.assert_close(short.hist_details[rows, (short.lengths - 1).clamp(min=0)],
                               b.hist_details[rows, last])


def test_config_validation():
    with pytest.raises(ValueError, match="n_users"):
        EdgeRecConfig(n_users=0)
    with pytest.raises(ValueError, match="n_cats"):
        EdgeRecConfig(n_cats=4)
    with pytest.raises(ValueError, match="sum"):
        EdgeRecConfig(p_click_interest=0.7, p_click_decoy=0.5)
    with pytest.raises(ValueError, match="min_clicks"):
        EdgeRecConfig(min_clicks=9, max_clicks=8)
    with pytest.raises(TypeError, match="unknown"):
        make_edgerec(n_user=3)
    with pytest.raises(ValueError, match="pages_per_batch"):
        next(make_edgerec(**SMALL).batches(0))


# ---------------------------------------------------------------------- NDCG

def test_ndcg():
    labels = torch.tensor([1.0, 0, 0, 1, 0, 0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    perfect = torch.tensor([3.0, 2, 1, 3, 2, 1])
    assert ndcg(perfect, labels, groups, k=2) == pytest.approx(1.0)
    # group 1's positive at rank 2: 1/log2(3); group 0's at rank 1
    worse = torch.tensor([3.0, 2, 1, 2, 3, 1])
    assert ndcg(worse, labels, groups, k=3) == pytest.approx((1 + 1 / torch.log2(
        torch.tensor(3.0)).item()) / 2)
    # outside the top k: 0 for that group
    assert ndcg(worse, labels, groups, k=1) == pytest.approx(0.5)
    # a group without positives is left out
    assert ndcg(perfect, torch.tensor([1.0, 0, 0, 0, 0, 0]), groups, k=2) == 1.0
    with pytest.raises(ValueError, match="k must"):
        ndcg(perfect, labels, groups, k=0)
    with pytest.raises(ValueError, match="positive"):
        ndcg(perfect, torch.zeros(6), groups)


# ---------------------------------------------------------------------- model

@pytest.mark.parametrize("row", list(ABLATIONS))
def test_model_rows_train(data, row):
    model = small_model(**ABLATIONS[row])
    batch = data.batch(torch.arange(6))
    logits = model(batch)
    assert logits.shape == (30,) and torch.isfinite(logits).all()
    loss = model.loss(batch)
    loss.backward()
    assert model.item_emb.weight.grad is not None
    if model.click_gru is not None:
        assert model.click_gru.weight_hh_l0.grad.abs().sum() > 0
    _, reg = model(batch, return_reg=True)
    assert (float(reg.detach()) > 0) == (row == "reliable_adv")
    rebuilt = build(**model.config())
    rebuilt.load_state_dict(model.state_dict())
    assert torch.allclose(rebuilt(batch), logits)


def test_serving_layout_matches_training_layout(data):
    """One shared history (U == 1) scores like that history copied per candidate."""
    model = small_model(attention="reliable", adversarial=True).double()
    one = serving_batch(data, B=6)
    B = len(one)
    rep = lambda t: t.expand(B, *t.shape[1:]).contiguous()  # noqa: E731
    copied = EdgeRecBatch(rep(one.hist_items), rep(one.hist_cats), rep(one.lengths),
                          one.target_item, one.target_cat, hist_details=rep(one.hist_details),
                          exp_items=rep(one.exp_items), exp_cats=rep(one.exp_cats),
                          exp_lengths=rep(one.exp_lengths), exp_details=rep(one.exp_details))
    torch.testing.assert_close(model(one), model(copied), rtol=0, atol=1e-10)


def test_padding_is_ignored(data):
    model = small_model().double()
    batch = data.batch(torch.arange(4))
    noisy = EdgeRecBatch(**{**vars(batch)})
    pad = torch.arange(batch.hist_items.shape[1]) >= batch.lengths[:, None]
    noisy.hist_details = batch.hist_details.masked_fill(pad[..., None], 7.0)
    epad = torch.arange(batch.exp_items.shape[1]) >= batch.exp_lengths[:, None]
    noisy.exp_items = batch.exp_items.masked_fill(epad, 3)
    noisy.exp_cats = batch.exp_cats.masked_fill(epad, 2)
    torch.testing.assert_close(model(batch), model(noisy), rtol=0, atol=1e-10)


def test_backends_agree(data):
    batch = data.batch(torch.arange(5))
    ref = small_model(backend="torch", adversarial=True).double()
    fused = small_model(backend=None, adversarial=True).double()
    fused.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fused(batch), ref(batch), rtol=0, atol=1e-9)


def test_model_validation(data):
    assert SEQUENCE_MODELS["edgerec"] is EdgeRec
    with pytest.raises(ValueError, match="attention"):
        small_model(attention="dense")
    with pytest.raises(ValueError, match="adversarial"):
        small_model(attention="plain", adversarial=True)
    with pytest.raises(ValueError, match="adv_weight"):
        small_model(adv_weight=-1.0)
    model = small_model()
    batch = data.batch(torch.arange(3))
    plain = batch.__class__.__mro__[1](batch.hist_items, batch.hist_cats, batch.lengths,
                                       batch.target_item, batch.target_cat)
    with pytest.raises(TypeError, match="EdgeRecBatch"):
        model(plain)
    bad = EdgeRecBatch(**{**vars(batch), "hist_details": batch.hist_details[..., :2]})
    with pytest.raises(ValueError, match="hist_details"):
        model(bad)
    bad = EdgeRecBatch(**{**vars(batch), "exp_lengths": batch.exp_lengths + 100})
    with pytest.raises(ValueError, match="exp_lengths"):
        model(bad)
    bad = EdgeRecBatch(**{**vars(batch), "exp_details": None})
    with pytest.raises(TypeError, match="exp_details"):
        model(bad)
    with pytest.raises(TypeError, match="EdgeRec"):
        EdgeRecReranker(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------- export

def test_exported_reranker_matches_eager(data):
    model = small_model(attention="reliable", adversarial=True)
    batch = serving_batch(data, B=7, full_width=True)
    program = export_reranker(model, batch)
    exported = program.module()
    torch.testing.assert_close(exported(*reranker_inputs(batch)),
                               torch.sigmoid(model(batch)), rtol=1e-5, atol=1e-6)
    # the same shapes, another user (other valid lengths, padded to the widths)
    other = serving_batch(data, B=7, user=3, full_width=True)
    assert not torch.equal(other.lengths, batch.lengths)
    torch.testing.assert_close(exported(*reranker_inputs(other)),
                               torch.sigmoid(model(other)), rtol=1e-5, atol=1e-6)
    # the fused ops are nodes of the program
    assert any("fastattn" in str(n.target) for n in program.graph.nodes)
    with pytest.raises(ValueError, match="one user"):
        reranker_inputs(data.batch(torch.arange(4)))


def test_ablation_helpers(data):
    from fastattn.bench.edgerec_sweeps import (evaluate_pages, export_latency, markdown,
                                               train_edgerec)
    train, test = data.split(0.25)
    model, row = train_edgerec("reliable_adv", train, test, epochs=1, pages_per_batch=16,
                               embed_dim=4)
    for k in ("auc", "gauc", "ndcg@5", "logloss", "train_s"):
        assert k in row
    assert evaluate_pages(model, test)["auc"] == pytest.approx(row["auc"])
    lat = export_latency(model, test, candidates=6, repeats=2)
    assert lat["max_abs_diff"] < 1e-5 and lat["candidates"] == 6
    assert set(lat["exported"]) == {"p50_ms", "p90_ms", "cpu_p50_ms"}
    assert "| exported |" in markdown([], lat)
    with pytest.raises(ValueError, match="ablation row"):
        train_edgerec("nope", train, test)
    summary = [{"row": "plain_ta", "seeds": 1, **{m: 0.5 for m in
                ("auc", "gauc", "ndcg@5", "logloss")},
                **{m + s: 0.0 for m in ("auc", "gauc", "ndcg@5", "logloss")
                   for s in ("_std", "_margin", "_wins")}}]
    assert "| plain_ta |" in markdown(summary)
