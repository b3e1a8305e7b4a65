"""numba CPU fallback kernels of fastattn (used when the C++ extension ``fastattn._C`` is absent).

Same names and arguments as the C++ kernels in docs/kernel_api.md, minus ``nthreads``: the op
layer sets the thread count with ``numba.set_num_threads``. Every kernel takes contiguous,
already-validated numpy arrays and writes into preallocated outputs.

Each kernel is compiled lazily on its first call for the argument types it sees (int64
indices, f32 or f64 floats, uint8 rows), and cached on disk (``cache=True``), so a process
pays the compile cost once per machine, not once per import.
"""
from .attention import topk_attention_bwd, topk_attention_fwd
from .gather import gather_rows, last_matches, scatter_add_rows
from .gru import gru_scan_bwd, gru_scan_fwd
from .hamming import hamming_distance, hamming_topk, hamming_topk_rows
from .mimn import (mimn_scan_bwd, mimn_scan_fwd, miu_gather_gru_bwd, miu_gather_gru_fwd,
                   ntm_read_write_bwd, ntm_read_write_fwd)
from .pool import masked_mean_bwd, masked_mean_fwd
from .simhash import simhash_sign, simhash_sign_rows
from .unique import unique_rows

__all__ = ["simhash_sign", "simhash_sign_rows", "hamming_distance", "hamming_topk", "hamming_topk_rows",
           "gather_rows", "scatter_add_rows", "last_matches"]
__all__ += ["topk_attention_fwd", "topk_attention_bwd"]
__all__ += ["unique_rows"]
__all__ += ["ntm_read_write_fwd", "ntm_read_write_bwd", "miu_gather_gru_fwd",
            "miu_gather_gru_bwd", "mimn_scan_fwd", "mimn_scan_bwd"]
__all__ += ["gru_scan_fwd", "gru_scan_bwd"]
__all__ += ["masked_mean_fwd", "masked_mean_bwd"]
