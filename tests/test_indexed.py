"""Indexed histories (``hist_rows``): tables of N distinct behaviours read through (U, L) rows.

Every op's indexed call must equal its dense call on ``table[hist_rows]`` (integers exactly,
floats within DESIGN §6), and its table gradients must equal the index_add of the dense
gradients over the valid positions, in every backend.
"""
import pytest
import torch

import fastattn
from fastattn import reference as ref

from conftest import checks_values_on_host, device_of
from helpers import TOL, random_sigs


def make_rows(U, L, N, lengths=None, pad=-1, generator=None):
    """hist_rows (U, L): random table rows at valid positions, ``pad`` past the length."""
    rows = torch.randint(0, max(N, 1), (U, L), generator=generator)
    if lengths is not None:
        rows = torch.where(torch.arange(L) < lengths[:, None], rows, pad)
    return rows


def dense(table, rows, lengths=None):
    return ref.history_from_table(table, rows, lengths)


def table_grad(dense_grad, rows, lengths, N):
    """The index_add of per-position gradients (U, L, ...) into the table's (N, ...) rows."""
    U, L = rows.shape
    valid = rows >= 0
    if lengths is not None:
        valid &= torch.arange(L) < lengths[:, None]
    out = dense_grad.new_zeros(N, *dense_grad.shape[2:])
    return out.index_add_(0, rows[valid], dense_grad[valid])


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# --------------------------------------------------------------------------- hamming_topk

TOPK_CASES = [  # B, U, L, N, W, topk, lengths, hist_index, nbits
    (5, 5, 129, 40, 4, 7, [129, 0, 64, 128, 3], None, None),    # training layout
    (9, 1, 300, 25, 1, 50, [300], None, 8),                      # shared, heavy ties
    (7, 3, 257, 500, 3, 300, [257, 0, 5], [2, 0, 0, 1, 2, 2, 1], 150),   # k > L, hist_index
    (4, 4, 1, 3, 2, 1, None, None, None),                        # L = 1
    (3, 1, 0, 0, 1, 5, None, None, None),                        # L = 0, empty table
    (70, 1, 1000, 300, 5, 16, [999], None, None),                # hot shared history
    (3, 3, 40, 0, 2, 4, [0, 0, 0], None, None),                  # every history empty, N = 0
]


@pytest.mark.parametrize("case", TOPK_CASES)
def test_hamming_topk_indexed_equals_dense(backend, case):
    B, U, L, N, W, topk, lengths, hist, nbits = case
    if backend == "triton":          # the interpreter is slow: the long cases cut to 300
        L, lengths = min(L, 300), lengths and [min(n, 300) for n in lengths]
    lengths = None if lengths is None else torch.tensor(lengths)
    hist = None if hist is None else torch.tensor(hist)
    q, table = random_sigs(B, W, nbits=nbits), random_sigs(N, W, nbits=nbits)
    rows = make_rows(U, L, N, lengths)
    got = fastattn.hamming_topk(q, table, topk, lengths=lengths, hist_index=hist,
                                hist_rows=rows, backend=backend)
    want = ref.hamming_topk(q, dense(table, rows, lengths), topk, lengths, hist)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    # int32 rows, and padding that holds other values than -1, give the same answer
    rows32 = make_rows(U, L, N, lengths, pad=N + 7).to(torch.int32)
    rows32 = torch.where(rows >= 0, rows.to(torch.int32), rows32)
    got32 = fastattn.hamming_topk(q, table, topk, lengths=lengths, hist_index=hist,
                                  hist_rows=rows32, backend=backend)
    assert torch.equal(got32[1], want[1]) and torch.equal(got32[0], want[0])


# --------------------------------------------------------------------------- gather

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_topk_gather_indexed(backend, dtype):
    U, L, N, Dv = 3, 20, 11, 5
    lengths = torch.tensor([20, 0, 7])
    rows = make_rows(U, L, N, lengths)
    table = torch.randn(N, Dv, dtype=dtype)
    idx = torch.tensor([[0, 19, -1], [-1, -1, -1], [6, 6, 2], [3, -1, 0]])
    hist = torch.tensor([0, 1, 2, 0])
    (tab,) = leaves(table)
    got = fastattn.topk_gather(tab, idx, hist_index=hist, hist_rows=rows, backend=backend)
    (dv,) = leaves(dense(table, rows, lengths))
    want = fastattn.topk_gather(dv, idx, hist_index=hist, backend="torch")
    assert got.dtype == dtype and torch.equal(got, want)
    g = torch.randn_like(got)
    got.backward(g)
    want.backward(g)
    assert tab.grad.shape == (N, Dv)
    torch.testing.assert_close(tab.grad, table_grad(dv.grad, rows, lengths, N), **TOL[dtype])


# --------------------------------------------------------------------------- attention

ATTN_CASES = [  # B, U, L, N, H, Dh, Dv, topk, lengths, hist_index
    (5, 1, 37, 9, None, 8, 8, 6, [20], None),                 # shared history, single head
    (4, 4, 33, 50, 3, 5, 7, 4, [33, 0, 1, 12], None),         # training layout, multi-head
    (6, 3, 19, 4, 2, 4, 3, 50, [19, 5, 0], [2, 0, 1, 1, 2, 0]),   # k > L, hist_index
    (3, 3, 1, 2, None, 3, 2, 1, None, None),                  # L = 1
    (3, 1, 0, 0, 2, 4, 4, 5, None, None),                     # L = 0, empty table
    (2, 2, 130, 60, 1, 17, 9, 64, [130, 100], None),          # odd dims, k = 64
]


def _attn_inputs(case, dtype):
    B, U, L, N, H, Dh, Dv, topk, lengths, hist = case
    hk = () if H is None else (H,)
    q = torch.randn(B, *hk, Dh, dtype=dtype)
    keys = torch.randn(N, *hk, Dh, dtype=dtype)
    values = torch.randn(N, *hk, Dv, dtype=dtype)
    lengths = None if lengths is None else torch.tensor(lengths)
    hist = None if hist is None else torch.tensor(hist)
    rows = make_rows(U, L, N, lengths)
    qs, ks = random_sigs(B, 2, nbits=12), random_sigs(N, 2, nbits=12)
    return q, keys, values, qs, ks, rows, lengths, hist, topk


def _check_against_dense(ours, theirs, q, keys, values, rows, lengths, dtype):
    """ours(q, keys_table, values_table) vs theirs(q, keys_dense, values_dense): outputs and
    gradients, the table ones against the index_add of the dense ones."""
    lq, lk, lv = leaves(q, keys, values)
    out = ours(lq, lk, lv)
    dq, dk, dv = leaves(q, dense(keys, rows, lengths), dense(values, rows, lengths))
    want = theirs(dq, dk, dv)
    torch.testing.assert_close(out, want, **TOL[dtype])
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    N = keys.shape[0]
    assert lk.grad.shape == keys.shape and lv.grad.shape == values.shape
    torch.testing.assert_close(lq.grad, dq.grad, **TOL[dtype])
    torch.testing.assert_close(lk.grad, table_grad(dk.grad, rows, lengths, N), **TOL[dtype])
    torch.testing.assert_close(lv.grad, table_grad(dv.grad, rows, lengths, N), **TOL[dtype])


@pytest.mark.parametrize("case", ATTN_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eta_attention_indexed(backend, case, dtype):
    q, keys, values, qs, ks, rows, lengths, hist, topk = _attn_inputs(case, dtype)
    ks_dense = dense(ks, rows, lengths)

    def ours(q, k, v):
        return fastattn.eta_attention(q, k, v, qs, ks, topk, lengths=lengths, hist_index=hist,
                                      hist_rows=rows, backend=backend)

    def theirs(q, k, v):
        return fastattn.eta_attention(q, k, v, qs, ks_dense, topk, lengths=lengths,
                                      hist_index=hist, backend="torch")
    _check_against_dense(ours, theirs, q, keys, values, rows, lengths, dtype)


@pytest.mark.parametrize("case", ATTN_CASES)
def test_target_attention_indexed(backend, case):
    q, keys, values, _, _, rows, lengths, hist, _ = _attn_inputs(case, torch.float64)

    def ours(q, k, v):
        return fastattn.target_attention(q, k, v, lengths=lengths, hist_index=hist,
                                         hist_rows=rows, backend=backend)

    def theirs(q, k, v):
        return fastattn.target_attention(q, k, v, lengths=lengths, hist_index=hist)
    _check_against_dense(ours, theirs, q, keys, values, rows, lengths, torch.float64)


def test_topk_attention_indexed(backend):
    q, keys, values, _, _, rows, lengths, hist, _ = _attn_inputs(ATTN_CASES[1], torch.float64)
    idx = torch.tensor([[0, 32, -1], [-1, -1, -1], [0, 0, -1], [11, 3, 3]])

    def ours(q, k, v):
        return fastattn.topk_attention(q, k, v, idx, hist_rows=rows, scale=0.3, backend=backend)

    def theirs(q, k, v):
        return fastattn.topk_attention(q, k, v, idx, scale=0.3, backend="torch")
    _check_against_dense(ours, theirs, q, keys, values, rows, lengths, torch.float64)


def test_target_attention_indexed_backward_in_slot_chunks(backend, monkeypatch):
    """Dense attention over a long indexed history runs its backward in chunks of slots."""
    from fastattn.ops import attention
    monkeypatch.setattr(attention, "_SLOT_CHUNK_ELEMS", 50)    # several chunks of 7 slots
    q, keys, values, _, _, rows, lengths, hist, _ = _attn_inputs(ATTN_CASES[5], torch.float64)

    def ours(q, k, v):
        return fastattn.target_attention(q, k, v, lengths=lengths, hist_rows=rows,
                                         backend=backend)

    def theirs(q, k, v):
        return fastattn.target_attention(q, k, v, lengths=lengths)
    _check_against_dense(ours, theirs, q, keys, values, rows, lengths, torch.float64)


def test_gradcheck_indexed(backend):
    q, keys, values, qs, ks, rows, lengths, _, _ = _attn_inputs(
        (3, 3, 9, 5, 2, 3, 2, 4, [9, 4, 0], None), torch.float64)
    idx = torch.tensor([[0, 8, -1], [3, 1, 1], [-1, -1, -1]])
    fns = {
        "eta": lambda q, k, v: fastattn.eta_attention(q, k, v, qs, ks, 4, lengths=lengths,
                                                      hist_rows=rows, backend=backend),
        "target": lambda q, k, v: fastattn.target_attention(q, k, v, lengths=lengths,
                                                            hist_rows=rows, backend=backend),
        "topk": lambda q, k, v: fastattn.topk_attention(q, k, v, idx, hist_rows=rows,
                                                        backend=backend),
        "gather": lambda q, k, v: fastattn.topk_gather(v.flatten(1), idx, hist_rows=rows,
                                                       backend=backend),
    }
    # On CUDA the table gradient is summed with atomics: two backwards may differ in the
    # last bit, which gradcheck's reentrancy test would otherwise call a failure.
    tol = 1e-12 if device_of(backend) == "cuda" else 0.0
    for name, f in fns.items():
        assert torch.autograd.gradcheck(f, leaves(q, keys, values), fast_mode=True,
                                        nondet_tol=tol), name


def test_cpu_backward_is_deterministic(cpu_kernel_backend):
    """Table gradients do not depend on the thread count (no atomics on CPU; the Triton
    scatter uses atomics, DESIGN §7)."""
    kernel_backend = cpu_kernel_backend
    q, keys, values, qs, ks, rows, lengths, _, _ = _attn_inputs(ATTN_CASES[5], torch.float32)
    rows = make_rows(2, 130, 4, lengths)        # 4 table rows: every row hit many times
    keys, values, ks = keys[:4], values[:4], ks[:4]
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            lq, lk, lv = leaves(q, keys, values)
            fastattn.eta_attention(lq, lk, lv, qs, ks, 64, lengths=lengths, hist_rows=rows,
                                   backend=kernel_backend).square().sum().backward()
            grads.append((lk.grad, lv.grad))
    finally:
        torch.set_num_threads(threads)
    for gk, gv in grads[1:]:
        assert torch.equal(gk, grads[0][0]) and torch.equal(gv, grads[0][1])


# --------------------------------------------------------------------------- torch.library

def test_opcheck_indexed(backend):
    q, keys, values, qs, ks, rows, lengths, hist, _ = _attn_inputs(ATTN_CASES[2],
                                                                   torch.float64)
    q3, k3, v3 = (t.requires_grad_() for t in (q, keys, values))
    # hist_index (2, 0, 1, 1, 2, 0) over lengths (19, 5, 0): history 2 is empty
    idx = torch.tensor([[-1, -1, -1], [0, 18, 3], [2, 2, 1], [3, 4, 0], [-1, -1, -1], [18, 0, 1]])
    ops = torch.ops.fastattn
    torch.library.opcheck(ops.hamming_topk.default,
                          (qs, ks, 5, lengths, hist, rows, backend))
    torch.library.opcheck(ops.topk_gather.default,
                          (v3.flatten(1), idx, hist, rows, backend))
    torch.library.opcheck(ops.topk_gather_backward.default,
                          (torch.randn(6, 3, 6, dtype=torch.float64), idx, hist, rows,
                           [keys.shape[0]], backend))
    torch.library.opcheck(ops.topk_attention.default,
                          (q3, k3, v3, idx, hist, rows, 0.5, backend))
    out, lse = ops.topk_attention(q3, k3, v3, idx, hist, rows, 0.5, backend)
    torch.library.opcheck(ops.topk_attention_backward.default,
                          (torch.randn_like(out), q.detach(), keys.detach(), values.detach(),
                           idx, hist, rows, out.detach(), lse.detach(), 0.5, backend))


def test_compile_fullgraph_indexed(backend):
    q, keys, values, qs, ks, rows, lengths, _, topk = _attn_inputs(ATTN_CASES[1],
                                                                   torch.float32)
    values.requires_grad_()

    def f(q, keys, values):
        eta = fastattn.eta_attention(q, keys, values, qs, ks, topk, lengths=lengths,
                                     hist_rows=rows, backend=backend)
        dense_attn = fastattn.target_attention(q, keys, values, lengths=lengths,
                                               hist_rows=rows, backend=backend)
        return (eta.square() + dense_attn).sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, keys, values), f(q, keys, values)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, values)[0],
                               torch.autograd.grad(want, values)[0])


def test_compile_fullgraph_retrieve_then_gather(backend):
    """The training composition of the eta_training sweep: signatures of the distinct rows
    read from the table (simhash_sign(rows=)), the top-k over hist_rows, the winners looked
    up and attended; one graph, same output and table gradient as eager."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (3, 25), generator=g)
    table = torch.randn(40, 16, generator=g, requires_grad=True)
    q = torch.randn(3, 16, generator=g)
    planes = fastattn.make_planes(16, 100, g)
    uniq, rows = fastattn.unique_rows(ids, backend=backend)
    slot = torch.arange(4).expand(3, 4)

    def f(table):
        k_sig = fastattn.simhash_sign(table, planes, rows=uniq, backend=backend)
        q_sig = fastattn.simhash_sign(q, planes, backend=backend)
        _, idx = fastattn.hamming_topk(q_sig, k_sig, 4, hist_rows=rows, backend=backend)
        keys = table[ids.gather(1, idx.clamp(min=0))]
        return fastattn.topk_attention(q, keys, keys, slot.masked_fill(idx < 0, -1),
                                       backend=backend).square().sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(table), f(table)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, table)[0],
                               torch.autograd.grad(want, table)[0])


# --------------------------------------------------------------------------- bad input

def test_bad_rows_raise(backend):
    if not checks_values_on_host(backend):
        pytest.skip("bad rows are a device-side assert on CUDA (test_gpu_readiness)")
    q, keys, values, qs, ks, rows, lengths, hist, topk = _attn_inputs(ATTN_CASES[1],
                                                                      torch.float32)
    N = keys.shape[0]
    bad = rows.clone()
    bad[0, 5] = N                                      # out of the table, inside lengths
    with pytest.raises(ValueError, match=r"hist_rows\[0, 5\] = 50 is outside"):
        fastattn.hamming_topk(qs, ks, 3, lengths=lengths, hist_rows=bad, backend=backend)
    with pytest.raises(ValueError, match=r"hist_rows\[0, 5\]"):
        fastattn.eta_attention(q, keys, values, qs, ks, 64, lengths=lengths, hist_rows=bad,
                               backend=backend)
    pad = rows.clone()
    pad[3, 2] = -1                                     # -1 inside lengths[3] = 12
    with pytest.raises(ValueError, match=r"hist_rows\[3, 2\] = -1 is outside"):
        fastattn.hamming_topk(qs, ks, 3, lengths=lengths, hist_rows=pad, backend=backend)
    sel = torch.tensor([[0], [-1], [0], [2]])          # selects (3, 2), which is -1
    with pytest.raises(ValueError, match=r"hist_rows\[3, 2\] = -1, selected by idx\[3, 0\]"):
        fastattn.topk_attention(q, keys, values, sel, hist_rows=pad, backend=backend)
    with pytest.raises(ValueError, match=r"selected by idx"):
        fastattn.topk_gather(values.flatten(1), sel, hist_rows=pad, backend=backend)
    with pytest.raises(ValueError, match=r"hist_rows\[3, 2\]"):
        fastattn.target_attention(q, keys, values, lengths=lengths, hist_rows=pad,
                                  backend=backend)


def test_bad_shapes_raise():
    q, keys, values, qs, ks, rows, lengths, hist, topk = _attn_inputs(ATTN_CASES[1],
                                                                      torch.float32)
    with pytest.raises(TypeError, match="hist_rows must have dtype int32, int64"):
        fastattn.hamming_topk(qs, ks, 3, hist_rows=rows.float())
    with pytest.raises(ValueError, match="hist_rows must have 2 dims"):
        fastattn.topk_gather(values.flatten(1), torch.zeros(4, 1, dtype=torch.int64),
                             hist_rows=rows[0])
    with pytest.raises(ValueError, match=r"k_sig must have 2 dims.*signature table"):
        fastattn.hamming_topk(qs, dense(ks, rows), 3, hist_rows=rows)
    with pytest.raises(ValueError, match="keys must have 3 dims.*a table, as hist_rows"):
        fastattn.eta_attention(q, dense(keys, rows), values, qs, ks, 3, hist_rows=rows)
    with pytest.raises(ValueError, match=r"k_sig \(N, W\) like the keys table"):
        fastattn.eta_attention(q, keys, values, qs, ks[:7], 3, hist_rows=rows)
    with pytest.raises(ValueError, match="values must be a table"):
        fastattn.topk_gather(values, torch.zeros(4, 1, dtype=torch.int64), hist_rows=rows)
    with pytest.raises(ValueError, match="lengths must have shape"):
        fastattn.target_attention(q, keys, values, lengths=torch.tensor([1]), hist_rows=rows)
    with pytest.raises(ValueError, match="number of histories U=4"):
        fastattn.eta_attention(q[:3], keys, values, qs[:3], ks, 3, hist_rows=rows)
    with pytest.raises(ValueError, match="device"):
        fastattn.target_attention(q, keys, values, hist_rows=rows.to("meta"))


# --------------------------------------------------------------------------- unique_rows

def _unique_oracle(ids, lengths):
    """First-occurrence order, written as plainly as possible."""
    U, L = ids.shape
    seen, uniq = {}, []
    rows = torch.full((U, L), -1, dtype=torch.int64)
    for u in range(U):
        for l in range(int(lengths[u]) if lengths is not None else L):
            v = int(ids[u, l])
            if v not in seen:
                seen[v] = len(uniq)
                uniq.append(v)
            rows[u, l] = seen[v]
    return torch.tensor(uniq, dtype=ids.dtype), rows


UNIQUE_CASES = {
    "zipf": lambda g: (torch.randint(0, 50, (7, 33), generator=g) ** 2,
                       torch.tensor([33, 0, 5, 33, 1, 20, 2])),
    "all_padding": lambda g: (torch.randint(0, 9, (3, 4), generator=g), torch.zeros(3)),
    "empty": lambda g: (torch.zeros(0, 5, dtype=torch.int64), None),
    "no_length": lambda g: (torch.zeros(4, 0, dtype=torch.int64), None),
    "one_id": lambda g: (torch.full((5, 6), 42), None),
    "extremes": lambda g: (torch.tensor([[2**63 - 1, -2**63, 0, -1], [-1, 0, -2**63, 7]]),
                           torch.tensor([4, 3])),
    "int32": lambda g: (torch.randint(-5, 5, (6, 9), generator=g, dtype=torch.int32),
                        torch.tensor([9, 3, 0, 9, 1, 2], dtype=torch.int32)),
    "large": lambda g: (torch.randint(0, 3000, (64, 300), generator=g),
                        torch.randint(0, 301, (64,), generator=g)),
}


@pytest.mark.parametrize("case", list(UNIQUE_CASES))
def test_unique_rows(backend, case):
    ids, lengths = UNIQUE_CASES[case](torch.Generator(torch.get_default_device()).manual_seed(3))
    if lengths is not None:
        lengths = lengths.to(torch.int64) if lengths.dtype.is_floating_point else lengths
    uniq, rows = fastattn.unique_rows(ids, lengths, backend=backend)
    want_uniq, want_rows = _unique_oracle(ids, lengths)
    assert uniq.dtype == ids.dtype and rows.dtype == torch.int64
    assert torch.equal(uniq, want_uniq) and torch.equal(rows, want_rows)
    ref_uniq, ref_rows = ref.unique_rows(ids, lengths)
    assert torch.equal(ref_uniq, want_uniq) and torch.equal(ref_rows, want_rows)


def test_unique_rows_feed_the_ops(backend):
    """unique_rows + a table of the distinct ids = the dense histories, op for op."""
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    ids = torch.randint(1, 30, (4, 25), generator=g)
    lengths = torch.tensor([25, 3, 0, 17])
    emb = torch.randn(31, 6, dtype=torch.float64)
    uniq, rows = fastattn.unique_rows(ids, lengths, backend=backend)
    q = torch.randn(4, 6, dtype=torch.float64)
    got = fastattn.target_attention(q, emb[uniq], emb[uniq], lengths=lengths, hist_rows=rows,
                                    backend=backend)
    want = fastattn.target_attention(q, emb[ids], emb[ids], lengths=lengths)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_unique_rows_opcheck_and_compile(backend):
    ids = torch.randint(0, 20, (5, 8))
    lengths = torch.tensor([8, 0, 3, 8, 1])
    torch.library.opcheck(torch.ops.fastattn.unique_rows.default, (ids, lengths, backend))

    def f(ids, lengths, emb):
        uniq, rows = fastattn.unique_rows(ids, lengths, backend=backend)
        table = emb[uniq]
        return fastattn.topk_gather(table, torch.zeros(5, 1, dtype=torch.int64),
                                    hist_rows=rows.clamp(min=0), backend=backend)
    emb = torch.randn(20, 3)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(ids, lengths.clamp(min=1),
                                                                emb)
    torch.testing.assert_close(got, f(ids, lengths.clamp(min=1), emb))


def test_unique_rows_concurrent_calls_cpp(cpp_backend):
    """The C++ kernel keeps its step-1 scratch between calls; calls running at once (the GIL
    is released) must not share it: each equals the reference."""
    from concurrent.futures import ThreadPoolExecutor
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randint(0, 50 + 40 * i, (7 + i, 3000), generator=g),
              torch.randint(0, 3001, (7 + i,), generator=g)) for i in range(6)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: fastattn.unique_rows(*c, backend="cpp"), cases * 3))
    for (ids, lengths), (uniq, rows) in zip(cases * 3, got):
        want = ref.unique_rows(ids, lengths)
        assert torch.equal(uniq, want[0]) and torch.equal(rows, want[1])


def test_unique_rows_bad_input():
    with pytest.raises(TypeError, match="ids must have dtype int32, int64"):
        fastattn.unique_rows(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ids must have 2 dims"):
        fastattn.unique_rows(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="lengths must lie in"):
        fastattn.unique_rows(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        fastattn.unique_rows(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([1]))


@pytest.mark.parametrize("indexed", [False, True])
def test_keys_passed_as_values(backend, indexed):
    """One tensor as keys and values (raw behaviour embeddings) takes one gradient buffer
    (the custom op gets values=None): same output and gradient as two equal tensors."""
    q, keys, _, qs, ks, rows, lengths, _, topk = _attn_inputs(ATTN_CASES[1], torch.float64)
    if not indexed:
        keys, ks, rows = dense(keys, rows, lengths), dense(ks, rows, lengths), None
    calls = {
        "eta": lambda q, k, v: fastattn.eta_attention(q, k, v, qs, ks, topk, lengths=lengths,
                                                      hist_rows=rows, backend=backend),
        "target": lambda q, k, v: fastattn.target_attention(q, k, v, lengths=lengths,
                                                            hist_rows=rows, backend=backend),
    }
    for name, f in calls.items():
        lq, lk = leaves(q, keys)
        f(lq, lk, lk).square().sum().backward()
        tq, tk, tv = leaves(q, keys, keys)
        f(tq, tk, tv).square().sum().backward()
        torch.testing.assert_close(lq.grad, tq.grad, **TOL[torch.float64], msg=name)
        torch.testing.assert_close(lk.grad, tk.grad + tv.grad, **TOL[torch.float64], msg=name)
    idx = torch.tensor([[0, 2, -1], [-1, -1, -1], [0, 0, -1], [11, 3, 3]])
    torch.library.opcheck(torch.ops.fastattn.topk_attention.default,
                          (q.requires_grad_(), keys.requires_grad_(), None, idx, None, rows,
                           0.5, backend))
