"""``fastattn-bench``: profile the fastattn kernels against their baselines.

Runs the sweeps of :mod:`fastattn.bench.registry` on the CPU or (``--device cuda``) a GPU,
prints a table per sweep and writes ``<out>/<stem>.csv``, ``<out>/<stem>.json`` (rows,
points skipped and why, machine description, measured machine limits and command) and
``<out>/<stem>.png`` (plus ``<stem>_roofline.png`` for the roofline sweeps), where the stem
is the sweep's name, with ``_cuda`` appended for GPU runs. Every speed-up is a ratio
measured in the same run. ``--markdown`` prints (or, with ``--readme``, writes into the
README between its markers) the tables and figures of results already written.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import re
import shlex
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from .measure import (Timer, available_bytes, machine_info, machine_label, machine_limits,
                      peak_memory_for, require_device, timer_for)
from .registry import SWEEPS, select
from .sweep import Cost, Point, Sweep

Row = Dict[str, object]
# What regenerates the README's Performance block from bench/results (no new measurements).
README_COMMAND = "fastattn-bench --markdown --out bench/results --readme README.md"


def markers(device: str = "cpu") -> Tuple[str, str]:
    """The README comments framing the generated block of ``device``'s results."""
    tag = "fastattn-bench" if device == "cpu" else f"fastattn-bench:{device}"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


class StickyDeviceError(RuntimeError):
    """A kernel left the CUDA context unusable (illegal address, device-side assert, ...):
    every later call would fail too, so the run stops, naming the point and the kernel.
    ``rows`` and ``skipped`` hold what the interrupted sweep measured before it."""

    def __init__(self, message: str, rows: List[Row], skipped: List[Row]):
        super().__init__(message)
        self.rows, self.skipped = rows, skipped


def context_broken(device: str) -> bool:
    """After an error on ``device``: True if the CUDA context no longer runs anything (a
    sticky error), False if it was an ordinary exception and later points may still run."""
    if device != "cuda":
        return False
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
        return False
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return True


def _oom_types() -> Tuple[type, ...]:
    # torch.OutOfMemoryError is torch>=2.5's name for the CUDA one
    return (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


def throughput(row: Row, pairs: int, cost: Optional[Cost],
               limits: Optional[Dict[str, Optional[float]]]) -> None:
    """Add behaviours/s, bytes, GB/s and the roofline columns to a timed row.

    ``pct_of_bandwidth`` is achieved GB/s over the measured copy bandwidth; ``bound_by`` is
    the tightest of the memory, popcount and compute floors of the call's :class:`Cost`,
    ``bound_behaviours_per_s`` the throughput that floor allows and ``pct_of_bound`` how
    much of it the call reaches.
    """
    t = row["median_s"]
    row["behaviours_per_s"] = pairs / t if pairs else None
    row.update(bytes=None, gb_per_s=None, pct_of_bandwidth=None, bound_by=None,
               bound_behaviours_per_s=None, pct_of_bound=None)
    if cost is None or not limits or not limits.get("mem_bandwidth_gbs"):
        return
    bw = limits["mem_bandwidth_gbs"] * 1e9
    floors = {"memory": cost.bytes / bw}
    if cost.popcounts and limits.get("popcount_gwords_per_s"):
        floors["popcount"] = cost.popcounts / (limits["popcount_gwords_per_s"] * 1e9)
    if cost.flops and limits.get("matmul_gflops"):
        floors["compute"] = cost.flops / (limits["matmul_gflops"] * 1e9)
    bound_by, floor_s = max(floors.items(), key=lambda kv: kv[1])
    row.update(bytes=cost.bytes, gb_per_s=cost.bytes / t / 1e9,
               pct_of_bandwidth=100 * cost.bytes / t / bw, bound_by=bound_by,
               bound_behaviours_per_s=pairs / floor_s if pairs else None,
               pct_of_bound=100 * floor_s / t)


def _fits(point: Point, device: str) -> Optional[str]:
    """Why ``point`` must be skipped for memory, or None when it fits (80% of what is free:
    the rest is the allocator's and the other processes' margin)."""
    free = available_bytes(device)
    if point.mem_bytes and free is not None and point.mem_bytes > 0.8 * free:
        return (f"needs about {point.mem_bytes / 2**30:.1f} GiB, "
                f"{free / 2**30:.1f} GiB free on {device}")
    return None


def _speedups(sweep: Sweep, point_rows: List[Row]) -> List[Row]:
    """Add each row's baseline and speed-up over it (rows of one point), and return them."""
    timings = {r["impl"]: r["median_s"] for r in point_rows}
    for row in point_rows:
        row["baseline"] = sweep.baseline_for(row["impl"])
        base = timings.get(row["baseline"])
        row["speedup"] = base / row["median_s"] if base else None
    return point_rows


def run_sweep(sweep: Sweep, budget_s: float, progress, *, timer: Optional[Timer] = None,
              limits: Optional[Dict[str, Optional[float]]] = None
              ) -> Tuple[List[Row], List[Row]]:
    """Time every implementation at every point of ``sweep`` on ``sweep.device``.

    Returns (rows, skipped): one row per measured (point, impl) with latency, speed-up,
    throughput and peak-memory columns, and one record per point or impl not measured,
    with the reason (too little memory, an out-of-memory error, or the sweep's own skip).
    An implementation that raises anything else is recorded with ``"error": True`` and the
    exception, and the sweep goes on: one broken kernel must not cost the other figures
    (``main`` then exits non-zero). On CUDA each timed call is synchronised inside its own
    ``try``, so an asynchronous kernel error is charged to the kernel that caused it; if
    the error is sticky (:func:`context_broken`) :class:`StickyDeviceError` ends the run
    instead, since every later point would fail or measure garbage. ``timer`` defaults to
    the device's (:func:`~fastattn.bench.measure.timer_for`).
    """
    device = sweep.device
    timer = timer or timer_for(device)
    peak = peak_memory_for(device)
    rows, skipped = [], []

    def skip(point: Point, impl: Optional[str], reason: str, error: bool = False) -> None:
        skipped.append({"sweep": sweep.name, **point.params, "impl": impl, "reason": reason,
                        **({"error": True} if error else {})})

    for point in sweep.points:
        progress.set_postfix_str(f"{sweep.name} {point.params}")
        reason = _fits(point, device)
        try:
            impls = point.build() if reason is None else {}
        except _oom_types() as exc:
            impls, reason = {}, f"out of memory building the inputs: {exc}"
        if reason is not None:
            skip(point, None, reason)
        point_rows = []
        for name, fn in impls.items():
            if name in point.skip:
                skip(point, name, point.skip[name])
                continue
            progress.set_postfix_str(f"{sweep.name} {point.params} {name}")
            try:
                t = timer(fn, budget_s=budget_s)
                gc.collect()
                mem = peak(fn)
                if device == "cuda":
                    torch.cuda.synchronize()  # an asynchronous error surfaces here, not later
            except _oom_types() as exc:
                skip(point, name, f"out of memory: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - recorded, reported, and fails main
                skip(point, name, f"failed: {exc!r}", error=True)
                if context_broken(device):
                    raise StickyDeviceError(
                        f"{sweep.name} at {point.params}, implementation {name!r}: {exc!r} "
                        f"left the {device} context unusable (a sticky error), so the run "
                        "stops here; rerun this kernel alone (fastattn-bench --device cuda "
                        f"--sweeps {sweep.name}) with CUDA_LAUNCH_BLOCKING=1 to locate it",
                        rows + _speedups(sweep, point_rows), skipped) from exc
                continue
            row = {"sweep": sweep.name, "impl": name, **point.params, **t}
            throughput(row, point.pairs, sweep.cost(point.params, name) if sweep.cost
                       else None, limits)
            row["peak_extra_bytes"] = mem
            point_rows.append(row)
        rows += _speedups(sweep, point_rows)
        del impls
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        progress.update(1)
    return rows, skipped


def _num(v: float) -> str:
    """Three significant digits, without exponents for the large numbers tables show."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _ms(r: Row, key: str = "median_s") -> str:
    return _num(r[key] * 1e3)


def print_table(sweep: Sweep, rows: List[Row], skipped: List[Row] = ()) -> None:
    """Median ms, [p10, p90] and speed-up per implementation (columns) and x (rows)."""
    xs = sorted({r[sweep.x] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cell = {(r["impl"], r[sweep.x]): r for r in rows}
    w = 30
    print(f"\n{sweep.title} [{sweep.device}]\nmedian ms [p10, p90] (speed-up vs "
          f"{sweep.baseline})")
    print(f"{sweep.x:>8}" + "".join(f"{i:>{w}}" for i in impls))
    for x in xs:
        line = f"{x:>8}"
        for impl in impls:
            r = cell.get((impl, x))
            line += f"{'-':>{w}}" if r is None else f"{_ms(r):>9} [{_ms(r, 'p10_s')}, " \
                f"{_ms(r, 'p90_s')}] ({r['speedup'] or 0:.2f}x)".rjust(w - 9)
        print(line)
    for s in skipped:
        print(f"  skipped {sweep.x}={s.get(sweep.x)} {s['impl'] or 'all'}: {s['reason']}")


# --------------------------------------------------------------------------- markdown

def _load(path: str) -> Dict[str, object]:
    with open(path) as f:
        return json.load(f)


def _stamp(data: Dict[str, object]) -> str:
    m = data["machine"]
    return f"<sub>{machine_label(m)}: `{m['command']}`</sub>"


def markdown(path: str) -> str:
    """A README table from a results JSON: per x (rows) and implementation (columns), the
    median ms, [p10–p90] and the speed-up over the baseline; for roofline sweeps also the
    throughput and how close it is to the machine's bound."""
    data = _load(path)
    rows, x = data["rows"], data["x"]
    xs = sorted({r[x] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cell = {(r["impl"], r[x]): r for r in rows}
    bases = ", ".join(sorted({str(r["baseline"]) for r in rows}))
    head = [f"| {x} | " + " | ".join(impls) + " |", "|---:|" + "---:|" * len(impls)]

    def table(fmt) -> List[str]:
        return head + [f"| {v} | " + " | ".join(
            "–" if cell.get((i, v)) is None else fmt(cell[(i, v)]) for i in impls) + " |"
            for v in xs]

    def latency(r: Row) -> str:
        s = f"{_ms(r)} [{_ms(r, 'p10_s')}–{_ms(r, 'p90_s')}]"
        return s + (f" **{r['speedup']:.2f}×**" if r.get("speedup") else "")

    out = [f"**{data['title']}** — median ms [p10–p90] and speed-up vs {bases}", ""]
    out += table(latency)
    if data.get("roofline"):
        def roof(r: Row) -> str:
            if not r.get("behaviours_per_s"):
                return "–"
            s, pct = _num(r["behaviours_per_s"] / 1e9), r.get("pct_of_bound")
            if pct is None:
                return s
            return s + (f" ({pct:.0f}%" if pct >= 10 else f" ({pct:.2g}%") \
                + f" of {r['bound_by']})"
        out += ["", f"**{data['title']}** — throughput, G behaviours/s (% of the "
                "machine bound, and which)", ""] + table(roof)
    if data.get("rate"):
        out += ["", f"**{data['title']}** — {data['rate']}", ""] + table(
            lambda r: _num(r["behaviours_per_s"]) if r.get("behaviours_per_s") else "–")
    if data.get("memory"):
        out += ["", f"**{data['title']}** — peak extra memory, MiB", ""] + table(
            lambda r: "–" if r.get("peak_extra_bytes") is None
            else _num(r["peak_extra_bytes"] / 2**20))
    for key in data.get("info") or []:
        seen = {r[x]: r[key] for r in rows if r.get(key) is not None}
        if seen:
            out += ["", f"{key} by {x}: " + ", ".join(f"{v}: {seen[v]}" for v in xs
                                                     if v in seen)]
    skipped = data.get("skipped") or []
    if skipped:
        out += [""] + [f"* not measured at {x}={s.get(x)}, {s['impl'] or 'all'}: "
                       f"{s['reason']}" for s in skipped]
    out += ["", _stamp(data), ""]
    return "\n".join(out)


def _stem(name: str, device: str) -> str:
    return name if device == "cpu" else f"{name}_{device}"


def markdown_section(out_dir: str, names: List[str], device: str = "cpu",
                     image_dir: Optional[str] = None, command: str = README_COMMAND) -> str:
    """The README's generated block: the measured machine limits, then per sweep with
    results in ``out_dir`` its tables and figures (linked under ``image_dir``)."""
    image_dir = out_dir if image_dir is None else image_dir
    parts, limits_line = [], None
    for name in names:
        stem = _stem(name, device)
        path = os.path.join(out_dir, stem + ".json")
        if not os.path.exists(path):
            continue
        data = _load(path)
        lim = data["machine"].get("limits") or {}
        if limits_line is None and lim:
            pc = lim.get("popcount_gwords_per_s")
            limits_line = (f"Measured limits of {machine_label(data['machine'])}: memory "
                           f"bandwidth {lim['mem_bandwidth_gbs']:.1f} GB/s (copy), fp32 GEMM "
                           f"{lim['matmul_gflops']:.0f} GFLOP/s"
                           + (f", XOR+popcount {pc:.1f} G words/s" if pc else "")
                           + (f" ({data['machine'].get('popcount_isa')}; AVX2 "
                              f"{lim['popcount_avx2_gwords_per_s']:.1f})"
                              if pc and lim.get("popcount_avx2_gwords_per_s") else "") + ".")
        parts.append(markdown(path))
        figs = [stem] + ([stem + "_roofline"] if data.get("roofline") else [])
        prefix = "" if image_dir in ("", ".") else image_dir.rstrip("/") + "/"
        parts.append("\n".join(f"![{f}]({prefix}{f}.png)" for f in figs
                               if os.path.exists(os.path.join(out_dir, f + ".png"))) + "\n")
    gen = f"<!-- generated by `{command}`; edit the code, not this block -->"
    if not parts:
        parts = [f"No {device} results in {out_dir} yet.\n"]
    return "\n".join([gen, ""] + ([limits_line, ""] if limits_line else []) + parts)


def write_readme(readme: str, section: str, device: str = "cpu") -> None:
    """Replace what lies between ``device``'s :func:`markers` in ``readme`` with ``section``."""
    begin, end = markers(device)
    with open(readme) as f:
        text = f.read()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {begin} ... {end} block to fill")
    text = pattern.sub(lambda _: f"{begin}\n{section}\n{end}", text, count=1)
    with open(readme, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------- files

def write_results(out_dir: str, sweep: Sweep, rows: List[Row], meta: Dict[str, object],
                  skipped: List[Row] = ()) -> List[str]:
    """CSV, JSON and plots of one sweep; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, _stem(sweep.name, sweep.device))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with open(base + ".json", "w") as f:
        json.dump({"sweep": sweep.name, "title": sweep.title, "x": sweep.x,
                   "baseline": sweep.baseline, "device": sweep.device,
                   "roofline": sweep.roofline, "memory": sweep.memory, "rate": sweep.rate,
                   "info": sweep.info, "machine": meta, "rows": rows,
                   "skipped": list(skipped)}, f, indent=1)
    written = [base + ".csv", base + ".json"]
    try:
        from .plots import plot_roofline, plot_sweep
    except ImportError:  # matplotlib missing: tables and data still written
        return written
    if rows:
        plot_sweep(sweep, rows, meta, base + ".png")
        written.append(base + ".png")
        if sweep.roofline:
            plot_roofline(sweep, rows, meta, base + "_roofline.png")
            written.append(base + "_roofline.png")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastattn-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results", help="directory for CSV/JSON/PNG")
    p.add_argument("--sweeps", nargs="*", choices=list(SWEEPS), help="default: all")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the sweeps run (cuda: Triton kernels, timed by do_bench)")
    p.add_argument("--quick", action="store_true", help="fewer points (under 2 minutes)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of repeats per measurement (default 1.0, quick 0.3)")
    p.add_argument("--markdown", action="store_true",
                   help="print the results already in --out as markdown, run nothing")
    p.add_argument("--readme", default=None,
                   help="with --markdown: write the tables into this file between its "
                        f"{markers()[0]} and {markers()[1]} comments (for cuda: "
                        f"{markers('cuda')[0]} ...), figures linked relative to it")
    args = p.parse_args(argv)
    names = args.sweeps or list(SWEEPS)
    if args.markdown:
        if args.readme:
            image_dir = os.path.relpath(args.out, os.path.dirname(os.path.abspath(args.readme)))
            command = "fastattn-bench " + " ".join(shlex.quote(a) for a in (
                argv if argv is not None else sys.argv[1:]))
            write_readme(args.readme, markdown_section(args.out, names, args.device, image_dir,
                                                       command), args.device)
            print(f"wrote the {args.device} results of {args.out} into {args.readme}")
        else:
            print(markdown_section(args.out, names, args.device))
        return 0
    if args.readme:
        p.error("--readme goes with --markdown")
    require_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget or (0.3 if args.quick else 1.0)
    timer = timer_for(args.device)
    meta = machine_info(args.device)
    meta["command"] = "fastattn-bench " + " ".join(shlex.quote(a) for a in
                                                   (argv if argv is not None else sys.argv[1:]))
    meta["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"fastattn-bench on {machine_label(meta)}; backends {meta['backends']}")
    meta["limits"] = machine_limits(args.device, timer)
    print("measured limits: " + ", ".join(f"{k} {v:.4g}" for k, v in meta["limits"].items()
                                          if v is not None))
    sweeps = select(args.sweeps, args.quick, args.device)
    from tqdm.auto import tqdm
    total = sum(len(s.points) for s in sweeps)
    results, sticky = [], None
    with tqdm(total=total, unit="point", file=sys.stderr) as progress:
        for s in sweeps:
            try:
                rows, skipped = run_sweep(s, budget, progress, timer=timer,
                                          limits=meta["limits"])
            except StickyDeviceError as exc:
                # What was measured before the failure is kept; nothing after it is run.
                rows, skipped, sticky = exc.rows, exc.skipped, exc
            # Written as each sweep ends: a run cut short (a timeout) keeps what it measured.
            write_results(args.out, s, rows, meta, skipped)
            results.append((s, rows, skipped))
            if sticky is not None:
                break
    for sweep, rows, skipped in results:
        print_table(sweep, rows, skipped)
    print(f"\nwrote {', '.join(s.name for s, _, _ in results)} (.csv/.json/.png) to "
          f"{args.out}")
    failed = [s for _, _, skipped in results for s in skipped if s.get("error")]
    for s in failed:
        print(f"FAILED {s['sweep']} {s['impl']}: {s['reason']}", file=sys.stderr)
    if sticky is not None:
        not_run = [s.name for s in sweeps[len(results):]]
        print(f"STOPPED: {sticky}" + (f"; not run: {', '.join(not_run)}" if not_run else ""),
              file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
