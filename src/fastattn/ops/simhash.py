"""SimHash signing: x (..., D) @ planes (D, NB) -> sign bits packed into (..., W) int64."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from ._common import FLOAT_DTYPES, backend_for, check_same_device, check_tensor, cpu_call, kernels

__all__ = ["simhash_sign", "make_planes"]


def make_planes(dim: int, nbits: int, generator: Optional[torch.Generator] = None, *,
                dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Gaussian random hyperplanes (D, NB) for :func:`simhash_sign`.

    Pass a seeded ``torch.Generator`` for reproducible signatures.
    """
    for name, v in (("dim", dim), ("nbits", nbits)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return ref.make_planes(dim, nbits, generator=generator, dtype=dtype, device=device)


@torch.library.custom_op("fastattn::simhash_sign", mutates_args=())
def _simhash_sign(x: Tensor, planes: Tensor, backend: str) -> Tensor:
    if backend == "torch":
        return ref.simhash_sign(x, planes)
    D, NB = planes.shape
    W = ref.words_for_bits(NB)
    lead = x.shape[:-1]
    # The contract accumulates in fp32 (fp64 if either input is fp64): the kernels take one
    # dtype, so half inputs are widened here.
    acc = torch.float64 if torch.float64 in (x.dtype, planes.dtype) else torch.float32
    xs = x.reshape(-1, D).to(acc).contiguous()
    ps = planes.to(acc).contiguous()
    if backend == "triton":
        out = kernels("triton").simhash_sign(xs, ps)
    else:
        out = torch.empty(xs.shape[0], W, dtype=torch.int64, device=x.device)
        if xs.shape[0]:
            cpu_call(backend, "simhash_sign", xs, ps, out)
    return out.reshape(*lead, W)


@_simhash_sign.register_fake
def _(x, planes, backend):
    return x.new_empty(*x.shape[:-1], ref.words_for_bits(planes.shape[1]), dtype=torch.int64)


def simhash_sign(x: Tensor, planes: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """SimHash signatures of ``x``.

    Args:
        x: (..., D) float tensor (any float dtype; any layout).
        planes: (D, NB) float hyperplanes, e.g. from :func:`make_planes`.
        backend: force ``"triton" | "cpp" | "numba" | "torch"`` (default: see
            :mod:`fastattn.backends`).

    Returns:
        (..., W) int64, W = ceil(NB/64). Bit j (word j // 64, bit j % 64, least significant
        first) is 1 iff ``(x @ planes)[..., j] > 0`` (fp32 accumulation, fp64 for fp64
        inputs); bits >= NB are 0. A NaN in a row of ``x`` makes its projections NaN, and NaN
        compares false, so that row's signature is all zeros. Not differentiable.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, what=" (..., D)")
    check_tensor("planes", planes, dtypes=FLOAT_DTYPES, ndim=2, what=" (D, NB)")
    if x.dim() < 1 or x.shape[-1] != planes.shape[0]:
        raise ValueError(f"x (..., D) and planes (D, NB) must agree on D, got x "
                         f"{tuple(x.shape)} and planes {tuple(planes.shape)}")
    if planes.shape[1] < 1:
        raise ValueError("planes must have at least one hash bit (NB >= 1)")
    dev = check_same_device(x=x, planes=planes)
    return torch.ops.fastattn.simhash_sign(x.detach(), planes.detach(), backend_for(dev, backend))
