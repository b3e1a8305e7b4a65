"""masked_mean (BAHE's pooling of token states) in every backend against reference.py."""
import pytest
import torch

import fastattn
from fastattn import reference as ref

from helpers import TOL


def _inputs(N, K, D, dtype, p_valid=0.6, generator=None):
    x = torch.randn(N, K, D, dtype=dtype, generator=generator)
    mask = torch.rand(N, K, generator=generator) < p_valid
    if N:
        mask[0] = False                        # an all-masked row (a behaviour without tokens)
        if N > 1:
            mask[1] = True                     # a full row
    return x, mask


CASES = [(7, 5, 3), (1, 1, 1), (13, 16, 33), (0, 4, 5), (5, 0, 3), (4, 3, 0), (129, 9, 17)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("N,K,D", CASES)
def test_forward_backward_matches_reference(backend, dtype, N, K, D):
    x, mask = _inputs(N, K, D, dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fastattn.masked_mean(x1, mask, backend=backend)
    want = ref.masked_mean(x2, mask)
    assert out.dtype == dtype and out.shape == (N, D)
    torch.testing.assert_close(out, want, **TOL[dtype])
    if N:
        assert (out[0] == 0).all()             # all-masked row pools to zeros
    g = torch.randn(N, D, dtype=dtype)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[dtype])
    assert (x1.grad[~mask] == 0).all()


def test_masked_tokens_are_not_read(backend):
    """NaN/inf at masked tokens reach neither the output nor the gradient."""
    x, mask = _inputs(6, 7, 4, torch.float32)
    x[~mask] = float("nan")
    x[:, 0][~mask[:, 0]] = float("inf")
    x.requires_grad_()
    out = fastattn.masked_mean(x, mask, backend=backend)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_mean_values_exact(backend):
    x = torch.arange(12, dtype=torch.float64).reshape(2, 3, 2)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    out = fastattn.masked_mean(x, mask, backend=backend)
    assert out.tolist() == [[2.0, 3.0], [8.0, 9.0]]


def test_gradcheck(backend):
    x, mask = _inputs(5, 4, 3, torch.float64)
    x.requires_grad_()
    f = lambda v: fastattn.masked_mean(v, mask, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_opcheck(backend):
    x, mask = _inputs(6, 5, 3, torch.float64)
    ops = torch.ops.fastattn
    torch.library.opcheck(ops.masked_mean.default, (x.requires_grad_(), mask, backend))
    torch.library.opcheck(ops.masked_mean_backward.default,
                          (torch.randn(6, 3, dtype=torch.float64, requires_grad=True), mask,
                           backend))


def test_compile_fullgraph(backend):
    x, mask = _inputs(9, 6, 5, torch.float32)
    w = torch.randn(5, 5, requires_grad=True)

    def f(x, w):
        return fastattn.masked_mean(torch.tanh(x @ w), mask, backend=backend).square().sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, w), f(x, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w)[0])


def test_cpu_backward_is_deterministic(cpu_kernel_backend):
    x, mask = _inputs(301, 11, 37, torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xl = x.clone().requires_grad_()
            out = fastattn.masked_mean(xl, mask, backend=cpu_kernel_backend)
            out.square().sum().backward()
            results.append((out.detach(), xl.grad))
    finally:
        torch.set_num_threads(threads)
    for out, g in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(g, results[0][1])


def test_bad_input(backend):
    x, mask = _inputs(4, 3, 2, torch.float32)
    with pytest.raises(TypeError, match="x must have dtype"):
        fastattn.masked_mean(x.long(), mask, backend=backend)
    with pytest.raises(TypeError, match="mask must have dtype bool"):
        fastattn.masked_mean(x, mask.to(torch.uint8), backend=backend)
    with pytest.raises(ValueError, match=r"x must have 3 dims"):
        fastattn.masked_mean(x[0], mask, backend=backend)
    with pytest.raises(ValueError, match=r"mask must have shape \(N, K\)=\(4, 3\)"):
        fastattn.masked_mean(x, mask[:, :2], backend=backend)
    with pytest.raises(ValueError, match=r"mask must have shape"):
        fastattn.masked_mean(x, mask[:3], backend=backend)
    # The checks live in the custom op: direct torch.ops calls are checked too.
    with pytest.raises(ValueError, match=r"mask must have shape"):
        torch.ops.fastattn.masked_mean(x, mask[:3], backend)
    with pytest.raises(ValueError, match=r"grad must have 2 dims"):
        torch.ops.fastattn.masked_mean_backward(x, mask, backend)
    with pytest.raises(ValueError, match=r"mask must have shape"):
        torch.ops.fastattn.masked_mean_backward(torch.randn(4, 2), mask[:3], backend)
