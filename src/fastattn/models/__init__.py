"""Reference CTR models built on the fastattn ops: DIN (the dense baseline), ETA-Net, MIMN,
SIM-hard and SDIM (:data:`MODELS`), BAHE with its LLM-CTR baseline over item token
strings (:data:`TEXT_MODELS`), and the EdgeRec re-ranker over click and exposure sequences
with detail features (:data:`SEQUENCE_MODELS`, an ``EdgeRecBatch``), all taking a
:class:`fastattn.data.batch.Batch` in the training layout (U == B) or the serving layout (U == 1 shared history, B candidates).

``build(name, n_items, n_cats, **kwargs)`` constructs one by its key;
``build(**model.config())`` rebuilds the same architecture.
"""
from __future__ import annotations

from typing import Dict, Type

from .bahe import BAHE, LLMCTR
from .base import CTRModel
from .din import DIN
from .edgerec import EdgeRec
from .eta import ETANet
from .mimn import MIMN
from .sdim import SDIM
from .sim import SIMHard

__all__ = ["MODELS", "TEXT_MODELS", "build", "CTRModel", "DIN", "ETANet", "MIMN", "SIMHard",
           "SDIM", "BAHE", "LLMCTR", "SEQUENCE_MODELS", "EdgeRec"]

MODELS: Dict[str, Type[CTRModel]] = {"din": DIN, "eta": ETANet, "mimn": MIMN, "sim": SIMHard,
                                     "sdim": SDIM}
# Models over item token strings (they also need ``item_tokens``): kept apart from MODELS,
# whose models all train on ids alone (``fastattn-train``'s default set).
TEXT_MODELS: Dict[str, Type[CTRModel]] = {"bahe": BAHE, "llm_ctr": LLMCTR}
# Models over click and exposure sequences with detail features (an EdgeRecBatch from
# fastattn.data.edgerec): their own data, so also kept apart from MODELS.
SEQUENCE_MODELS: Dict[str, Type[CTRModel]] = {"edgerec": EdgeRec}


def build(name: str, n_items: int, n_cats: int, **kwargs) -> CTRModel:
    """The model ``MODELS[name](n_items, n_cats, **kwargs)`` (or ``TEXT_MODELS[name]``,
    ``SEQUENCE_MODELS[name]``)."""
    known = {**MODELS, **TEXT_MODELS, **SEQUENCE_MODELS}
    if name not in known:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(known)}")
    return known[name](n_items, n_cats, **kwargs)
