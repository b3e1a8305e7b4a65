"""Reference CTR models built on the fastattn ops: DIN (the dense baseline), ETA-Net, MIMN,
SIM-hard and SDIM, all taking a :class:`fastattn.data.batch.Batch` in the training layout
(U == B) or the serving layout (U == 1 shared history, B candidates).

``build(name, n_items, n_cats, **kwargs)`` constructs one by its :data:`MODELS` key;
``build(**model.config())`` rebuilds the same architecture.
"""
from __future__ import annotations

from typing import Dict, Type

from .base import CTRModel
from .din import DIN
from .eta import ETANet
from .mimn import MIMN
from .sdim import SDIM
from .sim import SIMHard

__all__ = ["MODELS", "build", "CTRModel", "DIN", "ETANet", "MIMN", "SIMHard", "SDIM"]

MODELS: Dict[str, Type[CTRModel]] = {"din": DIN, "eta": ETANet, "mimn": MIMN, "sim": SIMHard,
                                     "sdim": SDIM}


def build(name: str, n_items: int, n_cats: int, **kwargs) -> CTRModel:
    """The model ``MODELS[name](n_items, n_cats, **kwargs)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](n_items, n_cats, **kwargs)
