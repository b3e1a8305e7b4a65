"""AtomicBehaviourEncoder and BehaviourTable (BAHE's atomic behaviour encoding)."""
import pytest
import torch
from torch import nn

import fastattn
from fastattn import reference as ref
from fastattn.nn import AtomicBehaviourEncoder, BehaviourTable, TokenEncoder
from fastattn.nn.bahe import StaleBehaviourTableError


class Counting(nn.Module):
    """Wraps an encoder and records how many token rows each call saw."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, []

    def forward(self, tokens, mask):
        self.rows.append(tokens.shape[0])
        return self.inner(tokens, mask)


def _tokens(V=23, K=7, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(1, vocab, (V, K), generator=g)
    n = torch.randint(1, K + 1, (V,), generator=g)
    tok[torch.arange(K) >= n[:, None]] = 0             # right-padded token strings
    tok[0] = 0                                         # id 0: the padding behaviour
    return tok


def _batch(U=5, L=9, V=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 6, (U, L), generator=g)     # few distinct ids: many repeats
    ids[1, ::2] = torch.randint(6, V, (len(range(0, L, 2)),), generator=g)
    lengths = torch.tensor([L, 4, 0, 1, L - 2][:U])
    ids[torch.arange(L) >= lengths[:, None]] = 0
    return ids, lengths


def _naive(enc, ids, tokens, lengths):
    """Every position's tokens encoded and pooled on their own: the definition."""
    U, L = ids.shape
    tok = tokens[ids.reshape(-1)]
    mask = tok != 0
    pooled = ref.masked_mean(enc(tok, mask), mask).reshape(U, L, -1)
    valid = torch.arange(L) < lengths[:, None]
    return torch.where(valid[..., None], pooled, torch.zeros((), dtype=pooled.dtype))


def _encoder(dtype=torch.float64):
    torch.manual_seed(0)
    return TokenEncoder(40, dim=8, layers=1, heads=2, max_len=8).to(dtype)


def test_matches_naive_encoding_and_gradients(backend):
    tokens = _tokens()
    ids, lengths = _batch()
    enc = _encoder()
    abe = AtomicBehaviourEncoder(Counting(enc), backend=backend)
    got = abe(ids, tokens, lengths)
    want = _naive(enc, ids, tokens, lengths)
    assert got.shape == (5, 9, 8)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # each distinct valid behaviour was encoded once
    distinct = torch.unique(ids[torch.arange(9) < lengths[:, None]]).numel()
    assert abe.encoder.rows == [distinct] and abe.last_stats["distinct"] == distinct
    assert abe.last_stats["behaviours"] == int(lengths.sum())
    w = torch.randn_like(got)
    g1 = torch.autograd.grad((got * w).sum(), list(enc.parameters()), allow_unused=True)
    g2 = torch.autograd.grad((want * w).sum(), list(enc.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_indexed_form(backend):
    tokens = _tokens()
    ids, lengths = _batch()
    abe = AtomicBehaviourEncoder(_encoder(), backend=backend)
    emb, rows = abe(ids, tokens, lengths, indexed=True)
    dense = abe(ids, tokens, lengths)
    torch.testing.assert_close(ref.history_from_table(emb, rows, lengths), dense)
    assert (rows[2] == -1).all()                      # the empty history


def test_empty_batch_and_histories(backend):
    tokens = _tokens()
    abe = AtomicBehaviourEncoder(_encoder(), backend=backend)
    ids = torch.zeros(3, 4, dtype=torch.int64)
    out = abe(ids, tokens, torch.zeros(3, dtype=torch.int64))
    assert out.shape == (3, 4, 8) and (out == 0).all()
    out = abe(torch.zeros(0, 4, dtype=torch.int64), tokens, torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 4, 8)


def test_pool_and_shape_checks():
    with pytest.raises(ValueError, match="pool must be 'mean'"):
        AtomicBehaviourEncoder(_encoder(), pool="max")
    abe = AtomicBehaviourEncoder(_encoder())
    with pytest.raises(ValueError, match=r"tokens must be \(N, K\)"):
        abe.encode(torch.ones(3, dtype=torch.int64))


def test_table_reuse_rebuild_and_raise():
    tokens = _tokens()
    ids, lengths = _batch()
    abe = AtomicBehaviourEncoder(_encoder())
    table = BehaviourTable(abe, tokens, chunk=5)
    assert table.builds == 1 and table.embeddings().shape == (23, 8)
    torch.testing.assert_close(table.embeddings(), abe.encode(tokens).detach())
    torch.testing.assert_close(table.gather(ids, lengths), abe(ids, tokens, lengths).detach())
    table.embeddings()
    assert table.builds == 1                          # frozen encoder: reused
    opt = torch.optim.SGD(abe.parameters(), lr=0.1)
    abe(ids, tokens, lengths).square().sum().backward()
    opt.step()
    assert table.stale
    torch.testing.assert_close(table.embeddings(), abe.encode(tokens).detach())
    assert table.builds == 2
    strict = BehaviourTable(abe, tokens, on_change="raise")
    with torch.no_grad():
        next(abe.parameters()).add_(1.0)
    with pytest.raises(StaleBehaviourTableError, match="invalidate"):
        strict.embeddings()
    strict.invalidate()
    torch.testing.assert_close(strict.embeddings(), abe.encode(tokens).detach())
    with pytest.raises(ValueError, match="on_change"):
        BehaviourTable(abe, tokens, on_change="ignore")


def test_table_save_load(tmp_path):
    tokens = _tokens()
    abe = AtomicBehaviourEncoder(_encoder())
    table = BehaviourTable(abe, tokens)
    path = tmp_path / "behaviours.pt"
    table.save(path)
    loaded = BehaviourTable.load(path, abe, tokens)
    assert loaded.builds == 0                         # read, not recomputed
    assert torch.equal(loaded.embeddings(), table.embeddings())
    # another process's encoder with the same weights reuses it too
    twin = AtomicBehaviourEncoder(_encoder())
    assert BehaviourTable.load(path, twin, tokens).builds == 0
    with torch.no_grad():
        next(twin.parameters()).mul_(2.0)
    with pytest.raises(StaleBehaviourTableError, match="other encoder weights"):
        BehaviourTable.load(path, twin, tokens, on_change="raise")
    rebuilt = BehaviourTable.load(path, twin, tokens)
    assert rebuilt.builds == 1
    torch.testing.assert_close(rebuilt.embeddings(), twin.encode(tokens).detach())
    with pytest.raises(StaleBehaviourTableError):
        BehaviourTable.load(path, abe, tokens[:, :-1], on_change="raise")
