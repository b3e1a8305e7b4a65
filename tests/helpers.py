"""Test helpers: random signatures with controllable tie density, tolerance table, and
host-seeded random draws on another default device."""
import torch
from torch.overrides import TorchFunctionMode

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


class HostSeededDraws(TorchFunctionMode):
    """Random factories seeded by a CPU ``torch.Generator`` draw on the host, then move to
    ``device``.

    Tests seed their data with ``torch.Generator()`` (CPU) and build tensors on the default
    device, which the backend fixtures make CUDA for Triton on a GPU machine. There, a
    factory without ``device=`` would draw on CUDA and refuse the CPU generator ("Expected a
    'cuda' device type for generator"); under this mode it draws the same numbers as on
    the CPU and moves them. Calls with an explicit device, or with no generator, are left
    alone (the default device still applies to them)."""

    FACTORIES = frozenset({torch.rand, torch.randn, torch.randint, torch.randperm})

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")   # (None first: ops in compiled code take no generator)
        if (gen is not None and func in self.FACTORIES and gen.device.type == "cpu"
                and kwargs.get("device") is None):
            return func(*args, **{**kwargs, "device": "cpu"}).to(self.device)
        return func(*args, **kwargs)
