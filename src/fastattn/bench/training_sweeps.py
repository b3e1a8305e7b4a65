"""The training sweeps: what users feel first, a training step over long histories.

Setting: the training layout (one history per row) with a realistic vocabulary, every
behaviour drawn Zipf(s=1.1) from 1,000,000 items, so that a batch's B·L behaviours hold far
fewer distinct items N. Each point records N and the distinct-row ratio N / (B·L).

* ``eta_training``: ETA forward + backward in its indexed form against what users run
  today (an embedding gather to (B, L, D), SDPA forward + backward and the embedding
  backward). ``indexed``: dedup with :func:`fastattn.unique_rows`, the signatures of the N
  distinct rows read straight from the embedding (``simhash_sign(..., rows=)``), the top-k
  over ``hist_rows``, then the embedding lookup of the B·k winners only and exact attention
  over them, so the backward touches B·k rows. ``table``: the N distinct rows looked up
  into a table and ``eta_attention(..., hist_rows=...)`` on it, whose backward writes the
  (N, D) table gradient.
* ``unique_rows``: the dedup itself against ``torch.unique(return_inverse=True)``.
* ``model_training``: samples/s of a training step (forward + backward) of each reference
  model that reads long histories, deduplicated (the default) vs dense.
* ``model_optimizer``: the same step with its optimiser step, the item and category
  tables' gradients dense (Adam) vs sparse (SparseAdam).
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np
import torch
import torch.nn.functional as F

import fastattn

from .sweep import F32, I64, Cost, Point, Sweep, backends_for, torch_skip

__all__ = ["zipf_ids", "TRAINING_SWEEPS"]

N_ITEMS, ZIPF_S, B = 1_000_000, 1.1, 256


def zipf_ids(n_items: int, shape, s: float = ZIPF_S, seed: int = 0) -> torch.Tensor:
    """int64 ids in [0, n_items), popularity ∝ rank^-s, the ranks a random permutation of
    the ids (so an id says nothing about its popularity). Deterministic by ``seed``."""
    g = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -s)
    ranks = np.searchsorted(cdf / cdf[-1], g.random(int(np.prod(shape))), side="right")
    ids = g.permutation(n_items)[np.minimum(ranks, n_items - 1)]
    return torch.from_numpy(ids.reshape(shape))


def _record_distinct(params: Dict[str, float], ids: torch.Tensor) -> None:
    """Add the batch's distinct-id count and ratio to the point's params (the rows and the
    README read them; they are only known once the data exists)."""
    n = int(torch.unique(ids).numel())
    params.update(distinct_rows=n, distinct_ratio=round(n / ids.numel(), 4))


# --------------------------------------------------------------------------- eta_training

ETA_D, ETA_NB, ETA_K = 128, 256, 64


def _eta_training_cost(p: Dict[str, int], impl: str) -> Cost:
    """Dense (users' path): the (B, L, D) gather written, read by the SDPA forward and again
    by its backward, its gradient written and read by the embedding backward; 12·B·L·D
    flops. Indexed: ids read and hist_rows written and read, the N distinct rows read and
    hashed (2·N·D·NB flops), their signatures scanned (B·L·W popcounts), attention over
    B·k rows. Table: as indexed plus the (N, D) table written, read, and its gradient
    written and added into the embedding."""
    L, D, W, K = p["L"], ETA_D, ETA_NB // 64, ETA_K
    if impl == "dense_sdpa":
        return Cost(bytes=5 * F32 * B * L * D + I64 * B * L, flops=12 * B * L * D)
    N = p.get("distinct_rows", B * L)
    attention = 12 * B * K * D
    if impl.startswith("dense_eta"):        # ETA on the dense gather: every position hashed
        return Cost(bytes=5 * F32 * B * L * D + I64 * (1 + W) * B * L, popcounts=B * L * W,
                    flops=2 * B * L * D * ETA_NB + attention)
    table = 4 * F32 * N * D if impl.startswith("table") else 0
    return Cost(bytes=3 * I64 * B * L + F32 * N * D + I64 * W * N + table + 5 * F32 * B * K * D,
                popcounts=B * L * W, flops=2 * N * D * ETA_NB + attention)


def eta_training_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """ETA forward+backward in the training layout with a 1M-item vocabulary: the indexed
    path (dedup, signatures of the distinct rows, attention over the retrieved rows) vs the
    dense users' path."""
    D, K = ETA_D, ETA_K
    lengths = [4096] if quick else [1024, 4096, 16384]
    sweep = Sweep("eta_training", f"ETA forward+backward, training layout, B={B}, D={D}, "
                  f"{ETA_NB} bits, k={K}, histories Zipf({ZIPF_S}) over {N_ITEMS:,} items, "
                  "embedding backward (sparse gradients) included", x="L", baseline="dense_sdpa", memory=True,
                  cost=_eta_training_cost, device=device,
                  info=["distinct_rows", "distinct_ratio"])

    def build(L: int, params: Dict[str, float]):
        def make() -> Dict[str, Callable[[], object]]:
            ids = zipf_ids(N_ITEMS, (B, L), seed=L).to(device)
            _record_distinct(params, ids)
            g = torch.Generator().manual_seed(L)
            # Sparse gradients, as 1M-item vocabularies train (SparseAdam, row-wise Adagrad):
            # a dense one would add the same 512 MB table gradient to both paths.
            emb = torch.nn.Embedding(N_ITEMS, D, sparse=True).to(device)
            planes = fastattn.make_planes(D, ETA_NB, g).to(device)
            q = torch.randn(B, D, generator=g).to(device).requires_grad_()
            slot = torch.arange(K, device=device).expand(B, K)

            def step(loss: Callable[[], torch.Tensor]) -> torch.Tensor:
                emb.weight.grad = q.grad = None
                loss().backward()
                return q.grad                  # (the tests compare the impls by it)

            def dense_sdpa():                  # what users run today
                k = emb(ids).view(B, 1, L, D)
                return F.scaled_dot_product_attention(q.view(B, 1, 1, D), k, k).sum()

            def indexed(be: str):
                uniq, rows = fastattn.unique_rows(ids, backend=be)
                k_sig = fastattn.simhash_sign(emb.weight, planes, rows=uniq, backend=be)
                q_sig = fastattn.simhash_sign(q, planes, backend=be)
                _, idx = fastattn.hamming_topk(q_sig, k_sig, K, hist_rows=rows, backend=be)
                keys = emb(ids.gather(1, idx.clamp(min=0)))             # (B, k, D) winners
                return fastattn.topk_attention(q, keys, keys, slot.masked_fill(idx < 0, -1),
                                               backend=be).sum()

            def table(be: str):
                uniq, rows = fastattn.unique_rows(ids, backend=be)
                distinct = emb(uniq)                                    # (N, D)
                k_sig = fastattn.simhash_sign(distinct, planes, backend=be)
                q_sig = fastattn.simhash_sign(q, planes, backend=be)
                return fastattn.eta_attention(q, distinct, distinct, q_sig, k_sig, K,
                                              hist_rows=rows, backend=be).sum()

            def dense_eta(be: str):            # ETA on the (B, L, D) gather: every position
                keys = emb(ids)
                k_sig = fastattn.simhash_sign(keys, planes, backend=be)
                q_sig = fastattn.simhash_sign(q, planes, backend=be)
                return fastattn.eta_attention(q, keys, keys, q_sig, k_sig, K,
                                              backend=be).sum()

            impls = {"dense_sdpa": lambda: step(dense_sdpa)}
            bes = backends_for(device)
            impls.update({f"indexed_{be}": (lambda be=be: step(lambda: indexed(be)))
                          for be in bes})
            impls[f"table_{bes[0]}"] = lambda: step(lambda: table(bes[0]))
            impls[f"dense_eta_{bes[0]}"] = lambda: step(lambda: dense_eta(bes[0]))
            return impls
        return make

    for L in lengths:
        params: Dict[str, float] = {"L": L, "B": B}
        # the embedding and its gradient, the dense path's (B, L, D) gather, its gradient and
        # SDPA's copies of them (measured: about 8 GB at L = 16384)
        sweep.points.append(Point(params, build(L, params), pairs=B * L,
                                  mem_bytes=2 * F32 * N_ITEMS * D + 5 * F32 * B * L * D,
                                  skip={f"indexed_{k}": why for k, why in
                                        torch_skip(device, L, 1024).items()}))
    return sweep


# --------------------------------------------------------------------------- unique_rows

def unique_rows_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """unique_rows (first-occurrence order, hist_rows with padding) vs torch.unique with
    return_inverse, on B·L Zipf ids."""
    lengths = [16384] if quick else [1024, 4096, 16384]

    def cost(p: Dict[str, int], impl: str) -> Cost:
        """Read the ids, write hist_rows (or the inverse) and the distinct ids."""
        n = B * p["L"]
        return Cost(bytes=2 * I64 * n + I64 * p.get("distinct_rows", n))

    sweep = Sweep("unique_rows", f"unique_rows of B={B} histories, Zipf({ZIPF_S}) over "
                  f"{N_ITEMS:,} items, vs torch.unique(return_inverse=True)", x="L",
                  baseline="torch_unique", cost=cost, device=device,
                  info=["distinct_rows", "distinct_ratio"])

    def build(L: int, params: Dict[str, float]):
        def make() -> Dict[str, Callable[[], object]]:
            ids = zipf_ids(N_ITEMS, (B, L), seed=L).to(device)
            _record_distinct(params, ids)
            impls = {be: (lambda be=be: fastattn.unique_rows(ids, backend=be))
                     for be in backends_for(device)}
            impls["torch_unique"] = lambda: torch.unique(ids, sorted=True, return_inverse=True)
            return impls
        return make

    for L in lengths:
        params: Dict[str, float] = {"L": L, "B": B}
        sweep.points.append(Point(params, build(L, params), pairs=B * L,
                                  mem_bytes=8 * I64 * B * L))
    return sweep


# --------------------------------------------------------------------------- model_training

MODEL_NAMES = ("din", "eta", "sim", "sdim")
N_CATS, EMBED_DIM = 1000, 16


def _model_batch(L: int, params: Dict[str, float], device: str):
    """The model sweeps' batch: B histories of L behaviours Zipf over N_ITEMS items (id 0 is
    padding), each item's category its id mod N_CATS, and a target per row."""
    from ..data.batch import Batch
    items = zipf_ids(N_ITEMS, (B, L + 1), seed=L) + 1
    _record_distinct(params, items[:, :L])
    cats = items % N_CATS + 1
    g = torch.Generator().manual_seed(L)
    return Batch(items[:, :L], cats[:, :L], torch.full((B,), L), items[:, L], cats[:, L],
                 torch.randint(0, 2, (B,), generator=g).float()).to(device)


def _models_sweep(name: str, title: str, versus: str, lengths, device: str,
                  impls_of: Callable[[str, object], Dict[str, Callable[[], object]]],
                  table_copies: int) -> Sweep:
    """A sweep over L of every model of MODEL_NAMES on :func:`_model_batch`.
    ``impls_of(model name, batch)`` gives that model's impls, named ``<model>_<form>``,
    each with a ``.model`` attribute (the model it steps); speed-ups are against
    ``<model>_dense``. ``table_copies``: (N_ITEMS, EMBED_DIM) tensors held per model name
    (the tables, gradients and optimiser moments of all its forms), for the memory
    estimate."""
    sweep = Sweep(name, f"{title} of B={B} samples, histories Zipf({ZIPF_S}) over "
                  f"{N_ITEMS:,} items, embed_dim={EMBED_DIM}: {versus}", x="L",
                  baseline="eta_dense",
                  baseline_of=lambda impl: impl.rsplit("_", 1)[0] + "_dense", memory=True,
                  device=device, rate="samples/s", info=["distinct_rows", "distinct_ratio"])

    def build(L: int, params: Dict[str, float]):
        def make() -> Dict[str, Callable[[], object]]:
            batch = _model_batch(L, params, device)
            impls: Dict[str, Callable[[], object]] = {}
            for model_name in MODEL_NAMES:
                impls.update(impls_of(model_name, batch))
            return impls
        return make

    for L in lengths:
        params: Dict[str, float] = {"L": L, "B": B}
        # the tables per model and form; the dense paths' (B, L, ·) activations
        sweep.points.append(Point(params, build(L, params), pairs=B,
                                  mem_bytes=len(MODEL_NAMES) * table_copies * F32 * N_ITEMS
                                  * EMBED_DIM + 24 * F32 * B * L * 2 * EMBED_DIM))
    return sweep


def _new_model(name: str, device: str):
    from ..models import build as build_model
    torch.manual_seed(0)
    return build_model(name, N_ITEMS, N_CATS, embed_dim=EMBED_DIM).to(device)


def model_training_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """A training step (forward + backward) of each model that reads long histories, with
    each distinct behaviour of the batch embedded, projected and hashed once (``dedup``,
    the default) vs every position (dense); ``sparse``: dedup with sparse gradients for the
    item and category tables (``CTRModel.sparse_embeddings``; the optimiser step is
    :func:`model_optimizer_sweep`'s). MIMN reads the dense sequence (no dedup form)."""
    def impls_of(name: str, batch) -> Dict[str, Callable[[], object]]:
        model = _new_model(name, device)

        def step(dedup: bool = True, sparse: bool = False) -> None:
            model.dedup, model.sparse_embeddings = dedup, sparse
            model.zero_grad(set_to_none=True)
            model.loss(batch).backward()
        impls = {f"{name}_dedup": step, f"{name}_dense": lambda: step(dedup=False),
                 f"{name}_sparse": lambda: step(sparse=True)}
        for fn in impls.values():
            fn.model = model
        return impls
    return _models_sweep("model_training", "training step (forward + backward)",
                         "deduplicated (and with sparse table gradients) vs dense",
                         [1000] if quick else [1000, 4000, 16000], device, impls_of,
                         table_copies=2)


def model_optimizer_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """A whole training step, the optimiser's included (``fastattn.train.make_optimizer``),
    of each model with the item and category tables' gradients dense (Adam over every
    parameter: it reads and writes all N_ITEMS rows and their two moments every step) vs
    sparse (``CTRModel.sparse_embeddings``: SparseAdam over the rows a step looked up, Adam
    for the rest). Both deduplicate the histories."""
    from ..train import make_optimizer

    def impls_of(name: str, batch) -> Dict[str, Callable[[], object]]:
        impls = {}
        for grads in ("dense", "sparse"):
            model = _new_model(name, device)
            model.sparse_embeddings = grads == "sparse"
            opt = make_optimizer(model, 1e-3)

            def step(model=model, opt=opt) -> None:
                opt.zero_grad(set_to_none=True)
                model.loss(batch).backward()
                opt.step()
            step.model = model
            impls[f"{name}_{grads}"] = step
        return impls
    return _models_sweep("model_optimizer", "training step with its optimiser step (Adam; "
                         "SparseAdam for sparse tables)", "dense vs sparse table gradients",
                         [1000] if quick else [1000, 4000], device, impls_of, table_copies=8)


TRAINING_SWEEPS: Dict[str, Callable[..., Sweep]] = {
    "eta_training": eta_training_sweep,
    "unique_rows": unique_rows_sweep,
    "model_training": model_training_sweep,
    "model_optimizer": model_optimizer_sweep,
}
