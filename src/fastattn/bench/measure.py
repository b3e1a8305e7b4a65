"""Timing, peak memory, machine limits and machine description for the benchmark sweeps.

Two timers share one summary: :func:`time_fn` (CPU wall clock) and :func:`time_fn_cuda`
(``triton.testing.do_bench``: CUDA events, L2 flushed before every run); :func:`timer_for`
picks by device, and the sweeps take the timer as an argument so tests can drive the
plumbing on CPU.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

Timer = Callable[..., Dict[str, float]]


def summarize(samples_s: List[float]) -> Dict[str, float]:
    """median, p10 and p90 (linear interpolation, as ``torch.quantile`` and ``do_bench``'s
    ``quantiles=[0.5, 0.1, 0.9]``) of latencies in seconds, and their count."""
    if not samples_s:
        raise ValueError("samples_s must hold at least one latency")
    s = sorted(samples_s)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return {"median_s": statistics.median(s), "p10_s": q[0], "p90_s": q[-1], "repeats": len(s)}


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
    return summarize(samples)


def time_fn_cuda(fn: Callable[[], object], *, budget_s: float = 1.0,
                 **_ignored) -> Dict[str, object]:
    """GPU latency of ``fn()`` in seconds by ``triton.testing.do_bench`` (CUDA events around
    each run, L2 cache flushed before each): median, p10 and p90 (``quantiles=[0.5, 0.1,
    0.9]``, interpolated as :func:`summarize` does). ``budget_s`` is do_bench's repetition
    time, a quarter of it warm-up; do_bench does not report its repeat count (None). The
    CPU timer's options are accepted and ignored, so either timer fits the same call."""
    from triton.testing import do_bench
    med, p10, p90 = do_bench(fn, warmup=max(1, int(budget_s * 250)),
                             rep=max(1, int(budget_s * 1000)), quantiles=[0.5, 0.1, 0.9])
    return {"median_s": med * 1e-3, "p10_s": p10 * 1e-3, "p90_s": p90 * 1e-3, "repeats": None}


def require_device(device: str) -> None:
    """Raise ``SystemExit`` with what to do when ``device`` cannot run here."""
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch "
                             f"(torch {torch.__version__}, built with CUDA "
                             f"{torch.version.cuda}); run on a GPU machine with a CUDA build "
                             "of torch, or use --device cpu")
        try:
            importlib.import_module("triton.testing")
        except ImportError as exc:
            raise SystemExit(f"--device cuda times with triton.testing.do_bench: {exc}; "
                             "pip install 'fastattn[triton]'") from exc


def timer_for(device: str) -> Timer:
    return time_fn_cuda if device == "cuda" else time_fn


# --------------------------------------------------------------------------- memory

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


def peak_extra_bytes_cuda(fn: Callable[[], object]) -> int:
    """Peak CUDA memory ``fn()`` allocates on top of what is allocated when it starts
    (``torch.cuda.max_memory_allocated``: the caching allocator's view, what a user sizes
    a batch by)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    del result
    return max(torch.cuda.max_memory_allocated() - before, 0)


def peak_memory_for(device: str) -> Callable[[Callable[[], object]], Optional[int]]:
    return peak_extra_bytes_cuda if device == "cuda" else peak_extra_bytes


def available_bytes(device: str) -> Optional[int]:
    """Memory a new point may use: free CUDA memory, or the kernel's MemAvailable (which
    counts reclaimable cache). None where it cannot be read."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- machine limits

def _best_s(timer: Timer, fn: Callable[[], object], budget_s: float = 0.5) -> float:
    """A ceiling is what the machine reaches at its best: the fast decile (p10) of the
    samples, so a neighbour's burst of load during the measurement does not lower it."""
    return timer(fn, warmup=2, min_repeat=10, budget_s=budget_s)["p10_s"]


def memory_bandwidth_gbs(device: str = "cpu", nbytes: int = 1 << 28,
                         timer: Optional[Timer] = None) -> float:
    """Measured copy bandwidth of this machine in GB/s (bytes read + written per second) at
    torch's thread count: a ``copy_`` of ``nbytes`` fp32, far larger than any cache, at its
    fast decile."""
    timer = timer or timer_for(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_s(timer, lambda: dst.copy_(src)) / 1e9


def matmul_gflops(device: str = "cpu", n: int = 1024, timer: Optional[Timer] = None) -> float:
    """Measured fp32 GEMM rate, GFLOP/s: ``torch.mm`` of two (n, n) matrices (2n³ flops), the
    compute ceiling the dense baselines run against."""
    timer = timer or timer_for(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    return 2 * n ** 3 / _best_s(timer, lambda: torch.mm(a, b)) / 1e9


def _popcount_limit_fn():
    """The C++ XOR+popcount micro-kernel (``fastattn._C.popcount_limit``) and the ISAs it
    runs here, fastest first; (None, []) without the C++ extension."""
    try:
        from .. import _C
    except ImportError:
        return None, []
    return _C.popcount_limit, list(_C.popcount_limit_isas())


def popcount_gwords(isa: Optional[str] = None, timer: Optional[Timer] = None,
                    n: int = 8192, nq: int = 1024) -> Optional[float]:
    """Measured CPU XOR+popcount rate, 64-bit words per second / 1e9, of a dedicated
    micro-kernel, never of a product kernel.

    How: ``fastattn._C.popcount_limit`` (csrc/limits.cpp) XOR+popcounts ``nq`` 256-bit
    queries against ``n`` keys laid out word-major (8 keys per zmm, 4 per ymm), 4 queries
    register-blocked per key load, keeping only a running minimum: no stores, no selection,
    no branches. The keys (256 KiB) stay in L2, so memory is not the limit. Threads split
    the queries (torch's thread count). Counted: nq·n·4 words, at the fast decile.
    ``isa`` picks the path (``avx512``: VPOPCNTQ; ``avx2``: VPSHUFB nibble tables + VPSADBW;
    ``popcnt``; ``default``); None takes the fastest this CPU allows (capped by
    FASTATTN_CPU_ISA, like the kernels). None without the C++ extension or the ISA.
    """
    fn, isas = _popcount_limit_fn()
    if fn is None or not isas:
        return None
    isa = isa or isas[0]
    if isa not in isas:
        return None
    timer = timer or time_fn
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(-2**63, 2**63 - 1, (n, 4), dtype=torch.int64, generator=g).numpy()
    q = torch.randint(-2**63, 2**63 - 1, (nq, 4), dtype=torch.int64, generator=g).numpy()
    threads = torch.get_num_threads()
    t = _best_s(timer, lambda: fn(keys, q, isa, threads), budget_s=0.4)
    return nq * n * 4 / t / 1e9


def popcount_gwords_cuda(timer: Optional[Timer] = None, n: int = 1 << 20,
                         nq: int = 256) -> Optional[float]:
    """Measured GPU XOR+popcount rate, 64-bit words per second / 1e9, of the Triton
    micro-kernel ``fastattn.kernels.triton.limits.popcount_limit`` (hardware ``popc``): ``n``
    keys held in registers, each XOR+popcounted against ``nq`` queries with a running
    minimum only (n·nq·4 words; the 32 MiB of keys are read once, so HBM is not the
    limit). None without Triton."""
    try:
        from ..kernels.triton.limits import popcount_limit
    except ImportError:
        return None
    timer = timer or time_fn_cuda
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(-2**63, 2**63 - 1, (n, 4), dtype=torch.int64, generator=g).cuda()
    q = torch.randint(-2**63, 2**63 - 1, (nq, 4), dtype=torch.int64, generator=g).cuda()
    return n * nq * 4 / _best_s(timer, lambda: popcount_limit(keys, q)) / 1e9


def popcount_isa() -> Optional[str]:
    """The ISA :func:`popcount_gwords` measures by default (the fastest allowed here)."""
    return (_popcount_limit_fn()[1] or [None])[0]


def machine_limits(device: str, timer: Optional[Timer] = None) -> Dict[str, Optional[float]]:
    """The ceilings the roofline is drawn against, each from a dedicated micro-benchmark,
    measured once per run (about 3 s): copy bandwidth (``copy_`` of 256 MiB; HBM on a
    GPU), fp32 GEMM (``torch.mm``), the XOR+popcount rate (``popcount_gwords_per_s``, the
    roofline's: on CPU at the fastest ISA, on a GPU with hardware popc) and on CPU also the
    AVX2 path's (``popcount_avx2_gwords_per_s``, where AVX2 is allowed)."""
    timer = timer or timer_for(device)
    limits = {"mem_bandwidth_gbs": memory_bandwidth_gbs(device, timer=timer),
              "matmul_gflops": matmul_gflops(device, timer=timer),
              "popcount_gwords_per_s": (popcount_gwords() if device == "cpu"
                                        else popcount_gwords_cuda(timer))}
    if device == "cpu":
        limits["popcount_avx2_gwords_per_s"] = (limits["popcount_gwords_per_s"]
                                                if popcount_isa() == "avx2"
                                                else popcount_gwords("avx2"))
    return limits


# --------------------------------------------------------------------------- description

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


def _run(cmd: List[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=10,
                              cwd=os.path.dirname(__file__)).stdout.strip() or None
    except Exception:  # noqa: BLE001 - a missing tool leaves the field empty
        return None


def _gpu_info() -> Dict[str, object]:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                   f"--id={torch.cuda.current_device()}"])
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_driver": driver, "cuda": torch.version.cuda}


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
        "fastattn_commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        "backends": backends()["available"],
        "popcount_isa": popcount_isa(),  # the path limits.popcount_gwords_per_s measures
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info.update(_gpu_info())
    return info


def machine_label(meta: Dict[str, object]) -> str:
    """One line naming the machine a figure comes from (the GPU when it ran on one)."""
    where = meta.get("gpu") or meta["host_cpu"]
    extra = (f", driver {meta.get('gpu_driver')}, CUDA {meta.get('cuda')}" if meta.get("gpu")
             else f", {meta['threads']} threads")
    return (f"{where}{extra}, torch {meta['torch']}, commit {meta['fastattn_commit']}, "
            f"{meta.get('date', '')}")
