"""Timing, peak-memory and machine description for the benchmark sweeps."""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, Optional

import torch


def time_fn(fn: Callable[[], object], *, warmup: int = 1, min_repeat: int = 3,
            max_repeat: int = 50, budget_s: float = 1.0) -> Dict[str, float]:
    """Wall-clock latency of ``fn()`` in seconds: median, p10, p90 over the repeats.

    Repeats until ``budget_s`` is spent (at least ``min_repeat``, at most ``max_repeat``
    runs), so fast kernels get many samples and slow baselines few.
    """
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        if time.perf_counter() - t0 > budget_s:   # a slow baseline: a few samples suffice
            min_repeat = 1
    samples = []
    start = time.perf_counter()
    while len(samples) < max_repeat and (len(samples) < min_repeat
                                         or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 \
        else [samples[0]] * 9
    return {"median_s": statistics.median(samples), "p10_s": q[0], "p90_s": q[-1],
            "repeats": len(samples)}


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak resident memory ``fn()`` adds on top of what is resident when it starts.

    Linux only: returns freed heap pages to the kernel (glibc ``malloc_trim``; otherwise
    memory freed by earlier runs stays resident and hides the call's own peak), resets the
    high-water mark through /proc/self/clear_refs, runs ``fn`` once and reads VmHWM.
    Returns None where that is not possible.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    result = fn()
    peak = _status_kb("VmHWM")
    del result
    if before is None or peak is None:
        return None
    return max(peak - before, 0) * 1024


def memory_bandwidth_gbs(nbytes: int = 1 << 28) -> float:
    """Measured copy bandwidth (read + write) of this machine, GB/s, at torch's thread count."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=2, min_repeat=5, budget_s=0.5)["median_s"]
    return 2 * nbytes / t / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list:
    wanted = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq", "popcnt", "fma",
              "avx512_bf16", "amx_tile"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(wanted & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - report what is importable, nothing more
        return None


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True,
                              cwd=os.path.dirname(__file__)).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def machine_info(device: str = "cpu") -> Dict[str, object]:
    """Everything a reader needs to reproduce or compare a figure."""
    from .. import backends
    info = {
        "host_cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numba": _version("numba"),
        "faiss": _version("faiss"),
        "fastattn_commit": _git_commit(),
        "backends": backends()["available"],
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
