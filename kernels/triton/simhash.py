"""SimHash signatures: bit j of row n is 1 iff (x @ planes)[n, j] > 0 (DESIGN.md §4).

One program computes BLOCK_N rows × one 64-bit word (64 hyperplanes), looping over D.
The projection is accumulated in fp32 with ``tl.dot`` (fp32 inputs use
``input_precision="ieee"``: TF32 would round the projections to ~1e-3 and flip bits far
outside the 1e-5 agreement zone), or in fp64 for fp64 inputs through an explicit
broadcast-multiply-sum, since ``tl.dot`` does not take fp64 operands everywhere.

Packing: bit j of the word is set by adding (bit << j). The 64 addends are distinct powers
of two, so the int64 sum equals the bitwise OR (bit 63 contributes -2**63 with no overflow).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import device_guard, interpreting, next_pow2

__all__ = ["simhash_sign"]


@triton.jit
def _simhash_kernel(x_ptr, rows_ptr, p_ptr, out_ptr, N, D, NB,
                    W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    FP64: tl.constexpr, HALF_DOT: tl.constexpr, GATHER: tl.constexpr):
    pid_n = tl.program_id(0)
    word = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_b = tl.arange(0, 64)
    cols = word * 64 + offs_b                          # hyperplane (bit) indices
    mask_n = offs_n < N
    mask_c = cols < NB
    if GATHER:          # output row n signs table row rows[n]
        src = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    else:
        src = offs_n

    if FP64:
        acc = tl.zeros((BLOCK_N, 64), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, 64), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        # Masked lanes load 0 and add nothing to the projection.
        xt = tl.load(x_ptr + src[:, None] * D + offs_d[None, :],
                     mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        pt = tl.load(p_ptr + offs_d[:, None].to(tl.int64) * NB + cols[None, :],
                     mask=mask_d[:, None] & mask_c[None, :], other=0.0)
        if FP64:
            acc += tl.sum(xt[:, :, None] * pt[None, :, :], axis=1)
        else:
            if HALF_DOT:
                # Half-precision operands on tensor cores: the products are exact in
                # fp32 and the accumulation is fp32, as in the reference.
                acc = tl.dot(xt, pt, acc)
            else:
                # fp32 inputs, or half inputs under the interpreter (which stores bf16 as
                # raw uint16 and cannot feed it to its matmul): exact fp32 dot.
                acc = tl.dot(xt.to(tl.float32), pt.to(tl.float32), acc,
                             input_precision="ieee")

    # NaN > 0 is False, so NaN projections give 0 bits; padded columns are forced to 0.
    bits = ((acc > 0) & mask_c[None, :]).to(tl.int64)
    packed = tl.sum(bits << offs_b[None, :].to(tl.int64), axis=1)
    tl.store(out_ptr + offs_n * W + word, packed, mask=mask_n)


def simhash_sign(x: torch.Tensor, planes: torch.Tensor, rows=None) -> torch.Tensor:
    """x (N, D), planes (D, NB) float -> (N, W) int64 signatures, W = ceil(NB / 64); with
    ``rows`` (M,) int64 in [0, N) (checked by the caller), the (M, W) signatures of x[rows].

    fp32 / fp64 as in the C++ backend; fp16 / bf16 also work (fp32 accumulation). Mixed
    dtypes are promoted to the accumulation dtype of reference.simhash_sign.
    """
    D = x.shape[1]
    N = x.shape[0] if rows is None else rows.shape[0]
    NB = planes.shape[1]
    W = (NB + 63) // 64
    out = torch.empty((N, W), dtype=torch.int64, device=x.device)
    if N == 0 or W == 0:
        return out
    if D == 0:                                  # empty dot product: 0 > 0 is False
        return out.zero_()
    fp64 = x.dtype == torch.float64 or planes.dtype == torch.float64
    if x.dtype != planes.dtype or x.dtype not in (torch.float32, torch.float64,
                                                  torch.float16, torch.bfloat16):
        acc = torch.float64 if fp64 else torch.float32
        x, planes = x.to(acc), planes.to(acc)
    x, planes = x.contiguous(), planes.contiguous()
    half = x.dtype in (torch.float16, torch.bfloat16)
    if fp64:
        # CUDA-core fp64 FMA: the (BLOCK_N, BLOCK_D, 64) product lives in registers.
        BLOCK_N, BLOCK_D, warps = 16, 8, 4
    else:
        # tl.dot needs every tile dim >= 16. The exact fp32 dot runs on FMA units with its
        # operands in registers: a 32-deep D slice keeps it spill-free at 4 warps; half
        # inputs go to tensor cores and take 64.
        BLOCK_N = max(16, min(64, next_pow2(N)))
        BLOCK_D = max(16, min(64 if half else 32, next_pow2(D)))
        warps = 4
    grid = (triton.cdiv(N, BLOCK_N), W)
    with device_guard(x):
        _simhash_kernel[grid](x, out if rows is None else rows.contiguous(), planes, out, N, D,
                              NB, W=W, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, FP64=fp64,
                              HALF_DOT=half and not interpreting(), GATHER=rows is not None,
                              num_warps=warps)
    return out
