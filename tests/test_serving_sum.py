"""SUM serving: the user tower, the embedding records (fp16, pooling) and the asynchronous
service (never waits on inference, bounded deduplicated queue, concurrent and killed
writers) on SQLite and Redis."""
from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from fastattn.serving import (EmbeddingRecord, EmbeddingSpec, SQLiteStateStore,
                              StateFormatError, SUMUserTower, UserEmbeddingService)
from fastattn.serving.store.embedding import pool_batch, pool_embeddings
from serving_support import kind, location, open_store  # noqa: F401
from sum_crash_worker import SPEC as CRASH_SPEC, SlowConstant, user_tensor

WORKER = os.path.join(os.path.dirname(__file__), "sum_crash_worker.py")
SPEC = EmbeddingSpec({"name": "sum-test"}, K=2, D=6)


class Generations(torch.nn.Module):
    """Embeddings of user u at its refresh n: u + n / 8, constant over (K, D), so that every
    stored value says which refreshes it pools; ``gate`` (an Event) can hold inference."""

    def __init__(self, gate: threading.Event = None):
        super().__init__()
        self.calls, self.gate = {}, gate

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            assert self.gate.wait(60), "the test never released the model"
        vals = []
        for u in users.tolist():
            self.calls[u] = self.calls.get(u, 0) + 1
            vals.append(u + self.calls[u] / 8)
        return torch.tensor(vals).view(-1, 1, 1).expand(-1, SPEC.K, SPEC.D).clone()


def _features(users):
    return (torch.tensor(users),)


def _sqlite(tmp_path, spec=SPEC):
    return SQLiteStateStore(str(tmp_path / "emb.db"), spec)


def test_tower_shapes_and_config():
    tower = SUMUserTower([10, 20, 30], dense_dim=4, dim=8, pyramid=(5, 2))
    out = tower(torch.randint(0, 10, (7, 3)), torch.randn(7, 4))
    assert out.shape == (7, 2, 8) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in tower.parameters())
    assert tower.config()["pyramid"] == [5, 2] and (tower.K, tower.D) == (2, 8)
    with pytest.raises(ValueError, match="sparse"):
        tower(torch.randint(0, 10, (7, 2)), torch.randn(7, 4))
    with pytest.raises(ValueError, match="dense"):
        tower(torch.randint(0, 10, (7, 3)))
    with pytest.raises(ValueError, match="pyramid"):
        SUMUserTower([10], pyramid=())


def test_pooling_is_the_mean_of_the_last_two_cached_and_the_current(tmp_path):
    model = Generations()
    with UserEmbeddingService(model, _sqlite(tmp_path), _features, workers=1) as svc:
        gens = []
        for n in range(1, 6):
            svc.refresh_now([3])
            gens.append(3 + n / 8)
            got = svc.get([3], refresh=False)
            want = np.mean(gens[-3:])                   # SUM: 2 cached + the current
            assert not got.cold[0] and got.tags == ["v0"]
            np.testing.assert_allclose(got.embeddings[0].numpy(), want, rtol=2 ** -11)
            raw = svc.store.read([3])[0].raw
            np.testing.assert_allclose(raw[:, 0, 0], gens[-2:], rtol=2 ** -11)
    cached = np.stack([np.full((2, 6), 1.0), np.full((2, 6), 2.0), np.full((2, 6), 4.0)])
    np.testing.assert_allclose(pool_embeddings(cached, np.full((2, 6), 8.0), 2), 14 / 3)
    np.testing.assert_allclose(pool_embeddings(cached[:0], np.full((2, 6), 8.0), 2), 8.0)


def test_fp16_round_trip_within_its_bound():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 2, 6)) * 10.0 ** rng.integers(-7, 4, (2, 2, 6)))
    x = x.astype(np.float32)
    rec = EmbeddingRecord(x[0], x, "snap-1", 123.5)
    back = SPEC.decode(SPEC.encode(rec))
    for got, want in ((back.pooled, x[0]), (back.raw, x)):
        # half an ulp: 2^-11 relative in the normal range, 2^-25 absolute below 2^-14
        assert (np.abs(got - want) <= 2.0 ** -11 * np.abs(want) + 2.0 ** -25).all()
    assert (back.tag, back.written) == ("snap-1", 123.5) and back.token
    with pytest.raises(StateFormatError, match="fp16"):
        SPEC.encode(EmbeddingRecord(x[0] * 1e6, x[:0], "t", 0.0))
    with pytest.raises(StateFormatError, match="NaN"):
        SPEC.encode(EmbeddingRecord(x[0] * np.nan, x[:0], "t", 0.0))
    with pytest.raises(StateFormatError, match="raw"):
        SPEC.encode(EmbeddingRecord(x[0], np.zeros((3, 2, 6), np.float32), "t", 0.0))
    with pytest.raises(StateFormatError, match="truncated"):
        SPEC.decode(b"FASE")


def test_get_never_waits_on_inference(tmp_path):
    """get() reads the store and enqueues: with inference held, it still answers (the
    cold-start default, flagged), then serves the refreshed embedding once released."""
    gate = threading.Event()
    default = torch.full((2, 6), -1.0)
    model = Generations(gate)
    with UserEmbeddingService(model, _sqlite(tmp_path), _features, workers=2,
                              default=default) as svc:
        got = svc.get([1, 2, 5])
        assert got.cold.all() and torch.equal(got.embeddings, default.expand(3, 2, 6))
        assert got.tags == [None] * 3 and torch.isinf(got.age_s).all()
        for _ in range(20):                     # many requests while the model is blocked
            svc.get([1, 2, 5])
        st = svc.stats()
        assert st["served"] == 63 and st["cold"] == 63 and st["refreshed"] == 0
        gate.set()
        assert svc.wait_idle(60)
        got = svc.get([1, 2, 5], refresh=False)
        assert not got.cold.any() and (got.age_s >= 0).all() and got.tags == ["v0"] * 3
        # Requests while a user's refresh runs queue another one (deduplicated while queued):
        # every refresh made was written, and the served value pools the last three.
        calls = [model.calls[u] for u in (1, 2, 5)]
        assert svc.stats()["refreshed"] == sum(calls) and min(calls) >= 1
        want = [np.mean([u + k / 8 for k in range(1, c + 1)][-3:])
                for u, c in zip((1, 2, 5), calls)]
        np.testing.assert_allclose(got.embeddings[:, 0, 0].numpy(), want, rtol=2 ** -11)


def test_queue_is_bounded_deduplicated_and_drops_the_oldest(tmp_path):
    gate = threading.Event()
    model = Generations(gate)
    svc = UserEmbeddingService(model, _sqlite(tmp_path), _features, workers=1, batch_size=1,
                               max_queue=3)
    try:
        svc.refresh([0])
        deadline = time.monotonic() + 30
        while svc.stats()["refreshing"] == 0:   # the worker holds user 0 inside the model
            assert time.monotonic() < deadline
            time.sleep(0.01)
        svc.refresh([1, 2, 1, 3, 4, 2])
        st = svc.stats()
        assert st["queue_depth"] == 3 and st["dropped"] == 1 and st["deduplicated"] == 2
        gate.set()
        assert svc.wait_idle(60)
        assert sorted(model.calls) == [0, 2, 3, 4]      # 1, the oldest queued, was dropped
    finally:
        gate.set()
        svc.close()


def test_worker_errors_are_counted_and_the_worker_survives(tmp_path):
    class Flaky(Generations):
        def forward(self, users):
            if 13 in users.tolist():
                raise RuntimeError("bad features for user 13")
            return super().forward(users)

    with UserEmbeddingService(Flaky(), _sqlite(tmp_path), _features, batch_size=1) as svc:
        svc.refresh([13])
        assert svc.wait_idle(60)
        svc.refresh([4])
        assert svc.wait_idle(60)
        st = svc.stats()
        assert st["worker_errors"] == 1 and "user 13" in st["last_error"]
        assert st["refreshed"] == 1 and not svc.get([4], refresh=False).cold[0]


def test_service_refuses_a_state_store_and_bad_arguments(tmp_path):
    from serving_crash_writer import SPEC as STATE_SPEC
    with pytest.raises(TypeError, match="EmbeddingSpec"):
        UserEmbeddingService(Generations(), SQLiteStateStore(str(tmp_path / "s.db"),
                                                             STATE_SPEC), _features)
    with pytest.raises(ValueError, match="workers"):
        UserEmbeddingService(Generations(), _sqlite(tmp_path), _features, workers=0)
    with pytest.raises(ValueError, match="default"):
        UserEmbeddingService(Generations(), _sqlite(tmp_path), _features,
                             default=torch.zeros(3))


def _whole(rec) -> float:
    """The generation a record's newest raw embedding holds; fails on a torn record."""
    for a in (rec.pooled, *rec.raw):
        assert np.unique(a).size == 1, f"torn record: {np.unique(a)[:5]}"
    return float(rec.raw[-1, 0, 0])


def test_concurrent_gets_and_refreshes_keep_records_whole(open_store):  # noqa: F811
    store = open_store(SPEC)
    users = list(range(8))
    errors = []

    def refresher(i):
        try:
            model = Generations()
            svc = UserEmbeddingService(model, open_store(SPEC), _features, workers=1)
            for _ in range(6):
                svc.refresh_now(users)
            svc.close()
        except BaseException as e:
            errors.append(e)

    def reader():
        try:
            svc = UserEmbeddingService(Generations(), store, _features, workers=1)
            for _ in range(40):
                got = svc.get(users, refresh=False)
                for r in svc.store.read(users):
                    if r is not None:
                        _whole(r)
                assert torch.isfinite(got.embeddings).all()
            svc.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=refresher, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    # 3 refreshers x 6 refreshes each, compare-and-set: every one of the 18 was applied
    # (the model's n-th call for u gives u + n/8; each refresher has its own counter, so
    # the newest raw of every user is u + 6/8).
    for u, r in zip(users, store.read(users)):
        assert _whole(r) == pytest.approx(u + 6 / 8, rel=2 ** -11)


def test_killed_worker_loses_only_its_own_refresh(kind, location, open_store):  # noqa: F811
    n, batch = 120, 40
    store = open_store(CRASH_SPEC)
    where, prefix = location
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, WORKER, kind, where, prefix or "", str(n),
                                 str(batch)], stdout=subprocess.PIPE, text=True)
        done, deadline = [], time.monotonic() + 60
        while len(done) < 7:                   # let it commit a few batches
            line = proc.stdout.readline()
            assert line, f"worker exited early with {proc.wait()}"
            done.append(tuple(map(int, line.split())))
            assert time.monotonic() < deadline, "worker too slow"
        time.sleep(random.uniform(0, 0.02))    # then kill it anywhere in its loop
        proc.kill()
        # a kill during a print leaves a partial last line: only whole lines count (the
        # batch it names may have committed; the check below allows one generation more)
        done += [tuple(map(int, x.split())) for x in proc.stdout.read().split("\n")[:-1]]
        proc.wait()
        proc.stdout.close()
        recs = store.read(list(range(n)))
        assert all(r is not None for r in recs)
        gens = [_whole(r) for r in recs]
        for b in range(0, n, batch):           # one write per batch: all of it or none
            assert len(set(gens[b:b + batch])) == 1, f"batch {b} half written: {gens[b:b+batch]}"
            committed = max(g for g, bb in done if bb == b)
            assert gens[b] in (committed, committed + 1)


def test_batched_pooling_and_codec_match_the_per_user_ones():
    """pool_batch / encode_batch / decode_batch (the refresh path, vectorised over users)
    give exactly what the per-user functions give, and name the first bad user."""
    rng = np.random.default_rng(1)
    B, keep = 7, SPEC.keep
    n = np.array([0, 1, 2, 2, 0, 1, 2])
    cached = rng.standard_normal((B, keep, SPEC.K, SPEC.D)).astype(np.float32)
    cached[np.arange(keep) < keep - n[:, None]] = 0        # right-aligned, zero padding
    cur = rng.standard_normal((B, SPEC.K, SPEC.D)).astype(np.float32)
    pooled, raw, n2 = pool_batch(cached, n, cur)
    assert n2.tolist() == [1, 2, 2, 2, 1, 2, 2]
    users = [f"u{i}" for i in range(B)]
    blobs = SPEC.encode_batch(pooled, raw, n2, ["t"] * B, np.arange(B, dtype=float), users)
    for i in range(B):
        valid = cached[i, keep - n[i]:]
        np.testing.assert_array_equal(pooled[i], pool_embeddings(valid, cur[i], keep))
        want_raw = np.concatenate([valid, cur[i][None]])[-keep:]
        np.testing.assert_array_equal(raw[i, keep - n2[i]:], want_raw)
        assert blobs[i] == SPEC.encode(EmbeddingRecord(pooled[i], want_raw, "t", float(i)))
    got = SPEC.decode_batch(blobs + [None], users + ["absent"])
    assert got.present.tolist() == [True] * B + [False] and got.record(B) is None
    for i in range(B):
        one = SPEC.decode(blobs[i])
        np.testing.assert_array_equal(got.record(i).raw, one.raw)
        np.testing.assert_array_equal(got.pooled[i], one.pooled)
        assert (got.record(i).token, got.written[i], got.tags[i]) == (one.token, i, "t")
    bad = pooled.copy()
    bad[3, 1, 2] = np.nan
    with pytest.raises(StateFormatError, match="'u3'.*NaN"):
        SPEC.encode_batch(bad, raw, n2, ["t"] * B, np.zeros(B), users)
    big = raw.copy()
    big[5, -1, 0, 0] = 1e6
    with pytest.raises(StateFormatError, match="'u5'.*fp16"):
        SPEC.encode_batch(pooled, big, n2, ["t"] * B, np.zeros(B), users)
    big[5, -1, 0, 0], big[0, 0, 0, 0] = 0.0, np.nan     # user 0's padding row: ignored
    SPEC.encode_batch(pooled, big, n2, ["t"] * B, np.zeros(B), users)
    with pytest.raises(StateFormatError, match="raw"):
        SPEC.encode_batch(pooled, raw[:, :1], n2, ["t"] * B, np.zeros(B), users)
    with pytest.raises(ValueError, match="cached"):
        pool_batch(cached, n + 1, cur)


def test_process_mode_refuses_what_it_cannot_ship(tmp_path):
    store = _sqlite(tmp_path)
    with pytest.raises(ValueError, match="mode"):
        UserEmbeddingService(Generations(), store, _features, mode="fork")
    with pytest.raises(ValueError, match="worker_nice"):
        UserEmbeddingService(Generations(), store, _features, mode="process", worker_nice=20)
    with pytest.raises(TypeError, match="picklable"):
        UserEmbeddingService(Generations(), store, lambda u: (torch.tensor(u),),
                             mode="process")
    store.write({7: EmbeddingRecord(np.ones((2, 6), np.float32), np.ones((1, 2, 6), np.float32),
                                    "t", 1.0)})
    again = pickle.loads(pickle.dumps(store.opener()))()     # what a worker process opens
    assert again.read([7])[0].tag == "t"
    again.close()


def test_process_workers_refresh_swap_models_and_survive_sigkill(kind, location,  # noqa: F811
                                                                  open_store):
    """Process workers (mode="process") write what thread workers write; a worker process
    killed with SIGKILL mid-refresh loses only its batch (records stay whole, the loss is
    counted) and is restarted for the next batch."""
    store = open_store(CRASH_SPEC)
    users = list(range(60))
    svc = UserEmbeddingService(SlowConstant(1.0, 20), store, user_tensor, workers=1,
                               mode="process", batch_size=10)
    try:
        st = svc.stats()
        assert st["mode"] == "process" and st["worker_pids"][0] != os.getpid()
        # workers yield the CPU to the request path: niceness raised by worker_nice (10)
        nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        assert os.getpriority(os.PRIO_PROCESS, st["worker_pids"][0]) == nice
        assert svc.get(users).cold.all()
        assert svc.wait_idle(120)
        got = svc.get(users, refresh=False)
        assert not got.cold.any() and set(got.tags) == {"v0"}
        assert (got.embeddings == 1.0).all()
        svc.set_model(SlowConstant(4.0, 20), "v1")        # shipped before the next batch
        svc.refresh(users)
        assert svc.wait_idle(120)
        got = svc.get(users, refresh=False)
        assert set(got.tags) == {"v1"}
        np.testing.assert_allclose(got.embeddings.numpy(), 2.5)           # mean(1, 4)
        svc.set_model(SlowConstant(5.0, 20), "v2")
        svc.refresh(users)
        deadline = time.monotonic() + 60
        while svc.stats()["refreshing"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(random.uniform(0, 0.03))
        os.kill(svc.stats()["worker_pids"][0], signal.SIGKILL)
        assert svc.wait_idle(180)
        st = svc.stats()
        assert st["worker_errors"] >= 1 and "died" in st["last_error"]
        for r in store.read(users):
            assert _whole(r) in (4.0, 5.0)                # old or new, never torn
        svc.set_model(SlowConstant(7.0), "v3")             # the restarted worker serves
        svc.refresh(users)
        assert svc.wait_idle(180)
        assert svc.stats()["worker_pids"][0] is not None
        assert os.getpriority(os.PRIO_PROCESS, svc.stats()["worker_pids"][0]) == nice
        got = svc.get(users, refresh=False)
        assert set(got.tags) == {"v3"}
        assert all(_whole(r) == 7.0 for r in store.read(users))
    finally:
        svc.close()
