"""MIMN kernels (DESIGN.md §5): the NTM read/write with MUR, the MIU gather-GRU, and the
scan fusing every step over whole sequences, forward and backward, as numba CPU kernels.

Calling convention: docs/kernel_api.md, "MIMN" (C++ list, minus ``nthreads``). Inputs are
contiguous, already-checked numpy arrays, floats of one dtype (f32 or f64); outputs are
preallocated and written in full (the caller's zero fill is not relied on), except the
MUR / MIU parameter gradients when those modules are absent, which are left untouched.

Design:

* Batch rows are independent: every kernel is a ``prange`` over rows b whose body calls one
  serial row function, and each row runs its steps in order. Parameter gradients are written
  per row, (B, *param.shape), so threads never share an output element and the result does
  not depend on the thread count.
* The per-step math lives in small serial helpers (GRU cell, content addressing, NTM
  read/write, MIU selection) shared by the one-step ops and the fused scan, so that the scan
  is exactly a composition of the step ops.
* All math is done in float64, whatever the array dtype: each exported kernel is a thin
  Python wrapper that hands f64 arrays straight to its compiled kernel and converts f32
  ones (inputs copied to f64, outputs computed in f64 and rounded back). So every kernel
  has one compiled signature (compiling all six takes ~1.5 min of CPU, once per machine
  thanks to cache=True; a second dtype would double it), and the f32 results are at most
  as far from the f32 reference as the reference is from exact arithmetic, which also
  keeps long scans (T = 10^4) well conditioned. The copies are O(inputs + outputs), small
  next to the O(T) recurrent work per row.
* The scan's backward is backpropagation through time by chunked recomputation: the
  forward stores the state at the start of every chunk of ``chunk`` steps; the backward
  takes chunks last first, replays one chunk from its checkpoint into a per-row scratch
  holding every state and the few gate values the backward needs, and then runs that
  chunk's steps backwards. Padded steps (t >= lengths[b]) are all at the end of a row and
  change nothing, so both passes simply stop at lengths[b].
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = ["ntm_read_write_fwd", "ntm_read_write_bwd", "miu_gather_gru_fwd",
           "miu_gather_gru_bwd", "mimn_scan_fwd", "mimn_scan_bwd"]

# Reassociation lets LLVM vectorise the dot products of the GRU and Linear mat-vecs (a
# strict left-to-right sum cannot be split over lanes); contraction allows FMA. Not the full
# fastmath set: 'nnan'/'ninf' would license LLVM to drop the softplus threshold test and the
# -inf/overflow handling of exp.
_FM = {"reassoc", "contract"}

# cos(u, v) = u.v / max(|u||v|, _EPS), as in the reference.
_EPS = 1e-8
# torch.nn.functional.softplus: identity above this threshold.
_SOFTPLUS_THRESHOLD = 20.0

# Rows of the per-row NTM workspace ``wk`` (_WK_ROWS, max(P, m)), P = 4D + 2 head columns.
_ACT = 0    # activated head outputs, same column layout as the raw head
_NM = 1     # memory row norms |M(i)|
_WW = 2     # write content weights
_PM = 3     # MUR distribution P
_WT = 4     # final write weights (MUR-adjusted)
_WR = 5     # read content weights
_DACT = 6   # gradient w.r.t. the activated head outputs
_DWT = 7
_DWW = 8
_DWR = 9
_DP = 10
_WK_ROWS = 11


def _jit(fn):
    """Serial helper: compiled per argument types, cached, inlinable by LLVM."""
    return njit(cache=True, nogil=True, fastmath=_FM)(fn)


def _pjit(fn):
    """Kernel: parallel over batch rows."""
    return njit(parallel=True, cache=True, nogil=True, fastmath=_FM)(fn)


# --------------------------------------------------------------------------- scalar math

@_jit
def _sigmoid(v):
    # Two branches so that exp never overflows into inf/inf.
    if v >= 0.0:
        return 1.0 / (1.0 + math.exp(-v))
    z = math.exp(v)
    return z / (1.0 + z)


@_jit
def _softplus(v):
    if v > _SOFTPLUS_THRESHOLD:
        return v
    return math.log1p(math.exp(v))


@_jit
def _softplus_grad(v):
    # torch's softplus backward: 1 above the threshold (where the forward is the identity).
    if v > _SOFTPLUS_THRESHOLD:
        return 1.0
    return _sigmoid(v)


# --------------------------------------------------------------------------- GRU cell

@_jit
def _gru_fwd(inp, h, w_ih, w_hh, b_ih, b_hh, h_out, gates, tmp):
    """torch.nn.GRUCell: h_out = GRU(inp, h), gates (r, z, n).

    gates (4H) receives r, z, n and the hidden projection of the n gate (W_hn h + b_hn),
    which is all the backward needs besides inp and h. tmp: scratch of >= 6H.
    """
    H = h.shape[0]
    NI = inp.shape[0]
    H3 = 3 * H
    for o in range(H3):
        s = 0.0
        for j in range(NI):
            s += w_ih[o, j] * inp[j]
        tmp[o] = s + b_ih[o]
        s = 0.0
        for j in range(H):
            s += w_hh[o, j] * h[j]
        tmp[H3 + o] = s + b_hh[o]
    for o in range(H):
        r = _sigmoid(tmp[o] + tmp[H3 + o])
        z = _sigmoid(tmp[H + o] + tmp[H3 + H + o])
        hn = tmp[H3 + 2 * H + o]
        n = math.tanh(tmp[2 * H + o] + r * hn)
        h_out[o] = (1.0 - z) * n + z * h[o]
        gates[o] = r
        gates[H + o] = z
        gates[2 * H + o] = n
        gates[3 * H + o] = hn


@_jit
def _gru_bwd(dh_out, inp, h, gates, w_ih, w_hh, din, dh, dw_ih, dw_hh, db_ih, db_hh, tmp):
    """Backward of _gru_fwd: din (NI) and dh (H) are overwritten, the parameter gradients
    dw_ih (3H, NI), dw_hh (3H, H), db_ih, db_hh (3H) accumulated. tmp: scratch of >= 6H."""
    H = h.shape[0]
    NI = inp.shape[0]
    H3 = 3 * H
    for o in range(H):
        r = gates[o]
        z = gates[H + o]
        n = gates[2 * H + o]
        hn = gates[3 * H + o]
        g = dh_out[o]
        dh[o] = g * z
        dan = g * (1.0 - z) * (1.0 - n * n)      # through n = tanh(a_n)
        dar = dan * hn * r * (1.0 - r)           # a_n = i_n + r * hn
        daz = g * (h[o] - n) * z * (1.0 - z)
        # Pre-activation gradients of the input projection (tmp[:3H]) and of the hidden
        # projection (tmp[3H:]); they differ only in the n gate, scaled by r.
        tmp[o] = dar
        tmp[H + o] = daz
        tmp[2 * H + o] = dan
        tmp[H3 + o] = dar
        tmp[H3 + H + o] = daz
        tmp[H3 + 2 * H + o] = dan * r
    for j in range(NI):
        din[j] = 0.0
    for o in range(H3):
        gi = tmp[o]
        gh = tmp[H3 + o]
        for j in range(NI):
            din[j] += w_ih[o, j] * gi
            dw_ih[o, j] += gi * inp[j]
        for j in range(H):
            dh[j] += w_hh[o, j] * gh
            dw_hh[o, j] += gh * h[j]
        db_ih[o] += gi
        db_hh[o] += gh


# --------------------------------------------------------------------------- NTM helpers

@_jit
def _head_act(head, D, act):
    """Activations of the raw head [k_r, beta_r, k_w, beta_w, e, a] into act (same layout):
    k = tanh, beta = softplus + 1, e = sigmoid, a = tanh."""
    for d in range(D):
        act[d] = math.tanh(head[d])
        act[D + 1 + d] = math.tanh(head[D + 1 + d])
        act[2 * D + 2 + d] = _sigmoid(head[2 * D + 2 + d])
        act[3 * D + 2 + d] = math.tanh(head[3 * D + 2 + d])
    act[D] = _softplus(head[D]) + 1.0
    act[2 * D + 1] = _softplus(head[2 * D + 1]) + 1.0


@_jit
def _key_norm(act, koff, D):
    s = 0.0
    for d in range(D):
        s += act[koff + d] * act[koff + d]
    return math.sqrt(s)


@_jit
def _content_fwd(act, koff, M, nM, w):
    """w = softmax_i(beta * cos(k, M(i))) for the key act[koff:koff+D], beta act[koff+D]."""
    m, D = M.shape
    beta = act[koff + D]
    nk = _key_norm(act, koff, D)
    mx = -np.inf
    for i in range(m):
        dot = 0.0
        for d in range(D):
            dot += act[koff + d] * M[i, d]
        s = beta * dot / max(nk * nM[i], _EPS)
        w[i] = s
        mx = max(mx, s)
    tot = 0.0
    for i in range(m):
        w[i] = math.exp(w[i] - mx)
        tot += w[i]
    for i in range(m):
        w[i] /= tot


@_jit
def _content_bwd(act, koff, M, nM, w, dw, dM, dact):
    """Backward of _content_fwd given dw: accumulates into dM (m, D) and into dact at the
    key (koff..koff+D-1) and beta (koff+D) columns.

    As torch differentiates the reference: the norm's gradient at 0 is 0, and the clamp
    max(|k||M(i)|, eps) passes no gradient to the product when the product is below eps.
    """
    m, D = M.shape
    beta = act[koff + D]
    nk = _key_norm(act, koff, D)
    sw = 0.0
    for i in range(m):
        sw += dw[i] * w[i]
    dbeta = 0.0
    dnk = 0.0
    for i in range(m):
        ds = w[i] * (dw[i] - sw)                 # softmax
        dot = 0.0
        for d in range(D):
            dot += act[koff + d] * M[i, d]
        prod = nk * nM[i]
        den = max(prod, _EPS)
        c = dot / den
        dbeta += ds * c
        dc = beta * ds
        ddot = dc / den
        dprod = -dc * c / den if prod >= _EPS else 0.0
        dnk += dprod * nM[i]
        cm = dprod * nk / nM[i] if nM[i] > 0.0 else 0.0   # d|M(i)| -> dM(i)
        for d in range(D):
            dact[koff + d] += ddot * M[i, d]
            dM[i, d] += ddot * act[koff + d] + cm * M[i, d]
    if nk > 0.0:
        ck = dnk / nk
        for d in range(D):
            dact[koff + d] += ck * act[koff + d]
    dact[koff + D] += dbeta


@_jit
def _write_weights(g, mur_w, mur_b, has_mur, wk):
    """wk[_WT] = the final write weights: ww, or with MUR (ww * P) / sum(ww * P) where
    P = softmax(mur_w g + mur_b) (kept in wk[_PM])."""
    m = g.shape[0]
    ww = wk[_WW]
    wt = wk[_WT]
    if not has_mur:
        for i in range(m):
            wt[i] = ww[i]
        return
    pm = wk[_PM]
    mx = -np.inf
    for i in range(m):
        u = mur_b[i]
        for j in range(m):
            u += mur_w[i, j] * g[j]
        pm[i] = u
        mx = max(mx, u)
    tot = 0.0
    for i in range(m):
        pm[i] = math.exp(pm[i] - mx)
        tot += pm[i]
    q = 0.0
    for i in range(m):
        pm[i] /= tot
        q += ww[i] * pm[i]
    for i in range(m):
        wt[i] = ww[i] * pm[i] / q


@_jit
def _ntm_prepare(M, g, head, mur_w, mur_b, has_mur, wk):
    """Everything of steps 3 and 5 that the write and the backward need, into wk:
    activations, memory norms, read / write content weights, MUR, final write weights."""
    m, D = M.shape
    _head_act(head, D, wk[_ACT])
    nM = wk[_NM]
    for i in range(m):
        s = 0.0
        for d in range(D):
            s += M[i, d] * M[i, d]
        nM[i] = math.sqrt(s)
    _content_fwd(wk[_ACT], 0, M, nM, wk[_WR])
    _content_fwd(wk[_ACT], D + 1, M, nM, wk[_WW])
    _write_weights(g, mur_w, mur_b, has_mur, wk)


@_jit
def _ntm_fwd(M, g, head, mur_w, mur_b, has_mur, read, M_out, g_out, wk):
    """Steps 3-6: read (D), M_out (m, D), g_out (m); the read weights are left in wk[_WR].
    M_out must not alias M."""
    m, D = M.shape
    _ntm_prepare(M, g, head, mur_w, mur_b, has_mur, wk)
    act = wk[_ACT]
    wr = wk[_WR]
    wt = wk[_WT]
    eo = 2 * D + 2
    ao = 3 * D + 2
    for d in range(D):
        s = 0.0
        for i in range(m):
            s += wr[i] * M[i, d]
        read[d] = s
    for i in range(m):
        g_out[i] = g[i] + wt[i]
        for d in range(D):
            M_out[i, d] = M[i, d] * (1.0 - wt[i] * act[eo + d]) + wt[i] * act[ao + d]


@_jit
def _ntm_bwd(d_read, d_M_out, d_g_out, d_wr, M, g, head, mur_w, mur_b, has_mur,
             dM, dg, dhead, dmur_w, dmur_b, wk):
    """Backward of _ntm_fwd (recomputing its intermediates from M, g, head). dM (m, D),
    dg (m) and dhead (P) are overwritten; dmur_w (m, m), dmur_b (m) accumulated (MUR only)."""
    m, D = M.shape
    P = head.shape[0]
    _ntm_prepare(M, g, head, mur_w, mur_b, has_mur, wk)
    act = wk[_ACT]
    wr = wk[_WR]
    ww = wk[_WW]
    wt = wk[_WT]
    dact = wk[_DACT]
    dwt = wk[_DWT]
    dww = wk[_DWW]
    dwr = wk[_DWR]
    eo = 2 * D + 2
    ao = 3 * D + 2
    for j in range(P):
        dact[j] = 0.0
    # Write M' = M (1 - wt e^T) + wt a^T, usage g' = g + wt, and the read r = wr^T M.
    for i in range(m):
        s = d_g_out[i]
        sr = d_wr[i]
        for d in range(D):
            gm = d_M_out[i, d]
            e = act[eo + d]
            dM[i, d] = gm * (1.0 - wt[i] * e) + wr[i] * d_read[d]
            s += gm * (act[ao + d] - M[i, d] * e)
            dact[eo + d] -= gm * M[i, d] * wt[i]
            dact[ao + d] += gm * wt[i]
            sr += d_read[d] * M[i, d]
        dwt[i] = s
        dwr[i] = sr
        dg[i] = d_g_out[i]
    # MUR: wt = q / sum(q), q = ww * P, P = softmax(u), u = mur_w g + mur_b.
    if has_mur:
        pm = wk[_PM]
        dp = wk[_DP]
        q = 0.0
        swt = 0.0
        for i in range(m):
            q += ww[i] * pm[i]
            swt += dwt[i] * wt[i]
        sp = 0.0
        for i in range(m):
            dq = (dwt[i] - swt) / q
            dww[i] = dq * pm[i]
            dp[i] = dq * ww[i]
            sp += dp[i] * pm[i]
        for i in range(m):
            du = pm[i] * (dp[i] - sp)
            dmur_b[i] += du
            for j in range(m):
                dmur_w[i, j] += du * g[j]
                dg[j] += mur_w[i, j] * du
    else:
        for i in range(m):
            dww[i] = dwt[i]
    _content_bwd(act, 0, M, wk[_NM], wr, dwr, dM, dact)
    _content_bwd(act, D + 1, M, wk[_NM], ww, dww, dM, dact)
    # Through the activations to the raw head.
    for d in range(D):
        k = act[d]
        dhead[d] = dact[d] * (1.0 - k * k)
        k = act[D + 1 + d]
        dhead[D + 1 + d] = dact[D + 1 + d] * (1.0 - k * k)
        e = act[eo + d]
        dhead[eo + d] = dact[eo + d] * e * (1.0 - e)
        a = act[ao + d]
        dhead[ao + d] = dact[ao + d] * (1.0 - a * a)
    dhead[D] = dact[D] * _softplus_grad(head[D])
    dhead[2 * D + 1] = dact[2 * D + 1] * _softplus_grad(head[2 * D + 1])


# --------------------------------------------------------------------------- MIU helpers

@_jit
def _before(a, ia, b, ib):
    """Channel ia ranks before ib in a stable descending sort, NaN above every number (the
    order of torch.sort(descending=True, stable=True))."""
    na, nb = a != a, b != b
    if na or nb:
        return na and (not nb or ia < ib)
    return a > b or (a == b and ia < ib)


@_jit
def _select(wr, m, k, sel):
    """The channels of the k largest read weights wr[:m] (ties to the smaller index, NaN
    largest), in increasing channel order, into sel; returns how many (min(k, m), at most
    len(sel))."""
    n = 0
    for i in range(m):
        rank = 0   # channels ranked before i by a stable descending sort
        for j in range(m):
            if _before(wr[j], j, wr[i], i):
                rank += 1
        if rank < k and n < sel.shape[0]:
            sel[n] = i
            n += 1
    return n


@_jit
def _miu_input(Mi, x, inp):
    """inp = [M(i), x], the MIU GRU input."""
    D = Mi.shape[0]
    for d in range(D):
        inp[d] = Mi[d]
    for j in range(x.shape[0]):
        inp[D + j] = x[j]


# --------------------------------------------------------------------------- scan step

@_jit
def _step_fwd(x_t, h, r, M, g, S, cwi, cwh, cbi, cbh, hw, hb, mw, mb, uwi, uwh, ubi, ubh,
              has_mur, miu_k, h_o, r_o, M_o, g_o, S_o, head, cg, sel, mg, wk, inp, tmp):
    """Steps 1-7 from the state (h, r, M, g, S) into (h_o, r_o, M_o, g_o, S_o); r_o is the
    step's read. Saves for the backward: the raw head (P), the controller gates cg (4Hc),
    the MIU channels sel and their gates mg (len(sel), 4Hs). Returns the channel count."""
    Dx = x_t.shape[0]
    D = r.shape[0]
    m = M.shape[0]
    # 1. Controller GRU on [x_t, r_{t-1}].
    for j in range(Dx):
        inp[j] = x_t[j]
    for d in range(D):
        inp[Dx + d] = r[d]
    _gru_fwd(inp, h, cwi, cwh, cbi, cbh, h_o, cg, tmp)
    # 2. Heads Linear.
    for p in range(hw.shape[0]):
        s = hb[p]
        for c in range(hw.shape[1]):
            s += hw[p, c] * h_o[c]
        head[p] = s
    # 3-6. Address, read, MUR, write.
    _ntm_fwd(M, g, head, mw, mb, has_mur, r_o, M_o, g_o, wk)
    # 7. MIU on the top-k read channels; the others keep their state.
    for i in range(m):
        for j in range(S.shape[1]):
            S_o[i, j] = S[i, j]
    nsel = 0
    if miu_k > 0:
        nsel = _select(wk[_WR], m, miu_k, sel)
        for s_ in range(nsel):
            i = sel[s_]
            _miu_input(M_o[i], x_t, inp)
            _gru_fwd(inp, S[i], uwi, uwh, ubi, ubh, S_o[i], mg[s_], tmp)
    return nsel


@_jit
def _step_bwd(x_t, h, r, M, g, S, h_o, M_o, head, cg, sel, nsel, mg,
              cwi, cwh, cbi, cbh, hw, hb, mw, mb, uwi, uwh, ubi, ubh, has_mur,
              Gh, Gr, GM, Gg, GS, Ph, Pr, PM, Pg, PS, dxs,
              dcwi, dcwh, dcbi, dcbh, dhw, dhb, dmw, dmb, duwi, duwh, dubi, dubh,
              GMt, dhd, dhc, zwr, wk, inp, din, tmp):
    """Backward of _step_fwd: (Gh, Gr, GM, Gg, GS), the gradients w.r.t. the step's output
    state (Gr including the read's own gradient), to (Ph, Pr, PM, Pg, PS) w.r.t. its input
    state; dxs (Dx) receives the gradient of x_t, the parameter gradients are accumulated."""
    Dx = x_t.shape[0]
    D = r.shape[0]
    m = M.shape[0]
    Hs = S.shape[1]
    # 7. MIU: unselected channels pass their gradient through; the GRU input's M(i) part
    # adds to the gradient of the written memory.
    for i in range(m):
        for d in range(D):
            GMt[i, d] = GM[i, d]
        for j in range(Hs):
            PS[i, j] = GS[i, j]
    for j in range(Dx):
        dxs[j] = 0.0
    for s_ in range(nsel):
        i = sel[s_]
        _miu_input(M_o[i], x_t, inp)
        _gru_bwd(GS[i], inp, S[i], mg[s_], uwi, uwh, din, PS[i], duwi, duwh, dubi, dubh, tmp)
        for d in range(D):
            GMt[i, d] += din[d]
        for j in range(Dx):
            dxs[j] += din[D + j]
    # 3-6. NTM (the discrete channel selection passes no gradient to wr: zwr = 0).
    _ntm_bwd(Gr, GMt, Gg, zwr, M, g, head, mw, mb, has_mur, PM, Pg, dhd, dmw, dmb, wk)
    # 2. Heads Linear.
    Hc = h.shape[0]
    for c in range(Hc):
        dhc[c] = Gh[c]
    for p in range(hw.shape[0]):
        gp = dhd[p]
        dhb[p] += gp
        for c in range(Hc):
            dhc[c] += hw[p, c] * gp
            dhw[p, c] += gp * h_o[c]
    # 1. Controller GRU on [x_t, r_{t-1}].
    for j in range(Dx):
        inp[j] = x_t[j]
    for d in range(D):
        inp[Dx + d] = r[d]
    _gru_bwd(dhc, inp, h, cg, cwi, cwh, din, Ph, dcwi, dcwh, dcbi, dcbh, tmp)
    for j in range(Dx):
        dxs[j] += din[j]
    for d in range(D):
        Pr[d] = din[Dx + d]


# --------------------------------------------------------------------------- ntm_read_write
# The one-step kernels copy their row into f64 scratch first, so that every helper sees the
# same argument types as in the scan (f64 state, params in the call's dtype) and is
# compiled once per dtype for all six kernels.

@_pjit
def _ntm_read_write_fwd(M, g, head, mur_w, mur_b, has_mur, read, M_out, g_out, wr):
    """Steps 3-6 for one step. M (B, m, D), g (B, m), head (B, 4D+2) raw head outputs,
    mur_w (m, m), mur_b (m) (read only if has_mur) -> read (B, D), M_out (B, m, D),
    g_out (B, m), wr (B, m) read weights."""
    B, m, D = M.shape
    P = head.shape[1]
    for b in prange(B):
        Mb = np.empty((m, D))
        gb = np.empty(m)
        hb = np.empty(P)
        Mb[:] = M[b]
        gb[:] = g[b]
        hb[:] = head[b]
        wk = np.empty((_WK_ROWS, max(P, m)))
        rd = np.empty(D)
        Mo = np.empty((m, D))
        go = np.empty(m)
        _ntm_fwd(Mb, gb, hb, mur_w, mur_b, has_mur, rd, Mo, go, wk)
        read[b] = rd
        M_out[b] = Mo
        g_out[b] = go
        wr[b] = wk[_WR, :m]


@_pjit
def _ntm_read_write_bwd(d_read, d_M_out, d_g_out, d_wr, M, g, head, mur_w, mur_b, has_mur,
                       dM, dg, dhead, dmur_w_rows, dmur_b_rows):
    """Backward of ntm_read_write_fwd: dM (B, m, D), dg (B, m), dhead (B, P) and, with MUR,
    the per-row dmur_w_rows (B, m, m), dmur_b_rows (B, m)."""
    B, m, D = M.shape
    P = head.shape[1]
    for b in prange(B):
        grd = np.empty(D)
        gMo = np.empty((m, D))
        ggo = np.empty(m)
        gwr = np.empty(m)
        Mb = np.empty((m, D))
        gb = np.empty(m)
        hb = np.empty(P)
        grd[:] = d_read[b]
        gMo[:] = d_M_out[b]
        ggo[:] = d_g_out[b]
        gwr[:] = d_wr[b]
        Mb[:] = M[b]
        gb[:] = g[b]
        hb[:] = head[b]
        wk = np.empty((_WK_ROWS, max(P, m)))
        dMb = np.empty((m, D))
        dgb = np.empty(m)
        dhb = np.empty(P)
        dmw = dmur_w_rows[b]
        dmb = dmur_b_rows[b]
        if has_mur:
            dmw[:] = 0.0
            dmb[:] = 0.0
        _ntm_bwd(grd, gMo, ggo, gwr, Mb, gb, hb, mur_w, mur_b, has_mur, dMb, dgb, dhb,
                 dmw, dmb, wk)
        dM[b] = dMb
        dg[b] = dgb
        dhead[b] = dhb


# --------------------------------------------------------------------------- miu_gather_gru

@_pjit
def _miu_gather_gru_fwd(M, x, S, wr, miu_k, w_ih, w_hh, b_ih, b_hh, S_out):
    """Step 7 for one step: the miu_k channels with the largest wr (ties to the smaller
    index) get S_out(i) = GRU([M(i), x], S(i)), the others S_out(i) = S(i).
    M (B, m, D) after the write, x (B, Dx), S (B, m, Hs), wr (B, m)."""
    B, m, D = M.shape
    Dx = x.shape[1]
    Hs = S.shape[2]
    kk = min(max(miu_k, 0), m)
    for b in prange(B):
        S_out[b] = S[b]
        sel = np.empty(kk, dtype=np.int64)
        wrb = np.empty(m)
        Mi = np.empty(D)
        xb = np.empty(Dx)
        inp = np.empty(D + Dx)
        hs = np.empty(Hs)
        ho = np.empty(Hs)
        gates = np.empty(4 * Hs)
        tmp = np.empty(6 * Hs)
        wrb[:] = wr[b]
        xb[:] = x[b]
        n = _select(wrb, m, kk, sel) if kk > 0 else 0
        for s_ in range(n):
            i = sel[s_]
            Mi[:] = M[b, i]
            hs[:] = S[b, i]
            _miu_input(Mi, xb, inp)
            _gru_fwd(inp, hs, w_ih, w_hh, b_ih, b_hh, ho, gates, tmp)
            S_out[b, i] = ho


@_pjit
def _miu_gather_gru_bwd(d_S_out, M, x, S, wr, miu_k, w_ih, w_hh, b_ih, b_hh, dM, dx, dS,
                       dw_ih_rows, dw_hh_rows, db_ih_rows, db_hh_rows):
    """Backward of miu_gather_gru_fwd: dM (B, m, D), dx (B, Dx), dS (B, m, Hs) and the
    per-row GRU parameter gradients (B, *shape). No gradient to wr (a discrete choice)."""
    B, m, D = M.shape
    Dx = x.shape[1]
    Hs = S.shape[2]
    kk = min(max(miu_k, 0), m)
    for b in prange(B):
        dS[b] = d_S_out[b]
        dM[b] = 0.0
        dwi = dw_ih_rows[b]
        dwh = dw_hh_rows[b]
        dbi = db_ih_rows[b]
        dbh = db_hh_rows[b]
        dwi[:] = 0.0
        dwh[:] = 0.0
        dbi[:] = 0.0
        dbh[:] = 0.0
        sel = np.empty(kk, dtype=np.int64)
        wrb = np.empty(m)
        Mi = np.empty(D)
        xb = np.empty(Dx)
        inp = np.empty(D + Dx)
        din = np.empty(D + Dx)
        hs = np.empty(Hs)
        ho = np.empty(Hs)
        gh = np.empty(Hs)
        dhs = np.empty(Hs)
        gates = np.empty(4 * Hs)
        tmp = np.empty(6 * Hs)
        dxb = np.zeros(Dx)
        wrb[:] = wr[b]
        xb[:] = x[b]
        n = _select(wrb, m, kk, sel) if kk > 0 else 0
        for s_ in range(n):
            i = sel[s_]
            Mi[:] = M[b, i]
            hs[:] = S[b, i]
            gh[:] = d_S_out[b, i]
            _miu_input(Mi, xb, inp)
            # Recompute the gates of this channel, then back through the cell.
            _gru_fwd(inp, hs, w_ih, w_hh, b_ih, b_hh, ho, gates, tmp)
            _gru_bwd(gh, inp, hs, gates, w_ih, w_hh, din, dhs, dwi, dwh, dbi, dbh, tmp)
            dS[b, i] = dhs
            for d in range(D):
                dM[b, i, d] = din[d]
            for j in range(Dx):
                dxb[j] += din[D + j]
        dx[b] = dxb


# --------------------------------------------------------------------------- mimn_scan

@_jit
def _scan_fwd_row(b, x, L, cwi, cwh, cbi, cbh, hw, hb, mw, mb, uwi, uwh, ubi, ubh, has_mur,
                  miu_k, h0, r0, M0, g0, S0, chunk, reads, h, r, M, g, S,
                  ck_h, ck_r, ck_M, ck_g, ck_S):
    T = x.shape[1]
    Dx = x.shape[2]
    Hc = h0.shape[1]
    D = r0.shape[1]
    m = M0.shape[1]
    Hs = S0.shape[2]
    P = hw.shape[0]
    kk = min(max(miu_k, 0), m)
    # Two state buffers, stepped from one into the other (f64 whatever the dtype).
    sh = np.empty((2, Hc))
    sr = np.empty((2, D))
    sM = np.empty((2, m, D))
    sg = np.empty((2, m))
    sS = np.empty((2, m, Hs))
    sh[0] = h0[b]
    sr[0] = r0[b]
    sM[0] = M0[b]
    sg[0] = g0[b]
    sS[0] = S0[b]
    head = np.empty(P)
    cg = np.empty(4 * Hc)
    sel = np.empty(kk, dtype=np.int64)
    mg = np.empty((kk, 4 * Hs))
    wk = np.empty((_WK_ROWS, max(P, m)))
    inp = np.empty(Dx + D)
    tmp = np.empty(6 * max(Hc, Hs))
    cur = 0
    for t in range(T):
        if t % chunk == 0:
            c = t // chunk
            ck_h[b, c] = sh[cur]
            ck_r[b, c] = sr[cur]
            ck_M[b, c] = sM[cur]
            ck_g[b, c] = sg[cur]
            ck_S[b, c] = sS[cur]
        if t >= L:
            # Padding: the state stays, the read is 0 (later checkpoints repeat the state).
            reads[b, t] = 0.0
            continue
        nxt = 1 - cur
        _step_fwd(x[b, t], sh[cur], sr[cur], sM[cur], sg[cur], sS[cur], cwi, cwh, cbi, cbh,
                  hw, hb, mw, mb, uwi, uwh, ubi, ubh, has_mur, miu_k, sh[nxt], sr[nxt],
                  sM[nxt], sg[nxt], sS[nxt], head, cg, sel, mg, wk, inp, tmp)
        reads[b, t] = sr[nxt]
        cur = nxt
    h[b] = sh[cur]
    r[b] = sr[cur]
    M[b] = sM[cur]
    g[b] = sg[cur]
    S[b] = sS[cur]


@_pjit
def _mimn_scan_fwd(x, lengths, ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh, heads_w, heads_b,
                  mur_w, mur_b, miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh, has_mur, miu_k,
                  h0, r0, M0, g0, S0, chunk, reads, h, r, M, g, S,
                  ck_h, ck_r, ck_M, ck_g, ck_S):
    """MIMN steps 1-7 over all T steps. x (B, T, Dx), lengths (B,) int64 in [0, T], the
    twelve parameters, state0 (h0, r0, M0, g0, S0) -> reads (B, T, D) (0 at padded steps),
    the final state (h, r, M, g, S) and the state at the start of every chunk of `chunk`
    steps, ck_* (B, ceil(T / chunk), ...)."""
    B = x.shape[0]
    T = x.shape[1]
    for b in prange(B):
        L = min(max(lengths[b], 0), T)
        _scan_fwd_row(b, x, L, ctrl_w_ih, ctrl_w_hh, ctrl_b_ih, ctrl_b_hh, heads_w, heads_b,
                      mur_w, mur_b, miu_w_ih, miu_w_hh, miu_b_ih, miu_b_hh, has_mur, miu_k,
                      h0, r0, M0, g0, S0, chunk, reads, h, r, M, g, S,
                      ck_h, ck_r, ck_M, ck_g, ck_S)


@_jit
def _scan_bwd_row(b, d_reads, d_h, d_r, d_M, d_g, d_S, x, L, cwi, cwh, cbi, cbh, hw, hb,
                  mw, mb, uwi, uwh, ubi, ubh, has_mur, miu_k, chunk,
                  ck_h, ck_r, ck_M, ck_g, ck_S, dx, dh0, dr0, dM0, dg0, dS0,
                  dcwi, dcwh, dcbi, dcbh, dhw, dhb, dmw, dmb, duwi, duwh, dubi, dubh):
    Dx = x.shape[2]
    Hc = ck_h.shape[2]
    D = ck_r.shape[2]
    m = ck_M.shape[2]
    Hs = ck_S.shape[3]
    P = hw.shape[0]
    NC = ck_h.shape[1]
    kk = min(max(miu_k, 0), m)
    # Per-row parameter gradients are accumulated straight into this row's outputs.
    dcwi[:] = 0.0
    dcwh[:] = 0.0
    dcbi[:] = 0.0
    dcbh[:] = 0.0
    dhw[:] = 0.0
    dhb[:] = 0.0
    if has_mur:
        dmw[:] = 0.0
        dmb[:] = 0.0
    if kk > 0:
        duwi[:] = 0.0
        duwh[:] = 0.0
        dubi[:] = 0.0
        dubh[:] = 0.0
    dx[b] = 0.0
    # State gradients, two buffers: w.r.t. a step's output (G) and its input (P).
    gh = np.empty((2, Hc))
    gr = np.empty((2, D))
    gM = np.empty((2, m, D))
    gg = np.empty((2, m))
    gS = np.empty((2, m, Hs))
    gh[0] = d_h[b]
    gr[0] = d_r[b]
    gM[0] = d_M[b]
    gg[0] = d_g[b]
    gS[0] = d_S[b]
    cur = 0
    if L > 0:
        # Chunk scratch: states before each step of the chunk (index j) and after its
        # last one, plus what the step backward reads from the forward.
        CL = min(chunk, L)
        sh = np.empty((CL + 1, Hc))
        sr = np.empty((CL + 1, D))
        sM = np.empty((CL + 1, m, D))
        sg = np.empty((CL + 1, m))
        sS = np.empty((CL + 1, m, Hs))
        head = np.empty((CL, P))
        cg = np.empty((CL, 4 * Hc))
        sel = np.empty((CL, kk), dtype=np.int64)
        nsel = np.empty(CL, dtype=np.int64)
        mg = np.empty((CL, kk, 4 * Hs))
        wk = np.empty((_WK_ROWS, max(P, m)))
        inp = np.empty(Dx + D)
        din = np.empty(Dx + D)
        tmp = np.empty(6 * max(Hc, Hs))
        GMt = np.empty((m, D))
        dhd = np.empty(P)
        dhc = np.empty(Hc)
        zwr = np.zeros(m)
        dxs = np.empty(Dx)
        for c in range(NC - 1, -1, -1):
            t0 = c * chunk
            n = min(t0 + chunk, L) - t0
            if n <= 0:
                continue   # a chunk of padding only
            sh[0] = ck_h[b, c]
            sr[0] = ck_r[b, c]
            sM[0] = ck_M[b, c]
            sg[0] = ck_g[b, c]
            sS[0] = ck_S[b, c]
            for j in range(n):
                nsel[j] = _step_fwd(x[b, t0 + j], sh[j], sr[j], sM[j], sg[j], sS[j],
                                    cwi, cwh, cbi, cbh, hw, hb, mw, mb, uwi, uwh, ubi, ubh,
                                    has_mur, miu_k, sh[j + 1], sr[j + 1], sM[j + 1],
                                    sg[j + 1], sS[j + 1], head[j], cg[j], sel[j], mg[j],
                                    wk, inp, tmp)
            for j in range(n - 1, -1, -1):
                t = t0 + j
                nxt = 1 - cur
                G_r = gr[cur]
                for d in range(D):
                    G_r[d] += d_reads[b, t, d]
                _step_bwd(x[b, t], sh[j], sr[j], sM[j], sg[j], sS[j], sh[j + 1], sM[j + 1],
                          head[j], cg[j], sel[j], nsel[j], mg[j],
                          cwi, cwh, cbi, cbh, hw, hb, mw, mb, uwi, uwh, ubi, ubh, has_mur,
                          gh[cur], G_r, gM[cur], gg[cur], gS[cur],
                          gh[nxt], gr[nxt], gM[nxt], gg[nxt], gS[nxt], dxs,
                          dcwi, dcwh, dcbi, dcbh, dhw, dhb, dmw, dmb, duwi, duwh, dubi, dubh,
                          GMt, dhd, dhc, zwr, wk, inp, din, tmp)
                dx[b, t] = dxs
                cur = nxt
    dh0[b] = gh[cur]
    dr0[b] = gr[cur]
    dM0[b] = gM[cur]
    dg0[b] = gg[cur]
    dS0[b] = gS[cur]


@_pjit
def _mimn_scan_bwd(d_reads, d_h, d_r, d_M, d_g, d_S, x, lengths, ctrl_w_ih, ctrl_w_hh,
                  ctrl_b_ih, ctrl_b_hh, heads_w, heads_b, mur_w, mur_b, miu_w_ih, miu_w_hh,
                  miu_b_ih, miu_b_hh, has_mur, miu_k, chunk, ck_h, ck_r, ck_M, ck_g, ck_S,
                  dx, dh0, dr0, dM0, dg0, dS0,
                  d_ctrl_w_ih, d_ctrl_w_hh, d_ctrl_b_ih, d_ctrl_b_hh, d_heads_w, d_heads_b,
                  d_mur_w, d_mur_b, d_miu_w_ih, d_miu_w_hh, d_miu_b_ih, d_miu_b_hh):
    """Backward of mimn_scan_fwd by chunked recomputation from its checkpoints: given the
    gradients of reads and of the final state, writes dx (B, T, Dx) (0 at padded steps),
    the state0 gradients and the twelve per-row parameter gradients d_* (B, *param.shape)
    (the MUR / MIU ones untouched when absent)."""
    B = x.shape[0]
    T = x.shape[1]
    for b in prange(B):
        L = min(max(lengths[b], 0), T)
        _scan_bwd_row(b, d_reads, d_h, d_r, d_M, d_g, d_S, x, L, ctrl_w_ih, ctrl_w_hh,
                      ctrl_b_ih, ctrl_b_hh, heads_w, heads_b, mur_w, mur_b, miu_w_ih,
                      miu_w_hh, miu_b_ih, miu_b_hh, has_mur, miu_k, chunk,
                      ck_h, ck_r, ck_M, ck_g, ck_S, dx, dh0, dr0, dM0, dg0, dS0,
                      d_ctrl_w_ih[b], d_ctrl_w_hh[b], d_ctrl_b_ih[b], d_ctrl_b_hh[b],
                      d_heads_w[b], d_heads_b[b], d_mur_w[b], d_mur_b[b], d_miu_w_ih[b],
                      d_miu_w_hh[b], d_miu_b_ih[b], d_miu_b_hh[b])


# --------------------------------------------------------------------------- exported kernels

def _as_f64(kernel, first_out, args):
    """Call ``kernel`` with every f32 array of ``args`` as an f64 copy; the arrays from
    position ``first_out`` on are outputs and get the f64 results rounded back (copies start
    from the output's contents, so outputs the kernel leaves untouched stay untouched)."""
    if not any(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in args):
        kernel(*args)
        return
    # errstate: preallocated outputs may hold uninitialised (NaN) bits when cast.
    with np.errstate(invalid="ignore"):
        conv = [a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype == np.float32
                else a for a in args]
    kernel(*conv)
    for a, c in zip(args[first_out:], conv[first_out:]):
        if c is not a:
            a[...] = c


def ntm_read_write_fwd(*args):
    return _as_f64(_ntm_read_write_fwd, 6, args)


def ntm_read_write_bwd(*args):
    return _as_f64(_ntm_read_write_bwd, 10, args)


def miu_gather_gru_fwd(*args):
    return _as_f64(_miu_gather_gru_fwd, 9, args)


def miu_gather_gru_bwd(*args):
    return _as_f64(_miu_gather_gru_bwd, 10, args)


def mimn_scan_fwd(*args):
    return _as_f64(_mimn_scan_fwd, 22, args)


def mimn_scan_bwd(*args):
    return _as_f64(_mimn_scan_bwd, 28, args)


for _name in __all__:
    # Each wrapper documents itself with its compiled kernel's docstring.
    globals()[_name].__doc__ = "(f32 or f64 arrays) " + (globals()["_" + _name].__doc__ or "")
del _name
