"""In-process A/B of builds of fastattn._C on the MIMN scan: the builds' calls alternate, so
both see the same machine load. python ab_inproc.py A.so B.so [cases] [rounds]
Prints min and median process_time (ms, 1 thread) per build and the B/A ratio of medians."""
import sys, time, statistics, os, shutil, importlib.machinery, importlib.util
import torch
torch.set_num_threads(1)
import fastattn.ops._common as common
from fastattn.nn import MIMNEncoder

mods = []
for i, p in enumerate(sys.argv[1:3]):
    q = f"/tmp/wt13_abmod_{os.getpid()}_{i}.so"
    shutil.copy(p, q)
    loader = importlib.machinery.ExtensionFileLoader("fastattn._C", q)
    spec = importlib.util.spec_from_file_location("fastattn._C", q, loader=loader)
    mod = importlib.util.module_from_spec(spec); loader.exec_module(mod); mods.append(mod)
cases = sys.argv[3].split(",") if len(sys.argv) > 3 else ["b200", "train"]
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 8
orig = common.kernels
cur = [None]
common.kernels = lambda name: cur[0] if name == "cpp" else orig(name)
L = torch.load(os.path.join(os.path.dirname(__file__), "train_lengths.pt"))
spec = {"b200": (256, 200, 8, None), "b1000": (256, 1000, 8, None), "train": (128, 1000, 16, L)}
for c in cases:
    B, T, m, lens = spec[c]
    torch.manual_seed(0)
    enc = MIMNEncoder(32, 32, m, 32, 32, mur=True, miu_k=1, backend="cpp")
    x = torch.randn(B, T, 32)
    xg = x.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            enc(x, lens)

    def fb():
        r, st = enc(xg, lens)
        (st.h.sum() + st.M.sum() + st.S.sum() + enc.reg_loss(st) + (r.sum() if lens is None else 0)).backward()

    for name, fn in (("fwd", fwd), ("fwd+bwd", fb)):
        ts = [[], []]
        for r in range(rounds + 1):
            for i in (0, 1) if r % 2 else (1, 0):
                cur[0] = mods[i]
                t = time.process_time(); fn(); d = time.process_time() - t
                if r: ts[i].append(d * 1e3)
        mA, mB = statistics.median(ts[0]), statistics.median(ts[1])
        print(f"{c} {name}: A min {min(ts[0]):.1f} med {mA:.1f} | B min {min(ts[1]):.1f} "
              f"med {mB:.1f} | B/A med {mB / mA:.3f} min {min(ts[1]) / min(ts[0]):.3f}", flush=True)
