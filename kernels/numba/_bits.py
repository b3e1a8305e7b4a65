"""Bit-level helpers shared by the numba kernels.

numba has no popcount builtin, and a Python-level SWAR bit count is ~12 instructions per word
that LLVM does not always fold back into ``popcnt``. ``popcount64`` below is an intrinsic that
emits ``llvm.ctpop`` directly, so LLVM lowers it to the hardware ``popcnt`` instruction (numba
compiles for the host CPU), and vectorises it (``vpopcntq`` on AVX-512 VPOPCNTDQ, a nibble
lookup on AVX2) when it sits in a simple loop.
"""
from __future__ import annotations

from numba import types
from numba.extending import intrinsic

__all__ = ["popcount64"]


@intrinsic
def popcount64(typingctx, x):
    """Number of set bits of a 64-bit integer, returned as int64 (callable from @njit only)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None  # typing fails cleanly for anything but (u)int64

    sig = types.int64(x)

    def codegen(context, builder, signature, args):
        # IRBuilder.ctpop declares and calls the llvm.ctpop.i64 intrinsic; the result has the
        # operand's type (i64), which is already the return type for both int64 and uint64.
        return builder.ctpop(args[0])

    return sig, codegen
