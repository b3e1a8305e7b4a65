import pytest
import torch

import fastattn
from fastattn import reference as ref
from fastattn.nn import MIMNEncoder

from helpers import TOL


def _encoder(x_dim=3, mem_dim=4, slots=5, ctrl=6, miu=3, mur=True, miu_k=2,
             dtype=torch.float64, seed=0, backend=None):
    torch.manual_seed(seed)
    enc = MIMNEncoder(x_dim, mem_dim, slots, ctrl, miu, mur=mur, miu_k=miu_k, backend=backend)
    return enc.to(dtype)


def _run(enc, x, lengths, state=None):
    reads, st = enc(x, lengths, state)
    loss = (reads.square().sum() + st.M.sum() + st.S.square().sum() + st.h.sum() + st.r.sum()
            + 3 * enc.reg_loss(st))
    params = [p for p in enc.parameters()]
    grads = torch.autograd.grad(loss, [x] + params, allow_unused=True)
    return reads, st, grads


CONFIGS = [  # mur, miu_k, lengths, T
    (True, 1, [7, 3, 0], 7),
    (False, 2, None, 5),
    (True, 0, [1, 4, 4], 4),
    (True, 5, [4, 4, 2], 4),      # every channel updated
    (False, 0, [0, 0, 0], 3),     # all padding
    (True, 1, None, 0),           # empty sequences
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scan_matches_reference(backend, config, dtype):
    mur, miu_k, lengths, T = config
    enc = _encoder(mur=mur, miu_k=miu_k, dtype=dtype, backend=backend)
    oracle = _encoder(mur=mur, miu_k=miu_k, dtype=dtype, backend="torch")
    x = torch.randn(3, T, 3, dtype=dtype, requires_grad=True)
    lengths = None if lengths is None else torch.tensor(lengths)
    got = _run(enc, x, lengths)
    want = _run(oracle, x, lengths)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0], want[0], **tol)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(got[2], want[2]):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b, **tol)


def test_state0_gradients_and_continuation(backend):
    """Scanning two halves with the state carried over equals one scan; state0 gets grads."""
    enc = _encoder(backend=backend)
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    full, st_full = enc(x)
    r1, st1 = enc(x[:, :3])
    r2, st2 = enc(x[:, 3:], state=st1)
    torch.testing.assert_close(torch.cat([r1, r2], 1), full)
    for a, b in zip(st2, st_full):
        torch.testing.assert_close(a, b)
    state0 = ref.MIMNState(*(t.detach().clone().requires_grad_() for t in st1))
    _, st = enc(x[:, 3:], state=state0)
    st.M.sum().backward()
    oracle = _encoder(backend="torch")
    state0_ref = ref.MIMNState(*(t.detach().clone().requires_grad_() for t in st1))
    _, st_ref = oracle(x[:, 3:], state=state0_ref)
    st_ref.M.sum().backward()
    for a, b in zip(state0, state0_ref):      # S does not feed M: None (autograd) or zeros
        torch.testing.assert_close(a.grad if a.grad is not None else torch.zeros_like(a),
                                   b.grad if b.grad is not None else torch.zeros_like(b))


def test_streaming_step_equals_scan(backend):
    enc = _encoder(dtype=torch.float32, backend=backend)
    x = torch.randn(4, 12, 3)
    with torch.no_grad():
        reads, st = enc(x)
        state = None
        for t in range(12):
            r, state = enc.step(x[:, t], state)
            assert (r - reads[:, t]).abs().max() <= 1e-5
    for a, b in zip(state, st):
        assert (a - b).abs().max() <= 1e-5


def test_final_state_only_gradients(kernel_backend):
    """A loss on the final state alone (the MIMN model's): no reads gradient reaches the
    backward op (the C++ kernel then skips it); gradients equal the reference's."""
    enc = _encoder(backend=kernel_backend)
    oracle = _encoder(backend="torch")
    x = torch.randn(3, 6, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 2, 0])
    grads = []
    for e in (enc, oracle):
        _, st = e(x, lengths)
        loss = st.M.sum() + st.S.square().sum() + st.h.sum() + 3 * e.reg_loss(st)
        grads.append(torch.autograd.grad(loss, [x] + list(e.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_subnormal_mur_softmax_matches_reference(cpu_kernel_backend):
    """Long fp32 histories with a sharp MUR: the usage g grows with t, so the MUR softmax
    underflows into subnormals (the C++ kernels flush them to zero, DESIGN §6). Against the
    fp64 reference, the kernel's values and gradients are as close as the fp32 reference's
    own (300 steps of this recurrence are ill-conditioned in fp32: both are ~10% off in the
    gradients)."""
    dims = dict(x_dim=4, mem_dim=4, slots=4, ctrl=4, miu=4, miu_k=1)
    enc = _encoder(**dims, dtype=torch.float32, backend=cpu_kernel_backend)
    with torch.no_grad():
        enc.mur.weight.mul_(10)
    ref32 = _encoder(**dims, dtype=torch.float32, backend="torch")
    ref32.load_state_dict(enc.state_dict())
    ref64 = _encoder(**dims, backend="torch")
    ref64.load_state_dict({k: v.double() for k, v in enc.state_dict().items()})
    x = torch.randn(2, 300, 4)
    lengths = torch.tensor([300, 250])
    got = _run(enc, x.clone().requires_grad_(), lengths)
    base = _run(ref32, x.clone().requires_grad_(), lengths)
    want = _run(ref64, x.double().requires_grad_(), lengths)
    logits = want[1].g @ ref64.mur.weight.T + ref64.mur.bias
    assert (logits.max(-1).values - logits.min(-1).values).min() > 104   # exp < FLT_MIN
    flat = lambda r: [r[0], *r[1], *r[2]]                               # noqa: E731
    for a, b, w in zip(flat(got), flat(base), flat(want)):
        err, err32 = (a.double() - w).abs().max(), (b.double() - w).abs().max()
        assert err <= 2 * err32 + 1e-4 * (1 + w.abs().max()), (err, err32)


def test_gradcheck_scan(backend):
    enc = _encoder(x_dim=2, mem_dim=2, slots=3, ctrl=3, miu=2, miu_k=1, backend=backend)
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    p = enc.params()
    lengths = torch.tensor([3, 1])

    # x and the parameters of every stage as one flat input, and the outputs as one flat
    # output: fast mode then costs two scans and a backward or two, not two scans per
    # input and backwards per output (a scan is seconds in the Triton interpreter); it
    # checks vᵀJu in one random direction over all of them
    parts = (x, p.ctrl_w_ih, p.heads_w, p.mem0, p.mur_w, p.miu_w_ih)
    flat = torch.cat([t.detach().reshape(-1) for t in parts]).requires_grad_()

    def f(flat):
        x, ctrl_w_ih, heads_w, mem0, mur_w, miu_w_ih = (
            v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in parts]), parts))
        q = p._replace(ctrl_w_ih=ctrl_w_ih, heads_w=heads_w, mem0=mem0, mur_w=mur_w,
                       miu_w_ih=miu_w_ih)
        reads, st = fastattn.mimn_scan(x, lengths, q, backend=backend)
        return torch.cat([t.reshape(-1) for t in (reads, st.M, st.g, st.S)])
    assert torch.autograd.gradcheck(f, (flat,), fast_mode=True)


def test_gradcheck_step_ops(backend):
    B, m, D, Dx, Hs = 2, 4, 3, 2, 2
    dd = dict(dtype=torch.float64)
    M = torch.randn(B, m, D, **dd, requires_grad=True)
    g = torch.rand(B, m, **dd, requires_grad=True)
    head = torch.randn(B, 4 * D + 2, **dd, requires_grad=True)
    mw = torch.randn(m, m, **dd, requires_grad=True)
    mb = torch.randn(m, **dd, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: fastattn.ntm_read_write(*a, backend=backend), (M, g, head, mw, mb),
        fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda *a: fastattn.ntm_read_write(*a, backend=backend), (M, g, head), fast_mode=True)
    x = torch.randn(B, Dx, **dd, requires_grad=True)
    S = torch.randn(B, m, Hs, **dd, requires_grad=True)
    wr = torch.softmax(torch.randn(B, m, **dd), -1)
    w_ih = torch.randn(3 * Hs, D + Dx, **dd, requires_grad=True)
    w_hh = torch.randn(3 * Hs, Hs, **dd, requires_grad=True)
    b_ih = torch.randn(3 * Hs, **dd, requires_grad=True)
    b_hh = torch.randn(3 * Hs, **dd, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda M, x, S, *w: fastattn.miu_gather_gru(M, x, S, wr, 2, *w, backend=backend),
        (M, x, S, w_ih, w_hh, b_ih, b_hh), fast_mode=True)


def test_step_ops_match_reference(backend):
    B, m, D = 3, 5, 4
    M = torch.randn(B, m, D, dtype=torch.float64)
    M[0, 2] = 0                                   # a zero memory row: cosine eps
    g = torch.rand(B, m, dtype=torch.float64)
    head = torch.randn(B, 4 * D + 2, dtype=torch.float64)
    head[1, :D] = -50                             # saturated key
    head[2, D] = 80                               # large beta (softplus in its linear range)
    mw, mb = torch.randn(m, m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    for args in ((M, g, head, mw, mb), (M, g, head)):
        got = fastattn.ntm_read_write(*args, backend=backend)
        want = ref.ntm_read_write(*args)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
    x, S = torch.randn(B, 2, dtype=torch.float64), torch.randn(B, m, 3, dtype=torch.float64)
    wr = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.1]] * B, dtype=torch.float64)  # tie: index 1 wins
    w = [torch.randn(9, D + 2, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64),
         torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)]
    for k in (0, 1, 2, m):
        got = fastattn.miu_gather_gru(M, x, S, wr, k, *w, backend=backend)
        torch.testing.assert_close(got, ref.miu_gather_gru(M, x, S, wr, k, *w),
                                   **TOL[torch.float64])
    assert torch.equal(fastattn.miu_gather_gru(M, x, S, wr, 1, *w, backend=backend)[:, 2],
                       S[:, 2])


def test_opcheck(kernel_backend):
    backend = kernel_backend
    enc = _encoder(backend=backend)
    p = enc.params()
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    st = enc.initial_state(2)
    st = [t.detach().clone().contiguous().requires_grad_() for t in st]
    lens = torch.tensor([4, 2])
    torch.library.opcheck(torch.ops.fastattn.mimn_scan.default,
                          (x, lens, *fastattn.ops.mimn.kernel_params(p),
                           p.miu_k, *st, 2, backend))
    if backend == "cpp":
        # with the stored tapes (cpp only: elsewhere save_tapes gives the empty tensor, the
        # check above; their entries at padded steps are unspecified, so every step valid)
        torch.library.opcheck(torch.ops.fastattn.mimn_scan.default,
                              (x, torch.tensor([4, 4]), *fastattn.ops.mimn.kernel_params(p),
                               p.miu_k, *st, 3, backend, True))
    M = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    g = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    head = torch.randn(2, 18, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fastattn.ntm_read_write.default,
                          (M, g, head, p.mur_w, p.mur_b, backend))
    S = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fastattn.miu_gather_gru.default,
                          (M, x[:, 0], S, torch.rand(2, 5, dtype=torch.float64), 2,
                           p.miu_w_ih, p.miu_w_hh, p.miu_b_ih, p.miu_b_hh, backend))


def test_compile_module_forward(backend):
    enc = _encoder(dtype=torch.float32, backend=backend)
    x = torch.randn(3, 6, 3)
    lengths = torch.tensor([6, 2, 0])

    def f(x):
        reads, st = enc(x, lengths)
        return reads.sum() + enc.reg_loss(st)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, f(x))


def test_compile_backward_with_stored_tapes(cpp_backend):
    """torch.compile(fullgraph) of a training step on the cpp scan, whose forward keeps its
    tapes (the op's twelfth output, saved for the backward by AOT autograd): the same loss
    and gradients as eager."""
    enc = _encoder(dtype=torch.float32, backend="cpp")
    x = torch.randn(3, 6, 3)
    lengths = torch.tensor([6, 2, 0])

    def f(x):
        reads, st = fastattn.mimn_scan(x, lengths, enc.params(), backend="cpp",
                                       save_tapes=True)
        return reads.sum() + st.M.square().sum() + enc.reg_loss(st)
    out = {}
    for name, fn in (("eager", f), ("compiled", torch.compile(f, fullgraph=True,
                                                              backend="aot_eager"))):
        xg = x.clone().requires_grad_()
        loss = fn(xg)
        out[name] = [loss, *torch.autograd.grad(loss, [xg] + list(enc.parameters()))]
    for a, b in zip(out["compiled"], out["eager"]):
        torch.testing.assert_close(a, b)


def test_long_sequence_stays_finite():
    """T = 10,000 fp32 steps: the memory write is a convex mix, nothing may blow up."""
    enc = _encoder(x_dim=8, mem_dim=8, slots=4, ctrl=8, miu=8, dtype=torch.float32,
                   backend=fastattn.backends()["cpu"])   # the fastest CPU kernels here
    with torch.no_grad():
        reads, st = enc(torch.randn(2, 10_000, 8) * 3)
    assert all(torch.isfinite(t).all() for t in (reads, *st))


def test_bad_input():
    enc = _encoder(dtype=torch.float32)
    with pytest.raises(ValueError, match="x_dim=3"):
        enc(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=4\]"):
        enc(torch.randn(2, 4, 3), torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        enc(torch.randn(2, 4, 3), torch.tensor([4]))
    with pytest.raises(ValueError, match="miu_k must lie"):
        MIMNEncoder(3, 4, 5, 6, 3, miu_k=6)
    with pytest.raises(ValueError, match="params.miu_k"):
        fastattn.mimn_scan(torch.randn(2, 4, 3), None, enc.params()._replace(miu_k=9))
    other = _encoder(mem_dim=6, dtype=torch.float32)
    _, st = other(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="another configuration"):
        enc(torch.randn(2, 4, 3), state=st)
    with pytest.raises(TypeError, match="x must have dtype"):
        enc(torch.randn(2, 4, 3).long())
    with pytest.raises(ValueError, match="k must be an int"):
        fastattn.miu_gather_gru(torch.randn(2, 5, 4), torch.randn(2, 3), torch.randn(2, 5, 3),
                                torch.rand(2, 5), 6, torch.randn(9, 7), torch.randn(9, 3))
    with pytest.raises(ValueError, match="head"):
        fastattn.ntm_read_write(torch.randn(2, 5, 4), torch.rand(2, 5), torch.randn(2, 17))
