"""Machine-limit micro-kernel for the GPU roofline (``fastattn.bench.measure``): the XOR+popcount
throughput of the device, the counterpart of csrc/limits.cpp. Never a product kernel.

Each program keeps BLOCK_L keys of 4 words in registers (loaded once) and XOR+popcounts them
against every query, keeping only a running minimum per key: no selection, no stores but one
per key at the end. Work: n * nq * 4 words.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import device_guard, popcount64, use_hw_popcount


@triton.jit
def _popcount_limit_kernel(keys_ptr, q_ptr, out_ptr, n, nq, BLOCK_L: tl.constexpr,
                           HW_POPC: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    valid = offs < n
    k0 = tl.load(keys_ptr + offs * 4, mask=valid, other=0)
    k1 = tl.load(keys_ptr + offs * 4 + 1, mask=valid, other=0)
    k2 = tl.load(keys_ptr + offs * 4 + 2, mask=valid, other=0)
    k3 = tl.load(keys_ptr + offs * 4 + 3, mask=valid, other=0)
    best = tl.full([BLOCK_L], 1 << 20, tl.int32)
    for i in range(nq):
        d = (popcount64(k0 ^ tl.load(q_ptr + i * 4), HW_POPC)
             + popcount64(k1 ^ tl.load(q_ptr + i * 4 + 1), HW_POPC)
             + popcount64(k2 ^ tl.load(q_ptr + i * 4 + 2), HW_POPC)
             + popcount64(k3 ^ tl.load(q_ptr + i * 4 + 3), HW_POPC))
        best = tl.minimum(best, d)
    tl.store(out_ptr + offs, best, mask=valid)


def popcount_limit(keys: torch.Tensor, q: torch.Tensor, BLOCK_L: int = 256) -> torch.Tensor:
    """keys (n, 4) and q (nq, 4) int64 (256-bit signatures, contiguous, same device) ->
    (n,) int32: each key's smallest distance to any query."""
    if keys.dim() != 2 or keys.shape[1] != 4 or q.dim() != 2 or q.shape[1] != 4:
        raise ValueError(f"keys (n, 4) and q (nq, 4) hold 256-bit signatures, got "
                         f"{tuple(keys.shape)} and {tuple(q.shape)}")
    n = keys.shape[0]
    out = torch.empty(n, dtype=torch.int32, device=keys.device)
    if n:
        with device_guard(keys):
            _popcount_limit_kernel[(triton.cdiv(n, BLOCK_L),)](
                keys.contiguous(), q.contiguous(), out, n, q.shape[0], BLOCK_L=BLOCK_L,
                HW_POPC=use_hw_popcount(), num_warps=4)
    return out
