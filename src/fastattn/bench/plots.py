"""Plots of the sweeps: latency, speed-up over the baseline, and peak memory."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_sweep(sweep, rows, meta, path: str) -> None:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    panels = 3 if sweep.memory else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    for impl in impls:
        rs = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r[sweep.x])
        xs = [r[sweep.x] for r in rs]
        axes[0].plot(xs, [r["median_s"] * 1e3 for r in rs], marker="o", label=impl)
        axes[1].plot(xs, [r["speedup"] for r in rs], marker="o", label=impl)
        if sweep.memory:
            mem = [(r[sweep.x], r["peak_extra_bytes"] / 2**20) for r in rs
                   if r.get("peak_extra_bytes") is not None]
            if mem:
                axes[2].plot(*zip(*mem), marker="o", label=impl)
    axes[0].set(ylabel="median latency (ms)", yscale="log")
    axes[1].set(ylabel="speed-up vs baseline (x)", yscale="log")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    if sweep.memory:
        axes[2].set(ylabel="peak extra memory (MiB)", yscale="symlog")
    for ax in axes:
        ax.set(xlabel=sweep.x, xscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{sweep.title}\n{meta['host_cpu']}, {meta['threads']} threads, torch "
                 f"{meta['torch']}, commit {meta['fastattn_commit']}: `{meta['command']}`",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
