"""EdgeRec sweeps (issue 17): the fused varlen GRU ``gru_scan`` against torch.nn.GRU, and
the EdgeRec model's ablation and on-device export.

The baseline is what a model would write without the op: torch.nn.GRU over
``pack_padded_sequence`` (varlen rows, every state unpacked back to (B, T, H)). Plain
torch.nn.GRU over the padded batch is listed too: it is faster than the packed one on CPU
but runs the padding steps, so its states past a row's length are wrong for varlen data.

``python -m fastattn.bench.edgerec_sweeps [--seeds S] [--threads N]`` trains the ablation
rows of :data:`fastattn.models.edgerec.ABLATIONS` (plain target attention, reliable
attention, + the adversarial block's selection without its losses, + sequence adversarial)
on the synthetic set of :mod:`fastattn.data.edgerec` with S model seeds each, scores the held-out users' pages (AUC, GAUC and NDCG@5 per page,
log-loss), then exports the last seed's full model with ``torch.export`` and times
re-ranking 50 candidates of one user on 1 thread (eager and exported; the exported
program's scores are checked against eager). It writes ``edgerec_ablation.{json,csv}``
and ``edgerec_export.json`` under ``--out`` and prints markdown tables.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .sweep import F32, Cost, Point, Sweep, backends_for

__all__ = ["EDGEREC_SWEEPS", "gru_scan_sweep", "evaluate_pages", "train_edgerec", "ablation",
           "export_latency"]


def gru_scan_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """gru_scan forward and forward+backward, B=256, I=H=32, lengths uniform in [1, T]."""
    B, I, H = 256, 32, 32
    steps = [200] if quick else [50, 200]   # packed fwd+bwd: ~15 s a call at T=200

    def cost(p: Dict[str, int], impl: str) -> Cost:
        """Forward: read x (B, T, I), write every state (B, T, H); the backward reads the
        states' gradient and writes dx. Flops: the two GRU mat-vecs, 2·3H·(I + H) per
        row-step (padding steps counted, as the dense baseline runs them), three times that
        with the backward."""
        rows = B * p["T"]
        fwd = Cost(bytes=F32 * rows * (I + H), flops=rows * 2 * 3 * H * (I + H))
        if impl.endswith("_fwd_bwd"):
            return Cost(bytes=2 * fwd.bytes, flops=3 * fwd.flops)
        return fwd

    sweep = Sweep("gru_scan", f"gru_scan (varlen GRU, every state) B={B}, I=H={H} vs "
                  "torch.nn.GRU", x="T", baseline="nn_gru_packed_fwd",
                  baseline_of=lambda impl: "nn_gru_packed_fwd_bwd" if impl.endswith("_fwd_bwd")
                  else "nn_gru_packed_fwd", cost=cost, device=device)

    def build(T: int):
        def make():
            from ..ops import gru_scan
            g = torch.Generator().manual_seed(T)
            x = torch.randn(B, T, I, generator=g).to(device).requires_grad_()
            lengths = torch.randint(1, T + 1, (B,), generator=g)
            torch.manual_seed(0)
            gru = torch.nn.GRU(I, H, batch_first=True).to(device)
            w = [gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0]
            lens_dev = lengths.to(device)

            def packed():
                pk = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
                return pad_packed_sequence(gru(pk)[0], batch_first=True, total_length=T)[0]

            def plain():
                return gru(x)[0]

            impls: Dict[str, Callable[[], object]] = {}
            fns = {"nn_gru_packed": packed, "nn_gru": plain}
            # the torch backend (the per-step reference) is the oracle, not a contender
            for be in [b for b in backends_for(device) if b != "torch"]:
                fns[be] = lambda be=be: gru_scan(x, lens_dev, *w, backend=be)
            for name, fn in fns.items():
                def fwd(fn=fn):
                    with torch.no_grad():
                        return fn()

                def fwd_bwd(fn=fn):
                    fn().sum().backward()
                impls[name + "_fwd"] = fwd
                impls[name + "_fwd_bwd"] = fwd_bwd
            return impls
        return make

    # x, every state, the backward's gate gradients (2 x 3H) and the GRU's own workspace
    sweep.points = [Point({"T": T, "B": B}, build(T), pairs=B * T,
                          mem_bytes=F32 * B * T * (2 * I + 12 * H)) for T in steps]
    return sweep


EDGEREC_SWEEPS: Dict[str, Callable[..., Sweep]] = {"gru_scan": gru_scan_sweep}


# ---------------------------------------------------------------------- EdgeRec ablation

NDCG_K = 5


@torch.no_grad()
def evaluate_pages(model, data, pages_per_batch: int = 256) -> Dict[str, float]:
    """AUC, GAUC and NDCG@5 (groups: pages) and log-loss of ``model`` on every page of
    ``data`` (an :class:`~fastattn.data.edgerec.EdgeRecData`)."""
    was = model.training
    model.eval()
    scores, labels, pages = [], [], []
    for batch in data.batches(pages_per_batch):
        scores.append(model(batch).float())
        labels.append(batch.label)
        pages.append(batch.page)
    model.train(was)
    return page_metrics(torch.cat(scores), torch.cat(labels), torch.cat(pages))


def page_metrics(scores, labels, pages, logits: bool = True) -> Dict[str, float]:
    """{"auc", "gauc", "ndcg@5", "logloss"} of scores (S,) (logits, or probabilities with
    ``logits=False``) against labels (S,), grouped by page (S,)."""
    from ..data.metrics import auc, gauc, log_loss, ndcg
    return {"auc": auc(scores, labels), "gauc": gauc(scores, labels, pages),
            f"ndcg@{NDCG_K}": ndcg(scores, labels, pages, NDCG_K),
            "logloss": log_loss(scores, labels, logits=logits)}


def build_row(row: str, data, embed_dim: int = 16, backend: Optional[str] = None,
              **overrides):
    """The (untrained) EdgeRec model of ablation row ``row`` for ``data``'s ids."""
    from ..models import build
    from ..models.edgerec import ABLATIONS
    if row not in ABLATIONS:
        raise ValueError(f"unknown ablation row {row!r}; choose one of {list(ABLATIONS)}")
    return build("edgerec", data.n_items, data.n_cats, embed_dim=embed_dim, mlp=(64, 32),
                 backend=backend, **{**ABLATIONS[row], **overrides})


def train_edgerec(row: str, train, test, *, seed: int = 0, epochs: int = 3,
                  pages_per_batch: int = 64, lr: float = 1e-2, embed_dim: int = 16,
                  backend: Optional[str] = None, **overrides):
    """Train ablation row ``row`` (a key of :data:`fastattn.models.edgerec.ABLATIONS`) on
    ``train`` with model seed ``seed``; returns (model, row dict with the test metrics)."""
    from ..train import LossOf, make_optimizer, train_step
    torch.manual_seed(seed)
    model = build_row(row, train, embed_dim=embed_dim, backend=backend, **overrides)
    loss_fn, opt = LossOf(model), make_optimizer(model, lr)
    t0, c0, losses = time.perf_counter(), time.process_time(), []
    for epoch in range(epochs):
        for batch in train.batches(pages_per_batch, shuffle=True, seed=seed * 1000 + epoch):
            losses.append(train_step(loss_fn, opt, batch))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return model, {"row": row, "seed": seed, **evaluate_pages(model, test),
                   "train_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                   "train_s": wall, "train_cpu_s": cpu,
                   "params": sum(p.numel() for p in model.parameters())}


def ablation(seeds: int = 3, epochs: int = 3, quick: bool = False, data_seed: int = 0,
             **data_overrides):
    """Every ablation row with model seeds 0..seeds-1 on one data set (rows interleaved
    per seed). Returns (rows, summary, data stats, test set, last models by row); the
    summary has per row the mean and standard deviation of each metric over the seeds,
    the mean margin over ``plain_ta`` and the number of seeds where the row beats it, and
    the true click probability's metrics (row ``oracle``: the ceiling)."""
    from ..data.edgerec import make_edgerec
    from ..models.edgerec import ABLATIONS
    if quick:
        data_overrides = {**data_overrides, "n_users": 400}
    data, truth = make_edgerec(seed=data_seed, return_truth=True, **data_overrides)
    train, test = data.split(0.2, seed=data_seed)
    rows: List[Dict[str, object]] = []
    models = {}
    for seed in range(seeds):
        for row in ABLATIONS:
            models[row], r = train_edgerec(row, train, test, seed=seed,
                                           epochs=1 if quick else epochs)
            rows.append(r)
            print(f"{row:>13} seed {seed}: AUC {r['auc']:.4f} GAUC {r['gauc']:.4f} "
                  f"NDCG@{NDCG_K} {r[f'ndcg@{NDCG_K}']:.4f} ({r['train_s']:.0f} s)",
                  flush=True)
    metrics = ["auc", "gauc", f"ndcg@{NDCG_K}", "logloss"]
    summary: List[Dict[str, object]] = []
    base = {s: r for r in rows if r["row"] == "plain_ta" for s in [r["seed"]]}
    for row in ABLATIONS:
        rs = [r for r in rows if r["row"] == row]
        out: Dict[str, object] = {"row": row, "seeds": len(rs)}
        for m in metrics:
            vals = [r[m] for r in rs]
            out[m] = statistics.mean(vals)
            out[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            diffs = [r[m] - base[r["seed"]][m] for r in rs]
            out[m + "_margin"] = statistics.mean(diffs)
            better = [d < 0 if m == "logloss" else d > 0 for d in diffs]
            out[m + "_wins"] = sum(better)
        summary.append(out)
    # the ceiling: the hidden click probabilities of the test pages
    keep = torch.isin(data.page_user, data.split_users(0.2, seed=data_seed)[1])
    prob = truth["click_prob"][keep].reshape(-1)
    pages = torch.arange(data.n_pages)[keep].repeat_interleave(data.page_size)
    summary.append({"row": "oracle", "seeds": 0,
                    **page_metrics(prob, data.labels[keep].reshape(-1), pages, logits=False)})
    return rows, summary, data.stats(), test, models


def _time(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, Dict[str, float]]:
    """Per contender and call: the median and 90th percentile wall time and the median
    process CPU time (what other processes' load inflates less), the contenders called
    round-robin so that load hits each alike."""
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    out = {}
    for k in fns:
        w = sorted(wall[k])
        out[k] = {"p50_ms": 1e3 * w[len(w) // 2], "p90_ms": 1e3 * w[int(0.9 * (len(w) - 1))],
                  "cpu_p50_ms": 1e3 * statistics.median(cpu[k])}
    return out


@torch.no_grad()
def export_latency(model, test, candidates: int = 50, repeats: int = 200) -> Dict[str, object]:
    """Export ``model`` (:func:`fastattn.models.edgerec.export_reranker`) and time
    re-ranking ``candidates`` candidates of one held-out user (U == 1): eager
    ``model(batch)`` (with its input checks), the unchecked eager path, and the exported
    program, ``repeats`` calls each, round-robin, on this process's threads; plus the
    largest difference of the exported program's scores from eager."""
    from ..data.edgerec import EdgeRecBatch
    from ..models.edgerec import EdgeRecReranker, export_reranker, reranker_inputs
    one = test.batch(torch.tensor([0]), full_width=True)
    pool_items = test.cand_items.reshape(-1)
    pool_cats = test.cand_cats.reshape(-1)
    idx = torch.randperm(pool_items.shape[0], generator=torch.Generator().manual_seed(0))
    idx = idx[:candidates]
    batch = EdgeRecBatch(
        one.hist_items, one.hist_cats, one.lengths, pool_items[idx], pool_cats[idx],
        hist_details=one.hist_details, exp_items=one.exp_items, exp_cats=one.exp_cats,
        exp_lengths=one.exp_lengths, exp_details=one.exp_details)
    model.eval()
    t0 = time.perf_counter()
    program = export_reranker(model, batch)
    export_s = time.perf_counter() - t0
    args = reranker_inputs(batch)
    exported = program.module()
    eager = EdgeRecReranker(model)
    ref = torch.sigmoid(model(batch))
    diff = float((exported(*args) - ref).abs().max())
    for _ in range(10):                         # warm-up
        exported(*args)
        model(batch)
    out = {"candidates": candidates, "click_len": int(one.lengths[0]),
           "exposure_len": int(one.exp_lengths[0]), "click_width": one.hist_items.shape[1],
           "exposure_width": one.exp_items.shape[1], "threads": torch.get_num_threads(),
           "export_s": export_s, "max_abs_diff": diff,
           "backend": model.backend,
           **_time({"eager_checked": lambda: model(batch), "eager": lambda: eager(*args),
                    "exported": lambda: exported(*args)}, repeats)}
    return out


def main(argv=None) -> int:
    import argparse
    import csv
    import json
    import os
    import shlex
    import sys

    from .measure import machine_info

    p = argparse.ArgumentParser(description="EdgeRec ablation rows and on-device export")
    p.add_argument("--seeds", type=int, default=3, help="model seeds per ablation row")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for training (the latency runs on 1)")
    p.add_argument("--repeats", type=int, default=200, help="timed re-ranking calls")
    p.add_argument("--users", type=int, default=1500, help="synthetic users (train + test)")
    p.add_argument("--quick", action="store_true", help="400 users, one epoch")
    p.add_argument("--latency-only", action="store_true",
                   help="no training: time the export of an untrained reliable_adv model "
                        "(the latency does not depend on the weights); writes only "
                        "edgerec_export.json")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m fastattn.bench.edgerec_sweeps " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    os.makedirs(args.out, exist_ok=True)
    if args.latency_only:
        from ..data.edgerec import make_edgerec
        data = make_edgerec(n_users=args.users)
        torch.manual_seed(0)
        model, test, stats = build_row("reliable_adv", data), data.split(0.2)[1], data.stats()
    else:
        rows, summary, stats, test, models = ablation(args.seeds, args.epochs, args.quick,
                                                      n_users=args.users)
        model = models["reliable_adv"]
    torch.set_num_threads(1)
    latency = export_latency(model, test, repeats=args.repeats)
    meta = {"command": command, "machine": machine_info(), "data": stats}
    if args.latency_only:
        with open(os.path.join(args.out, "edgerec_export.json"), "w") as f:
            json.dump({**latency, **meta}, f, indent=1, default=str)
        print(markdown([], latency))
        return 0
    with open(os.path.join(args.out, "edgerec_ablation.json"), "w") as f:
        json.dump({"rows": rows, "summary": summary, **meta}, f, indent=1, default=str)
    with open(os.path.join(args.out, "edgerec_ablation.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "edgerec_export.json"), "w") as f:
        json.dump({**latency, **meta}, f, indent=1, default=str)
    print("\n" + markdown(summary, latency))
    print(f"\n{command}")
    return 0


def markdown(summary: List[Dict[str, object]], latency: Optional[Dict] = None) -> str:
    """The README tables: the ablation (mean ± std over seeds, margin over plain_ta,
    seeds won) and the export latency."""
    k = f"ndcg@{NDCG_K}"
    out = [f"| row | AUC | GAUC (pages) | NDCG@{NDCG_K} | log-loss | AUC vs plain_ta | "
           "seeds with AUC > plain_ta |", "|---|---:|---:|---:|---:|---:|---:|"] \
        if summary else []
    for r in summary:
        if r["row"] == "oracle":
            out.append(f"| oracle (true click prob.) | {r['auc']:.4f} | {r['gauc']:.4f} | "
                       f"{r[k]:.4f} | {r['logloss']:.4f} | | |")
            continue
        cell = lambda m: f"{r[m]:.4f} ± {r[m + '_std']:.4f}"  # noqa: E731
        out.append(f"| {r['row']} | {cell('auc')} | {cell('gauc')} | {cell(k)} | "
                   f"{cell('logloss')} | {r['auc_margin']:+.4f} | {r['auc_wins']}/{r['seeds']} |")
    if latency:
        out += [""] if out else []
        out += [f"| re-rank {latency['candidates']} candidates, "
                f"{latency['threads']} thread | p50 ms (wall) | p90 ms (wall) | "
                "p50 ms (CPU time) |", "|---|---:|---:|---:|"]
        for name in ("eager_checked", "eager", "exported"):
            t = latency[name]
            out.append(f"| {name} | {t['p50_ms']:.2f} | {t['p90_ms']:.2f} | "
                       f"{t['cpu_p50_ms']:.2f} |")
        out.append(f"\nexported vs eager: max |Δ score| = {latency['max_abs_diff']:.2e}")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
