"""Serving: the User Interest Center (per-user MIMN states updated per behaviour event, kept
in a SQLite or Redis store with snapshots), scoring from stored states (MIMN) or from
precomputed key signatures (ETA+), and asynchronous user-embedding serving (SUM)."""
from __future__ import annotations

from .scoring import (ETAScorer, MIMNScorer, SignatureTable, StaleSignaturesError,
                      weights_fingerprint)
from .store import (ConfigMismatchError, RedisStateStore, SnapshotInfo, SQLiteStateStore,
                    StateFormatError, StateSpec, UnknownUserError, UserRecord, UserStateStore,
                    WriteConflictError, open_store)
from .store.embedding import EmbeddingRecord, EmbeddingSpec
from .sum import Served, SUMUserTower, UserEmbeddingService
from .updater import ApplyResult, BoundStepper, Event, InterestUpdater, OutOfOrderError

__all__ = ["UserStateStore", "SQLiteStateStore", "RedisStateStore", "open_store", "StateSpec",
           "UserRecord", "SnapshotInfo", "ConfigMismatchError", "StateFormatError",
           "WriteConflictError", "UnknownUserError", "InterestUpdater", "Event", "ApplyResult",
           "OutOfOrderError", "BoundStepper", "MIMNScorer", "SignatureTable", "ETAScorer",
           "StaleSignaturesError", "weights_fingerprint", "SUMUserTower", "UserEmbeddingService",
           "Served", "EmbeddingSpec", "EmbeddingRecord"]
