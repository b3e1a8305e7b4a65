"""Serving sweeps. The User Interest Center: events applied per second and scoring latency
from stored state, both against re-running the model over the user's full history, vs the
history length so far. SUM: get() latency under concurrent load vs synchronous inference.
Listed by :mod:`fastattn.bench.registry` through
:data:`SERVING_SWEEPS` (CPU only: the stores live on the host).

A Redis backend is measured too where ``FASTATTN_REDIS_URL`` points at a server (``make
test`` starts one; ``redis-server --port 6390 --save ''`` does for a bench run); without it
that implementation is listed as skipped with the reason.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
import weakref
from typing import Callable, Dict

import numpy as np
import torch

from ..data.batch import Batch
from .sweep import Point, Sweep

N_ITEMS, N_CATS = 100_000, 1_000


def _models():
    from ..models import MIMN, ETANet
    torch.manual_seed(0)
    mimn = MIMN(N_ITEMS, N_CATS, embed_dim=16, mem_dim=32, slots=8, ctrl_dim=32,
                miu_dim=32).eval()
    eta = ETANet(N_ITEMS, N_CATS, embed_dim=16, topk=64, hash_bits=64).eval()
    return mimn, eta


def _histories(U: int, T: int, seed: int):
    g = np.random.default_rng(seed)
    items = g.integers(1, N_ITEMS + 1, (U, T))
    return items, items % N_CATS + 1          # each item has one category


def _redis_store(spec):
    """A RedisStateStore under a fresh prefix, or (None, reason)."""
    url = os.environ.get("FASTATTN_REDIS_URL")
    if not url:
        return None, "FASTATTN_REDIS_URL is not set (no Redis server to measure)"
    try:
        from ..serving import RedisStateStore
        store = RedisStateStore(url, spec, prefix=f"fastattn-bench:{uuid.uuid4().hex}:")
        store._r.ping()
        return store, None
    except Exception as e:  # noqa: BLE001 - an absent server skips, never fails, the sweep
        return None, f"Redis at {url} unavailable: {e}"


def _apply_impl(model, store, items, cats, T: int) -> Callable[[], object]:
    """One call = one new event for each of the U users (timestamps after their history)."""
    from ..serving import InterestUpdater
    up = InterestUpdater(model, store)
    U = items.shape[0]
    up.warm_start({u: (items[u], cats[u], np.arange(T, dtype=np.float64)) for u in range(U)},
                  progress=False)
    g = np.random.default_rng(1)
    clock = [T]

    def apply():
        t = clock[0]
        clock[0] += 1
        new = g.integers(1, N_ITEMS + 1, U)
        return up.apply({"user_id": np.arange(U), "event_id": np.full(U, t),
                         "item": new, "category": new % N_CATS + 1,
                         "timestamp": np.full(U, float(t))})
    return apply


def uic_apply_sweep(quick: bool) -> Sweep:
    """InterestUpdater.apply: one event for each of B users per call (read the B states,
    one MIMN step, write them in one transaction) vs re-running each user's whole history."""
    B = 256
    lengths = [100, 1000] if quick else [100, 1000, 5000]
    sweep = Sweep("uic_apply", f"UIC: one event for each of B={B} users applied to the stored "
                  "MIMN states (D=32, slots=8) vs re-running the histories", x="T",
                  baseline="rerun_history")

    def build(T: int, point: Point):
        def make() -> Dict[str, Callable[[], object]]:
            from ..serving import BoundStepper, SQLiteStateStore, StateSpec
            mimn, _ = _models()
            items, cats = _histories(B, T, T)
            spec = StateSpec.from_model(mimn)
            tmp = tempfile.TemporaryDirectory(prefix="fastattn-bench-")
            sqlite = SQLiteStateStore(os.path.join(tmp.name, "uic.db"), spec)
            impls = {"apply_sqlite": _apply_impl(mimn, sqlite, items, cats, T)}
            redis, why = _redis_store(spec)
            if redis is not None:
                impls["apply_redis"] = _apply_impl(mimn, redis, items, cats, T)
            else:                          # listed, with the reason, never called
                impls["apply_redis"], point.skip["apply_redis"] = (lambda: None), why
            step = BoundStepper(mimn.encoder)
            it, ct = torch.from_numpy(items), torch.from_numpy(cats)
            with torch.no_grad():
                state = mimn.encode(Batch(it, ct, torch.full((B,), T), it[:, 0], ct[:, 0]))
                x = mimn.embed(it[:, -1], ct[:, -1]).contiguous()

            def step_only():               # the compute alone: no store, no validation
                with torch.no_grad():
                    return step(x, state)

            def rerun():
                with torch.no_grad():
                    return mimn.encode(Batch(it, ct, torch.full((B,), T), it[:, 0], ct[:, 0]))

            impls.update(step_only=step_only, rerun_history=rerun)
            impls["_keep"] = lambda: tmp   # holds the temp dir while the point is measured
            return impls
        return make

    for T in lengths:
        point = Point({"T": T, "B": B}, lambda: {}, pairs=B)
        point.build = _drop_keep(build(T, point))
        sweep.points.append(point)
    return sweep


def uic_score_sweep(quick: bool) -> Sweep:
    """Scoring 1,000 candidates for one user: MIMN from its stored state vs the MIMN model
    over the full history; ETA-Net with the signature table (ETA+) vs hashing the history
    per request."""
    C = 1000
    lengths = [100, 1000] if quick else [100, 1000, 10000]
    sweep = Sweep("uic_score", f"Scoring {C} candidates for one user: MIMN from the stored "
                  "state, ETA-Net with a signature table, vs the models over the full history",
                  x="T", baseline="mimn_rerun_history",
                  baseline_of=lambda impl: "eta_hash_history" if impl.startswith("eta")
                  else "mimn_rerun_history")

    def build(T: int):
        def make() -> Dict[str, Callable[[], object]]:
            from ..serving import (ETAScorer, InterestUpdater, MIMNScorer, SignatureTable,
                                   SQLiteStateStore, StateSpec)
            mimn, eta = _models()
            items, cats = _histories(1, T, T)
            tmp = tempfile.TemporaryDirectory(prefix="fastattn-bench-")
            store = SQLiteStateStore(os.path.join(tmp.name, "uic.db"),
                                     StateSpec.from_model(mimn))
            InterestUpdater(mimn, store).warm_start(
                {0: (items[0], cats[0], np.arange(T, dtype=np.float64))}, progress=False)
            g = torch.Generator().manual_seed(T)
            tgt = torch.randint(1, N_ITEMS + 1, (C,), generator=g)
            tcat = tgt % N_CATS + 1
            it, ct = torch.from_numpy(items), torch.from_numpy(cats)
            batch = Batch(it, ct, torch.tensor([T]), tgt, tcat)
            scorer = MIMNScorer(mimn, store)
            item_cat = torch.arange(N_ITEMS + 1) % N_CATS + 1
            item_cat[0] = 0
            eta_scorer = ETAScorer(eta, SignatureTable(eta, item_cat))

            def run(model, **kw):
                with torch.no_grad():
                    return model(batch, **kw)

            return {"mimn_stored_state": lambda: scorer.score(0, tgt, tcat),
                    "mimn_rerun_history": lambda: run(mimn),
                    "eta_signature_table": lambda: eta_scorer.score(it[0], ct[0], tgt, tcat),
                    "eta_hash_history": lambda: run(eta),
                    "_keep": lambda: tmp}
        return make

    sweep.points = [Point({"T": T, "C": C}, _drop_keep(build(T)), pairs=C) for T in lengths]
    return sweep


class _SlowModel(torch.nn.Module):
    """The SUM tower, then a sleep up to ``ms`` per batch: a user model 10-100x slower than
    a store read (the sleep releases the GIL, as inference on an accelerator would)."""

    def __init__(self, tower, ms: float):
        super().__init__()
        self.tower, self.ms = tower, ms

    def forward(self, sparse, dense):
        t0 = time.perf_counter()
        out = self.tower(sparse, dense)
        time.sleep(max(0.0, self.ms / 1e3 - (time.perf_counter() - t0)))
        return out


class _Features:
    """User ids -> the tower's (sparse, dense) inputs, from fixed random tables (a picklable
    object, so that process workers can take it)."""

    def __init__(self, users: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.sparse = torch.stack([torch.randint(0, c, (users,), generator=g)
                                   for c in (N_ITEMS, N_CATS, 100)], 1)
        self.dense = torch.randn(users, 16, generator=g)

    def __call__(self, uids):
        ix = torch.tensor(uids)
        return self.sparse[ix], self.dense[ix]


def load_run(get: Callable[[int], object], n_users: int, rps: float, threads: int,
             seconds: float, seed: int = 0) -> Dict[str, float]:
    """Open-loop load: ``threads`` clients each send ``rps / threads`` requests per second
    (each at its scheduled time, or at once when behind) of ``get(user)`` for ``seconds``;
    returns the latency percentiles (ms), the achieved requests/s and the count."""
    lat: list = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.05
    per = threads / rps

    def client(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        mine = []
        k = 0
        while True:
            at = start + (k + i / threads) * per
            if at - start >= seconds:
                break
            wait = at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            t0 = time.perf_counter()
            get(int(rng.integers(n_users)))
            mine.append(time.perf_counter() - t0)
            k += 1
        with lock:
            lat.extend(mine)

    pool = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(lat) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "max_ms": round(float(ms.max()), 3), "achieved_rps": round(len(ms) / wall, 1),
            "requests": len(ms)}


def sum_serving_sweep(quick: bool) -> Sweep:
    """SUM: get() of one user's embedding from the asynchronous service (SQLite store, 2
    refresh worker processes) while 8 client threads send 1,000 requests/s, vs synchronous
    inference (the model run for the request, then written), by model latency. The same
    load on thread workers gives ``p99_ms_threads`` (their Python shares get()'s GIL)."""
    users, rps, threads, seconds = 2000, 1000.0, 8, (2.0 if quick else 4.0)
    sweep = Sweep("sum_serving", f"SUM: get() of one user's (K=2, D=96) embedding, async "
                  f"service (2 worker processes) vs synchronous inference; load: {threads} "
                  f"client threads at {rps:,.0f} requests/s for {seconds:g} s over {users} "
                  f"users", x="model_ms", baseline="sync_inference",
                  info=["p50_ms", "p99_ms", "max_ms", "achieved_rps", "dropped", "refreshed",
                        "cold", "p99_ms_threads"])

    def build(ms: float, params: Dict[str, float]):
        def make() -> Dict[str, Callable[[], object]]:
            from ..serving import (EmbeddingSpec, SQLiteStateStore, SUMUserTower,
                                   UserEmbeddingService)
            torch.manual_seed(0)
            tower = SUMUserTower([N_ITEMS, N_CATS, 100], dense_dim=16, dim=96,
                                 pyramid=(8, 2)).eval()
            model, features = _SlowModel(tower, ms), _Features(users)
            tmp = tempfile.TemporaryDirectory(prefix="fastattn-bench-")
            spec = EmbeddingSpec(tower.config(), tower.K, tower.D)

            def service(mode: str, name: str):
                store = SQLiteStateStore(os.path.join(tmp.name, name), spec)
                svc = UserEmbeddingService(model, store, features, workers=2, batch_size=64,
                                           mode=mode)
                for b in range(0, users, 500):              # every user served once before
                    svc.refresh_now(list(range(b, min(users, b + 500))))
                return svc

            with service("thread", "sum-threads.db") as svc:
                run = load_run(lambda u: svc.get([u]), users, rps, threads, seconds)
                params["p99_ms_threads"] = run["p99_ms"]
            svc = service("process", "sum.db")
            params.update(load_run(lambda u: svc.get([u]), users, rps, threads, seconds))
            st = svc.stats()
            params.update(dropped=st["dropped"], refreshed=st["refreshed"], cold=st["cold"])
            svc.wait_idle(60)
            weakref.finalize(tmp, svc.close)        # stopped with the point's implementations
            g = np.random.default_rng(2)
            return {"async_get": lambda: svc.get([int(g.integers(users))]),
                    "sync_inference": lambda: svc.refresh_now([int(g.integers(users))]),
                    "_keep": lambda: tmp}
        return make

    for ms in ([50] if quick else [5, 50]):
        params: Dict[str, float] = {"model_ms": ms}
        sweep.points.append(Point(params, _drop_keep(build(ms, params)), pairs=1))
    return sweep


def _drop_keep(make: Callable[[], Dict[str, Callable[[], object]]]):
    """The point's implementations without the ``_keep`` entry, whose closure keeps the
    temporary store directory alive exactly as long as the implementations are."""
    def build() -> Dict[str, Callable[[], object]]:
        impls = make()
        keep = impls.pop("_keep")
        for fn in list(impls.values()):
            fn.__dict__["_keep"] = keep
        return impls
    return build


SERVING_SWEEPS: Dict[str, Callable[[bool], Sweep]] = {"uic_apply": uic_apply_sweep,
                                                     "uic_score": uic_score_sweep,
                                                     "sum_serving": sum_serving_sweep}

