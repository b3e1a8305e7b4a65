"""``fastattn-bench``: profile the fastattn kernels against their baselines.

Runs the sweeps of :mod:`fastattn.bench.sweeps`, prints a table per sweep and writes
``<out>/<sweep>.csv``, ``<out>/<sweep>.json`` (rows + machine description + command) and
``<out>/<sweep>.png``. Every speed-up is a ratio measured in the same run.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import shlex
import sys
import time
from typing import Dict, List

import torch

from .measure import machine_info, peak_extra_bytes, time_fn
from .sweeps import SWEEPS, Sweep, select


def run_sweep(sweep: Sweep, budget_s: float, progress) -> List[Dict[str, object]]:
    rows = []
    for point in sweep.points:
        impls = point.build()
        timings = {}
        for name, fn in impls.items():
            progress.set_postfix_str(f"{sweep.name} {point.params} {name}")
            t = time_fn(fn, budget_s=budget_s)
            row = {"sweep": sweep.name, "impl": name, **point.params, **t}
            row["pairs_per_s"] = point.pairs / t["median_s"] if point.pairs else None
            if sweep.memory:
                gc.collect()
                row["peak_extra_bytes"] = peak_extra_bytes(fn)
            timings[name] = t["median_s"]
            rows.append(row)
        for row in rows[-len(impls):]:
            row["baseline"] = sweep.baseline_for(row["impl"])
            base = timings.get(row["baseline"])
            row["speedup"] = base / row["median_s"] if base else None
        del impls
        gc.collect()
        progress.update(1)
    return rows


def print_table(sweep: Sweep, rows: List[Dict[str, object]]) -> None:
    xs = sorted({r[sweep.x] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cell = {(r["impl"], r[sweep.x]): r for r in rows}
    print(f"\n{sweep.title}\nmedian ms (speed-up vs {sweep.baseline})")
    print(f"{'impl':<24}" + "".join(f"{sweep.x + '=' + str(x):>22}" for x in xs))
    for impl in impls:
        line = f"{impl:<24}"
        for x in xs:
            r = cell.get((impl, x))
            line += f"{'-':>22}" if r is None else \
                f"{r['median_s'] * 1e3:>12.2f} ({r['speedup'] or 0:>6.2f}x)"
        print(line)


def markdown(path: str) -> str:
    """A README table from a results JSON: median ms and speed-up per implementation and x."""
    with open(path) as f:
        data = json.load(f)
    rows, x = data["rows"], data["x"]
    xs = sorted({r[x] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cell = {(r["impl"], r[x]): r for r in rows}
    m = data["machine"]
    out = [f"**{data['title']}** — median ms (speed-up vs "
           f"{', '.join(sorted({r['baseline'] for r in rows}))})", "",
           "| impl | " + " | ".join(f"{x}={v}" for v in xs) + " |",
           "|---|" + "---:|" * len(xs)]
    for impl in impls:
        cells = []
        for v in xs:
            r = cell.get((impl, v))
            cells.append("–" if r is None else
                         f"{r['median_s'] * 1e3:.2f} ({r['speedup']:.2f}×)" if r["speedup"]
                         else f"{r['median_s'] * 1e3:.2f}")
        out.append(f"| {impl} | " + " | ".join(cells) + " |")
    out += ["", f"<sub>{m['host_cpu']}, {m['threads']} threads, torch {m['torch']}, commit "
            f"{m['fastattn_commit']}, {m.get('date', '')}: `{m['command']}`</sub>", ""]
    return "\n".join(out)


def write_results(out_dir: str, sweep: Sweep, rows, meta) -> None:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, sweep.name)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with open(base + ".json", "w") as f:
        json.dump({"sweep": sweep.name, "title": sweep.title, "x": sweep.x,
                   "baseline": sweep.baseline, "machine": meta, "rows": rows}, f, indent=1)
    try:
        from .plots import plot_sweep
    except ImportError:  # matplotlib missing: tables and data still written
        return
    plot_sweep(sweep, rows, meta, base + ".png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastattn-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results", help="directory for CSV/JSON/PNG")
    p.add_argument("--sweeps", nargs="*", choices=list(SWEEPS), help="default: all")
    p.add_argument("--quick", action="store_true", help="fewer points (about 2 minutes)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of repeats per measurement (default 1.0, quick 0.3)")
    p.add_argument("--markdown", action="store_true",
                   help="print the results already in --out as markdown tables, run nothing")
    args = p.parse_args(argv)
    if args.markdown:
        for name in args.sweeps or list(SWEEPS):
            path = os.path.join(args.out, name + ".json")
            if os.path.exists(path):
                print(markdown(path))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget or (0.3 if args.quick else 1.0)
    meta = machine_info("cpu")
    meta["command"] = "fastattn-bench " + " ".join(shlex.quote(a) for a in
                                                   (argv if argv is not None else sys.argv[1:]))
    meta["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    sweeps = select(args.sweeps, args.quick)
    from tqdm.auto import tqdm
    total = sum(len(s.points) for s in sweeps)
    print(f"fastattn-bench on {meta['host_cpu']} with {meta['threads']} threads; "
          f"backends {meta['backends']}")
    with tqdm(total=total, unit="point", file=sys.stderr) as progress:
        results = [(s, run_sweep(s, budget, progress)) for s in sweeps]
    for sweep, rows in results:
        print_table(sweep, rows)
        write_results(args.out, sweep, rows, meta)
    print(f"\nwrote {', '.join(s.name for s in sweeps)} (.csv/.json/.png) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
