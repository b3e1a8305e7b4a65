"""Run under ``torchrun --nproc_per_node=2``: one DistributedDataParallel training step of
every reference model on this rank's half of a batch, compared on rank 0 with one
single-process step on the full batch. Writes {model: max |difference|} to argv[1]."""
from __future__ import annotations

import copy
import gc
import json
import sys

import torch
import torch.distributed as dist

from fastattn.data import make_synthetic
from fastattn.models import MODELS, build
from fastattn.train import LossOf, setup_distributed, shard, train_step

# Small enough that retrieval (ETA top-k, SIM) really selects, not all of the history.
KWARGS = {"din": {"short_len": 8}, "eta": {"topk": 4, "short_len": 8},
          "sim": {"sim_len": 4, "short_len": 8}, "sdim": {"short_len": 8},
          "mimn": {}}


def main(out: str) -> None:
    rank, world = setup_distributed()
    torch.set_default_dtype(torch.float64)
    data = make_synthetic(n_users=12, n_items=60, n_cats=6, min_len=3, max_len=40, seed=1)
    batch = next(data.batches(8, max_len=40, shuffle=True, seed=3))  # several users
    diffs = {}
    for name in MODELS:
        torch.manual_seed(0)
        model = build(name, data.n_items, data.n_cats, embed_dim=4, mlp=(8, 4),
                      **KWARGS.get(name, {}))
        ref = copy.deepcopy(model)
        lr = 0.1
        ddp = torch.nn.parallel.DistributedDataParallel(LossOf(model))
        train_step(ddp, torch.optim.SGD(model.parameters(), lr=lr), shard(batch, rank, world))

        LossOf(ref)(batch).backward()          # the full batch, one process
        diff = 0.0
        for (pn, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert (p.grad is None) == (q.grad is None), pn
            if q.grad is not None:
                diff = max(diff, float((p.grad - q.grad).abs().max()),
                           float((p.detach() - (q.detach() - lr * q.grad)).abs().max()))
        diffs[name] = diff
        # The DDP reducer holds the process group: let it go while the group is still
        # registered. Destroyed after destroy_process_group, it would drop the group's last
        # reference while holding the GIL, and gloo's worker thread, which needs the GIL to
        # free a finished work, deadlocks the join (a torch race; it hung ~1 run in 5).
        del ddp
        gc.collect()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "diffs": diffs}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
