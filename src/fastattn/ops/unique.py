"""Deduplicate a batch's behaviours: the indexed form of histories (a table plus hist_rows).

A batch of U histories of L behaviours holds far fewer distinct behaviours N than U·L.
``unique_rows`` finds them, so that a model embeds, projects and hashes each distinct
behaviour once (a table of N rows) and the ops read histories through ``hist_rows``
(the "atomic behaviour encoding" of BAHE).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference as ref
from ._common import (INDEX_DTYPES, backend_for, check_lengths, check_same_device,
                      check_tensor, checked_lengths, cpu_call)

__all__ = ["unique_rows"]


@torch.library.custom_op("fastattn::unique_rows", mutates_args=())
def _unique_rows(ids: Tensor, lengths: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    U, L = ids.shape
    lens = checked_lengths(lengths, U, L, ids.device)
    if backend in ("torch", "triton"):
        # No Triton kernel: CUDA tensors take the sort-based torch path (torch.unique).
        return ref.unique_rows(ids, lens)
    rows = torch.empty(U, L, dtype=torch.int64)
    uniq = cpu_call(backend, "unique_rows", ids.to(torch.int64).contiguous(), lens, rows)
    return torch.from_numpy(uniq).to(ids.dtype), rows


@_unique_rows.register_fake
def _(ids, lengths, backend):
    n = torch.library.get_ctx().new_dynamic_size()
    return ids.new_empty(n), ids.new_empty(ids.shape, dtype=torch.int64)


def unique_rows(ids: Tensor, lengths: Optional[Tensor] = None, *,
                backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """The distinct behaviours of a batch of histories, and where each position finds its own.

    Args:
        ids: (U, L) int32/int64 behaviour ids (any values; combine several id columns into
            one key first, e.g. ``item * (n_cats + 1) + cat``).
        lengths: (U,) int valid length of each history in [0, L] (default L); positions
            past it are padding and get no row.

    Returns:
        ``(unique_ids (N,), hist_rows (U, L) int64)``: the distinct ids at valid positions in
        order of first occurrence (row-major, so the result is deterministic and the same in
        every backend), and the row of each valid position's id in ``unique_ids``; -1 at
        positions past the length. ``unique_ids[hist_rows[u, l]] == ids[u, l]`` for every
        valid position. Build a table of N rows from ``unique_ids`` (an embedding lookup,
        then projections and signatures) and pass it with ``hist_rows`` to the ops.

    Backends: C++ (a parallel hash partition, no sort) and numba (a hash table); the torch
    reference, which CUDA tensors also use, sorts (``torch.unique``).
    """
    check_tensor("ids", ids, dtypes=INDEX_DTYPES, ndim=2, what=" and shape (U, L)")
    check_lengths(lengths, ids.shape[0])
    dev = check_same_device(ids=ids, lengths=lengths)
    return torch.ops.fastattn.unique_rows(ids, lengths, backend_for(dev, backend))
