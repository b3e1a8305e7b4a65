"""The embedded default store: one SQLite file in WAL mode."""
from __future__ import annotations

import collections
import functools
import hashlib
import sqlite3
import threading
from typing import Callable, Dict, List, Optional, Tuple

from .base import UserStateStore
from .record import SnapshotInfo, StateSpec


class SQLiteStateStore(UserStateStore):
    """The embedded default: one SQLite file in WAL mode.

    Every operation is one transaction (``BEGIN IMMEDIATE``), so a killed process leaves the
    last committed state; snapshots are copies into the ``snapshot_users`` table inside one
    transaction. One object may be shared by threads: writes and snapshots are serialised
    by a lock on one connection; record reads (``read``, ``read_blobs``) take a read-only
    connection from a pool instead (one per concurrent reader, opened on demand), so a
    reader never queues behind another reader or a writer of this object (WAL readers do
    not wait on writers). Other processes open their own (SQLite's file locks serialise
    writers, ``timeout`` seconds).
    ``synchronous="NORMAL"`` survives process crashes; use ``"FULL"`` to survive power loss.
    """

    def __init__(self, path: str, spec: StateSpec, *, keep: int = 7, timeout: float = 30.0,
                 synchronous: str = "NORMAL"):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got "
                             f"{synchronous!r}")
        self.path, self.spec, self.keep = str(path), spec, keep
        self._timeout, self._synchronous = timeout, synchronous
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
        # Idle read connections (deque pop/append are atomic: no lock on the read path);
        # _all_readers holds every one opened, for close().
        self._readers: "collections.deque[sqlite3.Connection]" = collections.deque()
        self._all_readers: List[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()     # opening / closing readers only, never the
        self._closed = False                   # writer's lock
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        with self._tx():
            for stmt in _SQLITE_SCHEMA:
                self._db.execute(stmt)
        self._open_meta(f"SQLite store {self.path}")

    def connect(self) -> "SQLiteStateStore":
        """A new connection to the same file: its transactions never wait on this object's
        lock (WAL readers proceed while another connection writes)."""
        return SQLiteStateStore(self.path, self.spec, keep=self.keep, timeout=self._timeout,
                                synchronous=self._synchronous)

    def opener(self) -> Callable[[], "SQLiteStateStore"]:
        """Opens the same file with the same settings (picklable: for worker processes)."""
        return functools.partial(SQLiteStateStore, self.path, self.spec, keep=self.keep,
                                 timeout=self._timeout, synchronous=self._synchronous)

    def _tx(self):
        return _Transaction(self._db, self._lock)

    def _meta_set_if_absent(self, meta: str) -> str:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('spec', ?)", (meta,))
            return db.execute("SELECT value FROM meta WHERE key = 'spec'").fetchone()[0]

    def _get_blobs(self, keys: List[str]) -> List[Optional[bytes]]:
        db = self._reader()
        try:
            if len(keys) <= _SQL_CHUNK:   # one statement: its own consistent read
                return _select(db, keys)
            db.execute("BEGIN")           # one read transaction: a consistent view of all users
            try:
                return _select(db, keys)
            finally:
                db.execute("COMMIT")
        finally:
            self._readers.append(db)

    def _reader(self) -> sqlite3.Connection:
        """An idle pooled read connection, or a new one (query_only) when all are busy."""
        try:
            return self._readers.pop()
        except IndexError:
            pass
        with self._pool_lock:
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA query_only=1")
            self._all_readers.append(db)
            return db

    def _cas_put(self, items: List[Tuple[str, str, bytes]]) -> List[str]:
        with self._tx() as db:
            checked = [(k, t) for k, t, _ in items if t != "*"]
            if checked:
                current = dict(zip([k for k, _ in checked],
                                   _select(db, [k for k, _ in checked])))
                bad = [k for k, t in checked
                       if (current[k] is None) != (t == "")
                       or (current[k] is not None and hashlib.sha1(current[k]).hexdigest() != t)]
                if bad:
                    return bad
            db.executemany("INSERT OR REPLACE INTO users VALUES (?, ?)",
                           [(k, b) for k, _, b in items])
        return []

    def _keys(self) -> List[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT uid FROM users ORDER BY uid")]

    def _count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def _snapshot(self, tag: str, created: float) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE tag = ?", (tag,)).fetchone():
                raise ValueError(f"snapshot {tag!r} exists; pick a new tag")
            n = db.execute("SELECT COUNT(*) FROM users").fetchone()[0]
            db.execute("INSERT INTO snapshots (tag, created, n_users) VALUES (?, ?, ?)",
                       (tag, created, n))
            db.execute("INSERT INTO snapshot_users SELECT ?, uid, rec FROM users", (tag,))
            old = [r[0] for r in db.execute(
                "SELECT tag FROM snapshots ORDER BY seq DESC LIMIT -1 OFFSET ?", (self.keep,))]
            for t in old:
                db.execute("DELETE FROM snapshot_users WHERE tag = ?", (t,))
                db.execute("DELETE FROM snapshots WHERE tag = ?", (t,))

    def _snapshots(self) -> List[SnapshotInfo]:
        with self._lock:
            rows = self._db.execute("SELECT tag, seq, created, n_users FROM snapshots")
            return [SnapshotInfo(*r) for r in rows]

    def _rollback(self, tag: str) -> bool:
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM snapshots WHERE tag = ?", (tag,)).fetchone():
                return False
            db.execute("DELETE FROM users")
            db.execute("INSERT INTO users SELECT uid, rec FROM snapshot_users WHERE tag = ?",
                       (tag,))
        return True

    def _snapshot_blobs(self, tag: str) -> Optional[Dict[str, bytes]]:
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM snapshots WHERE tag = ?", (tag,)).fetchone():
                return None
            return dict(db.execute("SELECT uid, rec FROM snapshot_users WHERE tag = ?",
                                   (tag,)).fetchall())

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            self._readers.clear()
            for db in self._all_readers:     # a read in flight fails (closed database)
                db.close()
            self._all_readers.clear()
        with self._lock:
            self._db.close()


def _select(db: sqlite3.Connection, keys: List[str]) -> List[Optional[bytes]]:
    found: Dict[str, bytes] = {}
    for i in range(0, len(keys), _SQL_CHUNK):
        part = keys[i:i + _SQL_CHUNK]
        q = f"SELECT uid, rec FROM users WHERE uid IN ({','.join('?' * len(part))})"
        found.update(db.execute(q, part).fetchall())
    return [found.get(k) for k in keys]


_SQL_CHUNK = 500    # bound parameters per IN (...) query (SQLite's limit is >= 999)
_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS users (uid TEXT PRIMARY KEY, rec BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS snapshots (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "tag TEXT UNIQUE NOT NULL, created REAL NOT NULL, n_users INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS snapshot_users (tag TEXT NOT NULL, uid TEXT NOT NULL, "
    "rec BLOB NOT NULL, PRIMARY KEY (tag, uid)) WITHOUT ROWID",
)


class _Transaction:
    """``with``: lock, BEGIN IMMEDIATE (the write lock up front: no deadlock upgrading a
    read lock), COMMIT on success, ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()
