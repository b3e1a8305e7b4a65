"""MIMN kernels (DESIGN.md §5): the NTM read/write with MUR, the MIU gather-GRU, and the fused
scan over whole sequences, forward and backward.

Calling convention in docs/kernel_api.md, "MIMN"; the oracle is the MIMN part of
``fastattn.reference`` (its autograd gradients are what the backwards reproduce).

Layout of the work. Batch rows are independent and each row's work is a sequential chain of
small mat-vecs (D, m, Hc, Hs, Dx are typically 32/8/32/32/32), so one program owns one row b
and keeps the row's state (h, r, M, g, S) in registers, padded to powers of two with masks
(padded lanes are kept exactly 0, which every formula below preserves). ``tl.dot`` needs
≥ 16 rows on both sides and does not take fp64, so mat-vecs are broadcast-multiply + tl.sum
with the weight tile reloaded from global memory at each use (a few KB, they stay in L1/L2).
All math runs in the inputs' dtype (fp32, or fp64 for fp64 inputs).

Transcendentals are written with tl.exp / tl.log / tl.sqrt only: libdevice does not run in
the Triton interpreter, which is how CI tests these kernels.

Parameter gradients. Each program accumulates its row's parameter gradients in a private
(B, *param.shape) buffer with load-add-store, and the launcher sums the buffers over rows
with torch: deterministic, no atomics. Within a program the threads that load an element
need not be the ones that stored it at the previous accumulation, so every accumulation
starts with a CTA barrier (``tl.debug_barrier``) that makes the earlier stores visible.

Scan backward. The forward stores the state at the start of every chunk of ``chunk`` steps;
the backward walks the chunks last-first, replays the chunk's steps from its checkpoint into
a per-row scratch of step-start states, then runs the chunk's steps in reverse, each step
recomputing its own activations from its start state (one extra forward per step instead of
storing every activation). Steps t >= lengths[b] are the identity: the forward never runs
them (reads 0 there) and the backward skips them (gradients pass through, dx = 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import device_guard, next_pow2

__all__ = ["ntm_read_write_fwd", "ntm_read_write_bwd", "miu_gather_gru_fwd",
           "miu_gather_gru_bwd", "mimn_scan_fwd", "mimn_scan_bwd"]

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
    s = tl.where(mask, s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=0))
    return e / tl.sum(e, axis=0)


@triton.jit
def _row(X, sel):
    """Row ``sel`` (one-hot over axis 0) of the register tile X."""
    return tl.sum(tl.where(sel[:, None], X, 0.0), axis=0)


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
def _st2(ptr, o0, nr, nc, offs_r, offs_c, v):
    msk = (offs_r < nr)[:, None] & (offs_c < nc)[None, :]
    tl.store(ptr + o0 + offs_r[:, None] * nc + offs_c[None, :],
             v.to(ptr.dtype.element_ty), mask=msk)


@triton.jit
def _stv(ptr, o0, n, offs, v):
    tl.store(ptr + o0 + offs, v.to(ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def _wtile(w_ptr, r0, c0, ld, nr, nc, offs_r, offs_c, ACC: tl.constexpr):
    """W[r0 : r0 + nr, c0 : c0 + nc] of a row-major matrix with leading dimension ld."""
    msk = (offs_r < nr)[:, None] & (offs_c < nc)[None, :]
    return tl.load(w_ptr + (r0 + offs_r)[:, None] * ld + (c0 + offs_c)[None, :], mask=msk,
                   other=0.0).to(ACC)


@triton.jit
def _mv(w_ptr, r0, c0, ld, nr, nc, v, offs_r, offs_c):
    """W[r0:r0+nr, c0:c0+nc] @ v -> (len(offs_r),), zero in the padded lanes. The padded
    lanes of v are zeroed first: an inf input times a zero padding weight would be NaN."""
    w = _wtile(w_ptr, r0, c0, ld, nr, nc, offs_r, offs_c, v.dtype)
    vv = tl.where(offs_c < nc, v, 0.0)
    return tl.where(offs_r < nr, tl.sum(w * vv[None, :], axis=1), 0.0)


@triton.jit
def _mvt(w_ptr, r0, c0, ld, nr, nc, u, offs_r, offs_c):
    """W[r0:r0+nr, c0:c0+nc]^T @ u -> (len(offs_c),), zero in the padded lanes (as _mv)."""
    w = _wtile(w_ptr, r0, c0, ld, nr, nc, offs_r, offs_c, u.dtype)
    uu = tl.where(offs_r < nr, u, 0.0)
    return tl.where(offs_c < nc, tl.sum(w * uu[:, None], axis=0), 0.0)


@triton.jit
def _acc_outer(dw_ptr, r0, c0, ld, nr, nc, u, v, offs_r, offs_c):
    """dW[r0:r0+nr, c0:c0+nc] += u v^T in the row's private gradient buffer."""
    msk = (offs_r < nr)[:, None] & (offs_c < nc)[None, :]
    ptrs = dw_ptr + (r0 + offs_r)[:, None] * ld + (c0 + offs_c)[None, :]
    tl.debug_barrier()      # see the module docstring: earlier stores must be visible
    cur = tl.load(ptrs, mask=msk, other=0.0)
    tl.store(ptrs, cur + (u[:, None] * v[None, :]).to(cur.dtype), mask=msk)


@triton.jit
def _acc_vec(db_ptr, o0, n, u, offs):
    """db[o0 : o0 + n] += u."""
    msk = offs < n
    tl.debug_barrier()
    cur = tl.load(db_ptr + o0 + offs, mask=msk, other=0.0)
    tl.store(db_ptr + o0 + offs, cur + u.to(cur.dtype), mask=msk)


@triton.jit
def _acc_scalar(db_ptr, o0, u):
    tl.debug_barrier()
    cur = tl.load(db_ptr + o0)
    tl.store(db_ptr + o0, cur + u.to(cur.dtype))


# --------------------------------------------------------------------------- GRU cell


@triton.jit
def _gru_fwd(w_ih, w_hh, b_ih, b_hh, x1, n1, x2, n2, h, H, offs_h, offs_1, offs_2):
    """nn.GRUCell on the input [x1 (n1), x2 (n2)] with hidden h (H).

    Returns (h', r, z, n, W_hn h + b_hn): the gates are what the backward needs.
    """
    ACC: tl.constexpr = h.dtype
    ld = n1 + n2
    ir = (_mv(w_ih, 0, 0, ld, H, n1, x1, offs_h, offs_1)
          + _mv(w_ih, 0, n1, ld, H, n2, x2, offs_h, offs_2) + _ldv(b_ih, 0, H, offs_h, ACC))
    iz = (_mv(w_ih, H, 0, ld, H, n1, x1, offs_h, offs_1)
          + _mv(w_ih, H, n1, ld, H, n2, x2, offs_h, offs_2) + _ldv(b_ih, H, H, offs_h, ACC))
    i_n = (_mv(w_ih, 2 * H, 0, ld, H, n1, x1, offs_h, offs_1)
           + _mv(w_ih, 2 * H, n1, ld, H, n2, x2, offs_h, offs_2)
           + _ldv(b_ih, 2 * H, H, offs_h, ACC))
    hr = _mv(w_hh, 0, 0, H, H, H, h, offs_h, offs_h) + _ldv(b_hh, 0, H, offs_h, ACC)
    hz = _mv(w_hh, H, 0, H, H, H, h, offs_h, offs_h) + _ldv(b_hh, H, H, offs_h, ACC)
    hn = _mv(w_hh, 2 * H, 0, H, H, H, h, offs_h, offs_h) + _ldv(b_hh, 2 * H, H, offs_h, ACC)
    r = _sigmoid(ir + hr)
    z = _sigmoid(iz + hz)
    n = _tanh(i_n + r * hn)
    return (1.0 - z) * n + z * h, r, z, n, hn


@triton.jit
def _gru_bwd(w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, x1, n1, x2, n2, h, H, r, z, n, hn,
             dh_new, offs_h, offs_1, offs_2):
    """Backward of _gru_fwd given its gates and dL/dh'. Accumulates the four parameter
    gradients into the row's buffers and returns (dx1, dx2, dh)."""
    ld = n1 + n2
    dn = dh_new * (1.0 - z)
    dz = dh_new * (h - n)
    dh = dh_new * z
    d_an = dn * (1.0 - n * n)          # pre-activation of n (input side and r * hn)
    d_az = dz * z * (1.0 - z)
    d_ar = d_an * hn * r * (1.0 - r)
    d_hn = d_an * r                    # hidden-side n projection sits behind the reset gate
    dx1 = (_mvt(w_ih, 0, 0, ld, H, n1, d_ar, offs_h, offs_1)
           + _mvt(w_ih, H, 0, ld, H, n1, d_az, offs_h, offs_1)
           + _mvt(w_ih, 2 * H, 0, ld, H, n1, d_an, offs_h, offs_1))
    dx2 = (_mvt(w_ih, 0, n1, ld, H, n2, d_ar, offs_h, offs_2)
           + _mvt(w_ih, H, n1, ld, H, n2, d_az, offs_h, offs_2)
           + _mvt(w_ih, 2 * H, n1, ld, H, n2, d_an, offs_h, offs_2))
    dh += (_mvt(w_hh, 0, 0, H, H, H, d_ar, offs_h, offs_h)
           + _mvt(w_hh, H, 0, H, H, H, d_az, offs_h, offs_h)
           + _mvt(w_hh, 2 * H, 0, H, H, H, d_hn, offs_h, offs_h))
    _acc_outer(dw_ih, 0, 0, ld, H, n1, d_ar, x1, offs_h, offs_1)
    _acc_outer(dw_ih, H, 0, ld, H, n1, d_az, x1, offs_h, offs_1)
    _acc_outer(dw_ih, 2 * H, 0, ld, H, n1, d_an, x1, offs_h, offs_1)
    _acc_outer(dw_ih, 0, n1, ld, H, n2, d_ar, x2, offs_h, offs_2)
    _acc_outer(dw_ih, H, n1, ld, H, n2, d_az, x2, offs_h, offs_2)
    _acc_outer(dw_ih, 2 * H, n1, ld, H, n2, d_an, x2, offs_h, offs_2)
    _acc_outer(dw_hh, 0, 0, H, H, H, d_ar, h, offs_h, offs_h)
    _acc_outer(dw_hh, H, 0, H, H, H, d_az, h, offs_h, offs_h)
    _acc_outer(dw_hh, 2 * H, 0, H, H, H, d_hn, h, offs_h, offs_h)
    _acc_vec(db_ih, 0, H, d_ar, offs_h)
    _acc_vec(db_ih, H, H, d_az, offs_h)
    _acc_vec(db_ih, 2 * H, H, d_an, offs_h)
    _acc_vec(db_hh, 0, H, d_ar, offs_h)
    _acc_vec(db_hh, H, H, d_az, offs_h)
    _acc_vec(db_hh, 2 * H, H, d_hn, offs_h)
    return dx1, dx2, dh


# --------------------------------------------------------------------------- heads


@triton.jit
def _heads_fwd(hw, hb, h, D, Hc, offs_d, offs_hc):
    """Raw head outputs p = W h + b, split as [k_r (D), beta_r, k_w (D), beta_w, e (D), a (D)]
    (rows 0, D, D+1, 2D+1, 2D+2, 3D+2 of the (4D+2, Hc) weight)."""
    ACC: tl.constexpr = h.dtype
    kr = _mv(hw, 0, 0, Hc, D, Hc, h, offs_d, offs_hc) + _ldv(hb, 0, D, offs_d, ACC)
    br = tl.sum(_ldv(hw, D * Hc, Hc, offs_hc, ACC) * h, axis=0) + tl.load(hb + D).to(ACC)
    kw = _mv(hw, D + 1, 0, Hc, D, Hc, h, offs_d, offs_hc) + _ldv(hb, D + 1, D, offs_d, ACC)
    bw = (tl.sum(_ldv(hw, (2 * D + 1) * Hc, Hc, offs_hc, ACC) * h, axis=0)
          + tl.load(hb + 2 * D + 1).to(ACC))
    e = _mv(hw, 2 * D + 2, 0, Hc, D, Hc, h, offs_d, offs_hc) + _ldv(hb, 2 * D + 2, D, offs_d,
                                                                     ACC)
    a = _mv(hw, 3 * D + 2, 0, Hc, D, Hc, h, offs_d, offs_hc) + _ldv(hb, 3 * D + 2, D, offs_d,
                                                                     ACC)
    return kr, br, kw, bw, e, a


@triton.jit
def _heads_bwd(hw, dhw, dhb, h, dkr, dbr, dkw, dbw, de, da, D, Hc, offs_d, offs_hc):
    """Backward of _heads_fwd: accumulates dW, db and returns dL/dh."""
    ACC: tl.constexpr = h.dtype
    dh = (_mvt(hw, 0, 0, Hc, D, Hc, dkr, offs_d, offs_hc)
          + _ldv(hw, D * Hc, Hc, offs_hc, ACC) * dbr
          + _mvt(hw, D + 1, 0, Hc, D, Hc, dkw, offs_d, offs_hc)
          + _ldv(hw, (2 * D + 1) * Hc, Hc, offs_hc, ACC) * dbw
          + _mvt(hw, 2 * D + 2, 0, Hc, D, Hc, de, offs_d, offs_hc)
          + _mvt(hw, 3 * D + 2, 0, Hc, D, Hc, da, offs_d, offs_hc))
    _acc_outer(dhw, 0, 0, Hc, D, Hc, dkr, h, offs_d, offs_hc)
    _acc_vec(dhw, D * Hc, Hc, dbr * h, offs_hc)
    _acc_outer(dhw, D + 1, 0, Hc, D, Hc, dkw, h, offs_d, offs_hc)
    _acc_vec(dhw, (2 * D + 1) * Hc, Hc, dbw * h, offs_hc)
    _acc_outer(dhw, 2 * D + 2, 0, Hc, D, Hc, de, h, offs_d, offs_hc)
    _acc_outer(dhw, 3 * D + 2, 0, Hc, D, Hc, da, h, offs_d, offs_hc)
    _acc_vec(dhb, 0, D, dkr, offs_d)
    _acc_scalar(dhb, D, dbr)
    _acc_vec(dhb, D + 1, D, dkw, offs_d)
    _acc_scalar(dhb, 2 * D + 1, dbw)
    _acc_vec(dhb, 2 * D + 2, D, de, offs_d)
    _acc_vec(dhb, 3 * D + 2, D, da, offs_d)
    return dh


# --------------------------------------------------------------------------- NTM (steps 3-6)


@triton.jit
def _content_fwd(k, beta, M, mask_m):
    """softmax_i(beta · cos(k, M(i))), cos = k·M(i) / max(|k| |M(i)|, 1e-8)."""
    dots = tl.sum(M * k[None, :], axis=1)
    den = tl.maximum(tl.sqrt(tl.sum(k * k, axis=0)) * tl.sqrt(tl.sum(M * M, axis=1)), 1e-8)
    return _masked_softmax(beta * dots / den, mask_m)


@triton.jit
def _content_bwd(k, beta, M, w, dw):
    """Backward of _content_fwd (w its output): returns (dk, dbeta, dM).

    Matches torch's autograd: the clamp passes the gradient where |k||M(i)| >= 1e-8, and
    the norm's gradient at a zero vector is 0.
    """
    dots = tl.sum(M * k[None, :], axis=1)
    kn = tl.sqrt(tl.sum(k * k, axis=0))
    Mn = tl.sqrt(tl.sum(M * M, axis=1))
    prod = kn * Mn
    den = tl.maximum(prod, 1e-8)
    ds = w * (dw - tl.sum(w * dw, axis=0))           # softmax backward (0 on padded slots)
    dbeta = tl.sum(ds * dots / den, axis=0)
    ddots = ds * beta / den
    dprod = tl.where(prod >= 1e-8, -ds * beta * dots / (den * den), 0.0)
    dkn = tl.sum(dprod * Mn, axis=0)
    inv_kn = tl.where(kn > 0, 1.0 / tl.where(kn > 0, kn, 1.0), 0.0)
    inv_Mn = tl.where(Mn > 0, 1.0 / tl.where(Mn > 0, Mn, 1.0), 0.0)
    dk = tl.sum(ddots[:, None] * M, axis=0) + (dkn * inv_kn) * k
    dM = ddots[:, None] * k[None, :] + (dprod * kn * inv_Mn)[:, None] * M
    return dk, dbeta, dM


@triton.jit
def _ntm_core(M, g, kr_, br_, kw_, bw_, e_, a_, murw, murb, m, offs_m, mask_m,
              HAS_MUR: tl.constexpr):
    """Steps 3-6 from the raw head outputs. Returns the outputs (read, M', g', wr) and the
    intermediates the backward needs (ww, P, sum(ww P), w~, activated heads)."""
    ACC: tl.constexpr = M.dtype
    kr = _tanh(kr_)
    br = _softplus(br_) + 1.0
    kw = _tanh(kw_)
    bw = _softplus(bw_) + 1.0
    e = _sigmoid(e_)
    a = _tanh(a_)
    wr = _content_fwd(kr, br, M, mask_m)
    ww = _content_fwd(kw, bw, M, mask_m)
    read = tl.sum(wr[:, None] * M, axis=0)
    if HAS_MUR:
        q = _mv(murw, 0, 0, m, m, m, g, offs_m, offs_m) + _ldv(murb, 0, m, offs_m, ACC)
        P = _masked_softmax(q, mask_m)
        u = ww * P
        us = tl.sum(u, axis=0)
        wt = u / us
    else:
        P = ww
        us = tl.sum(ww, axis=0)
        wt = ww
    g_new = g + wt
    M_new = M * (1.0 - wt[:, None] * e[None, :]) + wt[:, None] * a[None, :]
    return read, M_new, g_new, wr, ww, P, us, wt, kr, br, kw, bw, e, a


@triton.jit
def _ntm_backprop(M, g, wr, ww, P, us, wt, kr, br, kw, bw, e, a, br_, bw_,
                  dread, dM_new, dg_new, dwr, murw, dmurw, dmurb, m, offs_m,
                  HAS_MUR: tl.constexpr):
    """Backward of _ntm_core. Returns (dM, dg, dkr_, dbr_, dkw_, dbw_, de_, da_) (raw head
    gradients) and accumulates the MUR parameter gradients."""
    # write: M' = M (1 - w~ e^T) + w~ a^T, g' = g + w~
    dM = dM_new * (1.0 - wt[:, None] * e[None, :])
    dwt = dg_new + tl.sum(dM_new * (a[None, :] - M * e[None, :]), axis=1)
    de = -tl.sum(dM_new * M * wt[:, None], axis=0)
    da = tl.sum(dM_new * wt[:, None], axis=0)
    dg = dg_new
    if HAS_MUR:
        # w~ = u / sum(u), u = ww P, P = softmax(W_g g + b_g)
        du = (dwt - tl.sum(dwt * wt, axis=0)) / us
        dww = du * P
        dP = du * ww
        dq = P * (dP - tl.sum(P * dP, axis=0))
        _acc_outer(dmurw, 0, 0, m, m, m, dq, g, offs_m, offs_m)
        _acc_vec(dmurb, 0, m, dq, offs_m)
        dg += _mvt(murw, 0, 0, m, m, m, dq, offs_m, offs_m)
    else:
        dww = dwt
    # read = sum_i wr_i M_i (from the memory before the write)
    dwr = dwr + tl.sum(M * dread[None, :], axis=1)
    dM += wr[:, None] * dread[None, :]
    dkw, dbw, dMw = _content_bwd(kw, bw, M, ww, dww)
    dkr, dbr, dMr = _content_bwd(kr, br, M, wr, dwr)
    dM += dMw + dMr
    return (dM, dg, dkr * (1.0 - kr * kr), dbr * _softplus_grad(br_), dkw * (1.0 - kw * kw),
            dbw * _softplus_grad(bw_), de * e * (1.0 - e), da * (1.0 - a * a))


# --------------------------------------------------------------------------- MIU (step 7)


@triton.jit
def _miu_pick(wr, avail, offs_m):
    """One-hot of the largest wr among the channels still available (avail), ties to the
    smaller index, NaN above every number (torch.sort's descending order)."""
    isnan = wr != wr
    nan_idx = tl.min(tl.where(avail & isnan, offs_m, 1 << 30), axis=0)
    best = tl.max(tl.where(avail & ~isnan, wr, float("-inf")), axis=0)
    idx = tl.min(tl.where(avail & (wr == best), offs_m, 1 << 30), axis=0)
    idx = tl.where(nan_idx < (1 << 30), nan_idx, idx)
    return offs_m == idx


@triton.jit
def _miu_fwd(M_new, x, S, wr, K, wi, wh, bi, bh, D, Dx, Hs, offs_m, mask_m, offs_d, offs_x,
             offs_hs):
    """The K channels with the largest wr (repeated argmax, ties to the smaller index, NaN
    largest) get
    GRU([M'(i), x], S(i)); the others keep S(i). The channels are distinct, so updating
    them one after the other is the same as updating them together."""
    avail = mask_m
    S_out = S
    for _ in range(K):
        sel = _miu_pick(wr, avail, offs_m)
        s_new, _r, _z, _n, _hn = _gru_fwd(wi, wh, bi, bh, _row(M_new, sel), D, x, Dx,
                                          _row(S, sel), Hs, offs_hs, offs_d, offs_x)
        S_out = tl.where(sel[:, None], s_new[None, :], S_out)
        avail = avail & ~sel
    return S_out


@triton.jit
def _miu_bwd(M_new, x, S, wr, dS_new, K, wi, wh, bi, bh, dwi, dwh, dbi, dbh, D, Dx, Hs,
             offs_m, mask_m, offs_d, offs_x, offs_hs, DXP: tl.constexpr):
    """Backward of _miu_fwd: returns (dM', dx, dS); no gradient reaches wr (the selection
    is discrete)."""
    avail = mask_m
    dS = dS_new                                  # unselected channels pass through
    dM = tl.zeros_like(M_new)
    dx = tl.zeros((DXP,), M_new.dtype)
    for _ in range(K):
        sel = _miu_pick(wr, avail, offs_m)
        Mi = _row(M_new, sel)
        Si = _row(S, sel)
        _s, r, z, n, hn = _gru_fwd(wi, wh, bi, bh, Mi, D, x, Dx, Si, Hs, offs_hs, offs_d,
                                   offs_x)
        dMi, dxi, dSi = _gru_bwd(wi, wh, dwi, dwh, dbi, dbh, Mi, D, x, Dx, Si, Hs, r, z, n, hn,
                                 _row(dS_new, sel), offs_hs, offs_d, offs_x)
        dM = tl.where(sel[:, None], dMi[None, :], dM)
        dS = tl.where(sel[:, None], dSi[None, :], dS)
        dx += dxi
        avail = avail & ~sel
    return dM, dx, dS


# --------------------------------------------------------------------------- one MIMN step


@triton.jit
def _step_fwd(x, h, r, M, g, S, cwi, cwh, cbi, cbh, hw, hb, murw, murb, mwi, mwh, mbi, mbh,
              miu_k, Dx, D, m, Hc, Hs, offs_x, offs_d, offs_m, mask_m, offs_hc, offs_hs,
              HAS_MUR: tl.constexpr, HAS_MIU: tl.constexpr):
    """Steps 1-7 for a valid step: returns the new (h, r, M, g, S); r is also the read."""
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
              d_mbh, miu_k, Dx, D, m, Hc, Hs, offs_x, offs_d, offs_m, mask_m, offs_hc,
              offs_hs, DXP: tl.constexpr, HAS_MUR: tl.constexpr, HAS_MIU: tl.constexpr):
    """Backward of one valid step from its start state and the gradients of its outputs
    (dr_n already includes the gradient of this step's read). Returns the gradients of the
    start state (dh, dr, dM, dg, dS) and dx; accumulates the parameter gradients."""
    # Recompute the step's activations.
    h_new, rg, zg, ng, hn = _gru_fwd(cwi, cwh, cbi, cbh, x, Dx, r, D, h, Hc, offs_hc, offs_x,
                                     offs_d)
    kr_, br_, kw_, bw_, e_, a_ = _heads_fwd(hw, hb, h_new, D, Hc, offs_d, offs_hc)
    read, M_new, g_new, wr, ww, P, us, wt, kr, br, kw, bw, e, a = _ntm_core(
        M, g, kr_, br_, kw_, bw_, e_, a_, murw, murb, m, offs_m, mask_m, HAS_MUR)
    # MIU, then the NTM write/read, then the heads, then the controller.
    if HAS_MIU:
        dM_miu, dx, dS = _miu_bwd(M_new, x, S, wr, dS_n, miu_k, mwi, mwh, mbi, mbh, d_mwi,
                                  d_mwh, d_mbi, d_mbh, D, Dx, Hs, offs_m, mask_m, offs_d,
                                  offs_x, offs_hs, DXP)
        dM_new = dM_n + dM_miu
    else:
        dx = tl.zeros((DXP,), M.dtype)
        dS = dS_n
        dM_new = dM_n
    dM, dg, dkr_, dbr_, dkw_, dbw_, de_, da_ = _ntm_backprop(
        M, g, wr, ww, P, us, wt, kr, br, kw, bw, e, a, br_, bw_, dr_n, dM_new, dg_n,
        tl.zeros_like(wr), murw, d_murw, d_murb, m, offs_m, HAS_MUR)
    dh_new = dh_n + _heads_bwd(hw, d_hw, d_hb, h_new, dkr_, dbr_, dkw_, dbw_, de_, da_, D, Hc,
                               offs_d, offs_hc)
    dxc, dr, dh = _gru_bwd(cwi, cwh, d_cwi, d_cwh, d_cbi, d_cbh, x, Dx, r, D, h, Hc, rg, zg,
                           ng, hn, dh_new, offs_hc, offs_x, offs_d)
    return dh, dr, dM, dg, dS, dx + dxc


# --------------------------------------------------------------------------- state I/O


@triton.jit
def _load_state(hp, rp, Mp, gp, Sp, i, D, m, Hc, Hs, offs_d, offs_m, offs_hc, offs_hs,
                ACC: tl.constexpr):
    """Entry i of state arrays laid out (N, Hc), (N, D), (N, m, D), (N, m), (N, m, Hs)."""
    h = _ldv(hp, i * Hc, Hc, offs_hc, ACC)
    r = _ldv(rp, i * D, D, offs_d, ACC)
    M = _ld2(Mp, i * m * D, m, D, offs_m, offs_d, ACC)
    g = _ldv(gp, i * m, m, offs_m, ACC)
    S = _ld2(Sp, i * m * Hs, m, Hs, offs_m, offs_hs, ACC)
    return h, r, M, g, S


@triton.jit
def _store_state(hp, rp, Mp, gp, Sp, i, h, r, M, g, S, D, m, Hc, Hs, offs_d, offs_m,
                 offs_hc, offs_hs):
    _stv(hp, i * Hc, Hc, offs_hc, h)
    _stv(rp, i * D, D, offs_d, r)
    _st2(Mp, i * m * D, m, D, offs_m, offs_d, M)
    _stv(gp, i * m, m, offs_m, g)
    _st2(Sp, i * m * Hs, m, Hs, offs_m, offs_hs, S)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _ntm_fwd_kernel(M_ptr, g_ptr, head_ptr, murw, murb, read_ptr, Mo_ptr, go_ptr, wr_ptr,
                    D, m, DP: tl.constexpr, MP: tl.constexpr, HAS_MUR: tl.constexpr,
                    ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, DP)
    offs_m = tl.arange(0, MP)
    mask_m = offs_m < m
    P = 4 * D + 2
    M = _ld2(M_ptr, b * m * D, m, D, offs_m, offs_d, ACC)
    g = _ldv(g_ptr, b * m, m, offs_m, ACC)
    hp = head_ptr + b * P
    read, M_new, g_new, wr, _ww, _P, _us, _wt, _kr, _br, _kw, _bw, _e, _a = _ntm_core(
        M, g, _ldv(hp, 0, D, offs_d, ACC), tl.load(hp + D).to(ACC),
        _ldv(hp, D + 1, D, offs_d, ACC), tl.load(hp + 2 * D + 1).to(ACC),
        _ldv(hp, 2 * D + 2, D, offs_d, ACC), _ldv(hp, 3 * D + 2, D, offs_d, ACC),
        murw, murb, m, offs_m, mask_m, HAS_MUR)
    _stv(read_ptr, b * D, D, offs_d, read)
    _st2(Mo_ptr, b * m * D, m, D, offs_m, offs_d, M_new)
    _stv(go_ptr, b * m, m, offs_m, g_new)
    _stv(wr_ptr, b * m, m, offs_m, wr)


@triton.jit
def _ntm_bwd_kernel(dread_ptr, dMo_ptr, dgo_ptr, dwr_ptr, M_ptr, g_ptr, head_ptr, murw, murb,
                    dM_ptr, dg_ptr, dhead_ptr, dmurw_rows, dmurb_rows,
                    D, m, DP: tl.constexpr, MP: tl.constexpr, HAS_MUR: tl.constexpr,
                    ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, DP)
    offs_m = tl.arange(0, MP)
    mask_m = offs_m < m
    P = 4 * D + 2
    M = _ld2(M_ptr, b * m * D, m, D, offs_m, offs_d, ACC)
    g = _ldv(g_ptr, b * m, m, offs_m, ACC)
    hp = head_ptr + b * P
    br_ = tl.load(hp + D).to(ACC)
    bw_ = tl.load(hp + 2 * D + 1).to(ACC)
    read, M_new, g_new, wr, ww, Pm, us, wt, kr, br, kw, bw, e, a = _ntm_core(
        M, g, _ldv(hp, 0, D, offs_d, ACC), br_, _ldv(hp, D + 1, D, offs_d, ACC), bw_,
        _ldv(hp, 2 * D + 2, D, offs_d, ACC), _ldv(hp, 3 * D + 2, D, offs_d, ACC),
        murw, murb, m, offs_m, mask_m, HAS_MUR)
    dM, dg, dkr_, dbr_, dkw_, dbw_, de_, da_ = _ntm_backprop(
        M, g, wr, ww, Pm, us, wt, kr, br, kw, bw, e, a, br_, bw_,
        _ldv(dread_ptr, b * D, D, offs_d, ACC),
        _ld2(dMo_ptr, b * m * D, m, D, offs_m, offs_d, ACC),
        _ldv(dgo_ptr, b * m, m, offs_m, ACC), _ldv(dwr_ptr, b * m, m, offs_m, ACC),
        murw, dmurw_rows + b * m * m, dmurb_rows + b * m, m, offs_m, HAS_MUR)
    _st2(dM_ptr, b * m * D, m, D, offs_m, offs_d, dM)
    _stv(dg_ptr, b * m, m, offs_m, dg)
    dp = dhead_ptr + b * P
    _stv(dp, 0, D, offs_d, dkr_)
    tl.store(dp + D, dbr_.to(dhead_ptr.dtype.element_ty))
    _stv(dp, D + 1, D, offs_d, dkw_)
    tl.store(dp + 2 * D + 1, dbw_.to(dhead_ptr.dtype.element_ty))
    _stv(dp, 2 * D + 2, D, offs_d, de_)
    _stv(dp, 3 * D + 2, D, offs_d, da_)


@triton.jit
def _miu_fwd_kernel(M_ptr, x_ptr, S_ptr, wr_ptr, K, wi, wh, bi, bh, So_ptr, D, Dx, m, Hs,
                    DP: tl.constexpr, DXP: tl.constexpr, MP: tl.constexpr, HSP: tl.constexpr,
                    ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, DP)
    offs_x = tl.arange(0, DXP)
    offs_m = tl.arange(0, MP)
    offs_hs = tl.arange(0, HSP)
    mask_m = offs_m < m
    M = _ld2(M_ptr, b * m * D, m, D, offs_m, offs_d, ACC)
    x = _ldv(x_ptr, b * Dx, Dx, offs_x, ACC)
    S = _ld2(S_ptr, b * m * Hs, m, Hs, offs_m, offs_hs, ACC)
    wr = _ldv(wr_ptr, b * m, m, offs_m, ACC)
    S_new = _miu_fwd(M, x, S, wr, K, wi, wh, bi, bh, D, Dx, Hs, offs_m, mask_m, offs_d, offs_x,
                     offs_hs)
    _st2(So_ptr, b * m * Hs, m, Hs, offs_m, offs_hs, S_new)


@triton.jit
def _miu_bwd_kernel(dSo_ptr, M_ptr, x_ptr, S_ptr, wr_ptr, K, wi, wh, bi, bh,
                    dM_ptr, dx_ptr, dS_ptr, dwi_rows, dwh_rows, dbi_rows, dbh_rows,
                    D, Dx, m, Hs, DP: tl.constexpr, DXP: tl.constexpr, MP: tl.constexpr,
                    HSP: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, DP)
    offs_x = tl.arange(0, DXP)
    offs_m = tl.arange(0, MP)
    offs_hs = tl.arange(0, HSP)
    mask_m = offs_m < m
    M = _ld2(M_ptr, b * m * D, m, D, offs_m, offs_d, ACC)
    x = _ldv(x_ptr, b * Dx, Dx, offs_x, ACC)
    S = _ld2(S_ptr, b * m * Hs, m, Hs, offs_m, offs_hs, ACC)
    wr = _ldv(wr_ptr, b * m, m, offs_m, ACC)
    dSo = _ld2(dSo_ptr, b * m * Hs, m, Hs, offs_m, offs_hs, ACC)
    G = 3 * Hs
    dM, dx, dS = _miu_bwd(M, x, S, wr, dSo, K, wi, wh, bi, bh,
                          dwi_rows + b * G * (D + Dx), dwh_rows + b * G * Hs, dbi_rows + b * G,
                          dbh_rows + b * G, D, Dx, Hs, offs_m, mask_m, offs_d, offs_x, offs_hs,
                          DXP)
    _st2(dM_ptr, b * m * D, m, D, offs_m, offs_d, dM)
    _stv(dx_ptr, b * Dx, Dx, offs_x, dx)
    _st2(dS_ptr, b * m * Hs, m, Hs, offs_m, offs_hs, dS)


@triton.jit
def _scan_fwd_kernel(x_ptr, len_ptr, cwi, cwh, cbi, cbh, hw, hb, murw, murb, mwi, mwh, mbi, mbh,
                     h0p, r0p, M0p, g0p, S0p, reads_ptr, hTp, rTp, MTp, gTp, STp,
                     ckh, ckr, ckM, ckg, ckS, T, NC, chunk, miu_k, Dx, D, m, Hc, Hs,
                     DXP: tl.constexpr, DP: tl.constexpr, MP: tl.constexpr,
                     HCP: tl.constexpr, HSP: tl.constexpr, HAS_MUR: tl.constexpr,
                     HAS_MIU: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_x = tl.arange(0, DXP)
    offs_d = tl.arange(0, DP)
    offs_m = tl.arange(0, MP)
    offs_hc = tl.arange(0, HCP)
    offs_hs = tl.arange(0, HSP)
    mask_m = offs_m < m
    L = tl.load(len_ptr + b)
    h, r, M, g, S = _load_state(h0p, r0p, M0p, g0p, S0p, b, D, m, Hc, Hs, offs_d, offs_m,
                                offs_hc, offs_hs, ACC)
    for t in range(0, L):
        if t % chunk == 0:
            _store_state(ckh, ckr, ckM, ckg, ckS, b * NC + t // chunk, h, r, M, g, S, D, m, Hc,
                         Hs, offs_d, offs_m, offs_hc, offs_hs)
        x = _ldv(x_ptr, (b * T + t) * Dx, Dx, offs_x, ACC)
        h, r, M, g, S = _step_fwd(x, h, r, M, g, S, cwi, cwh, cbi, cbh, hw, hb, murw, murb,
                                  mwi, mwh, mbi, mbh, miu_k, Dx, D, m, Hc, Hs, offs_x, offs_d,
                                  offs_m, mask_m, offs_hc, offs_hs, HAS_MUR, HAS_MIU)
        _stv(reads_ptr, (b * T + t) * D, D, offs_d, r)
    # Padding: the state stays the final one (so do the checkpoints of chunks that start in
    # the padding) and the reads are 0.
    for c in range((L + chunk - 1) // chunk, NC):
        _store_state(ckh, ckr, ckM, ckg, ckS, b * NC + c, h, r, M, g, S, D, m, Hc, Hs, offs_d,
                     offs_m, offs_hc, offs_hs)
    for t in range(L, T):
        _stv(reads_ptr, (b * T + t) * D, D, offs_d, tl.zeros((DP,), ACC))
    _store_state(hTp, rTp, MTp, gTp, STp, b, h, r, M, g, S, D, m, Hc, Hs, offs_d, offs_m,
                 offs_hc, offs_hs)


@triton.jit
def _scan_bwd_kernel(dreads_ptr, dhp, drp, dMp, dgp, dSp, x_ptr, len_ptr,
                     cwi, cwh, cbi, cbh, hw, hb, murw, murb, mwi, mwh, mbi, mbh,
                     ckh, ckr, ckM, ckg, ckS, sch, scr, scM, scg, scS,
                     dx_ptr, dh0p, dr0p, dM0p, dg0p, dS0p,
                     d_cwi, d_cwh, d_cbi, d_cbh, d_hw, d_hb, d_murw, d_murb, d_mwi, d_mwh,
                     d_mbi, d_mbh, T, NC, chunk, SC, miu_k, Dx, D, m, Hc, Hs,
                     DXP: tl.constexpr, DP: tl.constexpr, MP: tl.constexpr,
                     HCP: tl.constexpr, HSP: tl.constexpr, HAS_MUR: tl.constexpr,
                     HAS_MIU: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_x = tl.arange(0, DXP)
    offs_d = tl.arange(0, DP)
    offs_m = tl.arange(0, MP)
    offs_hc = tl.arange(0, HCP)
    offs_hs = tl.arange(0, HSP)
    mask_m = offs_m < m
    L = tl.load(len_ptr + b)
    # This row's private parameter-gradient buffers (B, *param.shape).
    P = 4 * D + 2
    Gc = 3 * Hc
    Gs = 3 * Hs
    d_cwi += b * Gc * (Dx + D)
    d_cwh += b * Gc * Hc
    d_cbi += b * Gc
    d_cbh += b * Gc
    d_hw += b * P * Hc
    d_hb += b * P
    d_murw += b * m * m
    d_murb += b * m
    d_mwi += b * Gs * (D + Dx)
    d_mwh += b * Gs * Hs
    d_mbi += b * Gs
    d_mbh += b * Gs

    dh, dr, dM, dg, dS = _load_state(dhp, drp, dMp, dgp, dSp, b, D, m, Hc, Hs, offs_d, offs_m,
                                     offs_hc, offs_hs, ACC)
    for t in range(L, T):
        _stv(dx_ptr, (b * T + t) * Dx, Dx, offs_x, tl.zeros((DXP,), ACC))
    n_valid = (L + chunk - 1) // chunk
    for i in range(0, n_valid):
        c = n_valid - 1 - i
        t0 = c * chunk
        t1 = tl.minimum(t0 + chunk, L)
        # Replay the chunk: scratch slot s holds the state at the start of step t0 + s.
        h, r, M, g, S = _load_state(ckh, ckr, ckM, ckg, ckS, b * NC + c, D, m, Hc, Hs, offs_d,
                                    offs_m, offs_hc, offs_hs, ACC)
        _store_state(sch, scr, scM, scg, scS, b * SC, h, r, M, g, S, D, m, Hc, Hs, offs_d,
                     offs_m, offs_hc, offs_hs)
        for t in range(t0, t1 - 1):
            x = _ldv(x_ptr, (b * T + t) * Dx, Dx, offs_x, ACC)
            h, r, M, g, S = _step_fwd(x, h, r, M, g, S, cwi, cwh, cbi, cbh, hw, hb, murw, murb,
                                      mwi, mwh, mbi, mbh, miu_k, Dx, D, m, Hc, Hs, offs_x,
                                      offs_d, offs_m, mask_m, offs_hc, offs_hs, HAS_MUR,
                                      HAS_MIU)
            _store_state(sch, scr, scM, scg, scS, b * SC + (t + 1 - t0), h, r, M, g, S, D, m,
                         Hc, Hs, offs_d, offs_m, offs_hc, offs_hs)
        tl.debug_barrier()      # the scratch is read back by other threads
        for j in range(0, t1 - t0):
            t = t1 - 1 - j
            h, r, M, g, S = _load_state(sch, scr, scM, scg, scS, b * SC + (t - t0), D, m, Hc,
                                        Hs, offs_d, offs_m, offs_hc, offs_hs, ACC)
            x = _ldv(x_ptr, (b * T + t) * Dx, Dx, offs_x, ACC)
            dr += _ldv(dreads_ptr, (b * T + t) * D, D, offs_d, ACC)   # r_t is also read t
            dh, dr, dM, dg, dS, dx = _step_bwd(
                x, h, r, M, g, S, dh, dr, dM, dg, dS,
                cwi, cwh, cbi, cbh, hw, hb, murw, murb, mwi, mwh, mbi, mbh,
                d_cwi, d_cwh, d_cbi, d_cbh, d_hw, d_hb, d_murw, d_murb, d_mwi, d_mwh, d_mbi,
                d_mbh, miu_k, Dx, D, m, Hc, Hs, offs_x, offs_d, offs_m, mask_m, offs_hc,
                offs_hs, DXP, HAS_MUR, HAS_MIU)
            _stv(dx_ptr, (b * T + t) * Dx, Dx, offs_x, dx)
        tl.debug_barrier()      # the next chunk overwrites the scratch
    _store_state(dh0p, dr0p, dM0p, dg0p, dS0p, b, dh, dr, dM, dg, dS, D, m, Hc, Hs, offs_d,
                 offs_m, offs_hc, offs_hs)


# --------------------------------------------------------------------------- launchers


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _ptr(t: torch.Tensor) -> torch.Tensor:
    """An empty array (an absent optional parameter, S with Hs = 0, x with T = 0, ...) as a
    1-element stand-in: the kernel never touches it (its flag is off or every access is
    masked), but a GPU launch wants a real pointer, not the null data_ptr of an empty
    tensor."""
    return t if t.numel() else t.new_zeros(1)


def _warps(*tile_elems: int) -> int:
    """num_warps from the largest register tile (a weight block of one gate).

    Compiled for sm_90 (Triton 3.9, not timed on a GPU yet), Dx = D = Hc = Hs = 32, m = 8:
    the scan kernels keep several 32×32 weight tiles live at once (Triton hoists the MIU
    weights out of the channel loop, and a tile loaded for a forward mat-vec is reused by
    the transposed one in the backward), which at 4 warps spills 2-6 KB per thread to local
    memory; 8 warps bring that to 0.3 KB (fwd fp32) / 1.5 KB (bwd fp32).
    """
    big = max(tile_elems)
    return 8 if big >= 1024 else 4 if big >= 256 else 2


def _rows_sum(rows, like):
    """Per-row gradient buffers (B, *shape) -> their sum over rows (deterministic)."""
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
        _ntm_fwd_kernel[(B,)](_ptr(M), g, _ptr(head), _ptr(mur_w), _ptr(mur_b), _ptr(read),
                              _ptr(M_out), g_out, wr, D, m, DP=DP, MP=MP,
                              HAS_MUR=bool(has_mur), ACC=_acc(M.dtype),
                              num_warps=_warps(MP * DP, MP * MP))
    return read, M_out, g_out, wr


def ntm_read_write_bwd(d_read, d_M_out, d_g_out, d_wr, M, g, head, mur_w, mur_b, has_mur):
    """-> (dM (B, m, D), dg (B, m), dhead (B, 4D+2), dmur_w (m, m), dmur_b (m,)); the MUR
    gradients are summed over rows (zeros shaped like the empty mur arrays without MUR)."""
    B, m, D = M.shape
    dM, dg, dhead = torch.empty_like(M), torch.empty_like(g), torch.empty_like(head)
    has_mur = bool(has_mur)
    rows = [M.new_zeros(B, *mur_w.shape), M.new_zeros(B, *mur_b.shape)]
    if B == 0:
        return (dM, dg, dhead, *_rows_sum(rows, M))
    DP, MP = next_pow2(D), next_pow2(m)
    with device_guard(M):
        _ntm_bwd_kernel[(B,)](*[_ptr(t) for t in (d_read, d_M_out, d_g_out, d_wr, M, g, head)],
                              _ptr(mur_w), _ptr(mur_b), _ptr(dM), _ptr(dg), _ptr(dhead),
                              _ptr(rows[0]), _ptr(rows[1]),
                              D, m, DP=DP, MP=MP, HAS_MUR=has_mur, ACC=_acc(M.dtype),
                              num_warps=_warps(MP * DP, MP * MP))
    return (dM, dg, dhead, *_rows_sum(rows, M))


def _miu_sizes(M, x, S, miu_k):
    B, m, D = M.shape
    Dx, Hs = x.shape[1], S.shape[2]
    K = max(0, min(int(miu_k), m))
    return B, m, D, Dx, Hs, K


def miu_gather_gru_fwd(M, x, S, wr, miu_k, w_ih, w_hh, b_ih, b_hh):
    """M (B, m, D) after the write, x (B, Dx), S (B, m, Hs), wr (B, m) -> S_out (B, m, Hs)."""
    B, m, D, Dx, Hs, K = _miu_sizes(M, x, S, miu_k)
    S_out = torch.empty_like(S)
    if S.numel() == 0:
        return S_out
    DP, DXP, MP, HSP = next_pow2(D), next_pow2(Dx), next_pow2(m), next_pow2(Hs)
    with device_guard(M):
        _miu_fwd_kernel[(B,)](_ptr(M), _ptr(x), S, wr, K, _ptr(w_ih), _ptr(w_hh), _ptr(b_ih),
                              _ptr(b_hh), S_out, D, Dx, m, Hs, DP=DP, DXP=DXP, MP=MP, HSP=HSP,
                              ACC=_acc(M.dtype), num_warps=_warps(HSP * max(DP, DXP, HSP)))
    return S_out


def miu_gather_gru_bwd(d_S_out, M, x, S, wr, miu_k, w_ih, w_hh, b_ih, b_hh):
    """-> (dM, dx, dS, dw_ih, dw_hh, db_ih, db_hh), the parameter gradients summed over rows."""
    B, m, D, Dx, Hs, K = _miu_sizes(M, x, S, miu_k)
    dM, dx, dS = torch.empty_like(M), torch.empty_like(x), torch.empty_like(S)
    rows = [M.new_zeros(B, *p.shape) for p in (w_ih, w_hh, b_ih, b_hh)]
    if B == 0:
        return (dM, dx, dS, *_rows_sum(rows, M))
    DP, DXP, MP, HSP = next_pow2(D), next_pow2(Dx), next_pow2(m), next_pow2(Hs)
    with device_guard(M):
        _miu_bwd_kernel[(B,)](*[_ptr(t) for t in (d_S_out, M, x, S, wr)], K, _ptr(w_ih),
                              _ptr(w_hh), _ptr(b_ih), _ptr(b_hh),
                              *[_ptr(t) for t in (dM, dx, dS)], *[_ptr(r) for r in rows],
                              D, Dx, m, Hs,
                              DP=DP, DXP=DXP, MP=MP, HSP=HSP, ACC=_acc(M.dtype),
                              num_warps=_warps(HSP * max(DP, DXP, HSP)))
    return (dM, dx, dS, *_rows_sum(rows, M))


def _scan_config(x, r0, M0, h0, S0, has_mur, miu_k):
    B, T, Dx = x.shape
    _, m, D = M0.shape
    Hc, Hs = h0.shape[1], S0.shape[2]
    K = max(0, min(int(miu_k), m))
    pads = dict(DXP=next_pow2(Dx), DP=next_pow2(D), MP=next_pow2(m), HCP=next_pow2(Hc),
                HSP=next_pow2(Hs))
    # The MIU needs its weights; with Hs = 0 there is nothing to update either.
    flags = dict(HAS_MUR=bool(has_mur), HAS_MIU=K >= 1 and Hs >= 1, ACC=_acc(x.dtype))
    big = max(pads["HCP"] * max(pads["DXP"], pads["DP"], pads["HCP"]),
              pads["HSP"] * max(pads["DXP"], pads["DP"], pads["HSP"]), pads["MP"] * pads["DP"])
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
        _scan_fwd_kernel[(B,)](_ptr(x), lengths, *params,
                               *[_ptr(t) for t in (h0, r0, M0, g0, S0, reads, *final, *ckpts)],
                               T, NC, chunk, K, Dx, D, m, Hc, Hs, **pads, **flags,
                               num_warps=warps)
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
    rows = [x.new_zeros(B, *p.shape) for p in params]
    if B == 0:
        return (dx, *dstate0, *_rows_sum(rows, x))
    SC = max(1, min(chunk, T))          # scratch slots: a chunk never exceeds T steps
    scratch = [s.new_empty(B, SC, *s.shape[1:]) for s in (d_h, d_r, d_M, d_g, d_S)]
    with device_guard(x):
        _scan_bwd_kernel[(B,)](*[_ptr(t) for t in (d_reads, d_h, d_r, d_M, d_g, d_S, x)],
                               lengths, *[_ptr(p) for p in params],
                               *[_ptr(c) for c in (ck_h, ck_r, ck_M, ck_g, ck_S)],
                               *[_ptr(s) for s in scratch], _ptr(dx),
                               *[_ptr(s) for s in dstate0], *[_ptr(r) for r in rows],
                               T, NC, chunk, SC, K, Dx, D, m, Hc, Hs, **pads, **flags,
                               num_warps=warps)
    return (dx, *dstate0, *_rows_sum(rows, x))
