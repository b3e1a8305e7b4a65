"""CTR data: behaviour logs (CTRDataset), synthetic long-history data, CSV logs, metrics.

    from fastattn.data import make_synthetic
    train, test = make_synthetic(n_users=500).split(0.2)
    for batch in train.batches(256, max_len=1000, shuffle=True):   # fastattn.data.Batch
        ...
"""
from __future__ import annotations

from .batch import Batch, recent
from .dataset import CTRDataset
from .loader import load_csv, save_csv
from .edgerec import EdgeRecBatch, EdgeRecConfig, EdgeRecData, make_edgerec
from .metrics import auc, gauc, log_loss, ndcg
from .synthetic import VARIANTS, SyntheticConfig, make_synthetic

__all__ = ["Batch", "recent", "CTRDataset", "SyntheticConfig", "make_synthetic", "VARIANTS",
           "load_csv", "save_csv", "auc", "gauc", "ndcg", "log_loss", "EdgeRecConfig",
           "EdgeRecData", "EdgeRecBatch", "make_edgerec"]
