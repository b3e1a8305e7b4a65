"""EdgeRec (Taobao, CIKM 2020): on-device re-ranking from click and exposure sequences.

* **Encoders.** The click and the exposure sequence are each embedded (item ⊕ category,
  D = 2 · embed_dim) and run through their own GRU (:func:`fastattn.gru_scan`, every
  state kept); a behaviour's representation is its embedding plus its GRU state.
* **Decoder.** Target attention of each candidate over each sequence. ``attention=
  "plain"``: keys = values = the representations (the detail features are not read).
  ``attention="reliable"``: :class:`fastattn.nn.ReliableAttention`, keys = representation ⊕
  detail features, values = the representation only.
* **Sequence adversarial block** (``adversarial=True``, needs ``"reliable"``):
  :class:`fastattn.nn.SequenceAdversarial` selects the click-like part of the exposures
  (queried by the aggregated clicks); the selection is one more interest vector of the
  head, and ``adv_weight · (d_loss + g_loss)`` is the model's regulariser.
* **Head.** The base MLP over [target, (v, target ⊙ v) per interest vector v].

Takes an :class:`fastattn.data.edgerec.EdgeRecBatch` (clicks as the history, plus the
exposures and both sequences' detail features), in the training layout (U users, their
pages' candidates mapped by ``hist_index``) or the serving layout (U == 1, one user's
page). :func:`export_reranker` exports the serving path with ``torch.export``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..data.edgerec import CLICK_DETAILS, EXPOSURE_DETAILS, EdgeRecBatch
from ..nn import ReliableAttention, SequenceAdversarial
from ..ops import gru_scan
from .base import CTRModel, _check_ids, check_positive_int, per_query

__all__ = ["EdgeRec", "EdgeRecReranker", "export_reranker", "ABLATIONS"]

_ATTENTIONS = ("plain", "reliable")


class EdgeRec(CTRModel):
    """EdgeRec re-ranker (module docstring).

    Args:
        n_items, n_cats, embed_dim, mlp, backend, dedup: as :class:`CTRModel` (``dedup``
            is kept for the common interface; the sequences here are short and embedded
            densely).
        attention: ``"plain"`` or ``"reliable"`` target attention (module docstring).
        adversarial: add the sequence adversarial block (needs ``"reliable"``).
        click_details / exposure_details: widths Fc / Fe of the detail features.
        gru: encode each sequence with its GRU (False: the embeddings alone).
        adv_weight: weight of the adversarial losses in the regulariser (0.01: on the
            synthetic set 0.1 and 1.0 cost about 0.03 AUC, the discriminator wins and its
            losses swamp the click loss; 0 keeps the selection, untrained adversarially).
        hidden: width of the discriminator's hidden layer.

    ``forward(batch) -> logits (B,)``; ``loss(batch)`` adds the adversarial losses.
    """

    name = "edgerec"

    def __init__(self, n_items: int, n_cats: int, embed_dim: int = 16,
                 mlp: Sequence[int] = (200, 80), backend: Optional[str] = None, *,
                 attention: str = "reliable", adversarial: bool = False,
                 click_details: int = len(CLICK_DETAILS),
                 exposure_details: int = len(EXPOSURE_DETAILS), gru: bool = True,
                 adv_weight: float = 0.01, hidden: int = 32, dedup: bool = True):
        super().__init__(n_items, n_cats, embed_dim, mlp, 0, backend, dedup=dedup)
        if attention not in _ATTENTIONS:
            raise ValueError(f"attention must be one of {_ATTENTIONS}, got {attention!r}")
        if adversarial and attention != "reliable":
            raise ValueError("adversarial=True needs attention='reliable' (the selector is a "
                             "reliable attention over the exposures)")
        check_positive_int("click_details", click_details)
        check_positive_int("exposure_details", exposure_details)
        check_positive_int("hidden", hidden)
        if not isinstance(adv_weight, (int, float)) or isinstance(adv_weight, bool) \
                or adv_weight < 0:
            raise ValueError(f"adv_weight must be a number >= 0, got {adv_weight!r}")
        D = self.dim
        self.attention_kind, self.adversarial = attention, bool(adversarial)
        self.click_details, self.exposure_details = click_details, exposure_details
        self.adv_weight = float(adv_weight)
        self.click_gru = nn.GRU(D, D, batch_first=True) if gru else None
        self.exp_gru = nn.GRU(D, D, batch_first=True) if gru else None
        if attention == "reliable":
            self.click_attn: nn.Module = ReliableAttention(D, click_details, D, backend=backend)
            self.exp_attn: nn.Module = ReliableAttention(D, exposure_details, D,
                                                         backend=backend)
        else:
            self.click_attn, self.exp_attn = self.attention(), self.attention()
        self.adv = SequenceAdversarial(D, exposure_details, D, hidden=hidden,
                                       backend=backend) if adversarial else None
        self.build_head(3 if adversarial else 2)
        self._config.pop("short_len")
        self._config.pop("heads")
        self._config.update(attention=attention, adversarial=self.adversarial,
                            click_details=click_details, exposure_details=exposure_details,
                            gru=bool(gru), adv_weight=self.adv_weight, hidden=hidden)

    # ------------------------------------------------------------------ checks

    def check_batch(self, batch) -> Tuple[int, int, int]:
        """:meth:`CTRModel.check_batch` plus the exposures and the detail features."""
        if not isinstance(batch, EdgeRecBatch):
            raise TypeError(f"batch must be a fastattn.data.edgerec.EdgeRecBatch, got "
                            f"{type(batch).__name__}")
        B, U, Lc = super().check_batch(batch)
        _check_ids("batch.exp_items", batch.exp_items, 2, "(U, Le)", self.n_items,
                   "item ids (0 = padding)")
        Le = batch.exp_items.shape[1]
        _check_ids("batch.exp_cats", batch.exp_cats, 2, "(U, Le)", self.n_cats,
                   "category ids (0 = padding)")
        if batch.exp_items.shape[0] != U or batch.exp_cats.shape != batch.exp_items.shape:
            raise ValueError(f"batch.exp_items and exp_cats must both be (U, Le) with U={U}, "
                             f"got {tuple(batch.exp_items.shape)} and "
                             f"{tuple(batch.exp_cats.shape)}")
        _check_ids("batch.exp_lengths", batch.exp_lengths, 1, f"(U,)=({U},)")
        if batch.exp_lengths.shape[0] != U or (U and (int(batch.exp_lengths.min()) < 0 or
                                                      int(batch.exp_lengths.max()) > Le)):
            raise ValueError(f"batch.exp_lengths must be (U,)=({U},) with values in "
                             f"[0, Le={Le}], got shape {tuple(batch.exp_lengths.shape)}")
        for name, t, shape in (("hist_details", batch.hist_details,
                                (U, Lc, self.click_details)),
                               ("exp_details", batch.exp_details,
                                (U, Le, self.exposure_details))):
            if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"batch.{name} must be a float tensor {shape}, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if tuple(t.shape) != shape:
                raise ValueError(f"batch.{name} must have shape {shape}, got "
                                 f"{tuple(t.shape)}")
        return B, U, Lc

    # ------------------------------------------------------------------ forward

    def encode(self, gru: Optional[nn.GRU], emb: Tensor, lengths: Tensor) -> Tensor:
        """Representations (U, L, D): embeddings plus their GRU states (states stop at
        ``lengths``; padding rows are masked by the attention)."""
        if gru is None:
            return emb
        return emb + gru_scan(emb, lengths, gru.weight_ih_l0, gru.weight_hh_l0,
                              gru.bias_ih_l0, gru.bias_hh_l0, backend=self._backend)

    def attend(self, attn: nn.Module, target: Tensor, reps: Tensor, details: Tensor,
               lengths: Tensor, hist_index: Optional[Tensor]) -> Tensor:
        """Interest vector (B, D) of the candidates over one sequence."""
        if isinstance(attn, ReliableAttention):
            return attn(target, reps, details.to(reps.dtype), lengths=lengths,
                        hist_index=hist_index)
        return attn(target, reps, lengths=lengths, hist_index=hist_index)

    def rerank_logits(self, click_items: Tensor, click_cats: Tensor, click_details: Tensor,
                      click_len: Tensor, exp_items: Tensor, exp_cats: Tensor,
                      exp_details: Tensor, exp_len: Tensor, cand_items: Tensor,
                      cand_cats: Tensor, hist_index: Optional[Tensor] = None,
                      with_reg: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """(logits (B,), regulariser or None) from plain tensors, unchecked (the batch's
        fields, see :class:`EdgeRecBatch`): the path :func:`export_reranker` traces
        (with ``with_reg=False``: no adversarial losses, only the selection)."""
        B = cand_items.shape[0]
        clicks, exps, target = self.embed_many((click_items, click_cats),
                                               (exp_items, exp_cats), (cand_items, cand_cats))
        c_rep = self.encode(self.click_gru, clicks, click_len)
        e_rep = self.encode(self.exp_gru, exps, exp_len)
        matched = [self.attend(self.click_attn, target, c_rep, click_details, click_len,
                               hist_index),
                   self.attend(self.exp_attn, target, e_rep, exp_details, exp_len, hist_index)]
        reg = None
        if self.adv is not None:
            args = (c_rep, e_rep, exp_details.to(e_rep.dtype))
            lens = dict(click_lengths=click_len, exposure_lengths=exp_len)
            if with_reg:
                selected, d_loss, g_loss = self.adv(*args, **lens)
                reg = self.adv_weight * (d_loss + g_loss)
            else:
                selected = self.adv.select(*args, **lens)
            matched.append(per_query(selected, B, hist_index))
        return self.score(target, matched), reg

    def logits_and_reg(self, batch: EdgeRecBatch) -> Tuple[Tensor, Optional[Tensor]]:
        return self.rerank_logits(batch.hist_items, batch.hist_cats, batch.hist_details,
                                  batch.lengths, batch.exp_items, batch.exp_cats,
                                  batch.exp_details, batch.exp_lengths, batch.target_item,
                                  batch.target_cat, batch.hist_index)


class EdgeRecReranker(nn.Module):
    """The serving path of an :class:`EdgeRec`: one user's sequences (U == 1), B candidates
    -> scores (B,) (click probabilities), as plain tensors so that ``torch.export`` can
    trace it. ``forward(click_items (1, Lc), click_cats (1, Lc), click_details (1, Lc, Fc),
    click_len (1,), exp_items (1, Le), exp_cats (1, Le), exp_details (1, Le, Fe),
    exp_len (1,), cand_items (B,), cand_cats (B,)) -> (B,)``. Inputs are not checked here:
    check a batch with ``model.check_batch`` first."""

    def __init__(self, model: EdgeRec):
        super().__init__()
        if not isinstance(model, EdgeRec):
            raise TypeError(f"model must be an EdgeRec, got {type(model).__name__}")
        self.model = model

    def forward(self, click_items: Tensor, click_cats: Tensor, click_details: Tensor,
                click_len: Tensor, exp_items: Tensor, exp_cats: Tensor, exp_details: Tensor,
                exp_len: Tensor, cand_items: Tensor, cand_cats: Tensor) -> Tensor:
        logits, _ = self.model.rerank_logits(click_items, click_cats, click_details,
                                             click_len, exp_items, exp_cats, exp_details,
                                             exp_len, cand_items, cand_cats,
                                             with_reg=False)
        return torch.sigmoid(logits)


def reranker_inputs(batch: EdgeRecBatch) -> Tuple[Tensor, ...]:
    """The :class:`EdgeRecReranker` arguments of a serving-layout batch (U == 1)."""
    if not isinstance(batch, EdgeRecBatch) or batch.hist_items.shape[0] != 1:
        raise ValueError("reranker_inputs takes an EdgeRecBatch of one user (U == 1)")
    return (batch.hist_items, batch.hist_cats, batch.hist_details, batch.lengths,
            batch.exp_items, batch.exp_cats, batch.exp_details, batch.exp_lengths,
            batch.target_item, batch.target_cat)


def export_reranker(model: EdgeRec, batch: EdgeRecBatch):
    """``torch.export`` of :class:`EdgeRecReranker` (``model`` in eval mode) traced on a
    serving batch (U == 1). The program has the example's shapes (B candidates, click and
    exposure sequences of widths Lc and Le): on the device, pad the sequences to those
    widths (``lengths`` say how many positions are valid; padding does not change the
    scores) and score pages of B candidates. Static shapes, since the attention modules
    pick their execution path (absorbed or projected keys) from the shapes.
    The fastattn ops stay single nodes of the program (``torch.ops.fastattn.*``: a process
    that runs it imports fastattn), or with ``model.backend = "torch"`` the program is ATen
    only. Returns the ``ExportedProgram``; ``.module()`` runs it."""
    model.check_batch(batch)
    args = reranker_inputs(batch)
    model.eval()
    with torch.no_grad():
        return torch.export.export(EdgeRecReranker(model), args)


#: The ablation rows: row name -> EdgeRec switches.
ABLATIONS: Dict[str, Dict[str, object]] = {
    "plain_ta": dict(attention="plain"),
    "reliable": dict(attention="reliable"),
    # the adversarial block's selection as an interest vector, without its losses
    "reliable_select": dict(attention="reliable", adversarial=True, adv_weight=0.0),
    "reliable_adv": dict(attention="reliable", adversarial=True),
}
