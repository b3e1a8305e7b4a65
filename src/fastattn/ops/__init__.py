"""The fastattn ops: torch.library custom ops (``torch.ops.fastattn.*``) with checked wrappers.

One module per op family; each holds the custom op, its fake (meta) implementation, its
autograd formula, its input checks and its backend dispatch.
"""
from .attention import eta_attention, target_attention, topk_attention
from .gather import topk_gather
from .gru import gru_scan
from .hamming import hamming_distance, hamming_topk
from .mimn import (MIMNParams, MIMNState, miu_gather_gru, mimn_initial_state, mimn_reg_loss,
                   mimn_scan, mimn_step, ntm_read_write)
from .pool import masked_mean
from .simhash import make_planes, simhash_sign
from .unique import unique_rows

__all__ = ["simhash_sign", "make_planes", "hamming_distance", "hamming_topk", "topk_gather",
           "topk_attention", "eta_attention", "target_attention",
           "ntm_read_write", "miu_gather_gru", "mimn_scan", "mimn_step", "mimn_reg_loss",
           "mimn_initial_state", "MIMNParams", "MIMNState", "unique_rows", "masked_mean"]
__all__ += ["gru_scan"]
