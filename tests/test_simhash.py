import pytest
import torch

import fastattn
from fastattn import reference as ref

from conftest import checks_values_on_host


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


def test_make_planes_seeded_follow_the_target_device():
    """A seeded CPU generator draws the planes on the host, then moves them: a module built
    under another default device (CUDA for a GPU user; meta stands in here) gets its planes
    there, from the same draw, where drawing on that device would refuse a CPU generator."""
    def planes(**kw):
        return fastattn.make_planes(8, 20, torch.Generator().manual_seed(3), orthogonal=True,
                                    **kw)
    want = planes()
    assert torch.equal(planes(device="cpu"), want)
    with torch.device("meta"):
        on_meta = planes()
        eta = fastattn.nn.ETAAttention(8, hash_bits=20)
    assert on_meta.device.type == "meta" and on_meta.shape == want.shape
    assert planes(device="meta").device.type == "meta"
    assert eta.planes.device.type == "meta"


def test_make_planes_are_exact_bf16():
    for dtype in (torch.float32, torch.float64):
        planes = fastattn.make_planes(40, 70, torch.Generator().manual_seed(1), dtype=dtype)
        assert planes.dtype == dtype and planes.std() > 0.8
        assert torch.equal(planes.to(torch.bfloat16).to(dtype), planes)


def test_make_planes_orthogonal_super_bit():
    """Each group of D consecutive planes is orthogonal (up to the bf16 rounding), every
    column keeps its Gaussian draw's length, and the draw is seeded like the plain one."""
    D, NB = 12, 40                                  # groups of 12, 12, 12, 4 columns
    planes = fastattn.make_planes(D, NB, torch.Generator().manual_seed(5), orthogonal=True)
    plain = fastattn.make_planes(D, NB, torch.Generator().manual_seed(5))
    assert torch.equal(planes.to(torch.bfloat16).float(), planes)
    torch.testing.assert_close(planes.norm(dim=0), plain.norm(dim=0), rtol=2e-2, atol=0)
    unit = planes / planes.norm(dim=0)
    for lo in range(0, NB, D):
        g = unit[:, lo:lo + D]
        torch.testing.assert_close(g.T @ g, torch.eye(g.shape[1]), atol=2e-2, rtol=0)
    assert not torch.allclose((unit.T @ unit)[:D, D:2 * D], torch.zeros(D, D), atol=2e-2)
    assert torch.equal(planes, fastattn.make_planes(D, NB, torch.Generator().manual_seed(5),
                                                    orthogonal=True))
    with pytest.raises(TypeError, match="orthogonal"):
        fastattn.make_planes(D, NB, orthogonal=1)


def _cpp_amx():
    info = fastattn.backends()
    return info["available"]["cpp"] and info["cpu_features"].get("simhash_sign") == "amx_bf16"


@pytest.mark.parametrize("exact_planes", [True, False])
@pytest.mark.parametrize("n,d,nbits", [(97, 128, 256), (70, 37, 130), (33, 1, 5), (40, 300, 64),
                                       (65, 33, 31)])
def test_cpp_fp32_sign_edge_rows(n, d, nbits, exact_planes, cpp_backend):
    """The fp32 C++ path (AMX bf16 tiles + fp32 fix-up where the CPU has them, else the
    fp32 kernel) on rows that stress it: projections near zero (inside and just outside
    the rounding zone), norms beyond the tiles' range (1e-30, 1e30), zeros, NaN and Inf,
    tables gathered by rows=. Bits must equal the exact sign outside the §4 zone."""
    g = torch.Generator().manual_seed(n * d)
    planes = fastattn.make_planes(d, nbits, g) if exact_planes else torch.randn(d, nbits, generator=g)
    x = torch.randn(n, d, generator=g)
    p0 = planes[:, 0].double()
    for i, frac in enumerate((0.0, 3e-6, -3e-6, 2e-5, -2e-5, 6e-5, -6e-5, 2e-4)):
        v = x[i].double()
        v = v - (v @ p0) / (p0 @ p0) * p0                      # orthogonal to plane 0
        v = v + frac * v.norm() / p0.norm() * p0                # projection frac·|x|·|p0|
        x[i] = v.float()
    x[10] *= 1e-30
    x[11] *= 1e30
    x[12] = 0
    x[13, d // 2] = float("nan")
    x[14, 0] = float("inf")
    x[15, -1] = -float("inf")
    x[16] *= 1e-18
    x[17] *= 1e-10                                               # small but in the tiles' range
    x[18] *= 1e10
    got = fastattn.simhash_sign(x, planes, backend="cpp")
    finite = torch.isfinite(x).all(dim=1)
    want = ref.simhash_sign(x[finite].double(), planes.double())
    _assert_sig_equal(got[finite], want, x[finite], planes)
    assert torch.equal(got[13], torch.zeros_like(got[13]))      # NaN row: all zero
    # Inf rows: the fp32 kernel's sign of ±inf·p (a NaN projection gives 0)
    inf_rows = ~finite & ~torch.isnan(x).any(dim=1)
    proj = x[inf_rows] @ planes
    assert torch.equal(_bits(got[inf_rows], nbits), proj > 0)
    rows = torch.randint(0, n, (3 * n,), generator=g)
    assert torch.equal(fastattn.simhash_sign(x, planes, rows=rows, backend="cpp"), got[rows])


def test_cpp_amx_path_reported():
    """Where the CPU has AMX-BF16 (and no cap), fp32 signing runs on it and says so."""
    if not _cpp_amx():
        pytest.skip("no AMX-BF16 here, or FASTATTN_CPU_ISA caps it")
    x, planes = torch.randn(500, 64), fastattn.make_planes(64, 128)
    before = fastattn.backends()["cpu_features"]["ran"]["simhash_sign"].get("amx_bf16", 0)
    got = fastattn.simhash_sign(x, planes, backend="cpp")
    _assert_sig_equal(got, ref.simhash_sign(x.double(), planes.double()), x, planes)
    assert fastattn.backends()["cpu_features"]["ran"]["simhash_sign"]["amx_bf16"] == before + 1


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_gathered_rows_signed_in_row_order(dtype, cpp_backend):
    """From 4096 rows the C++ kernel signs the rows sorted (two radix passes here) and
    scatters the signatures back: still x[rows] bit for bit, repeats included."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9000, 9, dtype=dtype, generator=g)
    planes = fastattn.make_planes(9, 65, g, dtype=dtype)
    rows = torch.randint(0, 9000, (5000,), generator=g)
    got = fastattn.simhash_sign(x, planes, rows=rows, backend="cpp")
    assert torch.equal(got, fastattn.simhash_sign(x[rows], planes, backend="cpp"))


def test_gathered_rows_bad_input(backend):
    x, planes = torch.randn(6, 8), torch.randn(8, 64)
    if checks_values_on_host(backend):
        with pytest.raises(ValueError,
                           match=r"rows\[2\] = 6 is outside the table x \[0, N=6\)"):
            fastattn.simhash_sign(x, planes, rows=torch.tensor([0, 5, 6, -1]),
                                  backend=backend)
        with pytest.raises(ValueError, match=r"rows\[1\] = -1"):
            fastattn.simhash_sign(x, planes, rows=torch.tensor([0, -1]), backend=backend)
        with pytest.raises(ValueError,
                           match=r"rows\[0\] = 0 is outside the table x \[0, N=0\)"):
            fastattn.simhash_sign(x[:0], planes, rows=torch.tensor([0]), backend=backend)
    with pytest.raises(TypeError, match="rows"):
        fastattn.simhash_sign(x, planes, rows=torch.tensor([0.0]), backend=backend)
    with pytest.raises(ValueError, match="rows"):
        fastattn.simhash_sign(x, planes, rows=torch.tensor([[0]]), backend=backend)
    with pytest.raises(ValueError, match="table"):
        fastattn.simhash_sign(x.view(2, 3, 8), planes, rows=torch.tensor([0]), backend=backend)
    if checks_values_on_host(backend):
        # checked in the custom op too (a direct torch.ops call, as under torch.compile)
        with pytest.raises(ValueError, match=r"rows\[0\] = 9"):
            torch.ops.fastattn.simhash_sign(x, planes, torch.tensor([9]), backend)
