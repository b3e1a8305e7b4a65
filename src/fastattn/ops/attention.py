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
from ._common import (FLOAT_DTYPES, backend_for, check_hist_index, check_k, check_lengths,
                      check_same_device, check_signature, check_tensor, cpu_call, kernels, layout)
from .gather import check_idx_range, scatter_add_rows

__all__ = ["topk_attention", "eta_attention", "target_attention"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastattn::topk_attention", mutates_args=())
def _topk_attention(q: Tensor, keys: Tensor, values: Tensor, idx: Tensor,
                    hist_index: Optional[Tensor], scale: float,
                    backend: str) -> Tuple[Tensor, Tensor]:
    B, H, Dh = q.shape
    U, L = keys.shape[:2]
    _, hist = layout(B, U, L, None, hist_index, q.device)
    check_idx_range(idx, L)
    if backend == "torch":
        out, lse = ref.topk_attention(q, keys, values, idx, hist, scale)
        return out, lse.to(_acc_dtype(q.dtype))
    ix = idx.contiguous()
    if backend == "triton":
        return kernels("triton").topk_attention_fwd(q.contiguous(), keys.contiguous(),
                                                     values.contiguous(), ix, hist, scale)
    # CPU kernels compute in fp32/fp64: half inputs are widened (one copy of the history).
    acc = _acc_dtype(q.dtype)
    qc, kc, vc = (t.to(acc).contiguous() for t in (q, keys, values))
    out = torch.zeros(B, H, values.shape[-1], dtype=acc)
    lse = torch.full((B, H), float("-inf"), dtype=acc)
    if B and H:
        cpu_call(backend, "topk_attention_fwd", qc, kc, vc, ix, hist, float(scale), out, lse)
    return out.to(q.dtype), lse


@_topk_attention.register_fake
def _(q, keys, values, idx, hist_index, scale, backend):
    B, H, _ = q.shape
    return (q.new_empty(B, H, values.shape[-1]),
            q.new_empty(B, H, dtype=_acc_dtype(q.dtype)))


@torch.library.custom_op("fastattn::topk_attention_backward", mutates_args=())
def _topk_attention_backward(grad_out: Tensor, q: Tensor, keys: Tensor, values: Tensor,
                             idx: Tensor, hist_index: Optional[Tensor], out: Tensor, lse: Tensor,
                             scale: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    B, H, Dh = q.shape
    U, L = keys.shape[:2]
    Dv = values.shape[-1]
    K = idx.shape[1]
    _, hist = layout(B, U, L, None, hist_index, q.device)
    ix = idx.contiguous()
    if backend == "torch":
        dq, dk_slots, dv_slots = ref.topk_attention_backward_slots(
            grad_out, q, keys, values, ix, hist, out, lse, scale)
    elif backend == "triton":
        dq, dk_slots, dv_slots = kernels("triton").topk_attention_bwd(
            grad_out.contiguous(), q.contiguous(), keys.contiguous(), values.contiguous(), ix,
            hist, out.contiguous(), lse.contiguous(), scale)
    else:
        acc = _acc_dtype(q.dtype)
        g, qc, kc, vc, oc = (t.to(acc).contiguous() for t in (grad_out, q, keys, values, out))
        dq = torch.zeros(B, H, Dh, dtype=acc)
        dk_slots = torch.zeros(B, K, H, Dh, dtype=acc)
        dv_slots = torch.zeros(B, K, H, Dv, dtype=acc)
        if B and H:
            cpu_call(backend, "topk_attention_bwd", g, qc, kc, vc, ix, hist, oc,
                     lse.to(acc).contiguous(), float(scale), dq, dk_slots, dv_slots)
    dk = scatter_add_rows(dk_slots.reshape(B, K, H * Dh), ix, hist, U, L, backend)
    dv = scatter_add_rows(dv_slots.reshape(B, K, H * Dv), ix, hist, U, L, backend)
    return (dq.to(q.dtype), dk.reshape(U, L, H, Dh).to(keys.dtype),
            dv.reshape(U, L, H, Dv).to(values.dtype))


@_topk_attention_backward.register_fake
def _(grad_out, q, keys, values, idx, hist_index, out, lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(keys), torch.empty_like(values)


def _attn_setup(ctx, inputs, output):
    q, keys, values, idx, hist_index, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, keys, values, idx, hist_index, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _attn_backward(ctx, grad_out, grad_lse):
    q, keys, values, idx, hist_index, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastattn.topk_attention_backward(
        grad_out, q, keys, values, idx, hist_index, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("fastattn::topk_attention", _attn_backward,
                                setup_context=_attn_setup)


# --------------------------------------------------------------------------- wrappers

def _heads(q: Tensor, keys: Tensor, values: Tensor) -> Tuple[Tensor, Tensor, Tensor, bool]:
    """Check q/keys/values and view them multi-head: (B, H, Dh), (U, L, H, Dh), (U, L, H, Dv)."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=(2, 3), what=" (B, D) or (B, H, Dh)")
    single = q.dim() == 2
    kshape = "(U, L, D)" if single else "(U, L, H, Dh)"
    vshape = "(U, L, Dv)" if single else "(U, L, H, Dv)"
    check_tensor("keys", keys, dtypes=FLOAT_DTYPES, ndim=q.dim() + 1, what=f" {kshape}")
    check_tensor("values", values, dtypes=FLOAT_DTYPES, ndim=q.dim() + 1, what=f" {vshape}")
    if not q.dtype == keys.dtype == values.dtype:
        raise TypeError(f"q, keys and values must share one dtype, got {q.dtype}, {keys.dtype} "
                        f"and {values.dtype}")
    if keys.shape[2:] != q.shape[1:]:
        raise ValueError(f"keys {kshape} must match q in its last dims, got keys "
                         f"{tuple(keys.shape)} for q {tuple(q.shape)}")
    if values.shape[:-1] != keys.shape[:-1]:
        raise ValueError(f"values {vshape} must match keys {kshape} but for the last dim, got "
                         f"values {tuple(values.shape)} and keys {tuple(keys.shape)}")
    if single:
        q, keys, values = q.unsqueeze(1), keys.unsqueeze(2), values.unsqueeze(2)
    return q, keys, values, single


def _scale(scale, head_dim: int) -> float:
    if scale is None:
        return ref.default_scale(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def topk_attention(q: Tensor, keys: Tensor, values: Tensor, idx: Tensor, *,
                   hist_index: Optional[Tensor] = None, scale: Optional[float] = None,
                   backend: Optional[str] = None) -> Tensor:
    """Exact softmax attention of each query over the history rows ``idx`` selects.

    Args:
        q: (B, D) or (B, H, Dh).
        keys, values: (U, L, D), (U, L, Dv) or (U, L, H, Dh), (U, L, H, Dv).
        idx: (B, K) int64 positions, -1 for an empty slot (e.g. from :func:`hamming_topk`
            or any other retrieval: category match for SIM-hard, ...).
        hist_index: (B,) history row of each query (default as in :func:`hamming_topk`).
        scale: score scale, default 1/sqrt(Dh).

    Returns:
        (B, Dv) or (B, H, Dv); zeros for a query without a valid slot. Differentiable in q,
        keys and values (only the selected rows of keys/values get gradient).
    """
    q3, k4, v4, single = _heads(q, keys, values)
    check_tensor("idx", idx, dtypes=(torch.int64,), ndim=2, what=" (B, k)")
    if idx.shape[0] != q3.shape[0]:
        raise ValueError(f"idx must have B={q3.shape[0]} rows, got {tuple(idx.shape)}")
    check_hist_index(hist_index, q3.shape[0], k4.shape[0])
    dev = check_same_device(q=q, keys=keys, values=values, idx=idx, hist_index=hist_index)
    out, _ = torch.ops.fastattn.topk_attention(q3, k4, v4, idx, hist_index,
                                               _scale(scale, q3.shape[-1]),
                                               backend_for(dev, backend))
    return out.squeeze(1) if single else out


def eta_attention(q: Tensor, keys: Tensor, values: Tensor, q_sig: Tensor, k_sig: Tensor, k: int,
                  *, lengths: Optional[Tensor] = None, hist_index: Optional[Tensor] = None,
                  scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """ETA target attention: SimHash top-k retrieval, then exact attention over those k.

    Args:
        q: (B, D) or (B, H, Dh) queries (candidate items).
        keys, values: (U, L, D), (U, L, Dv) or (U, L, H, Dh), (U, L, H, Dv) right-padded
            histories.
        q_sig: (B, W) int64 query signatures; k_sig: (U, L, W) behaviour signatures (one per
            query / behaviour, shared by all heads; see :func:`simhash_sign`).
        k: behaviours retrieved per query (>= 1; may exceed the history).
        lengths: (U,) valid length of each history (default L).
        hist_index: (B,) history row of each query (default: row b when U == B, the shared
            row 0 when U == 1; a shared history is never copied).
        scale: score scale, default 1/sqrt(Dh).

    Returns:
        (B, Dv) or (B, H, Dv). A query with no valid position gets zeros. Differentiable in
        q, keys, values; the signatures are constants.
    """
    q3, k4, v4, single = _heads(q, keys, values)
    B, U, L = q3.shape[0], k4.shape[0], k4.shape[1]
    check_signature("q_sig", q_sig, ndim=2, shape="shape (B, W)")
    check_signature("k_sig", k_sig, ndim=3, shape="shape (U, L, W)")
    if q_sig.shape[0] != B or k_sig.shape[:2] != (U, L) or q_sig.shape[1] != k_sig.shape[2]:
        raise ValueError(f"q_sig must be (B={B}, W) and k_sig (U={U}, L={L}, W) with one W, got "
                         f"{tuple(q_sig.shape)} and {tuple(k_sig.shape)}")
    check_k(k)
    check_lengths(lengths, U)
    check_hist_index(hist_index, B, U)
    dev = check_same_device(q=q, keys=keys, values=values, q_sig=q_sig, k_sig=k_sig,
                            lengths=lengths, hist_index=hist_index)
    be = backend_for(dev, backend)
    _, idx = torch.ops.fastattn.hamming_topk(q_sig, k_sig, k, lengths, hist_index, be)
    out, _ = torch.ops.fastattn.topk_attention(q3, k4, v4, idx, hist_index,
                                               _scale(scale, q3.shape[-1]), be)
    return out.squeeze(1) if single else out


def target_attention(q: Tensor, keys: Tensor, values: Tensor, *,
                     lengths: Optional[Tensor] = None, hist_index: Optional[Tensor] = None,
                     scale: Optional[float] = None) -> Tensor:
    """Dense target attention over every valid position: the baseline ETA is measured against.

    Same shapes, masking and zero-for-empty rule as :func:`eta_attention`. Built on
    ``torch.nn.functional.scaled_dot_product_attention``. A shared history (U == 1) is one
    attention call of B queries against it, never copied per query; with an explicit
    ``hist_index`` over U > 1 histories the rows are gathered per query (a copy).
    """
    q3, k4, v4, single = _heads(q, keys, values)
    B, H, Dh = q3.shape
    U, L = k4.shape[:2]
    check_lengths(lengths, U)
    check_hist_index(hist_index, B, U)
    check_same_device(q=q, keys=keys, values=values, lengths=lengths, hist_index=hist_index)
    sc = _scale(scale, Dh)
    if B == 0 or U == 0:
        out = q3.new_zeros(B, H, v4.shape[-1])
        return out.squeeze(1) if single else out
    if L == 0:  # nothing to attend to: zeros, still connected to the graph (zero gradients)
        out = torch.einsum("bhl,lhd->bhd", torch.einsum("bhd,lhd->bhl", q3, k4[0]), v4[0])
        return out.squeeze(1) if single else out
    lens = ref.default_lengths(U, L, q.device) if lengths is None else lengths.to(torch.int64)
    kh, vh = k4.permute(0, 2, 1, 3), v4.permute(0, 2, 1, 3)        # (U, H, L, ·) views
    if U == 1:
        qh = q3.transpose(0, 1).unsqueeze(0)                          # (1, H, B, Dh)
    else:
        if hist_index is not None:
            kh, vh, lens = kh[hist_index], vh[hist_index], lens[hist_index]
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
