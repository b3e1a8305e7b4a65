import pytest
import torch

import fastattn
from fastattn import reference as ref


def _zone(x, planes):
    """Bits whose projection lies within the rounding zone of DESIGN.md §4 may differ."""
    proj = x.double() @ planes.double()
    bound = 1e-5 * x.double().norm(dim=-1, keepdim=True) * planes.double().norm(dim=0)
    return proj.abs() <= bound


def _bits(sig, nbits):
    shifts = torch.arange(64)
    b = (sig.unsqueeze(-1) >> shifts) & 1
    return b.reshape(*sig.shape[:-1], -1)[..., :nbits].bool()


def _assert_sig_equal(got, want, x, planes):
    nbits = planes.shape[1]
    gb, wb = _bits(got, nbits), _bits(want, nbits)
    diff = gb != wb
    assert not (diff & ~_zone(x, planes).reshape(diff.shape)).any()
    # Bits past NB are always zero.
    if nbits % 64:
        assert ((got[..., -1] >> (nbits % 64)) == 0).all()


@pytest.mark.parametrize("n,d,nbits", [(1, 1, 1), (7, 5, 63), (33, 17, 64), (50, 32, 65),
                                       (129, 64, 200), (16, 128, 256), (9, 3, 320)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, n, d, nbits, dtype):
    x = torch.randn(n, d, dtype=dtype)
    planes = fastattn.make_planes(d, nbits, dtype=dtype)
    got = fastattn.simhash_sign(x, planes, backend=backend)
    want = ref.simhash_sign(x, planes)
    assert got.dtype == torch.int64 and got.shape == (n, (nbits + 63) // 64)
    _assert_sig_equal(got, want, x, planes)


def test_leading_dims_noncontiguous_half(backend):
    x = torch.randn(4, 6, 40)[:, ::2, ::2]          # non-contiguous (4, 3, 20)
    planes = torch.randn(80, 20).t()                # non-contiguous (20, 80)
    got = fastattn.simhash_sign(x, planes, backend=backend)
    assert got.shape == (4, 3, 2)
    _assert_sig_equal(got, ref.simhash_sign(x, planes), x, planes)
    xb = x.to(torch.bfloat16)
    got = fastattn.simhash_sign(xb, planes, backend=backend)
    _assert_sig_equal(got, ref.simhash_sign(xb, planes), xb.float(), planes)


def test_empty_batch(backend):
    planes = torch.randn(8, 100)
    assert fastattn.simhash_sign(torch.randn(0, 8), planes, backend=backend).shape == (0, 2)


def test_nan_rows_sign_to_zero(backend):
    """Documented: a NaN in a row makes all its projections NaN, which compare false."""
    x = torch.randn(5, 16)
    x[2, 3] = float("nan")
    planes = torch.randn(16, 130)
    got = fastattn.simhash_sign(x, planes, backend=backend)
    assert (got[2] == 0).all()
    _assert_sig_equal(got[[0, 1, 3, 4]], ref.simhash_sign(x[[0, 1, 3, 4]], planes),
                      x[[0, 1, 3, 4]], planes)


def test_bit_order():
    """Bit j is word j // 64, bit j % 64, least significant first."""
    planes = torch.zeros(1, 130)
    planes[0, [0, 63, 64, 129]] = 1.0
    sig = fastattn.simhash_sign(torch.ones(1, 1), planes, backend="torch")
    assert sig.tolist() == [[1 | -(2**63), 1, 2]]


def test_make_planes_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(fastattn.make_planes(8, 16, g1), fastattn.make_planes(8, 16, g2))
    with pytest.raises(ValueError, match="nbits"):
        fastattn.make_planes(8, 0)


def test_bad_input():
    x, planes = torch.randn(3, 8), torch.randn(8, 64)
    with pytest.raises(TypeError, match="planes"):
        fastattn.simhash_sign(x, planes.to(torch.int64))
    with pytest.raises(TypeError, match="x"):
        fastattn.simhash_sign(x.to(torch.int32), planes)
    with pytest.raises(ValueError, match="agree on D"):
        fastattn.simhash_sign(torch.randn(3, 9), planes)
    with pytest.raises(ValueError, match="planes"):
        fastattn.simhash_sign(x, planes[0])
    with pytest.raises(ValueError, match="device"):
        fastattn.simhash_sign(x, planes.to("meta"))


@pytest.mark.parametrize("m,n,d,nbits", [(0, 5, 7, 70), (1, 1, 1, 1), (37, 11, 17, 130),
                                         (200, 300, 64, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gathered_rows_equal_the_gathered_table(backend, m, n, d, nbits, dtype):
    """simhash_sign(x, planes, rows=r) is simhash_sign(x[r]) bit for bit, in every backend
    (repeated rows, int32 rows, a NaN row, a non-contiguous table)."""
    g = torch.Generator().manual_seed(m + n)
    x = torch.randn(d, n, dtype=dtype, generator=g).t()             # non-contiguous (n, d)
    x[n // 2, 0] = float("nan")
    planes = fastattn.make_planes(d, nbits, g, dtype=dtype)
    rows = torch.randint(0, n, (m,), generator=g)
    for r in (rows, rows.to(torch.int32)):
        got = fastattn.simhash_sign(x, planes, rows=r, backend=backend)
        assert got.shape == (m, (nbits + 63) // 64)
        assert torch.equal(got, fastattn.simhash_sign(x[rows], planes, backend=backend))


def test_gathered_rows_bad_input(backend):
    x, planes = torch.randn(6, 8), torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"rows\[2\] = 6 is outside the table x \[0, N=6\)"):
        fastattn.simhash_sign(x, planes, rows=torch.tensor([0, 5, 6, -1]), backend=backend)
    with pytest.raises(ValueError, match=r"rows\[1\] = -1"):
        fastattn.simhash_sign(x, planes, rows=torch.tensor([0, -1]), backend=backend)
    with pytest.raises(ValueError, match=r"rows\[0\] = 0 is outside the table x \[0, N=0\)"):
        fastattn.simhash_sign(x[:0], planes, rows=torch.tensor([0]), backend=backend)
    with pytest.raises(TypeError, match="rows"):
        fastattn.simhash_sign(x, planes, rows=torch.tensor([0.0]), backend=backend)
    with pytest.raises(ValueError, match="rows"):
        fastattn.simhash_sign(x, planes, rows=torch.tensor([[0]]), backend=backend)
    with pytest.raises(ValueError, match="table"):
        fastattn.simhash_sign(x.view(2, 3, 8), planes, rows=torch.tensor([0]), backend=backend)
    # checked in the custom op too (a direct torch.ops call, as under torch.compile)
    with pytest.raises(ValueError, match=r"rows\[0\] = 9"):
        torch.ops.fastattn.simhash_sign(x, planes, torch.tensor([9]), backend)
