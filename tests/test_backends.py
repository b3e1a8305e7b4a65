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


@pytest.mark.parametrize("isa", ["default", "popcnt", "avx2"])
def test_cpp_fallback_isa_paths(isa):
    """A wheel must run on x86-64 CPUs without AVX-512: each run-time path (capped with
    FASTATTN_CPU_ISA) matches the reference."""
    if not fastattn.backends()["available"]["cpp"]:
        pytest.skip("the C++ extension is not built here")
    code = (
        "import torch, fastattn\n"
        "from fastattn import reference as ref\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q = torch.randint(-2**63, 2**63 - 1, (37, 3), generator=g)\n"
        "k = torch.randint(-2**63, 2**63 - 1, (1, 300, 3), generator=g) & 0xFF\n"
        "for kk in (5, 400):\n"
        "    got = fastattn.hamming_topk(q & 0xFF, k, kk, lengths=torch.tensor([250]), backend='cpp')\n"
        "    want = ref.hamming_topk(q & 0xFF, k, kk, torch.tensor([250]))\n"
        "    assert all(torch.equal(a, b) for a, b in zip(got, want))\n"
        "x, planes = torch.randn(50, 30, generator=g), torch.randn(30, 130, generator=g)\n"
        "assert torch.equal(fastattn.simhash_sign(x, planes, backend='cpp'),\n"
        "                   ref.simhash_sign(x.double(), planes.double()))\n"
        "print(fastattn.backends()['cpu_features'])\n"
    )
    env = dict(os.environ, FASTATTN_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert f"'isa_cap': '{isa}'" in out.stdout
