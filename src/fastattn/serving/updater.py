"""The User Interest Center's updater: behaviour events -> per-user MIMN states in a store.

:class:`InterestUpdater` applies a batch of events (user id, event id, item, category,
timestamp): it validates the whole batch, reads every affected user's record in one call,
drops events already applied (replays, duplicates), orders each user's events by timestamp
and steps all users with a pending event together (one ``mimn_step`` per round over the
users), then writes every new record in one transaction. A bad event (NaN, unknown item,
older than the user's last applied event, a user without a state under
``create_missing=False``) fails the whole batch before anything is written. Integer
timestamps (nanoseconds included) order a batch's events exactly; against a user's stored
last timestamp (a float64 in the record) the comparison has float64's resolution.

:class:`BoundStepper` is the step it uses: ``fastattn.ops.mimn.bind_step`` over the
encoder's parameters, bound once (the op wrapper's checks and dispatch of ~30 arrays cost
~0.17 ms per call; the bound kernel call for one user a few tens of µs).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import (Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence,
                    Tuple, Union)

import numpy as np
import torch
from torch import Tensor

from ..ops.mimn import BoundStep, MIMNState, bind_step, kernel_params
from .store import (UnknownUserError, UserId, UserRecord, UserStateStore,
                    WriteConflictError, stack_states)

__all__ = ["Event", "ApplyResult", "InterestUpdater", "BoundStepper", "OutOfOrderError"]


class Event(NamedTuple):
    """One behaviour event; any 5-tuple in this order works as well."""

    user_id: UserId
    event_id: int
    item: int
    category: int
    timestamp: float


class ApplyResult(NamedTuple):
    applied: int        # events stepped into states
    skipped: int        # already-applied or duplicated (user, event id) pairs
    users: int          # users whose state changed
    rounds: int         # encoder step calls


class OutOfOrderError(ValueError):
    """An event is older than the last event already applied to its user."""


_COLUMNS = ("user_id", "event_id", "item", "category", "timestamp")


class BoundStepper:
    """``step(x (B, x_dim), state) -> state'`` of an :class:`~fastattn.nn.MIMNEncoder`,
    equal to ``encoder.step`` (the same kernel), for inference.

    The encoder's parameters are bound once with :func:`fastattn.ops.mimn.bind_step` (which
    calls the cpp/numba kernel directly on CPU without gradients, and ``mimn_step``
    otherwise); they are bound again when a parameter tensor is replaced or the backend
    changes (in-place updates are seen through the binding).
    """

    def __init__(self, encoder):
        self.encoder = encoder
        self._key: Optional[Tuple[Any, ...]] = None
        self._step: Optional[BoundStep] = None

    def __call__(self, x: Tensor, state: MIMNState) -> MIMNState:
        p = self.encoder.params()
        key = (self.encoder.backend, p.miu_k, p.mem0.data_ptr(), p.mem0.dtype) + tuple(
            None if t is None else (t.data_ptr(), t.dtype, t.device) for t in kernel_params(p))
        if key != self._key:
            self._step, self._key = bind_step(p, self.encoder.backend), key
        return self._step(x, state)[1]


@dataclass
class _Events:
    users: List[UserId]
    event_id: np.ndarray     # (N,) int64
    item: np.ndarray         # (N,) int64
    category: np.ndarray     # (N,) int64
    timestamp: np.ndarray    # (N,) float64, as records store it
    order: np.ndarray        # (N,) the timestamps as given (int64 or float64): sort key


def _int_column(name: str, values, n: int) -> np.ndarray:
    a = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values)
    if a.shape != (n,):
        raise ValueError(f"events {name} must have shape (N,)=({n},), got {a.shape}")
    if a.dtype.kind == "f":
        if np.isnan(a).any():
            raise ValueError(f"events {name} contains NaN (at event {int(np.isnan(a).argmax())})")
        if not (np.isfinite(a) & (a == np.round(a))).all():
            raise ValueError(f"events {name} must hold integer ids, got non-integral values")
    elif a.dtype.kind not in "iu" and n:
        raise TypeError(f"events {name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _events(events) -> _Events:
    """Columns of a sequence of 5-tuples or of a mapping of (N,) columns, type-checked."""
    if isinstance(events, Mapping):
        missing = [c for c in _COLUMNS if c not in events]
        if missing:
            raise ValueError(f"events mapping lacks columns {missing}; needs {list(_COLUMNS)}")
        cols = [events[c] for c in _COLUMNS]
        users = cols[0].tolist() if hasattr(cols[0], "tolist") else list(cols[0])
    else:
        rows = list(events)
        for i, r in enumerate(rows):
            if not isinstance(r, (tuple, list)) or len(r) != 5:
                raise ValueError(f"event {i} must be (user_id, event_id, item, category, "
                                 f"timestamp), got {r!r}")
        cols = list(zip(*rows)) if rows else [()] * 5
        users = list(cols[0])
    n = len(users)
    ts = np.asarray(cols[4].detach().cpu() if isinstance(cols[4], Tensor) else cols[4])
    if ts.shape != (n,):
        raise ValueError(f"events timestamp must have shape (N,)=({n},), got {ts.shape}")
    if n and ts.dtype.kind not in "iuf":
        raise TypeError(f"events timestamp must be numbers, got dtype {ts.dtype}")
    # Integer timestamps (e.g. nanoseconds since the epoch, beyond float64's 2^53) order
    # the events exactly; records keep them as float64 (the store's format).
    order = ts.astype(np.int64) if ts.dtype.kind in "iu" else ts.astype(np.float64)
    ts = ts.astype(np.float64)
    if not np.isfinite(ts).all():
        raise ValueError(f"events timestamp must be finite, got {ts[~np.isfinite(ts)][:5]} "
                         f"(event {int((~np.isfinite(ts)).argmax())})")
    return _Events(users, _int_column("event_id", cols[1], n), _int_column("item", cols[2], n),
                   _int_column("category", cols[3], n), ts, order)


class InterestUpdater:
    """Applies behaviour events to per-user MIMN states held in ``store``.

    Args:
        model: a :class:`fastattn.models.MIMN` (``embed`` gives each event's x_t and
            ``encoder`` steps the state); its config must match the store's.
        store: a :class:`~fastattn.serving.store.UserStateStore` opened with
            ``StateSpec.from_model(model)``.
        batch_users: users stepped together per encoder call (bounds memory per round).
        dedup_window: ids of each user's last ``dedup_window`` applied events (and all at
            its last timestamp) are kept to make replays idempotent; an event older than the
            user's last applied one and not among those ids is rejected.
        max_retries: re-reads after a concurrent writer changed one of the users.
        create_missing: an event for a user without a stored state starts that user from
            the model's initial state (True) or fails the batch with
            :class:`~fastattn.serving.store.UnknownUserError` (False, a KeyError;
            :meth:`warm_start` creates users).
    """

    def __init__(self, model, store: UserStateStore, *, batch_users: int = 1024,
                 dedup_window: int = 128, max_retries: int = 8, create_missing: bool = True):
        for name, v in (("batch_users", batch_users), ("dedup_window", dedup_window)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not hasattr(model, "encoder") or not hasattr(model, "embed"):
            raise TypeError(f"model must have .encoder (an MIMNEncoder) and .embed(items, "
                            f"cats), e.g. fastattn.models.MIMN; got {type(model).__name__}")
        store.check_model(model)
        self.model, self.store, self.encoder = model, store, model.encoder
        self.batch_users, self.dedup_window, self.max_retries = (batch_users, dedup_window,
                                                                 max_retries)
        self.create_missing = bool(create_missing)
        self.step = BoundStepper(self.encoder)

    # ------------------------------------------------------------------ helpers

    @property
    def _param(self) -> Tensor:
        return self.encoder.mem0

    def _check_ids(self, ev: _Events) -> None:
        for name, a, high in (("item", ev.item, self.model.n_items),
                              ("category", ev.category, self.model.n_cats)):
            bad = (a < 1) | (a > high)
            if bad.any():
                raise ValueError(f"events {name} ids must lie in [1, {high}] (0 is padding), "
                                 f"got unknown ids {np.unique(a[bad])[:10].tolist()}")

    @torch.no_grad()
    def _embed(self, items: np.ndarray, cats: np.ndarray, users: Sequence[UserId]) -> Tensor:
        dev = self._param.device
        x = self.model.embed(torch.from_numpy(items).to(dev), torch.from_numpy(cats).to(dev))
        x = x.to(self._param.dtype).contiguous()
        bad = ~torch.isfinite(x).all(-1)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"event features are NaN/inf for item {int(items[i])} (user "
                             f"{users[i]!r}): the model's embeddings are not finite")
        return x

    def _initial(self, n: int) -> MIMNState:
        return MIMNState(*(t.detach().clone() for t in self.encoder.initial_state(n)))

    def _states(self, records: Sequence[Optional[UserRecord]]) -> MIMNState:
        """Stacked state rows (the model's dtype and device), initial for new users."""
        dev, dtype = self._param.device, self._param.dtype
        have = [r.state for r in records if r is not None]
        stored = stack_states(have, self.store.spec, dev)
        new = self._initial(len(records) - len(have))
        order = np.argsort([r is None for r in records], kind="stable")   # stored first
        inv = torch.from_numpy(np.argsort(order)).to(dev)
        return MIMNState(*(torch.cat([s.to(dtype), n])[inv].contiguous()
                           for s, n in zip(stored, new)))

    def _record(self, state: Sequence[np.ndarray], row: int, last_ts: float, ids: np.ndarray,
                ts: np.ndarray, token: Optional[str]) -> UserRecord:
        """state: the (U, ...) arrays from :func:`_numpy`; row: this user's."""
        # Keep the last dedup_window ids, and every id at the last timestamp: an event at
        # that timestamp is accepted, so its id must be checkable.
        keep = max(self.dedup_window, int((ts == last_ts).sum()))
        return UserRecord(tuple(a[row] for a in state), last_ts, ids[-keep:], ts[-keep:],
                          token)

    # ------------------------------------------------------------------ apply

    def apply(self, events: Union[Iterable[Sequence], Mapping[str, Any]]) -> ApplyResult:
        """Apply events, each (user_id, event_id, item, category, timestamp), given as a
        sequence of 5-tuples (e.g. :class:`Event`) or a mapping of (N,) columns named
        ``user_id, event_id, item, category, timestamp``.

        All or nothing: ValueError/TypeError (NaN, unknown ids, wrong shapes),
        :class:`OutOfOrderError` or a failed write leave the store unchanged.
        """
        ev = _events(events)
        self._check_ids(ev)
        if not ev.users:
            return ApplyResult(0, 0, 0, 0)
        x_all = self._embed(ev.item, ev.category, ev.users)
        for attempt in range(self.max_retries + 1):
            try:
                return self._apply_once(ev, x_all)
            except WriteConflictError:
                if attempt == self.max_retries:
                    raise
                time.sleep(random.uniform(0, 0.002 * 2 ** attempt))
        raise AssertionError("unreachable")

    def _apply_once(self, ev: _Events, x_all: Tensor) -> ApplyResult:
        # Group by user, oldest first; ties keep arrival order (a stable sort).
        uniq: Dict[UserId, int] = {}
        for u in ev.users:
            uniq.setdefault(u, len(uniq))
        uidx = np.fromiter((uniq[u] for u in ev.users), np.int64, len(ev.users))
        order = np.lexsort((ev.order, uidx))
        users = list(uniq)
        records = self.store.read(users)
        if not self.create_missing:
            missing = [u for u, r in zip(users, records) if r is None]
            if missing:
                raise UnknownUserError(missing)   # before anything is written
        pending: List[np.ndarray] = []        # per user: positions into ev of events to apply
        skipped, late = 0, []
        bounds = np.searchsorted(uidx[order], np.arange(len(users) + 1))
        for k, u in enumerate(users):
            pos = order[bounds[k]:bounds[k + 1]]
            rec, ids = records[k], ev.event_id[pos]
            fresh = np.zeros(pos.size, bool)           # the first of each id in this batch
            fresh[np.unique(ids, return_index=True)[1]] = True
            if rec is not None and rec.event_ids.size:
                fresh &= ~np.isin(ids, rec.event_ids)  # applied before: a replay
            keep = pos[fresh]
            skipped += pos.size - keep.size
            if rec is not None and keep.size and ev.timestamp[keep[0]] < rec.last_ts:
                p = keep[0]
                late.append(f"user {u!r} event {int(ev.event_id[p])} at {ev.timestamp[p]!r} "
                            f"< last applied {rec.last_ts!r}")
            pending.append(keep)
        if late:
            raise OutOfOrderError(
                f"{len(late)} user(s) got events older than their last applied event (and not "
                f"among its recent applied ids, so not a replay); nothing was applied: "
                f"{'; '.join(late[:5])}")
        active = [k for k in range(len(users)) if pending[k].size]
        if not active:
            return ApplyResult(0, skipped, 0, 0)
        new_records: Dict[UserId, UserRecord] = {}
        rounds = 0
        for c in range(0, len(active), self.batch_users):
            chunk = active[c:c + self.batch_users]
            # Most events first, so that the users still stepping in round r are a prefix.
            chunk.sort(key=lambda k: -pending[k].size)
            counts = np.array([pending[k].size for k in chunk])
            state = self._states([records[k] for k in chunk])
            pos = np.zeros((len(chunk), counts[0]), np.int64)
            for i, k in enumerate(chunk):
                pos[i, :counts[i]] = pending[k]
            with torch.no_grad():
                for r in range(counts[0]):
                    n = int((counts > r).sum())
                    idx = torch.from_numpy(pos[:n, r]).to(x_all.device)
                    new = self.step(x_all[idx], MIMNState(*(t[:n] for t in state)))
                    for t, s in zip(state, new):
                        t[:n] = s
                    rounds += 1
            finite = torch.stack([torch.isfinite(t.flatten(1)).all(1) for t in state]).all(0)
            if not bool(finite.all()):
                bad = [users[chunk[i]] for i in (~finite).nonzero()[:, 0].tolist()]
                raise ValueError(f"the updated state of users {bad[:10]} is not finite; "
                                 "nothing was applied")
            arrays = _numpy(state)
            for i, k in enumerate(chunk):
                rec, p = records[k], pending[k]
                old_ids = np.zeros(0, np.int64) if rec is None else rec.event_ids
                old_ts = np.zeros(0, np.float64) if rec is None else rec.event_ts
                new_records[users[k]] = self._record(
                    arrays, i, float(ev.timestamp[p[-1]]),
                    np.concatenate([old_ids, ev.event_id[p]]),
                    np.concatenate([old_ts, ev.timestamp[p]]), None if rec is None else rec.token)
        self.store.write(new_records)
        return ApplyResult(int(sum(pending[k].size for k in active)), skipped, len(active),
                           rounds)

    # ------------------------------------------------------------------ warm start

    def warm_start(self, histories, *, batch_users: Optional[int] = None,
                   progress: bool = True) -> int:
        """Build states from full histories with the fused ``encoder`` forward (one scan per
        batch of users), replacing those users' records; returns the number of users.

        ``histories``: a mapping ``user_id -> (items, cats, timestamps[, event_ids])`` or an
        iterable of ``(user_id, items, cats, timestamps[, event_ids])``, each (T,) (T = 0
        allowed). Events are applied in timestamp order; pass ``event_ids`` so that later
        replays of these events are recognised. Each batch is written in one transaction.
        ``progress`` shows a tqdm bar (when tqdm is installed).
        """
        items = list(histories.items()) if isinstance(histories, Mapping) else \
            [(h[0], tuple(h[1:])) for h in histories]
        bs = batch_users or self.batch_users
        # Similar lengths together: less padding per scan.
        items.sort(key=lambda kv: len(kv[1][0]))
        bar = _progress(len(items), progress, "warm start")
        dev = self._param.device
        try:
            for c in range(0, len(items), bs):
                part = items[c:c + bs]
                parsed = []
                for u, h in part:
                    if len(h) not in (3, 4):
                        raise ValueError(f"history of user {u!r} must be (items, cats, "
                                         f"timestamps[, event_ids]), got {len(h)} fields")
                    T = len(h[0])
                    ids = h[3] if len(h) == 4 and h[3] is not None else np.full(T, -1)
                    ev = _events({"user_id": [u] * T, "event_id": ids, "item": h[0],
                                  "category": h[1], "timestamp": h[2]})
                    self._check_ids(ev)
                    o = np.argsort(ev.order, kind="stable")
                    parsed.append((u, ev.item[o], ev.category[o], ev.timestamp[o],
                                   ev.event_id[o], len(h) == 4 and h[3] is not None))
                L = max(1, max(len(p[1]) for p in parsed))
                it = np.zeros((len(parsed), L), np.int64)
                ct = np.zeros((len(parsed), L), np.int64)
                for i, p in enumerate(parsed):
                    it[i, :len(p[1])], ct[i, :len(p[1])] = p[1], p[2]
                lengths = torch.tensor([len(p[1]) for p in parsed], device=dev)
                with torch.no_grad():
                    x = self.model.embed(torch.from_numpy(it).to(dev), torch.from_numpy(ct).to(dev))
                    if not bool(torch.isfinite(x).all()):
                        raise ValueError("history features are NaN/inf: the model's embeddings "
                                         "are not finite")
                    _, state = self.encoder(x.to(self._param.dtype), lengths)
                recs = {}
                arrays = _numpy(state)
                for i, (u, _, _, ts, ids, has_ids) in enumerate(parsed):
                    last = float(ts[-1]) if ts.size else float("-inf")
                    recs[u] = self._record(arrays, i, last, ids if has_ids else ids[:0],
                                           ts if has_ids else ts[:0], None)
                self.store.write(recs, check=False)
                if bar is not None:
                    bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()
        return len(items)

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, tag: str):
        """:meth:`UserStateStore.snapshot` of the store."""
        return self.store.snapshot(tag)

    def rollback(self, tag: str) -> None:
        self.store.rollback(tag)

    def snapshots(self):
        return self.store.snapshots()


def _numpy(state: MIMNState) -> List[np.ndarray]:
    """The state's (U, ...) arrays as fp32 numpy, converted once for all users."""
    return [t.detach().cpu().to(torch.float32).numpy() for t in state]


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="user")
