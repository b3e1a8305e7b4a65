"""The BAHE sweeps (issue 15): the fused pooling op, and a training step of each of the
paper's ablation rows over text-described behaviours.

* ``bahe_pool``: :func:`fastattn.masked_mean` forward + backward of N distinct behaviours'
  K token states, each CPU kernel against the torch reference (a select, a sum and a
  division, differentiated by autograd: what users write).
* ``bahe``: a training step (forward + backward) of LLM-CTR, +FP, +ABE and BAHE
  (:data:`fastattn.models.bahe.ABLATIONS`) on the synthetic set (3 behaviour types, item
  token strings of 5-16 tokens, K = 16 slots), histories of L = 64 and 128 behaviours
  (text lengths 1,024 and 2,048 token positions, the paper's), with peak memory and the
  distinct-behaviour ratio |H| / (behaviours in the batch, targets included).

``python -m fastattn.bench.bahe_sweeps [--threads N] [--rounds R]`` times the same
training steps interleaved (round-robin over the rows, R rounds, median), wall clock and
process CPU time, so that load from other processes on a shared machine hits every row
alike; it writes ``bench/results/bahe_interleaved.json`` and prints a markdown table.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

import fastattn

from .sweep import F32, Cost, Point, Sweep, backends_for

__all__ = ["BAHE_SWEEPS"]

POOL_K, POOL_D = 16, 64


def bahe_pool_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """masked_mean forward + backward over (N, K=16, d=64) token states."""
    sizes = [16384] if quick else [4096, 16384, 65536]

    def cost(p: Dict[str, int], impl: str) -> Cost:
        """x read, out written; backward: grad read, dx written (mask bytes aside)."""
        n = p["N"]
        return Cost(bytes=2 * F32 * (n * POOL_K * POOL_D + n * POOL_D))

    sweep = Sweep("bahe_pool", f"masked_mean forward + backward of N behaviours' K={POOL_K} "
                  f"token states (d={POOL_D}, about 2/3 of the tokens valid)", x="N",
                  baseline="torch", cost=cost, device=device, memory=True)

    def build(N: int):
        def make() -> Dict[str, Callable[[], object]]:
            g = torch.Generator().manual_seed(N)
            x = torch.randn(N, POOL_K, POOL_D, generator=g).to(device).requires_grad_()
            n = torch.randint(1, POOL_K + 1, (N, 1), generator=g)
            mask = (torch.arange(POOL_K) < n).to(device)
            grad = torch.randn(N, POOL_D, generator=g).to(device)

            def step(be):
                x.grad = None
                fastattn.masked_mean(x, mask, backend=be).backward(grad)
            return {be: (lambda be=be: step(be)) for be in backends_for(device)}
        return make

    for N in sizes:
        sweep.points.append(Point({"N": N}, build(N), pairs=N,
                                  mem_bytes=6 * F32 * N * POOL_K * POOL_D))
    return sweep


TRAIN_B, TOKENS_K = 64, 16


def bahe_training_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """A training step of each ablation row at two text lengths (L = 64 and 128 behaviours,
    1,024 and 2,048 token positions); baseline LLM-CTR."""
    lengths = [64] if quick else [64, 128]
    sweep = Sweep("bahe", f"BAHE ablation, training step (forward + backward) of B={TRAIN_B} "
                  f"samples, L behaviours of up to K={TOKENS_K} tokens (text length L·K), "
                  "3 behaviour types, d=32, 1 lower + 1 upper layer", x="L",
                  baseline="llm_ctr", memory=True, device=device, rate="samples/s",
                  info=["text_len", "distinct_rows", "distinct_ratio"])

    def build(L: int, params: Dict[str, float]):
        def make() -> Dict[str, Callable[[], object]]:
            from ..data import make_synthetic
            from ..models import build as build_model
            from ..models.bahe import ABLATIONS
            data = make_synthetic(n_users=400, n_items=2000, n_cats=100, min_len=L,
                                  max_len=4 * L, n_behaviour_types=3,
                                  token_len_max=TOKENS_K, seed=0)
            g = torch.Generator().manual_seed(L)
            batch = data.batch(torch.randperm(len(data), generator=g)[:TRAIN_B],
                               max_len=L).to(device)
            impls = {}
            for row, (name, kwargs) in ABLATIONS.items():
                torch.manual_seed(0)
                model = build_model(name, data.n_items, data.n_cats,
                                    item_tokens=data.item_tokens, n_types=3,
                                    max_behaviours=L, **kwargs).to(device)

                def step(model=model):
                    model.zero_grad(set_to_none=True)
                    model.loss(batch).backward()
                    return model

                impls[row] = step
            stats = impls["bahe"]().last_stats
            params.update(text_len=L * TOKENS_K, distinct_rows=stats["distinct"],
                          distinct_ratio=round(stats["distinct"] / stats["behaviours"], 4))
            return impls
        return make

    for L in lengths:
        params: Dict[str, float] = {"L": L, "B": TRAIN_B}
        sweep.points.append(Point(params, build(L, params), pairs=TRAIN_B,
                                  mem_bytes=2 << 30))
    return sweep


BAHE_SWEEPS: Dict[str, Callable[..., Sweep]] = {
    "bahe_pool": bahe_pool_sweep,
    "bahe": bahe_training_sweep,
}


def interleaved(rounds: int = 3, quick: bool = False) -> list:
    """Rows {L, text_len, impl, wall_ms, cpu_ms, speedup_wall, speedup_cpu, peak_mib,
    distinct_ratio} of the ``bahe`` sweep's training steps timed round-robin."""
    import statistics
    import time

    from .measure import peak_extra_bytes

    out = []
    for point in bahe_training_sweep(quick).points:
        impls = point.build()
        for fn in impls.values():                   # warm-up: lazy allocations and caches
            fn()
        mem = {k: peak_extra_bytes(fn) for k, fn in impls.items()}
        wall: Dict[str, list] = {k: [] for k in impls}
        cpu: Dict[str, list] = {k: [] for k in impls}
        for _ in range(rounds):
            for k, fn in impls.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        w0, c0 = statistics.median(wall["llm_ctr"]), statistics.median(cpu["llm_ctr"])
        for k in impls:
            w, c = statistics.median(wall[k]), statistics.median(cpu[k])
            out.append({"L": point.params["L"], "text_len": point.params["text_len"],
                        "impl": k, "wall_ms": 1e3 * w, "cpu_ms": 1e3 * c,
                        "speedup_wall": w0 / w, "speedup_cpu": c0 / c,
                        "peak_mib": None if mem[k] is None else mem[k] / 2**20,
                        "distinct_ratio": point.params["distinct_ratio"]})
    return out


def main(argv=None) -> int:
    import argparse
    import json
    import os
    import shlex
    import sys

    from .measure import machine_info

    p = argparse.ArgumentParser(description="BAHE ablation rows timed interleaved")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = interleaved(args.rounds, args.quick)
    command = "python -m fastattn.bench.bahe_sweeps " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bahe_interleaved.json"), "w") as f:
        json.dump({"rows": rows, "command": command, "threads": torch.get_num_threads(),
                   "machine": machine_info()}, f, indent=1, default=str)
    print("| L (text length) | row | ms / step (wall) | speed-up wall | speed-up CPU time | "
          "peak MiB | vs llm_ctr | distinct ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(b for b in rows if b["L"] == r["L"] and b["impl"] == "llm_ctr")
        mem_x = (base["peak_mib"] / r["peak_mib"]) if r["peak_mib"] and base["peak_mib"] \
            else float("nan")
        print(f"| {r['L']} ({r['text_len']}) | {r['impl']} | {r['wall_ms']:,.0f} | "
              f"{r['speedup_wall']:.2f}× | {r['speedup_cpu']:.2f}× | "
              f"{r['peak_mib']:.0f} | {mem_x:.1f}× less | {r['distinct_ratio']:.3f} |")
    print(f"\n{command}, {torch.get_num_threads()} thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
