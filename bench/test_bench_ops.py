"""Per op family: fastattn backends vs the baselines users would otherwise run."""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.bench.sweeps import eta_inputs, faiss_search

CPU_BACKENDS = [b for b in ("cpp", "numba") if fastattn.backends()["available"][b]]

B, D, BITS, K = 1024, 128, 256, 64
LENGTHS = [1024, 16384]


def _signed(L):
    return eta_inputs(B, 1, L, D, BITS, torch.Generator().manual_seed(L))


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("impl", CPU_BACKENDS + ["sdpa", "target_attention"])
def test_eta_vs_dense(benchmark, impl, L):
    """eta_attention (serving layout) against dense attention on the same inputs."""
    benchmark.group = f"attention B={B} L={L}"
    q, keys, values, qs, ks = _signed(L)
    if impl == "sdpa":
        f = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q.view(1, 1, B, D), keys.view(1, 1, L, D), values.view(1, 1, L, D))
    elif impl == "target_attention":
        f = lambda: fastattn.target_attention(q, keys, values)  # noqa: E731
    else:
        f = lambda: fastattn.eta_attention(q, keys, values, qs, ks, K, backend=impl)  # noqa
    benchmark(f)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("impl", CPU_BACKENDS + ["faiss", "torch_xor_popcount_topk"])
def test_hamming_topk(benchmark, impl, L):
    benchmark.group = f"hamming_topk B={B} L={L}"
    _, _, _, qs, ks = _signed(L)
    if impl == "faiss":
        search = faiss_search(qs, ks[0], K)
        if search is None:
            pytest.skip("faiss-cpu is not installed (it is in the [bench] extra)")
        benchmark(search)
    elif impl == "torch_xor_popcount_topk":
        benchmark(lambda: fastattn.hamming_topk(qs, ks, K, backend="torch"))
    else:
        benchmark(lambda: fastattn.hamming_topk(qs, ks, K, backend=impl))


@pytest.mark.parametrize("impl", CPU_BACKENDS + ["torch_matmul_sign_pack", "torch_matmul"])
def test_simhash(benchmark, impl):
    benchmark.group = "simhash_sign 65536x128 -> 256 bits"
    x, planes = torch.randn(65536, D), torch.randn(D, BITS)
    if impl == "torch_matmul":
        benchmark(lambda: torch.mm(x, planes))
    elif impl == "torch_matmul_sign_pack":
        benchmark(lambda: fastattn.simhash_sign(x, planes, backend="torch"))
    else:
        benchmark(lambda: fastattn.simhash_sign(x, planes, backend=impl))


@pytest.mark.parametrize("impl", CPU_BACKENDS + ["eager_torch"])
def test_mimn_forward_backward(benchmark, impl):
    benchmark.group = "MIMNEncoder fwd+bwd B=256 T=200"
    enc = fastattn.nn.MIMNEncoder(32, 32, 8, 32, 32, backend="torch" if impl == "eager_torch"
                                  else impl)
    x = torch.randn(256, 200, 32)

    def step():
        reads, st = enc(x)
        (reads.sum() + enc.reg_loss(st)).backward()
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
