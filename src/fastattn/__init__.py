"""fastattn: fused kernels for long user-behaviour sequence models (ETA, MIMN).

Ops run on the best backend available for their tensors (see :func:`backends`).
"""
from . import nn, reference
from .backends import BackendUnavailableError, backends
from .ops import (eta_attention, hamming_distance, hamming_topk, make_planes, simhash_sign,
                  target_attention, topk_attention, topk_gather)

__version__ = "0.1.0"

__all__ = ["nn", "backends", "BackendUnavailableError", "reference", "simhash_sign", "make_planes",
           "hamming_distance", "hamming_topk", "topk_gather", "topk_attention", "eta_attention",
           "target_attention", "__version__"]
