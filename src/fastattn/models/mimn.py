"""MIMN: Pi et al., "Practice on Long Sequential User Behavior Modeling for Click-Through
Rate Prediction" (Multi-channel user Interest Memory Network), KDD 2019, arXiv 1905.09248.

:class:`fastattn.nn.MIMNEncoder` (NTM memory with Memory Utilization Regularization and the
Memory Induction Unit) compresses the whole history into a fixed state; the candidate is
scored from that state alone, so a serving system (the paper's UIC) keeps one state per user,
updates it per behaviour event with ``model.encoder.step(model.embed(item, cat), state)``
and calls :meth:`MIMN.score_state` without the history.
Simplified: the memory read for the target is one content-addressed read (a learned target
projection, cosine similarity to each slot, softmax with a learned positive sharpness)
and the MIU channels are read by dense target attention; only item and category features;
PReLU instead of Dice.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import Batch
from ..nn import MIMNEncoder
from ..ops import MIMNState
from ..reference import content_weights
from ..ops._common import backend_for
from .base import CTRModel, _Lookup, check_positive_int, per_query

__all__ = ["MIMN"]


class MIMN(CTRModel):
    """MIMN encoder over the whole history, scored from its final state.

    Args (beyond :class:`CTRModel`, which has no ``short_len`` here: the score reads only the
    state): ``mem_dim``, ``slots``, ``ctrl_dim``, ``miu_dim``, ``mur``, ``miu_k`` of the
    :class:`~fastattn.nn.MIMNEncoder` (its input is the behaviour embedding, x_dim = D);
    ``reg_lambda`` weights the MUR regulariser in the loss, taken over each row's share of
    writes per slot (g / length) so that its scale does not grow with the history length. Head features [target, memory
    read r, q ⊙ r with q the target projected to mem_dim, MIU attention a, target ⊙ a].

    ``memory_read``: ``"target"`` (default) reads the memory by content, keyed by the
    target; ``"mean"`` reads the slots' mean (not keyed; the q ⊙ r feature stays); ``"none"``
    scores from the MIU attention alone (the issue-18 ablation, DESIGN.md).

    ``slots=16`` (was 8; issue 18): on the planted set 8 slots gave the same AUC at L=200
    and L=1,000 (0.595, 0.593), 16 slots gain from the longer history (0.593, 0.612).
    """

    name = "mimn"

    def __init__(self, n_items: int, n_cats: int, embed_dim: int = 16,
                 mlp: Sequence[int] = (200, 80), *, backend: Optional[str] = None,
                 heads: int = 1, mem_dim: int = 32, slots: int = 16, ctrl_dim: int = 32,
                 miu_dim: int = 32, mur: bool = True, miu_k: int = 1,
                 reg_lambda: float = 0.01, memory_read: str = "target", dedup: bool = True):
        # The scan reads every position of the dense (U, L, D) input in order; with
        # ``dedup`` the distinct behaviours are embedded once and gathered into it (the
        # gather's backward one deterministic scatter over distinct rows instead of two
        # table-sized ones: ~25% less embedding time at B=128, L=1000).
        super().__init__(n_items, n_cats, embed_dim, mlp, 0, backend, heads=heads,
                         dedup=dedup)
        if isinstance(reg_lambda, bool) or not isinstance(reg_lambda, (int, float)) \
                or not reg_lambda >= 0:
            raise ValueError(f"reg_lambda must be a float >= 0, got {reg_lambda!r}")
        check_positive_int("miu_k", miu_k, allow_zero=True)
        if memory_read not in ("target", "mean", "none"):
            raise ValueError("memory_read must be 'target', 'mean' or 'none', "
                             f"got {memory_read!r}")
        if memory_read == "none" and not miu_k:
            raise ValueError("memory_read='none' with miu_k=0 leaves the head no user feature")
        self.memory_read = memory_read
        self.encoder = MIMNEncoder(self.dim, mem_dim, slots, ctrl_dim, miu_dim, mur=bool(mur),
                                   miu_k=miu_k, backend=backend)
        self.read_query = nn.Linear(self.dim, mem_dim)
        self.read_sharpness = nn.Parameter(torch.zeros(()))      # β = softplus(·) + 1 > 1
        self.miu_attn = self.attention(key_dim=miu_dim) if miu_k else None
        self.reg_lambda = float(reg_lambda)
        del self._config["short_len"]
        self._config.update(mem_dim=mem_dim, slots=slots, ctrl_dim=ctrl_dim, miu_dim=miu_dim,
                            mur=bool(mur), miu_k=miu_k, reg_lambda=self.reg_lambda,
                            memory_read=memory_read)
        self.build_head(n_matched=1 if miu_k else 0,
                        other_dim=0 if memory_read == "none" else 2 * mem_dim)

    def encode(self, batch: Batch) -> MIMNState:
        """The final state (U rows) after each history's ``lengths[u]`` behaviours (padded
        steps leave it unchanged)."""
        h = self.histories(batch.hist_items, batch.hist_cats, batch.lengths)
        if h.hist_rows is None:
            x = self.embed(h.items, h.cats)
        else:
            # padded positions (row -1) read row 0 and get no gradient (the scan never
            # reads them)
            x = _Lookup.apply(self.embed(h.items, h.cats), h.hist_rows, -1,
                              backend_for(h.hist_rows.device, self.backend))
        return self.encoder(x, batch.lengths)[1]

    def score_state(self, state: MIMNState, target_item: Tensor, target_cat: Tensor,
                    hist_index: Optional[Tensor] = None) -> Tensor:
        """Logits (B,) of targets (B,) against user states (U rows: U == B, U == 1 shared,
        or any map through ``hist_index`` (B,)), without the histories."""
        if not isinstance(state, tuple) or len(state) != 5:
            raise TypeError("state must be a MIMNState (h, r, M, g, S), e.g. from encode()")
        enc = self.encoder
        U = state.M.shape[0]
        want = {"M": (U, enc.slots, enc.mem_dim), "S": (U, enc.slots, enc.miu_dim)}
        for name, shape in want.items():
            if tuple(getattr(state, name).shape) != shape:
                raise ValueError(f"state.{name} must have shape {shape} for this model, got "
                                 f"{tuple(getattr(state, name).shape)}")
        for name, t in (("target_item", target_item), ("target_cat", target_cat)):
            if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64) \
                    or t.dim() != 1 or t.shape != target_item.shape:
                raise ValueError(f"{name} must be an int64 tensor (B,), both of one shape, "
                                 f"got {getattr(t, 'dtype', type(t).__name__)} "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        B = target_item.shape[0]
        self.check_hist_index(hist_index, B, U)
        target = self.embed(target_item, target_cat)
        other = []
        if self.memory_read != "none":
            q = self.read_query(target)                               # (B, mem_dim)
            M = per_query(state.M, B, hist_index)                     # (B, m, mem_dim)
            if self.memory_read == "target":
                beta = (F.softplus(self.read_sharpness) + 1).expand(B, 1)
                read = torch.einsum("bm,bmd->bd", content_weights(q, beta, M), M)
            else:
                read = M.mean(1)
            other = [read, q * read]
        matched = []
        if self.miu_attn is not None:
            matched.append(self.miu_attn(target, state.S, hist_index=hist_index))
        return self.score(target, matched, other)

    def logits_and_reg(self, batch: Batch):
        state = self.encode(batch)
        logits = self.score_state(state, batch.target_item, batch.target_cat, batch.hist_index)
        # MUR on the share of writes per slot (g / length), not the raw totals: the raw
        # variance grows with length², and would swamp the click loss on long histories.
        share = state.g / batch.lengths.clamp(min=1).to(state.g.dtype)[:, None]
        return logits, self.reg_lambda * self.encoder.reg_loss(state._replace(g=share))
