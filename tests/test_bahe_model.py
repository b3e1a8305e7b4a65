"""The bahe model (fp / abe / ba switches) and the llm_ctr baseline."""
import pytest
import torch

from fastattn.data import make_synthetic
from fastattn.models import BAHE, LLMCTR, TEXT_MODELS, build
from fastattn.models.bahe import split_by_type

VARIANTS = {"llm_ctr": dict(name="llm_ctr"),
            "fp": dict(name="bahe", fp=True, abe=False, ba=False),
            "fp_abe": dict(name="bahe", fp=True, abe=True, ba=False),
            "bahe": dict(name="bahe"),
            "abe_ba_no_fp": dict(name="bahe", fp=False)}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_users=24, n_items=60, n_cats=5, min_len=3, max_len=20, seed=3,
                          n_behaviour_types=3, token_len_min=3, token_len_max=6)


def _model(data, dtype=torch.float32, backend=None, **kw):
    torch.manual_seed(0)
    kw = dict(kw)
    m = build(kw.pop("name"), data.n_items, data.n_cats, item_tokens=data.item_tokens,
              n_types=3, embed_dim=8, heads=2, mlp=(8,), max_behaviours=20, backend=backend,
              **kw)
    return m.to(dtype)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_train_and_rebuild(data, variant):
    m = _model(data, **VARIANTS[variant])
    batch = data.batch(torch.arange(12))
    loss = m.loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.low.embed.weight.grad is not None and m.f_d.weight.grad is not None
    again = build(**m.config())
    again.load_state_dict(m.state_dict())
    torch.testing.assert_close(again(batch), m(batch))


@pytest.mark.parametrize("variant", ["llm_ctr", "fp_abe", "bahe"])
def test_serving_layout_matches(data, variant):
    """Candidates sharing a history (hist_index) score as with one copy each."""
    m = _model(data, torch.float64, **VARIANTS[variant]).eval()
    idx = torch.arange(16)
    dense = m(data.batch(idx))
    shared = m(data.batch(idx, share_histories=True))
    torch.testing.assert_close(shared, dense, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", ["fp_abe", "bahe"])
def test_backends_agree(data, variant, backend):
    batch = data.batch(torch.arange(10))
    want = _model(data, torch.float64, backend="torch", **VARIANTS[variant])
    got = _model(data, torch.float64, backend=backend, **VARIANTS[variant])
    lw, lg = want.loss(batch), got.loss(batch)
    torch.testing.assert_close(lg, lw, rtol=1e-9, atol=1e-10)
    gw = torch.autograd.grad(lw, list(want.parameters()), allow_unused=True)
    gg = torch.autograd.grad(lg, list(got.parameters()), allow_unused=True)
    for a, b in zip(gg, gw):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_abe_dedups_histories_and_targets(data):
    m = _model(data, **VARIANTS["bahe"])
    batch = data.batch(torch.arange(12))
    m(batch)
    n_beh = int(batch.lengths.sum()) + 12
    assert m.last_stats["behaviours"] == n_beh
    assert m.last_stats["distinct"] < n_beh


@pytest.mark.parametrize("variant", ["fp_abe", "bahe"])
def test_repeated_candidates_score_as_alone(data, variant):
    """With ABE the item tower runs once per distinct candidate of the batch: a batch
    whose candidates repeat scores (and differentiates) each sample as on its own."""
    m = _model(data, torch.float64, **VARIANTS[variant])
    idx = torch.tensor([0, 1, 0, 2, 1, 0])                    # repeated samples: targets too
    batch = data.batch(idx)
    assert batch.target_item.unique().numel() < len(idx)
    got = m(batch)
    m(batch)
    assert m.last_stats["behaviours"] == int(batch.lengths.sum()) + len(idx)
    alone = torch.cat([m(data.batch(idx[i:i + 1])) for i in range(len(idx))])
    torch.testing.assert_close(got, alone, rtol=1e-9, atol=1e-10)
    g = torch.autograd.grad(got.sum(), list(m.parameters()), allow_unused=True)
    ga = torch.autograd.grad(sum(m(data.batch(idx[i:i + 1])).sum() for i in range(len(idx))),
                             list(m.parameters()), allow_unused=True)
    for a, b in zip(g, ga):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_split_by_type():
    items = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    types = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0]])
    ids, lens = split_by_type(items, types, torch.tensor([4, 2]), 2)
    assert ids.tolist() == [[6, 0, 0], [9, 10, 0], [5, 7, 8], [0, 0, 0]]
    assert lens.tolist() == [1, 2, 3, 0]


def test_checks(data):
    with pytest.raises(ValueError, match="ba=True .* needs abe=True"):
        _model(data, name="bahe", abe=False)
    with pytest.raises(ValueError, match="llm_ctr is the baseline: fp"):
        _model(data, name="llm_ctr", fp=True)
    with pytest.raises(ValueError, match="item_tokens must be an int64 tensor"):
        BAHE(data.n_items, data.n_cats, data.item_tokens[:-1])
    with pytest.raises(ValueError, match="pass item_tokens"):
        BAHE(data.n_items, data.n_cats)
    m = _model(data, **VARIANTS["bahe"])
    batch = data.batch(torch.arange(4))
    batch.hist_types = batch.hist_types + 3
    with pytest.raises(ValueError, match="hist_types must hold types in"):
        m(batch)
    assert set(TEXT_MODELS) == {"bahe", "llm_ctr"} and issubclass(LLMCTR, BAHE)


@pytest.mark.parametrize("variant", ["fp", "fp_abe", "bahe"])
def test_length_buckets_do_not_change_results(data, variant):
    batch = data.batch(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:12])
    one = _model(data, torch.float64, buckets=1, **VARIANTS[variant])
    many = _model(data, torch.float64, buckets=5, **VARIANTS[variant])
    torch.testing.assert_close(many(batch), one(batch), rtol=1e-9, atol=1e-10)


def test_frozen_lower_layers_train_on_the_cached_table(data, tmp_path):
    """freeze_lower: the forward and the upper layers' gradients read the cached table and
    equal recomputation; the table is reused across steps while the lower layers are
    frozen, rebuilt (or refused) when their weights change, and a saved table loads."""
    from fastattn.nn import BehaviourTable
    from fastattn.nn.bahe import StaleBehaviourTableError
    batch = data.batch(torch.arange(12))
    cached = _model(data, torch.float64, **VARIANTS["bahe"])
    fresh = _model(data, torch.float64, **VARIANTS["bahe"])
    table = cached.freeze_lower()
    assert table.builds == 1 and not any(p.requires_grad for p in cached.low.parameters())
    lc, lf = cached.loss(batch), fresh.loss(batch)
    torch.testing.assert_close(lc, lf, rtol=1e-9, atol=1e-10)
    lc.backward()
    lf.backward()
    for (name, pc), pf in zip(cached.named_parameters(), fresh.parameters()):
        if name.startswith("low."):
            assert pc.grad is None
        else:
            torch.testing.assert_close(pc.grad, pf.grad, rtol=1e-8, atol=1e-10)
    # upper layers train on the table, which is reused: no rebuild after optimizer steps
    opt = torch.optim.Adam([p for p in cached.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.step()
        opt.zero_grad()
        cached.loss(batch).backward()
    assert table.builds == 1
    fresh.load_state_dict(cached.state_dict())
    torch.testing.assert_close(cached(batch), fresh(batch), rtol=1e-9, atol=1e-10)
    # a weight change of the lower layers invalidates it: rebuilt, equal to recomputation
    with torch.no_grad():
        cached.low.embed.weight.mul_(1.5)
        fresh.low.embed.weight.mul_(1.5)
    torch.testing.assert_close(cached(batch), fresh(batch), rtol=1e-9, atol=1e-10)
    assert table.builds == 2
    path = tmp_path / "behaviours.pt"
    table.save(path)
    strict = cached.freeze_lower(BehaviourTable.load(path, cached.abe, cached.item_tokens,
                                                     on_change="raise"))
    assert strict.builds == 0                                   # loaded, not recomputed
    torch.testing.assert_close(cached(batch), fresh(batch), rtol=1e-9, atol=1e-10)
    cached.load_state_dict(_model(data, torch.float64, **VARIANTS["bahe"]).state_dict())
    with pytest.raises(StaleBehaviourTableError):
        cached(batch)
    cached.unfreeze_lower()
    assert cached.behaviour_table is None and all(p.requires_grad for p in cached.parameters())
    with pytest.raises(ValueError, match="abe=True and ba=True"):
        _model(data, **VARIANTS["fp_abe"]).freeze_lower()
    with pytest.raises(ValueError, match="built for this model"):
        fresh.freeze_lower(table)
    with pytest.raises(TypeError, match="BehaviourTable"):
        fresh.freeze_lower(object())
