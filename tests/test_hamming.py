import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import reference as ref

from conftest import device_of
from helpers import random_sigs


@pytest.mark.parametrize("W", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("L", [0, 1, 129])
def test_distance_matches_reference(backend, W, L):
    q = random_sigs(6, W)
    k = random_sigs(6, L, W)
    got = fastattn.hamming_distance(q, k, backend=backend)
    assert got.dtype == torch.int32 and got.shape == (6, L)
    assert torch.equal(got, ref.hamming_distance(q, k))


def test_distance_broadcasts_without_copy(backend):
    q = random_sigs(3, 1, 2)
    k = random_sigs(4, 7, 2)                       # leading (4,) vs (3, 1) -> (3, 4)
    got = fastattn.hamming_distance(q, k, backend=backend)
    assert got.shape == (3, 4, 7)
    assert torch.equal(got, ref.hamming_distance(q, k))
    shared = random_sigs(1, 7, 2).expand(5, 7, 2)  # expanded (stride 0) input
    q5 = random_sigs(5, 2)
    assert torch.equal(fastattn.hamming_distance(q5, shared, backend=backend),
                       ref.hamming_distance(q5, shared))


def test_distance_known_values():
    q = torch.tensor([[0, 0]])
    k = torch.tensor([[[0, 0], [-1, 0], [1, 3], [-1, -1]]])
    assert fastattn.hamming_distance(q, k, backend="torch").tolist() == [[0, 64, 3, 128]]


def _check_topk(backend, q, k, topk, lengths=None, hist_index=None):
    got = fastattn.hamming_topk(q, k, topk, lengths=lengths, hist_index=hist_index,
                                backend=backend)
    want = ref.hamming_topk(q, k, topk, lengths, hist_index)
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.int64
    assert torch.equal(got[1], want[1]), (got[1], want[1])
    assert torch.equal(got[0], want[0])
    return got


@pytest.mark.parametrize("W", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("L", [0, 1, 129])
@pytest.mark.parametrize("topk", [1, 7, 200])
def test_topk_training_layout(backend, W, L, topk):
    B = 5
    q, k = random_sigs(B, W), random_sigs(B, L, W)
    lengths = torch.tensor([L, 0, L // 2, max(L - 1, 0), min(3, L)])
    _check_topk(backend, q, k, topk, lengths=lengths)
    _check_topk(backend, q, k, topk)


@pytest.mark.parametrize("nbits", [1, 8])
def test_topk_heavy_ties(backend, nbits):
    """8-bit signatures: thousands of equal distances, ties must go to the smaller position."""
    q, k = random_sigs(9, 1, nbits=nbits), random_sigs(1, 300, 1, nbits=nbits)
    dist, idx = _check_topk(backend, q, k, 50)
    assert (idx >= 0).all()


def test_topk_shared_history_and_hist_index(backend):
    q = random_sigs(7, 3, nbits=150)
    k = random_sigs(1, 257, 3, nbits=150)
    _check_topk(backend, q, k, 16)                           # U == 1: shared, not copied
    _check_topk(backend, q, k, 16, lengths=torch.tensor([100]))
    k3 = random_sigs(3, 257, 3, nbits=150)
    hist = torch.tensor([2, 0, 0, 1, 2, 2, 1])
    _check_topk(backend, q, k3, 300, lengths=torch.tensor([257, 0, 5], dtype=torch.int32),
                hist_index=hist)


def test_topk_all_padding(backend):
    q, k = random_sigs(4, 2), random_sigs(4, 10, 2)
    dist, idx = _check_topk(backend, q, k, 3, lengths=torch.zeros(4, dtype=torch.int64))
    assert (idx == -1).all() and (dist == 64 * 2 + 1).all()


def test_topk_noncontiguous(backend):
    q = random_sigs(6, 4)[::2]
    k = random_sigs(3, 40, 4).transpose(0, 1).contiguous().transpose(0, 1)
    _check_topk(backend, q, k, 5)


@pytest.mark.parametrize("nbits", [None, 6])
@pytest.mark.parametrize("W", [1, 5])
def test_topk_many_queries_per_history(backend, W, nbits):
    """The serving layout: many queries share each history (the C++ AVX-512 path tiles such
    a history and register-blocks up to 4 queries per key load, with a remainder block):
    lengths that are no multiple of 8, more slots than keys, heavy ties."""
    g = torch.Generator().manual_seed(W)
    q = random_sigs(45, W, nbits=nbits, generator=g)
    k = random_sigs(3, 400, W, nbits=nbits, generator=g)
    hist = torch.randint(0, 3, (45,), generator=g)
    # (the Triton interpreter takes seconds per call: one slot count of the multi-word,
    # heavy-tie case suffices there)
    if backend == "triton" and torch.get_default_device().type == "cpu" and (W, nbits) != (5, 6):
        pytest.skip("the Triton interpreter runs the multi-word, heavy-tie case only")
    for topk in (1, 64, 450) if backend != "triton" else (64,):
        _check_topk(backend, q, k, topk, lengths=torch.tensor([400, 133, 7]), hist_index=hist)
    _check_topk(backend, q[:37], k[:1], 64)


@pytest.mark.parametrize("L", [1000, 3001])
def test_topk_queries_far_apart(backend, L):
    """Queries of one shared history whose k-th distances lie far apart: the C++ AVX-512
    path starts each block's bound search from the previous block's bound, which is then
    ~100 off (zero queries are 6 bits from every third key, all-ones ones ~100+ from all)."""
    interp = backend == "triton" and torch.get_default_device().type == "cpu"
    B = 8 if interp else 64        # (the interpreter takes ~20 s for 64 queries)
    g = torch.Generator().manual_seed(L)
    W = 4
    k = random_sigs(1, L, W, generator=g)
    n = k[0, ::3].shape[0]
    bits = torch.rand(n, W * 64, generator=g).argsort(dim=1)[:, :6]    # 6 set bits per key
    sparse = torch.zeros(n, W * 64, dtype=torch.int64).scatter_(1, bits, 1)
    k[0, ::3] = (sparse.view(n, W, 64) << torch.arange(64)).sum(-1)
    b = torch.arange(B)
    far = ((b // 4) % 2 == 1) | (b % 5 == 0)    # alternating blocks of 4, and every 5th
    q = torch.where(far[:, None], -1, 0).expand(B, W).contiguous()
    for topk in (1, 64) if not interp else (64,):
        _check_topk(backend, q, k, topk)


@pytest.mark.parametrize("nbits", [None, 12])
def test_topk_longer_than_a_chunk(backend, nbits):
    """Histories longer than the C++ AVX-512 path's key chunk (16384 keys): each query's
    running top k is carried from chunk to chunk, by groups of query blocks sharing a chunk
    (serving layout) and by single histories (training layout); ties across a chunk
    boundary must still go to the smaller position."""
    if backend == "triton" and torch.get_default_device().type == "cpu":
        pytest.skip("the Triton interpreter takes minutes at this length (runs on a GPU)")
    if backend == "torch":
        pytest.skip("the torch backend is the reference these results are compared with")
    g = torch.Generator().manual_seed(14)
    L, W = 2 * 16384 + 1003, 4
    q = random_sigs(70, W, nbits=nbits, generator=g)
    k = random_sigs(1, L, W, nbits=nbits, generator=g)
    k[0, 16384 + 5] = q[3]                       # distance 0, in the second chunk
    k[0, 2 * 16384 + 7] = q[3]                   # the same, later: ranks after it
    for topk in (1, 64, 300):
        _check_topk(backend, q, k, topk)
    _check_topk(backend, q[:9], k, 64, lengths=torch.tensor([16384 + 9]))
    k3 = random_sigs(3, L, W, nbits=nbits, generator=g)
    _check_topk(backend, q[:3], k3, 64, lengths=torch.tensor([L, 16384, 20000]))
    rows = torch.randint(0, 500, (2, L), generator=g)   # the indexed form: heavy repeats
    table = random_sigs(500, W, nbits=nbits, generator=g)
    got = fastattn.hamming_topk(q[:2], table, 64, hist_rows=rows, backend=backend)
    want = ref.hamming_topk(q[:2], table[rows], 64)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("W", [1023, 1024, 1100])
def test_topk_wide_signatures(backend, W):
    """W >= 1024: 64 W no longer fits the AVX-512 path's uint16 distances, which used to wrap
    (idx = -1 everywhere); every backend must still match the reference, near ties too."""
    q = random_sigs(5, W)
    k = random_sigs(2, 37, W)
    k[:, 5] = q[0]                                    # distance 0
    k[:, 9] = q[1] ^ 1                                # distance 1
    k[1, 20] = ~q[2]                                  # distance 64 W, the largest
    lengths = torch.tensor([37, 30])
    hist = torch.tensor([0, 1, 1, 0, 1])
    _check_topk(backend, q, k, 8, lengths=lengths, hist_index=hist)
    _check_topk(backend, q, k[:1], 40)                # shared history, more slots than keys
    rows = torch.arange(2 * 37).reshape(2, 37).flip(1)  # the indexed form, same histories
    got = fastattn.hamming_topk(q, k.flip(1).reshape(-1, W), 8, lengths=lengths,
                                hist_index=hist, hist_rows=rows, backend=backend)
    want = ref.hamming_topk(q, k, 8, lengths, hist)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_topk_zero_words(backend):
    """W = 0 (DESIGN §7): every distance is 0, so the top k are the first k valid positions,
    and empty slots hold dist = 64·0 + 1 = 1, in every backend."""
    q = torch.zeros(4, 0, dtype=torch.int64)
    k = torch.zeros(2, 6, 0, dtype=torch.int64)
    dist, idx = _check_topk(backend, q, k, 5, lengths=torch.tensor([6, 3]),
                            hist_index=torch.tensor([0, 1, 1, 0]))
    assert idx.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, -1, -1], [0, 1, 2, -1, -1],
                            [0, 1, 2, 3, 4]]
    assert dist.tolist() == [[0] * 5, [0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0] * 5]
    _check_topk(backend, q, k[:1], 3)
    assert torch.equal(fastattn.hamming_distance(q[:2, None], k, backend=backend),
                       torch.zeros(2, 2, 6, dtype=torch.int32))


def test_topk_empty_batch(backend):
    dist, idx = fastattn.hamming_topk(random_sigs(0, 2), random_sigs(1, 10, 2), 4,
                                      backend=backend)
    assert dist.shape == (0, 4) and idx.shape == (0, 4)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 6), U=st.integers(1, 3), L=st.integers(0, 70), W=st.integers(1, 8),
       nbits=st.integers(1, 12), topk=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_topk_property(B, U, L, W, nbits, topk, seed):
    """Against the oracle and against first principles (sorted, valid, complete), in every
    backend (Triton on its test device: CUDA with a GPU, else the interpreter)."""
    g = torch.Generator().manual_seed(seed)
    q = random_sigs(B, W, nbits=nbits, generator=g)
    k = random_sigs(U, L, W, nbits=nbits, generator=g)
    lengths = torch.randint(0, L + 1, (U,), generator=g)
    hist = torch.randint(0, U, (B,), generator=g)
    for name in ("torch",) + tuple(b for b in ("cpp", "numba", "triton")
                                   if fastattn.backends()["available"][b]):
        dev = device_of(name)
        dist, idx = (t.cpu() for t in _check_topk(name, q.to(dev), k.to(dev), topk,
                                                  lengths=lengths.to(dev),
                                                  hist_index=hist.to(dev)))
    full = ref.hamming_distance(q, k[hist])
    for b in range(B):
        n = min(topk, int(lengths[hist[b]]))
        assert (idx[b, n:] == -1).all() and (idx[b, :n] >= 0).all()
        sel = idx[b, :n]
        assert torch.equal(dist[b, :n], full[b, sel])
        keys = dist[b, :n].long() * (L + 1) + sel
        assert (keys[1:] > keys[:-1]).all()                  # strictly (dist, pos) ascending
        if n:                                                # nothing better was left out
            rest = torch.ones(L, dtype=torch.bool)
            rest[sel] = False
            rest[int(lengths[hist[b]]):] = False
            if rest.any():
                assert full[b, rest].min() >= dist[b, n - 1]


def test_bad_input():
    q, k = random_sigs(3, 2), random_sigs(3, 10, 2)
    with pytest.raises(TypeError, match="q_sig"):
        fastattn.hamming_topk(q.float(), k, 2)
    with pytest.raises(TypeError, match="k_sig"):
        fastattn.hamming_distance(q, k.to(torch.int32))
    with pytest.raises(ValueError, match="number of words"):
        fastattn.hamming_topk(q, random_sigs(3, 10, 3), 2)
    with pytest.raises(ValueError, match="number of words"):
        fastattn.hamming_distance(q, random_sigs(3, 10, 3))
    with pytest.raises(ValueError, match="k must be >= 1"):
        fastattn.hamming_topk(q, k, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        fastattn.hamming_topk(q, k, 2.0)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, L=10\]"):
        fastattn.hamming_topk(q, k, 2, lengths=torch.tensor([1, 11, 2]))
    with pytest.raises(ValueError, match=r"lengths must lie"):
        fastattn.hamming_topk(q, k, 2, lengths=torch.tensor([1, -1, 2]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        fastattn.hamming_topk(q, k, 2, lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"hist_index must lie in \[0, U=3\)"):
        fastattn.hamming_topk(q, k, 2, hist_index=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="U=2 must equal"):
        fastattn.hamming_topk(q, random_sigs(2, 10, 2), 2)
    with pytest.raises(ValueError, match="device"):
        fastattn.hamming_topk(q, k.to("meta"), 2)
    with pytest.raises(ValueError, match="broadcast"):
        fastattn.hamming_distance(random_sigs(3, 2), random_sigs(4, 10, 2))


def test_topk_direct_eager_call_and_dispatch():
    """Plain eager CPU calls run the op's implementation directly (no dispatcher: see
    ops._common.eager_plain), with the same result as torch.ops.fastattn.hamming_topk; under
    a dispatch mode (fake tensors, tracing) the call goes through the registered op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastattn.ops._common import eager_plain

    q, k = random_sigs(5, 4), random_sigs(1, 40, 4)
    assert eager_plain(q, k, None)
    got = fastattn.hamming_topk(q, k, 7)
    want = torch.ops.fastattn.hamming_topk(q, k, 7, None, None, None,
                                           fastattn.backends()["cpu"])
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        assert not eager_plain(q)
        fastattn.hamming_topk(q, k, 7)
    assert "fastattn.hamming_topk.default" in seen.ops
    with FakeTensorMode() as mode:
        dist, idx = fastattn.hamming_topk(mode.from_tensor(q), mode.from_tensor(k), 7)
    assert dist.shape == (5, 7) and idx.dtype == torch.int64
