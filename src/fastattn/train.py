"""``fastattn-train``: train the reference CTR models on long histories and compare them.

Trains each chosen model (``fastattn.models``) at each history length on the same data
(the planted synthetic set of :mod:`fastattn.data` by default, or a CSV log), evaluates AUC
and log-loss on held-out users, and writes ``train.csv``, ``train.json`` and ``train.png``
(AUC vs history length, training throughput vs history length) under ``--out``.

DIN is the short-history baseline: it always reads the ``short_len`` most recent
behaviours, whatever the history length; the long-history models read up to the length.

``--variant long`` / ``--variant recent`` train on the planted set's variants where the
long-term interests / the recent window dominate the clicks (:data:`fastattn.data.VARIANTS`).
``--epoch-auc`` adds the test AUC after every epoch to each row (``auc_by_epoch``).
``--model-arg eta:time_buckets=16`` (repeatable) passes a constructor argument to one model.
``--retrieval`` (synthetic data only) also writes ``retrieval.{csv,json}``: ETA's recall@k
of SimHash top-k against the exact attention top-k by signature bits (k: its topk and
``--retrieval-k``), and each retrieving
model's hit rate on the generator's planted interests (:mod:`fastattn.bench.retrieval`).

The BAHE rows (``--models llm_ctr,fp,fp_abe,bahe``: LLM-CTR, +FP, +ABE and BAHE, see
:mod:`fastattn.models.bahe`) read the items' token strings; their rows add the time per
training epoch, the peak memory of a training step (with ``--share-histories`` also of
one step over 64 samples in the per-sample layout, ``peak_sample_mib``: the paper's, each
sample its own history) and the distinct-behaviour ratio, and
each row's bootstrap standard error of the test AUC and its difference to the LLM-CTR row of
the same length (paired: both scored on the same resamples of test users); on synthetic
data the oracle AUC (the generator's click probabilities) too. ``--variant text`` draws
clicks from the overlap of the candidate's category with the recent behaviours, which the
text models can learn; ``--share-histories`` trains on batches of whole users whose
candidates share one encoded history.

Runs single-process on CPU or GPU, and data-parallel under ``torchrun`` (each rank trains
on its shard of every batch; DistributedDataParallel averages the gradients)::

    torchrun --nproc_per_node=2 -m fastattn.train --models eta --lengths 2000
"""
from __future__ import annotations

import argparse
import ast
import csv
import gc
import json
import os
import shlex
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .data import VARIANTS, CTRDataset, load_csv, make_synthetic
from .data.batch import Batch
from .data.metrics import auc, auc_bootstrap, log_loss
from .models import MODELS, build
from .models.bahe import ABLATIONS

__all__ = ["TrainConfig", "setup_distributed", "shard", "LossOf", "make_optimizer",
           "JointOptimizer", "train_step", "evaluate", "train_model", "main"]

DEFAULT_LENGTHS = (50, 200, 1000)


def setup_distributed() -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun: (rank, world_size).

    gloo on CPU, nccl when CUDA is available. A plain run returns (0, 1).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch: Batch, rank: int, world: int) -> Batch:
    """This rank's contiguous slice of a training-layout batch (U == B).

    Slices are equal (the batch size must divide by ``world``), so DDP's gradient average
    over ranks equals the gradient of the mean loss over the whole batch.
    """
    if world == 1:
        return batch
    B = len(batch)
    if B % world:
        raise ValueError(f"batch size {B} must be divisible by the world size {world}")
    lo, hi = rank * B // world, (rank + 1) * B // world
    fields = {k: (v[lo:hi] if v is not None else None) for k, v in vars(batch).items()}
    return Batch(**fields)


class LossOf(nn.Module):
    """``forward(batch)`` = ``model.loss(batch)``, so DistributedDataParallel, which hooks
    gradient averaging on its wrapper's forward, covers the whole loss (including terms
    computed from the model's internal state, like MIMN's memory regulariser)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model.loss(batch)


class JointOptimizer:
    """Several optimisers over disjoint parameters, stepped and zeroed as one (what
    :func:`train_step` calls)."""

    def __init__(self, parts: Sequence[torch.optim.Optimizer]):
        self.parts = list(parts)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.parts:
            o.step()


def make_optimizer(model: nn.Module, lr: float):
    """Adam, fused where this torch and device have it (one kernel for all parameters: on
    CPU about 4x cheaper per step than the per-tensor loop, same update). Embedding tables
    with sparse gradients (``CTRModel.sparse_embeddings``) get ``torch.optim.SparseAdam``
    instead, which updates only the rows a step looked up (a :class:`JointOptimizer`)."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    rest = [p for p in model.parameters() if all(p is not t for t in tables)]
    try:
        adam = torch.optim.Adam(rest, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):      # no fused Adam for this device
        adam = torch.optim.Adam(rest, lr=lr)
    return JointOptimizer([torch.optim.SparseAdam(tables, lr=lr), adam]) if tables else adam


def train_step(loss_fn: nn.Module, optimizer, batch: Batch) -> float:
    """One optimisation step; ``loss_fn`` is a :class:`LossOf`, possibly wrapped in DDP."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(batch)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: nn.Module, data: CTRDataset, max_len: Optional[int],
             batch_size: int = 512, device: str = "cpu", scores_out: Optional[list] = None
             ) -> Dict[str, float]:
    """AUC and log-loss of ``model`` on every sample of ``data``.

    The candidates of one user share one history row (``hist_index``) instead of a copy
    each: the serving layout, same scores, a fraction of the work on long histories.
    ``scores_out``: a list that gets the (S,) logits, in sample order."""
    model.eval()
    scores, labels = [], []
    for batch in data.batches(batch_size, max_len=max_len, share_histories=True):
        batch = batch.to(device)
        scores.append(model(batch).float().cpu())
        labels.append(batch.label.float().cpu())
    model.train()
    s, y = torch.cat(scores), torch.cat(labels)
    if scores_out is not None:
        scores_out.append(s)
    return {"auc": float(auc(s, y)), "logloss": float(log_loss(s, y, logits=True))}


# Samples of the per-sample peak (``peak_sample_mib``) of text rows trained as whole users:
# the batch of the per-sample BAHE rows (make train's train_bahe).
PEAK_SAMPLE_BATCH = 64


class TrainConfig(argparse.Namespace):
    """Hyper-parameters of one training run (the CLI's arguments)."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    embed_dim: int = 16
    seed: int = 0
    device: str = "cpu"
    backend: Optional[str] = None
    dedup: bool = True
    sparse_embeddings: bool = False
    share_histories: bool = False
    bootstrap: int = 1000
    epoch_auc: bool = False
    truth: Optional[dict] = None          # make_synthetic's hidden variables (--retrieval)
    retrieval_bits: Sequence[int] = (16, 32, 64, 128, 256)
    retrieval_k: Sequence[int] = (64,)
    model_args: Dict[str, Dict[str, object]] = {}   # per model: constructor kwargs (--model-arg)


def _build(name: str, train: CTRDataset, max_len: int, cfg: TrainConfig) -> nn.Module:
    if name not in ABLATIONS:
        model = build(name, train.n_items, train.n_cats, embed_dim=cfg.embed_dim,
                      backend=cfg.backend, dedup=cfg.dedup, **cfg.model_args.get(name, {}))
        model.sparse_embeddings = cfg.sparse_embeddings
        return model
    if train.item_tokens is None:
        raise ValueError(f"model {name!r} reads item token strings: the data has none (a CSV "
                         "log needs a tokens column)")
    model, switches = ABLATIONS[name]
    return build(model, train.n_items, train.n_cats, item_tokens=train.item_tokens,
                 n_types=train.n_types, max_behaviours=max_len, embed_dim=cfg.embed_dim,
                 backend=cfg.backend, **switches)


def train_model(name: str, train: CTRDataset, test: CTRDataset, max_len: int,
                cfg: TrainConfig, progress=None, rank: int = 0,
                world: int = 1, retrieval: Optional[list] = None,
                scores_out: Optional[list] = None) -> Dict[str, object]:
    """Train model ``name`` on histories cut to ``max_len``; evaluate on ``test``.

    ``retrieval``: a list that gets the model's retrieval-quality rows
    (:func:`fastattn.bench.retrieval.retrieval_rows`; needs ``cfg.truth``, the synthetic
    set's hidden variables, and ``cfg.retrieval_bits``). ``scores_out``: a list that gets
    the test logits (S,). ``cfg.share_histories``: batches of whole users, each history
    encoded once per batch (single process only)."""
    if cfg.sparse_embeddings and world > 1:
        raise ValueError("sparse_embeddings trains in a single process (DDP is not set up "
                         "for sparse gradients here)")
    if cfg.share_histories and world > 1:
        raise ValueError("share_histories trains on batches of whole users: single process "
                         "only (the ranks' shards would split the shared rows)")
    torch.manual_seed(cfg.seed)
    model = _build(name, train, max_len, cfg).to(cfg.device)
    text = name in ABLATIONS
    peak, peak_sample, behaviours, distinct = None, None, 0, 0
    wrapped = LossOf(model)
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(wrapped)
    opt = make_optimizer(model, cfg.lr)
    seen, train_s, cpu_s, losses, by_epoch = 0, 0.0, 0.0, [], []
    # The set-up's objects (data, model, optimizer) live through the whole run: frozen,
    # the collections that the steps' allocations trigger no longer walk them (the
    # collector took ~4% of a MIMN training step's samples; issue 13).
    gc.collect()
    gc.freeze()
    try:
        for epoch in range(cfg.epochs):
            if epoch and cfg.epoch_auc:            # the last epoch's is the row's own AUC
                by_epoch.append(evaluate(model, test, max_len, device=cfg.device)["auc"])
            for batch in train.batches(cfg.batch_size, max_len=max_len, shuffle=True,
                                       seed=cfg.seed + epoch, drop_last=world > 1,
                                       share_histories=cfg.share_histories):
                batch = shard(batch, rank, world).to(cfg.device)
                if text and peak is None and seen and cfg.device == "cpu":
                    # the peak of one (not the first) forward + backward, outside the timed
                    # steps and without an optimizer step (train_step zeroes the gradients)
                    from .bench.measure import peak_extra_bytes
                    peak = peak_extra_bytes(lambda: wrapped(batch).backward()) or 0
                    if cfg.share_histories:
                        # and in the paper's layout: samples of different users, each with
                        # its own history (whole-user steps are dominated by the item tower
                        # over all their candidates' tokens, which only ABE deduplicates)
                        one = next(iter(train.batches(PEAK_SAMPLE_BATCH, max_len=max_len,
                                                      shuffle=True, seed=cfg.seed)))
                        one = one.to(cfg.device)
                        peak_sample = peak_extra_bytes(lambda: wrapped(one).backward()) or 0
                        del one
                t0, c0 = time.perf_counter(), time.process_time()
                losses.append(train_step(wrapped, opt, batch))
                train_s += time.perf_counter() - t0
                cpu_s += time.process_time() - c0
                seen += len(batch)
                if text and model.last_stats:
                    behaviours += model.last_stats["behaviours"]
                    distinct += model.last_stats["distinct"]
                if progress is not None:
                    progress.update(len(batch) * world)
                    progress.set_postfix_str(f"{name} L={max_len} loss={losses[-1]:.4f}")
    finally:
        gc.unfreeze()
    metrics = evaluate(model, test, max_len, device=cfg.device, scores_out=scores_out)
    row = {"model": name, "max_len": max_len,
           "history_read": min(max_len, model.config().get("short_len") or max_len)
           if name == "din" else max_len,
           **metrics, "train_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
           "train_samples_per_s": seen * world / train_s if train_s else None,
           "epochs": cfg.epochs, "params": sum(p.numel() for p in model.parameters())}
    if cfg.epoch_auc:
        row["auc_by_epoch"] = by_epoch + [metrics["auc"]]
    if retrieval is not None:
        from .bench.retrieval import retrieval_rows
        retrieval.extend(retrieval_rows(name, model, test, cfg.truth, max_len,
                                        bits=cfg.retrieval_bits, recall_k=cfg.retrieval_k))
    if text:
        # CPU time too: on a shared machine, load from other processes inflates wall time
        row.update(text_len=max_len * model.K, epoch_s=train_s / cfg.epochs,
                   epoch_cpu_s=cpu_s / cfg.epochs,
                   peak_step_mib=None if peak is None else peak / 2**20,
                   **({} if peak_sample is None else {"peak_sample_mib": peak_sample / 2**20}),
                   distinct_ratio=distinct / behaviours if behaviours else None)
    return row


def compare_text_rows(rows: List[Dict[str, object]], scores: Sequence[torch.Tensor],
                      test: CTRDataset, rounds: int = 1000, seed: int = 0) -> None:
    """Adds to each BAHE-ablation row (those with ``text_len``) ``auc_se``, the bootstrap
    standard error of its test AUC, and where an ``llm_ctr`` row of the same length exists
    ``auc_vs_llm_ctr`` (AUC minus the baseline's) with ``auc_vs_llm_ctr_se``, the paired
    bootstrap's (``rounds`` resamples of whole test users: their candidates share a
    history). ``scores[i]`` are row i's test logits (S,)."""
    text = [i for i, r in enumerate(rows) if "text_len" in r]
    if not text or rounds < 1:
        return
    boot = auc_bootstrap(torch.stack([scores[i] for i in text]), test.sample_label,
                         test.sample_user, rounds=rounds, seed=seed)
    col = dict(zip(text, range(len(text))))

    def spread(x: torch.Tensor) -> float:   # resamples that lack a class (NaN) left out
        x = x[~x.isnan()]
        return float(x.std()) if x.numel() > 1 else float("nan")

    for i in text:
        rows[i]["auc_se"] = spread(boot[:, col[i]])
        base = [j for j in text if rows[j]["model"] == "llm_ctr"
                and rows[j]["max_len"] == rows[i]["max_len"]]
        if base and base[0] != i:
            rows[i]["auc_vs_llm_ctr"] = rows[i]["auc"] - rows[base[0]]["auc"]
            rows[i]["auc_vs_llm_ctr_se"] = spread(boot[:, col[i]] - boot[:, col[base[0]]])


def _plot(rows: List[Dict[str, object]], path: str, stamp: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = sorted((r for r in rows if r["model"] == name), key=lambda r: r["max_len"])
        xs = [r["max_len"] for r in rs]
        style = dict(marker="o", label=name, linestyle="--" if name == "din" else "-")
        ax1.plot(xs, [r["auc"] for r in rs], **style)
        ax2.plot(xs, [r["train_samples_per_s"] for r in rs], **style)
    for ax, ylabel in ((ax1, "test AUC"), (ax2, "training samples / s")):
        ax.set_xscale("log")
        ax.set_xlabel("history length available (behaviours)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_title("AUC vs history length (DIN reads only its recent window)")
    ax2.set_yscale("log")
    ax2.set_title("training throughput")
    fig.suptitle(stamp, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: Sequence[Dict[str, object]], oracle_auc: Optional[float] = None) -> str:
    """The README table: test AUC (log-loss) per model and history length; the BAHE rows'
    table (with bootstrap standard errors, the AUC difference to LLM-CTR and the oracle's
    AUC when given)."""
    lengths = sorted({r["max_len"] for r in rows})
    out = ["| model | " + " | ".join(f"L={n}" for n in lengths) + " | samples/s at L="
           f"{lengths[-1]} |", "|---|" + "---:|" * (len(lengths) + 1)]
    for name in dict.fromkeys(r["model"] for r in rows):
        cell = {r["max_len"]: r for r in rows if r["model"] == name}
        cells = [f"{cell[n]['auc']:.4f} ({cell[n]['logloss']:.3f})" if n in cell else "-"
                 for n in lengths]
        last = cell.get(lengths[-1])
        tput = f"{last['train_samples_per_s']:.0f}" if last else "-"
        out.append(f"| {name} | " + " | ".join(cells) + f" | {tput} |")
    text = [r for r in rows if "epoch_s" in r]
    if text:
        by_epoch = any("auc_by_epoch" in r for r in text)   # --epoch-auc: the AUC curve too
        per_sample = any("peak_sample_mib" in r for r in text)  # whole-user steps
        out += ["", "| row | L (text length) | s / epoch | CPU s / epoch | peak MiB / step | "
                + (f"peak MiB / {PEAK_SAMPLE_BATCH} samples | " if per_sample else "")
                + "AUC (± SE) | vs LLM-CTR (± SE) | distinct ratio |"
                + (" AUC after each epoch |" if by_epoch else ""),
                "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if per_sample else "")
                + ("---|" if by_epoch else "")]
        for r in text:
            mib = "-" if r["peak_step_mib"] is None else f"{r['peak_step_mib']:.0f}"
            ratio = "-" if r["distinct_ratio"] is None else f"{r['distinct_ratio']:.3f}"
            se = f" ± {r['auc_se']:.4f}" if "auc_se" in r else ""
            diff = (f"{r['auc_vs_llm_ctr']:+.4f} ± {r['auc_vs_llm_ctr_se']:.4f}"
                    if "auc_vs_llm_ctr" in r else "–")
            if per_sample:
                mib += " | " + (f"{r['peak_sample_mib']:.0f}" if "peak_sample_mib" in r
                                else "-")
            out.append(f"| {r['model']} | {r['max_len']} ({r['text_len']}) | "
                       f"{r['epoch_s']:.1f} | {r['epoch_cpu_s']:.1f} | {mib} | "
                       f"{r['auc']:.4f}{se} | {diff} | {ratio} |"
                       + (" " + ", ".join(f"{a:.3f}" for a in r.get("auc_by_epoch", []))
                          + " |" if by_epoch else ""))
        if oracle_auc is not None:
            out += ["", f"Oracle AUC (the generator's click probabilities, same test "
                    f"samples): {oracle_auc:.4f}"]
    return "\n".join(out)


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastattn-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {', '.join(list(MODELS) + list(ABLATIONS))}")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                   help="history lengths to train at (comma-separated)")
    p.add_argument("--csv", help="train on this behaviour log (user,item,category,"
                   "timestamp[,label]) instead of the synthetic set")
    p.add_argument("--users", type=int, default=2000, help="synthetic users")
    p.add_argument("--items", type=int, default=2000, help="synthetic items")
    p.add_argument("--cats", type=int, default=100, help="synthetic categories")
    p.add_argument("--candidates", type=int, default=16,
                   help="synthetic samples (scored candidates) per user")
    p.add_argument("--max-history", type=int, default=2000,
                   help="longest synthetic history")
    p.add_argument("--behaviour-types", type=int, default=1,
                   help="synthetic behaviour types (the BAHE rows' feature-parallel groups)")
    p.add_argument("--variant", default="planted", choices=sorted(VARIANTS),
                   help="synthetic variant: planted (default), long (long-term interests "
                        "dominate the clicks), recent (the recent window does) or text (the "
                        "candidate category's share of the recent behaviours does; the BAHE "
                        "rows)")
    p.add_argument("--label-window", type=int, default=None,
                   help="--variant text: the recent behaviours whose category shares drive "
                        "the clicks (default 128)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--test-frac", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--embed-dim", type=int, default=TrainConfig.embed_dim)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="force a kernel backend")
    p.add_argument("--no-dedup", dest="dedup", action="store_false",
                   help="embed every history position (the dense path) instead of each "
                        "distinct behaviour of a batch once")
    p.add_argument("--sparse-embeddings", action="store_true",
                   help="sparse gradients for the item and category tables, trained by "
                        "SparseAdam (the rest by Adam): only the rows a step looked up are "
                        "written and updated (models with those tables; single process)")
    p.add_argument("--share-histories", action="store_true",
                   help="training batches of whole users (shuffled by user) whose candidates "
                        "share one history row: each history encoded once per batch (same "
                        "outputs and gradients per sample; single process)")
    p.add_argument("--bootstrap", type=int, default=TrainConfig.bootstrap,
                   help="bootstrap resamples of test users for the BAHE rows' AUC standard "
                        "errors (0: none)")
    p.add_argument("--epoch-auc", action="store_true",
                   help="evaluate the test AUC after every epoch (auc_by_epoch in each row)")
    p.add_argument("--retrieval", action="store_true",
                   help="also write retrieval.{csv,json}: ETA's recall@k against the exact "
                        "attention top-k by bits, and the planted-interest hit rate per "
                        "model and length (synthetic data only)")
    p.add_argument("--retrieval-bits", default=TrainConfig.retrieval_bits,
                   help="signature bits of the recall@k rows (comma-separated)")
    p.add_argument("--retrieval-k", default=TrainConfig.retrieval_k,
                   help="k of further recall@k rows besides each model's own topk "
                        "(comma-separated)")
    p.add_argument("--model-arg", action="append", default=[], metavar="MODEL:KEY=VALUE",
                   help="a constructor argument of one model, e.g. eta:time_buckets=16 "
                        "(repeatable; VALUE is a Python literal)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true",
                   help="small data, one epoch, lengths 50,200 (a smoke run)")
    p.add_argument("--out", default="bench/results", help="where train.{csv,json,png} go")
    args = p.parse_args(argv, namespace=TrainConfig())
    if args.quick:
        args.users, args.epochs = min(args.users, 600), 1
        args.max_history, args.lengths = min(args.max_history, 1000), "50,200"
    for opt in ("retrieval_bits", "retrieval_k"):
        vals = getattr(args, opt)
        try:
            vals = [int(b) for b in (vals.split(",") if isinstance(vals, str) else vals)]
        except ValueError:
            p.error(f"--{opt.replace('_', '-')} must be comma-separated ints, got {vals!r}")
        if any(b < 1 for b in vals):
            p.error(f"--{opt.replace('_', '-')} must be >= 1, got {vals}")
        setattr(args, opt, vals)
    args.model_args = {}
    for item in args.model_arg:
        model, sep, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not (sep and eq and key.isidentifier()) or model not in MODELS:
            p.error(f"--model-arg must be MODEL:KEY=VALUE with MODEL one of {list(MODELS)}, "
                    f"got {item!r}")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            p.error(f"--model-arg {item!r}: VALUE must be a Python literal")
        args.model_args.setdefault(model, {})[key] = value
    if args.retrieval and args.csv:
        p.error("--retrieval measures the synthetic set's planted interests: not with --csv")
    if args.variant != "planted" and args.csv:
        p.error("--variant chooses a synthetic variant: not with --csv")
    unknown = [m for m in args.models.split(",") if m not in MODELS and m not in ABLATIONS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS) + list(ABLATIONS)}")
    return args


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = _parse(None if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = setup_distributed()
    if args.csv:
        data = load_csv(args.csv, seed=args.data_seed)
    else:
        data, args.truth = make_synthetic(
            n_users=args.users, n_items=args.items, n_cats=args.cats,
            candidates_per_user=args.candidates, max_len=args.max_history,
            n_behaviour_types=args.behaviour_types, seed=args.data_seed, variant=args.variant,
            return_truth=True,
            **({} if args.label_window is None else {"label_window": args.label_window}))
    is_test = data.split_mask(args.test_frac, seed=args.data_seed)
    train, test = data.subset(~is_test), data.subset(is_test)
    if args.truth is not None:           # the generator's click probabilities: the oracle
        args.oracle_auc = auc(args.truth["click_prob"][is_test], test.sample_label)
    models = args.models.split(",")
    lengths = [int(n) for n in args.lengths.split(",")]
    runs = [(m, n) for n in lengths for m in models]
    total = len(runs) * args.epochs * len(train)

    from tqdm.auto import tqdm
    rows, scores = [], []
    retrieval = [] if args.retrieval and rank == 0 else None
    with tqdm(total=total, unit="sample", disable=rank != 0, file=sys.stderr) as progress:
        for name, n in runs:
            rows.append(train_model(name, train, test, n, args, progress, rank, world,
                                    retrieval, scores))
            progress.write(f"{name:>5} L={n:<6} AUC {rows[-1]['auc']:.4f}  log-loss "
                           f"{rows[-1]['logloss']:.4f}  "
                           f"{rows[-1]['train_samples_per_s']:.0f} samples/s")
    if rank == 0:
        compare_text_rows(rows, scores, test, args.bootstrap, args.seed)
        _write(rows, args, data, world, retrieval)
    if dist.is_initialized():
        gc.collect()        # DDP reducers first: dropping the group's last reference under
        dist.destroy_process_group()   # the GIL can deadlock gloo's worker threads
    return 0


def _write(rows, args, data: CTRDataset, world: int, retrieval=None) -> None:
    from .bench.measure import machine_info

    os.makedirs(args.out, exist_ok=True)
    command = "fastattn-train " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = machine_info()
    stamp = f"{machine.get('host_cpu', '')}, {torch.get_num_threads()} threads, " \
            f"world {world} · {command}"
    meta = {"command": command, "machine": machine, "data": data.stats(),
            "oracle_auc": getattr(args, "oracle_auc", None),
            "config": {k: v for k, v in vars(args).items()
                       if not k.startswith("_") and k not in ("truth", "oracle_auc")}}
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump({"rows": rows, **meta}, f, indent=1, default=str)
    with open(os.path.join(args.out, "train.csv"), "w", newline="") as f:
        # the BAHE rows add columns: the union, in first-seen order
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, os.path.join(args.out, "train.png"), stamp)
    print("\n" + markdown(rows, getattr(args, "oracle_auc", None)))
    if retrieval is not None:
        from .bench import retrieval as rq
        with open(os.path.join(args.out, "retrieval.json"), "w") as f:
            json.dump({"rows": retrieval, **meta}, f, indent=1, default=str)
        with open(os.path.join(args.out, "retrieval.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in retrieval
                                                                for k in r)))
            w.writeheader()
            w.writerows(retrieval)
        print("\n" + rq.markdown(retrieval))
        print(f"wrote {args.out}/retrieval.{{csv,json}}")
    print(f"\n{stamp}\nwrote {args.out}/train.{{csv,json,png}}")


if __name__ == "__main__":
    sys.exit(main())
