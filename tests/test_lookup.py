"""The models' embedding lookups (models/base.py): ``lookup`` and ``lookup_cat`` against
``nn.Embedding``, values and table gradients, in every CPU backend, including the pooled
dense gradients that are reused from step to step."""
import pytest
import torch
from torch import nn

from fastattn.models.base import lookup, lookup_cat, weighted_rows

BACKENDS = ["torch", "numba", "cpp"]


def _tables(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    items = nn.Embedding(50, 4, padding_idx=0).to(dtype)
    cats = nn.Embedding(7, 4, padding_idx=0).to(dtype)
    with torch.no_grad():
        items.weight.copy_(torch.randn(50, 4, generator=g, dtype=dtype))
        cats.weight.copy_(torch.randn(7, 4, generator=g, dtype=dtype))
        items.weight[0] = cats.weight[0] = 0
    ids = torch.stack([torch.randint(0, 50, (3, 5), generator=g),
                       torch.randint(0, 7, (3, 5), generator=g)], -1)
    ids[0, :2] = 0                                         # padding positions
    return items, cats, ids


def _reference(items, cats, ids):
    return torch.cat([items(ids[..., 0]), cats(ids[..., 1])], -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lookup_cat_matches_embeddings(backend):
    """Values and table gradients of lookup_cat equal those of the concatenated
    nn.Embedding lookups, padding rows getting none; lookup likewise for one table."""
    items, cats, ids = _tables()
    got = lookup_cat((items, cats), ids, backend)
    want = _reference(items, cats, ids)
    assert torch.equal(got, want)
    grad = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (items.weight, cats.weight), grad)
    g_want = torch.autograd.grad(want, (items.weight, cats.weight), grad)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    one = lookup(items, ids[..., 0], backend)
    torch.testing.assert_close(torch.autograd.grad(one, items.weight, grad[..., :4])[0],
                               torch.autograd.grad(items(ids[..., 0]), items.weight,
                                                   grad[..., :4])[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["numba", "cpp"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_pooled_gradients_across_steps(backend, set_to_none):
    """The CPU kernels' dense table gradients come from a buffer pool: a buffer is reused
    only once its gradient is dropped, so steps that keep ``.grad`` (accumulating) or drop
    it (``set_to_none``) both give nn.Embedding's gradients, step after step."""
    items, cats, ids = _tables(torch.float32)
    ref_items, ref_cats = (nn.Embedding.from_pretrained(t.weight.detach().clone(),
                                                        freeze=False, padding_idx=0)
                           for t in (items, cats))
    for step in range(4):
        grad = torch.randn(*ids.shape[:-1], 8, generator=torch.Generator().manual_seed(step))
        for mods, f in (((items, cats), lambda m: lookup_cat(m, ids, backend)),
                        ((ref_items, ref_cats), lambda m: _reference(*m, ids))):
            if set_to_none or step == 0:
                for m in mods:
                    m.zero_grad(set_to_none=True)
            f(mods).backward(grad)
        for a, b in ((items, ref_items), (cats, ref_cats)):
            torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-5, atol=1e-5)


def test_lookup_cat_under_compile():
    """With the torch backend (whose backward dynamo can trace) lookup_cat compiles as one
    graph (fullgraph), with the same values and grads. (The CPU kernels' backward calls
    them through numpy, where a compiled model breaks its graph and runs it eagerly.)"""
    items, cats, ids = _tables()

    def f(ids):
        return lookup_cat((items, cats), ids, "torch").square().sum()
    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = g(ids), f(ids)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, items.weight)[0],
                               torch.autograd.grad(want, items.weight)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_rows(backend):
    """weighted_rows equals F.embedding_bag's weighted sum, with gradients in the table and
    the weights (gradcheck in fp64), repeated rows and zero weights included."""
    g = torch.Generator().manual_seed(1)
    table = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    rows = torch.randint(0, 9, (4, 7), generator=g)
    rows[0] = 3                                            # one row, seven times
    weights = torch.rand(4, 7, dtype=torch.float64, generator=g)
    weights[1, :3] = 0
    weights.requires_grad_()
    want = torch.nn.functional.embedding_bag(rows, table, per_sample_weights=weights,
                                             mode="sum")
    torch.testing.assert_close(weighted_rows(table, rows, weights, backend), want)
    assert torch.autograd.gradcheck(lambda t, w: weighted_rows(t, rows, w, backend),
                                    (table, weights))


def test_weighted_rows_in_chunks(cpp_backend):
    """Wide rows: the backward scatters one position column at a time (chunks of
    4M / (B·D) positions), with the same table gradient as embedding_bag's."""
    g = torch.Generator().manual_seed(2)
    table = torch.randn(6, 4096, generator=g, requires_grad=True)
    rows = torch.randint(0, 6, (1024, 3), generator=g)
    weights = torch.rand(1024, 3, generator=g)
    grad = torch.randn(1024, 4096, generator=g)
    got = torch.autograd.grad(weighted_rows(table, rows, weights, "cpp"), table, grad)[0]
    want = torch.autograd.grad(torch.nn.functional.embedding_bag(
        rows, table, per_sample_weights=weights, mode="sum"), table, grad)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lookup_cat_pieces(backend):
    """With ``sizes`` the rows come back as one output per piece, each equal to its own
    lookup; the table gradients are those of the pieces used (a piece without a gradient
    adds nothing), as if each had been looked up on its own."""
    items, cats, ids = _tables()
    flat = ids.reshape(-1, 2)
    sizes = [4, 0, 6, 5]
    pieces = lookup_cat((items, cats), flat, backend, sizes)
    assert [p.shape for p in pieces] == [(n, 8) for n in sizes]
    starts = [0, 4, 4, 10]
    for p, a, n in zip(pieces, starts, sizes):
        assert torch.equal(p, _reference(items, cats, flat[a:a + n]))
    used = pieces[0].square().sum() + (pieces[3] * 2).sum()          # pieces 1, 2 unused
    want = (_reference(items, cats, flat[:4]).square().sum()
            + (_reference(items, cats, flat[10:]) * 2).sum())
    for a, b in zip(torch.autograd.grad(used, (items.weight, cats.weight)),
                    torch.autograd.grad(want, (items.weight, cats.weight))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["numba", "cpp"])
def test_half_tables(backend):
    """bf16 tables: the CPU kernels sum the table gradient in fp32 and hand back bf16, for
    one output and for pieces, and weighted_rows too."""
    items, cats, ids = _tables(torch.float32)
    half = [nn.Embedding.from_pretrained(t.weight.detach().bfloat16(), freeze=False,
                                         padding_idx=0) for t in (items, cats)]
    flat = ids.reshape(-1, 2)
    grad = torch.randn(flat.shape[0], 8)
    for out, sizes in ((lambda: lookup_cat(half, flat, backend), None),
                       (lambda: torch.cat(lookup_cat(half, flat, backend, [5, 10]), 0),
                        [5, 10])):
        got = torch.autograd.grad(out(), [h.weight for h in half], grad.bfloat16())
        want = torch.autograd.grad(_reference(items, cats, flat), (items.weight, cats.weight),
                                   grad.bfloat16().float())
        for a, b in zip(got, want):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)
    rows = torch.randint(0, 50, (3, 6))
    w = torch.rand(3, 6)
    t = half[0].weight
    g = torch.autograd.grad(weighted_rows(t, rows, w.bfloat16(), backend), t,
                            torch.ones(3, 4, dtype=torch.bfloat16))[0]
    want = torch.zeros(50, 4).index_add_(0, rows.reshape(-1),
                                         w.bfloat16().float().reshape(-1, 1).expand(-1, 4))
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_table_gradients(backend):
    """Tables with ``sparse`` set get nn.Embedding(sparse=True)'s gradient: a sparse COO
    tensor of the looked-up rows (padding skipped) that sums to the dense one; for one
    output, for pieces (one without a gradient), with one table sparse and one dense, and
    for lookup."""
    items, cats, ids = _tables()
    flat = ids.reshape(-1, 2)
    grad = torch.randn(flat.shape[0], 8, dtype=torch.float64)
    want = torch.autograd.grad(_reference(items, cats, flat), (items.weight, cats.weight),
                               grad)
    for sparse in ((True, True), (True, False)):
        items.sparse, cats.sparse = sparse
        for pieces in (False, True):
            if pieces:          # piece 1 (rows 4..9) unused: its gradient is None
                p = lookup_cat((items, cats), flat, backend, [4, 6, 5])
                out, g = (p[0], p[2]), (grad[:4], grad[10:])
                w = torch.autograd.grad(
                    (_reference(items, cats, flat[:4]), _reference(items, cats, flat[10:])),
                    (items.weight, cats.weight), g)
            else:
                out, g, w = lookup_cat((items, cats), flat, backend), grad, want
            got = torch.autograd.grad(out, (items.weight, cats.weight), g)
            for a, b, s in zip(got, w, sparse):
                assert a.is_sparse == s
                if s:                                    # no entry for a padding id
                    assert (a.coalesce().indices() > 0).all()
                b = b.to_dense() if b.is_sparse else b       # (the reference is sparse too)
                torch.testing.assert_close(a.to_dense(), b, rtol=1e-12, atol=1e-12)
    items.sparse = True
    got = torch.autograd.grad(lookup(items, flat[:, 0], backend), items.weight,
                              grad[:, :4])[0]
    assert got.is_sparse
    torch.testing.assert_close(got.to_dense(), torch.autograd.grad(
        items(flat[:, 0]), items.weight, grad[:, :4])[0].to_dense(), rtol=1e-12, atol=1e-12)
