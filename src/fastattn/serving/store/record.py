"""Store records: the spec of what a store holds (:class:`StateSpec`), one user's record
(:class:`UserRecord`), its versioned binary format (:func:`encode_record`), user keys, and
the errors the stores raise."""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ...ops.mimn import MIMNState


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

    def encode(self, record: "UserRecord", user: UserId = "?") -> bytes:
        """The store's record codec (:func:`encode_record`)."""
        return encode_record(record, self, user)

    def decode(self, blob: bytes, user: UserId = "?") -> "UserRecord":
        return decode_record(blob, self, user)

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
