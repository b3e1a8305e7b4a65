"""Every sweep ``fastattn-bench`` can run, by name: the kernel sweeps (:mod:`.sweeps`), the
training sweeps (:mod:`.training_sweeps`), the serving sweeps (:mod:`.serving_sweeps`), the
EdgeRec sweeps (:mod:`.edgerec_sweeps`) and the BAHE sweeps (:mod:`.bahe_sweeps`).

The training and serving sweeps are optional: a module that fails to import (a missing
dependency of the models or the stores) leaves the others runnable, with a warning.
"""
from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Callable, Dict, List, Optional

from .sweep import Sweep
from .sweeps import KERNEL_SWEEPS

__all__ = ["SWEEPS", "select", "takes_device"]


def _optional(module: str, attr: str) -> Dict[str, Callable[..., Sweep]]:
    """The sweeps ``attr`` of ``module``, or none (with a warning) when it fails to import."""
    try:
        return dict(getattr(importlib.import_module(module), attr))
    except Exception as exc:  # noqa: BLE001 - optional sweeps must not break the others
        warnings.warn(f"{module} failed to import ({exc!r}); its sweeps are left out",
                      RuntimeWarning, stacklevel=2)
        return {}


SWEEPS: Dict[str, Callable[..., Sweep]] = {
    **KERNEL_SWEEPS,
    **_optional(f"{__package__}.training_sweeps", "TRAINING_SWEEPS"),
    **_optional(f"{__package__}.serving_sweeps", "SERVING_SWEEPS"),
    **_optional(f"{__package__}.edgerec_sweeps", "EDGEREC_SWEEPS"),
    **_optional(f"{__package__}.bahe_sweeps", "BAHE_SWEEPS"),
}


def takes_device(fn: Callable[..., Sweep]) -> bool:
    """Whether a sweep function accepts ``device`` (the serving sweeps are CPU-only)."""
    try:
        return "device" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def select(names: Optional[List[str]], quick: bool, device: str = "cpu") -> List[Sweep]:
    """The named sweeps (all by default) built for ``device``; on cuda, sweeps whose
    function takes no ``device`` are left out with a note."""
    chosen = names or list(SWEEPS)
    unknown = [n for n in chosen if n not in SWEEPS]
    if unknown:
        raise SystemExit(f"unknown sweep(s) {unknown}; choose from {list(SWEEPS)}")
    out = []
    for n in chosen:
        if takes_device(SWEEPS[n]):
            out.append(SWEEPS[n](quick, device=device))
        elif device == "cpu":
            out.append(SWEEPS[n](quick))
        else:
            print(f"note: sweep {n} is CPU-only (its function takes no device); left out")
    return out
