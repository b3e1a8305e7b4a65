"""SimHash signing: x (..., D) @ planes (D, NB) -> sign bits packed into (..., W) int64."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from ._common import (FLOAT_DTYPES, backend_for, check_same_device, check_tensor, cpu_call,
                      kernels, require)

__all__ = ["simhash_sign", "make_planes"]


def make_planes(dim: int, nbits: int, generator: Optional[torch.Generator] = None, *,
                dtype: torch.dtype = torch.float32, device=None,
                orthogonal: bool = False) -> Tensor:
    """Gaussian random hyperplanes (D, NB) for :func:`simhash_sign`.

    Pass a seeded ``torch.Generator`` for reproducible signatures. The values are
    N(0, 1) draws rounded to bfloat16 (exact in ``dtype``), which the C++ AMX path signs
    with two bf16 products instead of three; any planes work, these are just faster.
    ``orthogonal=True``: super-bit planes, each group of D consecutive columns
    orthogonalised (same marginal distribution per column, lower-variance angle estimates;
    :func:`fastattn.reference.make_planes`).
    """
    for name, v in (("dim", dim), ("nbits", nbits)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if not isinstance(orthogonal, bool):
        raise TypeError(f"orthogonal must be a bool, got {type(orthogonal).__name__}")
    return ref.make_planes(dim, nbits, generator=generator, dtype=dtype, device=device,
                           orthogonal=orthogonal)


def _checked_table_rows(rows: Tensor, n_rows: int) -> Tensor:
    """rows as contiguous int64 with every entry a row of the table, [0, n_rows) (checked
    on the host for CPU tensors, by a device-side assert on CUDA)."""
    rows = rows.to(torch.int64).contiguous()
    if rows.numel():
        bad = (rows < 0) | (rows >= n_rows)

        def message() -> str:
            i = int(bad.nonzero()[0, 0])
            return f"rows[{i}] = {int(rows[i])} is outside the table x [0, N={n_rows})"
        require(~bad.any(), f"rows must lie in the table x [0, N={n_rows})", message)
    return rows


@torch.library.custom_op("fastattn::simhash_sign", mutates_args=())
def _simhash_sign(x: Tensor, planes: Tensor, rows: Optional[Tensor], backend: str) -> Tensor:
    D, NB = planes.shape
    W = ref.words_for_bits(NB)
    if rows is not None:
        rows = _checked_table_rows(rows, x.shape[0])
    if backend == "torch":
        return ref.simhash_sign(x if rows is None else x.index_select(0, rows), planes)
    lead = x.shape[:-1] if rows is None else rows.shape
    # The contract accumulates in fp32 (fp64 if either input is fp64): the kernels take one
    # dtype, so half inputs are widened here.
    acc = torch.float64 if torch.float64 in (x.dtype, planes.dtype) else torch.float32
    xs = x.reshape(-1, D).to(acc).contiguous()
    ps = planes.to(acc).contiguous()
    if backend == "triton":
        out = kernels("triton").simhash_sign(xs, ps, rows)
    else:
        out = torch.empty(lead.numel(), W, dtype=torch.int64, device=x.device)
        if out.shape[0] and rows is None:
            cpu_call(backend, "simhash_sign", xs, ps, out)
        elif out.shape[0]:
            cpu_call(backend, "simhash_sign_rows", xs, ps, rows, out)
    return out.reshape(*lead, W)


@_simhash_sign.register_fake
def _(x, planes, rows, backend):
    lead = x.shape[:-1] if rows is None else rows.shape
    return x.new_empty(*lead, ref.words_for_bits(planes.shape[1]), dtype=torch.int64)


def simhash_sign(x: Tensor, planes: Tensor, *, rows: Optional[Tensor] = None,
                 backend: Optional[str] = None) -> Tensor:
    """SimHash signatures of ``x``, or of the rows ``rows`` of the table ``x``.

    Args:
        x: (..., D) float tensor (any float dtype; any layout); with ``rows``, a table (N, D).
        planes: (D, NB) float hyperplanes, e.g. from :func:`make_planes`.
        rows: (M,) int32/int64 rows of ``x`` in [0, N) (the gathered form): the result is
            ``simhash_sign(x[rows], planes)`` without gathering, e.g. the signatures of a
            batch's distinct items read straight from an embedding table.
        backend: force ``"triton" | "cpp" | "numba" | "torch"`` (default: see
            :mod:`fastattn.backends`).

    Returns:
        (..., W) int64, or (M, W) with ``rows``; W = ceil(NB/64). Bit j (word j // 64, bit
        j % 64, least significant first) is 1 iff ``(x @ planes)[..., j] > 0`` (fp32
        accumulation, fp64 for fp64 inputs); bits >= NB are 0. A NaN in a row of ``x`` makes
        its projections NaN, and NaN compares false, so that row's signature is all zeros.
        Not differentiable.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, what=" (..., D)")
    check_tensor("planes", planes, dtypes=FLOAT_DTYPES, ndim=2, what=" (D, NB)")
    if x.dim() < 1 or x.shape[-1] != planes.shape[0]:
        raise ValueError(f"x (..., D) and planes (D, NB) must agree on D, got x "
                         f"{tuple(x.shape)} and planes {tuple(planes.shape)}")
    if planes.shape[1] < 1:
        raise ValueError("planes must have at least one hash bit (NB >= 1)")
    if rows is not None:
        check_tensor("rows", rows, dtypes=(torch.int32, torch.int64), ndim=1, what=" (M,)")
        if x.dim() != 2:
            raise ValueError(f"with rows, x must be a table (N, D), got shape {tuple(x.shape)}")
    dev = check_same_device(x=x, planes=planes, rows=rows)
    return torch.ops.fastattn.simhash_sign(x.detach(), planes.detach(), rows,
                                           backend_for(dev, backend))
