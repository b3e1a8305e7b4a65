"""Shared fixtures. Triton kernels run in the interpreter on CPU tensors (no GPU in CI):
TRITON_INTERPRET must be set before triton is first imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastattn import backends as fa_backends  # noqa: E402

ALL_BACKENDS = ("torch", "numba", "cpp", "triton")
# `make test` sets this so a backend that failed to install fails the run instead of skipping.
REQUIRED = {b for b in os.environ.get("FASTATTN_REQUIRE_BACKENDS", "").split(",") if b}


def _usable(name):
    info = fa_backends()
    if info["available"][name]:
        return None
    return info["missing"][name]


def _require(name):
    reason = _usable(name)
    if reason is not None:
        if name in REQUIRED:
            pytest.fail(f"required backend {name} is missing: {reason}")
        pytest.skip(f"backend {name} not installed here: {reason}")
    return name


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Every backend, on CPU tensors (triton through the interpreter)."""
    return _require(request.param)


@pytest.fixture(params=[b for b in ALL_BACKENDS if b != "torch"])
def kernel_backend(request):
    """The backends with kernels of their own (the torch one runs the reference directly)."""
    return _require(request.param)


@pytest.fixture(params=["cpp", "numba"])
def cpu_kernel_backend(request):
    """The CPU backends with kernels of their own (deterministic by contract)."""
    return _require(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
