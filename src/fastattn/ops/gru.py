"""gru_scan: a fused varlen GRU over (B, T, I) that returns every state (DESIGN.md §4).

The input projection x W_ihᵀ + b_ih of all steps is one GEMM here in the op layer; the
kernels (cpp, numba, triton) run only the recurrence. Their backward writes the per-step
gate gradients d(x W_ihᵀ + b_ih) and d(W_hh h + b_hh), (B, T, 3H) each, and the op layer
turns them into dx, dW_ih, dW_hh and the bias gradients with GEMMs and sums, so no kernel
accumulates weight gradients per row.

No checkpoints (unlike mimn_scan): the output already holds every state, so the backward
recomputes each step's gates from h_{t-1} = out[:, t-1] with one mat-vec.

The ``torch`` backend runs :func:`fastattn.reference.gru_scan` with autograd.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference as ref
from ._common import (INDEX_DTYPES, backend_for, check_same_device, check_tensor, cpu_call,
                      kernels, require_range)

__all__ = ["gru_scan"]

_DTYPES = (torch.float32, torch.float64)


def _check(x, lengths, w_ih, w_hh, b_ih, b_hh, h0) -> Tuple[int, int, int, int]:
    """Shape/dtype checks (they hold for fake tensors too); returns (B, T, I, H)."""
    check_tensor("x", x, dtypes=_DTYPES, ndim=3, what=" (B, T, I)")
    B, T, I = x.shape
    check_tensor("w_hh", w_hh, dtypes=_DTYPES, ndim=2, what=" (3H, H)")
    H = w_hh.shape[1]
    want = {"w_ih": (3 * H, I), "w_hh": (3 * H, H), "b_ih": (3 * H,), "b_hh": (3 * H,)}
    given = {"w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}
    if h0 is not None:
        want["h0"], given["h0"] = (B, H), h0
    for name, t in given.items():
        check_tensor(name, t, dtypes=_DTYPES, what=f" {want[name]}")
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must have shape {want[name]} (B={B}, I={I} from x, H={H} "
                             f"from w_hh (3H, H)), got {tuple(t.shape)}")
    dtypes = {t.dtype for t in (x, *given.values())}
    if len(dtypes) != 1:
        raise TypeError(f"x, the weights, biases and h0 must share one dtype (float32 or "
                        f"float64), got {sorted(str(d).replace('torch.', '') for d in dtypes)}")
    check_tensor("lengths", lengths, dtypes=INDEX_DTYPES, ndim=1, what=f" and shape (B,)=({B},)")
    if lengths.shape[0] != B:
        raise ValueError(f"lengths must have shape (B,)=({B},), got {tuple(lengths.shape)}")
    check_same_device(x=x, lengths=lengths, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, h0=h0)
    return B, T, I, H


def _lengths(lengths: Tensor, T: int) -> Tensor:
    """lengths as contiguous int64, values checked to lie in [0, T] (real data only)."""
    lens = lengths.to(torch.int64).contiguous()
    require_range("lengths", lens, 0, T, f"[0, T={T}]")
    return lens


@torch.library.custom_op("fastattn::gru_scan", mutates_args=())
def _gru_scan(x: Tensor, lengths: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
              b_hh: Tensor, h0: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (out (B, T, H), xp (B, T, 3H)); xp = x W_ihᵀ + b_ih is kept for the backward."""
    B, T, I, H = _check(x, lengths, w_ih, w_hh, b_ih, b_hh, h0)
    lens = _lengths(lengths, T)
    xp = torch.addmm(b_ih, x.reshape(B * T, I), w_ih.t()).view(B, T, 3 * H)
    w_hh, b_hh = w_hh.contiguous(), b_hh.contiguous()
    h0 = x.new_zeros(B, H) if h0 is None else h0.contiguous()
    if backend == "triton":
        return kernels("triton").gru_scan_fwd(xp, lens, w_hh, b_hh, h0), xp
    out = x.new_empty(B, T, H)
    if out.numel():
        cpu_call(backend, "gru_scan_fwd", xp, lens, w_hh, b_hh, h0, out)
    return out, xp


@_gru_scan.register_fake
def _(x, lengths, w_ih, w_hh, b_ih, b_hh, h0, backend):
    B, T, I, H = _check(x, lengths, w_ih, w_hh, b_ih, b_hh, h0)
    return x.new_empty(B, T, H), x.new_empty(B, T, 3 * H)


@torch.library.custom_op("fastattn::gru_scan_backward", mutates_args=())
def _gru_scan_backward(d_out: Tensor, d_xp: Optional[Tensor], x: Tensor, xp: Tensor,
                       out: Tensor, lengths: Tensor, w_ih: Tensor, w_hh: Tensor, b_hh: Tensor,
                       h0: Optional[Tensor], backend: str
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dx, dw_ih, dw_hh, db_ih, db_hh, dh0 (dh0 zeros-shaped (B, H) if h0 is None)."""
    B, T, I = x.shape
    H = w_hh.shape[1]
    lens = lengths.to(torch.int64).contiguous()
    d_out, xp, out, w_hh, b_hh = (t.contiguous() for t in (d_out, xp, out, w_hh, b_hh))
    h0 = x.new_zeros(B, H) if h0 is None else h0.contiguous()
    if backend == "triton":
        dxp, dhp, dh0 = kernels("triton").gru_scan_bwd(d_out, xp, out, lens, w_hh, b_hh, h0)
    else:
        dxp, dhp, dh0 = x.new_empty(B, T, 3 * H), x.new_empty(B, T, 3 * H), x.new_zeros(B, H)
        if out.numel():
            cpu_call(backend, "gru_scan_bwd", d_out, xp, out, lens, w_hh, b_hh, h0, dxp, dhp,
                     dh0)
        else:
            dxp.zero_(), dhp.zero_()
    if d_xp is not None:   # only direct torch.ops calls use the second output
        dxp = dxp + d_xp
    g_in, g_hh = dxp.reshape(B * T, 3 * H), dhp.reshape(B * T, 3 * H)
    # h_{t-1} of every step; rows past their length have zero gate gradients there.
    h_prev = torch.cat([h0[:, None], out], 1)[:, :T].reshape(B * T, H)
    dx = (g_in @ w_ih).view(B, T, I)
    return (dx, g_in.t() @ x.reshape(B * T, I), g_hh.t() @ h_prev, g_in.sum(0), g_hh.sum(0),
            dh0)


@_gru_scan_backward.register_fake
def _(d_out, d_xp, x, xp, out, lengths, w_ih, w_hh, b_hh, h0, backend):
    B = x.shape[0]
    H = w_hh.shape[1]
    return (torch.empty_like(x), torch.empty_like(w_ih), torch.empty_like(w_hh),
            b_hh.new_empty(3 * H), torch.empty_like(b_hh), x.new_empty(B, H))


def _setup(ctx, inputs, output):
    x, lengths, w_ih, w_hh, b_ih, b_hh, h0, backend = inputs
    out, xp = output
    ctx.save_for_backward(x, xp, out, lengths, w_ih, w_hh, b_hh, h0)
    ctx.backend = backend
    ctx.has_h0 = h0 is not None


def _backward(ctx, d_out, d_xp):
    x, xp, out, lengths, w_ih, w_hh, b_hh, h0 = ctx.saved_tensors
    if d_out is None:
        d_out = torch.zeros_like(out)
    dx, dw_ih, dw_hh, db_ih, db_hh, dh0 = torch.ops.fastattn.gru_scan_backward(
        d_out, d_xp, x, xp, out, lengths, w_ih, w_hh, b_hh, h0, ctx.backend)
    return dx, None, dw_ih, dw_hh, db_ih, db_hh, dh0 if ctx.has_h0 else None, None


torch.library.register_autograd("fastattn::gru_scan", _backward, setup_context=_setup)


def gru_scan(x: Tensor, lengths: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
             h0: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """Varlen GRU with torch.nn.GRU's gates and equations, every state returned.

    x (B, T, I), lengths (B,) int32/int64 in [0, T] or None (all T), w_ih (3H, I),
    w_hh (3H, H), b_ih/b_hh (3H,) or None (zeros), h0 (B, H) or None (zeros)
    -> out (B, T, H): out[b, t] = h_{t+1} for t < lengths[b], 0 after (the state stops).
    Gate order (r, z, n); n = tanh(W_in x + b_in + r * (W_hn h + b_hn)). float32/float64,
    one dtype for all. Gradients flow to x, the weights, biases and h0.
    """
    check_tensor("x", x, dtypes=_DTYPES, ndim=3, what=" (B, T, I)")
    check_tensor("w_hh", w_hh, dtypes=_DTYPES, ndim=2, what=" (3H, H)")
    B, T, _ = x.shape
    H = w_hh.shape[1]
    b_ih = w_hh.new_zeros(3 * H) if b_ih is None else b_ih
    b_hh = w_hh.new_zeros(3 * H) if b_hh is None else b_hh
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=x.device)
    be = backend_for(x.device, backend)
    if be == "torch":
        _check(x, lengths, w_ih, w_hh, b_ih, b_hh, h0)
        return ref.gru_scan(x, _lengths(lengths, T), w_ih, w_hh, b_ih, b_hh, h0)
    return torch.ops.fastattn.gru_scan(x, lengths, w_ih, w_hh, b_ih, b_hh, h0, be)[0]
