"""fastattn: fused kernels for long user-behaviour sequence models (ETA, MIMN).

Ops run on the best backend available for their tensors (see :func:`backends`).
"""
from . import nn, reference
from .backends import BackendUnavailableError, backends
from .ops import (MIMNParams, MIMNState, eta_attention, hamming_distance, hamming_topk,
                  make_planes, masked_mean, mimn_initial_state, mimn_reg_loss, mimn_scan, mimn_step,
                  miu_gather_gru, ntm_read_write, simhash_sign, target_attention,
                  topk_attention, topk_gather, unique_rows)
from .ops import gru_scan

__version__ = "0.1.0"

__all__ = ["nn", "backends", "BackendUnavailableError", "reference", "simhash_sign", "make_planes",
           "hamming_distance", "hamming_topk", "topk_gather", "topk_attention", "eta_attention",
           "target_attention", "ntm_read_write", "miu_gather_gru", "mimn_scan", "mimn_step",
           "mimn_reg_loss", "mimn_initial_state", "MIMNParams", "MIMNState", "unique_rows",
           "masked_mean", "__version__"]
__all__ += ["gru_scan"]
