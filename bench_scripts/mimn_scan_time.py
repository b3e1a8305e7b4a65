"""Single-thread process_time of the MIMN scan (C++ by default): forward and forward+backward.

    python bench_scripts/mimn_scan_time.py [backend] [reps]

Shapes: the bench sweep's (B=256, T=200/1000, slots=8, reads used) and the training step's
(B=128, T=1000, slots=16, variable lengths of a real training batch, only the final state
used). Prints the median (env MIN=1: the minimum) of `reps` process_time repeats, ms.
"""
import sys, time, statistics, os
import torch
torch.set_num_threads(1)
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
from fastattn.nn import MIMNEncoder

be = sys.argv[1] if len(sys.argv) > 1 else "cpp"
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
which = sys.argv[3].split(",") if len(sys.argv) > 3 else ["b200", "b1000", "train"]


def med(fn, n):
    fn()
    ts = []
    for _ in range(n):
        c = time.process_time(); fn(); ts.append(time.process_time() - c)
    return (min(ts) if os.environ.get("MIN") else statistics.median(ts)) * 1e3


def lengths_train(B=128, T=1000):
    # the lengths of batch 3 of `make train`'s L=1000 run (planted set, seed 0): mean ~450
    return torch.load(os.path.join(os.path.dirname(__file__), "train_lengths.pt"))


cases = {"b200": (256, 200, 8, None, True), "b1000": (256, 1000, 8, None, True),
         "train": (128, 1000, 16, "train", False)}
for name in which:
    B, T, slots, lens, use_reads = cases[name]
    torch.manual_seed(0)
    enc = MIMNEncoder(32, 32, slots, 32, 32, mur=True, miu_k=1, backend=be)
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(T))
    L = lengths_train(B, T) if lens else None
    xg = x.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            enc(x, L)

    def fwd_bwd():
        reads, st = enc(xg, L)
        loss = (reads.sum() if use_reads else 0) + st.h.sum() + st.M.sum() + st.S.sum() \
            + enc.reg_loss(st)
        loss.backward()

    f = med(fwd, reps)
    fb = med(fwd_bwd, max(3, reps // 2))
    print(f"{be} {name}: B={B} T={T} slots={slots}: fwd {f:.1f} ms  fwd+bwd {fb:.1f} ms  "
          f"bwd {fb - f:.1f} ms  ({f / (B * T) * 1e6:.0f} ns/row-step fwd)", flush=True)
