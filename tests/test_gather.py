import pytest
import torch

import fastattn
from fastattn import reference as ref

from helpers import TOL


def _idx(B, k, L, lengths=None, generator=None):
    idx = torch.randint(0, max(L, 1), (B, k), generator=generator)
    idx[:, -1] = -1                                   # an empty top-k slot per row
    if L == 0:
        idx[:] = -1
    return idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("U,B,L,Dv,k", [(1, 5, 9, 3, 4), (5, 5, 129, 17, 7), (2, 6, 1, 1, 3),
                                        (3, 4, 0, 5, 2)])
def test_forward_backward_matches_reference(backend, dtype, U, B, L, Dv, k):
    values = torch.randn(U, L, Dv, dtype=dtype)
    idx = _idx(B, k, L)
    hist = None if U in (1, B) else torch.randint(0, U, (B,))
    v1 = values.clone().requires_grad_()
    v2 = values.clone().requires_grad_()
    out = fastattn.topk_gather(v1, idx, hist_index=hist, backend=backend)
    want = ref.topk_gather(v2, idx, hist)
    assert out.dtype == dtype and out.shape == (B, k, Dv)
    torch.testing.assert_close(out, want, **TOL[dtype])
    assert (out[:, -1] == 0).all()
    g = torch.randn(B, k, Dv, dtype=dtype)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(v1.grad, v2.grad, **TOL[dtype])


def test_backward_accumulates_duplicates(backend):
    """The same row picked by several queries (shared history) gets the sum of their grads."""
    values = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[1, 1, -1], [1, 3, 0]])
    fastattn.topk_gather(values, idx, backend=backend).sum().backward()
    assert values.grad[0, :, 0].tolist() == [1.0, 3.0, 0.0, 1.0]


def test_gradcheck(backend):
    values = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 5, -1], [2, 2, 1], [4, -1, -1]])
    hist = torch.tensor([1, 0, 1])
    f = lambda v: fastattn.topk_gather(v, idx, hist_index=hist, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (values,))
    assert torch.autograd.gradgradcheck(f, (values,))


def test_bad_input():
    values = torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match="idx"):
        fastattn.topk_gather(values, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="values"):
        fastattn.topk_gather(values.long(), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"idx must lie in \[-1, L=5\)"):
        fastattn.topk_gather(values, torch.tensor([[0, 5], [1, 1]]))
    with pytest.raises(ValueError, match=r"idx must lie"):
        fastattn.topk_gather(values, torch.tensor([[0, -2], [1, 1]]))
    with pytest.raises(ValueError, match="hist_index must lie"):
        fastattn.topk_gather(values, torch.zeros(2, 2, dtype=torch.int64),
                             hist_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="values"):
        fastattn.topk_gather(values[0], torch.zeros(2, 2, dtype=torch.int64))
