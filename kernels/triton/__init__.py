"""Triton kernels of fastattn (GPU; CPU tensors under TRITON_INTERPRET=1).

Launchers take and return torch tensors; calling convention in docs/kernel_api.md. Inputs
are contiguous and already checked by the op layer (src/fastattn/ops).
"""
from .attention import topk_attention_bwd, topk_attention_fwd
from .gather import gather_rows, scatter_add_rows
from .gru import gru_scan_bwd, gru_scan_fwd
from .hamming import hamming_distance, hamming_topk, hamming_topk_rows
from .mimn import (miu_gather_gru_bwd, miu_gather_gru_fwd, mimn_scan_bwd, mimn_scan_fwd,
                   ntm_read_write_bwd, ntm_read_write_fwd)
from .pool import masked_mean_bwd, masked_mean_fwd
from .simhash import simhash_sign

__all__ = ["simhash_sign", "hamming_distance", "hamming_topk", "hamming_topk_rows",
           "gather_rows", "scatter_add_rows"]
__all__ += ["topk_attention_fwd", "topk_attention_bwd"]
__all__ += ["ntm_read_write_fwd", "ntm_read_write_bwd", "miu_gather_gru_fwd",
            "miu_gather_gru_bwd", "mimn_scan_fwd", "mimn_scan_bwd"]
__all__ += ["gru_scan_fwd", "gru_scan_bwd"]
__all__ += ["masked_mean_fwd", "masked_mean_bwd"]
