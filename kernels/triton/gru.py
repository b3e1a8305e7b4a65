"""gru_scan's recurrence as Triton kernels (DESIGN.md §4 "gru_scan").

Calling convention in docs/kernel_api.md, "gru_scan". As in the MIMN scan, one program owns
one row b and keeps its state h in registers, padded to a power of two with masks (padded
lanes stay exactly 0). The three (H, H) gate tiles of W_hh are loaded once per program and
reused at every step; mat-vecs are broadcast-multiply + tl.sum (``tl.dot`` needs >= 16 rows
and no fp64). Math runs in the inputs' dtype; tanh/sigmoid use tl.exp only (libdevice does
not run in the interpreter, which is how CI tests these kernels).

The backward recomputes each step's gates from h_{t-1} = out[b, t-1] (the forward's output
is every state), so it needs no checkpoints. Steps t >= lengths[b] are never run: the
launchers allocate zeros there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import device_guard, next_pow2
from .mimn import _sigmoid, _tanh

__all__ = ["gru_scan_fwd", "gru_scan_bwd"]


@triton.jit
def _gate_tiles(w_hh, b_hh, H, BH: tl.constexpr):
    """The r, z, n row blocks of W_hh (3H, H) as (BH, BH) tiles [c, k] and of b_hh (3H,) as
    (BH,) vectors, 0-padded."""
    c = tl.arange(0, BH)[:, None]
    k = tl.arange(0, BH)[None, :]
    m = (c < H) & (k < H)
    wr = tl.load(w_hh + c * H + k, mask=m, other=0.0)
    wz = tl.load(w_hh + (H + c) * H + k, mask=m, other=0.0)
    wn = tl.load(w_hh + (2 * H + c) * H + k, mask=m, other=0.0)
    j = tl.arange(0, BH)
    hm = j < H
    br = tl.load(b_hh + j, mask=hm, other=0.0)
    bz = tl.load(b_hh + H + j, mask=hm, other=0.0)
    bn = tl.load(b_hh + 2 * H + j, mask=hm, other=0.0)
    return wr, wz, wn, br, bz, bn


@triton.jit
def _gru_fwd_kernel(xp, lengths, w_hh, b_hh, h0, out, T, H, BH: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BH)
    hm = j < H
    wr, wz, wn, br, bz, bn = _gate_tiles(w_hh, b_hh, H, BH)
    h = tl.load(h0 + b * H + j, mask=hm, other=0.0)
    n_steps = tl.load(lengths + b)
    for t in range(0, n_steps):
        xt = xp + (b * T + t) * 3 * H
        hb = h[None, :]
        r = _sigmoid(tl.load(xt + j, mask=hm, other=0.0) + tl.sum(wr * hb, 1) + br)
        z = _sigmoid(tl.load(xt + H + j, mask=hm, other=0.0) + tl.sum(wz * hb, 1) + bz)
        n = _tanh(tl.load(xt + 2 * H + j, mask=hm, other=0.0) + r * (tl.sum(wn * hb, 1) + bn))
        h = tl.where(hm, (1.0 - z) * n + z * h, 0.0)
        tl.store(out + (b * T + t) * H + j, h, mask=hm)


@triton.jit
def _gru_bwd_kernel(d_out, xp, out, lengths, w_hh, b_hh, h0, dxp, dhp, dh0, T, H,
                    BH: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BH)
    hm = j < H
    wr, wz, wn, br, bz, bn = _gate_tiles(w_hh, b_hh, H, BH)
    dh = tl.load(h0 + b * H + j, mask=hm, other=0.0) * 0.0
    n_steps = tl.load(lengths + b)
    for i in range(0, n_steps):
        t = n_steps - 1 - i
        tv = j * 0 + t     # t as a vector: the masks below must be vectors (interpreter)
        hprev = (tl.load(out + (b * T + t - 1) * H + j, mask=hm & (tv > 0), other=0.0)
                 + tl.load(h0 + b * H + j, mask=hm & (tv == 0), other=0.0))
        hb = hprev[None, :]
        xt = xp + (b * T + t) * 3 * H
        hn = tl.sum(wn * hb, 1) + bn
        r = _sigmoid(tl.load(xt + j, mask=hm, other=0.0) + tl.sum(wr * hb, 1) + br)
        z = _sigmoid(tl.load(xt + H + j, mask=hm, other=0.0) + tl.sum(wz * hb, 1) + bz)
        n = _tanh(tl.load(xt + 2 * H + j, mask=hm, other=0.0) + r * hn)
        g = dh + tl.load(d_out + (b * T + t) * H + j, mask=hm, other=0.0)
        dan = g * (1.0 - z) * (1.0 - n * n)
        dar = dan * hn * r * (1.0 - r)
        daz = g * (hprev - n) * z * (1.0 - z)
        dhn = dan * r
        base = (b * T + t) * 3 * H
        tl.store(dxp + base + j, dar, mask=hm)
        tl.store(dxp + base + H + j, daz, mask=hm)
        tl.store(dxp + base + 2 * H + j, dan, mask=hm)
        tl.store(dhp + base + j, dar, mask=hm)
        tl.store(dhp + base + H + j, daz, mask=hm)
        tl.store(dhp + base + 2 * H + j, dhn, mask=hm)
        # dh_{t-1} = z g + W_hhᵀ [dar, daz, dhn]: reduce the tiles over their rows c
        back = (tl.sum(wr * dar[:, None], 0) + tl.sum(wz * daz[:, None], 0)
                + tl.sum(wn * dhn[:, None], 0))
        dh = tl.where(hm, g * z + back, 0.0)
    tl.store(dh0 + b * H + j, dh, mask=hm)


def _blocks(H: int) -> int:
    return max(16, next_pow2(H))


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """A 1-element stand-in for an empty array (a GPU launch wants a real pointer)."""
    return t if t.numel() else t.new_zeros(1)


def gru_scan_fwd(xp, lengths, w_hh, b_hh, h0):
    """xp (B, T, 3H), lengths (B,) int64, w_hh (3H, H), b_hh (3H,), h0 (B, H) -> out (B, T, H),
    0 past each row's length."""
    B, T, G = xp.shape
    H = G // 3
    out = xp.new_zeros(B, T, H)
    if out.numel() == 0:
        return out
    with device_guard(xp):
        _gru_fwd_kernel[(B,)](xp, lengths, w_hh, b_hh, h0, out, T, H, BH=_blocks(H))
    return out


def gru_scan_bwd(d_out, xp, out, lengths, w_hh, b_hh, h0):
    """-> dxp (B, T, 3H) = d(xp), dhp (B, T, 3H) = d(W_hh h + b_hh), dh0 (B, H)."""
    B, T, G = xp.shape
    H = G // 3
    dxp, dhp, dh0 = xp.new_zeros(B, T, G), xp.new_zeros(B, T, G), h0.new_zeros(B, H)
    if out.numel() == 0:
        return dxp, dhp, dh0
    with device_guard(xp):
        _gru_bwd_kernel[(B,)](d_out, xp, out, lengths, w_hh, b_hh, h0, dxp, dhp, dh0, T, H,
                              BH=_blocks(H))
    return dxp, dhp, dh0
