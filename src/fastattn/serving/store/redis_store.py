"""The Redis store (>= 6.2): records in one hash, snapshots as server-side copies."""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

from .base import UserStateStore
from .lua import _LUA_CAS, _LUA_ROLLBACK, _LUA_SNAPSHOT
from .record import SnapshotInfo, StateSpec


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
        self._url = url if isinstance(url, str) else None
        self._r = redis.Redis.from_url(url) if isinstance(url, str) else url
        self._k_users, self._k_meta = prefix + "users", prefix + "meta"
        self._k_snaps, self._k_info = prefix + "snapshots", prefix + "snapshot_info"
        self._k_seq, self._k_snap = prefix + "snapshot_seq", prefix + "snap:"
        self._cas = self._r.register_script(_LUA_CAS)
        self._snap = self._r.register_script(_LUA_SNAPSHOT)
        self._roll = self._r.register_script(_LUA_ROLLBACK)
        self._open_meta(f"Redis store {prefix!r}")

    def opener(self) -> Callable[[], "RedisStateStore"]:
        """Opens the same URL and prefix (picklable: for worker processes); TypeError for a
        store opened from a client object (open it from a URL instead)."""
        if self._url is None:
            raise TypeError("this RedisStateStore was opened from a client object; open it "
                            "from a redis:// URL to reopen it in another process")
        return functools.partial(RedisStateStore, self._url, self.spec, prefix=self.prefix,
                                 keep=self.keep)

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
