"""gru_scan (DESIGN.md §4): every backend against the reference and torch.nn.GRU."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastattn
from fastattn import reference as ref

from conftest import checks_values_on_host
from helpers import TOL


def _params(I, H, dtype, h0_rows=None):
    torch.manual_seed(1)
    s = H ** -0.5 if H else 1.0
    w = [(torch.rand(*shape, dtype=dtype) * 2 - 1) * s
         for shape in ((3 * H, I), (3 * H, H), (3 * H,), (3 * H,))]
    h0 = None if h0_rows is None else torch.randn(h0_rows, H, dtype=dtype)
    return [t.requires_grad_() for t in w], (None if h0 is None else h0.requires_grad_())


def _loss_grads(fn, x, lengths, w, h0):
    out = fn(x, lengths, *w, h0)
    torch.manual_seed(2)
    inputs = [x, *w] + ([] if h0 is None else [h0])
    # (the 0 * sum keeps the graph alive where out is empty: T = 0 or B = 0)
    loss = ((out * torch.randn_like(out)).sum() + out.square().sum()
            + sum(0 * t.sum() for t in inputs))
    return out, torch.autograd.grad(loss, inputs)


CONFIGS = [  # B, T, I, H, lengths, h0
    (3, 7, 5, 6, [7, 3, 0], True),       # odd sizes, full / partial / empty rows
    (4, 5, 3, 33, None, False),          # H past a power of two, no lengths
    (2, 1, 1, 1, [1, 0], True),
    (5, 9, 17, 8, [0, 0, 0, 0, 0], True),  # all padding
    (3, 0, 4, 5, [0, 0, 0], True),         # empty sequences
    (0, 4, 3, 5, [], True),                # empty batch
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(backend, config, dtype):
    B, T, I, H, lengths, with_h0 = config
    w, h0 = _params(I, H, dtype, B if with_h0 else None)
    x = torch.randn(B, T, I, dtype=dtype, requires_grad=True)
    lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)

    def kernel(*a):
        return fastattn.gru_scan(*a, backend=backend)
    got, got_g = _loss_grads(kernel, x, lengths, w, h0)
    want, want_g = _loss_grads(ref.gru_scan, x, lengths, w, h0)
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, **tol)
    if lengths is not None and T:
        pad = torch.arange(T)[None, :] >= lengths[:, None]
        assert not got[pad].any()     # exact zeros past each length


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_torch_gru_packed(backend, dtype):
    """torch.nn.GRU over pack_padded_sequence is the behaviour we replace."""
    B, T, I, H = 5, 11, 7, 9
    lengths = torch.tensor([11, 4, 1, 9, 11])
    gru = torch.nn.GRU(I, H, batch_first=True).to(dtype)
    x = torch.randn(B, T, I, dtype=dtype, requires_grad=True)
    h0 = torch.randn(B, H, dtype=dtype, requires_grad=True)
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    want, _ = pad_packed_sequence(gru(packed, h0[None])[0], batch_first=True, total_length=T)
    w = [gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0]
    got = fastattn.gru_scan(x, lengths, *w, h0, backend=backend)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn_like(want)
    want_g = torch.autograd.grad(want, [x, h0, *w], g)
    got_g = torch.autograd.grad(got, [x, h0, *w], g)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, **tol)


def test_gradcheck(backend):
    B, T, I, H = 3, 5, 3, 4
    w, h0 = _params(I, H, torch.float64, B)
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 0])
    # The Triton interpreter costs ~0.1 s per call: its gradcheck probes random directions
    # (fast_mode) instead of every input element.
    assert torch.autograd.gradcheck(
        lambda x, *a: fastattn.gru_scan(x, lengths, *a, backend=backend), (x, *w, h0),
        fast_mode=backend == "triton")


def test_opcheck(kernel_backend):
    B, T, I, H = 3, 4, 3, 5
    w, h0 = _params(I, H, torch.float64, B)
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 1, 0])
    for h in (h0, None):
        torch.library.opcheck(torch.ops.fastattn.gru_scan.default,
                              (x, lengths, *w, h, kernel_backend))


def test_compile_fullgraph(backend):
    B, T, I, H = 3, 6, 4, 5
    w, h0 = _params(I, H, torch.float32, B)
    lengths = torch.tensor([6, 2, 0])

    def f(x, h0):
        return fastattn.gru_scan(x, lengths, *w, h0, backend=backend).square().sum()
    x = torch.randn(B, T, I, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, h0)
    want = f(x, h0)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, [x, h0, *w]),
                               torch.autograd.grad(want, [x, h0, *w]))


def test_cpu_backward_deterministic(cpu_kernel_backend):
    B, T, I, H = 16, 30, 8, 12
    w, h0 = _params(I, H, torch.float32, B)
    x = torch.randn(B, T, I, requires_grad=True)
    lengths = torch.randint(0, T + 1, (B,))

    def grads():
        out = fastattn.gru_scan(x, lengths, *w, h0, backend=cpu_kernel_backend)
        return torch.autograd.grad(out.sin().sum(), [x, h0, *w])
    first = grads()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))


def test_bad_input(backend):
    B, T, I, H = 2, 4, 3, 5
    w, h0 = _params(I, H, torch.float32, B)
    w = [t.detach() for t in w]
    x = torch.randn(B, T, I)
    op = torch.ops.fastattn.gru_scan

    def call(x=x, lengths=torch.tensor([4, 1]), w=w, h0=h0.detach()):
        return fastattn.gru_scan(x, lengths, *w, h0, backend=backend)
    call()
    host = checks_values_on_host(backend)
    if host:
        with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=4\].*\[-1, 4\]"):
            call(lengths=torch.tensor([4, -1]))
        with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=4\]"):
            call(lengths=torch.tensor([5, 1]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(B,\)=\(2,\)"):
        call(lengths=torch.tensor([4]))
    with pytest.raises(TypeError, match="lengths must have dtype int32, int64"):
        call(lengths=torch.tensor([4.0, 1.0]))
    with pytest.raises(ValueError, match=r"w_ih must have shape \(15, 3\)"):
        call(w=[w[0][:, :2], *w[1:]])
    with pytest.raises(ValueError, match=r"b_hh must have shape \(15,\)"):
        call(w=[*w[:3], w[3][:-1]])
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 5\)"):
        call(h0=torch.zeros(3, H))
    with pytest.raises(ValueError, match=r"x must have 3 dims \(B, T, I\)"):
        call(x=x[0])
    with pytest.raises(TypeError, match="share one dtype"):
        call(x=x.double())
    with pytest.raises(TypeError, match="x must have dtype float32, float64"):
        call(x=x.half())
    if backend != "torch":   # direct op calls are checked by the op itself
        if host:
            with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=4\]"):
                op(x, torch.tensor([9, 1]), *w, None, backend)
        with pytest.raises(ValueError, match=r"w_hh must have shape \(15, 5\)"):
            op(x, torch.tensor([4, 1]), w[0], w[1][:-1], *w[2:], None, backend)


def test_bench_sweep_compares_like_with_like():
    """The gru_scan sweep's contenders compute the same states as its packed baseline."""
    from fastattn.bench.edgerec_sweeps import gru_scan_sweep
    sweep = gru_scan_sweep(True)
    assert sweep.baseline == "nn_gru_packed_fwd" and sweep.cost({"T": 200}, "cpp_fwd").flops
    impls = sweep.points[0].build()
    want = impls["nn_gru_packed_fwd"]()
    for name in ("cpp_fwd", "numba_fwd"):
        torch.testing.assert_close(impls[name](), want, rtol=1e-4, atol=1e-5)


def test_device_side_lengths_check(monkeypatch, cpu_kernel_backend):
    """The CUDA form of the lengths check (torch._assert_async, no host read), forced on
    CPU tensors, where it raises at once."""
    from fastattn.ops import _common
    monkeypatch.setattr(_common, "host_checks", lambda t: False)
    w, _ = _params(3, 5, torch.float32)
    x = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match=r"fastattn: lengths must lie in \[0, T=4\]"):
        fastattn.gru_scan(x, torch.tensor([4, 5]), *w, backend=cpu_kernel_backend)
    out = fastattn.gru_scan(x, torch.tensor([4, 2]), *w, backend=cpu_kernel_backend)
    torch.testing.assert_close(out, ref.gru_scan(x, torch.tensor([4, 2]), *w), **TOL[x.dtype])
