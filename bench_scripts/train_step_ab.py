"""In-process A/B of two builds of fastattn._C on MIMN's training step at L=1000 (make train's
first command: planted set, batch 3 of 128, model defaults): the builds' steps alternate on
the same batch, so both see the same machine load.

    python bench_scripts/train_step_ab.py A.so B.so THREADS [rounds]

Prints per build the min and median step (wall and process_time) and samples/s at the min."""
import importlib.machinery, importlib.util, os, shutil, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
import fastattn.ops._common as common
from fastattn.data import make_synthetic
from fastattn.models import build
from fastattn.train import LossOf, make_optimizer, train_step

mods = []
for i, p in enumerate(sys.argv[1:3]):
    q = f"/tmp/fastattn_ab_{os.getpid()}_{i}.so"
    shutil.copy(p, q)
    loader = importlib.machinery.ExtensionFileLoader("fastattn._C", q)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
        "fastattn._C", q, loader=loader))
    loader.exec_module(mod)
    mods.append(mod)
orig = common.kernels
cur = [mods[0]]
common.kernels = lambda name: cur[0] if name == "cpp" else orig(name)
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 6
data = make_synthetic(n_users=2000, n_items=2000, n_cats=100, candidates_per_user=16,
                      max_len=2000)
train, _ = data.split(0.2, seed=0)
torch.manual_seed(0)
model = build("mimn", train.n_items, train.n_cats, embed_dim=16)
opt = make_optimizer(model, 3e-3)
w = LossOf(model)
batch = list(train.batches(128, max_len=1000, shuffle=True, seed=0))[3]
wall, cpu = [[], []], [[], []]
for r in range(rounds + 1):
    for i in ((0, 1) if r % 2 else (1, 0)):
        cur[0] = mods[i]
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(w, opt, batch)
        if r:
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
for i, name in enumerate(("A", "B")):
    print(f"{name} {os.path.basename(sys.argv[1 + i])} threads={sys.argv[3]}: wall min "
          f"{min(wall[i]) * 1e3:.1f} med {statistics.median(wall[i]) * 1e3:.1f} ms "
          f"({len(batch) / min(wall[i]):.0f} samples/s at the min), cpu min "
          f"{min(cpu[i]) * 1e3:.1f} med {statistics.median(cpu[i]) * 1e3:.1f} ms")
print(f"B/A wall med {statistics.median(wall[1]) / statistics.median(wall[0]):.3f}, cpu med "
      f"{statistics.median(cpu[1]) / statistics.median(cpu[0]):.3f}")
