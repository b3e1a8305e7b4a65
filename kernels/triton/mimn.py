"""MIMN kernels (DESIGN.md §5): the NTM read/write with MUR, the MIU gather-GRU, and the fused
scan over whole sequences, forward and backward.

Calling convention in docs/kernel_api.md, "MIMN"; the oracle is the MIMN part of
``fastattn.reference`` (its autograd gradients are what the backwards reproduce).

Layout of the work. Batch rows are independent and each row's work is a sequential chain of
small mat-vecs (D, m, Hc, Hs, Dx are typically 32/8/32/32/32). One program owns a tile of
BLOCK_B rows and keeps the tile's state in registers: h (BLOCK_B, Hc), r (BLOCK_B, D),
M (BLOCK_B, m, D), g (BLOCK_B, m), S (BLOCK_B, m, Hs), feature sizes padded to powers of two
with masks (padded lanes are kept exactly 0, which every formula below preserves). The gate
and head mat-vecs of the tile's rows are then GEMMs with ``tl.dot`` (IEEE fp32 or fp64:
no TF32), each weight block loaded once per tile-step instead of once per row-step.
``tl.dot`` needs >= 16 on every side, so BLOCK_B = 16 and the sizes that enter a dot (Dx, D,
Hc, Hs) are padded to at least 16; the slot count m only enters broadcast sums (the
addressing, MUR and the MIU channel choice are per row, vectorised over the tile).

Transcendentals are written with tl.exp / tl.log / tl.sqrt only: libdevice does not run in
the Triton interpreter, which is how CI tests these kernels.

Rows. Rows past B, and in the scan the rows whose sequence has ended (t >= lengths[b]), are
carried along masked: their state is kept (``tl.where`` on the update), they read 0, and
their contributions to parameter gradients are masked out (the recomputed activations of a
padded step may be anything, NaN included).

Parameter gradients. Each program accumulates its tile's parameter gradients in a private
(n_tiles, *param.shape) buffer with load-add-store (weight gradients as
``tl.dot(G^T, X)`` over the tile's rows), and the launcher sums the buffers over tiles with
torch: deterministic, no atomics. Within a program the threads that load an element need
not be the ones that stored it at the previous accumulation, so every accumulation starts
with a CTA barrier (``tl.debug_barrier``) that makes the earlier stores visible.

Scan backward. The forward stores the state at the start of every chunk of ``chunk`` steps;
the backward walks the chunks last-first, replays the chunk's steps from its checkpoint into
a per-row scratch of step-start states, then runs the chunk's steps in reverse, each step
recomputing its own activations from its start state (one extra forward per step instead of
storing every activation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import device_guard, next_pow2

__all__ = ["ntm_read_write_fwd", "ntm_read_write_bwd", "miu_gather_gru_fwd",
           "miu_gather_gru_bwd", "mimn_scan_fwd", "mimn_scan_bwd"]

# Rows per program (tl.dot's minimum M).
BLOCK_B = 16

# --------------------------------------------------------------------------- elementwise


@triton.jit
def _sigmoid(x):
    # exp of a non-positive argument only: never overflows, and tiny results keep their
    # relative accuracy on both sides.
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _tanh(x):
    z = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - z) / (1.0 + z)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus (beta 1, threshold 20): the identity above 20.
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))


@triton.jit
def _softplus_grad(x):
    return tl.where(x > 20.0, 1.0, _sigmoid(x))


@triton.jit
def _masked_softmax(s, mask):
    """Softmax of s (BLOCK_B, MP) along the slots, over the slots in mask (MP,)."""
    s = tl.where(mask[None, :], s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _row(X, sel):
    """X[b, sel_b] for each row: X (BLOCK_B, MP, C), sel a one-hot (BLOCK_B, MP)."""
    return tl.sum(tl.where(sel[:, :, None], X, 0.0), axis=1)


@triton.jit
def _dot(a, b):
    # IEEE products: TF32 would leave DESIGN §6's fp32 tolerance.
    return tl.dot(a, b, input_precision="ieee")


# --------------------------------------------------------------------------- memory helpers


@triton.jit
def _ldv(ptr, o0, n, offs, ACC: tl.constexpr):
    """ptr[o0 + offs] for offs < n (zeros beyond) in ACC."""
    return tl.load(ptr + o0 + offs, mask=offs < n, other=0.0).to(ACC)


@triton.jit
def _ld2(ptr, o0, nr, nc, offs_r, offs_c, ACC: tl.constexpr):
    """The (nr, nc) row-major block at ptr + o0, padded with zeros."""
    msk = (offs_r < nr)[:, None] & (offs_c < nc)[None, :]
    return tl.load(ptr + o0 + offs_r[:, None] * nc + offs_c[None, :], mask=msk,
                   other=0.0).to(ACC)


@triton.jit
def _ldr(ptr, idx, ok, n, offs, ACC: tl.constexpr):
    """Rows idx (BLOCK_B,) of an (N, n) array, zeros where ~ok or beyond n."""
    msk = ok[:, None] & (offs < n)[None, :]
    return tl.load(ptr + idx[:, None] * n + offs[None, :], mask=msk, other=0.0).to(ACC)


@triton.jit
def _str(ptr, idx, ok, n, offs, v):
    msk = ok[:, None] & (offs < n)[None, :]
    tl.store(ptr + idx[:, None] * n + offs[None, :], v.to(ptr.dtype.element_ty), mask=msk)


@triton.jit
def _ldr3(ptr, idx, ok, n1, n2, o1, o2, ACC: tl.constexpr):
    """Entries idx (BLOCK_B,) of an (N, n1, n2) array, zero-padded."""
    msk = ok[:, None, None] & (o1 < n1)[None, :, None] & (o2 < n2)[None, None, :]
    ptrs = ptr + idx[:, None, None] * (n1 * n2) + o1[None, :, None] * n2 + o2[None, None, :]
    return tl.load(ptrs, mask=msk, other=0.0).to(ACC)


@triton.jit
def _str3(ptr, idx, ok, n1, n2, o1, o2, v):
    msk = ok[:, None, None] & (o1 < n1)[None, :, None] & (o2 < n2)[None, None, :]
    ptrs = ptr + idx[:, None, None] * (n1 * n2) + o1[None, :, None] * n2 + o2[None, None, :]
    tl.store(ptrs, v.to(ptr.dtype.element_ty), mask=msk)


@triton.jit
def _wtile(w_ptr, r0, c0, ld, nr, nc, offs_r, offs_c, ACC: tl.constexpr):
    """W[r0 : r0 + nr, c0 : c0 + nc] of a row-major matrix with leading dimension ld."""
    msk = (offs_r < nr)[:, None] & (offs_c < nc)[None, :]
    return tl.load(w_ptr + (r0 + offs_r)[:, None] * ld + (c0 + offs_c)[None, :], mask=msk,
                   other=0.0).to(ACC)


@triton.jit
def _mmt(X, w_ptr, r0, c0, ld, nr, nc, offs_k, offs_n):
    """X (BLOCK_B, len(offs_k)) @ W[r0:r0+nr, c0:c0+nc]^T -> (BLOCK_B, len(offs_n)), zero in
    the padded columns. X's padded columns are zeroed first (an inf times a zero padding
    weight would be NaN)."""
    msk = (offs_k < nc)[:, None] & (offs_n < nr)[None, :]
    wt = tl.load(w_ptr + (r0 + offs_n)[None, :] * ld + (c0 + offs_k)[:, None], mask=msk,
                 other=0.0).to(X.dtype)
    xx = tl.where((offs_k < nc)[None, :], X, 0.0)
    return tl.where((offs_n < nr)[None, :], _dot(xx, wt), 0.0)


@triton.jit
def _mm(G, w_ptr, r0, c0, ld, nr, nc, offs_r, offs_c):
    """G (BLOCK_B, len(offs_r)) @ W[r0:r0+nr, c0:c0+nc] -> (BLOCK_B, len(offs_c))."""
    w = _wtile(w_ptr, r0, c0, ld, nr, nc, offs_r, offs_c, G.dtype)
    gg = tl.where((offs_r < nr)[None, :], G, 0.0)
    return tl.where((offs_c < nc)[None, :], _dot(gg, w), 0.0)


@triton.jit
def _acc_gemm(dw_ptr, r0, c0, ld, nr, nc, G, X, act, offs_r, offs_c):
    """dW[r0:r0+nr, c0:c0+nc] += G^T X over the tile's active rows (G (BLOCK_B, len(offs_r)),
    X (BLOCK_B, len(offs_c))), in the tile's private gradient buffer."""
    msk = (offs_r < nr)[:, None] & (offs_c < nc)[None, :]
    ptrs = dw_ptr + (r0 + offs_r)[:, None] * ld + (c0 + offs_c)[None, :]
    gg = tl.where(act[:, None], G, 0.0)
    xx = tl.where(act[:, None] & (offs_c < nc)[None, :], X, 0.0)
    upd = _dot(tl.trans(gg), xx)
    tl.debug_barrier()      # see the module docstring: earlier stores must be visible
    cur = tl.load(ptrs, mask=msk, other=0.0)
    tl.store(ptrs, cur + upd.to(cur.dtype), mask=msk)


@triton.jit
def _acc_vec(db_ptr, o0, n, u, offs):
    """db[o0 : o0 + n] += u."""
    msk = offs < n
    tl.debug_barrier()
    cur = tl.load(db_ptr + o0 + offs, mask=msk, other=0.0)
    tl.store(db_ptr + o0 + offs, cur + u.to(cur.dtype), mask=msk)


@triton.jit
def _acc_cols(db_ptr, o0, n, G, act, offs):
    """db[o0 : o0 + n] += the sum of G (BLOCK_B, len(offs)) over the active rows."""
    _acc_vec(db_ptr, o0, n, tl.sum(tl.where(act[:, None], G, 0.0), axis=0), offs)


@triton.jit
def _acc_scalar(db_ptr, o0, u):
    tl.debug_barrier()
    cur = tl.load(db_ptr + o0)
    tl.store(db_ptr + o0, cur + u.to(cur.dtype))


# --------------------------------------------------------------------------- GRU cell


@triton.jit
def _gru_fwd(w_ih, w_hh, b_ih, b_hh, x1, n1, x2, n2, h, H, offs_h, offs_1, offs_2):
    """nn.GRUCell over the tile's rows on the input [x1 (n1), x2 (n2)] with hidden h (H).

    Returns (h', r, z, n, W_hn h + b_hn), each (BLOCK_B, HP): the gates are what the
    backward needs.
    """
    ACC: tl.constexpr = h.dtype
    ld = n1 + n2
    ir = (_mmt(x1, w_ih, 0, 0, ld, H, n1, offs_1, offs_h)
          + _mmt(x2, w_ih, 0, n1, ld, H, n2, offs_2, offs_h)
          + _ldv(b_ih, 0, H, offs_h, ACC)[None, :])
    iz = (_mmt(x1, w_ih, H, 0, ld, H, n1, offs_1, offs_h)
          + _mmt(x2, w_ih, H, n1, ld, H, n2, offs_2, offs_h)
          + _ldv(b_ih, H, H, offs_h, ACC)[None, :])
    i_n = (_mmt(x1, w_ih, 2 * H, 0, ld, H, n1, offs_1, offs_h)
           + _mmt(x2, w_ih, 2 * H, n1, ld, H, n2, offs_2, offs_h)
           + _ldv(b_ih, 2 * H, H, offs_h, ACC)[None, :])
    hr = _mmt(h, w_hh, 0, 0, H, H, H, offs_h, offs_h) + _ldv(b_hh, 0, H, offs_h, ACC)[None, :]
    hz = _mmt(h, w_hh, H, 0, H, H, H, offs_h, offs_h) + _ldv(b_hh, H, H, offs_h, ACC)[None, :]
    hn = (_mmt(h, w_hh, 2 * H, 0, H, H, H, offs_h, offs_h)
          + _ldv(b_hh, 2 * H, H, offs_h, ACC)[None, :])
    r = _sigmoid(ir + hr)
    z = _sigmoid(iz + hz)
    n = _tanh(i_n + r * hn)
    h_new = tl.where((offs_h < H)[None, :], (1.0 - z) * n + z * h, 0.0)
    return h_new, r, z, n, hn


@triton.jit
def _gru_bwd(w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, x1, n1, x2, n2, h, H, r, z, n, hn,
             dh_new, act, offs_h, offs_1, offs_2):
    """Backward of _gru_fwd given its gates and dL/dh'. Accumulates the four parameter
    gradients over the active rows into the tile's buffers and returns (dx1, dx2, dh)."""
    ld = n1 + n2
    dn = dh_new * (1.0 - z)
    dz = dh_new * (h - n)
    dh = dh_new * z
    d_an = dn * (1.0 - n * n)          # pre-activation of n (input side and r * hn)
    d_az = dz * z * (1.0 - z)
    d_ar = d_an * hn * r * (1.0 - r)
    d_hn = d_an * r                    # hidden-side n projection sits behind the reset gate
    dx1 = (_mm(d_ar, w_ih, 0, 0, ld, H, n1, offs_h, offs_1)
           + _mm(d_az, w_ih, H, 0, ld, H, n1, offs_h, offs_1)
           + _mm(d_an, w_ih, 2 * H, 0, ld, H, n1, offs_h, offs_1))
    dx2 = (_mm(d_ar, w_ih, 0, n1, ld, H, n2, offs_h, offs_2)
           + _mm(d_az, w_ih, H, n1, ld, H, n2, offs_h, offs_2)
           + _mm(d_an, w_ih, 2 * H, n1, ld, H, n2, offs_h, offs_2))
    dh += (_mm(d_ar, w_hh, 0, 0, H, H, H, offs_h, offs_h)
           + _mm(d_az, w_hh, H, 0, H, H, H, offs_h, offs_h)
           + _mm(d_hn, w_hh, 2 * H, 0, H, H, H, offs_h, offs_h))
    _acc_gemm(dw_ih, 0, 0, ld, H, n1, d_ar, x1, act, offs_h, offs_1)
    _acc_gemm(dw_ih, H, 0, ld, H, n1, d_az, x1, act, offs_h, offs_1)
    _acc_gemm(dw_ih, 2 * H, 0, ld, H, n1, d_an, x1, act, offs_h, offs_1)
    _acc_gemm(dw_ih, 0, n1, ld, H, n2, d_ar, x2, act, offs_h, offs_2)
    _acc_gemm(dw_ih, H, n1, ld, H, n2, d_az, x2, act, offs_h, offs_2)
    _acc_gemm(dw_ih, 2 * H, n1, ld, H, n2, d_an, x2, act, offs_h, offs_2)
    _acc_gemm(dw_hh, 0, 0, H, H, H, d_ar, h, act, offs_h, offs_h)
    _acc_gemm(dw_hh, H, 0, H, H, H, d_az, h, act, offs_h, offs_h)
    _acc_gemm(dw_hh, 2 * H, 0, H, H, H, d_hn, h, act, offs_h, offs_h)
    _acc_cols(db_ih, 0, H, d_ar, act, offs_h)
    _acc_cols(db_ih, H, H, d_az, act, offs_h)
    _acc_cols(db_ih, 2 * H, H, d_an, act, offs_h)
    _acc_cols(db_hh, 0, H, d_ar, act, offs_h)
    _acc_cols(db_hh, H, H, d_az, act, offs_h)
    _acc_cols(db_hh, 2 * H, H, d_hn, act, offs_h)
    return dx1, dx2, dh


# --------------------------------------------------------------------------- heads


@triton.jit
def _heads_fwd(hw, hb, h, D, Hc, offs_d, offs_hc):
    """Raw head outputs p = W h + b per row, split as [k_r (D), beta_r, k_w (D), beta_w,
    e (D), a (D)] (rows 0, D, D+1, 2D+1, 2D+2, 3D+2 of the (4D+2, Hc) weight); the betas
    are (BLOCK_B,), the others (BLOCK_B, DP)."""
    ACC: tl.constexpr = h.dtype
    kr = _mmt(h, hw, 0, 0, Hc, D, Hc, offs_hc, offs_d) + _ldv(hb, 0, D, offs_d, ACC)[None, :]
    br = (tl.sum(h * _ldv(hw, D * Hc, Hc, offs_hc, ACC)[None, :], axis=1)
          + tl.load(hb + D).to(ACC))
    kw = (_mmt(h, hw, D + 1, 0, Hc, D, Hc, offs_hc, offs_d)
          + _ldv(hb, D + 1, D, offs_d, ACC)[None, :])
    bw = (tl.sum(h * _ldv(hw, (2 * D + 1) * Hc, Hc, offs_hc, ACC)[None, :], axis=1)
          + tl.load(hb + 2 * D + 1).to(ACC))
    e = (_mmt(h, hw, 2 * D + 2, 0, Hc, D, Hc, offs_hc, offs_d)
         + _ldv(hb, 2 * D + 2, D, offs_d, ACC)[None, :])
    a = (_mmt(h, hw, 3 * D + 2, 0, Hc, D, Hc, offs_hc, offs_d)
         + _ldv(hb, 3 * D + 2, D, offs_d, ACC)[None, :])
    return kr, br, kw, bw, e, a


@triton.jit
def _heads_bwd(hw, dhw, dhb, h, dkr, dbr, dkw, dbw, de, da, act, D, Hc, offs_d, offs_hc):
    """Backward of _heads_fwd: accumulates dW, db over the active rows and returns dL/dh."""
    ACC: tl.constexpr = h.dtype
    wbr = _ldv(hw, D * Hc, Hc, offs_hc, ACC)
    wbw = _ldv(hw, (2 * D + 1) * Hc, Hc, offs_hc, ACC)
    dh = (_mm(dkr, hw, 0, 0, Hc, D, Hc, offs_d, offs_hc) + dbr[:, None] * wbr[None, :]
          + _mm(dkw, hw, D + 1, 0, Hc, D, Hc, offs_d, offs_hc) + dbw[:, None] * wbw[None, :]
          + _mm(de, hw, 2 * D + 2, 0, Hc, D, Hc, offs_d, offs_hc)
          + _mm(da, hw, 3 * D + 2, 0, Hc, D, Hc, offs_d, offs_hc))
    dbr_a = tl.where(act, dbr, 0.0)
    dbw_a = tl.where(act, dbw, 0.0)
    h_a = tl.where(act[:, None], h, 0.0)
    _acc_gemm(dhw, 0, 0, Hc, D, Hc, dkr, h, act, offs_d, offs_hc)
    _acc_vec(dhw, D * Hc, Hc, tl.sum(dbr_a[:, None] * h_a, axis=0), offs_hc)
    _acc_gemm(dhw, D + 1, 0, Hc, D, Hc, dkw, h, act, offs_d, offs_hc)
    _acc_vec(dhw, (2 * D + 1) * Hc, Hc, tl.sum(dbw_a[:, None] * h_a, axis=0), offs_hc)
    _acc_gemm(dhw, 2 * D + 2, 0, Hc, D, Hc, de, h, act, offs_d, offs_hc)
    _acc_gemm(dhw, 3 * D + 2, 0, Hc, D, Hc, da, h, act, offs_d, offs_hc)
    _acc_cols(dhb, 0, D, dkr, act, offs_d)
    _acc_scalar(dhb, D, tl.sum(dbr_a, axis=0))
    _acc_cols(dhb, D + 1, D, dkw, act, offs_d)
    _acc_scalar(dhb, 2 * D + 1, tl.sum(dbw_a, axis=0))
    _acc_cols(dhb, 2 * D + 2, D, de, act, offs_d)
    _acc_cols(dhb, 3 * D + 2, D, da, act, offs_d)
    return dh


# --------------------------------------------------------------------------- NTM (steps 3-6)


@triton.jit
def _content_fwd(k, beta, M, mask_m):
    """softmax_i(beta · cos(k, M(i))) per row, cos = k·M(i) / max(|k| |M(i)|, 1e-8);
    k (BLOCK_B, DP), beta (BLOCK_B,), M (BLOCK_B, MP, DP) -> (BLOCK_B, MP)."""
    dots = tl.sum(M * k[:, None, :], axis=2)
    den = tl.maximum(tl.sqrt(tl.sum(k * k, axis=1))[:, None] * tl.sqrt(tl.sum(M * M, axis=2)),
                     1e-8)
    return _masked_softmax(beta[:, None] * dots / den, mask_m)


@triton.jit
def _content_bwd(k, beta, M, w, dw):
    """Backward of _content_fwd (w its output): returns (dk, dbeta, dM).

    Matches torch's autograd: the clamp passes the gradient where |k||M(i)| >= 1e-8, and
    the norm's gradient at a zero vector is 0.
    """
    dots = tl.sum(M * k[:, None, :], axis=2)
    kn = tl.sqrt(tl.sum(k * k, axis=1))
    Mn = tl.sqrt(tl.sum(M * M, axis=2))
    prod = kn[:, None] * Mn
    den = tl.maximum(prod, 1e-8)
    ds = w * (dw - tl.sum(w * dw, axis=1)[:, None])   # softmax backward (0 on padded slots)
    dbeta = tl.sum(ds * dots / den, axis=1)
    ddots = ds * beta[:, None] / den
    dprod = tl.where(prod >= 1e-8, -ds * beta[:, None] * dots / (den * den), 0.0)
    dkn = tl.sum(dprod * Mn, axis=1)
    inv_kn = tl.where(kn > 0, 1.0 / tl.where(kn > 0, kn, 1.0), 0.0)
    inv_Mn = tl.where(Mn > 0, 1.0 / tl.where(Mn > 0, Mn, 1.0), 0.0)
    dk = tl.sum(ddots[:, :, None] * M, axis=1) + (dkn * inv_kn)[:, None] * k
    dM = ddots[:, :, None] * k[:, None, :] + (dprod * kn[:, None] * inv_Mn)[:, :, None] * M
    return dk, dbeta, dM


@triton.jit
def _ntm_core(M, g, kr_, br_, kw_, bw_, e_, a_, murw, murb, m, offs_m, mask_m,
              HAS_MUR: tl.constexpr):
    """Steps 3-6 from the raw head outputs, for the tile's rows. Returns the outputs
    (read, M', g', wr) and the intermediates the backward needs (ww, P, sum(ww P), w~,
    activated heads)."""
    ACC: tl.constexpr = M.dtype
    kr = _tanh(kr_)
    br = _softplus(br_) + 1.0
    kw = _tanh(kw_)
    bw = _softplus(bw_) + 1.0
    e = _sigmoid(e_)
    a = _tanh(a_)
    wr = _content_fwd(kr, br, M, mask_m)
    ww = _content_fwd(kw, bw, M, mask_m)
    read = tl.sum(wr[:, :, None] * M, axis=1)
    if HAS_MUR:
        W = _ld2(murw, 0, m, m, offs_m, offs_m, ACC)
        q = tl.sum(g[:, None, :] * W[None, :, :], axis=2) + _ldv(murb, 0, m, offs_m, ACC)[None, :]
        P = _masked_softmax(q, mask_m)
        u = ww * P
        us = tl.sum(u, axis=1)
        wt = u / us[:, None]
    else:
        P = ww
        us = tl.sum(ww, axis=1)
        wt = ww
    g_new = g + wt
    M_new = M * (1.0 - wt[:, :, None] * e[:, None, :]) + wt[:, :, None] * a[:, None, :]
    return read, M_new, g_new, wr, ww, P, us, wt, kr, br, kw, bw, e, a


@triton.jit
def _ntm_backprop(M, g, wr, ww, P, us, wt, kr, br, kw, bw, e, a, br_, bw_,
                  dread, dM_new, dg_new, dwr, murw, dmurw, dmurb, act, m, offs_m,
                  HAS_MUR: tl.constexpr):
    """Backward of _ntm_core. Returns (dM, dg, dkr_, dbr_, dkw_, dbw_, de_, da_) (raw head
    gradients) and accumulates the MUR parameter gradients over the active rows."""
    # write: M' = M (1 - w~ e^T) + w~ a^T, g' = g + w~
    dM = dM_new * (1.0 - wt[:, :, None] * e[:, None, :])
    dwt = dg_new + tl.sum(dM_new * (a[:, None, :] - M * e[:, None, :]), axis=2)
    de = -tl.sum(dM_new * M * wt[:, :, None], axis=1)
    da = tl.sum(dM_new * wt[:, :, None], axis=1)
    dg = dg_new
    if HAS_MUR:
        # w~ = u / sum(u), u = ww P, P = softmax(W_g g + b_g)
        du = (dwt - tl.sum(dwt * wt, axis=1)[:, None]) / us[:, None]
        dww = du * P
        dP = du * ww
        dq = P * (dP - tl.sum(P * dP, axis=1)[:, None])
        dq_a = tl.where(act[:, None], dq, 0.0)
        g_a = tl.where(act[:, None], g, 0.0)
        msk = (offs_m < m)[:, None] & (offs_m < m)[None, :]
        ptrs = dmurw + offs_m[:, None] * m + offs_m[None, :]
        upd = tl.sum(dq_a[:, :, None] * g_a[:, None, :], axis=0)
        tl.debug_barrier()
        cur = tl.load(ptrs, mask=msk, other=0.0)
        tl.store(ptrs, cur + upd.to(cur.dtype), mask=msk)
        _acc_vec(dmurb, 0, m, tl.sum(dq_a, axis=0), offs_m)
        W = _ld2(murw, 0, m, m, offs_m, offs_m, M.dtype)
        dg += tl.sum(dq[:, :, None] * W[None, :, :], axis=1)
    else:
        dww = dwt
    # read = sum_i wr_i M_i (from the memory before the write)
    dwr = dwr + tl.sum(M * dread[:, None, :], axis=2)
    dM += wr[:, :, None] * dread[:, None, :]
    dkw, dbw, dMw = _content_bwd(kw, bw, M, ww, dww)
    dkr, dbr, dMr = _content_bwd(kr, br, M, wr, dwr)
    dM += dMw + dMr
    return (dM, dg, dkr * (1.0 - kr * kr), dbr * _softplus_grad(br_), dkw * (1.0 - kw * kw),
            dbw * _softplus_grad(bw_), de * e * (1.0 - e), da * (1.0 - a * a))


# --------------------------------------------------------------------------- MIU (step 7)


@triton.jit
def _miu_pick(wr, avail, offs_m):
    """Per row, a one-hot of the largest wr among the channels still available (avail),
    ties to the smaller index, NaN above every number (torch.sort's descending order)."""
    isnan = wr != wr
    big = 1 << 30
    nan_idx = tl.min(tl.where(avail & isnan, offs_m[None, :], big), axis=1)
    best = tl.max(tl.where(avail & ~isnan, wr, float("-inf")), axis=1)
    idx = tl.min(tl.where(avail & (wr == best[:, None]), offs_m[None, :], big), axis=1)
    idx = tl.where(nan_idx < big, nan_idx, idx)
    return offs_m[None, :] == idx[:, None]


@triton.jit
def _miu_fwd(M_new, x, S, wr, K, wi, wh, bi, bh, D, Dx, Hs, offs_m, mask_m, offs_d, offs_x,
             offs_hs):
    """Per row, the K channels with the largest wr (repeated argmax, ties to the smaller
    index, NaN largest) get GRU([M'(i), x], S(i)); the others keep S(i). The channels are
    distinct, so updating them one after the other is the same as updating them together;
    each round is one GRU over the tile's rows."""
    avail = (wr == wr) | (wr != wr)
    avail = avail & mask_m[None, :]
    S_out = S
    for _ in range(K):
        sel = _miu_pick(wr, avail, offs_m)
        s_new, _r, _z, _n, _hn = _gru_fwd(wi, wh, bi, bh, _row(M_new, sel), D, x, Dx,
                                          _row(S, sel), Hs, offs_hs, offs_d, offs_x)
        S_out = tl.where(sel[:, :, None], s_new[:, None, :], S_out)
        avail = avail & ~sel
    return S_out


@triton.jit
def _miu_bwd(M_new, x, S, wr, dS_new, K, wi, wh, bi, bh, dwi, dwh, dbi, dbh, act, D, Dx, Hs,
             offs_m, mask_m, offs_d, offs_x, offs_hs, DXP: tl.constexpr):
    """Backward of _miu_fwd: returns (dM', dx, dS); no gradient reaches wr (the selection
    is discrete)."""
    avail = (wr == wr) | (wr != wr)
    avail = avail & mask_m[None, :]
    dS = dS_new                                  # unselected channels pass through
    dM = tl.zeros_like(M_new)
    dx = tl.zeros((M_new.shape[0], DXP), M_new.dtype)
    for _ in range(K):
        sel = _miu_pick(wr, avail, offs_m)
        Mi = _row(M_new, sel)
        Si = _row(S, sel)
        _s, r, z, n, hn = _gru_fwd(wi, wh, bi, bh, Mi, D, x, Dx, Si, Hs, offs_hs, offs_d,
                                   offs_x)
        dMi, dxi, dSi = _gru_bwd(wi, wh, dwi, dwh, dbi, dbh, Mi, D, x, Dx, Si, Hs, r, z, n, hn,
                                 _row(dS_new, sel), act, offs_hs, offs_d, offs_x)
        dM = tl.where(sel[:, :, None], dMi[:, None, :], dM)
        dS = tl.where(sel[:, :, None], dSi[:, None, :], dS)
        dx += dxi
        avail = avail & ~sel
    return dM, dx, dS


# --------------------------------------------------------------------------- one MIMN step


@triton.jit
def _step_fwd(x, h, r, M, g, S, cwi, cwh, cbi, cbh, hw, hb, murw, murb, mwi, mwh, mbi, mbh,
              miu_k, Dx, D, m, Hc, Hs, offs_x, offs_d, offs_m, mask_m, offs_hc, offs_hs,
              HAS_MUR: tl.constexpr, HAS_MIU: tl.constexpr):
    """Steps 1-7 for the tile's rows: returns the new (h, r, M, g, S); r is also the read."""
    h_new, _r, _z, _n, _hn = _gru_fwd(cwi, cwh, cbi, cbh, x, Dx, r, D, h, Hc, offs_hc, offs_x,
                                      offs_d)
    kr_, br_, kw_, bw_, e_, a_ = _heads_fwd(hw, hb, h_new, D, Hc, offs_d, offs_hc)
    read, M_new, g_new, wr, _ww, _P, _us, _wt, _kr, _br, _kw, _bw, _e, _a = _ntm_core(
        M, g, kr_, br_, kw_, bw_, e_, a_, murw, murb, m, offs_m, mask_m, HAS_MUR)
    if HAS_MIU:
        S_new = _miu_fwd(M_new, x, S, wr, miu_k, mwi, mwh, mbi, mbh, D, Dx, Hs, offs_m, mask_m,
                         offs_d, offs_x, offs_hs)
    else:
        S_new = S
    return h_new, read, M_new, g_new, S_new


@triton.jit
def _step_bwd(x, h, r, M, g, S, dh_n, dr_n, dM_n, dg_n, dS_n,
              cwi, cwh, cbi, cbh, hw, hb, murw, murb, mwi, mwh, mbi, mbh,
              d_cwi, d_cwh, d_cbi, d_cbh, d_hw, d_hb, d_murw, d_murb, d_mwi, d_mwh, d_mbi,
              d_mbh, act, miu_k, Dx, D, m, Hc, Hs, offs_x, offs_d, offs_m, mask_m, offs_hc,
              offs_hs, DXP: tl.constexpr, HAS_MUR: tl.constexpr, HAS_MIU: tl.constexpr):
    """Backward of one step from its start state and the gradients of its outputs (dr_n
    already includes the gradient of this step's read). Returns the gradients of the start
    state (dh, dr, dM, dg, dS) and dx; accumulates the parameter gradients of the active
    rows."""
    # Recompute the step's activations.
    h_new, rg, zg, ng, hn = _gru_fwd(cwi, cwh, cbi, cbh, x, Dx, r, D, h, Hc, offs_hc, offs_x,
                                     offs_d)
    kr_, br_, kw_, bw_, e_, a_ = _heads_fwd(hw, hb, h_new, D, Hc, offs_d, offs_hc)
    read, M_new, g_new, wr, ww, P, us, wt, kr, br, kw, bw, e, a = _ntm_core(
        M, g, kr_, br_, kw_, bw_, e_, a_, murw, murb, m, offs_m, mask_m, HAS_MUR)
    # MIU, then the NTM write/read, then the heads, then the controller.
    if HAS_MIU:
        dM_miu, dx, dS = _miu_bwd(M_new, x, S, wr, dS_n, miu_k, mwi, mwh, mbi, mbh, d_mwi,
                                  d_mwh, d_mbi, d_mbh, act, D, Dx, Hs, offs_m, mask_m, offs_d,
                                  offs_x, offs_hs, DXP)
        dM_new = dM_n + dM_miu
    else:
        dx = tl.zeros((M.shape[0], DXP), M.dtype)
        dS = dS_n
        dM_new = dM_n
    dM, dg, dkr_, dbr_, dkw_, dbw_, de_, da_ = _ntm_backprop(
        M, g, wr, ww, P, us, wt, kr, br, kw, bw, e, a, br_, bw_, dr_n, dM_new, dg_n,
        tl.zeros_like(wr), murw, d_murw, d_murb, act, m, offs_m, HAS_MUR)
    dh_new = dh_n + _heads_bwd(hw, d_hw, d_hb, h_new, dkr_, dbr_, dkw_, dbw_, de_, da_, act, D,
                               Hc, offs_d, offs_hc)
    dxc, dr, dh = _gru_bwd(cwi, cwh, d_cwi, d_cwh, d_cbi, d_cbh, x, Dx, r, D, h, Hc, rg, zg,
                           ng, hn, dh_new, act, offs_hc, offs_x, offs_d)
    return dh, dr, dM, dg, dS, dx + dxc


# --------------------------------------------------------------------------- state I/O


@triton.jit
def _load_state(hp, rp, Mp, gp, Sp, idx, ok, D, m, Hc, Hs, offs_d, offs_m, offs_hc, offs_hs,
                ACC: tl.constexpr):
    """Entries idx (BLOCK_B,) of state arrays laid out (N, Hc), (N, D), (N, m, D), (N, m),
    (N, m, Hs); zeros where ~ok."""
    h = _ldr(hp, idx, ok, Hc, offs_hc, ACC)
    r = _ldr(rp, idx, ok, D, offs_d, ACC)
    M = _ldr3(Mp, idx, ok, m, D, offs_m, offs_d, ACC)
    g = _ldr(gp, idx, ok, m, offs_m, ACC)
    S = _ldr3(Sp, idx, ok, m, Hs, offs_m, offs_hs, ACC)
    return h, r, M, g, S


@triton.jit
def _store_state(hp, rp, Mp, gp, Sp, idx, ok, h, r, M, g, S, D, m, Hc, Hs, offs_d, offs_m,
                 offs_hc, offs_hs):
    _str(hp, idx, ok, Hc, offs_hc, h)
    _str(rp, idx, ok, D, offs_d, r)
    _str3(Mp, idx, ok, m, D, offs_m, offs_d, M)
    _str(gp, idx, ok, m, offs_m, g)
    _str3(Sp, idx, ok, m, Hs, offs_m, offs_hs, S)


@triton.jit
def _keep(act, new2, old2):
    """new where the row is active, old elsewhere (2-D)."""
    return tl.where(act[:, None], new2, old2)


@triton.jit
def _keep3(act, new3, old3):
    return tl.where(act[:, None, None], new3, old3)


@triton.jit
def _step_rows(act, x, h, r, M, g, S, cwi, cwh, cbi, cbh, hw, hb, murw, murb, mwi, mwh, mbi,
               mbh, miu_k, Dx, D, m, Hc, Hs, offs_x, offs_d, offs_m, mask_m, offs_hc, offs_hs,
               HAS_MUR: tl.constexpr, HAS_MIU: tl.constexpr):
    """:func:`_step_fwd` for the rows where ``act``; the other rows keep their state."""
    h2, r2, M2, g2, S2 = _step_fwd(x, h, r, M, g, S, cwi, cwh, cbi, cbh, hw, hb, murw, murb,
                                   mwi, mwh, mbi, mbh, miu_k, Dx, D, m, Hc, Hs, offs_x, offs_d,
                                   offs_m, mask_m, offs_hc, offs_hs, HAS_MUR, HAS_MIU)
    return (_keep(act, h2, h), _keep(act, r2, r), _keep3(act, M2, M), _keep(act, g2, g),
            _keep3(act, S2, S))


# --------------------------------------------------------------------------- kernels


@triton.jit
def _head_part(hp, o0, n, ok, offs, ACC: tl.constexpr):
    """Columns o0 .. o0+n of the raw heads of the tile's rows (hp: (BLOCK_B,) row pointers)."""
    msk = ok[:, None] & (offs < n)[None, :]
    return tl.load(hp[:, None] + o0 + offs[None, :], mask=msk, other=0.0).to(ACC)


@triton.jit(do_not_specialize=["B"])
def _ntm_fwd_kernel(M_ptr, g_ptr, head_ptr, murw, murb, read_ptr, Mo_ptr, go_ptr, wr_ptr,
                    B, D, m, BB: tl.constexpr, DP: tl.constexpr, MP: tl.constexpr,
                    HAS_MUR: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)
    ok = rows < B
    offs_d = tl.arange(0, DP)
    offs_m = tl.arange(0, MP)
    mask_m = offs_m < m
    P = 4 * D + 2
    M = _ldr3(M_ptr, rows, ok, m, D, offs_m, offs_d, ACC)
    g = _ldr(g_ptr, rows, ok, m, offs_m, ACC)
    hp = head_ptr + rows * P
    read, M_new, g_new, wr, _ww, _P, _us, _wt, _kr, _br, _kw, _bw, _e, _a = _ntm_core(
        M, g, _head_part(hp, 0, D, ok, offs_d, ACC),
        tl.load(hp + D, mask=ok, other=0.0).to(ACC), _head_part(hp, D + 1, D, ok, offs_d, ACC),
        tl.load(hp + 2 * D + 1, mask=ok, other=0.0).to(ACC),
        _head_part(hp, 2 * D + 2, D, ok, offs_d, ACC),
        _head_part(hp, 3 * D + 2, D, ok, offs_d, ACC), murw, murb, m, offs_m, mask_m, HAS_MUR)
    _str(read_ptr, rows, ok, D, offs_d, read)
    _str3(Mo_ptr, rows, ok, m, D, offs_m, offs_d, M_new)
    _str(go_ptr, rows, ok, m, offs_m, g_new)
    _str(wr_ptr, rows, ok, m, offs_m, wr)


@triton.jit(do_not_specialize=["B"])
def _ntm_bwd_kernel(dread_ptr, dMo_ptr, dgo_ptr, dwr_ptr, M_ptr, g_ptr, head_ptr, murw, murb,
                    dM_ptr, dg_ptr, dhead_ptr, dmurw_tiles, dmurb_tiles,
                    B, D, m, BB: tl.constexpr, DP: tl.constexpr, MP: tl.constexpr,
                    HAS_MUR: tl.constexpr, ACC: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    rows = tile * BB + tl.arange(0, BB)
    ok = rows < B
    offs_d = tl.arange(0, DP)
    offs_m = tl.arange(0, MP)
    mask_m = offs_m < m
    P = 4 * D + 2
    M = _ldr3(M_ptr, rows, ok, m, D, offs_m, offs_d, ACC)
    g = _ldr(g_ptr, rows, ok, m, offs_m, ACC)
    hp = head_ptr + rows * P
    br_ = tl.load(hp + D, mask=ok, other=0.0).to(ACC)
    bw_ = tl.load(hp + 2 * D + 1, mask=ok, other=0.0).to(ACC)
    read, M_new, g_new, wr, ww, Pm, us, wt, kr, br, kw, bw, e, a = _ntm_core(
        M, g, _head_part(hp, 0, D, ok, offs_d, ACC), br_,
        _head_part(hp, D + 1, D, ok, offs_d, ACC), bw_,
        _head_part(hp, 2 * D + 2, D, ok, offs_d, ACC),
        _head_part(hp, 3 * D + 2, D, ok, offs_d, ACC), murw, murb, m, offs_m, mask_m, HAS_MUR)
    dM, dg, dkr_, dbr_, dkw_, dbw_, de_, da_ = _ntm_backprop(
        M, g, wr, ww, Pm, us, wt, kr, br, kw, bw, e, a, br_, bw_,
        _ldr(dread_ptr, rows, ok, D, offs_d, ACC),
        _ldr3(dMo_ptr, rows, ok, m, D, offs_m, offs_d, ACC),
        _ldr(dgo_ptr, rows, ok, m, offs_m, ACC), _ldr(dwr_ptr, rows, ok, m, offs_m, ACC),
        murw, dmurw_tiles + tile * m * m, dmurb_tiles + tile * m, ok, m, offs_m, HAS_MUR)
    _str3(dM_ptr, rows, ok, m, D, offs_m, offs_d, dM)
    _str(dg_ptr, rows, ok, m, offs_m, dg)
    _str_part(dhead_ptr, rows, ok, P, 0, D, offs_d, dkr_)
    tl.store(dhead_ptr + rows * P + D, dbr_.to(dhead_ptr.dtype.element_ty), mask=ok)
    _str_part(dhead_ptr, rows, ok, P, D + 1, D, offs_d, dkw_)
    tl.store(dhead_ptr + rows * P + 2 * D + 1, dbw_.to(dhead_ptr.dtype.element_ty), mask=ok)
    _str_part(dhead_ptr, rows, ok, P, 2 * D + 2, D, offs_d, de_)
    _str_part(dhead_ptr, rows, ok, P, 3 * D + 2, D, offs_d, da_)


@triton.jit
def _str_part(ptr, rows, ok, ld, o0, n, offs, v):
    """Columns o0 .. o0+n of rows `rows` of an (N, ld) array."""
    msk = ok[:, None] & (offs < n)[None, :]
    tl.store(ptr + rows[:, None] * ld + o0 + offs[None, :], v.to(ptr.dtype.element_ty),
             mask=msk)


@triton.jit(do_not_specialize=["B", "K"])
def _miu_fwd_kernel(M_ptr, x_ptr, S_ptr, wr_ptr, K, wi, wh, bi, bh, So_ptr, B, D, Dx, m, Hs,
                    BB: tl.constexpr, DP: tl.constexpr, DXP: tl.constexpr, MP: tl.constexpr,
                    HSP: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)
    ok = rows < B
    offs_d = tl.arange(0, DP)
    offs_x = tl.arange(0, DXP)
    offs_m = tl.arange(0, MP)
    offs_hs = tl.arange(0, HSP)
    mask_m = offs_m < m
    M = _ldr3(M_ptr, rows, ok, m, D, offs_m, offs_d, ACC)
    x = _ldr(x_ptr, rows, ok, Dx, offs_x, ACC)
    S = _ldr3(S_ptr, rows, ok, m, Hs, offs_m, offs_hs, ACC)
    wr = _ldr(wr_ptr, rows, ok, m, offs_m, ACC)
    S_new = _miu_fwd(M, x, S, wr, K, wi, wh, bi, bh, D, Dx, Hs, offs_m, mask_m, offs_d, offs_x,
                     offs_hs)
    _str3(So_ptr, rows, ok, m, Hs, offs_m, offs_hs, S_new)


@triton.jit(do_not_specialize=["B", "K"])
def _miu_bwd_kernel(dSo_ptr, M_ptr, x_ptr, S_ptr, wr_ptr, K, wi, wh, bi, bh,
                    dM_ptr, dx_ptr, dS_ptr, dwi_tiles, dwh_tiles, dbi_tiles, dbh_tiles,
                    B, D, Dx, m, Hs, BB: tl.constexpr, DP: tl.constexpr, DXP: tl.constexpr,
                    MP: tl.constexpr, HSP: tl.constexpr, ACC: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    rows = tile * BB + tl.arange(0, BB)
    ok = rows < B
    offs_d = tl.arange(0, DP)
    offs_x = tl.arange(0, DXP)
    offs_m = tl.arange(0, MP)
    offs_hs = tl.arange(0, HSP)
    mask_m = offs_m < m
    M = _ldr3(M_ptr, rows, ok, m, D, offs_m, offs_d, ACC)
    x = _ldr(x_ptr, rows, ok, Dx, offs_x, ACC)
    S = _ldr3(S_ptr, rows, ok, m, Hs, offs_m, offs_hs, ACC)
    wr = _ldr(wr_ptr, rows, ok, m, offs_m, ACC)
    dSo = _ldr3(dSo_ptr, rows, ok, m, Hs, offs_m, offs_hs, ACC)
    G = 3 * Hs
    dM, dx, dS = _miu_bwd(M, x, S, wr, dSo, K, wi, wh, bi, bh,
                          dwi_tiles + tile * G * (D + Dx), dwh_tiles + tile * G * Hs,
                          dbi_tiles + tile * G, dbh_tiles + tile * G, ok, D, Dx, Hs, offs_m,
                          mask_m, offs_d, offs_x, offs_hs, DXP)
    _str3(dM_ptr, rows, ok, m, D, offs_m, offs_d, dM)
    _str(dx_ptr, rows, ok, Dx, offs_x, dx)
    _str3(dS_ptr, rows, ok, m, Hs, offs_m, offs_hs, dS)


@triton.jit(do_not_specialize=["B", "T", "NC", "chunk", "miu_k"])
def _scan_fwd_kernel(x_ptr, len_ptr, cwi, cwh, cbi, cbh, hw, hb, murw, murb, mwi, mwh, mbi, mbh,
                     h0p, r0p, M0p, g0p, S0p, reads_ptr, hTp, rTp, MTp, gTp, STp,
                     ckh, ckr, ckM, ckg, ckS, B, T, NC, chunk, miu_k, Dx, D, m, Hc, Hs,
                     BB: tl.constexpr, DXP: tl.constexpr, DP: tl.constexpr, MP: tl.constexpr,
                     HCP: tl.constexpr, HSP: tl.constexpr, HAS_MUR: tl.constexpr,
                     HAS_MIU: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)
    ok = rows < B
    offs_x = tl.arange(0, DXP)
    offs_d = tl.arange(0, DP)
    offs_m = tl.arange(0, MP)
    offs_hc = tl.arange(0, HCP)
    offs_hs = tl.arange(0, HSP)
    mask_m = offs_m < m
    L = tl.load(len_ptr + rows, mask=ok, other=0)
    Lmax = tl.max(L, axis=0)
    h, r, M, g, S = _load_state(h0p, r0p, M0p, g0p, S0p, rows, ok, D, m, Hc, Hs, offs_d,
                                offs_m, offs_hc, offs_hs, ACC)
    for t in range(0, Lmax):
        if t % chunk == 0:
            _store_state(ckh, ckr, ckM, ckg, ckS, rows * NC + t // chunk, ok, h, r, M, g, S,
                         D, m, Hc, Hs, offs_d, offs_m, offs_hc, offs_hs)
        act = ok & (t < L)
        x = _ldr(x_ptr, rows * T + t, act, Dx, offs_x, ACC)
        h, r, M, g, S = _step_rows(act, x, h, r, M, g, S, cwi, cwh, cbi, cbh, hw, hb, murw,
                                   murb, mwi, mwh, mbi, mbh, miu_k, Dx, D, m, Hc, Hs, offs_x,
                                   offs_d, offs_m, mask_m, offs_hc, offs_hs, HAS_MUR, HAS_MIU)
        _str(reads_ptr, rows * T + t, ok, D, offs_d, tl.where(act[:, None], r, 0.0))
    # Padding: the state stays the final one (so do the checkpoints of chunks that start in
    # the padding) and the reads are 0.
    for c in range((Lmax + chunk - 1) // chunk, NC):
        _store_state(ckh, ckr, ckM, ckg, ckS, rows * NC + c, ok, h, r, M, g, S, D, m, Hc, Hs,
                     offs_d, offs_m, offs_hc, offs_hs)
    for t in range(Lmax, T):
        _str(reads_ptr, rows * T + t, ok, D, offs_d, tl.zeros((BB, DP), ACC))
    _store_state(hTp, rTp, MTp, gTp, STp, rows, ok, h, r, M, g, S, D, m, Hc, Hs, offs_d,
                 offs_m, offs_hc, offs_hs)


@triton.jit(do_not_specialize=["B", "T", "NC", "chunk", "SC", "miu_k"])
def _scan_bwd_kernel(dreads_ptr, dhp, drp, dMp, dgp, dSp, x_ptr, len_ptr,
                     cwi, cwh, cbi, cbh, hw, hb, murw, murb, mwi, mwh, mbi, mbh,
                     ckh, ckr, ckM, ckg, ckS, sch, scr, scM, scg, scS,
                     dx_ptr, dh0p, dr0p, dM0p, dg0p, dS0p,
                     d_cwi, d_cwh, d_cbi, d_cbh, d_hw, d_hb, d_murw, d_murb, d_mwi, d_mwh,
                     d_mbi, d_mbh, B, T, NC, chunk, SC, miu_k, Dx, D, m, Hc, Hs,
                     BB: tl.constexpr, DXP: tl.constexpr, DP: tl.constexpr, MP: tl.constexpr,
                     HCP: tl.constexpr, HSP: tl.constexpr, HAS_MUR: tl.constexpr,
                     HAS_MIU: tl.constexpr, ACC: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    rows = tile * BB + tl.arange(0, BB)
    ok = rows < B
    offs_x = tl.arange(0, DXP)
    offs_d = tl.arange(0, DP)
    offs_m = tl.arange(0, MP)
    offs_hc = tl.arange(0, HCP)
    offs_hs = tl.arange(0, HSP)
    mask_m = offs_m < m
    L = tl.load(len_ptr + rows, mask=ok, other=0)
    Lmax = tl.max(L, axis=0)
    # This tile's private parameter-gradient buffers (n_tiles, *param.shape).
    P = 4 * D + 2
    Gc = 3 * Hc
    Gs = 3 * Hs
    d_cwi += tile * Gc * (Dx + D)
    d_cwh += tile * Gc * Hc
    d_cbi += tile * Gc
    d_cbh += tile * Gc
    d_hw += tile * P * Hc
    d_hb += tile * P
    d_murw += tile * m * m
    d_murb += tile * m
    d_mwi += tile * Gs * (D + Dx)
    d_mwh += tile * Gs * Hs
    d_mbi += tile * Gs
    d_mbh += tile * Gs

    dh, dr, dM, dg, dS = _load_state(dhp, drp, dMp, dgp, dSp, rows, ok, D, m, Hc, Hs, offs_d,
                                     offs_m, offs_hc, offs_hs, ACC)
    for t in range(Lmax, T):
        _str(dx_ptr, rows * T + t, ok, Dx, offs_x, tl.zeros((BB, DXP), ACC))
    n_valid = (Lmax + chunk - 1) // chunk
    for i in range(0, n_valid):
        c = n_valid - 1 - i
        t0 = c * chunk
        t1 = tl.minimum(t0 + chunk, Lmax)
        # Replay the chunk: scratch slot s holds the state at the start of step t0 + s.
        h, r, M, g, S = _load_state(ckh, ckr, ckM, ckg, ckS, rows * NC + c, ok, D, m, Hc, Hs,
                                    offs_d, offs_m, offs_hc, offs_hs, ACC)
        _store_state(sch, scr, scM, scg, scS, rows * SC, ok, h, r, M, g, S, D, m, Hc, Hs,
                     offs_d, offs_m, offs_hc, offs_hs)
        for t in range(t0, t1 - 1):
            act = ok & (t < L)
            x = _ldr(x_ptr, rows * T + t, act, Dx, offs_x, ACC)
            h, r, M, g, S = _step_rows(act, x, h, r, M, g, S, cwi, cwh, cbi, cbh, hw, hb,
                                       murw, murb, mwi, mwh, mbi, mbh, miu_k, Dx, D, m, Hc,
                                       Hs, offs_x, offs_d, offs_m, mask_m, offs_hc, offs_hs,
                                       HAS_MUR, HAS_MIU)
            _store_state(sch, scr, scM, scg, scS, rows * SC + (t + 1 - t0), ok, h, r, M, g, S,
                         D, m, Hc, Hs, offs_d, offs_m, offs_hc, offs_hs)
        tl.debug_barrier()      # the scratch is read back by other threads
        for j in range(0, t1 - t0):
            t = t1 - 1 - j
            act = ok & (t < L)
            h, r, M, g, S = _load_state(sch, scr, scM, scg, scS, rows * SC + (t - t0), ok, D, m,
                                        Hc, Hs, offs_d, offs_m, offs_hc, offs_hs, ACC)
            x = _ldr(x_ptr, rows * T + t, act, Dx, offs_x, ACC)
            dr_t = dr + _ldr(dreads_ptr, rows * T + t, act, D, offs_d, ACC)  # r_t is read t
            dh2, dr2, dM2, dg2, dS2, dx = _step_bwd(
                x, h, r, M, g, S, dh, dr_t, dM, dg, dS,
                cwi, cwh, cbi, cbh, hw, hb, murw, murb, mwi, mwh, mbi, mbh,
                d_cwi, d_cwh, d_cbi, d_cbh, d_hw, d_hb, d_murw, d_murb, d_mwi, d_mwh, d_mbi,
                d_mbh, act, miu_k, Dx, D, m, Hc, Hs, offs_x, offs_d, offs_m, mask_m, offs_hc,
                offs_hs, DXP, HAS_MUR, HAS_MIU)
            dh = _keep(act, dh2, dh)
            dr = _keep(act, dr2, dr)
            dM = _keep3(act, dM2, dM)
            dg = _keep(act, dg2, dg)
            dS = _keep3(act, dS2, dS)
            _str(dx_ptr, rows * T + t, ok, Dx, offs_x, tl.where(act[:, None], dx, 0.0))
        tl.debug_barrier()      # the next chunk overwrites the scratch
    _store_state(dh0p, dr0p, dM0p, dg0p, dS0p, rows, ok, dh, dr, dM, dg, dS, D, m, Hc, Hs,
                 offs_d, offs_m, offs_hc, offs_hs)


# --------------------------------------------------------------------------- launchers


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _ptr(t: torch.Tensor) -> torch.Tensor:
    """An empty array (an absent optional parameter, S with Hs = 0, x with T = 0, ...) as a
    1-element stand-in: the kernel never touches it (its flag is off or every access is
    masked), but a GPU launch wants a real pointer, not the null data_ptr of an empty
    tensor."""
    return t if t.numel() else t.new_zeros(1)


# One software-pipeline stage for every MIMN launch. Their time loops read the same
# weights, biases and inputs at every step, and Triton's NVIDIA default (3 stages) stages
# those loads in multi-buffered shared memory: compiled for sm_90 without a GPU (Triton
# 3.6), the scan needed 741 KB of shared memory at D = 64 and 2.9 MB at D = 128 against
# 227 KB a block, so it would fail at launch, and it compiled ~2.7x slower. With 1 stage:
# 6-74 KB. (2026-12-02, not yet run on a GPU.)
_STAGES = 1


def _warps(*tile_elems: int) -> int:
    """num_warps from the largest register tile (the tile's memory M (BLOCK_B, m, D) or a
    gate's weight block). Not tuned on a GPU yet (none was available): 8 warps from 1024
    elements up, as the per-row kernels were (which spilled at 4)."""
    big = max(tile_elems)
    return 8 if big >= 1024 else 4 if big >= 256 else 2


def _dpad(n: int) -> int:
    """Padded size of a dimension that enters tl.dot: a power of two >= 16."""
    return max(16, next_pow2(n))


def _tiles(B: int) -> int:
    return -(-B // BLOCK_B)


def _rows_sum(rows, like):
    """Per-tile gradient buffers (n_tiles, *shape) -> their sum over tiles (deterministic)."""
    return [r.sum(0) if r.shape[0] else torch.zeros(r.shape[1:], dtype=r.dtype, device=r.device)
            for r in rows]


def ntm_read_write_fwd(M, g, head, mur_w, mur_b, has_mur):
    """M (B, m, D), g (B, m), head (B, 4D+2) -> (read (B, D), M_out, g_out, wr (B, m))."""
    B, m, D = M.shape
    read = M.new_empty(B, D)
    M_out, g_out, wr = torch.empty_like(M), torch.empty_like(g), torch.empty_like(g)
    if B == 0:
        return read, M_out, g_out, wr
    DP, MP = next_pow2(D), next_pow2(m)
    with device_guard(M):
        _ntm_fwd_kernel[(_tiles(B),)](_ptr(M), g, _ptr(head), _ptr(mur_w), _ptr(mur_b),
                                      _ptr(read), _ptr(M_out), g_out, wr, B, D, m, BB=BLOCK_B,
                                      DP=DP, MP=MP, HAS_MUR=bool(has_mur), ACC=_acc(M.dtype),
                                      num_warps=_warps(BLOCK_B * MP * DP, MP * MP),
                                      num_stages=_STAGES)
    return read, M_out, g_out, wr


def ntm_read_write_bwd(d_read, d_M_out, d_g_out, d_wr, M, g, head, mur_w, mur_b, has_mur):
    """-> (dM (B, m, D), dg (B, m), dhead (B, 4D+2), dmur_w (m, m), dmur_b (m,)); the MUR
    gradients are summed over rows (zeros shaped like the empty mur arrays without MUR)."""
    B, m, D = M.shape
    dM, dg, dhead = torch.empty_like(M), torch.empty_like(g), torch.empty_like(head)
    has_mur = bool(has_mur)
    nt = _tiles(B)
    tiles = [M.new_zeros(nt, *mur_w.shape), M.new_zeros(nt, *mur_b.shape)]
    if B == 0:
        return (dM, dg, dhead, *_rows_sum(tiles, M))
    DP, MP = next_pow2(D), next_pow2(m)
    with device_guard(M):
        _ntm_bwd_kernel[(nt,)](*[_ptr(t) for t in (d_read, d_M_out, d_g_out, d_wr, M, g, head)],
                               _ptr(mur_w), _ptr(mur_b), _ptr(dM), _ptr(dg), _ptr(dhead),
                               _ptr(tiles[0]), _ptr(tiles[1]), B, D, m, BB=BLOCK_B, DP=DP,
                               MP=MP, HAS_MUR=has_mur, ACC=_acc(M.dtype),
                               num_warps=_warps(BLOCK_B * MP * DP, MP * MP),
                               num_stages=_STAGES)
    return (dM, dg, dhead, *_rows_sum(tiles, M))


def _miu_sizes(M, x, S, miu_k):
    B, m, D = M.shape
    Dx, Hs = x.shape[1], S.shape[2]
    K = max(0, min(int(miu_k), m))
    pads = dict(DP=_dpad(D), DXP=_dpad(Dx), MP=next_pow2(m), HSP=_dpad(Hs))
    warps = _warps(BLOCK_B * pads["MP"] * max(pads["DP"], pads["HSP"]),
                   pads["HSP"] * max(pads["DP"], pads["DXP"], pads["HSP"]))
    return B, m, D, Dx, Hs, K, pads, warps


def miu_gather_gru_fwd(M, x, S, wr, miu_k, w_ih, w_hh, b_ih, b_hh):
    """M (B, m, D) after the write, x (B, Dx), S (B, m, Hs), wr (B, m) -> S_out (B, m, Hs)."""
    B, m, D, Dx, Hs, K, pads, warps = _miu_sizes(M, x, S, miu_k)
    S_out = torch.empty_like(S)
    if S.numel() == 0:
        return S_out
    with device_guard(M):
        _miu_fwd_kernel[(_tiles(B),)](_ptr(M), _ptr(x), S, wr, K, _ptr(w_ih), _ptr(w_hh),
                                      _ptr(b_ih), _ptr(b_hh), S_out, B, D, Dx, m, Hs,
                                      BB=BLOCK_B, **pads, ACC=_acc(M.dtype), num_warps=warps,
                                      num_stages=_STAGES)
    return S_out


def miu_gather_gru_bwd(d_S_out, M, x, S, wr, miu_k, w_ih, w_hh, b_ih, b_hh):
    """-> (dM, dx, dS, dw_ih, dw_hh, db_ih, db_hh), the parameter gradients summed over rows."""
    B, m, D, Dx, Hs, K, pads, warps = _miu_sizes(M, x, S, miu_k)
    dM, dx, dS = torch.empty_like(M), torch.empty_like(x), torch.empty_like(S)
    nt = _tiles(B)
    tiles = [M.new_zeros(nt, *p.shape) for p in (w_ih, w_hh, b_ih, b_hh)]
    if B == 0:
        return (dM, dx, dS, *_rows_sum(tiles, M))
    with device_guard(M):
        _miu_bwd_kernel[(nt,)](*[_ptr(t) for t in (d_S_out, M, x, S, wr)], K, _ptr(w_ih),
                               _ptr(w_hh), _ptr(b_ih), _ptr(b_hh),
                               *[_ptr(t) for t in (dM, dx, dS)], *[_ptr(r) for r in tiles],
                               B, D, Dx, m, Hs, BB=BLOCK_B, **pads, ACC=_acc(M.dtype),
                               num_warps=warps, num_stages=_STAGES)
    return (dM, dx, dS, *_rows_sum(tiles, M))


def _scan_config(x, r0, M0, h0, S0, has_mur, miu_k):
    B, T, Dx = x.shape
    _, m, D = M0.shape
    Hc, Hs = h0.shape[1], S0.shape[2]
    K = max(0, min(int(miu_k), m))
    pads = dict(DXP=_dpad(Dx), DP=_dpad(D), MP=next_pow2(m), HCP=_dpad(Hc), HSP=_dpad(Hs))
    # The MIU needs its weights; with Hs = 0 there is nothing to update either.
    flags = dict(HAS_MUR=bool(has_mur), HAS_MIU=K >= 1 and Hs >= 1, ACC=_acc(x.dtype))
    big = max(pads["HCP"] * max(pads["DXP"], pads["DP"], pads["HCP"]),
              pads["HSP"] * max(pads["DXP"], pads["DP"], pads["HSP"]),
              BLOCK_B * pads["MP"] * max(pads["DP"], pads["HSP"]))
    return B, T, Dx, m, D, Hc, Hs, K, pads, flags, _warps(big)


def mimn_scan_fwd(x, lengths, ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh, heads_w, heads_b,
                  mur_w, mur_b, miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh, has_mur, miu_k,
                  h0, r0, M0, g0, S0, chunk):
    """-> (reads (B, T, D), h, r, M, g, S, ck_h, ck_r, ck_M, ck_g, ck_S): the final state and
    the state at the start of every chunk of ``chunk`` steps (docs/kernel_api.md)."""
    B, T, Dx, m, D, Hc, Hs, K, pads, flags, warps = _scan_config(x, r0, M0, h0, S0, has_mur,
                                                                 miu_k)
    chunk = max(1, int(chunk))
    NC = -(-T // chunk)
    reads = x.new_empty(B, T, D)
    final = [torch.empty_like(s) for s in (h0, r0, M0, g0, S0)]
    ckpts = [s.new_empty(B, NC, *s.shape[1:]) for s in (h0, r0, M0, g0, S0)]
    if B == 0:
        return (reads, *final, *ckpts)
    params = [_ptr(p) for p in (ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh, heads_w, heads_b,
                                mur_w, mur_b, miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh)]
    with device_guard(x):
        _scan_fwd_kernel[(_tiles(B),)](_ptr(x), lengths, *params,
                                       *[_ptr(t) for t in (h0, r0, M0, g0, S0, reads, *final,
                                                           *ckpts)],
                                       B, T, NC, chunk, K, Dx, D, m, Hc, Hs, BB=BLOCK_B,
                                       **pads, **flags, num_warps=warps, num_stages=_STAGES)
    return (reads, *final, *ckpts)


def mimn_scan_bwd(d_reads, d_h, d_r, d_M, d_g, d_S, x, lengths, ctrl_w_ih, ctrl_w_hh,
                  ctrl_b_ih, ctrl_b_hh, heads_w, heads_b, mur_w, mur_b, miu_w_ih, miu_w_hh,
                  miu_b_ih, miu_b_hh, has_mur, miu_k, chunk, ck_h, ck_r, ck_M, ck_g, ck_S):
    """-> (dx, dh0, dr0, dM0, dg0, dS0, d ctrl_w_ih, ..., d miu_b_hh): the twelve parameter
    gradients summed over rows (zeros shaped like the empty arrays of absent parameters)."""
    B, T, Dx, m, D, Hc, Hs, K, pads, flags, warps = _scan_config(x, d_r, d_M, d_h, d_S,
                                                                 has_mur, miu_k)
    chunk = max(1, int(chunk))
    NC = -(-T // chunk)
    params = (ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh, heads_w, heads_b, mur_w, mur_b,
              miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh)
    dx = x.new_empty(x.shape)
    dstate0 = [torch.empty_like(s) for s in (d_h, d_r, d_M, d_g, d_S)]
    nt = _tiles(B)
    tiles = [x.new_zeros(nt, *p.shape) for p in params]
    if B == 0:
        return (dx, *dstate0, *_rows_sum(tiles, x))
    SC = max(1, min(chunk, T))          # scratch slots: a chunk never exceeds T steps
    scratch = [s.new_empty(B, SC, *s.shape[1:]) for s in (d_h, d_r, d_M, d_g, d_S)]
    with device_guard(x):
        _scan_bwd_kernel[(nt,)](*[_ptr(t) for t in (d_reads, d_h, d_r, d_M, d_g, d_S, x)],
                                lengths, *[_ptr(p) for p in params],
                                *[_ptr(c) for c in (ck_h, ck_r, ck_M, ck_g, ck_S)],
                                *[_ptr(s) for s in scratch], _ptr(dx),
                                *[_ptr(s) for s in dstate0], *[_ptr(r) for r in tiles],
                                B, T, NC, chunk, SC, K, Dx, D, m, Hc, Hs, BB=BLOCK_B, **pads,
                                **flags, num_warps=warps, num_stages=_STAGES)
    return (dx, *dstate0, *_rows_sum(tiles, x))
