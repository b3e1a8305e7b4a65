"""What every reference CTR model shares: embeddings, input checks, the MLP head, the loss.

A model scores B candidate items against U behaviour histories given as a
:class:`~fastattn.data.batch.Batch`, in the training layout (U == B, one history per row) or
the serving layout (U == 1, one history shared by B candidates, never copied B times), or
any candidates→histories map through ``hist_index``. The head follows DIN/ETA: the target
embedding, each interest vector and (for interest vectors in the target's embedding space)
its element-wise product with the target, concatenated into an MLP 200-80-1 with PReLU.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import Batch
from ..nn import TargetAttention
from ..ops import unique_rows
from ..ops._common import HostBufferPool, backend_for
from ..ops.gather import scatter_add_rows

__all__ = ["CTRModel", "Histories", "per_query", "history_rows", "check_positive_int", "lookup",
           "lookup_cat", "weighted_rows"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def check_positive_int(name: str, value, *, allow_none: bool = False,
                       allow_zero: bool = False) -> None:
    """ValueError unless ``value`` is an int >= 1 (or 0 / None where allowed)."""
    if value is None and allow_none:
        return
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= {low}{extra}, got {value!r}")


def per_query(x: Tensor, B: int, hist_index: Optional[Tensor]) -> Tensor:
    """Per-history rows x (U, ...) as per-candidate rows (B, ...).

    Row ``hist_index[b]`` (an indexing copy), or without ``hist_index`` row b (U == B, x
    itself) or row 0 for every candidate (U == 1, a broadcast view: no copy).
    """
    if hist_index is not None:
        return x[hist_index]
    if x.shape[0] == 1 and B != 1:
        return x.expand(B, *x.shape[1:])
    return x


def history_rows(hist_index: Optional[Tensor], B: int, U: int, device) -> Tensor:
    """The history row (B,) int64 of each candidate: ``hist_index``, or b (U == B), or 0."""
    if hist_index is not None:
        return hist_index.to(torch.int64)
    if U == B:
        return torch.arange(B, device=device)
    return torch.zeros(B, dtype=torch.int64, device=device)


def _check_ids(name: str, t, ndim: int, shape: str, high: Optional[int] = None,
               what: str = "ids") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must have an integer dtype (int64 or int32) {shape}, "
                        f"got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if high is not None and t.numel():
        lo, hi = (int(v) for v in torch.aminmax(t))        # one pass over the ids
        if lo < 0 or hi > high:
            raise ValueError(f"{name} must hold {what} in [0, {high}], got values in "
                             f"[{lo}, {hi}]")


# Dense table gradients of the CPU kernels, reused from step to step (see _row_grad).
_GRAD_POOL = HostBufferPool(keep=1 << 30)


def _dense_grad(rows: int, like: Tensor, backend: str) -> Tensor:
    """A zeroed (1, rows, D) table gradient to scatter rows of ``like`` (..., D) into (cast
    it to ``like``'s dtype after). On the CPU kernels it is in their accumulation dtype
    (fp32 for the half types) and comes from a buffer pool, zeroed in place: a fresh
    tensor faults in every page, 18 ms for the 64 MB of a 1,000,000 × 16 fp32 table
    against ~3 ms to zero warm memory, every step. The buffer is free again once the
    gradient is dropped (``zero_grad(set_to_none=True)``, or added into an existing
    ``.grad`` by autograd)."""
    if backend in ("cpp", "numba"):
        acc = torch.float64 if like.dtype == torch.float64 else torch.float32
        return _GRAD_POOL.take((1, rows, like.shape[-1]), acc).zero_()
    return like.new_zeros(1, rows, like.shape[-1])


def _row_grad(grad: Tensor, ids: Tensor, rows: int, backend: str) -> Tensor:
    """The table gradient (rows, D) of a row gather: row i of ``grad`` (n, D) added at
    ``ids[i]`` (n,) int64, skipped where it is -1; the package's deterministic scatter
    (into a pooled buffer on the CPU kernels, :func:`_dense_grad`)."""
    hist = torch.zeros(1, dtype=torch.int64, device=ids.device)
    # the table as one history of `rows` rows, each id a slot
    return scatter_add_rows(grad.reshape(1, *grad.shape), ids.view(1, -1), hist, 1, rows,
                            backend, out=_dense_grad(rows, grad, backend)
                            ).view(rows, grad.shape[-1]).to(grad.dtype)


def _sparse_grad(grad: Tensor, ids: Tensor, rows: int) -> Tensor:
    """The table gradient (rows, D) as ``nn.Embedding(sparse=True)`` gives it: an uncoalesced
    sparse COO tensor of the rows of ``grad`` (n, D) at ``ids`` (n,), ids of -1 skipped. No
    dense (rows, D) buffer is zeroed or written (the optimiser, e.g. SparseAdam, coalesces)."""
    keep = ids >= 0
    return torch.sparse_coo_tensor(ids[keep][None], grad[keep], (rows, grad.shape[-1]),
                                   check_invariants=False)   # (the ids are checked rows)


class _WeightedRows(torch.autograd.Function):
    """out[b] = Σ_l weights[b, l] · table[rows[b, l]] (``F.embedding_bag``'s weighted sum)
    with the package's row scatter as its backward: ATen's embedding_bag backward sorts every
    index into a dense gradient (~9 ms a call at B=256, L=1000 for a 50,000-row table). The
    weighted gradient rows are scattered in chunks of positions, so that no (B, L, D)
    tensor is built."""

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, weights: Tensor, backend: str) -> Tensor:
        ctx.save_for_backward(table, rows, weights)
        ctx.backend = backend
        return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        table, rows, weights = ctx.saved_tensors
        (B, L), (N, D) = rows.shape, table.shape
        d_table = d_weights = None
        step = max(1, (1 << 22) // max(B * D, 1))      # (B, step, D) weighted rows at a time
        if ctx.needs_input_grad[0]:
            d_table = _dense_grad(N, grad, ctx.backend)
            hist = torch.zeros(1, dtype=torch.int64, device=rows.device)
            for c0 in range(0, L, step):
                part = (weights[:, c0:c0 + step, None] * grad[:, None, :]).reshape(1, -1, D)
                scatter_add_rows(part, rows[:, c0:c0 + step].reshape(1, -1), hist, 1, N,
                                 ctx.backend, out=d_table)
            d_table = d_table.view(N, D).to(table.dtype)
        if ctx.needs_input_grad[2]:
            d_weights = torch.cat([(table[rows[:, c0:c0 + step]] * grad[:, None, :]).sum(-1)
                                   for c0 in range(0, L, step)], 1) if L else weights.clone()
        return d_table, None, d_weights, None


def weighted_rows(table: Tensor, rows: Tensor, weights: Tensor,
                  backend: Optional[str] = None) -> Tensor:
    """(B, D) weighted sums of table rows: ``out[b] = Σ_l weights[b, l] · table[rows[b, l]]``
    for table (N, D), rows (B, L) int64 in [0, N), weights (B, L) of the table's dtype;
    differentiable in ``table`` and ``weights`` (the table's gradient by the package's
    deterministic row scatter)."""
    return _WeightedRows.apply(table, rows, weights, backend_for(table.device, backend))


class _Lookup(torch.autograd.Function):
    """``nn.Embedding`` lookup (rows of ``weight``; no gradient to ``padding_idx``) whose
    backward is the package's deterministic row scatter: ATen's embedding backward costs
    ~4x more on CPU at the sizes these models train (thousands of ids, 16-wide rows), and
    it runs for every lookup of every step. ``padding_idx`` None: every id gets its
    gradient; -1: ids of -1 (the indexed form's positions past a history's length) read
    row 0 and get no gradient, so that the backward skips them instead of adding their
    (zero) gradients to row 0."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, padding_idx: Optional[int],
                backend: str, sparse: bool = False) -> Tensor:
        flat = ids.reshape(-1)
        ctx.save_for_backward(flat)
        ctx.shape, ctx.padding_idx, ctx.backend = weight.shape, padding_idx, backend
        ctx.sparse = sparse
        rows = flat.clamp(min=0) if padding_idx == -1 else flat
        return weight.index_select(0, rows).view(*ids.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (flat,) = ctx.saved_tensors
        pad = ctx.padding_idx
        # the scatter skips ids of -1: padding ids become -1
        idx = flat if pad is None or pad == -1 else torch.where(flat != pad, flat, -1)
        rows, dim = ctx.shape
        g = (_sparse_grad(grad.reshape(-1, dim), idx, rows) if ctx.sparse
             else _row_grad(grad.reshape(-1, dim), idx, rows, ctx.backend))
        return g, None, None, None, None


class _LookupCat(torch.autograd.Function):
    """Several equally wide tables looked up into one row each: ``ids`` (..., k) ->
    (..., k·D), feature block j = ``weights[j][ids[..., j]]``. One gather per table and one
    scatter in the backward, instead of k lookups, their concatenation and k scatters.
    ``skip`` (..., k) bool: ids whose row gets no gradient (padding). ``sizes``: None (one
    output), or the row counts of consecutive pieces of ``ids`` (n, k), returned as one
    output each (:meth:`CTRModel.embed_many`): the backward scatters each piece's gradient
    as it comes, where a split of one output would first concatenate them (a copy of every
    gradient row, and zeros for a piece without one). ``sparse``: per table, whether its
    gradient is sparse (:func:`_sparse_grad`) instead of dense."""

    @staticmethod
    def forward(ctx, ids: Tensor, skip: Tensor, backend: str, sizes: Optional[List[int]],
                sparse: Tuple[bool, ...], *weights: Tensor):
        rows = [w.shape[0] for w in weights]
        offset = torch.tensor([0] + rows[:-1], device=ids.device).cumsum(0)
        flat = (ids + offset).reshape(-1)
        ctx.save_for_backward(torch.where(skip.reshape(-1), -1, flat))
        ctx.rows, ctx.dim, ctx.backend, ctx.sizes = rows, weights[0].shape[1], backend, sizes
        ctx.sparse = sparse
        ctx.set_materialize_grads(False)          # a piece nobody used has no gradient
        # Each table gathers straight into its feature block: stacking the tables first
        # would copy them whole (64 MB, ~20 ms, for a 1,000,000-row table) on every call.
        k = ids.shape[-1]
        by_table = ids.reshape(-1, k)
        if torch.compiler.is_compiling():   # dynamo traces no out= into a strided block
            out = torch.stack([w.index_select(0, by_table[:, j])
                               for j, w in enumerate(weights)], 1)
        else:                               # (eager: no per-table copy, one output)
            out = weights[0].new_empty(by_table.shape[0], k, ctx.dim)
            for j, w in enumerate(weights):
                torch.index_select(w, 0, by_table[:, j], out=out[:, j])
        if sizes is None:
            return out.view(*ids.shape[:-1], k * ctx.dim)
        return tuple(out.view(-1, k * ctx.dim).split(sizes))

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        (flat,) = ctx.saved_tensors
        R, D, k = sum(ctx.rows), ctx.dim, len(ctx.rows)
        first = next(x for x in grads if x is not None)
        parts, start = [], 0     # (ids (n·k,) with table offsets, rows (n·k, D)) per piece
        for grad, n in zip(grads, ctx.sizes or [flat.shape[0] // k]):
            if grad is not None:
                parts.append((flat[start * k:(start + n) * k], grad.reshape(n * k, D)))
            start += n
        hist = torch.zeros(1, dtype=torch.int64, device=flat.device)
        if not any(ctx.sparse):  # one dense buffer for all tables, one scatter per piece
            g = _dense_grad(R, first.reshape(-1, D), ctx.backend)
            for ids, rows in parts:
                scatter_add_rows(rows[None], ids[None], hist, 1, R, ctx.backend, out=g)
            return (None,) * 5 + tuple(g.view(R, D).to(first.dtype).split(ctx.rows))
        out, offset = [], 0
        for j, (n_rows, sparse) in enumerate(zip(ctx.rows, ctx.sparse)):
            ids = torch.cat([i[j::k] for i, _ in parts])           # table j's ids and rows
            g = _sparse_grad(torch.cat([r[j::k] for _, r in parts]),
                             torch.where(ids >= 0, ids - offset, -1), n_rows)
            out.append(g if sparse else g.to_dense())   # (a dense table among sparse ones)
            offset += n_rows
        return (None,) * 5 + tuple(out)


def lookup(emb: nn.Embedding, ids: Tensor, backend: Optional[str] = None) -> Tensor:
    """``emb(ids)`` with a faster backward (same values and gradients, see :class:`_Lookup`;
    sparse ones when ``emb.sparse``)."""
    return _Lookup.apply(emb.weight, ids, emb.padding_idx, backend_for(ids.device, backend),
                         bool(emb.sparse))


def lookup_cat(embs: Sequence[nn.Embedding], ids: Tensor, backend: Optional[str] = None,
               sizes: Optional[List[int]] = None):
    """``torch.cat([embs[j](ids[..., j]) for j], -1)`` (..., k·D) of k tables of one width D,
    ``ids`` (..., k) int64, in one gather per table and one scatter (same values and
    gradients; a table with ``sparse`` set gets a sparse one). With ``sizes`` (row counts
    summing to ``ids``' n rows, ids (n, k)): the consecutive pieces of those rows, a tuple
    of (size, k·D) tensors."""
    widths = {e.embedding_dim for e in embs}
    if len(widths) != 1 or ids.shape[-1] != len(embs):
        raise ValueError(f"lookup_cat needs tables of one width and ids (..., {len(embs)}), "
                         f"got widths {sorted(widths)} and ids {tuple(ids.shape)}")
    pads = torch.tensor([-1 if e.padding_idx is None else e.padding_idx for e in embs],
                        device=ids.device)
    return _LookupCat.apply(ids, ids == pads, backend_for(ids.device, backend), sizes,
                            tuple(bool(e.sparse) for e in embs), *(e.weight for e in embs))


class Histories(NamedTuple):
    """Behaviour histories in the form the attention modules take, before embedding.

    Indexed (``hist_rows`` set): ``items``/``cats`` (N,) are the batch's distinct (item,
    category) pairs, one table row each, and position l of history u is row
    ``hist_rows[u, l]``. Dense (``hist_rows`` None): ``items``/``cats`` (U, L), every
    position. ``lengths`` (U,) are the valid lengths. Embed ``ids`` (with
    :meth:`CTRModel.embed_many`, together with the step's other ids) to get the keys;
    ``items`` also indexes per-item tables such as ETA+ signatures.
    """

    items: Tensor
    cats: Tensor
    hist_rows: Optional[Tensor]
    lengths: Tensor

    @property
    def ids(self) -> Tuple[Tensor, Tensor]:
        return self.items, self.cats


class CTRModel(nn.Module):
    """Base of the reference CTR models (subclasses: DIN, ETANet, MIMN, SIMHard, SDIM).

    Args:
        n_items, n_cats: number of item / category ids; ids run 1..n, 0 is padding.
        embed_dim: width of the item and of the category embedding; a behaviour or a target
            is their concatenation, D = 2 · embed_dim wide.
        mlp: hidden widths of the head (PReLU after each), then one logit.
        short_len: the short-term target attention reads this many most recent behaviours
            (None: the whole history; 0: no short-term branch, where a model allows it).
        heads: attention heads of the attention modules (D must be a multiple of it).
        backend: kernel backend passed to every fastattn op and module the model uses
            (``"torch"`` gives the pure-reference model); settable later via ``.backend``.
        dedup: embed (and project, hash) each distinct behaviour of a batch once and read
            histories through ``hist_rows`` (the indexed form, :func:`fastattn.unique_rows`);
            False embeds every position (the dense form). Same results; an execution
            choice like ``backend``, so not part of ``config()``.

    ``forward(batch) -> logits (B,)``; ``forward(batch, return_reg=True) -> (logits, reg)``
    with ``reg`` the model's regulariser (a 0-d tensor, zero when it has none), so that a
    DistributedDataParallel wrapper, which only sees ``forward``, gets the whole loss via
    :meth:`loss_from`. ``loss(batch)`` = mean BCE-with-logits on ``batch.label`` + reg.
    ``config()`` returns the constructor kwargs (architecture only, not ``backend``):
    ``fastattn.models.build(**model.config())`` rebuilds the same architecture.
    """

    name: str = ""
    # Windows of fewer positions per batch are embedded densely even with ``dedup``: there
    # the dedup's fixed costs (a hash pass, the gather and its backward) exceed what it
    # saves. Measured with fastattn-train (B=128, embed_dim=16): DIN's 50 recent
    # behaviours and SIM's 64 retrieved ones train 10-30% faster dense.
    dedup_min_positions: int = 1 << 15

    def __init__(self, n_items: int, n_cats: int, embed_dim: int = 16,
                 mlp: Sequence[int] = (200, 80), short_len: Optional[int] = 50,
                 backend: Optional[str] = None, *, heads: int = 1, dedup: bool = True):
        super().__init__()
        self._backend = backend
        check_positive_int("n_items", n_items)
        check_positive_int("n_cats", n_cats)
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("short_len", short_len, allow_none=True, allow_zero=True)
        check_positive_int("heads", heads)
        mlp = list(mlp)
        for i, w in enumerate(mlp):
            check_positive_int(f"mlp[{i}]", w)
        self.n_items, self.n_cats, self.embed_dim = n_items, n_cats, embed_dim
        self.dim = 2 * embed_dim
        if self.dim % heads:
            raise ValueError(f"heads ({heads}) must divide the behaviour width "
                             f"D = 2 * embed_dim = {self.dim}")
        self.short_len, self.heads = short_len, heads
        self.item_emb = nn.Embedding(n_items + 1, embed_dim, padding_idx=0)
        self.cat_emb = nn.Embedding(n_cats + 1, embed_dim, padding_idx=0)
        self.short_attn = None if short_len == 0 else self.attention()
        self._config: Dict = dict(name=self.name, n_items=n_items, n_cats=n_cats,
                                  embed_dim=embed_dim, mlp=mlp, short_len=short_len,
                                  heads=heads)
        self.mlp_widths = mlp
        self.head: Optional[nn.Sequential] = None
        self.dedup = bool(dedup)

    # ------------------------------------------------------------------ building blocks

    def attention(self, key_dim: Optional[int] = None) -> TargetAttention:
        """A dense target attention of a target (D) over keys (key_dim, default D) -> (D)."""
        return TargetAttention(self.dim, self.heads, query_dim=self.dim,
                               key_dim=key_dim or self.dim, backend=self._backend)

    def build_head(self, n_matched: int, other_dim: int = 0) -> None:
        """Create the MLP for [target, (v, target ⊙ v) for n_matched interests v of width D,
        other features of total width other_dim]."""
        widths = [self.dim * (1 + 2 * n_matched) + other_dim] + self.mlp_widths
        layers: List[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.PReLU(b)]
        layers.append(nn.Linear(widths[-1], 1))
        self.head = nn.Sequential(*layers)

    def score(self, target: Tensor, matched: Sequence[Tensor],
              other: Sequence[Tensor] = ()) -> Tensor:
        """Logits (B,) of the head for target (B, D), interests ``matched`` (B, D) each (in
        the target's space: their products with the target are added) and ``other`` (B, ·)."""
        feats = [target]
        for v in matched:
            feats += [v, target * v]
        return self.head(torch.cat(feats + list(other), dim=-1)).squeeze(-1)

    def embed(self, items: Tensor, cats: Tensor) -> Tensor:
        """Behaviour / target embeddings (..., D): [item_emb(items), cat_emb(cats)]."""
        return lookup_cat((self.item_emb, self.cat_emb),
                          torch.stack([items, cats.to(items.dtype)], -1),
                          self._backend)

    def embed_many(self, *ids: Tuple[Tensor, Tensor]) -> List[Tensor]:
        """:meth:`embed` of several (items, cats) id sets in one lookup (:func:`lookup_cat`): a
        lookup and its backward have a fixed cost (~0.2 ms on CPU) that dominates at the
        sizes of one training step, so a model embeds everything a step reads at once."""
        if len(ids) == 1:
            return [self.embed(*ids[0])]
        items = torch.cat([i.reshape(-1) for i, _ in ids])
        cats = torch.cat([c.reshape(-1) for _, c in ids]).to(items.dtype)
        # one output per id set (not a split of one): see _LookupCat
        pieces = lookup_cat((self.item_emb, self.cat_emb), torch.stack([items, cats], -1),
                            self._backend, [i.numel() for i, _ in ids])
        return [e.view(*i.shape, self.dim) for e, (i, _) in zip(pieces, ids)]

    def histories(self, items: Tensor, cats: Tensor, lengths: Tensor) -> Histories:
        """The behaviours ``items``/``cats`` (U, L) with valid ``lengths`` (U,), to embed:
        indexed (each distinct (item, category) pair once) when ``self.dedup``, dense
        otherwise. Padding positions get no table row."""
        if not self.dedup or items.numel() < self.dedup_min_positions:
            return Histories(items, cats, None, lengths)
        base = self.n_cats + 1
        # one (U, L) temporary, not two (items · base, then + cats)
        key = torch.add(cats.to(torch.int64), items.to(torch.int64), alpha=base)
        uniq, rows = unique_rows(key, lengths, backend=self._backend)
        return Histories(uniq // base, uniq % base, rows, lengths)

    def short_window(self, batch: Batch) -> Optional[Histories]:
        """The ``short_len`` most recent behaviours (None without a short-term branch)."""
        if self.short_attn is None:
            return None
        short = batch if self.short_len is None else batch.truncate(self.short_len)
        return self.histories(short.hist_items, short.hist_cats, short.lengths)

    def short_interest(self, batch: Batch, target: Tensor, keys: Tensor,
                       window: Histories) -> Tensor:
        """Target attention (B, D) over the recent window, its behaviours embedded as
        ``keys``."""
        return self.short_attn(target, keys, lengths=window.lengths,
                               hist_index=batch.hist_index, hist_rows=window.hist_rows)

    # ------------------------------------------------------------------ backend

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        """Switch the kernel backend of the model and of every fastattn module in it."""
        self._backend = value
        for m in self.modules():
            if m is not self and hasattr(m, "backend"):
                m.backend = value

    @property
    def sparse_embeddings(self) -> bool:
        """Whether the item and category tables get sparse gradients (off by default).

        A dense table gradient is zeroed and written whole every step (64 MB for 1,000,000
        items × 16), and a dense optimiser then updates every row. Sparse, it is an
        uncoalesced COO tensor of the looked-up rows, as ``nn.Embedding(sparse=True)``
        gives: train those two tables with an optimiser that takes sparse gradients (e.g.
        ``torch.optim.SparseAdam``; ``fastattn.train.make_optimizer`` does) and the rest as
        before. The values and the summed gradients are the same. It pays where a step looks
        up few rows of a large table (DIN, SIM); with tens of thousands of distinct rows a
        step (ETA-Net, SDIM) SparseAdam costs more than fused Adam (docs/DESIGN.md)."""
        return bool(getattr(self, "item_emb", None) is not None and self.item_emb.sparse)

    @sparse_embeddings.setter
    def sparse_embeddings(self, value: bool) -> None:
        if getattr(self, "item_emb", None) is None:
            if value:
                raise ValueError(f"{type(self).__name__} has no item/category tables")
            return
        self.item_emb.sparse = self.cat_emb.sparse = bool(value)

    # ------------------------------------------------------------------ checks

    def check_batch(self, batch: Batch) -> Tuple[int, int, int]:
        """Check a batch's types, shapes and id ranges; returns (B, U, L)."""
        if not isinstance(batch, Batch):
            raise TypeError(f"batch must be a fastattn.data.batch.Batch, got "
                            f"{type(batch).__name__}")
        _check_ids("batch.hist_items", batch.hist_items, 2, "(U, L)", self.n_items,
                   "item ids (0 = padding)")
        U, L = batch.hist_items.shape
        _check_ids("batch.hist_cats", batch.hist_cats, 2, "(U, L)", self.n_cats,
                   "category ids (0 = padding)")
        if batch.hist_cats.shape != batch.hist_items.shape:
            raise ValueError(f"batch.hist_cats must have the shape of hist_items (U, L)="
                             f"{(U, L)}, got {tuple(batch.hist_cats.shape)}")
        _check_ids("batch.lengths", batch.lengths, 1, f"(U,)=({U},)")
        if batch.lengths.shape[0] != U or (U and (int(batch.lengths.min()) < 0
                                                  or int(batch.lengths.max()) > L)):
            raise ValueError(f"batch.lengths must be (U,)=({U},) with values in [0, L={L}], "
                             f"got shape {tuple(batch.lengths.shape)}")
        _check_ids("batch.target_item", batch.target_item, 1, "(B,)", self.n_items,
                   "item ids")
        B = batch.target_item.shape[0]
        _check_ids("batch.target_cat", batch.target_cat, 1, f"(B,)=({B},)", self.n_cats,
                   "category ids")
        if batch.target_cat.shape[0] != B:
            raise ValueError(f"batch.target_cat must have shape (B,)=({B},) like target_item, "
                             f"got {tuple(batch.target_cat.shape)}")
        self.check_hist_index(batch.hist_index, B, U, "batch.hist_index")
        if batch.label is not None and (not isinstance(batch.label, Tensor)
                                        or tuple(batch.label.shape) != (B,)):
            raise ValueError(f"batch.label must be None or a tensor of shape (B,)=({B},), got "
                             f"{getattr(batch.label, 'shape', type(batch.label).__name__)}")
        return B, U, L

    @staticmethod
    def check_hist_index(hist_index: Optional[Tensor], B: int, U: int,
                         name: str = "hist_index") -> None:
        if hist_index is None:
            if U not in (B, 1):
                raise ValueError(f"{name} is None, so the number of histories U={U} must equal "
                                 f"the number of candidates B={B} or be 1 (one shared "
                                 "history); pass hist_index (B,) otherwise")
            return
        _check_ids(name, hist_index, 1, f"(B,)=({B},)", U - 1, "history rows")
        if hist_index.shape[0] != B:
            raise ValueError(f"{name} must have shape (B,)=({B},), got "
                             f"{tuple(hist_index.shape)}")

    # ------------------------------------------------------------------ forward / loss

    def logits_and_reg(self, batch: Batch, **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
        """(logits (B,), regulariser or None) of a checked batch; what subclasses define."""
        raise NotImplementedError

    def forward(self, batch: Batch, *, return_reg: bool = False, **kwargs):
        """Logits (B,) for the candidates of ``batch``; with ``return_reg`` also the model's
        regulariser (0-d, already weighted; zero when the model has none)."""
        self.check_batch(batch)
        logits, reg = self.logits_and_reg(batch, **kwargs)
        if not return_reg:
            return logits
        return logits, logits.new_zeros(()) if reg is None else reg

    @staticmethod
    def loss_from(logits: Tensor, reg: Optional[Tensor], label: Optional[Tensor]) -> Tensor:
        """Mean BCE-with-logits of ``logits`` (B,) against ``label`` (B,) plus ``reg``."""
        if label is None:
            raise ValueError("the batch has no label (label=None): a loss needs labels (B,)")
        if tuple(label.shape) != tuple(logits.shape):
            raise ValueError(f"label must have shape (B,)={tuple(logits.shape)}, got "
                             f"{tuple(label.shape)}")
        loss = F.binary_cross_entropy_with_logits(logits, label.to(logits.dtype))
        return loss if reg is None else loss + reg

    def loss(self, batch: Batch, **kwargs) -> Tensor:
        """Mean BCE-with-logits on ``batch.label`` plus the model's regulariser."""
        logits, reg = self(batch, return_reg=True, **kwargs)
        return self.loss_from(logits, reg, batch.label)

    def config(self) -> Dict:
        """JSON-serialisable constructor kwargs, with ``name``: ``build(**config())``."""
        return dict(self._config)

    def extra_repr(self) -> str:
        return f"backend={self._backend!r}"
