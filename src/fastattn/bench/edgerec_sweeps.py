"""EdgeRec sweeps (issue 17): the fused varlen GRU ``gru_scan`` against torch.nn.GRU.

The baseline is what a model would write without the op: torch.nn.GRU over
``pack_padded_sequence`` (varlen rows, every state unpacked back to (B, T, H)). Plain
torch.nn.GRU over the padded batch is listed too: it is faster than the packed one on CPU
but runs the padding steps, so its states past a row's length are wrong for varlen data.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .sweep import F32, Cost, Point, Sweep, backends_for

__all__ = ["EDGEREC_SWEEPS", "gru_scan_sweep"]


def gru_scan_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """gru_scan forward and forward+backward, B=256, I=H=32, lengths uniform in [1, T]."""
    B, I, H = 256, 32, 32
    steps = [200] if quick else [50, 200]   # packed fwd+bwd: ~15 s a call at T=200

    def cost(p: Dict[str, int], impl: str) -> Cost:
        """Forward: read x (B, T, I), write every state (B, T, H); the backward reads the
        states' gradient and writes dx. Flops: the two GRU mat-vecs, 2·3H·(I + H) per
        row-step (padding steps counted, as the dense baseline runs them), three times that
        with the backward."""
        rows = B * p["T"]
        fwd = Cost(bytes=F32 * rows * (I + H), flops=rows * 2 * 3 * H * (I + H))
        if impl.endswith("_fwd_bwd"):
            return Cost(bytes=2 * fwd.bytes, flops=3 * fwd.flops)
        return fwd

    sweep = Sweep("gru_scan", f"gru_scan (varlen GRU, every state) B={B}, I=H={H} vs "
                  "torch.nn.GRU", x="T", baseline="nn_gru_packed_fwd",
                  baseline_of=lambda impl: "nn_gru_packed_fwd_bwd" if impl.endswith("_fwd_bwd")
                  else "nn_gru_packed_fwd", cost=cost, device=device)

    def build(T: int):
        def make():
            from ..ops import gru_scan
            g = torch.Generator().manual_seed(T)
            x = torch.randn(B, T, I, generator=g).to(device).requires_grad_()
            lengths = torch.randint(1, T + 1, (B,), generator=g)
            torch.manual_seed(0)
            gru = torch.nn.GRU(I, H, batch_first=True).to(device)
            w = [gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0]
            lens_dev = lengths.to(device)

            def packed():
                pk = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
                return pad_packed_sequence(gru(pk)[0], batch_first=True, total_length=T)[0]

            def plain():
                return gru(x)[0]

            impls: Dict[str, Callable[[], object]] = {}
            fns = {"nn_gru_packed": packed, "nn_gru": plain}
            # the torch backend (the per-step reference) is the oracle, not a contender
            for be in [b for b in backends_for(device) if b != "torch"]:
                fns[be] = lambda be=be: gru_scan(x, lens_dev, *w, backend=be)
            for name, fn in fns.items():
                def fwd(fn=fn):
                    with torch.no_grad():
                        return fn()

                def fwd_bwd(fn=fn):
                    fn().sum().backward()
                impls[name + "_fwd"] = fwd
                impls[name + "_fwd_bwd"] = fwd_bwd
            return impls
        return make

    # x, every state, the backward's gate gradients (2 x 3H) and the GRU's own workspace
    sweep.points = [Point({"T": T, "B": B}, build(T), pairs=B * T,
                          mem_bytes=F32 * B * T * (2 * I + 12 * H)) for T in steps]
    return sweep


EDGEREC_SWEEPS: Dict[str, Callable[..., Sweep]] = {"gru_scan": gru_scan_sweep}
