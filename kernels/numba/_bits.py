"""Bit-level helpers shared by the numba kernels.

numba has no popcount builtin, and a Python-level SWAR bit count is ~12 instructions per word
that LLVM does not always fold back into ``popcnt``. ``popcount64`` below is an intrinsic that
emits ``llvm.ctpop`` directly, so LLVM lowers it to the hardware ``popcnt`` instruction (numba
compiles for the host CPU), and vectorises it (``vpopcntq`` on AVX-512 VPOPCNTDQ, a nibble
lookup on AVX2) when it sits in a simple loop.

``bits_to_f64`` reinterprets the bits of an int64 as a float64 (an LLVM bitcast, no
memory round trip), so that a float can be built from its exponent bits inside loops LLVM
vectorises (the MIMN kernels' exp).

``prefetch`` emits ``llvm.prefetch`` (a ``prefetcht0``), for loops whose loads go to
data-dependent addresses the hardware prefetcher cannot guess (hash-table probes).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["popcount64", "prefetch", "bits_to_f64"]


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


@intrinsic
def bits_to_f64(typingctx, x):
    """The float64 whose bit pattern is the int64 x (callable from @njit only)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None

    sig = types.float64(x)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@intrinsic
def prefetch(typingctx, a, i):
    """Hint the cache line holding a[i] into L1 (callable from @njit only).

    a is a 1-D array, i an integer; nothing is read, and an i out of bounds is harmless
    (a prefetch never faults), though callers keep it in range anyway.
    """
    if not (isinstance(a, types.Array) and a.ndim == 1 and isinstance(i, types.Integer)):
        return None

    sig = types.void(a, i)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, value=args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [idx]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [ptr.type], fnty)
        # (address, rw = 0 read, locality = 3 keep in all levels, cache type = 1 data)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen
