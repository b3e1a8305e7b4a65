"""The store interface: :class:`UserStateStore` does the (de)serialisation, the metadata
check and the batching; backends implement raw blob primitives."""
from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ...ops.mimn import MIMNState
from .record import (SnapshotInfo, StateSpec, UnknownUserError, UserId, UserRecord,
                     WriteConflictError, _check_tag, _user_key, _user_of)


class UserStateStore(ABC):
    """Per-user records keyed by user id (int or str), behind one interface.

    Backends implement the raw blob operations; this class does the metadata check and the
    batching, and the store's spec (de)serialises the records: MIMN states for a
    :class:`StateSpec` (the UIC), user embeddings for an
    :class:`~fastattn.serving.store.embedding.EmbeddingSpec` (SUM). Every call is one
    transaction / round trip. ``get_state`` and ``check_model`` are for MIMN states.
    """

    spec: StateSpec
    keep: int

    def _open_meta(self, where: str) -> None:
        stored = self._meta_set_if_absent(json.dumps(self.spec.meta()))
        self.spec.check_meta(json.loads(stored), where)

    # -- records
    def read(self, user_ids: Sequence[UserId]) -> List[Optional[UserRecord]]:
        """The records of ``user_ids`` (None for users not in the store), in one call."""
        return [None if b is None else self.spec.decode(b, u)
                for u, b in zip(user_ids, self.read_blobs(user_ids))]

    def read_blobs(self, user_ids: Sequence[UserId]) -> List[Optional[bytes]]:
        """The encoded records of ``user_ids`` (None if absent), in one call; for callers
        that decode a batch at once (``spec.decode_batch``)."""
        return self._get_blobs([_user_key(u) for u in user_ids])

    def write(self, records: Mapping[UserId, UserRecord], check: bool = True) -> None:
        """Write all ``records`` in one transaction, or none of them.

        With ``check`` each record's ``token`` must still match the stored record (None: the
        user must not exist yet), else :class:`WriteConflictError`; ``check=False``
        overwrites. Records are validated (shapes, finite, fp16 range) before anything is
        written.
        """
        self.write_blobs([(u, rec.token, self.spec.encode(rec, u))
                          for u, rec in records.items()], check)

    def write_blobs(self, items: Sequence[Tuple[UserId, Optional[str], bytes]],
                    check: bool = True) -> None:
        """:meth:`write` of already encoded records: ``(user, token, blob)`` items, token the
        SHA-1 hex of the blob it replaces (None: the user must not exist yet). All or none;
        :class:`WriteConflictError` naming the users whose token no longer matches."""
        put = [(_user_key(u), (t if check else "*") or "", b) for u, t, b in items]
        if put:
            bad = self._cas_put(put)
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

    def connect(self) -> "UserStateStore":
        """A handle on the same store for another thread (e.g. a writer beside readers).
        The default shares this object (Redis: its client's connection pool is
        thread-safe); SQLite opens a new connection."""
        return self

    def opener(self) -> Callable[[], "UserStateStore"]:
        """A picklable callable that opens this store again, e.g. in a worker process
        (SQLite: the same file; Redis: the same URL and prefix). TypeError for a store that
        cannot be reopened elsewhere."""
        raise TypeError(f"{type(self).__name__} cannot be reopened in another process")

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
        return {_user_of(k): self.spec.decode(b, _user_of(k)) for k, b in blobs.items()}

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
