"""InterestUpdater: per-event state updates equal the model's forward over the full history;
replays are idempotent; bad batches are refused whole. Both store backends."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fastattn.serving import BoundStepper, InterestUpdater, MIMNScorer, OutOfOrderError
from serving_support import (N_ITEMS, assert_states_close, dump, events_of,  # noqa: F401
                             forward_states, histories, kind, location, open_store, spec_of,
                             tiny_mimn)


def test_apply_equals_forward(open_store):
    model = tiny_mimn()
    hist = histories(5, 14, seed=1)
    st = open_store(spec_of(model))
    up = InterestUpdater(model, st, batch_users=2)     # several user chunks per call
    events = sorted(events_of(hist), key=lambda e: e[4])
    rng = random.Random(0)
    cuts = [0, 9, 30, 31, len(events)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        part = events[a:b]
        rng.shuffle(part)                              # arrival order does not matter
        res = up.apply(part)
        assert res.applied == b - a and res.skipped == 0
    assert_states_close(st.get_state(list(hist)), forward_states(model, hist, list(hist)))


def test_replays_and_duplicates_applied_once(open_store):
    model = tiny_mimn()
    hist = histories(3, 8, seed=2)
    st = open_store(spec_of(model))
    up = InterestUpdater(model, st)
    first = events_of(hist, stop=5)
    res = up.apply(first + first[:4])                  # duplicates inside one batch
    assert (res.applied, res.skipped) == (15, 4)
    before = dump(st)
    assert up.apply(first).applied == 0                # a full replay: nothing changes
    assert dump(st) == before
    res = up.apply(events_of(hist, start=3))           # overlap with the applied prefix
    assert (res.applied, res.skipped) == (9, 6)
    assert_states_close(st.get_state(list(hist)), forward_states(model, hist, list(hist)))


def test_out_of_order_rejected_whole_batch(open_store):
    model = tiny_mimn()
    hist = histories(2, 6, seed=3)
    st = open_store(spec_of(model))
    up = InterestUpdater(model, st)
    up.apply(events_of(hist, stop=4))
    before = dump(st)
    late = (0, 777, 1, 1, float(hist[0][2][1]))        # older than user 0's last event
    with pytest.raises(OutOfOrderError, match=r"user 0 event 777 .* < last applied"):
        up.apply(events_of(hist, start=4) + [late])
    assert dump(st) == before                          # user 1's valid events not applied
    up.apply(events_of(hist, start=4))
    assert_states_close(st.get_state([0, 1]), forward_states(model, hist, [0, 1]))


def test_dedup_window_bounds_the_replay_horizon(open_store):
    model = tiny_mimn()
    hist = histories(1, 6, seed=4)
    st = open_store(spec_of(model))
    up = InterestUpdater(model, st, dedup_window=2)
    up.apply(events_of(hist))
    assert up.apply(events_of(hist, start=4)).skipped == 2        # inside the window
    with pytest.raises(OutOfOrderError, match="not among its recent applied ids"):
        up.apply(events_of(hist, start=3))                         # beyond it: refused


@pytest.mark.parametrize("bad, match", [
    ((0, 1, float("nan"), 1, 1.0), "item contains NaN"),
    ((0, 1, 3, 1, float("nan")), "timestamp must be finite"),
    ((0, 1, N_ITEMS + 1, 1, 1.0), r"unknown ids \[41\]"),
    ((0, 1, 0, 1, 1.0), r"item ids must lie in \[1, 40\]"),
    ((0, 1, 3, 99, 1.0), "category ids"),
    ((0, 1, 3, 1), "must be \\(user_id, event_id"),
    ((0, "e1", 3, 1, 1.0), "event_id must hold integers"),
])
def test_bad_events_change_nothing(open_store, bad, match):
    model = tiny_mimn()
    hist = histories(2, 3, seed=5)
    st = open_store(spec_of(model))
    up = InterestUpdater(model, st)
    up.apply(events_of(hist, stop=2))
    before = dump(st)
    with pytest.raises((ValueError, TypeError), match=match):
        up.apply(events_of(hist, start=2) + [bad])
    assert dump(st) == before


def test_bad_columns_and_nan_features(open_store):
    model = tiny_mimn()
    st = open_store(spec_of(model))
    up = InterestUpdater(model, st)
    cols = {"user_id": [1, 2], "event_id": np.array([1, 2]), "item": np.array([[1, 2]]),
            "category": np.array([1, 1]), "timestamp": np.array([1.0, 2.0])}
    with pytest.raises(ValueError, match=r"item must have shape \(N,\)=\(2,\)"):
        up.apply(cols)
    cols["item"] = np.array([1, 2])
    up.apply(cols)                                     # columns work
    before = dump(st)
    with torch.no_grad():
        model.item_emb.weight[7, 0] = float("nan")     # a corrupted embedding row
    with pytest.raises(ValueError, match="NaN/inf for item 7"):
        up.apply([(1, 9, 7, 1, 3.0), (2, 9, 3, 1, 3.0)])
    assert dump(st) == before


def test_fp16_storage_within_documented_tolerance(open_store):
    # DESIGN: fp16 storage (M and S in fp16) after events applied 4 per call, T = 40:
    # states within 5e-3 of the fp32 forward, logits within 1e-2.
    model = tiny_mimn()
    hist = histories(3, 40, seed=6)
    st = open_store(spec_of(model, fp16=True))
    up = InterestUpdater(model, st)
    for s in range(0, 40, 4):
        up.apply(events_of(hist, start=s, stop=s + 4))
    want = forward_states(model, hist, [0, 1, 2])
    got = st.get_state([0, 1, 2])
    assert_states_close(got, want, atol=5e-3, rtol=1e-3)
    items, cats = torch.arange(1, 21), torch.arange(20) % 6 + 1
    for u in range(3):
        ref = model.score_state(type(want)(*(t[u:u + 1] for t in want)), items, cats)
        torch.testing.assert_close(MIMNScorer(model, st).score(u, items, cats), ref,
                                   atol=1e-2, rtol=0)


def test_warm_start_then_apply(open_store):
    model = tiny_mimn()
    hist = histories(5, 12, seed=7)
    hist[4] = tuple(a[:0] for a in hist[4])            # an empty history
    st = open_store(spec_of(model))
    up = InterestUpdater(model, st)
    warm = {u: tuple(a[:8] for a in h) for u, h in hist.items()}
    assert up.warm_start(warm, batch_users=2, progress=False) == 5
    assert_states_close(st.get_state(list(hist)), forward_states(model, hist, list(hist), 8))
    res = up.apply(events_of(hist, start=6))           # overlaps the warm-started events
    assert res.skipped == 2 * 4
    assert_states_close(st.get_state(list(hist)), forward_states(model, hist, list(hist)))
    # Without event ids a replay of warm-started events is refused, never applied twice.
    up.warm_start([(9, *hist[0][:3])], progress=False)
    with pytest.raises(OutOfOrderError):
        up.apply(events_of({9: hist[0]}, stop=3)[:1])


def test_snapshot_rollback_through_updater(open_store):
    model = tiny_mimn()
    hist = histories(2, 10, seed=8)
    st = open_store(spec_of(model))
    up = InterestUpdater(model, st)
    up.apply(events_of(hist, stop=5))
    up.snapshot("day1")
    up.apply(events_of(hist, start=5))
    up.rollback("day1")
    assert_states_close(st.get_state([0, 1]), forward_states(model, hist, [0, 1], 5))
    assert [s.tag for s in up.snapshots()] == ["day1"]
    up.apply(events_of(hist, start=5))                 # replays after a rollback re-apply
    assert_states_close(st.get_state([0, 1]), forward_states(model, hist, [0, 1]))


def test_config_mismatch_refused_by_updater(open_store):
    model = tiny_mimn()
    st = open_store(spec_of(model))
    with pytest.raises(ValueError, match="miu_dim"):
        InterestUpdater(tiny_mimn(miu_dim=3), st)


@pytest.mark.parametrize("be", ["cpp", "numba", "torch"])
def test_bound_stepper_equals_encoder_step(be):
    from fastattn.backends import available
    if not available(be):
        pytest.skip(f"backend {be} not installed")
    model = tiny_mimn()
    model.backend = be
    step = BoundStepper(model.encoder)
    x = torch.randn(5, model.dim)
    state = type(model.encoder.initial_state(5))(
        *(t.detach().clone().contiguous() for t in model.encoder.initial_state(5)))
    with torch.no_grad():
        for _ in range(3):
            want = model.encoder.step(x, state)[1]
            got = step(x, state)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            state = type(want)(*(t.clone() for t in got))
            model.encoder.heads.bias.add_(0.1)         # in-place weight change: seen
            x = torch.randn(3, model.dim)
            state = type(state)(*(t[:3].contiguous() for t in state))


def test_nanosecond_timestamps_keep_their_order(open_store):
    """Integer epoch-nanosecond timestamps 1 ns apart (not representable in float64) are
    applied in their order, whatever the arrival order."""
    model = tiny_mimn()
    hist = histories(1, 6, seed=7)
    items, cats, _, _ = hist[0]
    t0 = 1_764_460_800_000_000_000                      # 2025-11-30 in ns: > 2^53
    ts = np.array([t0 + i for i in range(6)], dtype=np.int64)
    assert len(set(ts.astype(np.float64).tolist())) < 6    # float64 would merge them
    st = open_store(spec_of(model))
    up = InterestUpdater(model, st)
    order = [3, 0, 5, 1, 4, 2]
    up.apply({"user_id": [0] * 6, "event_id": np.array(order), "item": items[order],
              "category": cats[order], "timestamp": ts[order]})
    assert_states_close(st.get_state([0]), forward_states(model, hist, [0]))


def test_unknown_users_raise_with_create_missing_false(open_store):
    from fastattn.serving import UnknownUserError
    model = tiny_mimn()
    hist = histories(2, 4, seed=8)
    st = open_store(spec_of(model))
    strict = InterestUpdater(model, st, create_missing=False)
    with pytest.raises(UnknownUserError, match="no stored state for 2 user"):
        strict.apply(events_of(hist, stop=2))
    assert st.read([0, 1]) == [None, None]             # nothing written
    InterestUpdater(model, st).warm_start({0: hist[0]}, progress=False)
    with pytest.raises(UnknownUserError, match=r"\[1\]"):
        strict.apply(events_of(hist, start=0))          # user 1 unknown: nothing applied
    assert strict.apply(events_of({0: hist[0]}, start=4)).applied == 0
    res = InterestUpdater(model, st).apply(events_of(hist, users=[1]))   # default: created
    assert res.users == 1
