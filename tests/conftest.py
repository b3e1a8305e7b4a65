"""Shared fixtures.

Where the Triton backend runs: on CUDA tensors when a GPU is present (compiled kernels),
otherwise on CPU tensors through the interpreter (TRITON_INTERPRET=1, which must be set
before triton is first imported, and which excludes compiled kernels in the same process).
``FASTATTN_TEST_DEVICE=cpu`` keeps the interpreter on a GPU machine.

The ``backend`` fixtures give each test its backend; for ``triton`` on a GPU machine they
also make CUDA the default device for the test's duration, so the same differential tests,
gradchecks, opchecks and torch.compile tests run on CUDA tensors (tests that build tensors
through :func:`device_of` or with no explicit device follow it; draws seeded by a CPU
generator are made on the host and moved, :class:`helpers.HostSeededDraws`).
"""
import os

import torch

# Decided before triton is imported (fastattn imports it lazily, tests import it below).
DEVICE = os.environ.get("FASTATTN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available()
                                                    else "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"FASTATTN_TEST_DEVICE must be cpu or cuda, got {DEVICE!r}")
if DEVICE == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError("FASTATTN_TEST_DEVICE=cuda, but torch sees no CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 runs Triton on CPU tensors only; unset it to "
                           "test on CUDA (or set FASTATTN_TEST_DEVICE=cpu)")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastattn import backends as fa_backends  # noqa: E402

from helpers import HostSeededDraws  # noqa: E402

ALL_BACKENDS = ("torch", "numba", "cpp", "triton")
# `make test` sets this so a backend that failed to install fails the run instead of skipping.
REQUIRED = {b for b in os.environ.get("FASTATTN_REQUIRE_BACKENDS", "").split(",") if b}


def device_of(backend: str) -> str:
    """The device a backend's tests run on: CUDA for triton on a GPU machine, else CPU."""
    return DEVICE if backend == "triton" else "cpu"


def checks_values_on_host(backend: str) -> bool:
    """Whether a bad value (a length, an index, a row) given to ``backend`` raises ValueError.

    On the CPU, yes. On CUDA the op checks values with a device-side assert instead (no host
    sync, DESIGN §7). Such an assert is sticky: every later CUDA call in that process fails.
    So tests feed bad values only where this holds. test_gpu_readiness checks the CUDA
    assert in a subprocess.
    """
    return device_of(backend) == "cpu"


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


def _on_device(name):
    """Yield ``name`` with the default device set to where its tests run."""
    dev = device_of(name)
    if dev == "cpu":
        yield name
        return
    prev = torch.get_default_device()
    torch.set_default_device(dev)
    try:
        with HostSeededDraws(dev):   # CPU-seeded draws: the same data as on the CPU
            yield name
    finally:
        # None, not "cpu": a CPU default device would leave a device mode on the torch
        # function stack, which sends later eager calls through the dispatcher.
        torch.set_default_device(None if prev.type == "cpu" else prev)


@pytest.fixture
def cpp_backend():
    """The C++ backend, for tests of C++-only paths: skipped where it is not built, a failure
    where it is required (FASTATTN_REQUIRE_BACKENDS), like the parametrised fixtures."""
    return _require("cpp")


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Every backend (triton on CUDA tensors when a GPU is present, else the interpreter)."""
    yield from _on_device(_require(request.param))


@pytest.fixture(params=[b for b in ALL_BACKENDS if b != "torch"])
def kernel_backend(request):
    """The backends with kernels of their own (the torch one runs the reference directly)."""
    yield from _on_device(_require(request.param))


@pytest.fixture(params=["cpp", "numba"])
def cpu_kernel_backend(request):
    """The CPU backends with kernels of their own (deterministic by contract)."""
    return _require(request.param)


@pytest.fixture
def triton_device():
    """(backend, device) of the Triton tests: CUDA when a GPU is present, else the CPU
    interpreter; the default device follows."""
    for name in _on_device(_require("triton")):
        yield name, device_of(name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
