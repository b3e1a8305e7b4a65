"""BAHE's atomic behaviour encoding (Behavior Aggregated Hierarchical Encoding, Ant Group
2024): encode each distinct behaviour of a batch once, pool its token states into one
vector, and read users' histories from the resulting table.

* :class:`TokenTransformer` / :class:`TokenEncoder`: a small ``nn.TransformerEncoder`` over
  (N, S, d) states / (N, K) token ids with a padding mask (the lower and upper layers of
  the ``bahe`` model; any module with the same call signature can replace them).
* :class:`AtomicBehaviourEncoder`: ``unique_rows`` → encoder over the N distinct behaviours
  → fused :func:`fastattn.masked_mean` → (U, L, d) histories or the indexed form.
* :class:`BehaviourTable`: the behaviour-embedding table of a whole vocabulary, kept while
  the encoder is frozen, rebuilt or refused when its weights change (like
  :class:`fastattn.serving.SignatureTable`), saved and loaded with a digest of the weights.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops import masked_mean, topk_gather, unique_rows

__all__ = ["TokenTransformer", "TokenEncoder", "AtomicBehaviourEncoder", "BehaviourTable",
           "StaleBehaviourTableError", "positions", "weights_digest"]


def _attention_mask(mask: Tensor) -> Tensor:
    """``src_key_padding_mask`` (True = ignore) from a validity mask (N, S). A row without any
    valid position keeps position 0 visible: attention over nothing would give NaN, and
    its outputs are masked out downstream anyway."""
    pad = ~mask
    if pad.shape[1]:
        pad[:, 0] &= mask.any(1)
    return pad


class TokenTransformer(nn.Module):
    """Learned positions plus ``layers`` pre-norm ``nn.TransformerEncoderLayer`` s.

    ``forward(x (N, S, dim), mask (N, S) bool) -> (N, S, dim)``; S <= max_len. Masked
    positions are not attended to (their outputs are defined but meaningless).
    """

    def __init__(self, dim: int = 32, layers: int = 1, heads: int = 2, max_len: int = 64,
                 ff_mult: int = 2):
        super().__init__()
        self.dim, self.max_len = dim, max_len
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=ff_mult * dim,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        S = x.shape[1]
        if S > self.max_len:
            raise ValueError(f"sequence length {S} exceeds max_len={self.max_len}")
        if x.shape[0] == 0 or S == 0:
            return x
        return self.layers(x + self.pos[:S], src_key_padding_mask=_attention_mask(mask))


class TokenEncoder(nn.Module):
    """Token ids (N, K) int (0 = padding) and mask (N, K) bool -> token states (N, K, dim):
    an embedding, then a :class:`TokenTransformer` (the lower layers of a language model)."""

    def __init__(self, vocab_size: int, dim: int = 32, layers: int = 1, heads: int = 2,
                 max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.body = TokenTransformer(dim, layers, heads, max_len)
        self.dim = dim

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.body(self.embed(tokens), mask)


def positions(hist_rows: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """idx (U, L): l at valid positions, -1 past the length (the slots of the gather that
    turns an indexed history into a dense one)."""
    U, L = hist_rows.shape
    idx = torch.arange(L, device=hist_rows.device).expand(U, L)
    valid = hist_rows >= 0
    if lengths is not None:
        valid = valid & (idx < lengths.to(torch.int64)[:, None])
    return torch.where(valid, idx, -1)


class AtomicBehaviourEncoder(nn.Module):
    """Encode each distinct behaviour of a batch once (ABE) and pool its tokens.

    Args:
        encoder: any module mapping token ids (N, K) int64 and a mask (N, K) bool to token
            states (N, K, d), e.g. the lower layers of a language model
            (:class:`TokenEncoder`).
        pool: ``"mean"``, the masked mean over valid tokens (:func:`fastattn.masked_mean`,
            fused forward and backward in every backend).
        pad_token: the token id that marks padding in token tables (mask = tokens != pad).
    """

    def __init__(self, encoder: nn.Module, pool: str = "mean", pad_token: int = 0,
                 backend: Optional[str] = None):
        super().__init__()
        if pool != "mean":
            raise ValueError(f"pool must be 'mean', got {pool!r}")
        self.encoder, self.pool, self.pad_token, self.backend = encoder, pool, pad_token, backend
        #: {"behaviours": valid positions, "distinct": N} of the last forward call.
        self.last_stats: dict = {}

    def token_states(self, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """(states (N, K, d), mask (N, K)) of token rows (N, K)."""
        mask = tokens != self.pad_token
        return self.encoder(tokens, mask), mask

    def encode(self, tokens: Tensor) -> Tensor:
        """Behaviour embeddings (N, d) of token rows (N, K): encoder, then masked mean."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (N, K) token ids, got shape {tuple(tokens.shape)}")
        states, mask = self.token_states(tokens)
        return masked_mean(states, mask, backend=self.backend)

    def distinct(self, ids: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``unique_rows(ids, lengths)``: (distinct ids (N,), hist_rows (U, L)); records
        ``last_stats`` (the distinct-behaviour ratio is distinct / behaviours)."""
        uniq, rows = unique_rows(ids, lengths, backend=self.backend)
        self.last_stats = {"behaviours": int((rows >= 0).sum()), "distinct": int(uniq.shape[0])}
        return uniq, rows

    def forward(self, ids: Tensor, token_table: Tensor, lengths: Optional[Tensor] = None, *,
                indexed: bool = False, table: Optional["BehaviourTable"] = None
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Embeddings of the behaviours ``ids`` (U, L) int (positions past ``lengths`` (U,)
        are padding), whose tokens are ``token_table[ids]`` (V, K).

        The batch's distinct ids are found with :func:`fastattn.unique_rows` and encoded
        once each (or read from ``table``, a :class:`BehaviourTable` of this encoder).
        Returns (U, L, d) with zero rows past the lengths, or with ``indexed`` the
        indexed form ``(embeddings (N, d), hist_rows (U, L))`` the fastattn ops take.
        """
        uniq, rows = self.distinct(ids, lengths)
        if table is not None:
            emb = table.embeddings()[uniq]
        else:
            emb = self.encode(token_table[uniq])
        if indexed:
            return emb, rows
        return gather_histories(emb, rows, lengths, self.backend)


def gather_histories(emb: Tensor, hist_rows: Tensor, lengths: Optional[Tensor] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Dense histories (U, L, d) from a table (N, d) and hist_rows (U, L): the indexed
    ``topk_gather`` with every valid position selected (zeros past the length), whose
    backward is the package's deterministic row scatter into the table."""
    return topk_gather(emb, positions(hist_rows, lengths), hist_rows=hist_rows, backend=backend)


class StaleBehaviourTableError(RuntimeError):
    """The encoder's weights changed since the behaviour table was built (or saved)."""


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameter and buffer names, dtypes, shapes and values: the
    identity of its weights across processes (a saved table records it)."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tensor_digest(t: Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}".encode()
                          + t.view(torch.uint8).numpy().tobytes()).hexdigest()


class BehaviourTable:
    """The behaviour-embedding table (V, d) of every token row of ``token_table`` (V, K):
    ABE's "offline" table, built once and reused while the encoder is frozen.

    A weight change of ``abe.encoder`` (optimizer step, ``load_state_dict``; detected by
    :func:`fastattn.serving.scoring.weights_fingerprint` on every access) rebuilds it
    (``on_change="rebuild"``) or raises :class:`StaleBehaviourTableError` (``"raise"``).
    ``save``/``load`` keep it across processes; ``load`` checks the encoder's
    :func:`weights_digest` and the token table against the saved ones.
    """

    def __init__(self, abe: AtomicBehaviourEncoder, token_table: Tensor, *,
                 on_change: str = "rebuild", chunk: int = 4096, _table: Optional[Tensor] = None):
        if on_change not in ("rebuild", "raise"):
            raise ValueError(f"on_change must be 'rebuild' or 'raise', got {on_change!r}")
        if not isinstance(abe, AtomicBehaviourEncoder):
            raise TypeError(f"abe must be an AtomicBehaviourEncoder, got {type(abe).__name__}")
        if token_table.dim() != 2 or token_table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token_table must be (V, K) int token ids, got "
                             f"{token_table.dtype} {tuple(token_table.shape)}")
        self.abe, self.token_table, self.on_change, self.chunk = abe, token_table, on_change, chunk
        self.builds = 0
        self._table: Optional[Tensor] = None
        self._key = None
        if _table is None:
            self._build()
        else:
            self._table, self._key = _table, self._fingerprint()

    def _fingerprint(self):
        from ..serving.scoring import weights_fingerprint
        return weights_fingerprint(self.abe.encoder)

    @torch.no_grad()
    def _build(self) -> None:
        was = self.abe.training
        self.abe.eval()
        try:
            parts = [self.abe.encode(self.token_table[lo:lo + self.chunk])
                     for lo in range(0, self.token_table.shape[0], self.chunk)]
        finally:
            self.abe.train(was)
        self._table = torch.cat(parts) if parts else None
        self._key = self._fingerprint()
        self.builds += 1

    def invalidate(self) -> None:
        """Rebuild now (after weight changes the fingerprint cannot see, e.g. ``p.data``)."""
        self._build()

    @property
    def stale(self) -> bool:
        return self._fingerprint() != self._key

    def embeddings(self) -> Tensor:
        """The current table (V, d)."""
        if self.stale:
            if self.on_change == "raise":
                raise StaleBehaviourTableError(
                    "the encoder's weights changed since this behaviour table was built; "
                    "rebuild it (BehaviourTable.invalidate()) before reading it")
            self._build()
        return self._table

    def gather(self, ids: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """Embeddings (U, L, d) of behaviours ``ids`` (U, L), zeros past ``lengths``."""
        return self.abe(ids, self.token_table, lengths, table=self)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        torch.save({"table": self.embeddings().cpu(), "weights": weights_digest(self.abe.encoder),
                    "tokens": _tensor_digest(self.token_table)}, path)

    @classmethod
    def load(cls, path, abe: AtomicBehaviourEncoder, token_table: Tensor, *,
             on_change: str = "rebuild", chunk: int = 4096) -> "BehaviourTable":
        """The table saved at ``path`` if it was built from these weights and tokens;
        otherwise rebuilt (``on_change="rebuild"``) or :class:`StaleBehaviourTableError`."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        fresh = (saved["weights"] == weights_digest(abe.encoder)
                 and saved["tokens"] == _tensor_digest(token_table))
        if not fresh:
            if on_change == "raise":
                raise StaleBehaviourTableError(
                    f"{os.fspath(path)} was built from other encoder weights or tokens")
            return cls(abe, token_table, on_change=on_change, chunk=chunk)
        dev = next(iter(abe.encoder.parameters()), saved["table"]).device
        return cls(abe, token_table, on_change=on_change, chunk=chunk,
                   _table=saved["table"].to(dev))
