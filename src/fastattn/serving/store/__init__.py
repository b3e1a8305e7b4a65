"""Per-user MIMN state stores: the User Interest Center's storage (SQLite and Redis).

One module per part: :mod:`.record` (the spec, the record and its binary format, the errors),
:mod:`.base` (the interface), :mod:`.sqlite_store`, :mod:`.redis_store` and :mod:`.lua` (its
server-side scripts).

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

from .base import UserStateStore, stack_states
from .record import (RECORD_FORMAT, ConfigMismatchError, SnapshotInfo, StateFormatError, StateSpec,
                     UnknownUserError, UserId, UserRecord, WriteConflictError, decode_record,
                     encode_record)
from .redis_store import RedisStateStore
from .sqlite_store import SQLiteStateStore

__all__ = ["StateSpec", "UserRecord", "SnapshotInfo", "UserStateStore", "SQLiteStateStore",
           "RedisStateStore", "open_store", "encode_record", "decode_record",
           "ConfigMismatchError", "StateFormatError", "WriteConflictError", "UnknownUserError",
           "RECORD_FORMAT", "UserId", "stack_states"]


def open_store(url: str, spec: StateSpec, **kwargs) -> UserStateStore:
    """``redis://...`` / ``rediss://...`` / ``unix://...`` -> :class:`RedisStateStore`;
    ``sqlite:///path`` or a plain path -> :class:`SQLiteStateStore`."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStateStore(url, spec, **kwargs)
    return SQLiteStateStore(url[len("sqlite:///"):] if url.startswith("sqlite:///") else url,
                            spec, **kwargs)
