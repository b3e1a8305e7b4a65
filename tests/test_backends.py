import json
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import backends as fb
from fastattn.backends import BackendUnavailableError

from helpers import random_sigs

_backends_mod = sys.modules["fastattn.backends"]


def test_report():
    info = fastattn.backends()
    assert set(info["available"]) == {"triton", "cpp", "numba", "torch"}
    assert info["available"]["torch"]
    assert info["cpu"] in ("cpp", "numba", "torch")
    assert info["available"][info["cpu"]]
    if info["available"]["cpp"]:
        assert info["cpu"] == "cpp" and "cpu_features" in info


def test_env_var_and_argument(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")
    assert _backends_mod.resolve("cpu") == "torch"
    assert _backends_mod.resolve("cpu", "numba") == "numba"      # argument beats env
    monkeypatch.delenv("FASTATTN_BACKEND")
    assert _backends_mod.resolve("cpu") == fb()["cpu"]


def test_unknown_and_wrong_device(monkeypatch):
    with pytest.raises(ValueError, match="unknown fastattn backend 'cuda'"):
        _backends_mod.resolve("cpu", "cuda")
    monkeypatch.setenv("FASTATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown fastattn backend"):
        fastattn.hamming_topk(random_sigs(2, 1), random_sigs(2, 5, 1), 2)
    monkeypatch.delenv("FASTATTN_BACKEND")
    with pytest.raises(ValueError, match="CPU tensors only"):
        _backends_mod.resolve("cuda", "numba")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _backends_mod.resolve("cpu", "triton")


def test_forcing_a_missing_backend_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(_backends_mod, "_probe",
                        lambda name: (None, "ImportError: simulated") if name == "cpp"
                        else (fb.__globals__["importlib"].import_module(
                            _backends_mod._MODULES[name]), None))
    with pytest.raises(BackendUnavailableError, match="C\\+\\+17 compiler"):
        fastattn.hamming_topk(random_sigs(2, 1), random_sigs(2, 5, 1), 2, backend="cpp")
    assert fastattn.backends()["cpu"] != "cpp"


def test_import_without_optional_backends():
    """Blocking triton, numba and the C++ extension still imports and runs on torch."""
    code = (
        "import sys\n"
        "for m in ('triton', 'numba', 'fastattn._C'): sys.modules[m] = None\n"
        "import torch, fastattn\n"
        "info = fastattn.backends()\n"
        "assert info['cpu'] == 'torch', info\n"
        "assert not any(info['available'][b] for b in ('triton', 'numba', 'cpp')), info\n"
        "q = torch.zeros(2, 1, dtype=torch.int64); k = torch.zeros(1, 4, 1, dtype=torch.int64)\n"
        "print(fastattn.hamming_topk(q, k, 2)[1].tolist())\n"
        "try:\n"
        "    fastattn.hamming_topk(q, k, 2, backend='numba')\n"
        "except fastattn.BackendUnavailableError as e:\n"
        "    print('refused:', 'pip install numba' in str(e))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[[0, 1], [0, 1]]", "refused: True"]


def test_default_dispatch_is_used_by_ops():
    q, k = random_sigs(3, 2), random_sigs(3, 20, 2)
    got = fastattn.hamming_topk(q, k, 4)
    want = fastattn.reference.hamming_topk(q, k, 4)
    assert torch.equal(got[1], want[1])


def _expected_paths(isa, cpu):
    """The path each C++ kernel family must run under FASTATTN_CPU_ISA=isa on a CPU with the
    (uncapped) features ``cpu``: the best one both the cap and the CPU allow."""
    level = ["default", "popcnt", "avx2", "avx512", "amx"].index(isa)
    vpopc = cpu["avx512f"] and cpu["avx512bw"] and cpu["avx512vl"] and \
        cpu["avx512_vpopcntdq"] and cpu["popcnt"]
    avx512f = cpu["avx512f"] and cpu["fma"]
    avx2 = cpu["avx2"] and cpu["fma"] and cpu["popcnt"]
    ham = ("avx512_vpopcntdq" if level >= 3 and vpopc else
           "popcnt" if level >= 1 and cpu["popcnt"] else "default")
    wide = ("avx512f" if level >= 3 and avx512f else
            "avx2" if level >= 2 and avx2 else "default")
    amx = cpu["amx_bf16"] and cpu["avx512_bf16"] and avx512f and cpu["avx512bw"] and \
        cpu["avx512vl"]
    sign = "amx_bf16" if level >= 4 and amx else wide
    return {"hamming": ham, "simhash_sign": sign, "attention": wide}


@pytest.mark.parametrize("isa", ["default", "popcnt", "avx2", "avx512", "amx"])
def test_cpp_fallback_isa_paths(isa, cpp_backend):
    """A wheel must run on x86-64 CPUs without AVX-512: each run-time path (capped with
    FASTATTN_CPU_ISA) reports the path it ran, and matches the reference (fp64 exactly where
    the result is integer, fp32 within the §6 tolerance)."""
    info = fastattn.backends()
    if os.environ.get("FASTATTN_CPU_ISA"):
        pytest.skip("this test compares capped runs against the uncapped features")
    code = (
        "import json, torch, fastattn\n"
        "from fastattn import reference as ref\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q = torch.randint(-2**63, 2**63 - 1, (37, 3), generator=g)\n"
        "k = torch.randint(-2**63, 2**63 - 1, (1, 300, 3), generator=g) & 0xFF\n"
        "for kk in (5, 400):\n"
        "    got = fastattn.hamming_topk(q & 0xFF, k, kk, lengths=torch.tensor([250]), backend='cpp')\n"
        "    want = ref.hamming_topk(q & 0xFF, k, kk, torch.tensor([250]))\n"
        "    assert all(torch.equal(a, b) for a, b in zip(got, want))\n"
        "assert torch.equal(fastattn.hamming_distance(q[:, None], k, backend='cpp'),\n"
        "                   ref.hamming_distance(q[:, None], k))\n"
        "x, planes = torch.randn(50, 30, generator=g), torch.randn(30, 130, generator=g)\n"
        "assert torch.equal(fastattn.simhash_sign(x.double(), planes.double(), backend='cpp'),\n"
        "                   ref.simhash_sign(x.double(), planes.double()))\n"
        "# fp32 signs may differ from fp64 ones only where a projection is ~0: count bits\n"
        "s32 = fastattn.simhash_sign(x, planes, backend='cpp')\n"
        "diff = ref.hamming_distance(s32, ref.simhash_sign(x.double(), planes.double())[:, None])\n"
        "assert int(diff.sum()) <= 2, diff\n"
        "for dt, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):\n"
        "    qa = torch.randn(6, 2, 16, dtype=dt, generator=g, requires_grad=True)\n"
        "    ka = torch.randn(2, 40, 2, 16, dtype=dt, generator=g, requires_grad=True)\n"
        "    va = torch.randn(2, 40, 2, 9, dtype=dt, generator=g, requires_grad=True)\n"
        "    idx = torch.randint(-1, 40, (6, 70), generator=g)\n"
        "    hist = torch.tensor([0, 1, 1, 0, 1, 0])\n"
        "    out = fastattn.topk_attention(qa, ka, va, idx, hist_index=hist, backend='cpp')\n"
        "    grads = torch.autograd.grad(out.sum(), (qa, ka, va))\n"
        "    want = ref.topk_attention(qa.double(), ka.double(), va.double(), idx, hist,\n"
        "                              16 ** -0.5)[0]\n"
        "    wgrads = torch.autograd.grad(want.sum(), (qa, ka, va))\n"
        "    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)\n"
        "    for a, b in zip(grads, wgrads):\n"
        "        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)\n"
        "print(json.dumps(fastattn.backends()['cpu_features']))\n"
    )
    env = dict(os.environ, FASTATTN_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    feats = json.loads(out.stdout.strip().splitlines()[-1])
    assert feats["isa_cap"] == isa
    want = _expected_paths(isa, info["cpu_features"])
    for family, path in want.items():
        assert feats[family] == path
        # every call of the family ran that path, and the family did run
        assert feats["ran"][family] and set(feats["ran"][family]) == {path}, feats["ran"]


def test_unknown_cpu_isa_is_refused(cpp_backend):
    """A typo in FASTATTN_CPU_ISA must not silently mean "no cap": the C++ backend does not
    load, and says why (forcing it raises with the reason)."""
    code = ("import fastattn, torch\n"
            "print(fastattn.backends()['missing']['cpp'])\n"
            "try:\n"
            "    fastattn.hamming_topk(torch.zeros(1, 1, dtype=torch.int64),\n"
            "                          torch.zeros(1, 3, 1, dtype=torch.int64), 1, backend='cpp')\n"
            "except fastattn.BackendUnavailableError as exc:\n"
            "    print('refused:', exc)\n")
    env = dict(os.environ, FASTATTN_CPU_ISA="avx5l2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "FASTATTN_CPU_ISA=avx5l2 is not a known ISA level" in out.stdout
    assert "refused:" in out.stdout and "default, popcnt, avx2, avx512" in out.stdout


def test_backends_report_versions():
    info = fastattn.backends()
    assert info["versions"]["torch"] == torch.__version__
    if info["available"]["triton"]:
        import triton
        assert info["versions"]["triton"] == triton.__version__


def test_old_triton_is_unavailable(monkeypatch):
    """A Triton older than TRITON_MIN (no tl.histogram(mask=)) makes the backend unavailable
    with the version found, so CUDA tensors fall back instead of failing at first launch."""
    pytest.importorskip("triton")
    import triton
    be = _backends_mod
    monkeypatch.setattr(triton, "__version__", "3.1.0")
    be._probe.cache_clear()
    try:
        assert not be.available("triton")
        reason = be.backends()["missing"]["triton"]
        assert "triton 3.1.0 is too old" in reason and "triton>=3.4" in reason
        assert be._default("cuda") == "torch"
        with pytest.raises(be.BackendUnavailableError, match="too old"):
            be.load("triton")
    finally:
        monkeypatch.undo()
        be._probe.cache_clear()
    assert be.available("triton")
    assert be._version_tuple("3.4.0+git1a2b") == (3, 4, 0)
    assert be._version_tuple("3.5.0rc1") == (3, 5, 0)
