"""Subprocess of the serving reliability tests: writes a store in a loop until killed.

    python serving_crash_writer.py crash KIND WHERE PREFIX N_USERS
        generation g = 1, 2, ...: every user's state filled with g, all users in one write;
        a snapshot "g<g>" every 3rd generation; prints g after each commit.
    python serving_crash_writer.py increment KIND WHERE PREFIX N_USERS ITERS
        ITERS read-modify-write increments of every user's h (compare-and-set, retried on
        conflict); prints "done".

KIND is sqlite (WHERE a path) or redis (WHERE a URL, PREFIX the key prefix).
"""
from __future__ import annotations

import sys

import numpy as np

from fastattn.serving import (RedisStateStore, SQLiteStateStore, StateSpec, UserRecord,
                              WriteConflictError)

# ~9 KB per user: a write of a few hundred users takes long enough to be killed inside.
SPEC = StateSpec({"name": "crash-test", "slots": 16}, ((64,), (64,), (16, 64), (16,), (16, 64)))


def open_store(kind: str, where: str, prefix: str):
    if kind == "sqlite":
        return SQLiteStateStore(where, SPEC, keep=50)
    return RedisStateStore(where, SPEC, prefix=prefix, keep=50)


def record(value: float) -> UserRecord:
    return UserRecord(tuple(np.full(s, value, np.float32) for s in SPEC.shapes), value)


def main(argv) -> None:
    mode, kind, where, prefix, n = argv[:5]
    store = open_store(kind, where, prefix)
    users = list(range(int(n)))
    if mode == "crash":
        g = int(store.read([0])[0].last_ts)
        while True:
            g += 1
            store.write({u: record(g) for u in users}, check=False)
            if g % 3 == 0:
                store.snapshot(f"g{g}")
            print(g, flush=True)
    elif mode == "increment":
        for _ in range(int(argv[5])):
            while True:
                recs = store.read(users)
                for r in recs:
                    r.state = (r.state[0] + 1,) + r.state[1:]
                try:
                    store.write(dict(zip(users, recs)))
                    break
                except WriteConflictError:
                    continue
        print("done", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
