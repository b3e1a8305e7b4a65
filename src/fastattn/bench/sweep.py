"""What a benchmark sweep is: :class:`Sweep` (a name, a baseline and a list of points),
:class:`Point` (its inputs, built lazily, and the implementations to time) and
:class:`Cost` (the least work one call must do, for the roofline columns), plus the helpers
every sweep module shares. The sweeps themselves live in :mod:`.sweeps` (kernels),
:mod:`.training_sweeps` and :mod:`.serving_sweeps`; :mod:`.registry` lists them.

Byte models (:class:`Cost`). Each sweep states the least traffic one call must move
between memory and the cores, counted once per distinct datum: inputs read, outputs
written, and intermediates that cannot stay in cache (a materialised (B, L) score matrix, a
backward's re-read of keys and values far larger than any cache). Data reused from cache
(the candidates' queries, a shared history's keys) counts once. Throughput in GB/s is those
bytes over the median latency, and the bandwidth bound is those bytes over the measured
copy bandwidth; the popcount bound is the Hamming scan's B·L·W word XOR+popcounts over the
measured popcount rate, the compute bound the flops over the measured fp32 GEMM rate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from ..backends import available

__all__ = ["F32", "I32", "I64", "Cost", "Point", "Sweep", "backends_for", "torch_skip"]

F32, I32, I64 = 4, 4, 8          # bytes per element


@dataclass
class Cost:
    """The least work one call must do; the roofline bounds throughput by each."""
    bytes: int              # read + written between memory and the cores (module docstring)
    popcounts: int = 0      # 64-bit word XOR+popcounts (the Hamming scan)
    flops: int = 0          # floating-point operations, a multiply-add counting 2


@dataclass
class Point:
    params: Dict[str, int]
    # impl name -> zero-argument callable; built lazily so inputs exist only while measured
    build: Callable[[], Dict[str, Callable[[], object]]]
    # per-behaviour work for throughput: (query, behaviour) pairs processed per call
    pairs: int = 0
    # the most memory building and running the point takes; checked against what is free
    # before building, so a point that does not fit is skipped with a reason, not an OOM
    mem_bytes: int = 0
    # impl -> why it is not measured at this point (it is built, never called)
    skip: Dict[str, str] = field(default_factory=dict)


@dataclass
class Sweep:
    name: str
    title: str
    x: str                      # the swept parameter, plotted on the x axis
    baseline: str               # speed-ups are reported against this implementation
    points: List[Point] = field(default_factory=list)
    memory: bool = False        # also plot the peak memory each call adds
    # impl -> the baseline it is compared with, where that is not ``baseline``
    baseline_of: Optional[Callable[[str], str]] = None
    # (point params, impl) -> the call's Cost, for GB/s and the bounds; None: not modelled
    cost: Optional[Callable[[Dict[str, int], str], Optional[Cost]]] = None
    roofline: bool = False      # also draw <name>_roofline.png
    device: str = "cpu"
    # what a point's ``pairs`` count, when the README should show pairs/s as a rate table
    # (e.g. "samples/s" for a training step over B samples); None: no such table
    rate: Optional[str] = None
    # point params (set by ``Point.build`` when only known from the data) listed under the
    # README tables, e.g. the distinct-row ratio of a batch
    info: List[str] = field(default_factory=list)

    def baseline_for(self, impl: str) -> str:
        return self.baseline_of(impl) if self.baseline_of else self.baseline


def backends_for(device: str) -> List[str]:
    """The fastattn backends compared on ``device`` (compiled ones, then the reference)."""
    names = ["triton"] if device == "cuda" else ["cpp", "numba"]
    return [b for b in names if available(b)] + ["torch"]


def torch_skip(device: str, L: int, limit: int) -> Dict[str, str]:
    # On CPU the oracle materialises (B, L) distances in 64-query chunks: minutes beyond this.
    if device == "cpu" and L > limit:
        return {"torch": f"the torch reference (the oracle) takes minutes on CPU above "
                         f"L={limit}"}
    return {}
