"""Target attention: ETA (Hamming top-k retrieval + exact attention over the k retrieved
behaviours) and the dense baseline it approximates.

``eta_attention`` composes two custom ops, ``fastattn::hamming_topk`` and
``fastattn::topk_attention``; the second reads the selected rows of keys/values in place
through (hist_index, idx), so the forward holds no (B, L) float tensor and no (B, k, D)
copy. Its backward produces one gradient per selected row and scatter-adds them into the
history (deterministic on CPU).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference as ref
from ._common import (FLOAT_DTYPES, backend_for, check_hist_index, check_hist_rows,
                      check_lengths, check_same_device, check_tensor, cpu_call, eager_plain,
                      kernels, layout)
from .hamming import check_topk_inputs, topk_op
from .gather import scatter_add_rows, slot_layout

__all__ = ["topk_attention", "eta_attention", "target_attention"]


# Per-slot gradients of one backward call are bounded to this many elements per tensor: a
# backward over many slots (dense attention over an indexed history has K = L) runs in slot
# chunks. Exact: the softmax of a chunk needs only the global lse and g·out.
_SLOT_CHUNK_ELEMS = 1 << 24


# ``values`` None in the custom ops means "the keys are the values" (one tensor passed as
# both, e.g. raw behaviour embeddings): the backward then writes one gradient buffer with
# both contributions instead of two (N, ·) buffers and their sum.

def _topk_attention_impl(q: Tensor, keys: Tensor, values: Optional[Tensor], idx: Tensor,
                         hist_index: Optional[Tensor], hist_rows: Optional[Tensor],
                         scale: float, backend: str,
                         checked: bool = False) -> Tuple[Tensor, Tensor]:
    """The forward of ``fastattn::topk_attention`` (the op runs it with ``checked`` False).
    ``checked``: idx and hist_index come from a retrieval that checked them (eta_attention's
    direct path), so their ranges are not checked again."""
    B, H, Dh = q.shape
    values = keys if values is None else values
    Dv = values.shape[-1]
    ix, hist, U, L = slot_layout(idx, hist_index, hist_rows, keys.shape[:-2], q.device,
                                 checked=checked)
    keys, values = keys.reshape(U, L, H, Dh), values.reshape(U, L, H, Dv)
    if backend == "torch":
        return ref.topk_attention(q, keys, values, ix, hist, scale)  # lse: accumulation dtype
    ix = ix.contiguous()
    if backend == "triton":
        return kernels("triton").topk_attention_fwd(q.contiguous(), keys.contiguous(),
                                                     values.contiguous(), ix, hist, scale)
    # CPU kernels compute in fp32/fp64: half inputs are widened (one copy of the history).
    acc = ref.accumulation_dtype(q.dtype)
    qc, kc, vc = (t.to(acc).contiguous() for t in (q, keys, values))
    if backend == "cpp" and B and H:  # the C++ kernel writes every element
        out, lse = torch.empty(B, H, Dv, dtype=acc), torch.empty(B, H, dtype=acc)
    else:
        out = torch.zeros(B, H, Dv, dtype=acc)
        lse = torch.full((B, H), float("-inf"), dtype=acc)
    if B and H:
        cpu_call(backend, "topk_attention_fwd", qc, kc, vc, ix, hist, float(scale), out, lse)
    return out.to(q.dtype), lse


@torch.library.custom_op("fastattn::topk_attention", mutates_args=())
def _topk_attention(q: Tensor, keys: Tensor, values: Optional[Tensor], idx: Tensor,
                    hist_index: Optional[Tensor], hist_rows: Optional[Tensor], scale: float,
                    backend: str) -> Tuple[Tensor, Tensor]:
    return _topk_attention_impl(q, keys, values, idx, hist_index, hist_rows, scale, backend)


@_topk_attention.register_fake
def _(q, keys, values, idx, hist_index, hist_rows, scale, backend):
    B, H, _ = q.shape
    return (q.new_empty(B, H, (keys if values is None else values).shape[-1]),
            q.new_empty(B, H, dtype=ref.accumulation_dtype(q.dtype)))


def _backward_slots(backend: str, g: Tensor, q: Tensor, keys: Tensor, values: Tensor,
                    ix: Tensor, hist: Tensor, out: Tensor, lse: Tensor, scale: float,
                    tied: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """dq (B, H, Dh) and the gradient of each selected row, dk_slots (B, K, H, Dh) and
    dv_slots (B, K, H, Dv), in the accumulation dtype (fp32 for half inputs on CPU). With
    ``tied`` (the keys are the values) dk_slots holds both gradients and dv_slots is None."""
    B, H, Dh = q.shape
    K, Dv = ix.shape[1], values.shape[-1]
    if backend in ("torch", "triton"):
        if backend == "torch":
            dq, dk_slots, dv_slots = ref.topk_attention_backward_slots(
                g, q, keys, values, ix, hist, out, lse, scale)
        else:
            dq, dk_slots, dv_slots = kernels("triton").topk_attention_bwd(
                g.contiguous(), q.contiguous(), keys.contiguous(), values.contiguous(), ix,
                hist, out.contiguous(), lse.contiguous(), scale)
        return (dq, dk_slots.add_(dv_slots), None) if tied else (dq, dk_slots, dv_slots)
    acc = ref.accumulation_dtype(q.dtype)
    gc, qc, kc, oc = (t.to(acc).contiguous() for t in (g, q, keys, out))
    vc = kc if tied else values.to(acc).contiguous()
    # The C++ kernel writes every element (zeros for empty slots); numba adds into zeros.
    # Tied: both kernels take dk_slots as dv_slots too and write the sum into it.
    alloc = torch.empty if backend == "cpp" else torch.zeros
    dq = alloc(B, H, Dh, dtype=acc)
    dk_slots = alloc(B, K, H, Dh, dtype=acc)
    dv_slots = dk_slots if tied else alloc(B, K, H, Dv, dtype=acc)
    if B and H:
        cpu_call(backend, "topk_attention_bwd", gc, qc, kc, vc, ix, hist, oc,
                 lse.to(acc).contiguous(), float(scale), dq, dk_slots, dv_slots)
    return dq, dk_slots, None if tied else dv_slots


def _own_rows(ix: Tensor, hist: Tensor, U: int, L: int) -> bool:
    """Whether every selected slot (b, j) is row (b, j) of its own history (U = B, L = K,
    hist = b, ix[b, j] in {j, -1}): the rows were gathered per query beforehand, so the slot
    gradients are the rows' gradients, with zeros where a slot is empty. CPU only (the
    check reads values)."""
    B, K = ix.shape
    if ix.device.type != "cpu" or U != B or L != K:
        return False
    pos = torch.arange(K, dtype=ix.dtype)
    return bool(torch.equal(hist, torch.arange(B, dtype=hist.dtype))
                and ((ix == pos) | (ix < 0)).all())


@torch.library.custom_op("fastattn::topk_attention_backward", mutates_args=())
def _topk_attention_backward(grad_out: Tensor, q: Tensor, keys: Tensor,
                             values: Optional[Tensor], idx: Tensor,
                             hist_index: Optional[Tensor], hist_rows: Optional[Tensor],
                             out: Tensor, lse: Tensor, scale: float,
                             backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); with ``values`` None (tied) dk holds both gradients and dv is empty."""
    B, H, Dh = q.shape
    tied = values is None
    values = keys if tied else values
    Dv = values.shape[-1]
    ix, hist, U, L = slot_layout(idx, hist_index, hist_rows, keys.shape[:-2], q.device)
    k4, v4 = keys.reshape(U, L, H, Dh), values.reshape(U, L, H, Dv)
    K = ix.shape[1]
    step = max(1, _SLOT_CHUNK_ELEMS // max(1, B * H * max(Dh, Dv)))
    if K <= step and _own_rows(ix, hist, U, L):
        dq, dk, dv = _backward_slots(backend, grad_out, q, k4, v4, ix, hist, out, lse, scale,
                                     tied)
        dv = keys.new_empty(0) if tied else dv.reshape(values.shape).to(values.dtype)
        return dq.to(q.dtype), dk.reshape(keys.shape).to(keys.dtype), dv
    dq = dk = dv = None
    for j0 in range(0, max(K, 1), step):
        sl = ix[:, j0:j0 + step].contiguous()
        kc = sl.shape[1]
        dq_c, dk_slots, dv_slots = _backward_slots(backend, grad_out, q, k4, v4, sl, hist, out,
                                                   lse, scale, tied)
        dq = dq_c if dq is None else dq.add_(dq_c)
        dk = scatter_add_rows(dk_slots.reshape(B, kc, H * Dh), sl, hist, U, L, backend, dk)
        if not tied:
            dv = scatter_add_rows(dv_slots.reshape(B, kc, H * Dv), sl, hist, U, L, backend,
                                  dv)
    dv = keys.new_empty(0) if tied else dv.reshape(values.shape).to(values.dtype)
    return dq.to(q.dtype), dk.reshape(keys.shape).to(keys.dtype), dv


@_topk_attention_backward.register_fake
def _(grad_out, q, keys, values, idx, hist_index, hist_rows, out, lse, scale, backend):
    dv = keys.new_empty(0) if values is None else torch.empty_like(values)
    return torch.empty_like(q), torch.empty_like(keys), dv


def _attn_setup(ctx, inputs, output):
    q, keys, values, idx, hist_index, hist_rows, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, keys, values, idx, hist_index, hist_rows, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _attn_backward(ctx, grad_out, grad_lse):
    q, keys, values, idx, hist_index, hist_rows, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastattn.topk_attention_backward(
        grad_out, q, keys, values, idx, hist_index, hist_rows, out, lse, ctx.scale,
        ctx.backend)
    return dq, dk, None if values is None else dv, None, None, None, None, None


torch.library.register_autograd("fastattn::topk_attention", _attn_backward,
                                setup_context=_attn_setup)


# --------------------------------------------------------------------------- wrappers

def _heads(q: Tensor, keys: Tensor, values: Tensor,
           hist_rows: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, bool]:
    """Check q/keys/values and view them multi-head: q (B, H, Dh), keys (U, L, H, Dh) and
    values (U, L, H, Dv), or with ``hist_rows`` the tables (N, H, Dh) and (N, H, Dv)."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=(2, 3), what=" (B, D) or (B, H, Dh)")
    single = q.dim() == 2
    lead = "(N, " if hist_rows is not None else "(U, L, "
    kshape = lead + ("D)" if single else "H, Dh)")
    vshape = lead + ("Dv)" if single else "H, Dv)")
    rows = "a table, as hist_rows is given" if hist_rows is not None else "histories"
    nlead = 1 if hist_rows is not None else 2
    check_tensor("keys", keys, dtypes=FLOAT_DTYPES, ndim=q.dim() - 1 + nlead,
                 what=f" {kshape}: {rows}")
    check_tensor("values", values, dtypes=FLOAT_DTYPES, ndim=q.dim() - 1 + nlead,
                 what=f" {vshape}: {rows}")
    if hist_rows is not None:
        check_hist_rows(hist_rows)
    if not q.dtype == keys.dtype == values.dtype:
        raise TypeError(f"q, keys and values must share one dtype, got {q.dtype}, {keys.dtype} "
                        f"and {values.dtype}")
    if keys.shape[nlead:] != q.shape[1:]:
        raise ValueError(f"keys {kshape} must match q in its last dims, got keys "
                         f"{tuple(keys.shape)} for q {tuple(q.shape)}")
    if values.shape[:-1] != keys.shape[:-1]:
        raise ValueError(f"values {vshape} must match keys {kshape} but for the last dim, got "
                         f"values {tuple(values.shape)} and keys {tuple(keys.shape)}")
    if single:
        q, keys, values = q.unsqueeze(1), keys.unsqueeze(nlead), values.unsqueeze(nlead)
    return q, keys, values, single


def _untied(keys: Tensor, values: Tensor, v: Tensor) -> Optional[Tensor]:
    """The custom ops' ``values``: None when the caller passed the keys tensor itself as the
    values (one gradient buffer in the backward), else the multi-head view ``v``."""
    return None if values is keys else v


def _histories(keys: Tensor, hist_rows: Optional[Tensor]) -> Tuple[int, int]:
    """(U, L) of a call: from the histories, or from hist_rows for the indexed form."""
    return tuple(keys.shape[:2]) if hist_rows is None else tuple(hist_rows.shape)


def _scale(scale, head_dim: int) -> float:
    if scale is None:
        return ref.default_scale(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _attend(args: tuple, tensors: tuple, checked: bool = False) -> Tensor:
    """out of ``fastattn::topk_attention(*args)``. For plain eager CPU ``tensors`` without
    grad (:func:`._common.eager_plain`) the op's forward runs directly, without the
    dispatcher's per-call cost (as the retrieval does, :func:`.hamming.topk_op`);
    ``checked``: idx and hist_index were checked by the caller's retrieval (direct path
    only; the op itself always checks). Shared by topk_attention and eta_attention."""
    if eager_plain(*tensors):
        return _topk_attention_impl(*args, checked=checked)[0]
    return torch.ops.fastattn.topk_attention(*args)[0]


def topk_attention(q: Tensor, keys: Tensor, values: Tensor, idx: Tensor, *,
                   hist_index: Optional[Tensor] = None, hist_rows: Optional[Tensor] = None,
                   scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """Exact softmax attention of each query over the history rows ``idx`` selects.

    Args:
        q: (B, D) or (B, H, Dh).
        keys, values: (U, L, D), (U, L, Dv) or (U, L, H, Dh), (U, L, H, Dv); with
            ``hist_rows``, tables (N, D), (N, Dv) or (N, H, Dh), (N, H, Dv).
        idx: (B, K) int64 positions, -1 for an empty slot (e.g. from :func:`hamming_topk`
            or any other retrieval: category match for SIM-hard, ...).
        hist_index: (B,) history row of each query (default as in :func:`hamming_topk`).
        hist_rows: (U, L) int32/int64, the indexed form: position l of history u is table
            row ``hist_rows[u, l]``; a selected position must hold a row in [0, N).
        scale: score scale, default 1/sqrt(Dh).

    Returns:
        (B, Dv) or (B, H, Dv); zeros for a query without a valid slot. Differentiable in q,
        keys and values (only the selected rows get gradient; with ``hist_rows`` the
        gradient is the tables' (N, ...), never (U, L, ...)).
    """
    q3, k4, v4, single = _heads(q, keys, values, hist_rows)
    check_tensor("idx", idx, dtypes=(torch.int64,), ndim=2, what=" (B, k)")
    if idx.shape[0] != q3.shape[0]:
        raise ValueError(f"idx must have B={q3.shape[0]} rows, got {tuple(idx.shape)}")
    check_hist_index(hist_index, q3.shape[0], _histories(k4, hist_rows)[0])
    dev = check_same_device(q=q, keys=keys, values=values, idx=idx, hist_index=hist_index,
                            hist_rows=hist_rows)
    args = (q3, k4, _untied(keys, values, v4), idx, hist_index, hist_rows,
            _scale(scale, q3.shape[-1]), backend_for(dev, backend))
    out = _attend(args, (q, keys, values, idx, hist_index, hist_rows))
    return out.squeeze(1) if single else out


def eta_attention(q: Tensor, keys: Tensor, values: Tensor, q_sig: Tensor, k_sig: Tensor, k: int,
                  *, lengths: Optional[Tensor] = None, hist_index: Optional[Tensor] = None,
                  hist_rows: Optional[Tensor] = None, scale: Optional[float] = None,
                  backend: Optional[str] = None) -> Tensor:
    """ETA target attention: SimHash top-k retrieval, then exact attention over those k.

    Args:
        q: (B, D) or (B, H, Dh) queries (candidate items).
        keys, values: (U, L, D), (U, L, Dv) or (U, L, H, Dh), (U, L, H, Dv) right-padded
            histories; with ``hist_rows``, tables (N, D), (N, Dv) or (N, H, ·).
        q_sig: (B, W) int64 query signatures; k_sig: (U, L, W) behaviour signatures, or the
            (N, W) table with ``hist_rows`` (one per query / behaviour, shared by all heads;
            see :func:`simhash_sign`).
        k: behaviours retrieved per query (>= 1; may exceed the history).
        lengths: (U,) valid length of each history (default L).
        hist_index: (B,) history row of each query (default: row b when U == B, the shared
            row 0 when U == 1; a shared history is never copied).
        hist_rows: (U, L) int32/int64, the indexed form: position l of history u is row
            ``hist_rows[u, l]`` of keys, values and k_sig (one row per distinct behaviour,
            e.g. from :func:`unique_rows`). Positions past ``lengths`` are not read.
        scale: score scale, default 1/sqrt(Dh).

    Returns:
        (B, Dv) or (B, H, Dv). A query with no valid position gets zeros. Differentiable in
        q, keys, values; the signatures are constants. The indexed form builds no
        (U, L, ·) float tensor and its backward returns (N, ·) table gradients.
    """
    q3, k4, v4, single = _heads(q, keys, values, hist_rows)
    B = q3.shape[0]
    check_topk_inputs(q_sig, k_sig, k, lengths, hist_index, hist_rows)
    want = (k4.shape[:2] if hist_rows is None else k4.shape[:1])
    if q_sig.shape[0] != B or k_sig.shape[:-1] != want:
        form = "(U, L, W) like keys" if hist_rows is None else "(N, W) like the keys table"
        raise ValueError(f"q_sig must be (B={B}, W) and k_sig {form} {tuple(want)}, got "
                         f"{tuple(q_sig.shape)} and {tuple(k_sig.shape)}")
    dev = check_same_device(q=q, keys=keys, values=values, q_sig=q_sig, k_sig=k_sig,
                            lengths=lengths, hist_index=hist_index, hist_rows=hist_rows)
    be = backend_for(dev, backend)
    _, idx = topk_op(q_sig, k_sig, lengths, hist_index, hist_rows)(
        q_sig, k_sig, k, lengths, hist_index, hist_rows, be)
    args = (q3, k4, _untied(keys, values, v4), idx, hist_index, hist_rows,
            _scale(scale, q3.shape[-1]), be)
    # idx and hist_index come from the retrieval, which checked them.
    out = _attend(args, (q, keys, values, hist_index, hist_rows), checked=True)
    return out.squeeze(1) if single else out


def target_attention(q: Tensor, keys: Tensor, values: Tensor, *,
                     lengths: Optional[Tensor] = None, hist_index: Optional[Tensor] = None,
                     hist_rows: Optional[Tensor] = None, scale: Optional[float] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Dense target attention over every valid position: the baseline ETA is measured against.

    Same shapes, masking and zero-for-empty rule as :func:`eta_attention`. Built on
    ``torch.nn.functional.scaled_dot_product_attention``. A shared history (U == 1) is one
    attention call of B queries against it, never copied per query; with an explicit
    ``hist_index`` over U > 1 histories the rows are gathered per query (a copy).

    With ``hist_rows`` (U, L) keys and values are tables (N, ...) and the call is
    :func:`topk_attention` over every valid position, read in place through the rows
    (``backend`` picks its kernels): no (U, L, ·) float tensor, (N, ·) table gradients.
    """
    q3, k4, v4, single = _heads(q, keys, values, hist_rows)
    B, H, Dh = q3.shape
    U, L = _histories(k4, hist_rows)
    check_lengths(lengths, U)
    check_hist_index(hist_index, B, U)
    dev = check_same_device(q=q, keys=keys, values=values, lengths=lengths,
                            hist_index=hist_index, hist_rows=hist_rows)
    sc = _scale(scale, Dh)
    # Values checked here, for both forms: out-of-range lengths would be clamped (or give
    # NaN rows) and a bad hist_index would wrap, or be ignored with one shared history.
    lens, hist = layout(B, U, L, lengths, hist_index, dev)
    if hist_rows is not None:
        pos = torch.arange(L, device=dev)
        idx = torch.where(pos < lens[hist][:, None], pos, -1)     # (B, L)
        out, _ = torch.ops.fastattn.topk_attention(q3, k4, _untied(keys, values, v4), idx,
                                                   hist_index, hist_rows, sc,
                                                   backend_for(dev, backend))
        return out.squeeze(1) if single else out
    if B == 0 or U == 0:
        out = q3.new_zeros(B, H, v4.shape[-1])
        return out.squeeze(1) if single else out
    if L == 0:  # nothing to attend to: zeros, still connected to the graph (zero gradients)
        out = torch.einsum("bhl,lhd->bhd", torch.einsum("bhd,lhd->bhl", q3, k4[0]), v4[0])
        return out.squeeze(1) if single else out
    kh, vh = k4.permute(0, 2, 1, 3), v4.permute(0, 2, 1, 3)        # (U, H, L, ·) views
    if U == 1:
        qh = q3.transpose(0, 1).unsqueeze(0)                          # (1, H, B, Dh)
    else:
        if hist_index is not None:
            kh, vh, lens = kh[hist], vh[hist], lens[hist]
        qh = q3.unsqueeze(2)                                          # (B, H, 1, Dh)
    valid = torch.arange(L, device=q.device) < lens.unsqueeze(1)      # (U or B, L)
    empty = lens == 0
    # An empty history would softmax over nothing (NaN): let it see position 0, then zero it.
    mask = valid | (empty.unsqueeze(1) & (torch.arange(L, device=q.device) == 0))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None, None, :],
                                         scale=sc)
    if U == 1:
        out = out.squeeze(0).transpose(0, 1)                          # (B, H, Dv)
        out = out * (~empty).to(out.dtype)
    else:
        out = out.squeeze(2) * (~empty).to(out.dtype).view(-1, 1, 1)
    return out.squeeze(1) if single else out
