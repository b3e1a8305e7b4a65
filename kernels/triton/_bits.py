"""Bit helpers shared by the Triton kernels, plus the small launcher utilities they need.

Popcount has two implementations chosen by a ``tl.constexpr`` flag:

* on a real GPU, the hardware instruction (``popc.b64`` through libdevice ``__nv_popcll``);
* under ``TRITON_INTERPRET=1`` a SWAR bit count on uint64, because libdevice calls do not
  run in the interpreter.

The flag is a constexpr so the branch not taken is never compiled (GPU) nor executed
(interpreter).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1).

    Read at every launch, not at import, so a process that sets the variable late (but
    before importing triton, as Triton itself requires) still gets the portable path.
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_hw_popcount() -> bool:
    """Value for the kernels' ``HW_POPC`` constexpr."""
    return not interpreting()


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton uses the current CUDA device, not the tensor's)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def popcount64_swar(x):
    """Popcount of each int64/uint64 element as int32, without libdevice.

    Works on uint64 so that right shifts are logical (an arithmetic shift would smear the
    sign bit). The final byte sums use shifts and adds instead of the usual multiply by
    0x0101..., so nothing relies on wrapping multiplication.
    """
    v = x.to(tl.uint64, bitcast=True)
    v = v - ((v >> 1) & 0x5555555555555555)
    v = (v & 0x3333333333333333) + ((v >> 2) & 0x3333333333333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0F
    v = v + (v >> 8)
    v = v + (v >> 16)
    v = v + (v >> 32)
    return (v & 0x7F).to(tl.int32)


@triton.jit
def popcount64(x, HW_POPC: tl.constexpr):
    """Popcount of each int64 element as int32: hardware on GPU, SWAR in the interpreter."""
    if HW_POPC:
        return libdevice.popc(x.to(tl.int64, bitcast=True))
    else:
        return popcount64_swar(x)
