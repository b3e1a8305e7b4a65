"""BAHE (Behavior Aggregated Hierarchical Encoding; Ant Group, 2024) and its LLM-CTR
baseline: CTR models over text-described behaviours, each behaviour (an item) a string of
K tokens, encoded by a small transformer trained from scratch.

One class, :class:`BAHE`, whose switches reproduce the paper's ablation rows:

* ``fp=False, abe=False, ba=False`` — **LLM-CTR** (:class:`LLMCTR`): all layers (the
  L_low lower, then the L_high upper ones) run over the concatenation of every
  behaviour's tokens, one sequence of L·K positions per user.
* ``fp=True`` — **+FP** (feature parallel): each of the T behaviour types is its own
  sequence (T sequences of L_t·K, attention cost Σ (L_t·K)² instead of (L·K)²); the T
  user vectors are concatenated and reduced by F_d.
* ``abe=True`` — **+ABE**: the lower layers encode each distinct behaviour of the batch
  once, over its own K tokens (:class:`fastattn.nn.AtomicBehaviourEncoder`); the users'
  token sequences are gathered from those states, and the upper layers run over them.
* ``ba=True`` (needs ``abe``) — **BAHE**: each behaviour's token states are mean-pooled
  into one vector (:func:`fastattn.masked_mean`), and the upper layers run over one
  position per behaviour (L_t positions instead of L_t·K).

The target item is encoded like a one-behaviour history from its own tokens (with ABE,
in the same set of distinct behaviours as the histories, and once per distinct candidate
of the batch: candidates are atomic behaviours too). Head: F_d (Linear T·d → d) of
the user vectors, then MLP([user, item, user ⊙ item]) → logit. Without ``hist_types`` in
the batch every behaviour has type 0.

**Offline behaviour table.** With ABE and BA the lower layers' only output is one vector
per distinct behaviour, so a model whose lower layers are frozen can read those vectors from
a :class:`fastattn.nn.BehaviourTable` of every item instead of encoding them in every step
(:meth:`BAHE.freeze_lower`): the upper layers, F_d and the head train on the cached table,
which is rebuilt (or refused) when the lower layers' weights change.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..nn.bahe import (AtomicBehaviourEncoder, BehaviourTable, TokenEncoder, TokenTransformer,
                       gather_histories)
from ..ops import masked_mean, unique_rows
from .base import CTRModel, check_positive_int, per_query

__all__ = ["BAHE", "LLMCTR", "split_by_type", "ABLATIONS"]


def split_by_type(items: Tensor, types: Optional[Tensor], lengths: Tensor,
                  n_types: int) -> Tuple[Tensor, Tensor]:
    """Per-type histories: (T·U, L') items, type-major (rows t·U .. t·U + U - 1 are type
    t), each row the user's behaviours of that type in time order, right-padded with 0,
    and their lengths (T·U,). L' is the longest per-type history (at least 1)."""
    U, L = items.shape
    valid = torch.arange(L, device=items.device) < lengths[:, None]
    if types is None:
        types = torch.zeros_like(items)
    rows, lens = [], []
    for t in range(n_types):
        keep = valid & (types == t)
        # a stable sort of "not kept" moves the kept positions to the front, in order
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        rows.append(torch.where(keep.gather(1, order), items.gather(1, order), 0))
        lens.append(keep.sum(1))
    n = torch.stack(lens).reshape(-1)
    width = max(int(n.max()) if n.numel() else 0, 1)
    return torch.cat(rows)[:, :width], n


class BAHE(CTRModel):
    """BAHE / LLM-CTR over item token strings (module docstring).

    Args:
        n_items, n_cats: item / category ids (as every model; categories are not read:
            the text carries them).
        item_tokens: (n_items + 1, K) int64 token ids of each item (0 = padding; row 0
            all 0), kept as a buffer. None builds zeros of (n_items + 1, token_len) to be
            filled by ``load_state_dict`` (what ``build(**config())`` does).
        vocab_size: token ids run 0..vocab_size-1 (default: item_tokens.max() + 1).
        n_types: behaviour types T (``batch.hist_types`` values in [0, T)).
        embed_dim: the transformer width d.
        low_layers / high_layers: L_low and L_high; heads: attention heads.
        max_behaviours: the longest history read (sets the position tables).
        fp, abe, ba: the ablation switches (module docstring).
        buckets: length buckets per sequence group (an execution choice, not in
            ``config()``: each runs at the width of its longest row).
    """

    name = "bahe"

    def __init__(self, n_items: int, n_cats: int, item_tokens: Optional[Tensor] = None, *,
                 vocab_size: Optional[int] = None, token_len: Optional[int] = None,
                 n_types: int = 1, embed_dim: int = 32, low_layers: int = 1,
                 high_layers: int = 1, heads: int = 2, mlp: Sequence[int] = (64, 32),
                 max_behaviours: int = 64, fp: bool = True, abe: bool = True,
                 ba: bool = True, backend: Optional[str] = None, dedup: bool = True,
                 buckets: int = 4):
        if ba and not abe:
            raise ValueError("ba=True (one position per behaviour) needs abe=True (the "
                             "behaviour vectors come from the atomic behaviour encoding)")
        for name, v in (("n_types", n_types), ("low_layers", low_layers),
                        ("high_layers", high_layers), ("max_behaviours", max_behaviours)):
            check_positive_int(name, v)
        check_positive_int("buckets", buckets)
        if item_tokens is None:
            if vocab_size is None or token_len is None:
                raise ValueError("pass item_tokens (n_items + 1, K), or vocab_size and "
                                 "token_len to build an empty table")
            item_tokens = torch.zeros(n_items + 1, token_len, dtype=torch.int64)
        if (not isinstance(item_tokens, Tensor) or item_tokens.dtype != torch.int64
                or item_tokens.dim() != 2 or item_tokens.shape[0] != n_items + 1):
            raise ValueError(f"item_tokens must be an int64 tensor (n_items + 1, K)="
                             f"({n_items + 1}, K), got "
                             f"{getattr(item_tokens, 'dtype', type(item_tokens).__name__)} "
                             f"{tuple(getattr(item_tokens, 'shape', ()))}")
        K = item_tokens.shape[1]
        vocab = int(item_tokens.max()) + 1 if vocab_size is None else vocab_size
        check_positive_int("vocab_size", vocab)
        # The base's id embeddings (D = 2·embed_dim) are not used: the text carries items.
        super().__init__(n_items, n_cats, embed_dim // 2 or 1, mlp, 0, backend, heads=1,
                         dedup=dedup)
        del self.item_emb, self.cat_emb
        self.d, self.n_types, self.K, self.buckets = embed_dim, n_types, K, buckets
        self.fp, self.abe_on, self.ba = bool(fp), bool(abe), bool(ba)
        self.register_buffer("item_tokens", item_tokens.clone())
        self.low = TokenEncoder(vocab, embed_dim, low_layers, heads,
                                max_len=K if abe else max_behaviours * K)
        self.high = TokenTransformer(embed_dim, high_layers, heads,
                                     max_len=max_behaviours if ba else max_behaviours * K)
        self.abe = AtomicBehaviourEncoder(self.low, backend=backend)
        groups = n_types if fp else 1
        self.f_d = nn.Linear(groups * embed_dim, embed_dim)
        widths = [3 * embed_dim] + list(mlp)
        layers: List[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.PReLU(b)]
        layers.append(nn.Linear(widths[-1], 1))
        self.head = nn.Sequential(*layers)
        self._config = dict(name=self.name, n_items=n_items, n_cats=n_cats, vocab_size=vocab,
                            token_len=K, n_types=n_types, embed_dim=embed_dim,
                            low_layers=low_layers, high_layers=high_layers, heads=heads,
                            mlp=list(mlp), max_behaviours=max_behaviours, fp=self.fp,
                            abe=self.abe_on, ba=self.ba)
        #: {"behaviours", "distinct"} of the last ABE step (|H| / behaviours in the batch).
        self.last_stats: dict = {}
        #: the frozen lower layers' behaviour table (:meth:`freeze_lower`), or None.
        self.behaviour_table: Optional[BehaviourTable] = None

    # ------------------------------------------------------------------ offline table

    def freeze_lower(self, table: Optional[BehaviourTable] = None, *,
                     on_change: str = "rebuild") -> BehaviourTable:
        """Freeze the lower layers and read the behaviour vectors from a cached table.

        The lower layers' parameters stop requiring gradients; every forward then reads
        the (n_items + 1, d) :class:`~fastattn.nn.BehaviourTable` of ``item_tokens``
        (built here, or ``table``: one built or loaded for this model's ``abe`` and
        ``item_tokens``) instead of running the lower layers, so a training step costs the
        upper layers, F_d and the head only. The outputs equal the unfrozen model's (the
        table holds the same vectors, computed in eval mode). When the lower layers'
        weights change (``load_state_dict``, an optimizer step after re-enabling their
        gradients) the table is rebuilt (``on_change="rebuild"``) or reading it raises
        :class:`~fastattn.nn.StaleBehaviourTableError` (``"raise"``). Needs ``abe`` and
        ``ba`` (the table holds pooled vectors). Returns the table."""
        if not (self.abe_on and self.ba):
            raise ValueError("freeze_lower needs abe=True and ba=True: the table holds one "
                             "pooled vector per behaviour, which only BAHE's upper layers read")
        if table is None:
            table = BehaviourTable(self.abe, self.item_tokens, on_change=on_change)
        elif not isinstance(table, BehaviourTable):
            raise TypeError(f"table must be a BehaviourTable, got {type(table).__name__}")
        elif table.abe is not self.abe or not torch.equal(table.token_table,
                                                          self.item_tokens):
            raise ValueError("table must be built for this model: BehaviourTable(model.abe, "
                             "model.item_tokens)")
        self.low.requires_grad_(False)
        self.behaviour_table = table
        return table

    def unfreeze_lower(self) -> None:
        """Drop the table; the lower layers require gradients and run in every step again."""
        self.low.requires_grad_(True)
        self.behaviour_table = None

    # ------------------------------------------------------------------ encoders

    def _tokens_of(self, rows: Tensor, states: Tensor, tmask: Tensor) -> Tuple[Tensor, Tensor]:
        """+ABE: the token sequences (R, W·K, d) of histories ``rows`` (R, W) (table rows,
        -1 = none) read from the distinct behaviours' token states (N, K, d), and their
        mask: token slot (r, l·K + k) is state row rows[r, l]·K + k."""
        K = self.K
        tok_rows = rows[:, :, None] * K + torch.arange(K, device=rows.device)
        ok = (rows[:, :, None] >= 0) & tmask[rows.clamp(min=0)]
        tok_rows = torch.where(ok, tok_rows, -1).reshape(rows.shape[0], -1)
        x = gather_histories(states.reshape(-1, self.d), tok_rows, None, self._backend)
        return x, tok_rows >= 0

    def _llm_tokens(self, ids: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """LLM-CTR / +FP: behaviours ``ids`` (R, W) → their tokens concatenated (R, W·K)
        → the lower layers; returns (states, mask)."""
        R, W = ids.shape
        valid = torch.arange(W, device=ids.device) < lengths[:, None]
        tok = torch.where(valid[..., None], self.item_tokens[ids], 0).reshape(R, W * self.K)
        mask = tok != 0
        return self.low(tok, mask), mask

    def encode(self, ids: Tensor, lengths: Tensor, groups: Sequence[int]) -> Tensor:
        """Representations (R, d) of R behaviour sequences ``ids`` (R, L') with ``lengths``
        (R,), given as consecutive row groups of sizes ``groups``. Each group runs the upper
        layers over its own width (its longest sequence), so that FP's per-type sequences
        cost Σ (L_t·K)², not T·(max L_t·K)². With ABE the lower layers run once over the
        distinct behaviours of all groups together."""
        if self.abe_on:
            uniq, rows = self.abe.distinct(ids, lengths)
            self.last_stats = dict(self.abe.last_stats)
            if self.behaviour_table is not None:                             # frozen lower
                emb = self.behaviour_table.embeddings()[uniq]               # (N, d)
            else:
                states, tmask = self.abe.token_states(self.item_tokens[uniq])  # (N, K, d)
                if self.ba:
                    emb = masked_mean(states, tmask, backend=self._backend)  # (N, d)
        def run(r: Tensor, lens: Tensor) -> Tensor:
            """Rows ``r`` (indices) at their own width (their longest sequence)."""
            W = max(int(lens.max()) if lens.numel() else 0, 1)
            if not self.abe_on:
                x, mask = self._llm_tokens(ids[r, :W], lens)
            elif self.ba:
                x = gather_histories(emb, rows[r, :W], lens, self._backend)
                mask = torch.arange(W, device=ids.device) < lens[:, None]
            else:
                x, mask = self._tokens_of(rows[r, :W], states, tmask)
            return masked_mean(self.high(x, mask), mask, backend=self._backend)

        outs, r0 = [], 0
        for size in groups:
            lens = lengths[r0:r0 + size]
            # Length buckets: the group's rows sorted by length, cut into `buckets` chunks,
            # each run at its own width, so padding follows the lengths instead of the
            # group's longest row (outputs do not depend on the padding).
            order = torch.argsort(lens, descending=True, stable=True)
            step = max(1, -(-size // self.buckets))
            parts = [run(r0 + order[i:i + step], lens[order[i:i + step]])
                     for i in range(0, size, step)]
            out = torch.cat(parts) if parts else self.f_d.weight.new_zeros(0, self.d)
            outs.append(out[torch.argsort(order)])
            r0 += size
        return torch.cat(outs)

    # ------------------------------------------------------------------ forward

    def logits_and_reg(self, batch: Batch):
        B = batch.target_item.shape[0]
        U = batch.hist_items.shape[0]
        groups = self.n_types if self.fp else 1
        types = batch.hist_types if self.fp else None
        if types is not None and types.numel() and int(types.max()) >= self.n_types:
            raise ValueError(f"batch.hist_types must hold types in [0, n_types="
                             f"{self.n_types}), got max {int(types.max())}")
        ids, lens = split_by_type(batch.hist_items, types, batch.lengths.to(torch.int64),
                                  groups)
        # The targets are one-behaviour sequences, a group of their own, encoded (and with
        # ABE deduplicated) together with the histories. With ABE, candidates are atomic
        # behaviours too: the item tower runs once per distinct candidate of the batch
        # (its output depends on the item alone), and encode's one unique_rows covers the
        # distinct candidates and the histories' behaviours together.
        cand, cand_of = batch.target_item, None
        if self.abe_on:
            cand, cand_of = unique_rows(cand[:, None], backend=self._backend)
        C = cand.shape[0]
        tgt = torch.zeros(C, ids.shape[1], dtype=ids.dtype, device=ids.device)
        tgt[:, 0] = cand
        enc = self.encode(torch.cat([ids, tgt]),
                          torch.cat([lens, torch.ones(C, dtype=lens.dtype, device=lens.device)]),
                          [U] * groups + [C])
        if cand_of is not None:      # |H| / behaviours counts every candidate of the batch
            self.last_stats["behaviours"] += B - C
        users = enc[:groups * U].reshape(groups, U, self.d).transpose(0, 1).reshape(U, -1)
        user = per_query(self.f_d(users), B, batch.hist_index)
        item = enc[groups * U:]
        if cand_of is not None:
            item = item[cand_of[:, 0]]
        return self.head(torch.cat([user, item, user * item], dim=-1)).squeeze(-1), None


class LLMCTR(BAHE):
    """The LLM-CTR baseline: :class:`BAHE` with ``fp=abe=ba=False`` (all layers over the
    concatenation of every behaviour's tokens)."""

    name = "llm_ctr"

    def __init__(self, n_items: int, n_cats: int, item_tokens: Optional[Tensor] = None,
                 **kwargs):
        for k in ("fp", "abe", "ba"):
            if kwargs.pop(k, False):
                raise ValueError(f"llm_ctr is the baseline: {k} must be False (use bahe)")
        super().__init__(n_items, n_cats, item_tokens, fp=False, abe=False, ba=False,
                         **kwargs)
        for k in ("fp", "abe", "ba"):
            self._config.pop(k)


#: The paper's ablation rows: row name -> (model name, constructor switches).
ABLATIONS = {"llm_ctr": ("llm_ctr", {}), "fp": ("bahe", dict(abe=False, ba=False)),
             "fp_abe": ("bahe", dict(ba=False)), "bahe": ("bahe", {})}
