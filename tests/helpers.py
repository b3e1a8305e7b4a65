"""Test helpers: random signatures with controllable tie density, tolerance table."""
import torch

# DESIGN.md §6
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
}


def random_sigs(*shape, nbits=None, generator=None):
    """int64 signature words; with ``nbits`` < 64·W only the low nbits are random (ties)."""
    words = torch.randint(-2**63, 2**63 - 1, shape, dtype=torch.int64, generator=generator)
    if nbits is not None:
        W = shape[-1]
        mask = torch.zeros(W, dtype=torch.int64)
        for j in range(nbits):
            mask[j // 64] |= (1 << (j % 64)) if j % 64 < 63 else -(2**63)
        words = words & mask
    return words
