"""fastattn.models: layouts, padding, gradients, backend equivalence, each model's own parts."""
import copy
import json

import pytest
import torch

from fastattn.data.batch import Batch
from fastattn.models import DIN, MIMN, MODELS, SDIM, CTRModel, ETANet, SIMHard, build
from fastattn.models.sdim import bucket_interest, hash_codes
from fastattn.models.sim import category_search, interval_buckets
from fastattn.nn import ETAAttention

N_ITEMS, N_CATS = 50, 5
# Tiny configurations that still exercise every branch: ETA retrieves (L > topk), SIM's
# GSU truncates (many matches > sim_len), SDIM's 2-bit codes collide often.
SMALL = {
    "din": dict(short_len=5),
    "eta": dict(short_len=5, topk=4, hash_bits=64, heads=2),
    "mimn": dict(mem_dim=4, slots=3, ctrl_dim=5, miu_dim=4, miu_k=1),
    "sim": dict(short_len=5, sim_len=4),
    "sdim": dict(short_len=5, n_hashes=4, hash_width=2),
}
NAMES = sorted(MODELS)
FP64 = dict(rtol=0, atol=1e-9)


def make_model(name, backend=None, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**SMALL[name], **overrides}
    return build(name, N_ITEMS, N_CATS, embed_dim=4, mlp=(8, 4), backend=backend,
                 **kwargs).double()


def make_batch(lengths, L, B=None, seed=1, label=True, garbage=False):
    """Training layout (U == B == len(lengths)) unless B is given with one history (U == 1).

    Padding holds id 0, or random ids with ``garbage`` (models must mask by lengths)."""
    g = torch.Generator().manual_seed(seed)
    U = len(lengths)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    items = torch.randint(1, N_ITEMS + 1, (U, L), generator=g)
    cats = torch.randint(1, N_CATS + 1, (U, L), generator=g)
    if not garbage:
        pad = torch.arange(L) >= lengths[:, None]
        items, cats = items.masked_fill(pad, 0), cats.masked_fill(pad, 0)
    B = U if B is None else B
    return Batch(items, cats, lengths, torch.randint(1, N_ITEMS + 1, (B,), generator=g),
                 torch.randint(1, N_CATS + 1, (B,), generator=g),
                 torch.randint(0, 2, (B,), generator=g).double() if label else None)


def repeated(batch):
    """The serving batch (U == 1) in the training layout: its history copied per candidate."""
    B = len(batch)
    return Batch(batch.hist_items.expand(B, -1).contiguous(),
                 batch.hist_cats.expand(B, -1).contiguous(), batch.lengths.expand(B).contiguous(),
                 batch.target_item, batch.target_cat, batch.label)


def grads(model, batch, **kwargs):
    model.zero_grad()
    loss = model.loss(batch, **kwargs)
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------- every model

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("L", [0, 1, 7, 37])
def test_layouts_agree(name, L):
    model = make_model(name)
    serving = make_batch([max(L - 2, min(L, 1))], L, B=5, label=False)
    out = model(serving)
    assert out.shape == (5,) and out.dtype == torch.float64 and torch.isfinite(out).all()
    torch.testing.assert_close(out, model(repeated(serving)), **FP64)
    # Any candidates -> histories map: two histories, the candidates spread over them.
    two = make_batch([L, max(L - 3, 0)], L, seed=4)
    hist_index = torch.tensor([1, 0, 0, 1, 1])
    mapped = Batch(two.hist_items, two.hist_cats, two.lengths, serving.target_item,
                   serving.target_cat, hist_index=hist_index)
    want = model(Batch(two.hist_items[hist_index], two.hist_cats[hist_index],
                       two.lengths[hist_index], serving.target_item, serving.target_cat))
    torch.testing.assert_close(model(mapped), want, **FP64)


@pytest.mark.parametrize("name", NAMES)
def test_padding_invariance(name):
    """Whatever the padding holds and however wide it is, only lengths[u] steps count."""
    model = make_model(name)
    lengths = [30, 12, 0, 1, 30, 29, 3]
    batch = make_batch(lengths, 37)
    out = model(batch)
    garbage = make_batch(lengths, 37, garbage=True)          # same valid ids, random padding
    assert not torch.equal(garbage.hist_items, batch.hist_items)
    torch.testing.assert_close(model(garbage), out, **FP64)
    z = torch.zeros(7, 9, dtype=torch.int64)
    wider = Batch(torch.cat([batch.hist_items, z], 1), torch.cat([batch.hist_cats, z], 1),
                  batch.lengths, batch.target_item, batch.target_cat)
    torch.testing.assert_close(model(wider), out, **FP64)
    cut = Batch(batch.hist_items[:, :30], batch.hist_cats[:, :30], batch.lengths,
                batch.target_item, batch.target_cat)
    torch.testing.assert_close(model(cut), out, **FP64)


@pytest.mark.parametrize("name", NAMES)
def test_loss_reaches_every_parameter(name):
    model = make_model(name)
    loss, g = grads(model, make_batch([37, 12, 0, 1, 30, 37, 3], 37))
    assert loss.ndim == 0 and torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert n in g, f"{name}: no gradient reaches {n}"
        # A key bias adds the same score to every position of a query: softmax is
        # shift-invariant, so its gradient is 0 (exactly, where attention runs unprojected).
        assert torch.isfinite(g[n]).all() and (n.endswith("k_proj.bias") or
                                               g[n].abs().sum() > 0), f"{name}: {n} gets zeros"
    # Empty histories only: finite logits, loss and gradients.
    loss, g = grads(model, make_batch([0, 0, 0], 4))
    assert torch.isfinite(loss) and all(torch.isfinite(t).all() for t in g.values())


@pytest.mark.parametrize("name", NAMES)
def test_kernel_backends_match_reference(name, kernel_backend):
    ref_model = make_model(name, backend="torch")
    model = copy.deepcopy(ref_model)
    model.backend = kernel_backend
    # The interpreted Triton MIMN scan costs ~0.5 s per step: a short history there.
    L = 3 if (kernel_backend, name) == ("triton", "mimn") else 37
    for batch in (make_batch([L, L // 3, 0, 1, L - 2], L),
                  make_batch([L - 1], L, B=3)):
        want_loss, want = grads(ref_model, batch)
        loss, got = grads(model, batch)
        torch.testing.assert_close(loss, want_loss, **FP64)
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], **FP64, msg=f"{name} grad of {n}")


@pytest.mark.parametrize("name", [n for n in NAMES if n != "mimn"])   # MIMN: below
def test_dedup_equals_dense(name, backend):
    """The indexed path (each distinct behaviour embedded, projected and hashed once; the
    default) gives the dense path's loss and every gradient, in fp64, in every backend."""
    dedup_matches_dense(make_model(name, backend=backend, dedup=False))


@pytest.mark.parametrize("backend", ["torch", "cpp", "numba"])
def test_mimn_dedup_equals_dense(backend):
    """MIMN embeds each distinct behaviour once and gathers the embeddings into the scan's
    dense input, padded positions (row -1) reading row 0 with no gradient: the dense
    path's loss and gradients. (The gather is backend-independent; the triton scan under
    the interpreter would take minutes here, and test_mimn covers it.)"""
    dedup_matches_dense(make_model("mimn", backend=backend, dedup=False))


@pytest.mark.parametrize("backend", ["torch", "cpp", "numba"])
def test_lookup_padding(backend):
    """_Lookup: values and table gradient of nn.Embedding with its padding_idx (None or a
    row), and with padding_idx -1, ids of -1 read row 0 and add nothing to its gradient."""
    from fastattn.models.base import _Lookup
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (4, 7), generator=g)
    ids[0, 0] = ids[1, 3] = 0
    up = torch.randn(4, 7, 3, dtype=torch.float64, generator=g)
    for pad in (None, 0, 5):
        w = torch.randn(9, 3, dtype=torch.float64, generator=g, requires_grad=True)
        w2 = w.detach().clone().requires_grad_()
        out = _Lookup.apply(w, ids, pad, backend)
        want = torch.nn.functional.embedding(ids, w2, padding_idx=pad)
        torch.testing.assert_close(out, want, **FP64)
        (out * up).sum().backward()
        (want * up).sum().backward()
        torch.testing.assert_close(w.grad, w2.grad, **FP64)
    w = torch.randn(9, 3, dtype=torch.float64, generator=g, requires_grad=True)
    neg = torch.where(ids % 3 == 0, -1, ids)
    out = _Lookup.apply(w, neg, -1, backend)
    torch.testing.assert_close(out, w.detach()[neg.clamp(min=0)], **FP64)
    (out * up).sum().backward()
    keep = (neg >= 0)[..., None]
    want = torch.zeros_like(w).index_add_(0, neg.clamp(min=0).reshape(-1),
                                          (up * keep).reshape(-1, 3))
    torch.testing.assert_close(w.grad, want, **FP64)


def dedup_matches_dense(dense):
    """Check that a copy of ``dense`` with dedup on (even for tiny batches) gives its loss
    and every gradient in fp64; returns (indexed model, batch, its gradients) per batch."""
    checked = []
    indexed = copy.deepcopy(dense)
    indexed.dedup = True
    indexed.dedup_min_positions = 0        # these tiny batches would be embedded densely
    # Few distinct items: every batch repeats behaviours across and within histories.
    for batch in (make_batch([37, 12, 0, 1, 30], 37), make_batch([33], 37, B=4)):
        batch.hist_items = batch.hist_items % 7
        batch.hist_cats = torch.where(batch.hist_items > 0, batch.hist_items % 3 + 1, 0)
        want_loss, want = grads(dense, batch)
        loss, got = grads(indexed, batch)
        torch.testing.assert_close(loss, want_loss, **FP64)
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], **FP64,
                                       msg=f"{dense.name} grad of {n}")
        checked.append((indexed, batch, got))
    return checked


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    model = make_model(name, seed=3)
    cfg = json.loads(json.dumps(model.config()))
    assert cfg["name"] == name and cfg["n_items"] == N_ITEMS and cfg["n_cats"] == N_CATS
    clone = build(**cfg).double()
    clone.load_state_dict(model.state_dict())                    # strict: same architecture
    assert clone.config() == model.config()
    batch = make_batch([37, 2, 0], 37)
    torch.testing.assert_close(clone(batch), model(batch), **FP64)


def test_backend_setter_reaches_submodules():
    eta, mimn = make_model("eta"), make_model("mimn")
    eta.backend, mimn.backend = "torch", "numba"
    assert eta.long_attn.backend == "torch" and mimn.encoder.backend == "numba"


def test_bad_inputs():
    model = make_model("sim")
    good = make_batch([3, 2], 4)

    def bad(**fields):
        return Batch(**{**good.__dict__, **fields})

    with pytest.raises(TypeError, match="Batch"):
        model((good.hist_items, good.hist_cats))
    with pytest.raises(TypeError, match="hist_items.*integer dtype"):
        model(bad(hist_items=good.hist_items.double()))
    with pytest.raises(ValueError, match="hist_cats.*shape"):
        model(bad(hist_cats=good.hist_cats[:, :3]))
    with pytest.raises(ValueError, match="lengths"):
        model(bad(lengths=torch.tensor([5, 2])))
    with pytest.raises(ValueError, match="target_item.*item ids in \\[0, 50\\]"):
        model(bad(target_item=torch.tensor([51, 1])))
    with pytest.raises(ValueError, match="target_cat.*shape"):
        model(bad(target_cat=torch.tensor([1, 1, 1])))
    with pytest.raises(ValueError, match="U=2 must equal"):
        model(bad(target_item=torch.tensor([1, 1, 1]), target_cat=torch.tensor([1, 1, 1]),
                  label=None))
    with pytest.raises(ValueError, match="hist_index.*history rows in \\[0, 1\\]"):
        model(bad(hist_index=torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="no label"):
        model.loss(bad(label=None))
    with pytest.raises(ValueError, match="unknown model"):
        build("dien", N_ITEMS, N_CATS)
    with pytest.raises(ValueError, match="short_len"):
        DIN(N_ITEMS, N_CATS, short_len=0)
    with pytest.raises(ValueError, match="heads"):
        ETANet(N_ITEMS, N_CATS, embed_dim=3, heads=4)
    with pytest.raises(ValueError, match="key_signatures"):
        make_model("eta")(good, key_signatures=torch.zeros(2, 3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="state.M"):
        mimn = make_model("mimn")
        state = mimn.encode(good)
        mimn.score_state(state._replace(M=state.M[:, :1]), good.target_item, good.target_cat)


# ---------------------------------------------------------------------- per model

@pytest.mark.parametrize("heads", [1, 2])
def test_din_attends_recent_behaviours(heads):
    short = make_model("din", short_len=5, heads=heads)
    whole = make_model("din", short_len=None, heads=heads)
    whole.load_state_dict(short.state_dict())
    batch = make_batch([37, 4, 0], 37)
    recent = batch.truncate(5)
    torch.testing.assert_close(short(batch), whole(recent), **FP64)
    assert not torch.allclose(short(batch), whole(batch))


def test_eta_item_signatures_equal_plain_path():
    model = make_model("eta")
    item_cat = torch.randint(1, N_CATS + 1, (N_ITEMS + 1,))
    item_cat[0] = 0
    table = model.item_signatures(item_cat)
    assert table.shape == (N_ITEMS + 1, 1) and table.dtype == torch.int64
    for batch in (make_batch([37, 12, 0, 30], 37), make_batch([33], 37, B=5)):
        batch.hist_cats = item_cat[batch.hist_items]
        torch.testing.assert_close(model(batch, key_signatures=table), model(batch), **FP64)
        model.dedup = False                     # the dense form gathers one per position
        torch.testing.assert_close(model(batch, key_signatures=table), model(batch), **FP64)
        model.dedup = True
    with pytest.raises(ValueError, match="item_cat"):
        model.item_signatures(item_cat[:-1])


def test_mimn_state_streams_and_scores():
    model = make_model("mimn")
    batch = make_batch([7, 3, 0, 1], 7)
    state = model.encode(batch)
    for u, n in enumerate(batch.lengths.tolist()):
        # Padded steps leave the state alone: equal to the scan over exactly n steps ...
        x = model.embed(batch.hist_items[u:u + 1, :n], batch.hist_cats[u:u + 1, :n])
        exact = model.encoder(x)[1]
        # ... and to the serving update applied event by event.
        streamed = model.encoder.initial_state(1)
        for t in range(n):
            item, cat = batch.hist_items[u, t:t + 1], batch.hist_cats[u, t:t + 1]
            streamed = model.encoder.step(model.embed(item, cat), streamed)[1]
        for field, a, b, c in zip(state._fields, state, exact, streamed):
            torch.testing.assert_close(a[u:u + 1], b, **FP64, msg=f"row {u} {field}")
            torch.testing.assert_close(a[u:u + 1], c, **FP64, msg=f"row {u} {field}")
    logits, reg = model(batch, return_reg=True)
    torch.testing.assert_close(model.score_state(state, batch.target_item, batch.target_cat),
                               logits, **FP64)
    # One user's state scores many candidates (the UIC path), as the serving batch does.
    one = make_batch([6], 7, B=5)
    torch.testing.assert_close(model.score_state(model.encode(one), one.target_item,
                                                 one.target_cat), model(one), **FP64)
    share = state.g / batch.lengths.clamp(min=1).to(state.g.dtype)[:, None]
    torch.testing.assert_close(reg, model.reg_lambda * model.encoder.reg_loss(
        state._replace(g=share)), **FP64)
    assert reg > 0


def test_mimn_memory_read_variants():
    """The issue-18 ablation of the target-keyed memory read: "mean" reads the slots' mean,
    "none" drops the read from the head; both score and train, bad values are refused."""
    batch = make_batch([7, 3, 0, 1], 7)
    state = make_model("mimn").encode(batch)
    for read in ("mean", "none"):
        model = make_model("mimn", memory_read=read)
        logits = model(batch)
        assert logits.shape == (4,) and torch.isfinite(logits).all()
        model.loss(batch).backward()
        assert build(**model.config()).memory_read == read
    mean = make_model("mimn", memory_read="mean")
    M = state.M
    q = mean.read_query(mean.embed(batch.target_item, batch.target_cat))
    expect = mean.score(mean.embed(batch.target_item, batch.target_cat),
                        [mean.miu_attn(mean.embed(batch.target_item, batch.target_cat),
                                       state.S)], [M.mean(1), q * M.mean(1)])
    torch.testing.assert_close(mean.score_state(state, batch.target_item, batch.target_cat),
                               expect, **FP64)
    with pytest.raises(ValueError, match="memory_read"):
        make_model("mimn", memory_read="slot")
    with pytest.raises(ValueError, match="memory_read='none'"):
        make_model("mimn", memory_read="none", miu_k=0)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_sim_search_picks_most_recent_same_category(seed):
    for backend in ("torch", "cpp", "numba"):    # the tensor forms; the scan kernels
        _check_search(seed, backend)


def _check_search(seed, backend):
    g = torch.Generator().manual_seed(seed)
    U, L, B, n = 3, 12, 6, 3
    cats = torch.randint(0, 4, (U, L), generator=g)
    lengths = torch.tensor([12, 7, 0])
    target_cat = torch.randint(1, 4, (B,), generator=g)

    def loop(u, b, length):
        want = [l for l in range(length) if cats[u, l] == target_cat[b]][::-1][:n]
        return want + [-1] * (n - len(want))

    hist_index = torch.randint(0, U, (B,), generator=g)
    idx = category_search(cats, lengths, target_cat, n, 3, hist_index, backend)
    assert [idx[b].tolist() for b in range(B)] == [loop(int(hist_index[b]), b, int(
        lengths[hist_index[b]])) for b in range(B)]
    rows = torch.tensor([0, 1, 2, 0, 1, 1])                          # U == B, no hist_index
    idx = category_search(cats[rows], lengths[rows], target_cat, n, 3, backend=backend)
    assert [idx[b].tolist() for b in range(B)] == [loop(int(rows[b]), b, int(lengths[rows[b]]))
                                                   for b in range(B)]
    # One shared history, shorter than n; and an empty one.
    shared = category_search(cats[:1, :2], torch.tensor([2]), target_cat, n, 3,
                             backend=backend)
    assert [shared[b].tolist() for b in range(B)] == [loop(0, b, 2) for b in range(B)]
    empty = category_search(cats[:1, :0], torch.tensor([0]), target_cat, n, 3,
                            backend=backend)
    assert (empty == -1).all() and empty.shape == (B, n)


def test_sim_attends_only_retrieved_rows():
    """The ESU sees exactly the GSU's rows: a model whose GSU keeps everything valid (one
    category, sim_len >= L) gives the ESU attention of the whole history."""
    model = make_model("sim", sim_len=40, short_len=0)
    batch = make_batch([37, 5, 0], 37)
    batch.hist_cats = batch.hist_cats.clamp(max=1)
    batch.target_cat = torch.ones(3, dtype=torch.int64)
    target = model.embed(batch.target_item, batch.target_cat)
    keys = model.embed(batch.hist_items, batch.hist_cats)
    pos = torch.arange(keys.shape[1]).expand(3, -1)
    pos = torch.where(pos < batch.lengths[:, None], pos, -1)
    interval = model.time_emb(interval_buckets(pos, batch.lengths, model.time_buckets))
    keys = torch.cat([keys, interval], -1)          # SIM's ESU keys: [behaviour, interval]
    want = model.esu_attn(target, keys, lengths=batch.lengths)
    torch.testing.assert_close(model.interests(batch)[1], want, **FP64)   # fused (default)
    model.dedup = False                     # each branch through its own module
    torch.testing.assert_close(_esu(model, batch, target), want, **FP64)


@pytest.mark.parametrize("kwargs", [dict(time_buckets=0), dict(short_len=0),
                                    dict(short_len=None)])
def test_sim_fused_branches_match_separate(kwargs):
    """The fused step (one lookup, the two attentions as one call) without the interval
    embedding, without the short window and with the whole history as the window."""
    dedup_matches_dense(make_model("sim", dedup=False, **kwargs))


def test_sim_interval_buckets():
    """Behaviours after the position, log2-bucketed from 1, capped; 0 for empty slots."""
    idx = torch.tensor([[9, 8, 7, 6, 3, 0, -1], [0, 1, 2, -1, -1, -1, -1]])
    lengths = torch.tensor([10, 3])
    assert interval_buckets(idx, lengths, 3).tolist() == [[1, 2, 2, 3, 3, 3, 0],
                                                          [2, 2, 1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="time_buckets"):
        make_model("sim", time_buckets=-1)
    assert make_model("sim", time_buckets=0).time_emb is None


def _esu(model, batch, target):
    captured = {}
    hook = model.esu_attn.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    model(batch)
    hook.remove()
    return captured["out"]


def test_sdim_codes_follow_design_bit_order():
    model = make_model("sdim", n_hashes=5, hash_width=3)
    x = torch.randn(9, model.dim, dtype=torch.float64)
    bits = (x @ model.planes > 0).long().view(9, 5, 3)
    torch.testing.assert_close(model.codes(x), (bits * torch.tensor([1, 2, 4])).sum(-1))
    sig = torch.tensor([[-1, 0]], dtype=torch.int64)                 # bits 0..63 set
    assert hash_codes(sig, 40, 3)[0].tolist() == [7] * 21 + [1] + [0] * 18


def test_sdim_bucket_interest_equals_brute_force():
    model = make_model("sdim")
    batch = make_batch([37, 12, 0, 30], 37)
    keys = model.embed(batch.hist_items, batch.hist_cats)
    target = model.embed(batch.target_item, batch.target_cat)
    kc, qc = model.codes(keys), model.codes(target)
    hist_index = torch.tensor([3, 0, 0, 1, 2, 3, 3])
    qc_b = qc[torch.tensor([0, 1, 2, 3, 0, 1, 2])]
    got = bucket_interest(keys, kc, batch.lengths, qc_b, 4, hist_index)
    for b, u in enumerate(hist_index.tolist()):
        per_hash = []
        for h in range(model.n_hashes):
            hits = [keys[u, l] for l in range(int(batch.lengths[u])) if kc[u, l, h] == qc_b[b, h]]
            per_hash.append(torch.stack(hits).mean(0) if hits else torch.zeros(model.dim,
                                                                              dtype=keys.dtype))
        torch.testing.assert_close(got[b], torch.stack(per_hash).mean(0), **FP64)
    assert (got[[2, 3]] != 0).any() and (got[4] == 0).all()       # history 2 is empty
    # The training layout (one history per query) takes the per-row path: same values.
    torch.testing.assert_close(bucket_interest(keys, kc, batch.lengths, qc[:4], 4),
                               bucket_interest(keys, kc, batch.lengths, qc[:4], 4,
                                               torch.arange(4)), **FP64)


@pytest.mark.parametrize("N, L, by_row", [(6, 40, True), (60, 3, False)])
def test_sdim_bucket_interest_indexed_paths(monkeypatch, N, L, by_row):
    """Indexed training layout: per distinct row (a small table for long histories) or per
    position equals the dense call on table[hist_rows], gradient included."""
    import fastattn.models.sdim as sdim
    calls = []
    real = sdim._collisions_by_row
    monkeypatch.setattr(sdim, "_collisions_by_row", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(1)
    D, H, nb = 5, 4, 4
    table = torch.randn(N, D, dtype=torch.float64, generator=g, requires_grad=True)
    codes = torch.randint(0, nb, (N, H), generator=g)
    lengths = torch.tensor([L, 0, L // 2 + 1, 1])
    rows = torch.randint(0, N, (4, L), generator=g)
    rows[torch.arange(L) >= lengths[:, None]] = -1
    qc = torch.randint(0, nb, (4, H), generator=g)
    got = bucket_interest(table, codes, lengths, qc, nb, hist_rows=rows)
    dense = rows.clamp(min=0)
    want = bucket_interest(table[dense], codes[dense], lengths, qc, nb)
    torch.testing.assert_close(got, want, **FP64)
    assert (got[1] == 0).all() and bool(calls) == by_row
    (gt,) = torch.autograd.grad(got.sum(), table)
    (gw,) = torch.autograd.grad(want.sum(), table)
    torch.testing.assert_close(gt, gw, **FP64)


def test_models_are_ctr_models():
    for name, cls in MODELS.items():
        assert issubclass(cls, CTRModel) and cls.name == name
    assert (DIN, ETANet, MIMN, SIMHard, SDIM) == tuple(MODELS[n] for n in
                                                       ("din", "eta", "mimn", "sim", "sdim"))


def test_eta_hash_input_raw_model():
    """ETANet(hash_input="raw") hashes the embeddings: it is in config(), rebuilds, trains,
    and its ETA+ item signatures give the same logits as hashing on the fly."""
    m = make_model("eta", hash_input="raw")
    assert m.config()["hash_input"] == "raw"
    assert build(**m.config()).long_attn.hash_input == "raw"
    batch = make_batch([12, 3, 0, 9], 12)
    m.loss(batch).backward()
    assert m.item_emb.weight.grad is not None
    item_cat = torch.arange(N_ITEMS + 1) % (N_CATS + 1)
    g = torch.Generator().manual_seed(5)
    items = torch.randint(1, N_ITEMS + 1, (4, 12), generator=g)
    b = Batch(items, item_cat[items], torch.tensor([12, 3, 0, 9]), items[:, 0],
              item_cat[items[:, 0]])
    table = m.item_signatures(item_cat)
    torch.testing.assert_close(m(b, key_signatures=table), m(b), **FP64)
    with pytest.raises(ValueError, match="hash_input"):
        make_model("eta", hash_input="nope")


def test_eta_time_buckets():
    """ETANet(time_buckets=): the interval embedding is attended, not hashed: serving and
    training layouts agree, the indexed (item, category) rows give the dense
    path's loss and gradients, ETA+ item signatures still hold, and it is in config()."""
    dense = make_model("eta", time_buckets=5, dedup=False)
    assert dense.config()["time_buckets"] == 5
    assert build(**dense.config()).long_attn.hash_dims == dense.dim
    serving = make_batch([33], 37, B=5, label=False)
    torch.testing.assert_close(dense(serving), dense(repeated(serving)), **FP64)
    for indexed, batch, got in dedup_matches_dense(dense):
        assert "time_emb.weight" in got and got["time_emb.weight"].abs().sum() > 0
        item_cat = torch.arange(N_ITEMS + 1) % (N_CATS + 1)
        batch.hist_cats = item_cat[batch.hist_items]
        table = indexed.item_signatures(item_cat)
        for m in (dense, indexed):
            torch.testing.assert_close(m(batch, key_signatures=table), m(batch), **FP64)
    with pytest.raises(ValueError, match="hash_dims"):
        ETAAttention(8, topk=2, hash_dims=9)


def test_eta_share_feature():
    """ETANet(share_feature=): the head reads log(soft count / (1 + n)) per head of the
    long-term attention; in config(); one head (the interval-id path) agrees across layouts
    and between the indexed and dense forms, loss and gradients."""
    off = make_model("eta", share_feature=False)
    assert off.config()["share_feature"] is False and not build(**off.config()).share_feature
    on = make_model("eta")
    assert on.config()["share_feature"] is True
    assert on.head[0].in_features == off.head[0].in_features + on.heads
    dense = make_model("eta", heads=1, dedup=False)
    serving = make_batch([33], 37, B=5, label=False)
    torch.testing.assert_close(dense(serving), dense(repeated(serving)), **FP64)
    for _, _, got in dedup_matches_dense(dense):
        assert got["long_attn.k_proj.weight"].abs().sum() > 0
    with pytest.raises(TypeError, match="share_feature"):
        make_model("eta", share_feature=1)


def test_sdim_hash_codes_equal_bit_by_bit_reading():
    """hash_codes (one shift and mask per code, straddling codes from two words) equals
    reading the DESIGN bit order one bit at a time, for every width and code count."""
    def by_bits(sig, n_hashes, width):
        j = torch.arange(n_hashes * width)
        bits = (sig[..., j // 64] >> (j % 64)) & 1
        return (bits.unflatten(-1, (n_hashes, width)) << torch.arange(width)).sum(-1)
    g = torch.Generator().manual_seed(0)
    for W in (1, 2, 3):
        sig = torch.randint(-2**63, 2**63 - 1, (4, 2, W), generator=g)
        sig[0, 0] = -1                                   # every bit set, the sign bit too
        for width in (1, 3, 7, 13, 16):
            for n in range(1, 64 * W // width + 1):
                assert torch.equal(hash_codes(sig, n, width), by_bits(sig, n, width)), \
                    (W, width, n)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_embeddings(name):
    """``sparse_embeddings``: the item and category tables get sparse gradients that sum to
    the dense ones (the other parameters' are unchanged), dedup on and off, and a step of
    SparseAdam (tables) + Adam (the rest) trains."""
    dense = make_model(name, seed=5)
    sparse = copy.deepcopy(dense)
    assert not sparse.sparse_embeddings
    sparse.sparse_embeddings = True
    assert sparse.sparse_embeddings and sparse.item_emb.sparse and sparse.cat_emb.sparse
    for dedup_min in (1 << 15, 0):
        dense.dedup_min_positions = sparse.dedup_min_positions = dedup_min
        batch = make_batch([37, 12, 0, 30], 37)
        want_loss, want = grads(dense, batch)
        loss, got = grads(sparse, batch)
        torch.testing.assert_close(loss, want_loss, **FP64)
        assert got.keys() == want.keys()
        for n in want:
            assert got[n].is_sparse == (n in ("item_emb.weight", "cat_emb.weight")), n
            torch.testing.assert_close(got[n].to_dense(), want[n], **FP64, msg=n)
    tables = [sparse.item_emb.weight, sparse.cat_emb.weight]
    rest = [p for p in sparse.parameters() if all(p is not t for t in tables)]
    opts = [torch.optim.SparseAdam(tables, lr=1e-2), torch.optim.Adam(rest, lr=1e-2)]
    before = sparse.item_emb.weight.detach().clone()
    for _ in range(2):
        for o in opts:
            o.zero_grad()
        sparse.loss(batch).backward()
        for o in opts:
            o.step()
    assert not torch.equal(before, sparse.item_emb.weight)
