"""Subprocess of the SUM serving tests: refreshes user embeddings until killed.

    python sum_crash_worker.py KIND WHERE PREFIX N_USERS BATCH

Generation g = 1, 2, ...: every batch of BATCH users is refreshed (one compare-and-set
write per batch) with a model whose embeddings are all g; prints "g b" after batch b of
generation g commits. KIND is sqlite (WHERE a path) or redis (WHERE a URL, PREFIX the key
prefix).
"""
from __future__ import annotations

import sys
import time

import torch

from fastattn.serving import (EmbeddingSpec, RedisStateStore, SQLiteStateStore,
                              UserEmbeddingService)

SPEC = EmbeddingSpec({"name": "sum-crash-test"}, K=2, D=96)


class Constant(torch.nn.Module):
    """(B, K, D) filled with ``value``: a refresh's generation, readable in every record."""

    def __init__(self):
        super().__init__()
        self.value = 0.0

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return torch.full((users.shape[0], SPEC.K, SPEC.D), self.value)


class SlowConstant(torch.nn.Module):
    """(B, K, D) filled with ``value`` after ``ms`` milliseconds: a picklable model for the
    process-worker tests (a worker can be killed while it runs)."""

    def __init__(self, value: float, ms: float = 0.0):
        super().__init__()
        self.value, self.ms = value, ms

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        time.sleep(self.ms / 1e3)
        return torch.full((users.shape[0], SPEC.K, SPEC.D), self.value)


def user_tensor(users):
    """The features of the test models: the user ids as a tensor (picklable)."""
    return (torch.tensor(users),)


def open_store(kind: str, where: str, prefix: str):
    if kind == "sqlite":
        return SQLiteStateStore(where, SPEC)
    return RedisStateStore(where, SPEC, prefix=prefix)


def main(argv) -> None:
    kind, where, prefix, n, batch = argv[:5]
    model = Constant()
    svc = UserEmbeddingService(model, open_store(kind, where, prefix),
                               user_tensor, workers=1)
    users = list(range(int(n)))
    g = 0
    while True:
        g += 1
        model.value = float(g)
        for b in range(0, len(users), int(batch)):
            svc.refresh_now(users[b:b + int(batch)])
            print(g, b, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
