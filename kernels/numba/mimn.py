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

from ._bits import bits_to_f64

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
    """Serial helper: compiled per argument types, cached, inlinable by LLVM. NumPy's error
    model: a float division by zero gives inf/NaN as in torch, where Python's raises, and
    its test is a branch in every division that keeps LLVM from vectorising the loop."""
    return njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")(fn)


def _pjit(fn):
    """Kernel: parallel over the batch (tiles of rows in the scan)."""
    return njit(parallel=True, cache=True, nogil=True, fastmath=_FM, error_model="numpy")(fn)


# --------------------------------------------------------------------------- scalar math
# exp, sigmoid and tanh in plain arithmetic: LLVM inlines them and vectorises the loops that
# call them (numba's math.exp / math.tanh are libm calls, one element at a time: without a
# vector math library they cost as much as the mat-vecs of a step).

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01     # ln 2 split in two (fdlibm): k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10


@njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
def _exp(v):
    """exp(v): v = k ln2 + r with |r| <= ln2 / 2, Taylor series of e^r to r^13 (truncation
    < 2e-17 relative), times 2^k built in the exponent bits; within ~2 ulp of libm. v is
    clamped to [-708, 709] (so 2^k stays normal): below -708 the result is ~3e-308 instead of
    a subnormal or 0 (absolute error < 4e-308); the callers never pass v > 20. NaN stays NaN.
    No 'reassoc' here: it would license LLVM to regroup the reduction."""
    if v > 709.0:
        v = 709.0
    if v < -708.0:
        v = -708.0
    kf = math.floor(v * _LOG2E + 0.5)
    if kf != kf:
        kf = 0.0                # NaN: r carries it; keeps the int conversion defined
    r = (v - kf * _LN2_HI) - kf * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    k = np.int64(np.int32(kf))
    return p * bits_to_f64((k + 1023) << 52)


@_jit
def _sigmoid(v):
    # exp of a non-positive argument only: never overflows, and tiny results keep their
    # relative accuracy on both sides.
    z = _exp(-abs(v))
    s = 1.0 / (1.0 + z)
    return s if v >= 0.0 else z * s


@_jit
def _tanh(v):
    # (1 - z) / (1 + z), z = exp(-2|v|): absolute error ~1e-16 near 0 (relative there
    # ~1e-16 / |v|), ~1 ulp elsewhere.
    z = _exp(-2.0 * abs(v))
    t = (1.0 - z) / (1.0 + z)
    return t if v >= 0.0 else -t


@_jit
def _softplus(v):
    if v > _SOFTPLUS_THRESHOLD:
        return v
    return math.log1p(_exp(v))


@_jit
def _softplus_grad(v):
    # torch's softplus backward: 1 above the threshold (where the forward is the identity).
    if v > _SOFTPLUS_THRESHOLD:
        return 1.0
    return _sigmoid(v)


@_jit
def _vsigmoid(a, lo, hi):
    """a[lo:hi] = sigmoid(a[lo:hi]) in place, vectorised by LLVM: one array per loop (a loop
    over several arrays needs run-time alias checks, and with too many it stays scalar), and
    an unsigned index (a signed one gets numba's negative-index wraparound, a select in the
    address that hides the consecutive accesses from the vectoriser)."""
    for o in range(np.uint64(lo), np.uint64(hi)):
        a[o] = _sigmoid(a[o])


@_jit
def _vtanh(a, lo, hi):
    """a[lo:hi] = tanh(a[lo:hi]) in place (vectorised as _vsigmoid)."""
    for o in range(np.uint64(lo), np.uint64(hi)):
        a[o] = _tanh(a[o])


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
        n = _tanh(tmp[2 * H + o] + r * hn)
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
    for j in range(4 * D + 2):
        act[j] = head[j]
    _vtanh(act, 0, D)
    _vtanh(act, D + 1, 2 * D + 1)
    _vsigmoid(act, 2 * D + 2, 3 * D + 2)
    _vtanh(act, 3 * D + 2, 4 * D + 2)
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
        w[i] = _exp(w[i] - mx)
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
        pm[i] = _exp(pm[i] - mx)
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


# --------------------------------------------------------------------------- row tiles
# The scan runs the batch in tiles of _TILE rows, rows sorted by length (longest first, so
# that the rows still running at step t are a prefix of their tile), all of a tile's rows
# step by step together. The controller GRU, the heads and the MIU GRU (over the tile's
# chosen (row, channel) pairs) are then small GEMMs whose weight rows stay in L1 across the
# tile; the addressing and read/write (O(m·D) per row) stay per row. Every output element of
# a GEMM sums its terms in one fixed order that does not depend on the other rows of the
# tile, so a row's result does not depend on its tile (nor on the thread count).

_TILE = 16


@_jit
def _mm(n, A, M, bias, C):
    """C[i, :N] = bias + A[i, :K] @ M for i < n, M (K, N) (a transposed weight, or a weight
    for a gradient); bias None starts from zero (numba compiles the two forms apart). Each
    row of M is used for all n rows before the next is loaded."""
    K, N = M.shape
    for i in range(n):
        for j in range(N):
            C[i, j] = 0.0 if bias is None else bias[j]
    for k in range(K):
        for i in range(n):
            a = A[i, k]
            for j in range(N):
                C[i, j] += a * M[k, j]


@_jit
def _mm_acc_w(n, G, X, dW, db):
    """dW (N, K) += G[:n]^T @ X[:n, :K], db (N) += the column sums of G[:n] (rows in
    order)."""
    N, K = dW.shape
    for o in range(N):
        s = db[o]
        for i in range(n):
            a = G[i, o]
            s += a
            for k in range(K):
                dW[o, k] += a * X[i, k]
        db[o] = s


@_jit
def _tgru_fwd(n, X, Hm, wiT, whT, bi, bh, gi, gh, Hout, tape):
    """torch.nn.GRUCell on rows i < n: inputs X (·, K), hidden Hm (·, H) -> Hout (·, H) (may
    be Hm); tape (4, ·, H) receives r, z, n and W_hn h + b_hn, all the backward needs besides
    X and Hm. wiT (K, 3H), whT (H, 3H) are the transposed weights; gi, gh scratch (·, 3H)."""
    H = whT.shape[0]
    _mm(n, X, wiT, bi, gi)
    _mm(n, Hm, whT, bh, gh)
    for i in range(n):
        a = gi[i]
        c = gh[i]
        for o in range(2 * H):
            a[o] += c[o]
        _vsigmoid(a, 0, 2 * H)
        for o in range(H):
            a[2 * H + o] += a[o] * c[2 * H + o]
        _vtanh(a, 2 * H, 3 * H)
        for o in range(H):
            z = a[H + o]
            tape[0, i, o] = a[o]
            tape[1, i, o] = z
            tape[2, i, o] = a[2 * H + o]
            tape[3, i, o] = c[2 * H + o]
            Hout[i, o] = (1.0 - z) * a[2 * H + o] + z * Hm[i, o]


@_jit
def _tgru_bwd(n, dHout, X, Hm, tape, wi, wh, dX, dH, dwi, dwh, dbi, dbh, gi, gh):
    """Backward of _tgru_fwd given dHout (·, H): dX (·, K) and dH (·, H) are overwritten for
    rows < n, the parameter gradients dwi (3H, K), dwh (3H, H), dbi, dbh accumulated.
    wi (3H, K), wh (3H, H) are the weights as stored; gi, gh scratch (·, 3H)."""
    H = wh.shape[1]
    for i in range(n):
        for o in range(H):
            r = tape[0, i, o]
            z = tape[1, i, o]
            nn = tape[2, i, o]
            hn = tape[3, i, o]
            g = dHout[i, o]
            dan = g * (1.0 - z) * (1.0 - nn * nn)      # through n = tanh(a_n)
            dar = dan * hn * r * (1.0 - r)             # a_n = i_n + r * hn
            daz = g * (Hm[i, o] - nn) * z * (1.0 - z)
            # Pre-activation gradients of the input and the hidden projections: they
            # differ only in the n gate, scaled by r.
            gi[i, o] = dar
            gi[i, H + o] = daz
            gi[i, 2 * H + o] = dan
            gh[i, o] = dar
            gh[i, H + o] = daz
            gh[i, 2 * H + o] = dan * r
    _mm(n, gi, wi, None, dX)
    for i in range(n):
        for o in range(H):
            dH[i, o] = dHout[i, o] * tape[1, i, o]
    for o in range(3 * H):
        for i in range(n):
            a = gh[i, o]
            for k in range(H):
                dH[i, k] += a * wh[o, k]
    _mm_acc_w(n, gi, X, dwi, dbi)
    _mm_acc_w(n, gh, Hm, dwh, dbh)


@_jit
def _tile_step_fwd(na, rows, t, x, h, r, M, g, S, cwiT, cwhT, cbi, cbh, hwT, hb, mw, mb,
                   uwiT, uwhT, ubi, ubh, has_mur, kk, X, gi, gh, ctape, head, sel, nsel,
                   mX, mH, mtape, wk):
    """Steps 1-7 of step t for the tile's first na rows (rows[i]: their batch rows), in
    place on the tile state h (·, Hc), r (·, D), M (·, m, D), g (·, m), S (·, m, Hs); r
    becomes the step's read. Leaves for the backward: the controller tape ctape (4, ·, Hc),
    the raw heads head (·, P), the MIU channels sel (·, kk), nsel (·) and the MIU tape
    mtape (4, ·, Hs) of the chosen (row, channel) pairs, in row then channel order."""
    Dx = x.shape[2]
    D = r.shape[1]
    # 1. Controller GRU on [x_t, r_{t-1}].
    for i in range(na):
        b = rows[i]
        for j in range(Dx):
            X[i, j] = x[b, t, j]
        for d in range(D):
            X[i, Dx + d] = r[i, d]
    _tgru_fwd(na, X, h, cwiT, cwhT, cbi, cbh, gi, gh, h, ctape)
    # 2. Heads Linear.
    _mm(na, h, hwT, hb, head)
    # 3-6. Address, read, MUR, write (in place: the write reads M(i) only at the element it
    # writes, after the read); 7a. the MIU channels of each row.
    for i in range(na):
        _ntm_fwd(M[i], g[i], head[i], mw, mb, has_mur, r[i], M[i], g[i], wk)
        nsel[i] = _select(wk[_WR], M.shape[1], kk, sel[i]) if kk > 0 else 0
    # 7b. MIU GRU on [M'(i), x_t] for every chosen pair; the other channels keep their state.
    if kk > 0:
        p = 0
        for i in range(na):
            b = rows[i]
            for s_ in range(nsel[i]):
                c = sel[i, s_]
                for d in range(D):
                    mX[p, d] = M[i, c, d]
                for j in range(Dx):
                    mX[p, D + j] = x[b, t, j]
                for j in range(S.shape[2]):
                    mH[p, j] = S[i, c, j]
                p += 1
        _tgru_fwd(p, mX, mH, uwiT, uwhT, ubi, ubh, gi, gh, mH, mtape)
        p = 0
        for i in range(na):
            for s_ in range(nsel[i]):
                c = sel[i, s_]
                for j in range(S.shape[2]):
                    S[i, c, j] = mH[p, j]
                p += 1


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
def _tile_scratch(n, Dx, D, m, Hc, Hs, P, kk):
    """Per-step scratch of a tile of n rows: X, gi, gh, wk, mX, mH, mtape (one step)."""
    NP = max(n, n * kk)
    X = np.empty((n, Dx + D))
    gi = np.empty((NP, 3 * max(Hc, Hs)))
    gh = np.empty((NP, 3 * max(Hc, Hs)))
    wk = np.empty((_WK_ROWS, max(P, m)))
    mX = np.empty((max(n * kk, 1), D + Dx))
    mH = np.empty((max(n * kk, 1), Hs))
    return X, gi, gh, wk, mX, mH


@_jit
def _tile_state(rows, h, r, M, g, S):
    """The tile's rows of a state (or state gradient) h, r, M, g, S, copied to float64
    arrays that the tile steps in place."""
    n = rows.shape[0]
    th = np.empty((n, h.shape[1]))
    tr = np.empty((n, r.shape[1]))
    tM = np.empty((n, M.shape[1], M.shape[2]))
    tg = np.empty((n, g.shape[1]))
    tS = np.empty((n, S.shape[1], S.shape[2]))
    for i in range(n):
        b = rows[i]
        th[i] = h[b]
        tr[i] = r[b]
        tM[i] = M[b]
        tg[i] = g[b]
        tS[i] = S[b]
    return th, tr, tM, tg, tS


@_jit
def _n_active(Ls, na, t):
    """The rows still running at step t: a prefix of the tile (lengths sorted descending)."""
    while na > 0 and Ls[na - 1] <= t:
        na -= 1
    return na


@_jit
def _scan_fwd_tile(rows, Ls, x, cwiT, cwhT, cbi, cbh, hwT, hb, mw, mb, uwiT, uwhT, ubi, ubh,
                   has_mur, kk, h0, r0, M0, g0, S0, chunk, reads, hT, rT, MT, gT, ST,
                   ck_h, ck_r, ck_M, ck_g, ck_S):
    n = rows.shape[0]
    T = x.shape[1]
    Dx = x.shape[2]
    Hc = h0.shape[1]
    D = r0.shape[1]
    m = M0.shape[1]
    Hs = S0.shape[2]
    P = hwT.shape[1]
    NC = ck_h.shape[1]
    h, r, M, g, S = _tile_state(rows, h0, r0, M0, g0, S0)
    X, gi, gh, wk, mX, mH = _tile_scratch(n, Dx, D, m, Hc, Hs, P, kk)
    ctape = np.empty((4, n, Hc))
    head = np.empty((n, P))
    sel = np.empty((n, kk), dtype=np.int64)
    nsel = np.empty(n, dtype=np.int64)
    mtape = np.empty((4, max(n * kk, 1), Hs))
    Lmax = Ls[0] if n > 0 else 0
    na = n
    for t in range(Lmax):
        if t % chunk == 0:
            c = t // chunk
            for i in range(n):
                b = rows[i]
                ck_h[b, c] = h[i]
                ck_r[b, c] = r[i]
                ck_M[b, c] = M[i]
                ck_g[b, c] = g[i]
                ck_S[b, c] = S[i]
        na = _n_active(Ls, na, t)
        _tile_step_fwd(na, rows, t, x, h, r, M, g, S, cwiT, cwhT, cbi, cbh, hwT, hb, mw, mb,
                       uwiT, uwhT, ubi, ubh, has_mur, kk, X, gi, gh, ctape, head, sel, nsel,
                       mX, mH, mtape, wk)
        for i in range(na):
            reads[rows[i], t] = r[i]
    # Padding: the state stays (so do the checkpoints of chunks that start in it), reads 0.
    for c in range((Lmax + chunk - 1) // chunk, NC):
        for i in range(n):
            b = rows[i]
            ck_h[b, c] = h[i]
            ck_r[b, c] = r[i]
            ck_M[b, c] = M[i]
            ck_g[b, c] = g[i]
            ck_S[b, c] = S[i]
    for i in range(n):
        b = rows[i]
        for t in range(Ls[i], T):
            reads[b, t] = 0.0
        hT[b] = h[i]
        rT[b] = r[i]
        MT[b] = M[i]
        gT[b] = g[i]
        ST[b] = S[i]


@_pjit
def _mimn_scan_fwd(x, order, Ls, cwiT, cwhT, cbi, cbh, hwT, hb, mw, mb, uwiT, uwhT, ubi, ubh,
                   has_mur, kk, h0, r0, M0, g0, S0, chunk, reads, h, r, M, g, S,
                   ck_h, ck_r, ck_M, ck_g, ck_S):
    """The scan forward over tiles of _TILE rows of ``order`` (rows sorted by length, Ls
    their lengths)."""
    B = order.shape[0]
    NT = (B + _TILE - 1) // _TILE
    for tile in prange(NT):
        a = tile * _TILE
        e = min(a + _TILE, B)
        _scan_fwd_tile(order[a:e], Ls[a:e], x, cwiT, cwhT, cbi, cbh, hwT, hb, mw, mb, uwiT,
                       uwhT, ubi, ubh, has_mur, kk, h0, r0, M0, g0, S0, chunk, reads, h, r,
                       M, g, S, ck_h, ck_r, ck_M, ck_g, ck_S)


@_jit
def _scan_bwd_tile(rows, Ls, d_reads, d_h, d_r, d_M, d_g, d_S, x, cwiT, cwhT, cbi, cbh, hwT,
                   hb, mw, mb, uwiT, uwhT, ubi, ubh, cwi, cwh, hw, uwi, uwh, has_mur, kk,
                   chunk, ck_h, ck_r, ck_M, ck_g, ck_S, dx, dh0, dr0, dM0, dg0, dS0,
                   dcwi, dcwh, dcbi, dcbh, dhw, dhb, dmw, dmb, duwi, duwh, dubi, dubh):
    """Backward of the tile's scan; the tile's parameter gradients are accumulated into
    dcwi ... dubh (zeroed by the caller)."""
    n = rows.shape[0]
    T = x.shape[1]
    Dx = x.shape[2]
    Hc = ck_h.shape[2]
    D = ck_r.shape[2]
    m = ck_M.shape[2]
    Hs = ck_S.shape[3]
    P = hwT.shape[1]
    # Gradients w.r.t. the state, stepped back in place (rows past their length keep
    # theirs: padded steps pass gradients through).
    Gh, Gr, GM, Gg, GS = _tile_state(rows, d_h, d_r, d_M, d_g, d_S)
    for i in range(n):
        for t in range(Ls[i], T):
            dx[rows[i], t] = 0.0
    Lmax = Ls[0] if n > 0 else 0
    if Lmax > 0:
        X, gi, gh, wk, mX, mH = _tile_scratch(n, Dx, D, m, Hc, Hs, P, kk)
        # Chunk scratch: the states before each step of the chunk (index j) and after its
        # last one, and the tapes of its steps.
        CL = min(chunk, Lmax)
        NPK = max(n * kk, 1)
        sh = np.empty((CL + 1, n, Hc))
        sr = np.empty((CL + 1, n, D))
        sM = np.empty((CL + 1, n, m, D))
        sg = np.empty((CL + 1, n, m))
        sS = np.empty((CL + 1, n, m, Hs))
        head = np.empty((CL, n, P))
        ctape = np.empty((CL, 4, n, Hc))
        sel = np.empty((CL, n, kk), dtype=np.int64)
        nsel = np.empty((CL, n), dtype=np.int64)
        mtape = np.empty((CL, 4, NPK, Hs))
        GMt = np.empty((m, D))
        ggt = np.empty(m)
        dhd = np.empty((n, P))
        dhc = np.empty((n, Hc))
        dXc = np.empty((n, Dx + D))
        dxs = np.empty((n, Dx))
        mdH = np.empty((NPK, Hs))
        mdX = np.empty((NPK, D + Dx))
        mG = np.empty((NPK, Hs))
        zwr = np.zeros(m)
        for c in range((Lmax + chunk - 1) // chunk - 1, -1, -1):
            t0 = c * chunk
            nst = min(t0 + chunk, Lmax) - t0
            for i in range(n):
                b = rows[i]
                sh[0, i] = ck_h[b, c]
                sr[0, i] = ck_r[b, c]
                sM[0, i] = ck_M[b, c]
                sg[0, i] = ck_g[b, c]
                sS[0, i] = ck_S[b, c]
            na = n
            for j in range(nst):
                na = _n_active(Ls, na, t0 + j)
                for i in range(na):
                    sh[j + 1, i] = sh[j, i]
                    sr[j + 1, i] = sr[j, i]
                    sM[j + 1, i] = sM[j, i]
                    sg[j + 1, i] = sg[j, i]
                    sS[j + 1, i] = sS[j, i]
                _tile_step_fwd(na, rows, t0 + j, x, sh[j + 1], sr[j + 1], sM[j + 1],
                               sg[j + 1], sS[j + 1], cwiT, cwhT, cbi, cbh, hwT, hb, mw, mb,
                               uwiT, uwhT, ubi, ubh, has_mur, kk, X, gi, gh, ctape[j],
                               head[j], sel[j], nsel[j], mX, mH, mtape[j], wk)
            for j in range(nst - 1, -1, -1):
                t = t0 + j
                na = _n_active(Ls, n, t)
                for i in range(na):
                    b = rows[i]
                    for d in range(D):
                        Gr[i, d] += d_reads[b, t, d]
                    for k in range(Dx):
                        dxs[i, k] = 0.0
                # 7. MIU: the chosen channels' GRU (the others pass their gradient through);
                # its input's M'(i) part adds to the gradient of the written memory.
                p = 0
                if kk > 0:
                    for i in range(na):
                        b = rows[i]
                        for s_ in range(nsel[j, i]):
                            ch = sel[j, i, s_]
                            for d in range(D):
                                mX[p, d] = sM[j + 1, i, ch, d]
                            for k in range(Dx):
                                mX[p, D + k] = x[b, t, k]
                            for k in range(Hs):
                                mH[p, k] = sS[j, i, ch, k]
                                mG[p, k] = GS[i, ch, k]
                            p += 1
                    _tgru_bwd(p, mG, mX, mH, mtape[j], uwi, uwh, mdX, mdH, duwi, duwh, dubi,
                              dubh, gi, gh)
                p = 0
                for i in range(na):
                    for d in range(m):
                        for k in range(D):
                            GMt[d, k] = GM[i, d, k]
                    for s_ in range(nsel[j, i]):
                        ch = sel[j, i, s_]
                        for k in range(Hs):
                            GS[i, ch, k] = mdH[p, k]
                        for d in range(D):
                            GMt[ch, d] += mdX[p, d]
                        for k in range(Dx):
                            dxs[i, k] += mdX[p, D + k]
                        p += 1
                    # 3-6. NTM (the discrete channel choice passes no gradient to wr: zwr).
                    for d in range(m):
                        ggt[d] = Gg[i, d]
                    _ntm_bwd(Gr[i], GMt, ggt, zwr, sM[j, i], sg[j, i], head[j, i], mw, mb,
                             has_mur, GM[i], Gg[i], dhd[i], dmw, dmb, wk)
                # 2. Heads Linear: dh' = Gh + dhead W_heads.
                _mm(na, dhd, hw, None, dhc)
                for i in range(na):
                    for k in range(Hc):
                        dhc[i, k] += Gh[i, k]
                _mm_acc_w(na, dhd, sh[j + 1], dhw, dhb)
                # 1. Controller GRU on [x_t, r_{t-1}].
                for i in range(na):
                    b = rows[i]
                    for k in range(Dx):
                        X[i, k] = x[b, t, k]
                    for d in range(D):
                        X[i, Dx + d] = sr[j, i, d]
                _tgru_bwd(na, dhc, X, sh[j], ctape[j], cwi, cwh, dXc, Gh, dcwi, dcwh, dcbi,
                          dcbh, gi, gh)
                for i in range(na):
                    b = rows[i]
                    for k in range(Dx):
                        dx[b, t, k] = dxs[i, k] + dXc[i, k]
                    for d in range(D):
                        Gr[i, d] = dXc[i, Dx + d]
    for i in range(n):
        b = rows[i]
        dh0[b] = Gh[i]
        dr0[b] = Gr[i]
        dM0[b] = GM[i]
        dg0[b] = Gg[i]
        dS0[b] = GS[i]


@_pjit
def _mimn_scan_bwd(d_reads, d_h, d_r, d_M, d_g, d_S, x, order, Ls, cwiT, cwhT, cbi, cbh, hwT,
                   hb, mw, mb, uwiT, uwhT, ubi, ubh, cwi, cwh, hw, uwi, uwh, has_mur, kk,
                   chunk, ck_h, ck_r, ck_M, ck_g, ck_S, dx, dh0, dr0, dM0, dg0, dS0,
                   d_cwi, d_cwh, d_cbi, d_cbh, d_hw, d_hb, d_mw, d_mb, d_uwi, d_uwh, d_ubi,
                   d_ubh):
    """The scan backward over the tiles of _mimn_scan_fwd; each tile's parameter gradients
    go to the per-row buffers d_* (B, *shape) of its first row, the other rows' get 0."""
    B = order.shape[0]
    NT = (B + _TILE - 1) // _TILE
    for tile in prange(NT):
        a = tile * _TILE
        e = min(a + _TILE, B)
        rows = order[a:e]
        for i in range(e - a):
            b = rows[i]
            d_cwi[b] = 0.0
            d_cwh[b] = 0.0
            d_cbi[b] = 0.0
            d_cbh[b] = 0.0
            d_hw[b] = 0.0
            d_hb[b] = 0.0
            if has_mur:
                d_mw[b] = 0.0
                d_mb[b] = 0.0
            if kk > 0:
                d_uwi[b] = 0.0
                d_uwh[b] = 0.0
                d_ubi[b] = 0.0
                d_ubh[b] = 0.0
        b = rows[0]
        _scan_bwd_tile(rows, Ls[a:e], d_reads, d_h, d_r, d_M, d_g, d_S, x, cwiT, cwhT, cbi,
                       cbh, hwT, hb, mw, mb, uwiT, uwhT, ubi, ubh, cwi, cwh, hw, uwi, uwh,
                       has_mur, kk, chunk, ck_h, ck_r, ck_M, ck_g, ck_S, dx, dh0, dr0, dM0,
                       dg0, dS0, d_cwi[b], d_cwh[b], d_cbi[b], d_cbh[b], d_hw[b], d_hb[b],
                       d_mw[b], d_mb[b], d_uwi[b], d_uwh[b], d_ubi[b], d_ubh[b])


def _scan_order(lengths, T):
    """Rows sorted by length, longest first (stable), and their lengths clipped to [0, T]."""
    L = np.clip(lengths, 0, T).astype(np.int64)
    order = np.argsort(-L, kind="stable").astype(np.int64)
    return order, np.ascontiguousarray(L[order])


def _t(w):
    return np.ascontiguousarray(w.T)


def _scan_fwd_tiles(x, lengths, cwi, cwh, cbi, cbh, hw, hb, mw, mb, uwi, uwh, ubi, ubh,
                    has_mur, miu_k, *rest):
    order, Ls = _scan_order(lengths, x.shape[1])
    kk = min(max(int(miu_k), 0), rest[2].shape[1])
    _mimn_scan_fwd(x, order, Ls, _t(cwi), _t(cwh), cbi, cbh, _t(hw), hb, mw, mb, _t(uwi),
                   _t(uwh), ubi, ubh, has_mur, kk, *rest)


def _scan_bwd_tiles(d_reads, d_h, d_r, d_M, d_g, d_S, x, lengths, cwi, cwh, cbi, cbh, hw, hb,
                    mw, mb, uwi, uwh, ubi, ubh, has_mur, miu_k, chunk, *rest):
    order, Ls = _scan_order(lengths, x.shape[1])
    kk = min(max(int(miu_k), 0), d_M.shape[1])
    _mimn_scan_bwd(d_reads, d_h, d_r, d_M, d_g, d_S, x, order, Ls, _t(cwi), _t(cwh), cbi, cbh,
                   _t(hw), hb, mw, mb, _t(uwi), _t(uwh), ubi, ubh, cwi, cwh, hw, uwi, uwh,
                   has_mur, kk, max(int(chunk), 1), *rest)


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
    """(f32 or f64 arrays) MIMN steps 1-7 over all T steps. x (B, T, Dx), lengths (B,) int64
    in [0, T], the twelve parameters, has_mur, miu_k, state0 (h0, r0, M0, g0, S0), chunk ->
    reads (B, T, D) (0 at padded steps), the final state (h, r, M, g, S) and the state at
    the start of every chunk of `chunk` steps, ck_* (B, ceil(T / chunk), ...)."""
    return _as_f64(_scan_fwd_tiles, 22, args)


def mimn_scan_bwd(*args):
    """(f32 or f64 arrays) Backward of mimn_scan_fwd by chunked recomputation from its
    checkpoints: given the gradients of reads and of the final state, writes dx (B, T, Dx)
    (0 at padded steps), the state0 gradients and the twelve parameter gradients into the
    per-row buffers d_* (B, *param.shape): each tile's total in the buffer of its first
    row, 0 in the others (the MUR / MIU ones untouched when absent); their sum over rows is
    the gradient."""
    return _as_f64(_scan_bwd_tiles, 28, args)


for _name in __all__[:4]:
    # Each wrapper documents itself with its compiled kernel's docstring.
    globals()[_name].__doc__ = "(f32 or f64 arrays) " + (globals()["_" + _name].__doc__ or "")
del _name
