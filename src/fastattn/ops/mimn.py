"""MIMN ops: the NTM read/write with MUR, the MIU gather-GRU, and the fused scan over whole
sequences (DESIGN.md §5).

Each op is a torch.library custom op with a kernel backward for the cpp, numba and triton
backends. The ``torch`` backend runs :mod:`fastattn.reference` directly, with autograd
through its torch ops, so that the oracle stays the plain equations.

The scan's backward recomputes instead of storing every step: the forward keeps the state
at the start of each chunk of ``chunk ≈ sqrt(T)`` steps, and the backward replays one chunk
at a time. At B=256, T=1000, D=32, m=8, Hc=Hs=32 (fp32) that is 32 checkpoints of 584
floats per row, 19 MB, instead of 600 MB for every step's state. The C++ scan can also keep
each step's intermediates (``save_tapes``, on by default within ``TAPE_BUDGET``), so that the
replay only re-runs the memory's write.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import reference as ref
from ..backends import cpu_threads
from ..reference import MIMNParams, MIMNState
from ._common import (FLOAT_DTYPES, HostBufferPool, backend_for, check_same_device,
                      check_tensor, cpu_call, kernels, require_range, set_numba_threads)

__all__ = ["ntm_read_write", "miu_gather_gru", "mimn_scan", "mimn_step", "mimn_reg_loss",
           "mimn_initial_state", "bind_step", "BoundStep", "KERNEL_PARAMS", "MIMNParams",
           "MIMNState", "TAPE_BUDGET", "tape_floats"]

_KERNEL_DTYPES = (torch.float32, torch.float64)


def _opt(t: Optional[Tensor], like: Tensor, *shape: int) -> Tensor:
    """An absent optional parameter as the empty array the kernels expect."""
    return like.new_empty(shape) if t is None else t.contiguous()


def _c(*ts: Tensor):
    return tuple(t.contiguous() for t in ts)


def _op_devices(fn: str, **tensors: Optional[Tensor]) -> None:
    """ValueError unless every given tensor is on one device (checked in the custom ops)."""
    devs = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got "
                         + ", ".join(f"{k} on {d}" for k, d in devs.items()))


def default_chunk(T: int) -> int:
    return max(1, math.isqrt(max(T, 1) - 1) + 1)   # ceil(sqrt(T))


# --------------------------------------------------------------------------- ntm_read_write

@torch.library.custom_op("fastattn::ntm_read_write", mutates_args=())
def _ntm_read_write(M: Tensor, g: Tensor, head: Tensor, mur_w: Optional[Tensor],
                    mur_b: Optional[Tensor], backend: str
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _op_devices("fastattn::ntm_read_write", M=M, g=g, head=head, mur_w=mur_w, mur_b=mur_b)
    B, m, D = M.shape
    has_mur = mur_w is not None
    M, g, head = _c(M, g, head)
    mw, mb = _opt(mur_w, M, 0, 0), _opt(mur_b, M, 0)
    if backend == "triton":
        return tuple(kernels("triton").ntm_read_write_fwd(M, g, head, mw, mb, has_mur))
    read, M_out = M.new_zeros(B, D), torch.empty_like(M)
    g_out, wr = torch.empty_like(g), torch.empty_like(g)
    if B:
        cpu_call(backend, "ntm_read_write_fwd", M, g, head, mw, mb, has_mur, read, M_out, g_out,
                 wr)
    return read, M_out, g_out, wr


@_ntm_read_write.register_fake
def _(M, g, head, mur_w, mur_b, backend):
    B, m, D = M.shape
    return M.new_empty(B, D), torch.empty_like(M), torch.empty_like(g), torch.empty_like(g)


@torch.library.custom_op("fastattn::ntm_read_write_backward", mutates_args=())
def _ntm_read_write_backward(d_read: Tensor, d_M: Tensor, d_g: Tensor, d_wr: Tensor, M: Tensor,
                             g: Tensor, head: Tensor, mur_w: Optional[Tensor],
                             mur_b: Optional[Tensor], backend: str
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, m, D = M.shape
    has_mur = mur_w is not None
    d_read, d_M, d_g, d_wr, M, g, head = _c(d_read, d_M, d_g, d_wr, M, g, head)
    mw, mb = _opt(mur_w, M, 0, 0), _opt(mur_b, M, 0)
    if backend == "triton":
        return tuple(kernels("triton").ntm_read_write_bwd(d_read, d_M, d_g, d_wr, M, g, head,
                                                           mw, mb, has_mur))
    dM, dg, dhead = torch.zeros_like(M), torch.zeros_like(g), torch.zeros_like(head)
    mm = m if has_mur else 0
    dmw, dmb = M.new_zeros(B, mm, mm), M.new_zeros(B, mm)
    if B:
        cpu_call(backend, "ntm_read_write_bwd", d_read, d_M, d_g, d_wr, M, g, head, mw, mb,
                 has_mur, dM, dg, dhead, dmw, dmb)
    return dM, dg, dhead, dmw.sum(0), dmb.sum(0)


@_ntm_read_write_backward.register_fake
def _(d_read, d_M, d_g, d_wr, M, g, head, mur_w, mur_b, backend):
    mm = M.shape[1] if mur_w is not None else 0
    return (torch.empty_like(M), torch.empty_like(g), torch.empty_like(head),
            M.new_empty(mm, mm), M.new_empty(mm))


def _ntm_setup(ctx, inputs, output):
    M, g, head, mur_w, mur_b, backend = inputs
    ctx.save_for_backward(M, g, head, mur_w, mur_b)
    ctx.backend = backend


def _ntm_backward(ctx, d_read, d_M, d_g, d_wr):
    M, g, head, mur_w, mur_b = ctx.saved_tensors
    zeros = [torch.zeros_like(t) if d is None else d
             for d, t in ((d_read, M[:, 0]), (d_M, M), (d_g, g), (d_wr, g))]
    dM, dg, dhead, dmw, dmb = torch.ops.fastattn.ntm_read_write_backward(
        *zeros, M, g, head, mur_w, mur_b, ctx.backend)
    has_mur = mur_w is not None
    return dM, dg, dhead, dmw if has_mur else None, dmb if has_mur else None, None


torch.library.register_autograd("fastattn::ntm_read_write", _ntm_backward,
                                setup_context=_ntm_setup)


# --------------------------------------------------------------------------- miu_gather_gru

@torch.library.custom_op("fastattn::miu_gather_gru", mutates_args=())
def _miu_gather_gru(M: Tensor, x: Tensor, S: Tensor, wr: Tensor, miu_k: int, w_ih: Tensor,
                    w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, backend: str) -> Tensor:
    _op_devices("fastattn::miu_gather_gru", M=M, x=x, S=S, wr=wr, w_ih=w_ih, w_hh=w_hh,
                b_ih=b_ih, b_hh=b_hh)
    if isinstance(miu_k, bool) or not 0 <= miu_k <= M.shape[1]:
        raise ValueError(f"fastattn::miu_gather_gru: miu_k must be in [0, slots="
                         f"{M.shape[1]}], got {miu_k!r}")
    args = _c(M, x, S, wr)
    params = _c(w_ih, w_hh, b_ih, b_hh)
    if backend == "triton":
        return kernels("triton").miu_gather_gru_fwd(*args, miu_k, *params)
    S_out = torch.empty_like(S)
    if S.numel():
        cpu_call(backend, "miu_gather_gru_fwd", *args, miu_k, *params, S_out)
    return S_out


@_miu_gather_gru.register_fake
def _(M, x, S, wr, miu_k, w_ih, w_hh, b_ih, b_hh, backend):
    return torch.empty_like(S)


@torch.library.custom_op("fastattn::miu_gather_gru_backward", mutates_args=())
def _miu_gather_gru_backward(d_S: Tensor, M: Tensor, x: Tensor, S: Tensor, wr: Tensor,
                             miu_k: int, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
                             backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                    Tensor, Tensor]:
    args = _c(d_S, M, x, S, wr)
    params = _c(w_ih, w_hh, b_ih, b_hh)
    if backend == "triton":
        return tuple(kernels("triton").miu_gather_gru_bwd(*args, miu_k, *params))
    B = M.shape[0]
    dM, dx, dS = torch.zeros_like(M), torch.zeros_like(x), torch.zeros_like(S)
    rows = [M.new_zeros(B, *p.shape) for p in params]
    if B:
        cpu_call(backend, "miu_gather_gru_bwd", *args, miu_k, *params, dM, dx, dS, *rows)
    return (dM, dx, dS) + tuple(r.sum(0) for r in rows)


@_miu_gather_gru_backward.register_fake
def _(d_S, M, x, S, wr, miu_k, w_ih, w_hh, b_ih, b_hh, backend):
    return tuple(torch.empty_like(t) for t in (M, x, S, w_ih, w_hh, b_ih, b_hh))


def _miu_setup(ctx, inputs, output):
    M, x, S, wr, miu_k, w_ih, w_hh, b_ih, b_hh, backend = inputs
    ctx.save_for_backward(M, x, S, wr, w_ih, w_hh, b_ih, b_hh)
    ctx.miu_k, ctx.backend = miu_k, backend


def _miu_backward(ctx, d_S):
    M, x, S, wr, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
    dM, dx, dS, dw_ih, dw_hh, db_ih, db_hh = torch.ops.fastattn.miu_gather_gru_backward(
        d_S, M, x, S, wr, ctx.miu_k, w_ih, w_hh, b_ih, b_hh, ctx.backend)
    return dM, dx, dS, None, None, dw_ih, dw_hh, db_ih, db_hh, None


torch.library.register_autograd("fastattn::miu_gather_gru", _miu_backward,
                                setup_context=_miu_setup)


# --------------------------------------------------------------------------- mimn_scan

# The twelve parameter arrays of the kernels, in their argument order (docs/kernel_api.md
# "MIMN"): written here once; mimn_scan and bind_step build their argument lists from it.
KERNEL_PARAMS = ("ctrl_w_ih", "ctrl_w_hh", "ctrl_b_ih", "ctrl_b_hh", "heads_w", "heads_b",
                 "mur_w", "mur_b", "miu_w_ih", "miu_w_hh", "miu_b_ih", "miu_b_hh")


def kernel_params(p: MIMNParams) -> list:
    """The twelve kernel parameters of ``p`` in KERNEL_PARAMS order; the MIU ones None
    when ``p.miu_k`` is 0 (the kernels do not read them)."""
    ps = [getattr(p, n) for n in KERNEL_PARAMS]
    if not p.miu_k:
        ps[8:] = [None] * 4
    return ps


def _check_scan_op(fn: str, x: Tensor, lengths: Tensor, params, miu_k: int, states,
                   chunk: int) -> None:
    """The custom ops' own checks (torch.compile and direct torch.ops calls skip the
    wrapper): types, devices, dtypes, shapes, chunk and the range of lengths, before any
    kernel reads an element."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{fn}: chunk must be an int >= 1, got {chunk!r}")
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"{fn}: x must be a (B, T, x_dim) tensor")
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{fn}: x must be float32 or float64, got {x.dtype}")
    B, T, Dx = x.shape
    if lengths.dtype != torch.int64 or tuple(lengths.shape) != (B,):
        raise ValueError(f"{fn}: lengths must be int64 of shape (B,)=({B},), got "
                         f"{lengths.dtype} {tuple(lengths.shape)}")
    named = dict(zip(KERNEL_PARAMS, params))
    h0, r0, M0, g0, S0 = states
    if M0.dim() != 3 or S0.dim() != 3 or named["ctrl_w_hh"].dim() != 2:
        raise ValueError(f"{fn}: M0 must be (B, slots, mem_dim), S0 (B, slots, miu_dim) and "
                         f"ctrl_w_hh (3·ctrl_dim, ctrl_dim)")
    _, m, D = M0.shape
    Hs, Hc = S0.shape[2], named["ctrl_w_hh"].shape[1]
    if isinstance(miu_k, bool) or not isinstance(miu_k, int) or not 0 <= miu_k <= m:
        raise ValueError(f"{fn}: miu_k must be an int in [0, slots={m}], got {miu_k!r}")
    if (named["mur_w"] is None) != (named["mur_b"] is None):
        raise ValueError(f"{fn}: mur_w and mur_b must both be given or both be None")
    want = dict(ctrl_w_ih=(3 * Hc, Dx + D), ctrl_w_hh=(3 * Hc, Hc), ctrl_b_ih=(3 * Hc,),
                ctrl_b_hh=(3 * Hc,), heads_w=(4 * D + 2, Hc), heads_b=(4 * D + 2,),
                mur_w=(m, m), mur_b=(m,), miu_w_ih=(3 * Hs, D + Dx), miu_w_hh=(3 * Hs, Hs),
                miu_b_ih=(3 * Hs,), miu_b_hh=(3 * Hs,), h0=(B, Hc), r0=(B, D), M0=(B, m, D),
                g0=(B, m), S0=(B, m, Hs))
    tensors = dict(named, h0=h0, r0=r0, M0=M0, g0=g0, S0=S0)
    for name, t in tensors.items():
        if t is None:
            if miu_k and name.startswith("miu_"):
                raise ValueError(f"{fn}: miu_k={miu_k} needs {name}")
            continue
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, x on {x.device}: all tensors "
                             "must be on one device")
        if t.dtype != x.dtype:
            raise TypeError(f"{fn}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{fn}: {name} must have shape {want[name]} (B={B}, x_dim={Dx}, "
                             f"mem_dim={D}, slots={m}, ctrl_dim={Hc}, miu_dim={Hs}), got "
                             f"{tuple(t.shape)}")
    _check_lengths(fn, lengths, T, x.device)


def _check_lengths(fn: str, lengths: Tensor, T: int, device) -> None:
    if lengths.device != device:
        raise ValueError(f"{fn}: lengths is on {lengths.device}, x on {device}")
    # ValueError on the host for CPU tensors; on CUDA a device-side assert (no sync).
    require_range(f"{fn}: lengths", lengths, 0, T, f"[0, T={T}]")


@torch.library.custom_op("fastattn::mimn_check_lengths", mutates_args=())
def _mimn_check_lengths(lengths: Tensor, T: int) -> Tensor:
    """lengths (a copy), or ValueError unless they lie in [0, T]: the torch backend's check
    under torch.compile (an opaque op, so the data-dependent test runs at run time; its
    output is what the reference then reads, so the graph cannot drop it)."""
    _check_lengths("mimn_scan", lengths, T, lengths.device)
    return lengths.clone()


@_mimn_check_lengths.register_fake
def _(lengths, T):
    return torch.empty_like(lengths)


@torch.library.custom_op("fastattn::mimn_scan", mutates_args=())
def _mimn_scan(x: Tensor, lengths: Tensor, ctrl_w_ih: Tensor, ctrl_w_hh: Tensor,
               ctrl_b_ih: Tensor, ctrl_b_hh: Tensor, heads_w: Tensor, heads_b: Tensor,
               mur_w: Optional[Tensor], mur_b: Optional[Tensor], miu_w_ih: Optional[Tensor],
               miu_w_hh: Optional[Tensor], miu_b_ih: Optional[Tensor],
               miu_b_hh: Optional[Tensor], miu_k: int, h0: Tensor, r0: Tensor, M0: Tensor,
               g0: Tensor, S0: Tensor, chunk: int, backend: str, save_tapes: bool = False
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                          Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns reads, the final (h, r, M, g, S), the five checkpoint arrays and the tapes:
    with ``save_tapes`` on the cpp backend (B, T, tape_floats), every valid step's
    intermediates for the backward (entries at padded steps are unspecified), else an
    empty (0,) tensor."""
    _check_scan_op("fastattn::mimn_scan", x, lengths,
                   (ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh, heads_w, heads_b, mur_w, mur_b,
                    miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh), miu_k, (h0, r0, M0, g0, S0), chunk)
    B, T, _ = x.shape
    params = _scan_params(x, ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh, heads_w, heads_b,
                          mur_w, mur_b, miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh)
    state0 = _c(h0, r0, M0, g0, S0)
    x, lengths = _c(x, lengths)
    has_mur = mur_w is not None
    # uninitialised: the kernel writes the valid steps
    tapes = _TAPE_POOL.take(_tapes_shape(x, r0, M0, S0, ctrl_w_hh, miu_k), x.dtype) \
        if save_tapes and backend == "cpp" else x.new_empty(0)
    if backend == "triton":
        return (*kernels("triton").mimn_scan_fwd(x, lengths, *params, has_mur, miu_k,
                                                  *state0, chunk), tapes)
    D = r0.shape[1]
    NC = -(-T // chunk)
    # the C++ kernel writes every element (zeros at padded steps): no fill needed
    reads = x.new_empty(B, T, D) if backend == "cpp" else x.new_zeros(B, T, D)
    final = [torch.empty_like(s) for s in state0]
    ckpts = [s.new_empty(B, NC, *s.shape[1:]) for s in state0]
    if B:
        tail = (tapes,) if backend == "cpp" else ()
        cpu_call(backend, "mimn_scan_fwd", x, lengths, *params, has_mur, miu_k, *state0, chunk,
                 reads, *final, *ckpts, *tail)
    return (reads, *final, *ckpts, tapes)


def tape_floats(x_dim: int, mem_dim: int, slots: int, ctrl_dim: int, miu_dim: int,
                miu_k: int) -> int:
    """Floats per step of the C++ scan's stored tapes: the controller's gates (4·ctrl_dim),
    the NTM record (heads, norms, both addressings, MUR), the MIU record and h after the
    step, padded to 16. Plain arithmetic (torch.compile traces it) mirroring csrc/mimn.cpp
    Layout::TSt, which the kernel checks and a test holds equal to this."""
    k = min(miu_k, slots)
    ntm = (4 * mem_dim + 2) + 5 + 9 * slots
    return -(-(4 * ctrl_dim + ntm + k * (1 + 5 * miu_dim) + ctrl_dim) // 16) * 16


# The tapes' memory, reused across training steps (see HostBufferPool): up to two
# budgets' worth of free buffers kept.
_TAPE_POOL = HostBufferPool(keep=2 * (1 << 30))


def _tapes_shape(x: Tensor, r0: Tensor, M0: Tensor, S0: Tensor, ctrl_w_hh: Tensor,
                 miu_k: int) -> Tuple[int, int, int]:
    B, T, Dx = x.shape
    return B, T, tape_floats(Dx, r0.shape[1], M0.shape[1], ctrl_w_hh.shape[1], S0.shape[2],
                             miu_k)


# Shapes of the empty arrays that stand for absent optional parameters (MUR, MIU), by
# position among the twelve kernel parameters.
_ABSENT = {6: (0, 0), 7: (0,), 8: (0, 0), 9: (0, 0), 10: (0,), 11: (0,)}


def _scan_params(like: Tensor, *params: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """The twelve kernel parameters, contiguous, absent optional ones as empty arrays."""
    return tuple(_opt(p, like, *_ABSENT.get(i, ())) for i, p in enumerate(params))


@_mimn_scan.register_fake
def _(x, lengths, ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh, heads_w, heads_b, mur_w, mur_b,
      miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh, miu_k, h0, r0, M0, g0, S0, chunk, backend,
      save_tapes=False):
    B, T, _ = x.shape
    NC = -(-T // chunk)
    state0 = (h0, r0, M0, g0, S0)
    tapes = x.new_empty(_tapes_shape(x, r0, M0, S0, ctrl_w_hh, miu_k)) \
        if save_tapes and backend == "cpp" else x.new_empty(0)
    return ((x.new_empty(B, T, r0.shape[1]),) + tuple(torch.empty_like(s) for s in state0)
            + tuple(s.new_empty(B, NC, *s.shape[1:]) for s in state0) + (tapes,))


@torch.library.custom_op("fastattn::mimn_scan_backward", mutates_args=())
def _mimn_scan_backward(d_reads: Tensor, d_h: Tensor, d_r: Tensor, d_M: Tensor, d_g: Tensor,
                        d_S: Tensor, x: Tensor, lengths: Tensor, ctrl_w_ih: Tensor,
                        ctrl_w_hh: Tensor, ctrl_b_ih: Tensor, ctrl_b_hh: Tensor, heads_w: Tensor,
                        heads_b: Tensor, mur_w: Optional[Tensor], mur_b: Optional[Tensor],
                        miu_w_ih: Optional[Tensor], miu_w_hh: Optional[Tensor],
                        miu_b_ih: Optional[Tensor], miu_b_hh: Optional[Tensor], miu_k: int,
                        chunk: int, ck_h: Tensor, ck_r: Tensor, ck_M: Tensor, ck_g: Tensor,
                        ck_S: Tensor, backend: str, tapes: Optional[Tensor] = None
                        ) -> list[Tensor]:
    """Returns dx, d(h0, r0, M0, g0, S0) and the twelve parameter gradients (empty for absent
    optional parameters). ``d_reads`` is (B, T, mem_dim), or an empty (0,) tensor for no
    gradient on the reads (a model that reads only the final state). ``tapes``: the
    forward's stored tapes (cpp), which the backward reads instead of recomputing each
    step; None or empty: recompute."""
    _check_scan_op("fastattn::mimn_scan_backward", x, lengths,
                   (ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh, heads_w, heads_b, mur_w, mur_b,
                    miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh), miu_k, (d_h, d_r, d_M, d_g, d_S),
                   chunk)
    NC = -(-x.shape[1] // chunk)
    for name, c, g in zip(("ck_h", "ck_r", "ck_M", "ck_g", "ck_S"),
                          (ck_h, ck_r, ck_M, ck_g, ck_S), (d_h, d_r, d_M, d_g, d_S)):
        want = (g.shape[0], NC, *g.shape[1:])
        if tuple(c.shape) != want or c.dtype != x.dtype or c.device != x.device:
            raise ValueError(f"fastattn::mimn_scan_backward: {name} must be {x.dtype} of shape "
                             f"{want} on {x.device}, got {c.dtype} {tuple(c.shape)} on "
                             f"{c.device}")
    if tuple(d_reads.shape) not in ((x.shape[0], x.shape[1], d_r.shape[1]), (0,)) or \
            d_reads.dtype != x.dtype or d_reads.device != x.device:
        raise ValueError("fastattn::mimn_scan_backward: d_reads must be (B, T, mem_dim) or "
                         f"empty (0,), with x's dtype and device, got {d_reads.dtype} "
                         f"{tuple(d_reads.shape)}")
    if tapes is None or tapes.numel() == 0:
        tapes = x.new_empty(0)
    elif backend != "cpp":
        raise ValueError("fastattn::mimn_scan_backward: tapes are the cpp backend's; "
                         f"backend {backend!r} recomputes (pass None)")
    else:
        want = _tapes_shape(x, d_r, d_M, d_S, ctrl_w_hh, miu_k)
        if tuple(tapes.shape) != want or tapes.dtype != x.dtype or \
                tapes.device != x.device:
            raise ValueError(f"fastattn::mimn_scan_backward: tapes must be {x.dtype} of shape "
                             f"{tuple(want)} on {x.device} (the forward's), got {tapes.dtype} "
                             f"{tuple(tapes.shape)} on {tapes.device}")
        tapes = tapes.contiguous()
    if d_reads.numel() == 0 and backend != "cpp":     # only the C++ kernel skips them itself
        d_reads = x.new_zeros(x.shape[0], x.shape[1], d_r.shape[1])
    params = _scan_params(x, ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh, heads_w, heads_b,
                          mur_w, mur_b, miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh)
    grads = _c(d_reads, d_h, d_r, d_M, d_g, d_S)
    ckpts = _c(ck_h, ck_r, ck_M, ck_g, ck_S)
    x, lengths = _c(x, lengths)
    has_mur = mur_w is not None
    if backend == "triton":
        return list(kernels("triton").mimn_scan_bwd(*grads, x, lengths, *params, has_mur,
                                                     miu_k, chunk, *ckpts))
    B = x.shape[0]
    if backend == "cpp":
        # writes every element of dx and the state0 gradients, and the parameter-gradient
        # totals (its tiles' partial sums added in tile order)
        dx = torch.empty_like(x) if B else torch.zeros_like(x)
        dstate0 = [torch.empty_like(g) if B else torch.zeros_like(g) for g in grads[1:]]
        dparams = [torch.zeros_like(p) for p in params]
        if B:
            cpu_call(backend, "mimn_scan_bwd", *grads, x, lengths, *params, has_mur, miu_k,
                     chunk, *ckpts, tapes, dx, *dstate0, *dparams)
        return [dx, *dstate0, *dparams]
    dx = torch.zeros_like(x)
    dstate0 = [torch.zeros_like(g) for g in grads[1:]]
    rows = [x.new_zeros(B, *p.shape) for p in params]
    if B:
        cpu_call(backend, "mimn_scan_bwd", *grads, x, lengths, *params, has_mur, miu_k, chunk,
                 *ckpts, dx, *dstate0, *rows)
    return [dx, *dstate0] + [r.sum(0) for r in rows]


@_mimn_scan_backward.register_fake
def _(d_reads, d_h, d_r, d_M, d_g, d_S, x, lengths, ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh,
      heads_w, heads_b, mur_w, mur_b, miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh, miu_k, chunk,
      ck_h, ck_r, ck_M, ck_g, ck_S, backend, tapes=None):
    params = (ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh, heads_w, heads_b, mur_w, mur_b,
              miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh)
    out = [torch.empty_like(x)] + [torch.empty_like(g) for g in (d_h, d_r, d_M, d_g, d_S)]
    return out + [x.new_empty(_ABSENT[i]) if p is None else torch.empty_like(p)
                  for i, p in enumerate(params)]


def _scan_setup(ctx, inputs, output):
    x, lengths, params12 = inputs[0], inputs[1], inputs[2:14]
    miu_k, chunk, backend = inputs[14], inputs[20], inputs[21]
    ckpts, tapes = output[6:11], output[11]
    # unused outputs (the reads of a model that reads only the final state, the
    # checkpoints) reach the backward as None, not as materialised zeros: at B=128, T=1000
    # that was a 16 MB fill and read of d_reads plus two checkpoint-sized fills per step
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, lengths, *params12, *ckpts, tapes)
    ctx.miu_k, ctx.chunk, ctx.backend = miu_k, chunk, backend
    ctx.present = [p is not None for p in params12]


def _scan_backward(ctx, d_reads, d_h, d_r, d_M, d_g, d_S, *_ckpt_and_tape_grads):
    x, lengths, *rest = ctx.saved_tensors
    params12, ckpts, tapes = rest[:12], rest[12:17], rest[17]
    outs = (d_reads, d_h, d_r, d_M, d_g, d_S)
    B, T, _ = x.shape
    shapes = [(B, T, ckpts[1].shape[2])] + [(B, *c.shape[2:]) for c in ckpts]
    grads = [x.new_zeros(s) if d is None else d for d, s in zip(outs, shapes)]
    if d_reads is None:       # a model that reads only the final state: no (B, T, D) zeros
        grads[0] = x.new_zeros(0)
    res = torch.ops.fastattn.mimn_scan_backward(*grads, x, lengths, *params12, ctx.miu_k,
                                                ctx.chunk, *ckpts, ctx.backend, tapes)
    dx, dstate0, dparams = res[0], res[1:6], res[6:]
    dparams = [d if present else None for d, present in zip(dparams, ctx.present)]
    return (dx, None, *dparams, None, *dstate0, None, None, None)


torch.library.register_autograd("fastattn::mimn_scan", _scan_backward, setup_context=_scan_setup)


# --------------------------------------------------------------------------- wrappers

def _dims(p: MIMNParams):
    """(Dx, D, m, Hc, Hs) implied by the parameters, with their shapes checked."""
    for name in ("ctrl_w_ih", "ctrl_w_hh", "ctrl_b_ih", "ctrl_b_hh", "heads_w", "heads_b",
                 "mem0"):
        check_tensor(f"params.{name}", getattr(p, name), dtypes=FLOAT_DTYPES)
    check_tensor("params.mem0", p.mem0, dtypes=FLOAT_DTYPES, ndim=2, what=" (slots, mem_dim)")
    m, D = p.mem0.shape
    Hc = p.ctrl_w_hh.shape[-1]
    Dx = p.ctrl_w_ih.shape[-1] - D
    want = {"ctrl_w_ih": (3 * Hc, Dx + D), "ctrl_w_hh": (3 * Hc, Hc), "ctrl_b_ih": (3 * Hc,),
            "ctrl_b_hh": (3 * Hc,), "heads_w": (4 * D + 2, Hc), "heads_b": (4 * D + 2,)}
    if (p.mur_w is None) != (p.mur_b is None):
        raise ValueError("params.mur_w and params.mur_b must both be given or both be None")
    if p.mur_w is not None:
        want.update(mur_w=(m, m), mur_b=(m,))
    if isinstance(p.miu_k, bool) or not isinstance(p.miu_k, int) or not 0 <= p.miu_k <= m:
        raise ValueError(f"params.miu_k must be an int in [0, slots={m}], got {p.miu_k!r}")
    Hs = 0
    if p.miu_k:
        if p.miu_w_hh is None:
            raise ValueError("params.miu_k >= 1 needs the MIU GRU weights (miu_w_ih, ...)")
        Hs = p.miu_w_hh.shape[-1]
        want.update(miu_w_ih=(3 * Hs, D + Dx), miu_w_hh=(3 * Hs, Hs), miu_b_ih=(3 * Hs,),
                    miu_b_hh=(3 * Hs,))
    if Dx < 0:
        raise ValueError(f"params.ctrl_w_ih must be (3·ctrl_dim, x_dim + mem_dim={D}+x_dim), "
                         f"got {tuple(p.ctrl_w_ih.shape)}")
    for name, shape in want.items():
        t = getattr(p, name)
        if t is None or tuple(t.shape) != shape:
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"params.{name} must have shape {shape} (x_dim={Dx}, mem_dim={D}, "
                             f"slots={m}, ctrl_dim={Hc}, miu_dim={Hs}), got {got}")
    return Dx, D, m, Hc, Hs


def _check_state(state: MIMNState, B: int, D: int, m: int, Hc: int, Hs: int,
                 dtype: torch.dtype) -> None:
    if not isinstance(state, tuple) or len(state) != 5:
        raise TypeError("state must be a MIMNState (h, r, M, g, S)")
    want = MIMNState((B, Hc), (B, D), (B, m, D), (B, m), (B, m, Hs))
    for name, t, shape in zip(MIMNState._fields, state, want):
        check_tensor(f"state.{name}", t, dtypes=FLOAT_DTYPES)
        if tuple(t.shape) != shape:
            raise ValueError(f"state.{name} must have shape {shape} for this model and batch, "
                             f"got {tuple(t.shape)} (a state from another configuration?)")
        if t.dtype != dtype:
            raise TypeError(f"state.{name} must have dtype {dtype} like x, got {t.dtype}")


def mimn_initial_state(params: MIMNParams, batch: int) -> MIMNState:
    """The initial state: h = r = g = 0, S = 0 and M = mem0 for every row (a view)."""
    _, _, _, _, Hs = _dims(params)
    return ref.mimn_initial_state(params, batch, Hs)


# The most memory ``mimn_scan(save_tapes=None)`` spends on stored tapes (bytes). At the
# MIMN model's sizes (x_dim 32, mem_dim 32, 16 slots, ctrl_dim = miu_dim = 32, miu_k 1) a
# step's tape is 608 floats: B=128, T=1000 keeps 311 MB.
TAPE_BUDGET = 1 << 30


def mimn_scan(x: Tensor, lengths: Optional[Tensor], params: MIMNParams,
              state0: Optional[MIMNState] = None, *, backend: Optional[str] = None,
              chunk: Optional[int] = None, save_tapes: Optional[bool] = None
              ) -> Tuple[Tensor, MIMNState]:
    """MIMN steps 1–7 fused over a whole sequence (one kernel call).

    Args:
        x: (B, T, x_dim) behaviour features.
        lengths: (B,) valid steps per row in [0, T] (None: all T); steps t >= lengths[b]
            leave row b's state unchanged and read zeros.
        params: :class:`MIMNParams` (``MIMNEncoder.params()`` builds it from the modules).
        state0: :class:`MIMNState` to start from (default: :func:`mimn_initial_state`).
        chunk: steps between the backward's checkpoints (default ceil(sqrt(T)); T, one
            checkpoint, when no gradient is recorded).
        save_tapes: (cpp backend) keep every step's intermediates from the forward, so that
            the backward reads them instead of recomputing the steps (forward+backward
            ~1.3x faster, at B·T·tape_floats(...) floats). None: when a gradient is
            recorded and they fit in ``TAPE_BUDGET`` bytes. Other backends recompute.

    Returns:
        ``(reads (B, T, mem_dim), state)`` with state the final (h, r, M, g, S).
        Differentiable in x, every parameter and state0.
    """
    Dx, D, m, Hc, Hs = _dims(params)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3, what=" (B, T, x_dim)")
    B, T, _ = x.shape
    if x.shape[2] != Dx:
        raise ValueError(f"x must be (B, T, x_dim={Dx}) for these parameters, got "
                         f"{tuple(x.shape)}")
    if lengths is not None:
        check_tensor("lengths", lengths, dtypes=(torch.int32, torch.int64), ndim=1,
                     what=f" and shape (B,)=({B},)")
        if lengths.shape[0] != B:
            raise ValueError(f"lengths must have shape (B,)=({B},), got {tuple(lengths.shape)}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                              or chunk < 1):
        raise ValueError(f"chunk must be an int >= 1 (steps between checkpoints), got {chunk!r}")
    state0 = ref.mimn_initial_state(params, B, Hs) if state0 is None else state0
    _check_state(state0, B, D, m, Hc, Hs, x.dtype)
    dev = check_same_device(x=x, lengths=lengths, mem0=params.mem0, **state0._asdict(),
                            **dict(zip(KERNEL_PARAMS, kernel_params(params))))
    be = backend_for(dev, backend)
    if lengths is not None:
        if torch.compiler.is_compiling():
            if be == "torch":        # the kernel ops check inside; the reference needs this
                lengths = torch.ops.fastattn.mimn_check_lengths(lengths, T)
        else:
            _check_lengths("mimn_scan", lengths, T, dev)
    if be == "torch":
        return ref.mimn_scan(x, lengths, params, state0)
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the {be} MIMN kernels run in float32 or float64, got {x.dtype}; "
                        "cast the model or use backend='torch'")
    lens = torch.full((B,), T, dtype=torch.int64, device=dev) if lengths is None \
        else lengths.to(torch.int64)
    ps = kernel_params(params)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *state0, *ps))
    if chunk is None:
        # Without a backward to come (inference, serving) one checkpoint, the start, instead
        # of ceil(sqrt(T)): no checkpoint stores, no (B, sqrt(T), state) allocation.
        chunk = default_chunk(T) if grad else max(T, 1)
    if save_tapes is None:
        save_tapes = grad and be == "cpp" and B * T * tape_floats(
            Dx, D, m, Hc, Hs, params.miu_k) * x.element_size() <= TAPE_BUDGET
    out = torch.ops.fastattn.mimn_scan(x, lens, *ps, params.miu_k, *state0, chunk, be,
                                       bool(save_tapes))
    return out[0], MIMNState(*out[1:6])


def mimn_step(x_t: Tensor, state: Optional[MIMNState], params: MIMNParams, *,
              backend: Optional[str] = None) -> Tuple[Tensor, MIMNState]:
    """One MIMN step for every row: the per-event update of a serving system.

    x_t (B, x_dim), state (or None for the initial one) -> (read (B, mem_dim), state').
    Streaming a sequence through this equals :func:`mimn_scan` over it.
    """
    check_tensor("x_t", x_t, dtypes=FLOAT_DTYPES, ndim=2, what=" (B, x_dim)")
    reads, new = mimn_scan(x_t.unsqueeze(1), None, params, state, backend=backend, chunk=1)
    return reads[:, 0], new


class BoundStep:
    """:func:`mimn_step` with the parameters bound once: ``step(x_t (B, x_dim), state) ->
    (read (B, mem_dim), state')``, equal to ``mimn_step(x_t, state, params)`` (the same
    kernels). Made by :func:`bind_step`.

    On CPU without gradients, the cpp backend steps through a ``MimnStepper`` that holds the
    parameters copied and packed once (re-packed when a parameter's version counter shows
    an in-place update); the numba backend calls its kernel on numpy views of the
    parameters taken once. The kernel binding checks the arrays. Anything else (another
    backend or device, gradients, non-contiguous inputs, bad inputs) goes through
    :func:`mimn_step`, which reports bad inputs. Outputs are new tensors on every call.
    """

    def __init__(self, params: MIMNParams, backend: Optional[str] = None):
        self.params = params
        self.dims = _dims(params)
        dev = params.mem0.device
        self.backend = backend_for(dev, backend)
        self.dtype = params.mem0.dtype
        self._present = [p for p in kernel_params(params) if p is not None]
        self._fast = (self.backend in ("cpp", "numba") and dev.type == "cpu"
                      and self.dtype in _KERNEL_DTYPES
                      and all(p.dtype == self.dtype and p.device == dev for p in self._present))
        self._requires_grad = any(p.requires_grad for p in self._present)
        self._versions = None
        self._npdtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        self._scratch: dict = {}

    def _bind(self) -> None:
        ps = kernel_params(self.params)
        arrays = [t.detach().numpy() for t in _scan_params(self.params.mem0, *ps)]
        has_mur, miu_k = self.params.mur_w is not None, self.params.miu_k
        if self.backend == "cpp":
            Dx, D, m, Hc, Hs = self.dims
            self._stepper = kernels("cpp").MimnStepper(*arrays, has_mur, miu_k, Dx, D, m, Hc,
                                                       Hs)
        else:
            self._arrays = (arrays, has_mur, miu_k)
        self._versions = tuple(p._version for p in self._present)

    def __call__(self, x_t: Tensor, state: Optional[MIMNState]) -> Tuple[Tensor, MIMNState]:
        if self._fast and state is not None and not (torch.is_grad_enabled() and (
                self._requires_grad or x_t.requires_grad
                or any(t.requires_grad for t in state))):
            try:
                return self._kernel(x_t, state)
            except (ValueError, TypeError, RuntimeError, AttributeError, IndexError):
                pass    # not an input the bound kernel takes: mimn_step checks and reports it
        return mimn_step(x_t, state, self.params, backend=self.backend)

    def _kernel(self, x_t: Tensor, state) -> Tuple[Tensor, MIMNState]:
        if self._versions != tuple(p._version for p in self._present):
            self._bind()
        B, D = x_t.shape[0], self.dims[1]
        if self.backend == "cpp":
            # numpy outputs wrapped once: allocating torch tensors costs ~3x more per call
            reads = np.empty((B, D), self._npdtype)
            outs = [np.empty(t.shape, self._npdtype) for t in state]
            self._stepper.step(x_t.numpy(), *(t.numpy() for t in state), reads, *outs,
                               cpu_threads())
            return torch.from_numpy(reads), MIMNState(*map(torch.from_numpy, outs))
        reads = torch.empty(B, D, dtype=self.dtype)
        outs = [torch.empty(t.shape, dtype=self.dtype) for t in state]
        Dx, _, m, Hc, Hs = self.dims     # the numba kernel trusts its arrays: check here
        want = ((B, Dx), (B, Hc), (B, D), (B, m, D), (B, m), (B, m, Hs))
        if len(state) != 5 or any(t.dtype != self.dtype or t.shape != w or not t.is_contiguous()
                                  for t, w in zip((x_t, *state), want)):
            raise ValueError("not a contiguous batch of this model's states")
        arrays, has_mur, miu_k = self._arrays
        lens, ckpts = self._scratch_for(B, state)
        args = [x_t.numpy().reshape(B, 1, -1), lens, *arrays, has_mur, miu_k,
                *(t.numpy() for t in state), 1, reads.numpy().reshape(B, 1, D),
                *(o.numpy() for o in outs), *ckpts]
        if B:
            set_numba_threads()
            kernels("numba").mimn_scan_fwd(*args)
        return reads, MIMNState(*outs)

    def _scratch_for(self, B: int, state):
        """lengths (all 1) and the checkpoint arrays the numba kernel writes (unused here),
        kept between calls."""
        have = self._scratch.get(B)
        if have is None:
            have = (np.ones(B, np.int64),
                    [np.zeros((B, 1, *t.shape[1:]), self._npdtype) for t in state])
            if len(self._scratch) > 8:
                self._scratch.clear()
            self._scratch[B] = have
        return have


def bind_step(params: MIMNParams, backend: Optional[str] = None) -> BoundStep:
    """A :class:`BoundStep`: one MIMN step per row (the serving update), with the twelve
    parameter arrays packed once instead of on every call. ``step(x_t, state)`` returns
    ``(read, state')`` like :func:`mimn_step`."""
    return BoundStep(params, backend)


def ntm_read_write(memory: Tensor, usage: Tensor, head: Tensor,
                   mur_weight: Optional[Tensor] = None, mur_bias: Optional[Tensor] = None, *,
                   backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """MIMN steps 3–6: content addressing, read, MUR, erase/add write, for one step.

    Args:
        memory: (B, m, D); usage: (B, m) cumulative write weights g.
        head: (B, 4D + 2) raw outputs of the heads Linear, columns
            [k_r (D), beta_r, k_w (D), beta_w, e (D), a (D)].
        mur_weight, mur_bias: (m, m), (m,) of the MUR Linear, or None without MUR.

    Returns:
        ``(read (B, D), memory' (B, m, D), usage' (B, m), read_weights (B, m))``.
    """
    check_tensor("memory", memory, dtypes=FLOAT_DTYPES, ndim=3, what=" (B, m, D)")
    B, m, D = memory.shape
    check_tensor("usage", usage, dtypes=FLOAT_DTYPES, ndim=2, what=f" (B, m)=({B}, {m})")
    check_tensor("head", head, dtypes=FLOAT_DTYPES, ndim=2, what=f" (B, 4D+2)=({B}, {4*D+2})")
    if tuple(usage.shape) != (B, m) or tuple(head.shape) != (B, 4 * D + 2):
        raise ValueError(f"usage must be (B, m)=({B}, {m}) and head (B, 4D+2)=({B}, {4*D+2}), "
                         f"got {tuple(usage.shape)} and {tuple(head.shape)}")
    if (mur_weight is None) != (mur_bias is None):
        raise ValueError("mur_weight and mur_bias must both be given or both be None")
    if mur_weight is not None and (tuple(mur_weight.shape) != (m, m)
                                   or tuple(mur_bias.shape) != (m,)):
        raise ValueError(f"mur_weight must be (m, m)=({m}, {m}) and mur_bias (m,), got "
                         f"{tuple(mur_weight.shape)} and {tuple(mur_bias.shape)}")
    dev = check_same_device(memory=memory, usage=usage, head=head, mur_weight=mur_weight,
                            mur_bias=mur_bias)
    be = backend_for(dev, backend)
    if be == "torch":
        return ref.ntm_read_write(memory, usage, head, mur_weight, mur_bias)
    _kernel_dtype(be, memory, usage, head, mur_weight, mur_bias)
    return torch.ops.fastattn.ntm_read_write(memory, usage, head, mur_weight, mur_bias, be)


def miu_gather_gru(memory: Tensor, x: Tensor, S: Tensor, read_weights: Tensor, k: int,
                   w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
                   b_hh: Optional[Tensor] = None, *,
                   backend: Optional[str] = None) -> Tensor:
    """MIMN step 7: the ``k`` channels with the largest read weight (ties to the smaller
    index) update their state with one GRU shared by all channels, fed [M(i), x].

    memory (B, m, D) after the write, x (B, Dx), S (B, m, Hs), read_weights (B, m);
    w_ih (3Hs, D + Dx), w_hh (3Hs, Hs), b_ih/b_hh (3Hs,) or None -> S' (B, m, Hs).
    """
    check_tensor("memory", memory, dtypes=FLOAT_DTYPES, ndim=3, what=" (B, m, D)")
    B, m, D = memory.shape
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, what=" (B, Dx)")
    check_tensor("S", S, dtypes=FLOAT_DTYPES, ndim=3, what=" (B, m, Hs)")
    check_tensor("read_weights", read_weights, dtypes=FLOAT_DTYPES, ndim=2, what=" (B, m)")
    Hs = S.shape[2]
    if x.shape[0] != B or S.shape[:2] != (B, m) or tuple(read_weights.shape) != (B, m):
        raise ValueError(f"x (B, Dx), S (B, m, Hs) and read_weights (B, m) must match memory "
                         f"(B={B}, m={m}), got {tuple(x.shape)}, {tuple(S.shape)}, "
                         f"{tuple(read_weights.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= m:
        raise ValueError(f"k must be an int in [0, slots={m}], got {k!r}")
    if tuple(w_ih.shape) != (3 * Hs, D + x.shape[1]) or tuple(w_hh.shape) != (3 * Hs, Hs):
        raise ValueError(f"w_ih must be (3Hs, D+Dx)=({3*Hs}, {D + x.shape[1]}) and w_hh "
                         f"(3Hs, Hs)=({3*Hs}, {Hs}), got {tuple(w_ih.shape)} and "
                         f"{tuple(w_hh.shape)}")
    b_ih = w_ih.new_zeros(3 * Hs) if b_ih is None else b_ih
    b_hh = w_hh.new_zeros(3 * Hs) if b_hh is None else b_hh
    dev = check_same_device(memory=memory, x=x, S=S, read_weights=read_weights, w_ih=w_ih,
                            w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    be = backend_for(dev, backend)
    if be == "torch":
        return ref.miu_gather_gru(memory, x, S, read_weights, k, w_ih, w_hh, b_ih, b_hh)
    _kernel_dtype(be, memory, x, S, read_weights, w_ih, w_hh, b_ih, b_hh)
    return torch.ops.fastattn.miu_gather_gru(memory, x, S, read_weights.detach(), k, w_ih, w_hh,
                                             b_ih, b_hh, be)


def _kernel_dtype(be: str, *ts: Optional[Tensor]) -> None:
    dtypes = {t.dtype for t in ts if t is not None}
    if len(dtypes) != 1 or not dtypes <= set(_KERNEL_DTYPES):
        raise TypeError(f"the {be} MIMN kernels need one dtype, float32 or float64, for all "
                        f"inputs and parameters, got {sorted(map(str, dtypes))}")


def mimn_reg_loss(g: Tensor) -> Tensor:
    """Memory Utilization Regularization: mean over rows of Σ_i (g(i) − mean_i g)²; the model
    multiplies it by its λ. g (B, m) is the final cumulative write weights."""
    return ref.mimn_reg_loss(g)
