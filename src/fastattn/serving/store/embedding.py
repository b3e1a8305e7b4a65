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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .record import ConfigMismatchError, StateFormatError, UserId, _canonical

__all__ = ["EmbeddingSpec", "EmbeddingRecord", "EmbeddingBatch", "EMBEDDING_FORMAT",
           "pool_embeddings", "pool_batch"]

EMBEDDING_FORMAT = 1
_MAGIC = b"FASE"
# magic, format, raw count, 2 pad bytes, K, D (u32), written (f64), tag length (u32), pad;
# then the tag (utf-8), the pooled (K, D) and the raw (n, K, D) embeddings, fp16.
_HEADER = struct.Struct("<4sBB2xIIdI4x")
_FP16_MAX = float(np.finfo(np.float16).max)


def pool_batch(cached: np.ndarray, n: np.ndarray, current: np.ndarray
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SUM's stabilisation for B users at once.

    Args:
        cached: (B, keep, K, D) raw embeddings, right-aligned: user i's n[i] most recent ones
            (oldest first) are ``cached[i, keep - n[i]:]``, the rows before them are zeros.
        n: (B,) ints in [0, keep], how many each user has.
        current: (B, K, D) the embeddings just computed.

    Returns ``(pooled (B, K, D) float32, raw (B, keep, K, D) float32, n (B,))``: the mean of
    each user's cached and current embeddings (summed in float64), and the ``keep`` most
    recent raw ones after this refresh (current included) in the same layout.
    """
    cached = np.asarray(cached, np.float32)
    current = np.asarray(current, np.float32)
    n = np.asarray(n, np.int64)
    B, keep = cached.shape[:2]
    if cached.ndim != 4 or current.shape != (B,) + cached.shape[2:] or n.shape != (B,) or \
            (n < 0).any() or (n > keep).any():
        raise ValueError(f"cached must be (B, keep, K, D), current (B, K, D) and n (B,) in "
                         f"[0, keep]; got {cached.shape}, {current.shape}, {n.shape}")
    # Padding rows are zeros, so the sum over all keep + 1 rows is the sum over the valid
    # ones, added in the same order as a mean over the valid rows alone.
    stack = np.concatenate([cached, current[:, None]], 1)
    pooled = stack.sum(1, dtype=np.float64) / (n + 1).astype(np.float64)[:, None, None]
    return pooled.astype(np.float32), stack[:, 1:], np.minimum(n + 1, keep)


def pool_embeddings(cached: np.ndarray, current: np.ndarray, keep: int) -> np.ndarray:
    """The served embedding of one user: the mean of the ``keep`` most recent ``cached``
    (n, K, D) raw embeddings (oldest first; fewer while a user has fewer) and ``current``
    (K, D). :func:`pool_batch` for one user."""
    current = np.asarray(current, np.float32)
    cached = np.asarray(cached, np.float32).reshape((-1,) + current.shape)
    cached = cached[-keep:] if keep else cached[:0]
    pad = np.zeros((1, keep) + current.shape, np.float32)
    if len(cached):
        pad[0, keep - len(cached):] = cached
    return pool_batch(pad, np.array([len(cached)]), current[None])[0][0]


@dataclass
class EmbeddingBatch:
    """The stored embeddings of B users, as arrays (:meth:`EmbeddingSpec.decode_batch`).

    present: (B,) bool, False for users with no record (their rows are zeros).
    pooled: (B, K, D) float32; raw: (B, keep, K, D) float32 right-aligned, n: (B,) int64
    (the layout of :func:`pool_batch`); written: (B,) float64 unix times (nan if absent);
    tags and tokens: per user, None if absent.
    """

    present: np.ndarray
    pooled: np.ndarray
    raw: np.ndarray
    n: np.ndarray
    written: np.ndarray
    tags: List[Optional[str]]
    tokens: List[Optional[str]]

    def record(self, i: int) -> Optional["EmbeddingRecord"]:
        """User i's :class:`EmbeddingRecord` (None if absent)."""
        if not self.present[i]:
            return None
        keep = self.raw.shape[1]
        return EmbeddingRecord(self.pooled[i], self.raw[i, keep - int(self.n[i]):],
                               self.tags[i], float(self.written[i]), self.tokens[i])


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
        value beyond fp16's range. :meth:`encode_batch` for one record."""
        pooled = np.asarray(rec.pooled, np.float32)
        raw = np.asarray(rec.raw, np.float32)
        if pooled.shape != (self.K, self.D) or raw.ndim != 3 or \
                raw.shape[1:] != (self.K, self.D) or raw.shape[0] > self.keep:
            raise StateFormatError(f"user {user!r}: embeddings must be pooled (K, D)="
                                   f"{(self.K, self.D)} and raw (n <= {self.keep}, K, D), got "
                                   f"{pooled.shape} and {raw.shape}")
        pad = np.zeros((1, self.keep, self.K, self.D), np.float32)
        if len(raw):
            pad[0, self.keep - len(raw):] = raw
        return self.encode_batch(pooled[None], pad, [len(raw)], [rec.tag], [rec.written],
                                 [user])[0]

    def encode_batch(self, pooled: np.ndarray, raw: np.ndarray, n: Sequence[int],
                     tags: Sequence[str], written: Sequence[float],
                     users: Optional[Sequence[UserId]] = None) -> List[bytes]:
        """B records as blobs, validated and converted to fp16 in one pass over the arrays.

        pooled (B, K, D), raw (B, keep, K, D) right-aligned with n (B,) valid rows each (the
        layout of :func:`pool_batch`; the rows before them are ignored), tags and written
        (B,). StateFormatError naming the first bad user (a shape, NaN/inf, beyond fp16)."""
        pooled = np.asarray(pooled, np.float32)
        raw = np.asarray(raw, np.float32)
        n = np.asarray(n, np.int64).reshape(-1)
        B = len(n)
        users = list(users) if users is not None else ["?"] * B
        if pooled.shape != (B, self.K, self.D) or raw.shape != (B, self.keep, self.K, self.D) \
                or len(tags) != B or len(written) != B or len(users) != B or \
                (n < 0).any() or (n > self.keep).any():
            raise StateFormatError(f"user {users[0] if B else '?'!r}: embeddings must be "
                                   f"pooled (B, K, D)={(B, self.K, self.D)} and raw (B, keep, K, "
                                   f"D)={(B, self.keep, self.K, self.D)} with n in [0, "
                                   f"{self.keep}], got {pooled.shape} and {raw.shape}")
        valid = np.arange(self.keep) >= self.keep - n[:, None]                 # (B, keep)
        for name, a, rows in (("pooled", pooled, None), ("raw", raw, valid)):
            flat = a.reshape(B, -1) if rows is None else \
                np.where(rows[:, :, None, None], a, 0.0).reshape(B, -1)
            finite = np.isfinite(flat).all(1)
            if not finite.all():
                raise StateFormatError(f"user {users[int(np.argmin(finite))]!r}: {name} "
                                       f"embedding has NaN or inf")
            peak = np.abs(flat).max(1) if flat.shape[1] else np.zeros(B, np.float32)
            if (peak > _FP16_MAX).any():
                i = int(np.argmax(peak))
                raise StateFormatError(f"user {users[i]!r}: {name} embedding reaches "
                                       f"{peak[i]:.4g}, beyond fp16's range")
        p16, r16 = pooled.astype(np.float16), raw.astype(np.float16)
        out = []
        for i in range(B):
            tag, k = tags[i].encode(), int(n[i])
            out.append(b"".join([_HEADER.pack(_MAGIC, EMBEDDING_FORMAT, k, self.K, self.D,
                                              float(written[i]), len(tag)), tag,
                                 p16[i].tobytes(), r16[i, self.keep - k:].tobytes()]))
        return out

    def decode(self, blob: bytes, user: UserId = "?") -> EmbeddingRecord:
        """The record of a blob (:meth:`decode_batch` for one)."""
        return self.decode_batch([blob], [user]).record(0)

    def decode_batch(self, blobs: Sequence[Optional[bytes]],
                     users: Optional[Sequence[UserId]] = None) -> EmbeddingBatch:
        """B blobs (None: absent) as arrays, converted from fp16 in one pass;
        StateFormatError naming the first malformed record."""
        B, size, keep = len(blobs), self.K * self.D, self.keep
        users = list(users) if users is not None else ["?"] * B
        p16 = np.zeros((B, self.K, self.D), np.float16)
        r16 = np.zeros((B, keep, self.K, self.D), np.float16)
        n = np.zeros(B, np.int64)
        written = np.full(B, np.nan)
        present = np.zeros(B, bool)
        tags: List[Optional[str]] = [None] * B
        tokens: List[Optional[str]] = [None] * B
        for i, blob in enumerate(blobs):
            if blob is None:
                continue
            user = users[i]
            if len(blob) < _HEADER.size:
                raise StateFormatError(f"user {user!r}: record of {len(blob)} bytes is "
                                       f"truncated")
            magic, fmt, k, K, D, w, ntag = _HEADER.unpack_from(blob)
            if magic != _MAGIC or fmt != EMBEDDING_FORMAT:
                raise StateFormatError(f"user {user!r}: not a format-{EMBEDDING_FORMAT} "
                                       f"embedding record (magic {magic!r}, format {fmt})")
            if (K, D) != (self.K, self.D) or k > keep or \
                    len(blob) != _HEADER.size + ntag + 2 * size * (1 + k):
                raise StateFormatError(f"user {user!r}: record of {len(blob)} bytes with shape "
                                       f"{(k, K, D)} does not fit this store's "
                                       f"{(self.K, self.D)}")
            off = _HEADER.size + ntag
            tags[i] = blob[_HEADER.size:off].decode()
            p16[i] = np.frombuffer(blob, np.float16, size, off).reshape(K, D)
            if k:
                r16[i, keep - k:] = np.frombuffer(blob, np.float16, k * size,
                                                  off + 2 * size).reshape(k, K, D)
            n[i], written[i], present[i] = k, w, True
            tokens[i] = hashlib.sha1(blob).hexdigest()
        return EmbeddingBatch(present, p16.astype(np.float32), r16.astype(np.float32), n,
                              written, tags, tokens)
