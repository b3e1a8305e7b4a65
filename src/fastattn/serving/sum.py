"""SUM (Scaling User Modeling, Meta): a user tower whose embeddings are served
asynchronously (SOAP): a request reads the stored embedding at once and never waits for
inference; background workers recompute the embeddings of requested users with the latest
model snapshot and write them back (fp16, pooled over the last refreshes; see
:mod:`fastattn.serving.store.embedding`).

* :class:`SUMUserTower`: N_0 feature embeddings -> a pyramid of interaction layers (an MLP,
  a dot-compression and an attention extractor, summed, with a residual MLP) -> N_K
  embeddings of width D.
* :class:`UserEmbeddingService`: ``get(user_ids)`` -> (B, K, D) from the store, or a
  cold-start default flagged as such; each get enqueues a refresh. The queue is bounded,
  deduplicated per user and drops its oldest entry when full (counted in :meth:`stats`).
  Refresh batches are vectorised over their users (one read, one compare-and-set write)
  and run in worker threads or, with ``mode="process"``, worker processes.
"""
from __future__ import annotations

import collections
import math
import multiprocessing
import os
import pickle
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .store import UserId, UserStateStore, WriteConflictError
from .store.embedding import EmbeddingSpec, pool_batch
from .store.record import _user_key

__all__ = ["SUMUserTower", "InteractionLayer", "UserEmbeddingService", "Served"]


# --------------------------------------------------------------------------- the tower

class InteractionLayer(nn.Module):
    """(B, n_in, D) -> (B, n_out, D): the sum of three extractors of interactions between the
    n_in embeddings, plus a residual path, then LayerNorm.

    * MLP: the flattened n_in·D features through a hidden layer to n_out·D.
    * Dot compression: the pairwise dot products X Xᵀ (n_in, n_in) compressed by a learned
      (n_in, n_out) map into weights over the inputs: Y = (X Xᵀ W)ᵀ X / D.
    * Attention extractor: n_out learned queries attend over the n_in embeddings.
    * Residual MLP: a learned (n_in -> n_out) mix of the inputs through a two-layer MLP.
    """

    def __init__(self, n_in: int, n_out: int, dim: int, hidden: int = 256, heads: int = 2):
        super().__init__()
        self.n_in, self.n_out, self.dim = n_in, n_out, dim
        self.mlp = nn.Sequential(nn.Linear(n_in * dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_out * dim))
        self.compress = nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))
        self.queries = nn.Parameter(torch.randn(n_out, dim) / math.sqrt(dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mix = nn.Linear(n_in, n_out)
        self.residual = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        mlp = self.mlp(x.flatten(1)).view(B, self.n_out, self.dim)
        dots = x @ x.transpose(1, 2)                                  # (B, n_in, n_in)
        dot = (dots @ self.compress).transpose(1, 2) @ x / self.dim   # (B, n_out, D)
        att, _ = self.attn(self.queries.expand(B, -1, -1), x, x, need_weights=False)
        base = self.mix(x.transpose(1, 2)).transpose(1, 2)            # (B, n_out, D)
        return self.norm(base + self.residual(base) + mlp + dot + att)


class SUMUserTower(nn.Module):
    """The SUM user model: sparse features (ids) and dense features -> K embeddings of D.

    Args:
        cardinalities: the vocabulary size of each of the sparse features (N_0 of them,
            together with the dense projection's one embedding).
        dense_dim: width of the dense feature vector (0: none).
        dim: embedding width D (SUM: 96).
        pyramid: embedding counts after each interaction layer, ending in K (SUM: K=2).

    ``forward(sparse (B, n_sparse) int64, dense (B, dense_dim) float) -> (B, K, D)``.
    Any other ``nn.Module`` mapping user features or a history to (B, K, D) serves too.
    """

    def __init__(self, cardinalities: Sequence[int], dense_dim: int = 0, dim: int = 96,
                 pyramid: Sequence[int] = (8, 2), hidden: int = 256):
        super().__init__()
        if not cardinalities or any(c < 1 for c in cardinalities) or not pyramid or \
                any(n < 1 for n in pyramid) or dim < 1 or dense_dim < 0:
            raise ValueError("cardinalities and pyramid must be non-empty lists of positive "
                             "ints, dim positive and dense_dim >= 0")
        self.embeddings = nn.ModuleList(nn.Embedding(c, dim) for c in cardinalities)
        self.dense = nn.Linear(dense_dim, dim) if dense_dim else None
        n = len(cardinalities) + (1 if dense_dim else 0)
        layers = []
        for n_out in pyramid:
            layers.append(InteractionLayer(n, n_out, dim, hidden))
            n = n_out
        self.layers = nn.Sequential(*layers)
        self.K, self.D = pyramid[-1], dim
        self._config = {"name": "sum_tower", "cardinalities": list(cardinalities),
                        "dense_dim": dense_dim, "dim": dim, "pyramid": list(pyramid),
                        "hidden": hidden}

    def config(self) -> Dict[str, object]:
        return dict(self._config)

    def forward(self, sparse: Tensor, dense: Optional[Tensor] = None) -> Tensor:
        if sparse.dim() != 2 or sparse.shape[1] != len(self.embeddings):
            raise ValueError(f"sparse must be (B, {len(self.embeddings)}) ids, got "
                             f"{tuple(sparse.shape)}")
        feats = [emb(sparse[:, i]) for i, emb in enumerate(self.embeddings)]
        if self.dense is not None:
            if dense is None:
                raise ValueError("this tower takes dense features (B, dense_dim)")
            feats.append(self.dense(dense))
        return self.layers(torch.stack(feats, 1))


# --------------------------------------------------------------------------- the service

class Served(NamedTuple):
    """What :meth:`UserEmbeddingService.get` returns for B users."""

    embeddings: Tensor      # (B, K, D) float32: pooled stored embeddings, or the default
    cold: Tensor            # (B,) bool: nothing stored yet, the cold-start default served
    age_s: Tensor           # (B,) float64: seconds since the newest refresh (inf if cold)
    tags: List[Optional[str]]   # model snapshot of each served embedding (None if cold)


class _Refresher:
    """One worker's compute path for a batch of users, vectorised over the batch: features
    -> model -> one read of their records -> pool -> encode -> one compare-and-set write.
    A conflict (another worker or process refreshed some users meanwhile) re-reads and
    pools those users again."""

    def __init__(self, features: Callable[[List[UserId]], Sequence[Tensor]],
                 writer: UserStateStore):
        self.features, self.writer, self.spec = features, writer, writer.spec

    def run(self, model: nn.Module, tag: str, user_ids: Sequence[UserId]) -> int:
        """Refresh ``user_ids`` with ``model``; returns the number of users written."""
        users = list(dict.fromkeys(user_ids))
        if not users:
            return 0
        with torch.inference_mode():
            emb = model(*self.features(users))
        emb = emb.detach().float().cpu().numpy()
        spec = self.spec
        if emb.shape != (len(users), spec.K, spec.D):
            raise ValueError(f"the model returned {emb.shape}, expected (B, K, D)="
                             f"{(len(users), spec.K, spec.D)}")
        pending = np.arange(len(users))
        for _ in range(16):
            sub = [users[i] for i in pending]
            got = spec.decode_batch(self.writer.read_blobs(sub), sub)
            pooled, raw, n = pool_batch(got.raw, got.n, emb[pending])
            blobs = spec.encode_batch(pooled, raw, n, [tag] * len(sub),
                                      np.full(len(sub), time.time()), sub)
            try:
                self.writer.write_blobs(list(zip(sub, got.tokens, blobs)))
                return len(users)
            except WriteConflictError as e:
                again = {_user_key(u) for u in e.users}
                pending = np.array([i for i in pending if _user_key(users[i]) in again])
        raise RuntimeError(f"gave up refreshing {[users[i] for i in pending[:5]]} after 16 "
                           f"write conflicts")


def _process_main(conn, opener, features: bytes, model: bytes, threads: int,
                  nice: int = 0) -> None:
    """A refresh worker process: lowers its CPU priority by ``nice``, opens the store, then
    serves ("refresh", users) with ("ok", n) or ("error", message) and takes ("model",
    pickled (model, tag)) swaps, until its pipe closes."""
    try:
        if nice and hasattr(os, "nice"):
            os.nice(nice)
        torch.set_num_threads(threads)
        store = opener()
        refresher = _Refresher(pickle.loads(features), store)
        net, tag = pickle.loads(model)
    except BaseException as e:    # noqa: BLE001 - reported to the parent, then exit
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg[0] == "model":
            net, tag = pickle.loads(msg[1])
        elif msg[0] == "refresh":
            try:
                conn.send(("ok", refresher.run(net, tag, msg[1])))
            except Exception as e:     # noqa: BLE001 - the batch is lost, the worker serves on
                conn.send(("error", f"{type(e).__name__}: {e}"))
        else:
            break
    store.close()


class _ProcessWorker:
    """The parent's handle on one refresh worker process (started with ``ctx``), restarted
    after it dies. Used by one dispatch thread only."""

    def __init__(self, ctx, opener, features: bytes, threads: int, nice: int = 0):
        self.ctx, self.opener, self.features, self.threads = ctx, opener, features, threads
        self.nice = nice
        self.proc, self.conn, self.model_version, self.pid = None, None, -1, None

    def start(self, model: bytes, version: int) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_process_main, name="sum-refresh-process",
                                     args=(child, self.opener, self.features, model,
                                           self.threads, self.nice), daemon=True)
        self.proc.start()
        child.close()
        self.conn, self.model_version, self.pid = parent, version, self.proc.pid

    def ready(self, timeout: float) -> None:
        if not self.conn.poll(timeout):
            self.stop(0)
            raise RuntimeError(f"refresh worker process not ready after {timeout:g} s")
        try:
            kind, what = self.conn.recv()
        except EOFError:
            kind, what = "error", f"exited with code {self.proc.exitcode} while starting"
        if kind != "ready":
            self.stop(0)
            raise RuntimeError(f"refresh worker process failed to start: {what}")

    def run(self, users: List[UserId], model: bytes, version: int) -> int:
        """Refresh ``users`` in the process (sending ``model`` first if it has an older
        one); RuntimeError on a failed batch or a dead process (restarted for the next)."""
        if self.proc is None or not self.proc.is_alive():
            self.stop(0)
            self.start(model, version)
            self.ready(120)
        try:
            if self.model_version != version:
                self.conn.send(("model", model))
                self.model_version = version
            self.conn.send(("refresh", users))
            kind, what = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.stop(0)
            raise RuntimeError(f"refresh worker process died (exit code {code}); its batch "
                               f"of {len(users)} users was lost") from None
        if kind != "ok":
            raise RuntimeError(what)
        return what

    def stop(self, timeout: float) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None and self.proc.pid is not None:     # started
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        self.proc = self.conn = self.pid = None


class UserEmbeddingService:
    """Asynchronous user-embedding serving (SUM's SOAP).

    Args:
        model: maps ``features(user_ids)`` to (B, K, D) (a :class:`SUMUserTower` or any
            module); run under ``torch.inference_mode`` by the workers only.
        store: a store opened with an :class:`EmbeddingSpec` (SQLite or Redis).
        features: ``features(user_ids) -> tuple of model inputs`` for a batch of users.
        snapshot: tag of the model snapshot (written with every embedding it computes);
            :meth:`set_model` swaps in a new snapshot.
        workers: background refresh workers.
        mode: ``"thread"``: the workers are threads of this process (torch releases the GIL
            during inference, but each batch's Python still competes with ``get`` for it);
            ``"process"``: each worker is a process (``start_method``, default spawn, one
            torch thread each) with its own store handle (``store.opener()``), and this
            process only dispatches batches, so refreshes never hold ``get``'s GIL. Process
            mode needs a picklable ``model`` and ``features`` (module-level functions or
            objects) and a store that can be reopened (SQLite, or Redis from a URL); a
            worker process that dies loses its batch (counted in ``worker_errors``) and is
            restarted for the next.
        worker_nice: process mode: the worker processes lower their CPU priority by this
            (``os.nice``, 0..19; default 10), so that on a busy host the request threads
            preempt refresh work instead of queueing behind it for a CPU; refreshes still
            get every idle cycle.
        batch_size: users per refresh batch.
        max_queue: bound of the refresh queue; when full, the oldest queued user is dropped
            (counted) to admit the new one.
        default: (K, D) cold-start embedding (default zeros).

    ``get`` reads the store and enqueues refreshes: it never runs the model, so its latency
    does not depend on the model's. Refreshes of one user are deduplicated while queued.
    """

    def __init__(self, model: nn.Module, store: UserStateStore,
                 features: Callable[[List[UserId]], Sequence[Tensor]], *, snapshot: str = "v0",
                 workers: int = 1, mode: str = "thread", batch_size: int = 64,
                 max_queue: int = 4096, default: Optional[Tensor] = None,
                 start_method: str = "spawn", worker_nice: int = 10):
        spec = store.spec
        if not isinstance(spec, EmbeddingSpec):
            raise TypeError(f"store must be opened with an EmbeddingSpec, got "
                            f"{type(spec).__name__}")
        for name, v in (("workers", workers), ("batch_size", batch_size),
                        ("max_queue", max_queue)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if mode not in ("thread", "process"):
            raise ValueError(f"mode must be 'thread' or 'process', got {mode!r}")
        if isinstance(worker_nice, bool) or not isinstance(worker_nice, int) or \
                not 0 <= worker_nice <= 19:
            raise ValueError(f"worker_nice must be an int in [0, 19], got {worker_nice!r}")
        self.store, self.spec, self.features, self.mode = store, spec, features, mode
        self.batch_size, self.max_queue = batch_size, max_queue
        self.default = (torch.zeros(spec.K, spec.D) if default is None
                        else torch.as_tensor(default, dtype=torch.float32))
        if tuple(self.default.shape) != (spec.K, spec.D):
            raise ValueError(f"default must be (K, D)={(spec.K, spec.D)}, got "
                             f"{tuple(self.default.shape)}")
        self._default = self.default.numpy()
        self._model, self._snapshot = model, snapshot
        self._model_version, self._model_blob = 0, b""
        self._procs: List[_ProcessWorker] = []
        if mode == "process":
            try:
                feats, self._model_blob = pickle.dumps(features), pickle.dumps((model, snapshot))
            except Exception as e:
                raise TypeError(f"mode='process' needs a picklable model and features "
                                f"(module-level functions or objects): {e}") from e
            ctx = multiprocessing.get_context(start_method)
            self._procs = [_ProcessWorker(ctx, store.opener(), feats, 1, worker_nice)
                           for _ in range(workers)]
            try:
                for p in self._procs:
                    p.start(self._model_blob, 0)
                for p in self._procs:
                    p.ready(120)
            except BaseException:
                for p in self._procs:
                    p.stop(0)
                raise
        # The workers write through a handle of their own, so that a read never queues
        # behind a refresh's write transaction (SQLite: another connection).
        self._writer = store.connect()
        self._refresher = _Refresher(features, self._writer)
        self._queue: "collections.OrderedDict[UserId, float]" = collections.OrderedDict()
        self._cond = threading.Condition()
        self._busy = 0
        self._closed = False
        self._counts = collections.Counter()
        self._last_error: Optional[str] = None
        self._ages: "collections.deque[float]" = collections.deque(maxlen=4096)
        self._threads = [threading.Thread(target=self._work, args=(i,),
                                          name=f"sum-refresh-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # -- the request path
    def get(self, user_ids: Sequence[UserId], refresh: bool = True) -> Served:
        """The served embeddings of ``user_ids`` (one store read, decoded in one pass), and
        a refresh of each enqueued (``refresh=False``: read only)."""
        users = list(user_ids)
        got = self.spec.decode_batch(self.store.read_blobs(users), users)
        cold = ~got.present
        emb = np.where(cold[:, None, None], self._default, got.pooled).astype(np.float32)
        age = np.where(cold, np.inf, np.maximum(0.0, time.time() - got.written))
        with self._cond:
            self._counts["served"] += len(users)
            self._counts["cold"] += int(cold.sum())
            self._ages.extend(age[got.present].tolist())
        if refresh:
            self.refresh(users)
        return Served(torch.from_numpy(emb), torch.from_numpy(cold), torch.from_numpy(age),
                      got.tags)

    def refresh(self, user_ids: Sequence[UserId]) -> None:
        """Enqueue refreshes (never blocks): a user already queued keeps its place; a full
        queue drops its oldest user for each new one."""
        with self._cond:
            if self._closed:
                return
            for u in user_ids:
                if u in self._queue:
                    self._counts["deduplicated"] += 1
                    continue
                if len(self._queue) >= self.max_queue:
                    self._queue.popitem(last=False)
                    self._counts["dropped"] += 1
                self._queue[u] = time.monotonic()
                self._counts["enqueued"] += 1
            self._cond.notify_all()

    # -- the compute path
    def refresh_now(self, user_ids: Sequence[UserId]) -> None:
        """Compute and write the embeddings of ``user_ids`` in the caller (what a thread
        worker runs per batch; also a warm start): one read of their records, the model,
        pooling and encoding over the batch at once, one compare-and-set write. A user
        refreshed concurrently by another worker or process is re-read and pooled again."""
        with self._cond:
            model, tag = self._model, self._snapshot
        n = self._refresher.run(model, tag, user_ids)
        with self._cond:
            self._counts["refreshed"] += n

    def set_model(self, model: nn.Module, snapshot: str) -> None:
        """Serve refreshes from a new model snapshot from now on (process workers receive it
        before their next batch)."""
        blob = pickle.dumps((model, snapshot)) if self.mode == "process" else b""
        with self._cond:
            self._model, self._snapshot = model, snapshot
            self._model_version += 1
            self._model_blob = blob

    def _work(self, i: int) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = [self._queue.popitem(last=False)[0]
                         for _ in range(min(self.batch_size, len(self._queue)))]
                self._busy += 1
                blob, version = self._model_blob, self._model_version
            try:
                if self.mode == "thread":
                    self.refresh_now(batch)
                else:
                    n = self._procs[i].run(batch, blob, version)
                    with self._cond:
                        self._counts["refreshed"] += n
            except Exception as e:     # a failed batch is lost, the worker keeps serving
                with self._cond:
                    self._counts["worker_errors"] += 1
                    self._last_error = f"{type(e).__name__}: {e}"
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    # -- monitoring and lifetime
    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until the queue is empty and no refresh runs (True), or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def stats(self) -> Dict[str, object]:
        """Queue depth, counters (served, cold, enqueued, deduplicated, dropped, refreshed,
        worker_errors), the last worker error, the age (s) of served embeddings (median and
        max over the last 4096 served), the mode and the worker process ids (process mode)."""
        with self._cond:
            ages = np.array(self._ages) if self._ages else np.zeros(0)
            return {"queue_depth": len(self._queue), "refreshing": self._busy,
                    **{k: self._counts[k] for k in ("served", "cold", "enqueued",
                                                     "deduplicated", "dropped", "refreshed",
                                                     "worker_errors")},
                    "last_error": self._last_error, "snapshot": self._snapshot,
                    "age_s_p50": float(np.median(ages)) if ages.size else None,
                    "age_s_max": float(ages.max()) if ages.size else None,
                    "mode": self.mode, "worker_pids": [p.pid for p in self._procs]}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (queued refreshes are dropped; a running one finishes)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        for p in self._procs:
            p.stop(timeout)
        if self._writer is not self.store:
            self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
