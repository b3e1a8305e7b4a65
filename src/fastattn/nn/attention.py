"""Drop-in target-attention modules: dense (DIN-style) and ETA (SimHash top-k).

Both own the same Q/K/V projections (and, with several heads, the same output projection),
so a trained ``TargetAttention`` state dict loads into an ``ETAAttention`` and the model
switches from dense to retrieval attention without retraining its projections.

Both take histories in either form: dense (U, L, key_dim) behaviour rows, or indexed, a
table (N, key_dim) of distinct behaviours plus ``hist_rows`` (U, L) (see
:func:`fastattn.unique_rows`). The indexed form projects (and, for ETA, hashes) each table
row once, however often the batch's histories repeat it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference as ref
from ..ops import hamming_topk, make_planes, simhash_sign, target_attention, topk_attention
from ..ops._common import (check_hist_rows, check_lengths, check_signature, check_tensor,
                           checked_lengths, checked_rows, layout, require)

__all__ = ["TargetAttention", "ETAAttention", "log_soft_count"]


class TargetAttention(nn.Module):
    """Dense target attention of candidate items over behaviour histories.

    Args:
        embed_dim: attention width E (split into ``heads`` heads of E / heads).
        heads: number of heads; with more than one, an output projection E -> E is added.
        query_dim, key_dim, value_dim: input widths (default E; ``value_dim`` defaults to
            ``key_dim``).
        bias: whether the projections have a bias.
        backend: force a kernel backend for the indexed form and ETA (default: the best
            for the tensors' device; the dense form is SDPA).

    ``forward(query (B, query_dim), keys (U, L, key_dim), values=None (U, L, value_dim),
    lengths=None (U,), hist_index=None (B,)) -> (B, E)``; ``values`` default to ``keys``.
    Indexed: ``forward(query, table (N, key_dim), values_table=None (N, value_dim),
    hist_rows=(U, L), lengths=..., hist_index=...)``.
    A history with no valid position gives a zero vector (then the output projection).
    """

    def __init__(self, embed_dim: int, heads: int = 1, *, query_dim: Optional[int] = None,
                 key_dim: Optional[int] = None, value_dim: Optional[int] = None,
                 bias: bool = True, backend: Optional[str] = None):
        super().__init__()
        if embed_dim < 1 or heads < 1 or embed_dim % heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of heads "
                             f"({heads})")
        query_dim = query_dim or embed_dim
        key_dim = key_dim or embed_dim
        value_dim = value_dim or key_dim
        self.embed_dim, self.heads, self.backend = embed_dim, heads, backend
        self.q_proj = nn.Linear(query_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(key_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(value_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias) if heads > 1 else None

    def _split(self, x: Tensor) -> Tensor:
        """(..., E) -> (..., H, E/H), or unchanged with one head (the single-head op path)."""
        if self.heads == 1:
            return x
        return x.unflatten(-1, (self.heads, self.embed_dim // self.heads))

    def _merge(self, out: Tensor) -> Tensor:
        if self.heads == 1:
            return out
        return self.out_proj(out.flatten(-2))

    def project(self, query: Tensor, keys: Tensor, values: Optional[Tensor]):
        q = self.q_proj(query)
        k = self.k_proj(keys)
        v = self.v_proj(keys if values is None else values)
        return q, k, v

    # Indexed histories of at most this many (position, feature) elements are gathered and
    # run through SDPA: there a few MB of gathered rows cost less than the fixed per-call
    # overhead of the fused op (its forward and backward custom ops, ~0.5 ms on CPU).
    # Larger ones (long histories) go through the fused op, which never gathers.
    gather_below = 1 << 20

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None, *,
                lengths: Optional[Tensor] = None, hist_index: Optional[Tensor] = None,
                hist_rows: Optional[Tensor] = None) -> Tensor:
        L = self.history_length(keys, hist_rows)
        if self.absorbs(query.shape[0], L, keys, values):
            q = self.q_proj(query)
            small = hist_rows is not None and keys.shape[0] > 0 and \
                hist_rows.numel() * (keys.shape[-1] + (0 if values is None else
                                                      values.shape[-1])) <= self.gather_below

            def attend(qk: Tensor, scale: float) -> Tensor:
                k, v, rows = keys, values, hist_rows
                if small:
                    k, v, rows = self._gather_small(k, v, rows, lengths)
                return target_attention(qk, k, k if v is None else v, lengths=lengths,
                                        hist_index=hist_index, hist_rows=rows, scale=scale,
                                        backend=self.backend)
            U = keys.shape[0] if hist_rows is None else check_hist_rows(hist_rows).shape[0]
            check_lengths(lengths, U)
            valid = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
            if U:                    # (value ranges checked; no history: nothing is valid)
                lens, hist = layout(q.shape[0], U, L, lengths, hist_index, q.device)
                valid = lens[hist] > 0
            return self.attend_inputs(q, attend, valid)
        q, k, v = self.project(query, keys, values)
        if hist_rows is not None and 0 < k.shape[0] and \
                hist_rows.numel() * self.embed_dim <= self.gather_below:
            k, v, hist_rows = self._gather_small(k, v, hist_rows, lengths)
        out = target_attention(self._split(q), self._split(k), self._split(v),
                               lengths=lengths, hist_index=hist_index, hist_rows=hist_rows,
                               backend=self.backend)
        return self._merge(out)

    @staticmethod
    def _gather_small(k: Tensor, v: Optional[Tensor], hist_rows: Tensor,
                      lengths: Optional[Tensor]):
        """The rows of a small indexed history, gathered to (U, L, ·)."""
        # The fused op would check the rows it reads; the gather must refuse the same
        # inputs (a -1 or an out-of-table row at a valid position) before clamping.
        U, L = check_hist_rows(hist_rows).shape
        checked_rows(hist_rows, checked_lengths(check_lengths(lengths, U), U, L,
                                                hist_rows.device), k.shape[0])
        rows = hist_rows.clamp(min=0)     # positions past lengths are masked anyway
        # F.embedding: its backward is a plain index-add (advanced indexing's sorts)
        return F.embedding(rows, k), None if v is None else F.embedding(rows, v), None

    def absorbs(self, B: int, L: int, keys: Tensor, values: Optional[Tensor]) -> bool:
        """Whether one head attends in the input space (:meth:`attend_inputs`): chosen when
        that takes fewer multiply-adds than projecting the history's (or table's) rows,
        e.g. always in the training layout (one history per query)."""
        if self.heads != 1:
            return False
        kd = keys.shape[-1]
        vd = kd if values is None else values.shape[-1]
        E, rows = self.embed_dim, keys.numel() // max(kd, 1)
        return B * L * (kd + vd) + B * E * (kd + vd) <= rows * E * (kd + vd) + 2 * B * L * E

    def attend_inputs(self, q: Tensor, attend, valid: Tensor) -> Tensor:
        """One head's attention without projecting keys or values (exact, up to rounding).

        score_l = q·(W_k x_l + b_k) = (W_kᵀ q)·x_l + q·b_k, and q·b_k is the same at every
        position, so it cancels in the softmax; Σ_l a_l (W_v x_l + b_v) = W_v (Σ_l a_l x_l)
        + b_v whenever the weights sum to 1, i.e. when the query's history has a valid
        position (``valid`` (B,) bool; otherwise the output is 0, as in the projected form).
        ``attend(qk (B, key_dim), scale)`` returns Σ_l a_l x_l (B, value_dim) over the raw
        rows. Its two halves, :meth:`input_query` and :meth:`output_of_inputs`, let a caller
        run several modules' attentions as one batched call (SIM's ESU and short window).
        """
        return self.output_of_inputs(q, attend(self.input_query(q), self.input_scale), valid)

    @property
    def input_scale(self) -> float:
        """The score scale of :meth:`attend_inputs` (one head of width E: E^-1/2)."""
        return self.embed_dim ** -0.5

    def input_query(self, q: Tensor) -> Tensor:
        """W_kᵀ q (B, key_dim): the projected query ``q`` (B, E) moved to the key inputs'
        space, whose dot products with raw rows x_l are the scores (up to a per-query shift)."""
        return q @ self.k_proj.weight

    def output_of_inputs(self, q: Tensor, mixed: Tensor, valid: Tensor) -> Tensor:
        """The output (B, E) from ``mixed`` = Σ_l a_l x_l (B, value_dim) over the raw rows
        (zeros where ``valid`` (B,) is False) and the projected query ``q`` (B, E)."""
        out = F.linear(mixed, self.v_proj.weight)
        if self.v_proj.bias is not None:
            out = out + self.v_proj.bias * valid.to(out.dtype)[:, None]
        if self.k_proj.bias is not None:
            # b_k's gradient is exactly 0 (softmax is shift-invariant); a zero-weighted term
            # keeps it in the graph, so that DistributedDataParallel sees it used.
            out = out + 0.0 * (q * self.k_proj.bias).sum(-1, keepdim=True)
        return out

    @staticmethod
    def history_length(keys: Tensor, hist_rows: Optional[Tensor]) -> int:
        """L of a call: from the (U, L, ·) histories, or from hist_rows (indexed form)."""
        return keys.shape[1] if hist_rows is None else hist_rows.shape[1]


class ETAAttention(TargetAttention):
    """ETA target attention: SimHash the projected query and keys, keep each query's ``topk``
    nearest behaviours by Hamming distance, and attend exactly over those.

    Args (beyond :class:`TargetAttention`):
        topk: behaviours attended per query.
        hash_bits: SimHash bits per signature (one signature per query / behaviour, shared
            by all heads).
        seed: seed of the hashing hyperplanes, a (E, hash_bits) buffer saved in the state dict
            ((key_dim, hash_bits) with ``hash_input="raw"``).
        hash_input: what is hashed: ``"projected"`` (default) the projected query q_proj(query)
            and keys k_proj(keys), so retrieval approximates the attention scores' top-k;
            ``"raw"`` the query and key inputs themselves (query_dim == key_dim), as the ETA
            paper hashes the target and behaviour embeddings: retrieval by the embeddings'
            angle, independent of the projections.
        hash_dims: retrieval hashes the first ``hash_dims`` key features only (default all):
            their part of the projected key, k_proj's first ``hash_dims`` input columns plus
            its bias; the attention over the retrieved behaviours reads every feature
            (e.g. ETA-Net's time-interval embedding is attended, not hashed).
        orthogonal_planes: super-bit planes (:func:`fastattn.make_planes` with
            ``orthogonal=True``, the default): each group of E planes orthogonal, which
            raises recall against the exact top-k at equal bits; False: i.i.d. Gaussian.
        backend: force a kernel backend (default: the best for the tensors' device).

    When the history is no longer than ``topk`` (L <= topk) every valid behaviour would be
    retrieved, so the module runs exact dense attention instead: same result, no hashing.
    In the indexed form (a table plus ``hist_rows``) each table row is projected and hashed
    once: one signature per distinct behaviour. Keys are projected without autograd just to
    be hashed; the B·topk retrieved rows are gathered and projected again with autograd, so
    V is projected for them only and the backward touches B·topk rows (DESIGN.md §7). With
    one head they are read in place, unprojected (:meth:`attend_inputs`).
    For serving (ETA+), :meth:`precompute_key_signatures` hashes item embeddings once; pass
    the signatures of the table's rows (indexed form) or of every position (dense form) as
    ``key_signatures`` while the weights stay frozen.

    ``position_ids``, ``position_table``: a feature of a behaviour that depends on its
    position, not on the behaviour (e.g. ETA-Net's time interval to the target), attended
    but never hashed: ``position_ids(idx) -> (B, n)`` int64 rows of ``position_table``
    (P, F) for positions ``idx`` (B, n) int64 of each query's history (-1: empty slot).
    Computed for the retrieved positions only; each retrieved key is [behaviour,
    position_table[id]] (and so is its value when ``values`` is None), so the keys (or
    the table) stay per behaviour, hashed once each; key_dim = the keys' width + F. With
    L <= topk every valid position is attended (no hashing). One head attends without
    gathering the (B, K, F) features: the table's share of the scores is a (B, P) score
    per id, and its share of the output the attention mass per id times the table.

    ``return_mass=True``: ``forward`` returns ``(out (B, E), log_mass (B, H))``, per head
    :func:`log_soft_count` of the attention scores over the attended (retrieved) positions:
    log Σ_l exp(s_l - max s), how many of them score as high as the best one, which the
    softmax normalises away (0 for a query without any). It gathers the B·topk retrieved
    rows (the one-head, no-position path otherwise reads them in place) and, with several
    heads, computes their scores once more beside the fused op.
    """

    def __init__(self, embed_dim: int, heads: int = 1, *, topk: int = 64, hash_bits: int = 256,
                 seed: int = 0, backend: Optional[str] = None, hash_input: str = "projected",
                 orthogonal_planes: bool = True, hash_dims: Optional[int] = None, **kwargs):
        super().__init__(embed_dim, heads, backend=backend, **kwargs)
        if topk < 1 or hash_bits < 1:
            raise ValueError(f"topk ({topk}) and hash_bits ({hash_bits}) must be >= 1")
        if hash_input not in ("projected", "raw"):
            raise ValueError(f"hash_input must be 'projected' or 'raw', got {hash_input!r}")
        key_dim = self.k_proj.in_features
        if hash_dims is None:
            hash_dims = key_dim
        if isinstance(hash_dims, bool) or not isinstance(hash_dims, int) \
                or not 1 <= hash_dims <= key_dim:
            raise ValueError(f"hash_dims must be an int in [1, key_dim={key_dim}], got "
                             f"{hash_dims!r}")
        if hash_input == "raw" and self.q_proj.in_features != hash_dims:
            raise ValueError(f"hash_input='raw' hashes the query and key inputs with one set of "
                             f"planes: query_dim ({self.q_proj.in_features}) must equal "
                             f"the hashed key width ({hash_dims})")
        self.topk, self.hash_bits, self.hash_input = topk, hash_bits, hash_input
        self.orthogonal_planes, self.hash_dims = bool(orthogonal_planes), hash_dims
        width = embed_dim if hash_input == "projected" else hash_dims
        planes = make_planes(width, hash_bits, torch.Generator().manual_seed(seed),
                             orthogonal=bool(orthogonal_planes))
        self.register_buffer("planes", planes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A TargetAttention checkpoint has the same projections and no planes: keep ours.
        state_dict.setdefault(prefix + "planes", self.planes)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sign(self, x: Tensor) -> Tensor:
        """SimHash signatures (..., W) of projected vectors x (..., E)."""
        return simhash_sign(x, self.planes, backend=self.backend)

    @torch.no_grad()
    def precompute_key_signatures(self, item_embeddings: Tensor) -> Tensor:
        """ETA+: signatures (N, W) of the projected keys of item embeddings (N, key_dim).

        Valid as long as ``k_proj`` (with ``hash_input="projected"``) and ``planes`` do not
        change; gather the rows of the table's behaviours into ``key_signatures`` (N, W)
        (indexed form), or of every position (U, L, W) (dense form), for :meth:`forward`.
        """
        return self.sign(self.hashed_keys(item_embeddings))

    def hashed_keys(self, keys: Tensor) -> Tensor:
        """The vectors whose signatures retrieval compares: k_proj(keys), or the keys
        themselves with ``hash_input="raw"``; of the first ``hash_dims`` key features only
        (keys may be that wide, e.g. the item embeddings of ETA+)."""
        hd = self.hash_dims
        if hd < self.k_proj.in_features:
            keys = keys[..., :hd]
            if self.hash_input == "projected":
                return F.linear(keys, self.k_proj.weight[:, :hd], self.k_proj.bias)
        return self.k_proj(keys) if self.hash_input == "projected" else keys

    def hashed_query(self, query: Tensor, q: Tensor) -> Tensor:
        """The query-side counterpart of :meth:`hashed_keys` (``q`` = q_proj(query))."""
        return q if self.hash_input == "projected" else query

    def _check_key_signatures(self, key_signatures: Optional[Tensor], keys: Tensor,
                              hist_rows: Optional[Tensor]) -> None:
        """key_signatures: (N, W) with hist_rows, else (U, L, W), W = ceil(hash_bits / 64)."""
        if key_signatures is None:
            return
        W = (self.hash_bits + 63) // 64
        lead = tuple(keys.shape[:1] if hist_rows is not None else keys.shape[:2])
        form = "(N, W) like the keys table" if hist_rows is not None else "(U, L, W)"
        check_signature("key_signatures", key_signatures, ndim=len(lead) + 1,
                        shape=f"shape {form}")
        if tuple(key_signatures.shape) != lead + (W,):
            raise ValueError(f"key_signatures must be {form} = {lead + (W,)}, got "
                             f"{tuple(key_signatures.shape)}")

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None, *,
                lengths: Optional[Tensor] = None, hist_index: Optional[Tensor] = None,
                hist_rows: Optional[Tensor] = None,
                key_signatures: Optional[Tensor] = None,
                position_ids: Optional[Callable[[Tensor], Tensor]] = None,
                position_table: Optional[Tensor] = None, return_mass: bool = False):
        # Checked on both paths (unused by the dense one), so a call that is wrong for one
        # history length is wrong for all.
        self._check_key_signatures(key_signatures, keys, hist_rows)
        if (position_ids is None) != (position_table is None):
            raise ValueError("position_ids and position_table go together")
        if position_ids is not None:
            if not callable(position_ids):
                raise TypeError(f"position_ids must be a callable idx (B, n) -> (B, n) ids, "
                                f"got {type(position_ids).__name__}")
            check_tensor("position_table", position_table, ndim=2, what=" (P, F)",
                         dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
            if keys.shape[-1] + position_table.shape[1] != self.k_proj.in_features:
                raise ValueError(f"the keys' width ({keys.shape[-1]}) + position_table's "
                                 f"({position_table.shape[1]}) must be key_dim "
                                 f"({self.k_proj.in_features})")
            position = (position_ids, position_table)
        else:
            position = None
        if values is not None and values.shape[:-1] != keys.shape[:-1]:
            raise ValueError(f"values must have the rows of keys {tuple(keys.shape[:-1])} "
                             f"(then any width), got {tuple(values.shape)}")
        L = self.history_length(keys, hist_rows)
        if L <= self.topk:
            if position is None and not return_mass:
                return super().forward(query, keys, values, lengths=lengths,
                                       hist_index=hist_index, hist_rows=hist_rows)
            # every valid position is retrieved: attend over all of them, gathered
            U = keys.shape[0] if hist_rows is None else check_hist_rows(hist_rows).shape[0]
            lens, hist = layout(query.shape[0], U, L, check_lengths(lengths, U), hist_index,
                                query.device)
            if hist_rows is not None:        # what hamming_topk checks on the other path
                checked_rows(hist_rows, lens, keys.shape[0])
            pos = torch.arange(L, device=query.device)
            idx = torch.where(pos < lens[hist][:, None], pos, -1)
            out = self._attend_winners(self.q_proj(query), keys, values, idx, hist_index,
                                       hist_rows, position, return_mass)
            return out if return_mass else out[0]
        # Retrieve, then project only what was retrieved: the keys are projected without
        # autograd just to be hashed; the B·topk winners' rows are gathered from the inputs
        # and projected again, with autograd. Same output and gradients as eta_attention on
        # projected histories, but V is projected for the winners only and the backward
        # touches B·topk rows instead of every row of the history or table.
        q = self.q_proj(query)
        if key_signatures is None:
            with torch.no_grad():
                key_signatures = self.sign(self.hashed_keys(keys))
        _, idx = hamming_topk(self.sign(self.hashed_query(query, q).detach()), key_signatures,
                              self.topk,
                              lengths=lengths, hist_index=hist_index, hist_rows=hist_rows,
                              backend=self.backend)
        out = self._attend_winners(q, keys, values, idx, hist_index, hist_rows, position,
                                   return_mass)
        return out if return_mass else out[0]

    def _attend_winners(self, q: Tensor, keys: Tensor, values: Optional[Tensor], idx: Tensor,
                        hist_index: Optional[Tensor], hist_rows: Optional[Tensor],
                        position, mass: bool = False):
        """Exact attention of q = q_proj(query) (B, E) over the positions ``idx`` (B, K);
        ``position``: None or (position_ids, position_table). Returns (out (B, E),
        log_mass (B, H) with ``mass``, else None)."""
        if position is None and self.heads == 1 and not mass:   # cheaper unprojected
            # The winners are read in place (no (B, topk, ·) copy); the backward adds their
            # gradients into the inputs' rows with the op's deterministic scatter.
            return self.attend_inputs(
                q, lambda qk, scale: topk_attention(
                    qk, keys, keys if values is None else values, idx, hist_index=hist_index,
                    hist_rows=hist_rows, scale=scale, backend=self.backend),
                (idx >= 0).any(1)), None
        rows = winner_rows(idx, keys.shape[:-1], hist_index, hist_rows)
        k_in = rows.gather(keys)
        v_in = None if values is None else rows.gather(values)
        ids = None
        if position is not None:
            ids = position[0](idx)
            if not isinstance(ids, Tensor) or ids.shape != idx.shape \
                    or ids.dtype != torch.int64:
                raise ValueError(f"position_ids(idx {tuple(idx.shape)}) must return int64 ids "
                                 f"of the same shape, got {getattr(ids, 'dtype', type(ids))} "
                                 f"{tuple(getattr(ids, 'shape', ()))}")
            P = position[1].shape[0]
            what = f"position_ids must return rows of position_table in [0, {P}) at every "\
                "retrieved position"
            require(~((idx >= 0) & ((ids < 0) | (ids >= P))).any(), what, lambda: what)
        ok = idx >= 0
        if self.heads == 1:             # attend in the input space (attend_inputs' halves)
            s, mixed = _attend_with_ids(self.input_query(q), k_in, v_in, ok, ids,
                                        None if position is None else position[1],
                                        self.input_scale)
            log_mass = None
            if mass:        # s lacks q·b_k (the same at every position): the exact scores
                if self.k_proj.bias is not None:
                    s = s + self.input_scale * (q * self.k_proj.bias).sum(-1, keepdim=True)
                log_mass = log_soft_count(s, ok)[:, None]
            return self.output_of_inputs(q, mixed, ok.any(1)), log_mass
        if position is not None:
            table = position[1]
            extra = table.index_select(0, ids.reshape(-1)).view(*ids.shape, table.shape[1])
            k_in = torch.cat([k_in, extra.to(k_in.dtype)], -1)
        v_in = k_in if v_in is None else v_in
        qh, kh = self._split(q), self._split(self.k_proj(k_in))
        out = topk_attention(qh, kh, self._split(self.v_proj(v_in)), rows.slots,
                             backend=self.backend)
        log_mass = None
        if mass:                         # the op's scores, (B, K, H)
            s = (qh[:, None] * kh).sum(-1) * ref.default_scale(qh.shape[-1])
            log_mass = log_soft_count(s, ok)
        return self._merge(out), log_mass


def _attend_with_ids(qk: Tensor, e: Tensor, v: Optional[Tensor], ok: Tensor,
                     ids: Optional[Tensor], table: Optional[Tensor], scale: float):
    """(scores s (B, K), Σ_l a_l x_l (B, ·)), a = softmax(s), for keys x_l = [e_l,
    table[ids_l]] (B, K, D + F) without building them (:func:`id_scores`,
    :func:`id_weighted_sum`), or x_l = e_l when ``table`` is None. Values ``v`` (B, K, Dv)
    instead of x when given. Slots where ``ok`` is False get no weight (their scores are
    garbage); a row without any gives 0."""
    D = e.shape[-1]
    s = torch.bmm(e, qk[:, :D, None]).squeeze(-1)
    if table is not None:
        ids = ids.clamp(min=0)
        s = s + id_scores(qk[:, D:], table, ids)
    s = s * scale
    a = torch.softmax(s.masked_fill(~ok, torch.finfo(s.dtype).min), -1).masked_fill(~ok, 0.0)
    if v is not None:
        return s, torch.bmm(a[:, None, :], v).squeeze(1)
    mixed = torch.bmm(a[:, None, :], e).squeeze(1)
    return s, mixed if table is None else torch.cat([mixed, id_weighted_sum(a, ids, table)], -1)


def log_soft_count(s: Tensor, ok: Tensor) -> Tensor:
    """log Σ_l exp(s_l - max_l s_l) over the slots where ``ok``: a soft count of the
    attended positions that score as high as the best one (1 to K: 0 to log K).

    s (B, K) or (B, K, H) attention scores (scaled as in the softmax), ok (B, K) bool ->
    (B,) or (B, H); 0 for a row without any ok slot. The max is a stop-gradient shift:
    the gradient is the log-sum-exp's, softmax(s) (ETA-Net's head trains better with it
    than with the exact one, docs/DESIGN.md). The log of the softmax's denominator, which
    attention normalises away: it says how many retrieved behaviours match the query."""
    if s.shape[1] == 0:                                  # no slot at all (L = 0)
        return s.sum(1)
    ok = ok.view(*ok.shape, *([1] * (s.dim() - 2))).expand_as(s)
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(1, keepdim=True).detach().clamp(min=torch.finfo(s.dtype).min)
    # >= 1 where a slot is ok (its max adds exp(0)); clamping empty rows' 0 gives log 1 = 0
    return torch.exp(s - m).sum(1).clamp(min=1).log()


def id_scores(qk: Tensor, table: Tensor, ids: Tensor) -> Tensor:
    """qk_b · table[ids[b, l]] (B, n) for qk (B, F), a small table (P, F) and ids (B, n)
    int64 in [0, P): one (B, P) product read by id, never (B, n, F) gathered rows (a
    per-position feature such as a time-interval bucket, attended but not hashed)."""
    return (qk @ table.to(qk.dtype).T).gather(1, ids)


def id_weighted_sum(weights: Tensor, ids: Tensor, table: Tensor) -> Tensor:
    """Σ_l weights[b, l] · table[ids[b, l]] (B, F): the weights summed per id, times the
    table (the output-side twin of :func:`id_scores`)."""
    mass = weights.new_zeros(weights.shape[0], table.shape[0]).scatter_add(1, ids, weights)
    return mass @ table.to(weights.dtype)


class _Winners(NamedTuple):
    """The input rows of retrieved positions: ``rows`` (B·K,) int64 (0 for empty slots) and
    ``slots`` (B, K) int64, each slot's own index k, -1 where empty (topk_attention's idx
    over the gathered (B, K, ·) rows)."""

    rows: Tensor
    slots: Tensor

    def gather(self, x: Tensor) -> Tensor:
        """(B, K, C) rows of x, a table (N, C) or histories (U, L, C) read as (U·L, C)."""
        B, K = self.slots.shape
        # index_select: its backward is a plain index-add into the input's shape (on CPU
        # 1.5-2x cheaper than F.embedding's backward at 32k rows of 32)
        return x.reshape(-1, x.shape[-1]).index_select(0, self.rows).view(B, K, x.shape[-1])


def winner_rows(idx: Tensor, hist_shape, hist_index: Optional[Tensor],
                hist_rows: Optional[Tensor]) -> _Winners:
    """Map retrieved positions ``idx`` (B, K) (-1: empty) to rows of the inputs: of the table
    through ``hist_rows`` (U, L), or of the (U, L, ·) histories flattened (``hist_shape``
    (U, L) or (N,)). ``hist_index`` (B,) as in hamming_topk (default b when U == B, else
    the shared history 0); all were validated by hamming_topk."""
    B, K = idx.shape
    U, L = hist_rows.shape if hist_rows is not None else hist_shape
    if hist_index is None:
        hist_index = (torch.arange(B, device=idx.device) if U == B
                      else torch.zeros(B, dtype=torch.int64, device=idx.device))
    empty = idx < 0
    flat = hist_index.to(torch.int64).view(B, 1) * L + idx.clamp(min=0)
    if hist_rows is not None:
        flat = hist_rows.reshape(-1)[flat].to(torch.int64)
    slots = torch.arange(K, device=idx.device).expand(B, K)
    return _Winners(flat.masked_fill(empty, 0).reshape(-1), slots.masked_fill(empty, -1))
