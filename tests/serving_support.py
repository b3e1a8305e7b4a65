"""Fixtures and helpers of the serving tests: a tiny MIMN, random histories, and stores of
both backends.

Redis: ``make test`` starts a redis-server on loopback and exports FASTATTN_REDIS_URL with
FASTATTN_REQUIRE_REDIS=1 (an unreachable server then fails the redis tests). Without the URL
the tests start their own redis-server if the binary exists, else skip with the reason.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import numpy as np
import pytest
import torch

from fastattn.data.batch import Batch
from fastattn.models import MIMN
from fastattn.serving import RedisStateStore, SQLiteStateStore, StateSpec

REQUIRE_REDIS = os.environ.get("FASTATTN_REQUIRE_REDIS") == "1"
KINDS = ("sqlite", "redis")
_server: dict = {}


def _ping(url: str, wait: float) -> str | None:
    """None once ``url`` answers PING (retrying for ``wait`` s), else the last error."""
    import redis
    deadline, err = time.monotonic() + wait, None
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=2).ping()
            return None
        except redis.RedisError as e:
            err = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            return err
        time.sleep(0.1)


def _own_server() -> str:
    """Start a redis-server on a free loopback port (no persistence, temp dir), once per
    session; stopped at exit."""
    if "url" not in _server:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tmp = tempfile.mkdtemp(prefix="fastattn-redis-")
        proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                                 "--save", "", "--appendonly", "no", "--dir", tmp],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop():
            proc.terminate()
            proc.wait(10)
            shutil.rmtree(tmp, ignore_errors=True)

        atexit.register(stop)
        _server["url"] = f"redis://127.0.0.1:{port}/0"
    return _server["url"]


def redis_url() -> str:
    """The Redis to test against, or a skip (a failure under FASTATTN_REQUIRE_REDIS=1)."""
    def unavailable(reason):
        if REQUIRE_REDIS:
            pytest.fail(f"Redis is required here (FASTATTN_REQUIRE_REDIS=1): {reason}")
        pytest.skip(reason)

    try:
        import redis  # noqa: F401
    except ImportError:
        unavailable("the redis client is not installed: pip install 'fastattn[serving]'")
    url = os.environ.get("FASTATTN_REDIS_URL")
    if not url:
        if shutil.which("redis-server") is None:
            unavailable("no FASTATTN_REDIS_URL and no redis-server binary (apt-get install "
                        "redis-server, or run `make test`)")
        url = _own_server()
    if ("ping", url) not in _server:                  # wait for a fresh server once
        _server[("ping", url)] = _ping(url, wait=10)
    err = _server[("ping", url)]
    if err:
        unavailable(f"Redis at {url} does not answer: {err}")
    return url


@pytest.fixture(params=KINDS)
def kind(request):
    if request.param == "redis":
        redis_url()
    return request.param


@pytest.fixture
def location(kind, tmp_path):
    """Where this test's store lives: a SQLite path, or a Redis URL and a fresh key prefix
    (deleted afterwards)."""
    if kind == "sqlite":
        yield str(tmp_path / "states.db"), None
        return
    url, prefix = redis_url(), f"fastattn-test:{uuid.uuid4().hex}:"
    yield url, prefix
    import redis
    r = redis.Redis.from_url(url)
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    if keys:
        r.delete(*keys)


@pytest.fixture
def open_store(kind, location):
    """``open_store(spec, **kw)`` opens this test's store (again: same file / prefix)."""
    opened = []

    def _open(spec, **kw):
        where, prefix = location
        st = SQLiteStateStore(where, spec, **kw) if kind == "sqlite" else \
            RedisStateStore(where, spec, prefix=prefix, **kw)
        opened.append(st)
        return st

    yield _open
    for st in opened:
        st.close()


def dump(store) -> dict:
    """Everything a store holds (raw blobs, snapshots), to check that a call changed nothing."""
    keys = store._keys()
    snaps = store.snapshots()
    return {"users": dict(zip(keys, store._get_blobs(keys))),
            "snapshots": [(s.tag, s.n_users, sorted(store._snapshot_blobs(s.tag).items()))
                          for s in snaps]}


N_ITEMS, N_CATS = 40, 6


def tiny_mimn(seed: int = 0, **kw) -> MIMN:
    torch.manual_seed(seed)
    cfg = dict(embed_dim=4, mlp=(8,), mem_dim=4, slots=4, ctrl_dim=6, miu_dim=5)
    cfg.update(kw)
    return MIMN(N_ITEMS, N_CATS, **cfg).eval()


def histories(n_users: int, T: int, seed: int = 0):
    """user -> (items (T,), cats (T,), timestamps (T,) increasing, event ids (T,))."""
    rng = np.random.default_rng(seed)
    out = {}
    for u in range(n_users):
        ts = np.cumsum(rng.integers(1, 5, T)).astype(np.float64)
        out[u] = (rng.integers(1, N_ITEMS + 1, T), rng.integers(1, N_CATS + 1, T), ts,
                  u * 100_000 + np.arange(T))
    return out


def events_of(hist, users=None, start=0, stop=None):
    """The events [start, stop) of each user's history as (user, id, item, cat, ts) tuples."""
    out = []
    for u in (hist if users is None else users):
        items, cats, ts, ids = hist[u]
        for t in range(start, len(items) if stop is None else min(stop, len(items))):
            out.append((u, int(ids[t]), int(items[t]), int(cats[t]), float(ts[t])))
    return out


@torch.no_grad()
def forward_states(model, hist, users, upto=None):
    """The model's own forward (fused scan over each full history): the reference state."""
    L = max(len(hist[u][0]) for u in users) if upto is None else upto
    items = torch.zeros(len(users), L, dtype=torch.int64)
    cats = torch.zeros_like(items)
    for i, u in enumerate(users):
        n = min(L, len(hist[u][0]))
        items[i, :n] = torch.from_numpy(hist[u][0][:n])
        cats[i, :n] = torch.from_numpy(hist[u][1][:n])
    lengths = torch.tensor([min(L, len(hist[u][0])) for u in users])
    ones = torch.ones(len(users), dtype=torch.int64)
    return model.encode(Batch(items, cats, lengths, ones, ones))


def assert_states_close(got, want, atol=1e-5, rtol=1e-4):
    for name, a, b in zip(want._fields, got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def spec_of(model, fp16=False) -> StateSpec:
    return StateSpec.from_model(model, fp16=fp16)
