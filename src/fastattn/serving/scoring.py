"""Scoring at serving time: MIMN from the stored user state alone, ETA-Net with a table of
precomputed key signatures (ETA+) that is invalidated when the model's weights change."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..data.batch import Batch
from .store import UserId, UserStateStore

__all__ = ["MIMNScorer", "SignatureTable", "ETAScorer", "StaleSignaturesError",
           "weights_fingerprint"]


class StaleSignaturesError(RuntimeError):
    """The model's weights changed since the signature table was built."""


def weights_fingerprint(model: torch.nn.Module) -> Tuple:
    """A cheap identity of the model's current weights: for every parameter and buffer its
    storage pointer and autograd version counter (bumped by every in-place write: optimizer
    steps, ``load_state_dict``, ``copy_``). Writes that bypass the counter (``p.data.copy_``)
    are not seen: call :meth:`SignatureTable.invalidate` after those."""
    return tuple((name, t.data_ptr(), t._version, t.dtype, t.device)
                 for name, t in list(model.named_parameters()) + list(model.named_buffers()))


def _ids(name: str, t, ndim: int = 1) -> Tensor:
    t = torch.as_tensor(t)
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != ndim:
        raise ValueError(f"{name} must be an integer tensor with {ndim} dim(s), got "
                         f"{t.dtype} {tuple(t.shape)}")
    return t.to(torch.int64)


class MIMNScorer:
    """Scores candidates for users from their stored MIMN states (no history needed).

    ``score(user_id, target_items (B,), target_cats (B,)) -> logits (B,)``; all candidates
    share the user's one state row. Unknown users raise
    :class:`~fastattn.serving.store.UnknownUserError` (a KeyError).
    """

    def __init__(self, model, store: UserStateStore):
        store.check_model(model)
        self.model, self.store = model, store

    @torch.no_grad()
    def score(self, user_id: UserId, target_items, target_cats) -> Tensor:
        dev = self.model.encoder.mem0.device
        state = self.store.get_state([user_id], dev)
        return self.model.score_state(state, _ids("target_items", target_items).to(dev),
                                      _ids("target_cats", target_cats).to(dev))

    @torch.no_grad()
    def score_users(self, user_ids: Sequence[UserId], target_items, target_cats) -> Tensor:
        """Logits (B,) of candidate b for user ``user_ids[b]``; each distinct user's state is
        read once (one store call for all)."""
        uniq: dict = {}
        rows = [uniq.setdefault(u, len(uniq)) for u in user_ids]
        dev = self.model.encoder.mem0.device
        state = self.store.get_state(list(uniq), dev)
        return self.model.score_state(state, _ids("target_items", target_items).to(dev),
                                      _ids("target_cats", target_cats).to(dev),
                                      torch.tensor(rows, dtype=torch.int64, device=dev))


class SignatureTable:
    """ETA+ key signatures of every item, ``model.item_signatures(item_cat)`` (n_items + 1,
    W), rebuilt (``on_change="rebuild"``) or refused (``"raise"``:
    :class:`StaleSignaturesError`) when the model's weights change, detected by
    :func:`weights_fingerprint` on every access (cost: one pass over the parameter list).

    ``item_cat`` (n_items + 1,) int64 maps item ids to category ids (entry 0: padding).
    """

    def __init__(self, model, item_cat: Tensor, on_change: str = "rebuild"):
        if on_change not in ("rebuild", "raise"):
            raise ValueError(f"on_change must be 'rebuild' or 'raise', got {on_change!r}")
        if not hasattr(model, "item_signatures"):
            raise TypeError(f"model must have item_signatures (ETA+), e.g. "
                            f"fastattn.models.ETANet; got {type(model).__name__}")
        self.model, self.item_cat, self.on_change = model, item_cat, on_change
        self.builds = 0
        self._table: Optional[Tensor] = None
        self._key: Optional[Tuple] = None
        self._build()

    def _build(self) -> None:
        self._table = self.model.item_signatures(self.item_cat)
        self._key = weights_fingerprint(self.model)
        self.builds += 1

    def invalidate(self) -> None:
        """Rebuild now (after weight changes the fingerprint cannot see)."""
        self._build()

    @property
    def stale(self) -> bool:
        return weights_fingerprint(self.model) != self._key

    def signatures(self) -> Tensor:
        """The current table (n_items + 1, W) int64."""
        if self.stale:
            if self.on_change == "raise":
                raise StaleSignaturesError(
                    "the model's weights changed since this signature table was built; "
                    "rebuild it (SignatureTable.invalidate()) before scoring")
            self._build()
        return self._table

    def gather(self, hist_items: Tensor) -> Tensor:
        """Key signatures (U, L, W) of behaviours ``hist_items`` (U, L): the dense form of
        ``ETAAttention(..., key_signatures=...)``. ETA-Net takes the table itself
        (:meth:`signatures`) and reads the rows of a batch's distinct behaviours."""
        return self.signatures()[_ids("hist_items", hist_items, 2).to(self._table.device)]


class ETAScorer:
    """Scores candidates against a user's behaviour history with ETA-Net, reusing the
    signature table instead of hashing the history per request (ETA+): the model embeds and
    projects the history's distinct behaviours once and reads their signatures from the
    table (a signature table plus ``hist_rows``, the indexed form)."""

    def __init__(self, model, table: SignatureTable):
        if table.model is not model:
            raise ValueError("table must be built from this model")
        self.model, self.table = model, table

    @torch.no_grad()
    def score(self, hist_items, hist_cats, target_items, target_cats) -> Tensor:
        """hist_items, hist_cats (L,) the user's behaviours, oldest first; targets (B,) ->
        logits (B,) (the history is shared by all candidates, never copied)."""
        items, cats = _ids("hist_items", hist_items), _ids("hist_cats", hist_cats)
        if items.shape != cats.shape:
            raise ValueError(f"hist_items and hist_cats must have one shape (L,), got "
                             f"{tuple(items.shape)} and {tuple(cats.shape)}")
        table = self.table.signatures()          # one staleness check per request
        dev = table.device
        batch = Batch(items[None].to(dev), cats[None].to(dev),
                      torch.tensor([items.shape[0]], device=dev),
                      _ids("target_items", target_items).to(dev),
                      _ids("target_cats", target_cats).to(dev))
        return self.model(batch, key_signatures=table)

