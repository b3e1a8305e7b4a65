"""User-embedding records (SUM serving): a user's most recent raw embeddings and the pooled
one a ranker reads, in fp16, tagged with the model snapshot that computed them.

Stabilisation (SUM): a refresh computes the current embedding e_t; the served embedding is
the mean of the (up to) ``keep`` most recent cached raw embeddings and e_t, and the record
then keeps the ``keep`` most recent raw ones (e_t included) for the next refresh. A read is
a pure read: the pooled embedding is stored, never recomputed on the request path.

Storage is fp16: for values in fp16's normal range the round trip is within a relative
2^-11 (half an ulp); below 2^-14 (subnormals) within an absolute 2^-25; values beyond
65504 are refused (:class:`StateFormatError`), never clipped.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np

from .record import ConfigMismatchError, StateFormatError, UserId, _canonical

__all__ = ["EmbeddingSpec", "EmbeddingRecord", "EMBEDDING_FORMAT", "pool_embeddings"]

EMBEDDING_FORMAT = 1
_MAGIC = b"FASE"
# magic, format, raw count, 2 pad bytes, K, D (u32), written (f64), tag length (u32), pad;
# then the tag (utf-8), the pooled (K, D) and the raw (n, K, D) embeddings, fp16.
_HEADER = struct.Struct("<4sBB2xIIdI4x")
_FP16_MAX = float(np.finfo(np.float16).max)


def pool_embeddings(cached: np.ndarray, current: np.ndarray, keep: int) -> np.ndarray:
    """The served embedding: the mean of the ``keep`` most recent ``cached`` (n, K, D) raw
    embeddings (oldest first; fewer while a user has fewer) and ``current`` (K, D)."""
    stack = np.concatenate([np.asarray(cached, np.float32)[-keep:] if keep else
                            np.zeros((0,) + current.shape, np.float32),
                            np.asarray(current, np.float32)[None]])
    return stack.mean(0, dtype=np.float64).astype(np.float32)


@dataclass
class EmbeddingRecord:
    """One user's stored embeddings.

    pooled: (K, D) float32, what :meth:`UserEmbeddingService.get` serves.
    raw: (n, K, D) float32, the n <= keep most recent raw embeddings, oldest first.
    tag: the model snapshot that computed the newest one.
    written: unix time of the newest one.
    token: SHA-1 hex of the blob as read (None for a new user); writes compare it.
    """

    pooled: np.ndarray
    raw: np.ndarray
    tag: str
    written: float
    token: Optional[str] = None


@dataclass(frozen=True)
class EmbeddingSpec:
    """What an embedding store holds: the user model's config, the (K, D) embedding shape,
    and how many raw embeddings each record keeps for pooling (SUM: 2)."""

    config: Dict[str, Any]
    K: int
    D: int
    keep: int = 2

    def __post_init__(self):
        for name in ("K", "D"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or \
                not 0 <= self.keep <= 255:
            raise ValueError(f"keep must be an int in [0, 255], got {self.keep!r}")
        json.loads(_canonical(self.config))     # fails early on a non-serialisable config

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(_canonical(self.config).encode()).hexdigest()[:16]

    def meta(self) -> Dict[str, Any]:
        return {"format": EMBEDDING_FORMAT, "kind": "user_embedding",
                "fingerprint": self.fingerprint, "config": self.config,
                "shape": [self.K, self.D], "keep": self.keep, "dtype": "float16"}

    def check_meta(self, stored: Mapping[str, Any], where: str) -> None:
        """ConfigMismatchError unless ``stored`` (a store's metadata) matches this spec."""
        if stored.get("kind") != "user_embedding" or stored.get("format") != EMBEDDING_FORMAT:
            raise StateFormatError(f"{where} does not hold format-{EMBEDDING_FORMAT} user "
                                   f"embeddings (kind {stored.get('kind')!r}, format "
                                   f"{stored.get('format')})")
        want = self.meta()
        diff = [k for k in ("fingerprint", "shape", "keep") if stored.get(k) != want[k]]
        if diff:
            raise ConfigMismatchError(f"{where} holds embeddings of another user model: "
                                      f"{ {k: stored.get(k) for k in diff} } vs "
                                      f"{ {k: want[k] for k in diff} }")

    def encode(self, rec: EmbeddingRecord, user: UserId = "?") -> bytes:
        """The record as a blob; StateFormatError on a wrong shape, a non-finite value or a
        value beyond fp16's range."""
        pooled = np.asarray(rec.pooled, np.float32)
        raw = np.asarray(rec.raw, np.float32)
        if pooled.shape != (self.K, self.D) or raw.ndim != 3 or \
                raw.shape[1:] != (self.K, self.D) or raw.shape[0] > self.keep:
            raise StateFormatError(f"user {user!r}: embeddings must be pooled (K, D)="
                                   f"{(self.K, self.D)} and raw (n <= {self.keep}, K, D), got "
                                   f"{pooled.shape} and {raw.shape}")
        for name, a in (("pooled", pooled), ("raw", raw)):
            if not np.isfinite(a).all():
                raise StateFormatError(f"user {user!r}: {name} embedding has NaN or inf")
            if a.size and np.abs(a).max() > _FP16_MAX:
                raise StateFormatError(f"user {user!r}: {name} embedding reaches "
                                       f"{np.abs(a).max():.4g}, beyond fp16's range")
        tag = rec.tag.encode()
        head = _HEADER.pack(_MAGIC, EMBEDDING_FORMAT, raw.shape[0], self.K, self.D,
                            float(rec.written), len(tag))
        return b"".join([head, tag, pooled.astype(np.float16).tobytes(),
                         raw.astype(np.float16).tobytes()])

    def decode(self, blob: bytes, user: UserId = "?") -> EmbeddingRecord:
        if len(blob) < _HEADER.size:
            raise StateFormatError(f"user {user!r}: record of {len(blob)} bytes is truncated")
        magic, fmt, n, K, D, written, ntag = _HEADER.unpack_from(blob)
        if magic != _MAGIC or fmt != EMBEDDING_FORMAT:
            raise StateFormatError(f"user {user!r}: not a format-{EMBEDDING_FORMAT} embedding "
                                   f"record (magic {magic!r}, format {fmt})")
        size = self.K * self.D
        if (K, D) != (self.K, self.D) or n > self.keep or \
                len(blob) != _HEADER.size + ntag + 2 * size * (1 + n):
            raise StateFormatError(f"user {user!r}: record of {len(blob)} bytes with shape "
                                   f"{(n, K, D)} does not fit this store's {(self.K, self.D)}")
        off = _HEADER.size + ntag
        tag = blob[_HEADER.size:off].decode()
        pooled = np.frombuffer(blob, np.float16, size, off).reshape(K, D).astype(np.float32)
        raw = np.frombuffer(blob, np.float16, n * size, off + 2 * size)
        return EmbeddingRecord(pooled, raw.reshape(n, K, D).astype(np.float32), tag, written,
                               hashlib.sha1(blob).hexdigest())
