"""torch.library integration: opcheck of every op per backend, and torch.compile."""
import pytest
import torch

import fastattn

from helpers import random_sigs


def _samples():
    x = torch.randn(5, 12)
    planes = torch.randn(12, 70)
    q, k = random_sigs(5, 2, nbits=100), random_sigs(1, 33, 2, nbits=100)
    kb = random_sigs(5, 33, 2, nbits=100)
    lengths = torch.tensor([33, 0, 7, 1, 20])
    values = torch.randn(5, 33, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 32, -1], [5, 5, 1], [-1, -1, -1], [2, 3, 4], [9, 8, 7]])
    return [
        ("simhash_sign", (x, planes, None)),
        ("simhash_sign", (x, planes, torch.tensor([4, 0, 4, 2], dtype=torch.int32))),
        ("hamming_distance", (q.unsqueeze(1), k)),
        ("hamming_topk", (q, k, 4, None, None, None)),
        ("hamming_topk", (q, kb, 40, lengths, None, None)),
        ("hamming_topk", (q, kb, 3, lengths, torch.tensor([4, 4, 0, 1, 2]), None)),
        ("topk_gather", (values, idx, None, None)),
        ("topk_gather", (values, idx, torch.tensor([4, 4, 0, 1, 2]), None)),
    ]


@pytest.mark.parametrize("case", range(len(_samples())))
def test_opcheck(backend, case):
    name, args = _samples()[case]
    op = getattr(torch.ops.fastattn, name).default
    torch.library.opcheck(op, args + (backend,))


def test_opcheck_gather_backward(backend):
    grad = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, -1], [3, 3], [1, 0]])
    torch.library.opcheck(torch.ops.fastattn.topk_gather_backward.default,
                          (grad, idx, None, None, [1, 5], backend))


def test_compile_fullgraph(backend):
    """Retrieval + gather, traced as one graph; same result and gradient as eager."""
    planes = fastattn.make_planes(16, 130,
                                  torch.Generator(torch.get_default_device()).manual_seed(1))

    def retrieve(q, keys, values, lengths):
        qs = fastattn.simhash_sign(q, planes, backend=backend)
        ks = fastattn.simhash_sign(keys, planes, backend=backend)
        d = fastattn.hamming_distance(qs[:, None], ks, backend=backend)
        dist, idx = fastattn.hamming_topk(qs, ks, 5, lengths=lengths, backend=backend)
        rows = fastattn.topk_gather(values, idx, backend=backend)
        return rows.sum(1) * 2 + d.float().mean(), dist

    q, keys = torch.randn(4, 16), torch.randn(4, 21, 16)
    values = torch.randn(4, 21, 3, requires_grad=True)
    lengths = torch.tensor([21, 3, 0, 10])
    compiled = torch.compile(retrieve, fullgraph=True, backend="aot_eager")
    out_c, dist_c = compiled(q, keys, values, lengths)
    out_e, dist_e = retrieve(q, keys, values, lengths)
    torch.testing.assert_close(out_c, out_e)
    assert torch.equal(dist_c, dist_e)
    (g_c,) = torch.autograd.grad(out_c.sum(), values)
    (g_e,) = torch.autograd.grad(out_e.sum(), values)
    torch.testing.assert_close(g_c, g_e)


def test_compile_inductor_default_backend():
    """The default dispatch (no backend argument) under the inductor compiler."""
    q, k = random_sigs(6, 2), random_sigs(1, 50, 2)
    values = torch.randn(1, 50, 8)
    f = lambda q, k, v: fastattn.topk_gather(v, fastattn.hamming_topk(q, k, 3)[1]).relu()  # noqa
    got = torch.compile(f, fullgraph=True)(q, k, values)
    torch.testing.assert_close(got, f(q, k, values))
