"""The numba MIMN scan now vs the numba kernel before tiling (kernels/numba/mimn.py at commit
4672fbd, loaded from git as a separate module), single-threaded: torch and numba at 1 thread,
process_time, the builds' calls alternating (both see the same machine load), median of
repeats. B=64, T=200, the mimn sweep's sizes (x_dim=D=32, ctrl=miu=32, MUR, miu_k=1) at
slots=8 (the sweep) and 16 (the model default).

    NUMBA_NUM_THREADS=1 python bench_scripts/numba_mimn_vs_4672fbd.py [repeats]
"""
import importlib.util, os, statistics, subprocess, sys, time
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
import torch
torch.set_num_threads(1)
import numba
numba.set_num_threads(1)
import fastattn.ops._common as common
from fastattn.nn import MIMNEncoder

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
old_dir = "/tmp/fastattn_numba_mimn_4672fbd"
os.makedirs(old_dir, exist_ok=True)
old_path = os.path.join(old_dir, "mimn_4672fbd.py")
with open(old_path, "w") as f:
    f.write(subprocess.check_output(["git", "-C", root, "show", "4672fbd:kernels/numba/mimn.py"],
                                    text=True))
spec = importlib.util.spec_from_file_location("mimn_4672fbd", old_path)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
new = common.kernels("numba")
orig = common.kernels
cur = [new]
common.kernels = lambda name: cur[0] if name == "numba" else orig(name)
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 7
B, T = 64, 200
for slots in (8, 16):
    torch.manual_seed(0)
    enc = MIMNEncoder(32, 32, slots, 32, 32, mur=True, miu_k=1, backend="numba")
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(T))
    xg = x.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            enc(x)

    def fwd_bwd():
        reads, st = enc(xg)
        (reads.sum() + enc.reg_loss(st)).backward()

    for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        ts = {"4672fbd": [], "now": []}
        for r in range(reps + 1):               # round 0 compiles / warms both
            for key, mod in ((("4672fbd", old), ("now", new)) if r % 2 else
                             (("now", new), ("4672fbd", old))):
                cur[0] = mod
                t = time.process_time(); fn(); d = time.process_time() - t
                if r:
                    ts[key].append(d * 1e3)
        a, b = statistics.median(ts["4672fbd"]), statistics.median(ts["now"])
        print(f"numba slots={slots} B={B} T={T} {name}: 4672fbd {a:.1f} ms, now {b:.1f} ms "
              f"-> {a / b:.2f}x (medians of {reps}; min {min(ts['4672fbd']):.1f} / "
              f"{min(ts['now']):.1f} ms)", flush=True)
