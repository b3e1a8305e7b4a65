"""The machine-limit micro-kernels of the benchmark roofline (csrc/limits.cpp, bench.measure)."""
import numpy as np
import pytest
import torch

from fastattn.bench import measure



def _ext():
    from conftest import _require  # skips without the C++ build, fails where make test needs it
    _require("cpp")
    from fastattn import _C
    return _C


def _plain_sum_of_minima(keys: np.ndarray, q: np.ndarray) -> int:
    # keys are in tile layout: word w of key 8j + i at keys.reshape(-1)[32 j + 8 w + i]
    rows = keys.reshape(-1, 4, 8).transpose(0, 2, 1).reshape(-1, 4)
    x = np.ascontiguousarray(q[:, None, :] ^ rows[None]).view(np.uint8)
    return int(np.unpackbits(x, axis=-1).reshape(q.shape[0], rows.shape[0], -1).sum(-1)
               .min(1).sum())


@pytest.mark.parametrize("n,nq", [(8, 4), (64, 12), (1024, 8)])
def test_popcount_limit_matches_plain_popcount_on_every_isa(n, nq):
    C = _ext()
    g = torch.Generator().manual_seed(n + nq)
    keys = torch.randint(-2**63, 2**63 - 1, (n, 4), dtype=torch.int64, generator=g).numpy()
    q = torch.randint(-2**63, 2**63 - 1, (nq, 4), dtype=torch.int64, generator=g).numpy()
    want = _plain_sum_of_minima(keys, q)
    isas = C.popcount_limit_isas()
    assert isas[-1] == "default"
    for isa in isas:
        for threads in (1, 2, 3):
            assert C.popcount_limit(keys, q, isa, threads) == want, (isa, threads)


def test_popcount_limit_rejects_bad_arguments():
    C = _ext()
    keys = np.zeros((16, 4), np.int64)
    q = np.zeros((4, 4), np.int64)
    with pytest.raises(ValueError, match="multiple of 8"):
        C.popcount_limit(keys[:12], q, "default", 1)
    with pytest.raises(ValueError, match="multiple of 8 and nq of 4"):
        C.popcount_limit(keys, q[:3], "default", 1)
    with pytest.raises(ValueError, match="256-bit"):
        C.popcount_limit(np.zeros((16, 2), np.int64), q, "default", 1)
    with pytest.raises(ValueError, match="isa must be"):
        C.popcount_limit(keys, q, "neon", 1)
    with pytest.raises(ValueError, match="nthreads"):
        C.popcount_limit(keys, q, "default", 0)


def test_machine_limits_come_from_the_micro_kernels():
    _ext()
    isa = measure.popcount_isa()
    assert isa in ("avx512", "avx2", "popcnt", "default")
    rate = measure.popcount_gwords(n=256, nq=64)
    assert rate is not None and rate > 0
    assert measure.popcount_gwords("no-such-isa", n=256, nq=64) is None
    limits = measure.machine_limits("cpu")
    assert set(limits) == {"mem_bandwidth_gbs", "matmul_gflops", "popcount_gwords_per_s",
                           "popcount_avx2_gwords_per_s"}
    assert all(v is None or v > 0 for v in limits.values())
    assert limits["popcount_gwords_per_s"] > 0
    assert measure.machine_info("cpu")["popcount_isa"] == isa


def test_triton_popcount_limit_kernel_matches_plain_popcount():
    """The GPU micro-kernel (run here by the Triton interpreter; on a GPU it uses hardware
    popc): each key's minimum distance over the queries."""
    from conftest import _require
    _require("triton")
    from fastattn.kernels.triton.limits import popcount_limit
    g = torch.Generator().manual_seed(3)
    keys = torch.randint(-2**63, 2**63 - 1, (300, 4), dtype=torch.int64, generator=g)
    q = torch.randint(-2**63, 2**63 - 1, (5, 4), dtype=torch.int64, generator=g)
    x = np.ascontiguousarray(keys.numpy()[:, None, :] ^ q.numpy()[None]).view(np.uint8)
    want = np.unpackbits(x, axis=-1).reshape(300, 5, -1).sum(-1).min(1)
    got = popcount_limit(keys, q, BLOCK_L=128)
    assert got.dtype == torch.int32 and np.array_equal(got.numpy(), want)
    with pytest.raises(ValueError, match="256-bit"):
        popcount_limit(keys[:, :2], q)
