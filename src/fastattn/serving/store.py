"""Per-user MIMN state stores: the User Interest Center's storage (SQLite and Redis).

A store holds one record per user: the MIMN state (h, r, M, g, S) without its batch
dimension, the timestamp of the last applied event, and the ids (with timestamps) of the most
recent applied events, which make replays idempotent. Records are compact binary blobs
(:func:`encode_record`, format version 1) in fp32 or, optionally, fp16.

Every store is opened with a :class:`StateSpec` (the model's config and state shapes). The
first open writes it as the store's metadata; later opens with a different config or storage
dtype are refused (:class:`ConfigMismatchError`), so states of one model never feed another.

Writes are compare-and-set: :meth:`UserStateStore.write` checks that each user's record is
still the one the writer read (its :attr:`UserRecord.token`, a SHA-1 of the blob) and writes
all records in one transaction (SQLite) or one server-side script (Redis), or nothing
(:class:`WriteConflictError`). Concurrent updaters therefore never lose an update, and a
process killed mid-write leaves every record either old or new.
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import struct
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..ops.mimn import MIMNState

__all__ = ["StateSpec", "UserRecord", "SnapshotInfo", "UserStateStore", "SQLiteStateStore",
           "RedisStateStore", "open_store", "encode_record", "decode_record",
           "ConfigMismatchError", "StateFormatError", "WriteConflictError", "UnknownUserError",
           "RECORD_FORMAT"]

RECORD_FORMAT = 1
_MAGIC = b"FAUS"
# magic, format version, dtype code, 2 pad bytes, last_ts (f64), number of event ids (u32),
# 4 pad bytes; then the five state arrays, the event ids (int64) and their timestamps (f64).
_HEADER = struct.Struct("<4sBB2xdI4x")
_DTYPES = {"float32": 1, "float16": 2}
_FP16_MAX = float(np.finfo(np.float16).max)
_TAG = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

UserId = Union[int, str]


class ConfigMismatchError(ValueError):
    """The store holds states of a model with another configuration or storage dtype."""


class StateFormatError(ValueError):
    """A record or state does not have the layout this store's model expects."""


class WriteConflictError(RuntimeError):
    """Another writer changed some of the users since they were read; nothing was written."""

    def __init__(self, users: Sequence[UserId]):
        self.users = list(users)
        super().__init__(f"{len(self.users)} user record(s) changed since they were read "
                         f"(e.g. {self.users[:5]}); nothing was written, read them again")


class UnknownUserError(KeyError):
    """A read asked for users the store has no state for."""

    def __init__(self, users: Sequence[UserId]):
        self.users = list(users)
        super().__init__(f"no stored state for {len(self.users)} user(s): {self.users[:10]}")

    def __str__(self) -> str:     # KeyError would print the repr of the message
        return self.args[0]


def _canonical(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class StateSpec:
    """What a store's records are: the model config and the per-user state shapes.

    config: the model's constructor kwargs (``model.config()``), JSON-serialisable.
    shapes: per-user shapes of (h, r, M, g, S): ((Hc,), (D,), (m, D), (m,), (m, Hs)).
    dtype: storage dtype, ``"float32"`` or ``"float16"`` (M and S in fp16, see
        :attr:`array_dtypes`; the updater computes in the model's dtype).
    """

    config: Dict[str, Any]
    shapes: Tuple[Tuple[int, ...], ...]
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        shapes = tuple(tuple(int(d) for d in s) for s in self.shapes)
        if len(shapes) != 5:
            raise ValueError(f"shapes must give the five state arrays (h, r, M, g, S), got "
                             f"{len(shapes)}")
        object.__setattr__(self, "shapes", shapes)
        json.loads(_canonical(self.config))     # fails early on a non-serialisable config

    @classmethod
    def from_model(cls, model, fp16: bool = False) -> "StateSpec":
        """The spec of a model with an ``encoder`` (fastattn.models.MIMN) or of a bare
        :class:`fastattn.nn.MIMNEncoder` (its config is then its constructor kwargs)."""
        enc = getattr(model, "encoder", model)
        for attr in ("mem_dim", "slots", "miu_dim", "controller"):
            if not hasattr(enc, attr):
                raise TypeError(f"model must be an MIMNEncoder or have one as .encoder, got "
                                f"{type(model).__name__}")
        if hasattr(model, "config"):
            config = dict(model.config())
        else:
            config = {"name": type(enc).__name__, "x_dim": enc.x_dim, "mem_dim": enc.mem_dim,
                      "slots": enc.slots, "ctrl_dim": enc.controller.hidden_size,
                      "miu_dim": enc.miu_dim, "mur": enc.mur is not None, "miu_k": enc.miu_k}
        Hc, D, m, Hs = enc.controller.hidden_size, enc.mem_dim, enc.slots, enc.miu_dim
        return cls(config, ((Hc,), (D,), (m, D), (m,), (m, Hs)),
                   "float16" if fp16 else "float32")

    @property
    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the canonical JSON of the config."""
        return hashlib.sha256(_canonical(self.config).encode()).hexdigest()[:16]

    @cached_property
    def array_dtypes(self) -> Tuple[np.dtype, ...]:
        """Storage dtype of each of (h, r, M, g, S): fp16 storage halves only the memory
        arrays M and S (the bulk); h, r and g stay fp32 (g accumulates one write weight
        < 1 per event, which fp16 would round away once g is in the thousands)."""
        half = self.dtype == "float16"
        return tuple(np.dtype(np.float16 if half and i in (2, 4) else np.float32)
                     for i in range(5))

    @cached_property
    def state_bytes(self) -> int:
        return sum(n * d.itemsize for n, d in zip(self.sizes, self.array_dtypes))

    @cached_property
    def sizes(self) -> Tuple[int, ...]:
        return tuple(int(np.prod(s)) for s in self.shapes)

    def meta(self) -> Dict[str, Any]:
        return {"format": RECORD_FORMAT, "fingerprint": self.fingerprint, "config": self.config,
                "shapes": [list(s) for s in self.shapes], "dtype": self.dtype}

    def check_meta(self, stored: Mapping[str, Any], where: str) -> None:
        """ConfigMismatchError unless ``stored`` (a store's metadata) matches this spec."""
        if stored.get("format") != RECORD_FORMAT:
            raise StateFormatError(f"{where} holds records of format {stored.get('format')}, "
                                   f"this version reads format {RECORD_FORMAT}")
        if stored.get("fingerprint") != self.fingerprint:
            old, new = stored.get("config", {}), self.config
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigMismatchError(
                f"{where} holds states of a model with config {_canonical(old)} (fingerprint "
                f"{stored.get('fingerprint')}), refused for this model's config "
                f"{_canonical(new)} (fingerprint {self.fingerprint}); they differ in {diff}. "
                "Rebuild the states with warm_start into a new store")
        if [list(s) for s in self.shapes] != stored.get("shapes"):
            raise ConfigMismatchError(f"{where} holds states of shapes {stored.get('shapes')}, "
                                      f"this model's are {[list(s) for s in self.shapes]}")
        if stored.get("dtype") != self.dtype:
            raise ConfigMismatchError(f"{where} stores states in {stored.get('dtype')}, opened "
                                      f"for {self.dtype} (fp16={self.dtype == 'float16'})")


@dataclass
class UserRecord:
    """One user's stored state.

    state: (h (Hc,), r (D,), M (m, D), g (m,), S (m, Hs)) float32 numpy arrays.
    last_ts: timestamp of the last applied event (-inf before any).
    event_ids, event_ts: (n,) int64 / float64 ids and timestamps of the recent applied
        events (the idempotency window).
    token: SHA-1 hex of the blob as read (None for a user not in the store); writes
        compare it to detect concurrent changes.
    """

    state: Tuple[np.ndarray, ...]
    last_ts: float = float("-inf")
    event_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    event_ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    token: Optional[str] = None


class SnapshotInfo(NamedTuple):
    tag: str
    seq: int            # creation order
    created: float      # unix time
    n_users: int


# --------------------------------------------------------------------------- serialisation

def encode_record(record: UserRecord, spec: StateSpec, user: UserId = "?") -> bytes:
    """The record as a versioned binary blob in the spec's storage dtype.

    StateFormatError on wrong state shapes, non-finite values, or values beyond fp16's range
    (65504) when storing fp16."""
    if len(record.state) != 5:
        raise StateFormatError(f"user {user!r}: state must be the five arrays (h, r, M, g, S), "
                               f"got {len(record.state)}")
    arrays = [np.asarray(a) for a in record.state]
    for name, a, shape in zip(MIMNState._fields, arrays, spec.shapes):
        if a.shape != shape:
            raise StateFormatError(f"user {user!r}: state.{name} must have shape {shape} for "
                                   f"this store's model, got {a.shape} (a state from another "
                                   "model version?)")
    if not all(np.isfinite(a).all() for a in arrays):
        bad = [n for n, a in zip(MIMNState._fields, arrays) if not np.isfinite(a).all()]
        raise StateFormatError(f"user {user!r}: state.{bad[0]} has NaN or inf values")
    parts = []
    for name, a, dtype in zip(MIMNState._fields, arrays, spec.array_dtypes):
        if dtype == np.float16 and a.size and np.abs(a).max() > _FP16_MAX:
            raise StateFormatError(f"user {user!r}: state.{name} reaches "
                                   f"{np.abs(a).max():.4g}, beyond the fp16 range; use fp32 "
                                   "storage for this model")
        parts.append(np.ascontiguousarray(a, dtype=dtype).tobytes())
    ids = np.ascontiguousarray(record.event_ids, dtype=np.int64)
    ts = np.ascontiguousarray(record.event_ts, dtype=np.float64)
    if ids.shape != ts.shape or ids.ndim != 1:
        raise ValueError(f"user {user!r}: event_ids and event_ts must be (n,) arrays of one "
                         f"length, got {ids.shape} and {ts.shape}")
    head = _HEADER.pack(_MAGIC, RECORD_FORMAT, _DTYPES[spec.dtype], float(record.last_ts),
                        ids.shape[0])
    return b"".join([head, *parts, ids.tobytes(), ts.tobytes()])


def decode_record(blob: bytes, spec: StateSpec, user: UserId = "?") -> UserRecord:
    """Inverse of :func:`encode_record` (state returned as float32); StateFormatError on a
    blob of another format, dtype or model."""
    if len(blob) < _HEADER.size:
        raise StateFormatError(f"user {user!r}: record of {len(blob)} bytes is truncated")
    magic, fmt, code, last_ts, n = _HEADER.unpack_from(blob)
    if magic != _MAGIC or fmt != RECORD_FORMAT:
        raise StateFormatError(f"user {user!r}: not a format-{RECORD_FORMAT} state record "
                               f"(magic {magic!r}, format {fmt})")
    if code != _DTYPES[spec.dtype]:
        raise StateFormatError(f"user {user!r}: record stored with dtype code {code}, this "
                               f"store holds {spec.dtype}")
    want = _HEADER.size + spec.state_bytes + 16 * n
    if len(blob) != want:
        raise StateFormatError(f"user {user!r}: record has {len(blob)} bytes, this model's "
                               f"state with {n} event ids needs {want} (a state from another "
                               "model version?)")
    off, state = _HEADER.size, []
    for shape, dtype, size in zip(spec.shapes, spec.array_dtypes, spec.sizes):
        state.append(np.frombuffer(blob, dtype, size, off).reshape(shape).astype(np.float32))
        off += size * dtype.itemsize
    ids = np.frombuffer(blob, np.int64, n, off).copy()
    ts = np.frombuffer(blob, np.float64, n, off + 8 * n).copy()
    return UserRecord(tuple(state), last_ts, ids, ts, hashlib.sha1(blob).hexdigest())


def _user_key(u: UserId) -> str:
    """Type-tagged key, so that the int 5 and the str "5" are different users."""
    if isinstance(u, (bool, np.bool_)):
        raise TypeError(f"user ids must be int or str, got bool {u!r}")
    if isinstance(u, (int, np.integer)):
        return f"i:{int(u)}"
    if isinstance(u, str):
        return f"s:{u}"
    raise TypeError(f"user ids must be int or str, got {type(u).__name__} {u!r}")


def _user_of(key: str) -> UserId:
    return int(key[2:]) if key.startswith("i:") else key[2:]


def _check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG.match(tag):
        raise ValueError(f"snapshot tag must be 1-128 characters of [A-Za-z0-9_.:-], got "
                         f"{tag!r}")
    return tag


# --------------------------------------------------------------------------- interface

class UserStateStore(ABC):
    """Per-user MIMN states keyed by user id (int or str), behind one interface.

    Backends implement the raw blob operations; this class does the (de)serialisation,
    the metadata check and the batching. Every call is one transaction / round trip.
    """

    spec: StateSpec
    keep: int

    def _open_meta(self, where: str) -> None:
        stored = self._meta_set_if_absent(json.dumps(self.spec.meta()))
        self.spec.check_meta(json.loads(stored), where)

    # -- records
    def read(self, user_ids: Sequence[UserId]) -> List[Optional[UserRecord]]:
        """The records of ``user_ids`` (None for users not in the store), in one call."""
        keys = [_user_key(u) for u in user_ids]
        blobs = self._get_blobs(keys)
        return [None if b is None else decode_record(b, self.spec, u)
                for u, b in zip(user_ids, blobs)]

    def write(self, records: Mapping[UserId, UserRecord], check: bool = True) -> None:
        """Write all ``records`` in one transaction, or none of them.

        With ``check`` each record's ``token`` must still match the stored record (None: the
        user must not exist yet), else :class:`WriteConflictError`; ``check=False``
        overwrites. Records are validated (shapes, finite, fp16 range) before anything is
        written.
        """
        items = [(_user_key(u), (rec.token if check else "*") or "",
                  encode_record(rec, self.spec, u)) for u, rec in records.items()]
        if items:
            bad = self._cas_put(items)
            if bad:
                raise WriteConflictError([_user_of(k) for k in bad])

    def get_state(self, user_ids: Sequence[UserId],
                  device: Optional[torch.device] = None) -> MIMNState:
        """The stacked fp32 MIMNState (U rows) of ``user_ids``; UnknownUserError (a KeyError)
        naming the users the store has no state for."""
        recs = self.read(user_ids)
        missing = [u for u, r in zip(user_ids, recs) if r is None]
        if missing:
            raise UnknownUserError(missing)
        return stack_states([r.state for r in recs], self.spec, device)

    def check_model(self, model) -> None:
        """ConfigMismatchError unless ``model``'s config and state shapes are this store's."""
        spec = StateSpec.from_model(model, fp16=self.spec.dtype == "float16")
        if spec != self.spec:
            spec.check_meta(self.spec.meta(), "this store")

    def users(self) -> List[UserId]:
        return [_user_of(k) for k in self._keys()]

    def __contains__(self, user: UserId) -> bool:
        return self._get_blobs([_user_key(user)])[0] is not None

    def __len__(self) -> int:
        return self._count()

    # -- snapshots
    def snapshot(self, tag: str) -> SnapshotInfo:
        """Freeze every user's record under ``tag``, atomically (a crash leaves the previous
        snapshots as they were); keeps the newest ``keep`` snapshots, deleting older ones.
        ValueError if ``tag`` exists."""
        self._snapshot(_check_tag(tag), time.time())
        return next(s for s in self.snapshots() if s.tag == tag)

    def snapshots(self) -> List[SnapshotInfo]:
        """The kept snapshots, oldest first."""
        return sorted(self._snapshots(), key=lambda s: s.seq)

    def rollback(self, tag: str) -> None:
        """Replace every user's record by the snapshot ``tag`` (users created after it are
        removed), atomically; KeyError for an unknown tag."""
        if not self._rollback(_check_tag(tag)):
            raise KeyError(f"no snapshot {tag!r}; kept: {[s.tag for s in self.snapshots()]}")

    def snapshot_records(self, tag: str) -> Dict[UserId, UserRecord]:
        """Every record of snapshot ``tag`` (for inspection and tests)."""
        blobs = self._snapshot_blobs(_check_tag(tag))
        if blobs is None:
            raise KeyError(f"no snapshot {tag!r}")
        return {_user_of(k): decode_record(b, self.spec, _user_of(k)) for k, b in blobs.items()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- backend primitives
    @abstractmethod
    def _meta_set_if_absent(self, meta: str) -> str:
        """Store ``meta`` unless metadata exists; return the stored metadata."""

    @abstractmethod
    def _get_blobs(self, keys: List[str]) -> List[Optional[bytes]]: ...

    @abstractmethod
    def _cas_put(self, items: List[Tuple[str, str, bytes]]) -> List[str]:
        """items (key, expected token | "" absent | "*" any, blob): write all if every
        expectation holds, else nothing; return the keys whose expectation failed."""

    @abstractmethod
    def _keys(self) -> List[str]: ...

    @abstractmethod
    def _count(self) -> int: ...

    @abstractmethod
    def _snapshot(self, tag: str, created: float) -> None: ...

    @abstractmethod
    def _snapshots(self) -> List[SnapshotInfo]: ...

    @abstractmethod
    def _rollback(self, tag: str) -> bool: ...

    @abstractmethod
    def _snapshot_blobs(self, tag: str) -> Optional[Dict[str, bytes]]: ...

    @abstractmethod
    def close(self) -> None: ...


def stack_states(states: Sequence[Tuple[np.ndarray, ...]], spec: StateSpec,
                 device: Optional[torch.device] = None) -> MIMNState:
    """Per-user state arrays -> a batched fp32 MIMNState (U rows)."""
    out = []
    for i, shape in enumerate(spec.shapes):
        if states:
            a = torch.from_numpy(np.stack([s[i] for s in states]).astype(np.float32, copy=False))
        else:
            a = torch.zeros(0, *shape)
        out.append(a.to(device) if device is not None else a)
    return MIMNState(*out)


# --------------------------------------------------------------------------- SQLite

class SQLiteStateStore(UserStateStore):
    """The embedded default: one SQLite file in WAL mode.

    Every operation is one transaction (``BEGIN IMMEDIATE``), so a killed process leaves the
    last committed state; snapshots are copies into the ``snapshot_users`` table inside one
    transaction. One object may be shared by threads (calls are serialised by a lock); other
    processes open their own (SQLite's file locks serialise writers, ``timeout`` seconds).
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
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        with self._tx():
            for stmt in _SQLITE_SCHEMA:
                self._db.execute(stmt)
        self._open_meta(f"SQLite store {self.path}")

    def _tx(self):
        return _Transaction(self._db, self._lock)

    def _meta_set_if_absent(self, meta: str) -> str:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('spec', ?)", (meta,))
            return db.execute("SELECT value FROM meta WHERE key = 'spec'").fetchone()[0]

    def _get_blobs(self, keys: List[str]) -> List[Optional[bytes]]:
        with self._lock:
            self._db.execute("BEGIN")     # one read transaction: a consistent view of all users
            try:
                return self._get_unlocked(keys)
            finally:
                self._db.execute("COMMIT")

    def _cas_put(self, items: List[Tuple[str, str, bytes]]) -> List[str]:
        with self._tx() as db:
            checked = [(k, t) for k, t, _ in items if t != "*"]
            if checked:
                current = dict(zip([k for k, _ in checked],
                                   self._get_unlocked([k for k, _ in checked])))
                bad = [k for k, t in checked
                       if (current[k] is None) != (t == "")
                       or (current[k] is not None and hashlib.sha1(current[k]).hexdigest() != t)]
                if bad:
                    return bad
            db.executemany("INSERT OR REPLACE INTO users VALUES (?, ?)",
                           [(k, b) for k, _, b in items])
        return []

    def _get_unlocked(self, keys: List[str]) -> List[Optional[bytes]]:
        found: Dict[str, bytes] = {}
        for i in range(0, len(keys), _SQL_CHUNK):
            part = keys[i:i + _SQL_CHUNK]
            q = f"SELECT uid, rec FROM users WHERE uid IN ({','.join('?' * len(part))})"
            found.update(self._db.execute(q, part).fetchall())
        return [found.get(k) for k in keys]

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
        with self._lock:
            self._db.close()


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


# --------------------------------------------------------------------------- Redis

# Compare-and-set of many users, atomic on the server (a script runs to completion or not
# at all, whatever happens to the client). ARGV: n, then (field, expected, blob) n times;
# expected is the SHA-1 hex of the current blob, "" for "must not exist", "*" for any.
_LUA_CAS = """
local n = tonumber(ARGV[1])
local bad = {}
for i = 0, n - 1 do
  local exp = ARGV[3 + 3 * i]
  if exp ~= '*' then
    local cur = redis.call('HGET', KEYS[1], ARGV[2 + 3 * i])
    if exp == '' then
      if cur then bad[#bad + 1] = ARGV[2 + 3 * i] end
    elseif (not cur) or redis.sha1hex(cur) ~= exp then
      bad[#bad + 1] = ARGV[2 + 3 * i]
    end
  end
end
if #bad > 0 then return bad end
for i = 0, n - 1 do redis.call('HSET', KEYS[1], ARGV[2 + 3 * i], ARGV[4 + 3 * i]) end
return bad
"""

# KEYS: users hash, snapshot index (zset tag -> seq), snapshot info hash, sequence counter,
# the new snapshot's hash. ARGV: tag, keep, created, snapshot key prefix.
_LUA_SNAPSHOT = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return redis.error_reply('EXISTS') end
local seq = redis.call('INCR', KEYS[4])
redis.call('DEL', KEYS[5])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('COPY', KEYS[1], KEYS[5]) end
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3] .. ' ' .. redis.call('HLEN', KEYS[1]))
local n = redis.call('ZCARD', KEYS[2])
local keep = tonumber(ARGV[2])
if n > keep then
  for _, t in ipairs(redis.call('ZRANGE', KEYS[2], 0, n - keep - 1)) do
    redis.call('DEL', ARGV[4] .. t)
    redis.call('ZREM', KEYS[2], t)
    redis.call('HDEL', KEYS[3], t)
  end
end
return seq
"""

# KEYS: users hash, snapshot index, the snapshot's hash. ARGV: tag.
_LUA_ROLLBACK = """
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('COPY', KEYS[3], KEYS[1]) end
return 1
"""


class RedisStateStore(UserStateStore):
    """States in Redis (>= 6.2, for COPY): one hash ``{prefix}users`` (field = user, value =
    record blob), snapshots as copies of it (``{prefix}snap:{tag}``) made by one server-side
    script, so a snapshot, a rollback and every batched write are atomic. Keys not under
    ``prefix`` are never touched; put the prefix in braces (``"{uic}:"``) on Redis Cluster so
    that all keys share one slot. Snapshot and rollback copy the whole hash inside Redis and
    block it meanwhile (about 1 s per GB).

    ``url`` is a redis URL (``redis://host:port/db``) or an existing ``redis.Redis`` client.
    """

    def __init__(self, url, spec: StateSpec, *, prefix: str = "fastattn:uic:", keep: int = 7):
        try:
            import redis
        except ImportError as e:   # pragma: no cover - the [serving] extra installs it
            raise ImportError("RedisStateStore needs the redis client: pip install "
                              "'fastattn[serving]'") from e
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.spec, self.keep, self.prefix = spec, keep, prefix
        self._r = redis.Redis.from_url(url) if isinstance(url, str) else url
        self._k_users, self._k_meta = prefix + "users", prefix + "meta"
        self._k_snaps, self._k_info = prefix + "snapshots", prefix + "snapshot_info"
        self._k_seq, self._k_snap = prefix + "snapshot_seq", prefix + "snap:"
        self._cas = self._r.register_script(_LUA_CAS)
        self._snap = self._r.register_script(_LUA_SNAPSHOT)
        self._roll = self._r.register_script(_LUA_ROLLBACK)
        self._open_meta(f"Redis store {prefix!r}")

    def _meta_set_if_absent(self, meta: str) -> str:
        self._r.set(self._k_meta, meta, nx=True)
        return self._r.get(self._k_meta).decode()

    def _get_blobs(self, keys: List[str]) -> List[Optional[bytes]]:
        return self._r.hmget(self._k_users, keys) if keys else []

    def _cas_put(self, items: List[Tuple[str, str, bytes]]) -> List[str]:
        args: List[Any] = [len(items)]
        for k, t, b in items:
            args += [k, t, b]
        bad = self._cas(keys=[self._k_users], args=args)
        return [b.decode() for b in bad]

    def _keys(self) -> List[str]:
        return sorted(k.decode() for k in self._r.hkeys(self._k_users))

    def _count(self) -> int:
        return self._r.hlen(self._k_users)

    def _snapshot(self, tag: str, created: float) -> None:
        import redis
        try:
            self._snap(keys=[self._k_users, self._k_snaps, self._k_info, self._k_seq,
                             self._k_snap + tag],
                       args=[tag, self.keep, repr(created), self._k_snap])
        except redis.ResponseError as e:
            if "EXISTS" in str(e):
                raise ValueError(f"snapshot {tag!r} exists; pick a new tag") from None
            raise

    def _snapshots(self) -> List[SnapshotInfo]:
        seqs = self._r.zrange(self._k_snaps, 0, -1, withscores=True)
        info = self._r.hgetall(self._k_info)
        out = []
        for tag, seq in seqs:
            created, n = info[tag].decode().split()
            out.append(SnapshotInfo(tag.decode(), int(seq), float(created), int(n)))
        return out

    def _rollback(self, tag: str) -> bool:
        return bool(self._roll(keys=[self._k_users, self._k_snaps, self._k_snap + tag],
                               args=[tag]))

    def _snapshot_blobs(self, tag: str) -> Optional[Dict[str, bytes]]:
        pipe = self._r.pipeline(transaction=True)
        pipe.zscore(self._k_snaps, tag)
        pipe.hgetall(self._k_snap + tag)
        seq, blobs = pipe.execute()
        if seq is None:
            return None
        return {k.decode(): v for k, v in blobs.items()}

    def clear(self) -> None:
        """Delete every key under this store's prefix (metadata included)."""
        keys = list(self._r.scan_iter(match=self.prefix.replace("[", "\\[") + "*", count=1000))
        if keys:
            self._r.delete(*keys)

    def close(self) -> None:
        self._r.close()


def open_store(url: str, spec: StateSpec, **kwargs) -> UserStateStore:
    """``redis://...`` / ``rediss://...`` / ``unix://...`` -> :class:`RedisStateStore`;
    ``sqlite:///path`` or a plain path -> :class:`SQLiteStateStore`."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStateStore(url, spec, **kwargs)
    return SQLiteStateStore(url[len("sqlite:///"):] if url.startswith("sqlite:///") else url,
                            spec, **kwargs)
