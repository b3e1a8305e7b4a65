"""Serving scores: MIMN from the stored state alone equals the model on the full history;
ETA-Net's signature table is rebuilt (or refused) when the weights change."""
from __future__ import annotations

import pytest
import torch

from fastattn.data.batch import Batch
from fastattn.models import ETANet
from fastattn.serving import (ETAScorer, InterestUpdater, MIMNScorer, SignatureTable,
                              StaleSignaturesError, UnknownUserError)
from serving_support import (N_CATS, N_ITEMS, events_of, histories, kind,  # noqa: F401
                             location, open_store, spec_of, tiny_mimn)


def test_mimn_scores_from_stored_state(open_store):
    model = tiny_mimn()
    hist = histories(3, 10, seed=11)
    st = open_store(spec_of(model))
    InterestUpdater(model, st).apply(events_of(hist))
    scorer = MIMNScorer(model, st)
    items = torch.arange(1, 31)
    cats = items % N_CATS + 1
    for u in range(3):
        h = Batch(torch.from_numpy(hist[u][0])[None], torch.from_numpy(hist[u][1])[None],
                  torch.tensor([10]), items, cats)
        with torch.no_grad():
            want = model(h)                            # the full history, shared layout
        torch.testing.assert_close(scorer.score(u, items, cats), want, atol=1e-5, rtol=1e-4)
    users = [2, 0, 2, 1]
    got = scorer.score_users(users, items[:4], cats[:4])
    for b, u in enumerate(users):
        torch.testing.assert_close(got[b], scorer.score(u, items[b:b + 1], cats[b:b + 1])[0])
    with pytest.raises(UnknownUserError, match=r"\[7\]"):
        scorer.score(7, items, cats)
    with pytest.raises(KeyError):
        scorer.score_users([0, 8], items[:2], cats[:2])


def _eta():
    torch.manual_seed(0)
    return ETANet(N_ITEMS, N_CATS, embed_dim=4, mlp=(8,), short_len=4, topk=4, hash_bits=64)


def _request(g):
    L = 24                                             # > topk: the ETA path runs
    hist = torch.randint(1, N_ITEMS + 1, (L,), generator=g)
    return hist, torch.randint(1, N_ITEMS + 1, (16,), generator=g)


def test_eta_signature_table_matches_fresh_model_after_weight_changes():
    model = _eta()
    item_cat = torch.randint(1, N_CATS + 1, (N_ITEMS + 1,), generator=torch.Generator()
                             .manual_seed(1))
    item_cat[0] = 0
    table = SignatureTable(model, item_cat)
    scorer = ETAScorer(model, table)
    g = torch.Generator().manual_seed(2)

    def check():
        hist, tgt = _request(g)
        got = scorer.score(hist, item_cat[hist], tgt, item_cat[tgt])
        with torch.no_grad():                          # hashes the history itself
            want = model(Batch(hist[None], item_cat[hist][None], torch.tensor([len(hist)]),
                               tgt, item_cat[tgt]))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    check()
    assert table.builds == 1
    check()
    assert table.builds == 1                           # unchanged weights: reused
    old = table.signatures().clone()
    opt = torch.optim.SGD(model.parameters(), lr=5.0)   # large enough to flip some bits
    hist, tgt = _request(g)
    model.loss(Batch(hist[None].expand(16, -1), item_cat[hist][None].expand(16, -1),
                     torch.full((16,), len(hist)), tgt, item_cat[tgt],
                     label=(tgt % 2).float())).backward()
    opt.step()
    assert table.stale
    check()
    assert table.builds == 2                           # the optimizer step rebuilt it
    assert not torch.equal(table.signatures(), old)    # and the stale table was wrong
    model.load_state_dict(_eta().state_dict())
    check()
    assert table.builds == 3                           # so did load_state_dict


def test_eta_signature_table_refuses_when_asked():
    model = _eta()
    item_cat = torch.ones(N_ITEMS + 1, dtype=torch.int64)
    table = SignatureTable(model, item_cat, on_change="raise")
    table.signatures()
    with torch.no_grad():
        model.long_attn.k_proj.weight.mul_(2)
    with pytest.raises(StaleSignaturesError, match="weights changed"):
        table.gather(torch.ones(1, 5, dtype=torch.int64))
    table.invalidate()
    assert table.gather(torch.ones(1, 5, dtype=torch.int64)).shape == (1, 5, 1)
    with pytest.raises(ValueError, match="on_change"):
        SignatureTable(model, item_cat, on_change="ignore")
