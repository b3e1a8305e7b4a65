"""Masked mean pooling of token states: one vector per behaviour (BAHE's atomic behaviour
encoding pools the K token states of each distinct behaviour into one d-vector).

``masked_mean(x (N, K, D), mask (N, K) bool) -> (N, D)``, fused forward and backward in
every backend. Unlike the other op families, the shape and dtype checks run inside the
custom op and its fake, so direct ``torch.ops.fastattn.masked_mean`` calls and compiled
graphs are checked too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from ._common import FLOAT_DTYPES, backend_for, check_same_device, check_tensor, cpu_call, kernels

__all__ = ["masked_mean"]


def _check(x: Tensor, mask: Tensor, x_name: str = "x", x_shape: str = "(N, K, D)") -> None:
    """Shape/dtype checks of both custom ops (real and fake tensors alike). For the backward,
    ``x`` is the gradient (N, D) and the mask's N must match its first dim."""
    ndim = 3 if x_shape == "(N, K, D)" else 2
    check_tensor(x_name, x, dtypes=FLOAT_DTYPES, ndim=ndim, what=f" and shape {x_shape}")
    check_tensor("mask", mask, dtypes=(torch.bool,), ndim=2, what=" and shape (N, K)")
    want = tuple(x.shape[:2]) if ndim == 3 else (x.shape[0], mask.shape[1])
    if tuple(mask.shape) != want:
        raise ValueError(f"mask must have shape (N, K)={want} to match {x_name} "
                         f"{tuple(x.shape)}, got {tuple(mask.shape)}")
    check_same_device(**{x_name: x, "mask": mask})


@torch.library.custom_op("fastattn::masked_mean", mutates_args=())
def _masked_mean(x: Tensor, mask: Tensor, backend: str) -> Tensor:
    _check(x, mask)
    N, K, D = x.shape
    if backend == "torch":
        return ref.masked_mean(x, mask)
    m = mask.contiguous().view(torch.uint8)
    if backend == "triton":
        return kernels("triton").masked_mean_fwd(x.contiguous(), m)
    # The CPU kernels run in fp32/fp64: half inputs are widened, then the result narrowed.
    xw = x.to(ref.accumulation_dtype(x.dtype)).contiguous()
    # the kernels write every element
    out = torch.empty(N, D, dtype=xw.dtype) if K else torch.zeros(N, D, dtype=xw.dtype)
    if out.numel() and K:
        cpu_call(backend, "masked_mean_fwd", xw, m, out)
    return out.to(x.dtype)


@_masked_mean.register_fake
def _(x, mask, backend):
    _check(x, mask)
    return x.new_empty(x.shape[0], x.shape[2])


@torch.library.custom_op("fastattn::masked_mean_backward", mutates_args=())
def _masked_mean_backward(grad: Tensor, mask: Tensor, backend: str) -> Tensor:
    _check(grad, mask, "grad", "(N, D)")
    N, D = grad.shape
    K = mask.shape[1]
    if backend == "torch":
        return ref.masked_mean_backward(grad, mask)
    m = mask.contiguous().view(torch.uint8)
    if backend == "triton":
        return kernels("triton").masked_mean_bwd(grad.contiguous(), m)
    gw = grad.to(ref.accumulation_dtype(grad.dtype)).contiguous()
    dx = torch.empty(N, K, D, dtype=gw.dtype)
    if dx.numel():
        cpu_call(backend, "masked_mean_bwd", gw, m, dx)
    return dx.to(grad.dtype)


@_masked_mean_backward.register_fake
def _(grad, mask, backend):
    _check(grad, mask, "grad", "(N, D)")
    return grad.new_empty(grad.shape[0], mask.shape[1], grad.shape[1])


def _setup(ctx, inputs, output):
    _, mask, backend = inputs
    ctx.save_for_backward(mask)
    ctx.backend = backend


def _pool_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return torch.ops.fastattn.masked_mean_backward(grad, mask, ctx.backend), None, None


def _unpool_backward(ctx, grad_dx):
    # The backward is linear in grad, and its adjoint is the forward pooling itself.
    (mask,) = ctx.saved_tensors
    return torch.ops.fastattn.masked_mean(grad_dx, mask, ctx.backend), None, None


torch.library.register_autograd("fastattn::masked_mean", _pool_backward, setup_context=_setup)
torch.library.register_autograd("fastattn::masked_mean_backward", _unpool_backward,
                                setup_context=_setup)


def masked_mean(x: Tensor, mask: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Mean of each row's valid token states.

    Args:
        x: (N, K, D) float token states (e.g. the lower layers' output for N behaviours of
            K tokens).
        mask: (N, K) bool, True at real tokens. Masked tokens are never read (NaN or inf
            there does not reach the output or the gradient).

    Returns:
        (N, D) in ``x``'s dtype: ``sum_k mask[n, k] x[n, k] / count[n]``; a row without any
        valid token gives zeros. Differentiable in ``x`` (twice: the backward's adjoint is
        the pooling), deterministic in every CPU backend.
    """
    _check(x, mask)
    return torch.ops.fastattn.masked_mean(x, mask, backend_for(x.device, backend))
