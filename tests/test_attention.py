import pytest
import torch

import fastattn
from fastattn import reference as ref

from conftest import checks_values_on_host
from helpers import TOL, random_sigs


def _inputs(B, U, L, H, Dh, Dv, dtype=torch.float64, nbits=10, W=1):
    shape_q = (B, Dh) if H is None else (B, H, Dh)
    hk = () if H is None else (H,)
    q = torch.randn(*shape_q, dtype=dtype)
    keys = torch.randn(U, L, *hk, Dh, dtype=dtype)
    values = torch.randn(U, L, *hk, Dv, dtype=dtype)
    return q, keys, values, random_sigs(B, W, nbits=nbits), random_sigs(U, L, W, nbits=nbits)


def _grads(f, inputs, g):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = f(*leaves)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves]


CASES = [  # B, U, L, H, Dh, Dv, k, lengths, hist_index
    (5, 1, 37, None, 8, 8, 6, [20], None),            # shared history, single head
    (4, 4, 33, 3, 5, 7, 4, [33, 0, 1, 12], None),    # training layout, multi-head, empty row
    (6, 3, 19, 2, 4, 3, 50, [19, 5, 0], [2, 0, 1, 1, 2, 0]),  # k > L, hist_index
    (3, 3, 1, None, 3, 2, 1, None, None),             # L = 1
    (3, 1, 0, 2, 4, 4, 5, None, None),                # L = 0: every query empty
    (2, 2, 130, 1, 17, 9, 64, [130, 100], None),      # odd dims, k = 64
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eta_matches_reference(backend, case, dtype):
    B, U, L, H, Dh, Dv, k, lengths, hist = case
    q, keys, values, qs, ks = _inputs(B, U, L, H, Dh, Dv, dtype)
    lengths = None if lengths is None else torch.tensor(lengths)
    hist = None if hist is None else torch.tensor(hist)
    g = torch.randn(*q.shape[:-1], Dv, dtype=dtype)

    def ours(q, keys, values):
        return fastattn.eta_attention(q, keys, values, qs, ks, k, lengths=lengths,
                                      hist_index=hist, backend=backend)

    def oracle(q, keys, values):
        return ref.eta_attention(q, keys, values, qs, ks, k, lengths, hist)

    out, grads = _grads(ours, (q, keys, values), g)
    want, want_grads = _grads(oracle, (q, keys, values), g)
    torch.testing.assert_close(out, want, **TOL[dtype])
    for got_g, want_g in zip(grads, want_grads):
        torch.testing.assert_close(got_g, want_g, **TOL[dtype])


def test_eta_bf16(backend):
    q, keys, values, qs, ks = _inputs(4, 1, 40, 2, 16, 16, torch.bfloat16)
    out = fastattn.eta_attention(q, keys, values, qs, ks, 8, backend=backend)
    want = ref.eta_attention(q.double(), keys.double(), values.double(), qs, ks, 8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradients_where_they_cancel(backend, dtype):
    """Every valid slot on the one row of its history: the output is that row and the q and
    keys gradients are exactly 0. Each backend accumulates in fp32; in half arithmetic
    g·v_j − g·out stops cancelling."""
    B, U, K = 4, 3, 32
    g = torch.Generator().manual_seed(17)  # a draw the torch backend failed computing in bf16
    q = torch.randn(B, 1, 5, generator=g).to(dtype)
    keys = torch.randn(U, 1, 1, 5, generator=g).to(dtype)
    values = torch.randn(U, 1, 1, 4, generator=g).to(dtype)
    hist = torch.tensor([1, 0, 2, 1])
    idx = torch.randint(-1, 1, (B, K), generator=g)
    idx[:, 0] = 0
    leaves = [t.double().requires_grad_() for t in (q, keys, values)]
    out, _ = ref.topk_attention(*leaves, idx, hist, None)
    want = torch.autograd.grad(out, leaves, torch.ones_like(out))
    got_leaves = [t.clone().requires_grad_() for t in (q, keys, values)]
    got = fastattn.topk_attention(*got_leaves, idx, hist_index=hist, backend=backend)
    torch.testing.assert_close(got.double(), out.detach(), **TOL[dtype])
    for a, b in zip(torch.autograd.grad(got, got_leaves, torch.ones_like(got)), want):
        torch.testing.assert_close(a.double(), b, **TOL[dtype])


def test_only_selected_rows_get_gradient(backend):
    q, keys, values, qs, ks = _inputs(2, 1, 50, None, 4, 4)
    keys.requires_grad_()
    values.requires_grad_()
    _, idx = fastattn.hamming_topk(qs, ks, 5)
    fastattn.eta_attention(q, keys, values, qs, ks, 5, backend=backend).sum().backward()
    picked = torch.zeros(50, dtype=torch.bool)
    picked[idx.flatten()] = True
    assert (keys.grad[0, ~picked] == 0).all() and (values.grad[0, ~picked] == 0).all()
    assert (values.grad[0, picked] != 0).any()


def test_gradcheck(backend):
    q, keys, values, qs, ks = _inputs(3, 3, 9, 2, 3, 2)
    lengths = torch.tensor([9, 4, 0])

    def f(q, keys, values):
        return fastattn.eta_attention(q, keys, values, qs, ks, 4, lengths=lengths,
                                      backend=backend)
    leaves = [t.requires_grad_() for t in (q, keys, values)]
    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


def test_k_equal_l_is_dense_attention(backend):
    """With every position retrieved, ETA is exactly dense target attention."""
    q, keys, values, qs, ks = _inputs(6, 1, 25, 2, 8, 5)
    eta = fastattn.eta_attention(q, keys, values, qs, ks, 25, backend=backend)
    dense = fastattn.target_attention(q, keys, values)
    torch.testing.assert_close(eta, dense, **TOL[torch.float64])


@pytest.mark.parametrize("case", CASES)
def test_target_attention_matches_reference(case):
    B, U, L, H, Dh, Dv, k, lengths, hist = case
    q, keys, values, _, _ = _inputs(B, U, L, H, Dh, Dv)
    lengths = None if lengths is None else torch.tensor(lengths)
    hist = None if hist is None else torch.tensor(hist)
    g = torch.randn(*q.shape[:-1], Dv, dtype=torch.float64)
    out, grads = _grads(lambda *a: fastattn.target_attention(*a, lengths=lengths,
                                                            hist_index=hist),
                        (q, keys, values), g)
    want, want_grads = _grads(lambda *a: ref.target_attention(*a, lengths, hist),
                              (q, keys, values), g)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    assert torch.isfinite(torch.cat([t.flatten() for t in grads])).all()


def test_target_attention_gradcheck():
    q, keys, values, _, _ = _inputs(3, 1, 7, 2, 3, 2)
    leaves = [t.requires_grad_() for t in (q, keys, values)]
    assert torch.autograd.gradcheck(
        lambda *a: fastattn.target_attention(*a, lengths=torch.tensor([5])), leaves)


def test_topk_attention_with_external_idx(backend):
    """topk_attention takes any retrieval (e.g. SIM-hard's category match)."""
    q, keys, values, _, _ = _inputs(3, 1, 12, None, 4, 4)
    idx = torch.tensor([[0, 5, -1], [-1, -1, -1], [11, 3, 3]])
    out = fastattn.topk_attention(q, keys, values, idx, scale=0.7, backend=backend)
    want, _ = ref.topk_attention(q.unsqueeze(1), keys.unsqueeze(2), values.unsqueeze(2), idx,
                                 None, 0.7)
    torch.testing.assert_close(out, want.squeeze(1), **TOL[torch.float64])
    assert (out[1] == 0).all()


def test_topk_attention_direct_eager_call(backend):
    """A plain eager CPU call without grad runs the op's forward directly (no dispatcher,
    as hamming_topk does), with the same output as torch.ops.fastattn.topk_attention, and
    still checks idx and hist_index; with grad it goes through the op (and its backward)."""
    q, keys, values, _, _ = _inputs(4, 2, 12, None, 4, 4)
    idx = torch.tensor([[0, 5, -1], [-1, -1, -1], [11, 3, 3], [2, 2, 7]])
    hist = torch.tensor([1, 0, 1, 0])
    got = fastattn.topk_attention(q, keys, values, idx, hist_index=hist, backend=backend)
    want, _ = torch.ops.fastattn.topk_attention(q.unsqueeze(1), keys.unsqueeze(2),
                                                values.unsqueeze(2), idx, hist, None,
                                                4 ** -0.5, backend)
    assert torch.equal(got, want.squeeze(1))
    if checks_values_on_host(backend):
        with pytest.raises(ValueError, match="idx"):
            fastattn.topk_attention(q, keys, values, idx.masked_fill(idx == 7, 12),
                                    hist_index=hist, backend=backend)
        with pytest.raises(ValueError, match="hist_index"):
            fastattn.topk_attention(q, keys, values, idx, hist_index=hist + 1,
                                    backend=backend)
    qg = q.clone().requires_grad_()
    out = fastattn.topk_attention(qg, keys, values, idx, hist_index=hist, backend=backend)
    out.sum().backward()
    assert qg.grad is not None and qg.grad[1].abs().sum() == 0


@pytest.mark.parametrize("tied", [True, False])
def test_topk_attention_own_rows(backend, tied):
    """Rows gathered per query beforehand (U = B, L = K, idx[b, j] in {j, -1}, as
    ETAAttention's winners): the backward skips the scatter; the keys may be the values."""
    B, K, H, D = 4, 9, 2, 5
    q, keys, values, _, _ = _inputs(B, B, K, H, D, D)
    idx = torch.arange(K).repeat(B, 1)
    idx[0, 3:] = -1
    idx[1] = -1
    idx[2, ::2] = -1
    g = torch.randn(B, H, D, dtype=torch.float64)
    if tied:
        def f(q, kv):
            return fastattn.topk_attention(q, kv, kv, idx, backend=backend)

        def oracle(q, kv):
            return ref.topk_attention(q, kv, kv, idx, None, D ** -0.5)[0]
        inputs = (q, keys)
    else:
        def f(q, k, v):
            return fastattn.topk_attention(q, k, v, idx, backend=backend)

        def oracle(q, k, v):
            return ref.topk_attention(q, k, v, idx, None, D ** -0.5)[0]
        inputs = (q, keys, values)
    out, grads = _grads(f, inputs, g)
    want, want_grads = _grads(oracle, inputs, g)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    assert (grads[1][1] == 0).all() and (grads[1][0, 3:] == 0).all()
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


def test_opcheck(backend):
    q, keys, values, _, _ = _inputs(4, 2, 10, 2, 3, 5)
    for t in (q, keys, values):
        t.requires_grad_()
    idx = torch.tensor([[0, 9, -1], [-1, -1, -1], [4, 4, 1], [2, 3, 5]])
    hist = torch.tensor([1, 0, 0, 1])
    torch.library.opcheck(torch.ops.fastattn.topk_attention.default,
                          (q, keys, values, idx, hist, None, 0.5, backend))
    out, lse = torch.ops.fastattn.topk_attention(q, keys, values, idx, hist, None, 0.5,
                                                 backend)
    torch.library.opcheck(torch.ops.fastattn.topk_attention_backward.default,
                          (torch.randn_like(out), q.detach(), keys.detach(), values.detach(),
                           idx, hist, None, out.detach(), lse.detach(), 0.5, backend))


def test_compile_fullgraph(backend):
    q, keys, values, qs, ks = _inputs(4, 4, 16, 2, 8, 8, torch.float32)
    values.requires_grad_()
    lengths = torch.tensor([16, 3, 0, 9])

    def f(q, keys, values):
        return fastattn.eta_attention(q, keys, values, qs, ks, 5, lengths=lengths,
                                      backend=backend).square().sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, keys, values), f(q, keys, values)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, values)[0],
                               torch.autograd.grad(want, values)[0])


def test_bad_input():
    q, keys, values, qs, ks = _inputs(3, 3, 8, None, 4, 4, torch.float32)
    eta = fastattn.eta_attention
    with pytest.raises(ValueError, match="keys"):
        eta(q, keys[..., :3], values, qs, ks, 2)
    with pytest.raises(ValueError, match="values"):
        eta(q, keys, values[:, :5], qs, ks, 2)
    with pytest.raises(TypeError, match="share one dtype"):
        eta(q, keys, values.double(), qs, ks, 2)
    with pytest.raises(TypeError, match="q_sig"):
        eta(q, keys, values, qs.float(), ks, 2)
    with pytest.raises(ValueError, match="k_sig"):
        eta(q, keys, values, qs, ks[:, :5], 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        eta(q, keys, values, qs, ks, 0)
    with pytest.raises(ValueError, match="lengths must lie"):
        eta(q, keys, values, qs, ks, 2, lengths=torch.tensor([8, 9, 0]))
    with pytest.raises(TypeError, match="scale"):
        eta(q, keys, values, qs, ks, 2, scale="big")
    with pytest.raises(ValueError, match="q must have"):
        eta(q[0], keys, values, qs, ks, 2)
    with pytest.raises(ValueError, match="device"):
        eta(q, keys.to("meta"), values, qs, ks, 2)
    with pytest.raises(ValueError, match="idx must have B=3"):
        fastattn.topk_attention(q, keys, values, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="lengths must have shape"):
        fastattn.target_attention(q, keys, values, lengths=torch.tensor([1]))


@pytest.mark.parametrize("H,D", [(None, 128), (2, 16)])
def test_shared_history_chunks(cpu_kernel_backend, H, D):
    """One shared history over several row chunks (the C++ forward's chunked path: fp32
    D=128 single-head runs its AVX-512 register kernel, multi-head the generic one),
    repeated and empty slots included: equal to the fp64 reference, and the same bits for
    every thread count."""
    torch.manual_seed(3)
    B, L, K = 24, 2600, 40                       # 1,024 rows of D=128 per chunk: 3 chunks
    q, keys, values, _, _ = _inputs(B, 1, L, H, D, D, dtype=torch.float32)
    idx = torch.randint(0, L, (B, K))
    idx[:, -3:] = -1                             # empty slots
    idx[1] = -1                                  # a query with none
    idx[2, :5] = 7                               # one row picked five times
    want, _ = ref.topk_attention(*(t.double() for t in (q.reshape(B, H or 1, D),
                                                         keys.reshape(1, L, H or 1, D),
                                                         values.reshape(1, L, H or 1, D))),
                                 idx, None, D ** -0.5)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(fastattn.topk_attention(q, keys, values, idx,
                                                backend=cpu_kernel_backend))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0].double().reshape(want.shape), want, **TOL[torch.float32])
    assert (outs[0][1] == 0).all()
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_shared_history_kernel_checks_idx():
    """The C++ chunked forward checks idx itself (the direct eta_attention path relies on
    it): out of range raises, never reads outside the history."""
    from conftest import _require
    _require("cpp")
    from fastattn import _C
    q = torch.zeros(3, 1, 16).numpy()
    kv = torch.zeros(1, 10, 1, 16).numpy()
    hist = torch.zeros(3, dtype=torch.int64).numpy()
    out, lse = torch.empty(3, 1, 16).numpy(), torch.empty(3, 1).numpy()
    for bad in (10, -2):
        idx = torch.tensor([[0, 1], [2, bad], [3, -1]]).numpy()
        with pytest.raises((IndexError, ValueError), match="idx"):
            _C.topk_attention_fwd(q, kv, kv, idx, hist, 1.0, out, lse, 2)
