"""fastattn.nn.ReliableAttention (issue 17): keys item ⊕ details, values pure item."""
import pytest
import torch

import fastattn
from fastattn.nn import ETAAttention, ReliableAttention, TargetAttention


def _data(B=5, L=9, Di=6, Dd=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Di, generator=g), torch.randn(B, L, Di, generator=g),
            torch.randn(B, L, Dd, generator=g), torch.tensor([9, 4, 1, 0, 7][:B]))


@pytest.mark.parametrize("heads", [1, 2])
def test_equals_target_attention_on_concatenated_keys(heads):
    query, items, details, lengths = _data()
    m = ReliableAttention(6, 3, 8, heads)
    plain = TargetAttention(8, heads, query_dim=6, key_dim=9, value_dim=6)
    plain.load_state_dict(m.attention.state_dict())
    got = m(query, items, details, lengths=lengths)
    want = plain(query, torch.cat([items, details], -1), items, lengths=lengths)
    torch.testing.assert_close(got, want)
    assert not got[3].any() if heads == 1 else True   # empty history: zero vector


def test_details_move_weights_not_values():
    """Noninvasive: with one item repeated over the history, the output is that item's
    value whatever the details; with distinct items, details change the weighting."""
    torch.manual_seed(0)
    m = ReliableAttention(6, 3, 8)
    query = torch.randn(2, 6)
    same = torch.randn(1, 1, 6).expand(2, 7, 6)
    a = m(query, same, torch.randn(2, 7, 3))
    b = m(query, same, 10 * torch.randn(2, 7, 3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, m.attention.v_proj(same[:, 0]))
    items = torch.randn(2, 7, 6)
    details = torch.randn(2, 7, 3, requires_grad=True)
    out = m(query, items, details)
    assert not torch.allclose(out, m(query, items, torch.zeros(2, 7, 3)))
    out.sum().backward()
    assert details.grad.abs().sum() > 0


def test_indexed_form_equals_dense():
    query, items, details, lengths = _data()
    m = ReliableAttention(6, 3, 8)
    U, L = items.shape[:2]
    rows = torch.arange(U * L).view(U, L).flip(1)            # any row map
    t_items = torch.empty(U * L, 6)
    t_details = torch.empty(U * L, 3)
    t_items[rows.reshape(-1)] = items.reshape(-1, 6)
    t_details[rows.reshape(-1)] = details.reshape(-1, 3)
    got = m(query, t_items, t_details, lengths=lengths, hist_rows=rows)
    torch.testing.assert_close(got, m(query, items, details, lengths=lengths))


def test_eta_variant(backend):
    query, items, details, lengths = _data(L=9)
    dense = ReliableAttention(6, 3, 8, backend=backend)
    eta = ReliableAttention(6, 3, 8, topk=9, hash_bits=64, backend=backend)
    assert isinstance(eta.attention, ETAAttention)
    eta.attention.load_state_dict(dense.attention.state_dict())
    want = dense(query, items, details, lengths=lengths)
    # topk >= L: the dense fallback; topk = 8 < L over lengths <= 9 retrieves by Hamming
    torch.testing.assert_close(eta(query, items, details, lengths=lengths), want)
    eta.attention.topk = 8
    out = eta(query, items, details, lengths=lengths)
    assert out.shape == want.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], want[1:], rtol=1e-4, atol=1e-5)   # lengths <= 8


def test_bad_input():
    m = ReliableAttention(6, 3, 8)
    query, items, details, _ = _data()
    with pytest.raises(ValueError, match=r"details must be \(U, L, 3\)"):
        m(query, items, details[..., :2])
    with pytest.raises(ValueError, match="details must have the rows of items"):
        m(query, items, details[:, :4])
    with pytest.raises(ValueError, match=r"items must be \(U, L, 6\)"):
        m(query, items[..., :5], details)
    with pytest.raises(ValueError, match="item_dim"):
        ReliableAttention(0, 3, 8)
    assert fastattn.nn.ReliableAttention is ReliableAttention


def test_sequence_adversarial_players_get_only_their_own_gradients():
    from fastattn.nn import SequenceAdversarial
    torch.manual_seed(0)
    m = SequenceAdversarial(6, 3, 8, hidden=16)
    clicks = torch.randn(4, 5, 6)
    exp_items, exp_details = torch.randn(4, 9, 6), torch.randn(4, 9, 3)
    click_lengths, exp_lengths = torch.tensor([5, 2, 0, 3]), torch.tensor([9, 9, 4, 0])
    selected, d_loss, g_loss = m(clicks, exp_items, exp_details, click_lengths=click_lengths,
                                 exposure_lengths=exp_lengths)
    assert selected.shape == (4, 8) and torch.isfinite(selected).all()
    assert not selected[3].any()                  # no exposure: nothing selected
    torch.testing.assert_close(selected, m.selector(
        SequenceAdversarial.aggregate(clicks, click_lengths), exp_items, exp_details,
        lengths=exp_lengths))
    torch.testing.assert_close(SequenceAdversarial.aggregate(clicks, click_lengths)[1],
                               clicks[1, :2].mean(0))
    sel = list(m.selector.parameters())
    dis = list(m.discriminator.parameters())
    g_d = torch.autograd.grad(d_loss, sel + dis, allow_unused=True)
    assert all(g is None for g in g_d[:len(sel)])
    assert all(g is not None and g.abs().sum() > 0 for g in g_d[len(sel):])
    g_g = torch.autograd.grad(g_loss, sel + dis, allow_unused=True)
    assert all(g is None for g in g_g[len(sel):])
    assert any(g is not None and g.abs().sum() > 0 for g in g_g[:len(sel)])
    with pytest.raises(ValueError, match="click_items must be"):
        m(clicks[:2], exp_items, exp_details)
    # serving: the selection alone, the same values
    torch.testing.assert_close(m.select(clicks, exp_items, exp_details,
                                        click_lengths=click_lengths,
                                        exposure_lengths=exp_lengths), selected)
    with pytest.raises(ValueError, match="click_items must be"):
        m.select(clicks[:2], exp_items, exp_details)


@pytest.mark.parametrize("heads", [1, 2])
def test_sequence_adversarial_real_is_the_selectors_value_of_the_clicks(heads):
    """Exposures that hold only the click aggregate select exactly the "real" sample."""
    from fastattn.nn import SequenceAdversarial
    torch.manual_seed(0)
    m = SequenceAdversarial(6, 3, 8, heads, hidden=16)
    clicks = torch.randn(2, 4, 6)
    agg = clicks.mean(1)
    selected, d_loss, _ = m(clicks, agg[:, None].expand(2, 5, 6), torch.randn(2, 5, 3))
    d = m.discriminator
    real_logits = d(selected)    # the same input as the real sample: d_loss's two terms
    want = (torch.nn.functional.softplus(-real_logits).mean()
            + torch.nn.functional.softplus(real_logits).mean())
    torch.testing.assert_close(d_loss, want)
