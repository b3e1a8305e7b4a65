"""The C++ kernels allocate their per-thread scratch before entering an OpenMP region: an
allocation failure must reach Python as MemoryError, not end the process in std::terminate
(an exception cannot leave an OpenMP region)."""
import os
import subprocess
import sys

import pytest

# Runs one kernel call once (threads and malloc arenas exist afterwards, the scratch is freed
# again), then caps the address space 8 MiB above what is mapped, so that the second call's
# scratch (tens of MiB per thread) cannot be allocated. The outputs are allocated before the
# cap: only the kernel's own allocations can fail.
SCRIPT = r"""
import resource, sys
import numpy as np
from fastattn import _C

def vm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

what, topk = sys.argv[1], int(sys.argv[2])
L, B = 2_000_000, 2
if what == "hamming_topk":      # training layout: no shared tile, per-thread scratch O(L)
    q = np.zeros((B, 1), np.int64); k = np.zeros((B, L, 1), np.int64)
    lengths = np.full(B, L, np.int64); hist = np.arange(B, dtype=np.int64)
    dist = np.empty((B, topk), np.int32); idx = np.empty((B, topk), np.int64)
    call = lambda: _C.hamming_topk(q, k, lengths, hist, topk, dist, idx, 2)
else:                           # topk_attention_fwd: per-thread scratch O(K H)
    q = np.zeros((B, 1, 1), np.float32); kv = np.zeros((1, 1, 1, 1), np.float32)
    idx = np.full((B, topk), -1, np.int64); hist = np.zeros(B, np.int64)
    out = np.empty((B, 1, 1), np.float32); lse = np.empty((B, 1), np.float32)
    call = lambda: _C.topk_attention_fwd(q, kv, kv, idx, hist, 1.0, out, lse, 2)
call()
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (8 << 20), resource.RLIM_INFINITY))
try:
    call()
    print("ran")
except MemoryError:
    print("MemoryError")
"""


@pytest.mark.parametrize("what,topk,isa", [
    # AVX-512 TileWorker: keys come in 16k chunks, so its distance buffers stay small; a
    # large k makes its selection buffers the allocation that fails
    ("hamming_topk", 100_000, "avx512"),
    ("hamming_topk", 2_000_000, "popcnt"),  # portable TopkSelector (buffer up to L entries)
    ("topk_attention_fwd", 2_000_000, "avx512"),
])
def test_scratch_allocation_failure_raises_memory_error(what, topk, isa):
    from conftest import _require
    _require("cpp")
    assert sys.platform.startswith("linux"), "RLIMIT_AS and /proc are Linux's"
    env = dict(os.environ, FASTATTN_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", SCRIPT, what, str(topk)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip() == "MemoryError", out.stdout
