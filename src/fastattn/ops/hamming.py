"""Hamming distance between packed signatures, and the fused Hamming top-k retrieval."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy
import torch
from torch import Tensor

from .. import reference as ref
from ._common import (backend_for, check_hist_index, check_hist_rows, check_k, check_lengths,
                      check_same_device, check_signature, checked_rows, cpu_call, eager_plain,
                      host_layout, kernels, layout)

__all__ = ["hamming_distance", "hamming_topk"]


def _broadcast_rows(shape, lead, device) -> Tensor:
    """Row of the contiguous (prod(shape), ...) view that each row of the broadcast uses
    (built on ``device``: no host-to-device copy per call)."""
    n = math.prod(shape)
    rows = torch.arange(n, dtype=torch.int64, device=device).reshape(shape).expand(lead)
    return rows.reshape(-1).contiguous()  # reshape may keep stride 0; kernels index densely


@torch.library.custom_op("fastattn::hamming_distance", mutates_args=())
def _hamming_distance(q_sig: Tensor, k_sig: Tensor, backend: str) -> Tensor:
    if backend == "torch":
        return ref.hamming_distance(q_sig, k_sig)
    W = q_sig.shape[-1]
    L = k_sig.shape[-2]
    lead = torch.broadcast_shapes(q_sig.shape[:-1], k_sig.shape[:-2])
    # Broadcasting goes through row maps, so an expanded side is never copied.
    qi = _broadcast_rows(q_sig.shape[:-1], lead, q_sig.device)
    ki = _broadcast_rows(k_sig.shape[:-2], lead, q_sig.device)
    q = q_sig.contiguous().reshape(math.prod(q_sig.shape[:-1]), W)
    k = k_sig.contiguous().reshape(math.prod(k_sig.shape[:-2]), L, W)
    if backend == "triton":
        out = kernels("triton").hamming_distance(q, k, qi, ki)
    else:
        out = torch.empty(qi.shape[0], L, dtype=torch.int32)
        if out.numel():
            cpu_call(backend, "hamming_distance", q, k, qi, ki, out)
    return out.reshape(*lead, L)


@_hamming_distance.register_fake
def _(q_sig, k_sig, backend):
    lead = torch.broadcast_shapes(q_sig.shape[:-1], k_sig.shape[:-2])
    return q_sig.new_empty(*lead, k_sig.shape[-2], dtype=torch.int32)


def hamming_distance(q_sig: Tensor, k_sig: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """popcount(q XOR k) summed over words.

    Args:
        q_sig: (..., W) int64 signatures.
        k_sig: (..., L, W) int64 signatures; leading dims broadcast against ``q_sig``'s.

    Returns:
        (..., L) int32 distances.
    """
    check_signature("q_sig", q_sig, shape="shape (..., W)")
    check_signature("k_sig", k_sig, shape="shape (..., L, W)")
    if q_sig.dim() < 1 or k_sig.dim() < 2:
        raise ValueError(f"q_sig must be (..., W) and k_sig (..., L, W), got shapes "
                         f"{tuple(q_sig.shape)} and {tuple(k_sig.shape)}")
    if q_sig.shape[-1] != k_sig.shape[-1]:
        raise ValueError(f"q_sig and k_sig must have the same number of words W, got "
                         f"{q_sig.shape[-1]} and {k_sig.shape[-1]}")
    try:
        torch.broadcast_shapes(q_sig.shape[:-1], k_sig.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(f"leading dims of q_sig {tuple(q_sig.shape[:-1])} and k_sig "
                         f"{tuple(k_sig.shape[:-2])} do not broadcast") from exc
    dev = check_same_device(q_sig=q_sig, k_sig=k_sig)
    return torch.ops.fastattn.hamming_distance(q_sig, k_sig, backend_for(dev, backend))


def _hamming_topk_impl(q_sig: Tensor, k_sig: Tensor, k: int, lengths: Optional[Tensor],
                       hist_index: Optional[Tensor], hist_rows: Optional[Tensor],
                       backend: str) -> Tuple[Tensor, Tensor]:
    B, W = q_sig.shape
    U, L = k_sig.shape[:2] if hist_rows is None else hist_rows.shape
    host = backend in ("cpp", "numba")       # numpy layout and outputs: no torch allocation
    lens, hist = (host_layout(B, U, L, lengths, hist_index) if host
                  else layout(B, U, L, lengths, hist_index, q_sig.device))
    q, ks, rows = q_sig.contiguous(), k_sig.contiguous(), None
    if hist_rows is None:
        name, args = "hamming_topk", (q, ks, lens, hist)
    else:
        # The C++ kernel checks the rows itself (in parallel, before reading any of them);
        # with no query it is not called, and the rows are checked here like elsewhere.
        rows = (hist_rows.to(torch.int64).contiguous() if backend == "cpp" and B
                else checked_rows(hist_rows, torch.as_tensor(lens), k_sig.shape[0]))
        name, args = "hamming_topk_rows", (q, ks, rows, lens, hist)
    if backend == "torch":
        return ref.hamming_topk(q_sig, k_sig, k, lens, hist, hist_rows=rows)
    if backend == "triton":
        return getattr(kernels("triton"), name)(*args, k)
    dist = numpy.empty((B, k), dtype=numpy.int32)    # ~0.3 µs each against ~3 for torch.empty
    idx = numpy.empty((B, k), dtype=numpy.int64)
    if B:
        cpu_call(backend, name, *args, k, dist, idx)
    return torch.from_numpy(dist), torch.from_numpy(idx)


_hamming_topk = torch.library.custom_op("fastattn::hamming_topk", mutates_args=())(
    _hamming_topk_impl)


@_hamming_topk.register_fake
def _(q_sig, k_sig, k, lengths, hist_index, hist_rows, backend):
    B = q_sig.shape[0]
    return (q_sig.new_empty(B, k, dtype=torch.int32), q_sig.new_empty(B, k, dtype=torch.int64))


def topk_op(*tensors: Optional[Tensor]):
    """The Hamming top-k op to call on ``tensors`` (the call's tensor arguments): for plain
    eager CPU tensors its implementation itself, the same function the custom op runs,
    without the dispatcher's per-call cost (:func:`._common.eager_plain`); otherwise
    ``torch.ops.fastattn.hamming_topk``. Shared by :func:`hamming_topk` and eta_attention."""
    return _hamming_topk_impl if eager_plain(*tensors) else torch.ops.fastattn.hamming_topk


def check_topk_inputs(q_sig: Tensor, k_sig: Tensor, k: int, lengths: Optional[Tensor],
                      hist_index: Optional[Tensor], hist_rows: Optional[Tensor]) -> None:
    """Shape/dtype checks of a Hamming top-k call, dense or indexed (shared by eta_attention)."""
    check_signature("q_sig", q_sig, ndim=2, shape="shape (B, W)")
    if hist_rows is None:
        check_signature("k_sig", k_sig, ndim=3, shape="shape (U, L, W)")
        U = k_sig.shape[0]
    else:
        check_signature("k_sig", k_sig, ndim=2,
                        shape="shape (N, W): a signature table, as hist_rows is given")
        U = check_hist_rows(hist_rows).shape[0]
    if q_sig.shape[1] != k_sig.shape[-1]:
        raise ValueError(f"q_sig (B, W) and k_sig must have the same number of words W, got "
                         f"{q_sig.shape[1]} and {k_sig.shape[-1]}")
    check_k(k)
    check_lengths(lengths, U)
    check_hist_index(hist_index, q_sig.shape[0], U)


def hamming_topk(q_sig: Tensor, k_sig: Tensor, k: int, *, lengths: Optional[Tensor] = None,
                 hist_index: Optional[Tensor] = None, hist_rows: Optional[Tensor] = None,
                 backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """The k nearest valid behaviours of each query by Hamming distance (fused).

    Args:
        q_sig: (B, W) int64 query signatures.
        k_sig: (U, L, W) int64 behaviour signatures, right-padded histories; or, with
            ``hist_rows``, a signature table (N, W), one row per distinct behaviour.
        k: number of neighbours (>= 1; may exceed the history length).
        lengths: (U,) int valid length of each history in [0, L] (default L).
        hist_index: (B,) int history row of each query (default: row b when U == B, the
            shared row 0 when U == 1). A shared history is read in place, never copied.
        hist_rows: (U, L) int32/int64, the indexed form: position l of history u is
            ``k_sig[hist_rows[u, l]]``. Positions past ``lengths`` are not read (-1 there
            is fine); a valid position outside [0, N) raises ValueError.

    Returns:
        ``(dist (B, k) int32, idx (B, k) int64)`` ordered by (distance, position) ascending,
        ties to the smaller position; idx are history positions l, in both forms. Slots
        past the number of valid positions hold idx = -1 and dist = 64·W + 1. No (B, L)
        distance matrix is built (except by the ``torch`` reference backend).
    """
    check_topk_inputs(q_sig, k_sig, k, lengths, hist_index, hist_rows)
    dev = check_same_device(q_sig=q_sig, k_sig=k_sig, lengths=lengths, hist_index=hist_index,
                            hist_rows=hist_rows)
    return topk_op(q_sig, k_sig, lengths, hist_index, hist_rows)(
        q_sig, k_sig, k, lengths, hist_index, hist_rows, backend_for(dev, backend))
