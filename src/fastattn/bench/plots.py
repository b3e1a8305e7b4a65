"""Plots of the sweeps: latency with its p10–p90 band, speed-up over the baseline and peak
memory; and, for the roofline sweeps, throughput against the machine's measured limits.
Every figure is stamped with the machine and the command that produced it."""
from __future__ import annotations

from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .measure import machine_label  # noqa: E402


def _series(rows: List[dict], x: str) -> Dict[str, List[dict]]:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    return {i: sorted((r for r in rows if r["impl"] == i), key=lambda r: r[x]) for i in impls}


def _finish(fig, axes, sweep, meta, path: str, title: str) -> None:
    for ax in axes:
        ax.set(xlabel=sweep.x, xscale="log")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{title}\n{machine_label(meta)}: `{meta['command']}`", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(sweep, rows, meta, path: str) -> None:
    panels = 3 if sweep.memory else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    for impl, rs in _series(rows, sweep.x).items():
        xs = [r[sweep.x] for r in rs]
        line, = axes[0].plot(xs, [r["median_s"] * 1e3 for r in rs], marker="o", label=impl)
        axes[0].fill_between(xs, [r["p10_s"] * 1e3 for r in rs], [r["p90_s"] * 1e3 for r in rs],
                             color=line.get_color(), alpha=0.2, lw=0)
        sp = [(r[sweep.x], r["speedup"]) for r in rs if r.get("speedup")]
        if sp:
            axes[1].plot(*zip(*sp), marker="o", label=impl)
        if sweep.memory:
            mem = [(r[sweep.x], r["peak_extra_bytes"] / 2**20) for r in rs
                   if r.get("peak_extra_bytes") is not None]
            if mem:
                axes[2].plot(*zip(*mem), marker="o", label=impl)
    axes[0].set(ylabel="latency (ms): median, p10–p90 band", yscale="log")
    base = sweep.baseline if sweep.baseline_of is None else "its own baseline"
    axes[1].set(ylabel=f"speed-up vs {base} (x)", yscale="log")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    if sweep.memory:
        axes[2].set(ylabel="peak extra memory (MiB)", yscale="symlog")
    axes[0].legend(fontsize=8)
    _finish(fig, axes, sweep, meta, path, f"{sweep.title} [{sweep.device}]")


def plot_roofline(sweep, rows, meta, path: str) -> None:
    """Left: behaviours/s per implementation (solid) and the bound its byte, popcount and
    flop counts allow on this machine (dashed; implementations with the same cost model
    share one line). Right: the percentage of that bound each reaches."""
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.6))
    bounds: Dict[tuple, List[str]] = {}     # one dashed line per distinct bound curve
    for impl, rs in _series(rows, sweep.x).items():
        rs = [r for r in rs if r.get("behaviours_per_s")]
        if not rs:
            continue
        xs = [r[sweep.x] for r in rs]
        line, = axes[0].plot(xs, [r["behaviours_per_s"] for r in rs], marker="o", label=impl)
        bound = tuple((r[sweep.x], r["bound_behaviours_per_s"], r["bound_by"]) for r in rs
                      if r.get("bound_behaviours_per_s"))
        if bound:
            bounds.setdefault(bound, []).append(impl)
            axes[1].plot([b[0] for b in bound], [r["pct_of_bound"] for r in rs
                                                 if r.get("bound_behaviours_per_s")],
                         marker="o", color=line.get_color(), label=impl)
    for i, (bound, impls) in enumerate(bounds.items()):
        bx, by, kind = zip(*bound)
        axes[0].plot(bx, by, ls=("--", ":", "-.")[i % 3], color="black", lw=1,
                     label=f"bound ({'/'.join(dict.fromkeys(kind))}): {', '.join(impls)}")
    lim = meta.get("limits") or {}
    notes = [f"memory {lim['mem_bandwidth_gbs']:.1f} GB/s" if lim.get("mem_bandwidth_gbs")
             else None,
             f"popcount {lim['popcount_gwords_per_s']:.1f} Gword/s"
             if lim.get("popcount_gwords_per_s") else None,
             f"fp32 GEMM {lim['matmul_gflops']:.0f} GFLOP/s" if lim.get("matmul_gflops")
             else None]
    axes[0].set(ylabel="behaviours / s", yscale="log",
                title="measured limits: " + ", ".join(n for n in notes if n))
    axes[0].title.set_fontsize(8)
    axes[1].set(ylabel="% of the bound", ylim=(0, None))
    axes[1].axhline(100, color="grey", lw=0.8)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    _finish(fig, axes, sweep, meta, path, f"{sweep.title} [{sweep.device}]: roofline")
