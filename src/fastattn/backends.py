"""Which kernel backends exist here, and which one an op call uses.

Four backends implement every op: ``triton`` (GPU, or CPU tensors under
``TRITON_INTERPRET=1``), ``cpp`` (the optional ``fastattn._C`` extension), ``numba`` (CPU
fallback) and ``torch`` (:mod:`fastattn.reference`, always present).

Choice, first match wins: the ``backend=`` argument of an op > the ``FASTATTN_BACKEND``
environment variable > the best one available for the tensors' device (CUDA: triton, else
torch; CPU: cpp, else numba, else torch). Forcing a backend that is missing here raises
:class:`BackendUnavailableError` saying how to get it. Importing fastattn never fails
because an optional backend is missing: each is probed lazily, once.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import re
from types import ModuleType
from typing import Dict, Optional, Tuple, Union

import torch

__all__ = ["BACKENDS", "ENV_VAR", "TRITON_MIN", "BackendUnavailableError", "backends",
           "available", "load", "resolve", "interpreting", "cpu_threads", "versions"]

BACKENDS = ("triton", "cpp", "numba", "torch")
ENV_VAR = "FASTATTN_BACKEND"

_MODULES = {
    "triton": "fastattn.kernels.triton",
    "cpp": "fastattn._C",
    "numba": "fastattn.kernels.numba",
    "torch": "fastattn.reference",
}

_HINTS = {
    "triton": "install it with `pip install triton` (Linux with an NVIDIA GPU; it comes with "
              "CUDA builds of torch); on CPU tensors it runs only under TRITON_INTERPRET=1",
    "cpp": "reinstall fastattn with a C++17 compiler that supports OpenMP "
           "(`pip install --force-reinstall --no-deps .`; set FASTATTN_STRICT_BUILD=1 to see "
           "the build error)",
    "numba": "install it with `pip install numba`",
    "torch": "",
}


# The Triton kernels use tl.histogram(..., mask=) (Triton 3.4) and tl.gather (3.2). Torch
# 2.8 is the first release whose CUDA builds bring Triton 3.4; an older Triton makes the
# backend unavailable (CUDA tensors then fall back to the torch reference) instead of
# failing at the first kernel launch.
TRITON_MIN = (3, 4)


def _version_tuple(version: str) -> Tuple[int, ...]:
    """(3, 4, 0) from "3.4.0", "3.4.0+git1234" or "3.5.0rc1"."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def versions() -> Dict[str, Optional[str]]:
    """Installed versions of torch and of the optional backends' packages (None: absent)."""
    out: Dict[str, Optional[str]] = {"torch": torch.__version__}
    for dist in ("triton", "numba"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    if out["triton"] is None:  # some torch builds ship it as pytorch-triton
        try:
            out["triton"] = importlib.metadata.version("pytorch-triton")
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _check_triton_version() -> None:
    import triton
    found = getattr(triton, "__version__", None) or versions()["triton"] or "0"
    if _version_tuple(found) < TRITON_MIN:
        need = ".".join(map(str, TRITON_MIN))
        raise ImportError(f"triton {found} is too old: fastattn's Triton kernels need "
                          f"triton>={need} (tl.histogram with mask=); install it with "
                          f"`pip install 'triton>={need}'` (CUDA builds of torch>=2.8 bring it)")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for (argument or FASTATTN_BACKEND) but cannot run here."""


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _probe(name: str):
    """(module, None) if the backend imports, else (None, reason). Cached: probed once."""
    try:
        if name == "triton":
            _check_triton_version()
        return importlib.import_module(_MODULES[name]), None
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, f"{type(exc).__name__}: {exc}"


def available(name: str) -> bool:
    return _probe(name)[0] is not None


def load(name: str) -> ModuleType:
    """The backend's kernel module, or BackendUnavailableError with a hint."""
    if name not in _MODULES:
        raise ValueError(f"unknown fastattn backend {name!r}; expected one of {BACKENDS}")
    module, reason = _probe(name)
    if module is None:
        raise BackendUnavailableError(
            f"fastattn backend {name!r} is not available here ({reason}); {_HINTS[name]}")
    return module


def _default(device_type: str) -> str:
    order = ("triton", "torch") if device_type == "cuda" else ("cpp", "numba", "torch")
    return next(n for n in order if available(n))


def resolve(device: Union[torch.device, str], backend: Optional[str] = None) -> str:
    """The backend an op on tensors of ``device`` uses (see the module docstring).

    Under torch.compile the choice is made once, at trace time (the environment variable
    is read then, not on every call of the compiled graph).
    """
    return _resolve(torch.device(device).type, backend)


# The choice is plain Python (imports, environment): dynamo must not trace it, only use its
# answer, which depends on nothing a graph guards.
@torch.compiler.assume_constant_result
def _resolve(device_type: str, backend: Optional[str]) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if name is None:
        return _default(device_type)
    name = name.lower()
    load(name)  # raises if unknown or missing
    if name in ("cpp", "numba") and device_type != "cpu":
        raise ValueError(f"fastattn backend {name!r} runs on CPU tensors only, got "
                         f"{device_type} tensors")
    if name == "triton" and device_type != "cuda" and not interpreting():
        raise ValueError("fastattn backend 'triton' needs CUDA tensors (or CPU tensors "
                         "with TRITON_INTERPRET=1 set before importing triton)")
    return name


def cpu_threads() -> int:
    """Thread count CPU kernels use: torch's, so all backends and baselines compare fairly."""
    return torch.get_num_threads()


def backends() -> Dict[str, object]:
    """What is usable here and which backend each device gets by default.

    Returns ``{"available": {name: bool}, "missing": {name: reason}, "cpu": name,
    "cuda": name or None, "forced": FASTATTN_BACKEND or None, "versions": {torch, triton,
    numba: version or None}, "cpu_features": ...}`` (a Triton older than ``TRITON_MIN``
    is listed under "missing" with the version found).
    """
    avail = {n: available(n) for n in BACKENDS}
    info: Dict[str, object] = {
        "available": avail,
        "missing": {n: _probe(n)[1] for n in BACKENDS if not avail[n]},
        "cpu": _default("cpu"),
        "cuda": _default("cuda") if torch.cuda.is_available() else None,
        "forced": os.environ.get(ENV_VAR) or None,
        "versions": versions(),
    }
    if avail["cpp"]:
        info["cpu_features"] = load("cpp").cpu_features()
    return info
