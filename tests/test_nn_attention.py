import pytest
import torch

import fastattn
from fastattn.nn import ETAAttention, TargetAttention, log_soft_count


@pytest.mark.parametrize("heads", [1, 4])
def test_state_dict_moves_from_dense_to_eta(heads):
    dense = TargetAttention(32, heads, query_dim=12, key_dim=20)
    eta = ETAAttention(32, heads, query_dim=12, key_dim=20, topk=300, hash_bits=64)
    eta.load_state_dict(dense.state_dict())                   # strict: planes kept
    assert set(eta.state_dict()) == set(dense.state_dict()) | {"planes"}
    query, keys = torch.randn(6, 12), torch.randn(1, 200, 20)
    lengths = torch.tensor([150])
    # topk >= L: the fallback is dense attention, identical to the dense module.
    torch.testing.assert_close(eta(query, keys, lengths=lengths),
                               dense(query, keys, lengths=lengths))
    eta.topk = 150                       # every valid position retrieved through the kernels
    torch.testing.assert_close(eta(query, keys, lengths=lengths),
                               dense(query, keys, lengths=lengths), rtol=1e-4, atol=1e-5)


def test_planes_seeded_and_saved():
    a, b = ETAAttention(16, seed=3, hash_bits=100), ETAAttention(16, seed=3, hash_bits=100)
    assert torch.equal(a.planes, b.planes) and a.planes.shape == (16, 100)
    c = ETAAttention(16, seed=4, hash_bits=100)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.planes, a.planes)


def test_eta_module_trains_and_matches_functional():
    torch.manual_seed(0)
    m = ETAAttention(16, 2, key_dim=8, topk=5, hash_bits=128)
    query, keys = torch.randn(4, 16), torch.randn(4, 30, 8)
    lengths = torch.tensor([30, 2, 0, 17])
    out = m(query, keys, lengths=lengths)
    assert out.shape == (4, 16) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(p.grad is not None for p in (m.q_proj.weight, m.k_proj.weight, m.v_proj.weight))
    q, k, v = m.project(query, keys, None)
    want = fastattn.reference.eta_attention(
        q.view(4, 2, 8), k.view(4, 30, 2, 8), v.view(4, 30, 2, 8), m.sign(q), m.sign(k), 5,
        lengths)
    torch.testing.assert_close(out, m.out_proj(want.flatten(-2)))


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("indexed", [False, True])
def test_eta_module_equals_fused_op_with_gradients(backend, heads, shared, indexed):
    """The module retrieves, then attends over the winners only (one head: unprojected);
    output and every gradient (projections, histories or table, query) equal eta_attention
    on the projected inputs."""
    torch.manual_seed(2)
    m = ETAAttention(8, heads, key_dim=5, query_dim=6, topk=4, hash_bits=70,
                     backend=backend).double()
    U, L, N, B = (1, 23, 9, 5) if shared else (4, 23, 9, 4)
    lengths = torch.tensor([23] if shared else [23, 0, 3, 17])
    hist_index = torch.zeros(B, dtype=torch.int64) if shared else None
    rows = torch.where(torch.arange(L) < lengths[:, None], torch.randint(0, N, (U, L)), -1)
    keys = torch.randn(*((N,) if indexed else (U, L)), 5, dtype=torch.float64)
    kw = dict(lengths=lengths, hist_index=hist_index, hist_rows=rows if indexed else None)
    query = torch.randn(B, 6, dtype=torch.float64)

    def run(fn):
        m.zero_grad()
        x, k = query.clone().requires_grad_(), keys.clone().requires_grad_()
        out = fn(x, k)
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        return [out.detach(), x.grad, k.grad] + [p.grad for p in m.parameters()]

    def fused(x, k):
        q, kp, v = m.project(x, k, None)
        out = fastattn.eta_attention(m._split(q), m._split(kp), m._split(v), m.sign(q.detach()),
                                     m.sign(kp.detach()), m.topk, backend=backend, **kw)
        return m._merge(out)

    for got, want in zip(run(lambda x, k: m(x, k, **kw)), run(fused)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["dense", "shared", "indexed", "indexed_fused"])
@pytest.mark.parametrize("bias,tied", [(True, True), (False, False)])
def test_one_head_attends_unprojected(backend, form, bias, tied):
    """One head attends in the input space (W_k folded into the query, W_v applied to the
    weighted input sum): the projected form's output and gradients, empty histories too."""
    torch.manual_seed(3)
    m = TargetAttention(8, key_dim=5, value_dim=5 if tied else 3, query_dim=6, bias=bias,
                        backend=backend).double()
    B, L, N = 4, 13, 7
    U = 1 if form == "shared" else B
    lengths = torch.tensor([9] if form == "shared" else [13, 0, 2, 7])
    hist_index = torch.tensor([0, 0, 0, 0]) if form == "shared" else None
    rows = torch.where(torch.arange(L) < lengths[:, None], torch.randint(0, N, (U, L)), -1)
    indexed = form.startswith("indexed")
    shape = (N,) if indexed else (U, L)
    keys = torch.randn(*shape, 5, dtype=torch.float64)
    values = None if tied else torch.randn(*shape, 3, dtype=torch.float64)
    query = torch.randn(B, 6, dtype=torch.float64)
    m.gather_below = 0 if form == "indexed_fused" else 1 << 20
    assert m.absorbs(B, L, keys, values)

    def run(absorb):
        m.zero_grad()
        m.absorbs = lambda *a: absorb
        ins = [t.clone().requires_grad_() for t in (query, keys)]
        out = m(ins[0], ins[1], values, lengths=lengths, hist_index=hist_index,
                hist_rows=rows if indexed else None)
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        return [out.detach()] + [t.grad for t in ins] + \
            [torch.zeros_like(p) if p.grad is None else p.grad for p in m.parameters()]

    got, want = run(True), run(False)
    del m.absorbs
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if form != "shared":
        assert (got[0][1] == 0).all()            # the empty history


def test_precomputed_key_signatures_eta_plus():
    m = ETAAttention(16, key_dim=8, topk=4, hash_bits=64)
    items = torch.randn(50, 8)
    table = m.precompute_key_signatures(items)               # (N, W), once per item
    history = torch.randint(0, 50, (1, 40))
    keys = items[history]
    query = torch.randn(7, 16)
    torch.testing.assert_close(m(query, keys, key_signatures=table[history]), m(query, keys))


def test_bad_config():
    with pytest.raises(ValueError, match="multiple of heads"):
        TargetAttention(10, 3)
    with pytest.raises(ValueError, match="topk"):
        ETAAttention(8, topk=0)


@pytest.mark.parametrize("cls", [TargetAttention, ETAAttention])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("gather_below", [1 << 20, 0])     # small-history gather / fused op
def test_indexed_histories_equal_dense(backend, cls, heads, gather_below):
    """(query, table, hist_rows=...) projects and hashes each table row once, and gives the
    dense module's output and parameter gradients on table[hist_rows] (fp64)."""
    torch.manual_seed(1)
    kwargs = dict(topk=6, hash_bits=70) if cls is ETAAttention else {}
    m = cls(8, heads, key_dim=5, backend=backend, **kwargs).double()
    m.gather_below = gather_below
    U, L, N = 3, 29, 11
    lengths = torch.tensor([29, 0, 13])
    rows = torch.where(torch.arange(L) < lengths[:, None], torch.randint(0, N, (U, L)), -1)
    table = torch.randn(N, 5, dtype=torch.float64, requires_grad=True)
    query = torch.randn(U, 8, dtype=torch.float64)

    def run(keys, **kw):
        m.zero_grad()
        out = m(query, keys, lengths=lengths, **kw)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    got, got_grads = run(table, hist_rows=rows)
    table_grad, table.grad = table.grad, None
    dense = fastattn.reference.history_from_table(table, rows, lengths)
    want, want_grads = run(dense)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(table_grad, table.grad, rtol=1e-10, atol=1e-12)


def test_indexed_key_signatures_eta_plus():
    m = ETAAttention(16, key_dim=8, topk=4, hash_bits=64)
    items = torch.randn(50, 8)
    table = m.precompute_key_signatures(items)               # (N, W), once per item
    uniq, rows = fastattn.unique_rows(torch.randint(0, 50, (1, 40)))
    query = torch.randn(7, 16)
    torch.testing.assert_close(m(query, items[uniq], hist_rows=rows, key_signatures=table[uniq]),
                               m(query, items[uniq], hist_rows=rows))


@pytest.mark.parametrize("heads", [1, 2])
def test_eta_hash_input_raw(heads):
    """hash_input="raw" retrieves by the signatures of the raw query and keys (planes of
    the input width), then attends over the winners with the projections as usual; ETA+
    signatures are those of the raw item embeddings."""
    torch.manual_seed(4)
    m = ETAAttention(16, heads, query_dim=8, key_dim=8, topk=5, hash_bits=128,
                     hash_input="raw")
    assert m.planes.shape == (8, 128)
    query, keys = torch.randn(4, 8), torch.randn(4, 30, 8)
    lengths = torch.tensor([30, 2, 0, 17])
    out = m(query, keys, lengths=lengths)
    q, k, v = m.project(query, keys, None)
    H, Dh = heads, 16 // heads
    want = fastattn.reference.eta_attention(
        q.view(4, H, Dh), k.view(4, 30, H, Dh), v.view(4, 30, H, Dh), m.sign(query),
        m.sign(keys), 5, lengths).flatten(-2)
    torch.testing.assert_close(out, want if heads == 1 else m.out_proj(want),
                               rtol=1e-4, atol=1e-5)
    items = torch.randn(50, 8)
    table = m.precompute_key_signatures(items)
    assert torch.equal(table, m.sign(items))
    history = torch.randint(0, 50, (2, 40))
    torch.testing.assert_close(m(query[:2], items[history], key_signatures=table[history]),
                               m(query[:2], items[history]))


def test_eta_hash_input_checks():
    with pytest.raises(ValueError, match="hash_input"):
        ETAAttention(8, hash_input="keys")
    with pytest.raises(ValueError, match="query_dim"):
        ETAAttention(8, query_dim=6, key_dim=5, hash_input="raw")


@pytest.mark.parametrize("heads,topk,indexed", [(1, 4, True), (2, 4, False), (1, 30, True)])
def test_eta_position_ids(heads, topk, indexed):
    """position_ids / position_table (attended, not hashed, computed for the retrieved
    positions only) give the output and gradients of the same features appended to every
    position's key; with L <= topk too (every valid position attended)."""
    torch.manual_seed(4)
    m = ETAAttention(8, heads, key_dim=7, query_dim=6, topk=topk, hash_bits=64,
                     hash_dims=5).double()
    B, L, N = 3, 23, 9
    lengths = torch.tensor([23, 0, 6])
    rows = torch.where(torch.arange(L) < lengths[:, None], torch.randint(0, N, (B, L)), -1)
    table = torch.randn(N, 5, dtype=torch.float64)
    pos_table = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    pos_id = torch.randint(0, 4, (B, L))
    query = torch.randn(B, 6, dtype=torch.float64)
    calls = []

    def ids(idx):                                # (B, n) positions -> (B, n) rows
        calls.append(idx.shape)
        return pos_id.gather(1, idx.clamp(min=0))

    def run(fn):
        m.zero_grad()
        pos_table.grad = None
        x = query.clone().requires_grad_()
        out = fn(x)
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        return [out.detach(), x.grad, pos_table.grad] + [p.grad for p in m.parameters()]

    want = run(lambda x: m(x, torch.cat([table[rows.clamp(min=0)], pos_table[pos_id]], -1),
                           lengths=lengths))
    keys = table if indexed else table[rows.clamp(min=0)]
    kw = dict(lengths=lengths, hist_rows=rows if indexed else None)
    got = run(lambda x: m(x, keys, position_ids=ids, position_table=pos_table, **kw))
    assert calls == [(B, min(topk, L))]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="position_ids"):
        m(query, keys, position_ids=lambda idx: idx[:, :1], position_table=pos_table, **kw)
    with pytest.raises(ValueError, match="rows of position_table"):
        m(query, keys, position_ids=lambda idx: ids(idx) + 4, position_table=pos_table, **kw)
    with pytest.raises(ValueError, match="key_dim"):
        m(query, keys, position_ids=ids, position_table=pos_table[:, :1], **kw)
    with pytest.raises(TypeError, match="position_ids"):
        m(query, keys, position_ids=pos_id, position_table=pos_table, **kw)


def test_log_soft_count():
    """log Σ exp(s - max s) over the ok slots: log K for K equal scores, 0 for one clear
    winner or a row without any slot; gradient of the log-sum-exp (stop-gradient max)."""
    s = torch.tensor([[1.0, 1.0, 1.0, 5.0], [0.0, 50.0, -50.0, 0.0], [3.0, 2.0, 1.0, 0.0]],
                     dtype=torch.float64, requires_grad=True)
    ok = torch.tensor([[True, True, True, False], [False, True, True, False], [False] * 4])
    got = log_soft_count(s, ok)
    torch.testing.assert_close(got, torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64).log())
    got.sum().backward()
    want = torch.softmax(s.detach().masked_fill(~ok, float("-inf")), 1).nan_to_num()
    torch.testing.assert_close(s.grad, want)
    heads = log_soft_count(torch.zeros(2, 3, 4), torch.tensor([[True] * 3, [True, False, False]]))
    assert heads.shape == (2, 4)
    torch.testing.assert_close(heads, torch.tensor([[3.0] * 4, [1.0] * 4]).log())
    assert log_soft_count(torch.zeros(2, 0, 3), torch.zeros(2, 0, dtype=torch.bool)).shape == (2, 3)


@pytest.mark.parametrize("heads,topk,position,indexed", [(1, 4, False, False),
                                                         (1, 4, True, True),
                                                         (2, 30, True, False)])
def test_eta_return_mass(heads, topk, position, indexed):
    """return_mass=True: the same output, and per head log_soft_count of the projected
    scores over the retrieved positions (every valid one when L <= topk), with the
    log-sum-exp's gradient; 0 for an empty history."""
    torch.manual_seed(5)
    m = ETAAttention(8, heads, key_dim=7 if position else 5, query_dim=6, topk=topk,
                     hash_bits=64, hash_dims=5).double()
    B, L, N = 3, 23, 9
    lengths = torch.tensor([23, 0, 6])
    rows = torch.where(torch.arange(L) < lengths[:, None], torch.randint(0, N, (B, L)), -1)
    table = torch.randn(N, 5, dtype=torch.float64)
    pos_table = torch.randn(4, 2, dtype=torch.float64)
    pos_id = torch.randint(0, 4, (B, L))
    query = torch.randn(B, 6, dtype=torch.float64, requires_grad=True)
    kw = dict(lengths=lengths, hist_rows=rows if indexed else None)
    if position:
        kw.update(position_ids=lambda idx: pos_id.gather(1, idx.clamp(min=0)),
                  position_table=pos_table)
    keys = table if indexed else table[rows.clamp(min=0)]
    out, log_mass = m(query, keys, return_mass=True, **kw)
    assert log_mass.shape == (B, heads) and (log_mass[1] == 0).all()
    torch.testing.assert_close(out, m(query, keys, **kw), rtol=1e-12, atol=1e-12)
    # reference: the projected scores of every position, masked to the retrieved ones
    full = table[rows.clamp(min=0)]
    if position:
        full = torch.cat([full, pos_table[pos_id]], -1)
    q, k = m.q_proj(query), m.k_proj(full)
    if L > topk:
        _, idx = fastattn.hamming_topk(m.sign(q.detach()), m.sign(m.hashed_keys(full).detach()),
                                       topk, lengths=lengths)
        take = torch.zeros(B, L, dtype=torch.bool).scatter(1, idx.clamp(min=0), idx >= 0)
    else:
        take = torch.arange(L) < lengths[:, None]
    s = (m._split(q)[:, None] * m._split(k)).view(B, L, heads, -1).sum(-1) \
        * (8 // heads) ** -0.5
    s = s.masked_fill(~take[..., None], float("-inf"))
    want = (torch.logsumexp(s, 1) - s.amax(1).detach()).nan_to_num(nan=0.0)
    torch.testing.assert_close(log_mass, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(log_mass.sum(), query, retain_graph=True)[0]
    g_want = torch.autograd.grad(want.sum(), query)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
