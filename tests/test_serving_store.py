"""UserStateStore: records, metadata checks, compare-and-set writes and snapshots, on both
backends (SQLite and a real redis-server)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastattn.serving import (ConfigMismatchError, StateFormatError, StateSpec, UserRecord,
                              WriteConflictError)
from fastattn.serving.store import decode_record, encode_record
from serving_support import dump, kind, location, open_store, tiny_mimn  # noqa: F401

SPEC = StateSpec({"name": "t", "slots": 2}, ((3,), (2,), (2, 2), (2,), (2, 4)))


def rec(value, spec=SPEC, n_ids=2, last_ts=5.0):
    state = tuple(np.full(s, value, np.float32) for s in spec.shapes)
    return UserRecord(state, last_ts, np.arange(n_ids, dtype=np.int64),
                      np.linspace(0, last_ts, n_ids))


def test_record_roundtrip_and_format_errors():
    r = rec(0.5, n_ids=3)
    r.state = tuple(np.random.default_rng(0).standard_normal(s).astype(np.float32)
                    for s in SPEC.shapes)
    blob = encode_record(r, SPEC)
    back = decode_record(blob, SPEC)
    for a, b in zip(r.state, back.state):
        np.testing.assert_array_equal(a, b)
    assert back.last_ts == 5.0 and back.event_ids.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(back.event_ts, r.event_ts)
    with pytest.raises(StateFormatError, match="bytes"):
        decode_record(blob[:-8], SPEC, user=7)
    with pytest.raises(StateFormatError, match="format"):
        decode_record(b"XXXX" + blob[4:], SPEC)
    other = StateSpec(SPEC.config, ((3,), (2,), (3, 2), (3,), (3, 4)))
    with pytest.raises(StateFormatError, match="another model version"):
        decode_record(blob, other, user=7)
    bad = rec(1.0)
    bad.state = bad.state[:2] + (np.zeros((3, 2), np.float32),) + bad.state[3:]
    with pytest.raises(StateFormatError, match=r"state.M must have shape \(2, 2\)"):
        encode_record(bad, SPEC)
    nan = rec(float("nan"))
    with pytest.raises(StateFormatError, match="NaN"):
        encode_record(nan, SPEC)


def test_fp16_storage_halves_memory_arrays():
    spec16 = StateSpec(SPEC.config, SPEC.shapes, "float16")
    r = rec(1 / 3)
    back = decode_record(encode_record(r, spec16), spec16)
    assert len(encode_record(r, spec16)) < len(encode_record(r, SPEC))
    for i, (a, b) in enumerate(zip(r.state, back.state)):
        if i in (2, 4):                  # M, S: fp16, relative error <= 2^-11
            np.testing.assert_allclose(a, b, rtol=2 ** -11)
        else:                            # h, r, g: fp32
            np.testing.assert_array_equal(a, b)
    big = rec(1e5)
    with pytest.raises(StateFormatError, match="fp16 range"):
        encode_record(big, spec16)


def test_read_write_batched(open_store):
    st = open_store(SPEC)
    st.write({1: rec(1.0), "u2": rec(2.0), 3: rec(3.0)})
    got = st.read([3, "u2", 99, 1])
    assert got[2] is None
    assert [float(r.state[0][0]) for r in (got[0], got[1], got[3])] == [3.0, 2.0, 1.0]
    assert len(st) == 3 and 1 in st and "1" not in st and 99 not in st
    assert sorted(map(str, st.users())) == ["1", "3", "u2"]
    state = st.get_state([1, 3])
    assert state.M.shape == (2, 2, 2) and state.M.dtype == torch.float32
    assert state.h[:, 0].tolist() == [1.0, 3.0]


def test_unknown_user_on_read(open_store):
    st = open_store(SPEC)
    st.write({1: rec(1.0)})
    before = dump(st)
    with pytest.raises(KeyError, match=r"no stored state for 2 user\(s\): \[5, 'x'\]"):
        st.get_state([1, 5, "x"])
    assert dump(st) == before


def test_compare_and_set(open_store):
    st = open_store(SPEC)
    st.write({1: rec(1.0), 2: rec(2.0)})
    a, b = st.read([1, 2])
    a.state = rec(10.0).state
    st.write({1: a})                               # token matches: written
    stale = st.read([1])[0]
    stale.token = a.token                          # the pre-write token: stale
    before = dump(st)
    with pytest.raises(WriteConflictError, match=r"\[1\]"):
        st.write({1: stale, 2: b})                 # all or nothing: user 2 not written either
    assert dump(st) == before
    with pytest.raises(WriteConflictError):        # token None: user must not exist
        st.write({2: rec(5.0)})
    st.write({2: rec(5.0)}, check=False)
    assert st.get_state([2]).h[0, 0] == 5.0


def test_wrong_shapes_leave_store_unchanged(open_store):
    st = open_store(SPEC)
    st.write({1: rec(1.0)})
    before = dump(st)
    bad = rec(2.0)
    bad.state = bad.state[:4] + (np.zeros((2, 7), np.float32),)
    with pytest.raises(StateFormatError, match="state.S"):
        st.write({1: rec(3.0), 2: bad}, check=False)
    assert dump(st) == before


def test_config_mismatch_refused(open_store):
    model = tiny_mimn()
    st = open_store(StateSpec.from_model(model))
    st.write({}, check=False)
    other = tiny_mimn(slots=3)
    with pytest.raises(ConfigMismatchError) as e:
        open_store(StateSpec.from_model(other))
    msg = str(e.value)
    assert '"slots":4' in msg and '"slots":3' in msg and "['slots']" in msg
    with pytest.raises(ConfigMismatchError, match="fp16"):
        open_store(StateSpec.from_model(model, fp16=True))
    open_store(StateSpec.from_model(tiny_mimn(seed=1)))   # other weights, same config: ok
    with pytest.raises(ConfigMismatchError):
        st.check_model(other)


def test_snapshots_keep_and_rollback(open_store):
    st = open_store(SPEC, keep=3)
    st.write({1: rec(1.0)})
    info = st.snapshot("s1")
    assert info.tag == "s1" and info.n_users == 1
    st.write({1: rec(2.0), 2: rec(2.0)}, check=False)
    st.snapshot("s2")
    with pytest.raises(ValueError, match="exists"):
        st.snapshot("s2")
    with pytest.raises(ValueError, match="tag"):
        st.snapshot("bad tag!")
    st.write({1: rec(3.0)}, check=False)
    st.rollback("s1")
    assert st.users() == [1] and st.get_state([1]).h[0, 0] == 1.0
    st.rollback("s2")
    assert st.get_state([1, 2]).h[:, 0].tolist() == [2.0, 2.0]
    for t in ("s3", "s4", "s5"):
        st.snapshot(t)
    assert [s.tag for s in st.snapshots()] == ["s3", "s4", "s5"]     # the last 3 kept
    with pytest.raises(KeyError, match="no snapshot 's1'"):
        st.rollback("s1")
    assert set(st.snapshot_records("s5")) == {1, 2}
    st.write({3: rec(3.0)})
    st.rollback("s5")
    assert sorted(st.users()) == [1, 2]             # users created after it are removed


def test_default_keep_is_seven(open_store):
    st = open_store(SPEC)
    for i in range(9):
        st.snapshot(f"t{i}")
    assert [s.tag for s in st.snapshots()] == [f"t{i}" for i in range(2, 9)]


def test_sqlite_reads_never_wait_on_the_writer_or_each_other(tmp_path):
    """Record reads take pooled read-only connections: with this object's writer holding a
    write transaction (and its lock), reads from other threads still answer at once, see
    the last committed records, and concurrent readers hold a connection each."""
    import sqlite3
    import threading

    from fastattn.serving import SQLiteStateStore
    store = SQLiteStateStore(str(tmp_path / "s.db"), SPEC)
    store.write({1: rec(1.0)})
    tx = store._tx()
    db = tx.__enter__()                   # a write in progress: BEGIN IMMEDIATE, lock held
    try:
        db.execute("DELETE FROM users")   # uncommitted: readers must not see it
        got = []
        t = threading.Thread(target=lambda: got.append(store.read([1, 2])))
        t.start()
        t.join(5)
        assert not t.is_alive(), "a read waited on the writer"
        assert got[0][1] is None and got[0][0].state[0][0] == 1.0
    finally:
        tx.__exit__(None, None, None)
    assert store.read([1]) == [None]      # committed now: read your writes
    store.write({1: rec(2.0)})
    assert store.read([1])[0].state[0][0] == 2.0
    # Readers in flight at once hold a connection each; idle ones are reused.
    gate, inner = threading.Barrier(3), store._reader

    def held():                           # each reader keeps its connection until all have one
        db = inner()
        gate.wait(5)
        return db

    store._reader = held
    threads = [threading.Thread(target=store.read, args=([1],)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    del store._reader
    assert len(store._all_readers) == 3
    before = len(store._all_readers)
    for _ in range(5):
        store.read([1])
    assert len(store._all_readers) == before
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        store.read([1])
