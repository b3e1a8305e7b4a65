"""Paths a GPU user meets first (issue 12): the Triton top-k tiling and L split, wide
signatures, the multi-tile online softmax, device-side value checks, CUDA-graph capture,
and bad inputs of the attention wrappers and modules.

The Triton tests run on CUDA tensors with a GPU and through the interpreter without one
(``triton_device`` fixture, conftest.py)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from fastattn import reference as ref
from fastattn.ops import _common

from conftest import device_of
from helpers import TOL, HostSeededDraws, random_sigs


# --------------------------------------------------------------------------- top-k tiling

TILE_CASES = [  # B, U, L, W, topk, block_b, splits
    (5, 1, 37, 1, 6, 4, 1),        # query tiles, last tile partial
    (9, 1, 130, 2, 10, 4, 3),      # tiles and an L split together
    (3, 3, 70, 6, 20, 1, 4),       # W = 6, split, private histories
    (7, 1, 50, 7, 60, 4, 2),       # topk > chunk: partial lists padded with empties
    (2, 2, 33, 8, 5, 1, 40),       # more splits asked than blocks: capped
    (4, 1, 200, 3, 7, 2, 5),
    (1, 1, 300, 1, 300, 1, 7),     # B = 1 (the case the split exists for), k = L
]


@pytest.mark.parametrize("case", TILE_CASES)
def test_triton_topk_tiles_and_splits(triton_device, case):
    """Every tiling of the Triton scan (queries × keys, L split + merge) returns exactly the
    reference, dense and indexed, with ties (few random bits) and empty histories."""
    _, dev = triton_device
    B, U, L, W, topk, bb, sp = case
    from fastattn.kernels import triton as tk
    q, k = random_sigs(B, W, nbits=12).to(dev), random_sigs(U, L, W, nbits=12).to(dev)
    lens = torch.randint(0, L + 1, (U,), device=dev)
    lens[0] = L
    if U > 1:
        lens[-1] = 0
    hist = torch.randint(0, U, (B,), device=dev)
    got = tk.hamming_topk(q, k, lens, hist, topk, block_b=bb, splits=sp)
    want = ref.hamming_topk(q, k, topk, lens, hist)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), (got, want)
    table = random_sigs(23, W, nbits=12).to(dev)
    rows = torch.randint(0, 23, (U, L), device=dev)
    got = tk.hamming_topk_rows(q, table, rows, lens, hist, topk, block_b=bb, splits=sp)
    want = ref.hamming_topk(q, table, topk, lens, hist, hist_rows=rows)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), (got, want)


def test_host_seeded_draws():
    """The backend fixtures make CUDA the default device for Triton on a GPU machine, where a
    draw seeded by a CPU generator would fail; HostSeededDraws makes it on the host instead.
    Here the default device is meta and the mode moves draws to the CPU, so the intercepted
    draw can be compared with a plain CPU one."""
    want = torch.randint(0, 100, (5,), generator=torch.Generator().manual_seed(3))
    prev = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        with HostSeededDraws("cpu"):
            got = torch.randint(0, 100, (5,), generator=torch.Generator().manual_seed(3))
            unseeded = torch.randn(2)                       # no generator: the default device
            explicit = torch.randn(2, generator=torch.Generator(), device="meta")
    finally:
        torch.set_default_device(None if prev.type == "cpu" else prev)
    assert torch.equal(got, want)
    assert unseeded.device.type == "meta" and explicit.device.type == "meta"
    # the compile tests run under the mode on a GPU: it must not break a fullgraph trace
    q, k = random_sigs(5, 4), random_sigs(1, 30, 4)
    with HostSeededDraws("cpu"):
        got = torch.compile(lambda q, k: fastattn.hamming_topk(q, k, 4), fullgraph=True)(q, k)
    want = ref.hamming_topk(q, k, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_topk_plan():
    """Tiles only over a shared history with many queries; splits only with few programs."""
    from fastattn.kernels.triton.hamming import topk_plan
    sms = 132
    assert topk_plan(4096, 1, 1024, 4, 64, sms) == (4, 1)          # serving: tiles
    assert topk_plan(4096, 4096, 1024, 4, 64, sms) == (1, 1)       # training: one per query
    bb, s = topk_plan(1, 1, 100_000, 4, 64, sms)                    # one query, long history
    assert bb == 1 and s > 1 and 100_000 // s >= 2048
    assert topk_plan(8, 8, 1000, 4, 64, sms) == (1, 1)             # too short to split
    # W = 128: four rows of 16384 bins would not fit in shared memory, so no query tiles
    assert topk_plan(4096, 1, 1024, 127, 64, sms) == (4, 1)
    assert topk_plan(4096, 1, 1024, 128, 64, sms) == (1, 1)
    with pytest.raises(ValueError, match="shared history"):
        topk_plan(64, 2, 100, 1, 4, sms, block_b=4)


# --------------------------------------------------------------------------- wide signatures

@pytest.mark.parametrize("W", [6, 7, 8])
def test_wide_signatures_every_backend(backend, W):
    """Signatures of 6-8 words (384-512 bits) in every op that reads them."""
    dev = device_of(backend)
    q, k = random_sigs(5, W, nbits=40).to(dev), random_sigs(5, 90, W, nbits=40).to(dev)
    lengths = torch.tensor([90, 0, 45, 1, 89], device=dev)
    assert torch.equal(fastattn.hamming_distance(q[:, None], k, backend=backend),
                       ref.hamming_distance(q[:, None], k))
    for topk in (1, 10, 100):
        got = fastattn.hamming_topk(q, k, topk, lengths=lengths, backend=backend)
        want = ref.hamming_topk(q, k, topk, lengths)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    qf = torch.randn(5, 2, 8, dtype=torch.float64, device=dev)
    kf = torch.randn(5, 90, 2, 8, dtype=torch.float64, device=dev)
    vf = torch.randn(5, 90, 2, 3, dtype=torch.float64, device=dev)
    out = fastattn.eta_attention(qf, kf, vf, q, k, 7, lengths=lengths, backend=backend)
    want = ref.eta_attention(qf, kf, vf, q, k, 7, lengths)
    torch.testing.assert_close(out, want, **TOL[torch.float64])


# --------------------------------------------------------------------------- online softmax

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_multi_tile_online_softmax(triton_device, dtype):
    """K > BLOCK_K, the benchmark's D=128, k=64 setting: the Triton forward rescales its
    running sums across K tiles and the backward walks them; both match the reference."""
    from fastattn.kernels.triton.attention import _config
    name, dev = triton_device
    B, U, L, D, K = 3, 2, 150, 128, 64
    assert _config(K, D, D, dtype == torch.float64)[0] < K       # really several tiles
    q = torch.randn(B, D, dtype=dtype, device=dev, requires_grad=True)
    keys = torch.randn(U, L, D, dtype=dtype, device=dev, requires_grad=True)
    values = torch.randn(U, L, D, dtype=dtype, device=dev, requires_grad=True)
    idx = torch.randperm(L, device=dev)[:K].repeat(B, 1)
    idx[1, ::3] = -1                                   # empty slots scattered over the tiles
    idx[2, :40] = -1                                   # first tiles empty: m stays -inf
    hist = torch.tensor([0, 1, 1], device=dev)
    # Scores spread widely, so a missing rescale of an earlier tile would show.
    out = fastattn.topk_attention(q * 3, keys, values, idx, hist_index=hist, backend=name)
    want, _ = ref.topk_attention((q * 3).unsqueeze(1), keys.unsqueeze(2), values.unsqueeze(2),
                                 idx, hist, D ** -0.5)
    want = want.squeeze(1)
    torch.testing.assert_close(out, want, **TOL[dtype])
    g = torch.randn_like(out)
    got_g = torch.autograd.grad(out, (q, keys, values), g)
    want_g = torch.autograd.grad(want, (q, keys, values), g)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, **TOL[dtype])


# --------------------------------------------------------------------------- value checks

def _bad_calls(dev):
    """(call, message) pairs of bad values the op layer must refuse (read on the device)."""
    q, k = random_sigs(3, 2).to(dev), random_sigs(3, 10, 2).to(dev)
    v = torch.randn(3, 10, 4, device=dev)
    tab, rows = random_sigs(5, 2).to(dev), torch.randint(0, 5, (3, 10), device=dev)
    rows_bad = rows.clone()
    rows_bad[1, 2] = -1
    t = torch.tensor
    return [
        (lambda b: fastattn.hamming_topk(q, k, 2, lengths=t([1, 11, 2], device=dev),
                                         backend=b), r"lengths must lie in \[0, L=10\]"),
        (lambda b: fastattn.hamming_topk(q, k, 2, hist_index=t([0, -1, 1], device=dev),
                                         backend=b), r"hist_index must lie in \[0, U=3\)"),
        (lambda b: fastattn.topk_gather(v, t([[0, 10]] * 3, device=dev), backend=b),
         r"idx must lie in \[-1, L=10\)"),
        (lambda b: fastattn.hamming_topk(q, tab, 2, hist_rows=rows_bad, backend=b),
         r"hist_rows.*\[0, N=5\)"),
        (lambda b: fastattn.topk_gather(torch.randn(5, 4, device=dev),
                                        t([[2, 0]] * 3, device=dev), hist_rows=rows_bad,
                                        backend=b),
         r"hist_rows.*\[0, N=5\)"),
    ]


def test_value_checks_on_the_host_for_cpu(backend):
    """CPU tensors: every bad value raises ValueError naming the argument."""
    if device_of(backend) != "cpu":
        pytest.skip("CUDA tensors are checked on the device (test_device_side_checks)")
    for call, msg in _bad_calls("cpu"):
        with pytest.raises(ValueError, match=msg):
            call(backend)


def test_device_side_checks(monkeypatch):
    """The CUDA form of the checks (no host read, capturable): forced on CPU tensors here,
    where torch._assert_async raises at once; on a GPU it stops the stream before any
    kernel reads out of bounds. Good inputs pass it unchanged."""
    monkeypatch.setattr(_common, "host_checks", lambda t: False)
    reads = []
    real_bool = torch.Tensor.__bool__
    for call, msg in _bad_calls("cpu"):
        with pytest.raises(RuntimeError, match="fastattn: " + msg):
            call("torch")
    q, k = random_sigs(3, 2), random_sigs(3, 10, 2)
    monkeypatch.setattr(torch.Tensor, "__bool__",
                        lambda self: reads.append(1) or real_bool(self))
    got = fastattn.hamming_topk(q, k, 4, lengths=torch.tensor([10, 0, 3]), backend="torch")
    want = ref.hamming_topk(q, k, 4, torch.tensor([10, 0, 3]))
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not reads, "a device-side check read a value on the host"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_value_checks_assert_on_the_device():
    """On CUDA a bad value stops the stream with a device-side assert before any kernel
    reads out of bounds. That assert poisons the whole process, so it runs in a child."""
    code = textwrap.dedent("""
        import torch, fastattn
        q = torch.zeros(2, 1, dtype=torch.int64, device="cuda")
        k = torch.zeros(1, 8, 1, dtype=torch.int64, device="cuda")
        fastattn.hamming_topk(q, k, 2, lengths=torch.tensor([9], device="cuda"),
                              backend="triton")
        torch.cuda.synchronize()
        print("no assert")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode != 0 and "no assert" not in r.stdout, r.stdout + r.stderr
    assert "assert" in r.stderr.lower(), r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
def test_cuda_graph_captures_eta_forward():
    """No host sync in an eta_attention forward on CUDA: it captures into a CUDA graph, and
    a replay on new inputs matches the eager result."""
    dev = "cuda"
    B, L, H, Dh, W = 16, 512, 2, 32, 2
    q = torch.randn(B, H, Dh, device=dev)
    keys, values = torch.randn(1, L, H, Dh, device=dev), torch.randn(1, L, H, Dh, device=dev)
    qs, ks = random_sigs(B, W).to(dev), random_sigs(1, L, W).to(dev)
    lengths = torch.tensor([400], device=dev)

    def fwd():
        return fastattn.eta_attention(q, keys, values, qs, ks, 32, lengths=lengths,
                                      backend="triton")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fwd()                                  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwd()
    q.copy_(torch.randn_like(q))
    qs.copy_(random_sigs(B, W).to(dev))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, fwd(), **TOL[torch.float32])


# --------------------------------------------------------------------------- bad inputs

def _attn_inputs(U=3, L=8):
    return (torch.randn(3, 4), torch.randn(U, L, 4), torch.randn(U, L, 4))


BAD_LAYOUTS = [  # lengths, hist_index, U, message
    ([8, -1, 2], None, 3, r"lengths must lie in \[0, L=8\]"),
    ([8, 9, 2], None, 3, r"lengths must lie in \[0, L=8\]"),
    (None, [0, 3, 1], 3, r"hist_index must lie in \[0, U=3\)"),
    (None, [0, -1, 1], 3, r"hist_index must lie in \[0, U=3\)"),
    (None, [0, 1, 0], 1, r"hist_index must lie in \[0, U=1\)"),     # U == 1: not ignored
    ([-2], None, 1, r"lengths must lie in \[0, L=8\]"),
]


@pytest.mark.parametrize("case", BAD_LAYOUTS)
def test_target_attention_refuses_bad_layouts(case):
    lengths, hist, U, msg = case
    q, keys, values = _attn_inputs(U)
    kw = dict(lengths=None if lengths is None else torch.tensor(lengths),
              hist_index=None if hist is None else torch.tensor(hist))
    with pytest.raises(ValueError, match=msg):
        fastattn.target_attention(q, keys, values, **kw)
    # The indexed form of the same call refuses it the same way.
    table = torch.randn(U * 8, 4)
    rows = torch.arange(U * 8).view(U, 8)
    with pytest.raises(ValueError, match=msg):
        fastattn.target_attention(q, table, table, hist_rows=rows, **kw)


@pytest.mark.parametrize("topk", [4, 64])      # L = 8 > 4: retrieval; L <= 64: dense
@pytest.mark.parametrize("case", BAD_LAYOUTS)
def test_modules_refuse_bad_layouts_on_both_paths(case, topk):
    """ETAAttention validates the same way whether it retrieves (L > topk) or falls back to
    dense attention (L <= topk); TargetAttention too."""
    lengths, hist, U, msg = case
    q, keys, _ = _attn_inputs(U)
    kw = dict(lengths=None if lengths is None else torch.tensor(lengths),
              hist_index=None if hist is None else torch.tensor(hist))
    for mod in (fastattn.nn.TargetAttention(4), fastattn.nn.ETAAttention(4, topk=topk)):
        with pytest.raises(ValueError, match=msg):
            mod(q, keys, **kw)


@pytest.mark.parametrize("topk", [4, 64])
def test_modules_refuse_bad_rows_and_signatures_on_both_paths(topk):
    q = torch.randn(2, 4)
    table = torch.randn(6, 4)
    rows = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1], [5, 4, -1, 2, 1, 0, 0, 0]])
    for mod in (fastattn.nn.TargetAttention(4), fastattn.nn.ETAAttention(4, topk=topk)):
        with pytest.raises(ValueError, match=r"hist_rows\[1, 2\] = -1 is outside"):
            mod(q, table, hist_rows=rows)
        # -1 past the length is padding, fine on both paths
        mod(q, table, hist_rows=rows, lengths=torch.tensor([8, 2]))
    eta = fastattn.nn.ETAAttention(4, topk=topk, hash_bits=64)
    with pytest.raises(ValueError, match="key_signatures"):
        eta(q, table, hist_rows=rows.clamp(min=0), key_signatures=random_sigs(6, 2))
    with pytest.raises(TypeError, match="key_signatures"):
        eta(q, table, hist_rows=rows.clamp(min=0),
            key_signatures=random_sigs(6, 1).to(torch.int32))


def test_target_attention_checks_values_under_compile():
    """Traced by torch.compile (fullgraph), the dense form's value checks become device-side
    asserts: no graph break, same result on good input, refused bad input."""
    q, keys, values = _attn_inputs()
    f = lambda q, k, v, l, h: fastattn.target_attention(q, k, v, lengths=l,  # noqa: E731
                                                        hist_index=h)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    lengths, hist = torch.tensor([8, 3, 0]), torch.tensor([2, 0, 1])
    torch.testing.assert_close(compiled(q, keys, values, lengths, hist),
                               f(q, keys, values, lengths, hist))
    with pytest.raises(RuntimeError, match=r"fastattn: lengths must lie in \[0, L=8\]"):
        compiled(q, keys, values, torch.tensor([9, 3, 0]), hist)


def test_triton_fixture_moves_the_default_device_and_restores_it(monkeypatch):
    """The mechanism that runs the suite's Triton tests on CUDA tensors with a GPU, dry-run
    here with the meta device standing in for CUDA: the triton parameter switches the
    default device for the test and restores it after; the CPU backends are untouched."""
    import conftest
    monkeypatch.setattr(conftest, "DEVICE", "meta")
    run = conftest._on_device("triton")
    assert next(run) == "triton"
    assert torch.empty(1).device.type == "meta" and conftest.device_of("triton") == "meta"
    with pytest.raises(StopIteration):
        next(run)
    assert torch.empty(1).device.type == "cpu"
    assert list(conftest._on_device("cpp")) == ["cpp"] and conftest.device_of("cpp") == "cpu"
