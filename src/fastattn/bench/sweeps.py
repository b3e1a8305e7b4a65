"""The kernel sweeps: each compares fastattn backends with baselines at every point, in one
run, so every figure is a ratio measured on the same machine at the same moment.

Every sweep function takes ``(quick, device="cpu")`` and builds the same comparison on
either device: on ``cuda`` the fastattn implementation is the Triton backend and the
baselines run on the GPU too (FAISS is CPU-only and is left out there). Add a sweep by
writing one such function and listing it in :data:`KERNEL_SWEEPS` (the registry,
:mod:`.registry`, collects it); the byte models are explained in :mod:`.sweep`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops.mimn import bind_step

from .sweep import F32, I32, I64, Cost, Point, Sweep, backends_for, torch_skip
LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 100000]
QUICK_LENGTHS = [256, 4096, 65536]


def _sigs(n: int, words: int, g: torch.Generator, device: str = "cpu") -> torch.Tensor:
    return torch.randint(-2**63, 2**63 - 1, (n, words), dtype=torch.int64,
                         generator=g).to(device)


def faiss_search(q_sig: torch.Tensor, k_sig: torch.Tensor, k: int):
    """FAISS ``IndexBinaryFlat`` over the signatures k_sig (L, W), at torch's thread count:
    a callable searching the k nearest for q_sig (B, W), or None without faiss-cpu."""
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexBinaryFlat(k_sig.shape[1] * 64)
    index.add(k_sig.numpy().view("uint8"))
    qb = q_sig.numpy().view("uint8")
    return lambda: index.search(qb, k)


def _dense_cost(B: int, L: int, D: int) -> Cost:
    """Dense attention of B queries over one shared history: read q, keys, values once,
    write the output; q·kᵀ and p·v are 2·B·L·D flops each."""
    return Cost(bytes=F32 * (2 * B * D + 2 * L * D), flops=4 * B * L * D)


# --------------------------------------------------------------------------- hamming_topk

def hamming_topk_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """hamming_topk (B=1024, 256 bits, k=64, one shared history) vs FAISS IndexBinaryFlat and
    vs the dense target attention it replaces."""
    B, NB, K, D = 1024, 256, 64, 128
    W = NB // 64
    lengths = QUICK_LENGTHS if quick else LENGTHS
    torch_max = 4096 if quick else 16384

    def cost(p: Dict[str, int], impl: str) -> Cost:
        """Retrieval reads both signature sets once and writes dist (int32) and idx (int64);
        it XOR+popcounts B·L·W words. The dense baseline is :func:`_dense_cost`."""
        if impl == "dense_sdpa":
            return _dense_cost(B, p["L"], D)
        return Cost(bytes=I64 * W * (B + p["L"]) + B * K * (I32 + I64),
                    popcounts=B * p["L"] * W)

    sweep = Sweep("hamming_topk", f"hamming_topk, B={B}, {NB} bits, k={K}, shared history",
                  x="L", baseline="faiss" if device == "cpu" else "torch", cost=cost,
                  roofline=True, device=device)

    def build(L: int):
        def make():
            g = torch.Generator().manual_seed(L)
            q, k = _sigs(B, W, g, device), _sigs(L, W, g, device).unsqueeze(0)
            impls = {be: (lambda be=be: fastattn.hamming_topk(q, k, K, backend=be))
                     for be in backends_for(device)}
            search = faiss_search(q, k[0], K) if device == "cpu" else None
            if search is not None:
                impls["faiss"] = search
            qf = torch.randn(1, 1, B, D, generator=g).to(device)
            kf, vf = (torch.randn(1, 1, L, D, generator=g).to(device) for _ in range(2))
            impls["dense_sdpa"] = lambda: F.scaled_dot_product_attention(qf, kf, vf)
            return impls
        return make

    # The oracle's (B, L) int64 distances and (64, L, W) chunk temporaries dominate.
    sweep.points = [Point({"L": L, "B": B}, build(L), pairs=B * L,
                          mem_bytes=F32 * D * (B + 2 * L) + 4 * I64 * B * L,
                          skip=torch_skip(device, L, torch_max)) for L in lengths]
    return sweep


# --------------------------------------------------------------------------- simhash_sign

def simhash_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """simhash_sign vs the bare torch matmul it contains (x @ planes)."""
    D, NB = 128, 256
    W = NB // 64
    sizes = [65536] if quick else [4096, 16384, 65536, 262144]

    def cost(p: Dict[str, int], impl: str) -> Cost:
        """Read x and the planes, write the packed signatures (the bare matmul writes its
        (N, NB) fp32 projections instead); 2·N·D·NB flops either way."""
        N = p["N"]
        out = F32 * N * NB if impl == "torch_matmul" else I64 * N * W
        return Cost(bytes=F32 * (N * D + D * NB) + out, flops=2 * N * D * NB)

    # On CPUs with AMX-BF16 the C++ fp32 path signs on bf16 tiles (DESIGN §7), so its % of
    # the fp32 GEMM bound may pass 100%; the planes here are not bf16-exact (three products).
    sweep = Sweep("simhash_sign", f"simhash_sign, D={D} -> {NB} bits (C++ fp32: AMX-BF16 "
                  "tiles where present)", x="N",
                  baseline="torch_matmul", cost=cost, device=device)

    def build(N: int):
        def make():
            g = torch.Generator().manual_seed(N)
            x = torch.randn(N, D, generator=g).to(device)
            planes = torch.randn(D, NB, generator=g).to(device)
            impls = {be: (lambda be=be: fastattn.simhash_sign(x, planes, backend=be))
                     for be in backends_for(device)}
            impls["torch_matmul"] = lambda: torch.mm(x, planes)
            return impls
        return make

    sweep.points = [Point({"N": N}, build(N), pairs=N, mem_bytes=4 * F32 * N * (D + NB))
                    for N in sizes]
    return sweep


# --------------------------------------------------------------------------- eta_attention

def eta_inputs(B: int, U: int, L: int, D: int, NB: int, g: torch.Generator,
               requires_grad: bool = False, device: str = "cpu"):
    """q (B, D), keys and values (U, L, D) fp32 on ``device``, and their signatures."""
    q = torch.randn(B, D, generator=g).to(device)
    keys = torch.randn(U, L, D, generator=g).to(device)
    values = torch.randn(U, L, D, generator=g).to(device)
    planes = fastattn.make_planes(D, NB, g).to(device)
    q_sig, k_sig = fastattn.simhash_sign(q, planes), fastattn.simhash_sign(keys, planes)
    if requires_grad:
        for t in (q, keys, values):
            t.requires_grad_()
    return q, keys, values, q_sig, k_sig


def _distinct_rows(L: int, picks: int) -> float:
    """Expected distinct rows among ``picks`` uniform draws from L: how many key/value rows
    B queries' top-k selections touch in a shared history of random data."""
    if L <= 1:
        return float(min(L, picks))
    return -L * math.expm1(picks * math.log1p(-1.0 / L))   # L·(1 − (1 − 1/L)^picks)


ETA_D, ETA_NB, ETA_K = 128, 256, 64


def _eta_serving_cost(p: Dict[str, int], impl: str) -> Cost:
    """ETA reads q, both signature sets and the selected key and value rows (each distinct
    row once: :func:`_distinct_rows` of B·k picks), writes the output; it XOR+popcounts
    B·L·W words and runs 4·B·k·D attention flops. Dense attention is :func:`_dense_cost`;
    the naive one also writes and re-reads its (B, L) fp32 scores."""
    B, L, D, K, W = p["B"], p["L"], ETA_D, ETA_K, ETA_NB // 64
    if impl.startswith("dense_"):
        c = _dense_cost(B, L, D)
        if impl == "dense_naive":
            c.bytes += 2 * F32 * B * L
        return c
    rows = round(_distinct_rows(L, B * K))
    return Cost(bytes=2 * F32 * B * D + I64 * W * (B + L) + 2 * F32 * D * rows,
                popcounts=B * L * W, flops=4 * B * K * D)


def _eta_serving_point(B: int, L: int, device: str, torch_max: int) -> Point:
    """eta_attention (every backend) and dense attention (SDPA on 4-D and on 3-D inputs,
    target_attention, and a naive softmax(q kᵀ) v) for B candidates over one shared history
    of L behaviours."""
    D, NB, K = ETA_D, ETA_NB, ETA_K

    def make():
        g = torch.Generator().manual_seed(L + B)
        q, keys, values, q_sig, k_sig = eta_inputs(B, 1, L, D, NB, g, device=device)
        impls = {be: (lambda be=be: fastattn.eta_attention(q, keys, values, q_sig, k_sig, K,
                                                           backend=be))
                 for be in backends_for(device)}
        qh, kh, vh = q.view(1, 1, B, D), keys.view(1, 1, L, D), values.view(1, 1, L, D)
        impls["dense_sdpa"] = lambda: F.scaled_dot_product_attention(qh, kh, vh)
        # SDPA picks its CPU kernel by rank: the 3-D call is measured too, so ETA is compared
        # with the fastest dense variant, whichever it is on this machine.
        impls["dense_sdpa_3d"] = lambda: F.scaled_dot_product_attention(q.view(1, B, D), keys,
                                                                         values)
        impls["dense_target_attention"] = lambda: fastattn.target_attention(q, keys, values)
        # What a straightforward dense attention costs: the (B, L) scores in memory.
        scale = D ** -0.5
        impls["dense_naive"] = lambda: torch.softmax(q @ keys[0].T * scale, -1) @ values[0]
        return impls

    # Inputs, the naive scores and their softmax, and the oracle's (B, L) temporaries.
    return Point({"L": L, "B": B}, make, pairs=B * L,
                 mem_bytes=F32 * D * (B + 2 * L) + 2 * F32 * B * L + 4 * I64 * B * L,
                 skip=torch_skip(device, L, torch_max))


def eta_serving_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """eta_attention forward, one user's history shared by B candidates, vs dense attention,
    over the history length."""
    B = 1024
    torch_max = 4096 if quick else 16384
    return Sweep("eta_serving", f"eta_attention forward, B={B} candidates, one shared history, "
                 f"D={ETA_D}, {ETA_NB} bits, k={ETA_K}", x="L", baseline="dense_sdpa",
                 memory=True, cost=_eta_serving_cost, roofline=True, device=device,
                 points=[_eta_serving_point(B, L, device, torch_max)
                         for L in (QUICK_LENGTHS if quick else LENGTHS)])


def eta_batch_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """The same comparison over the number of candidates per request, at L=16384."""
    L = 16384
    batches = [16, 1024] if quick else [1, 16, 128, 1024, 4096]
    return Sweep("eta_batch", f"eta_attention forward, B candidates, one shared history of "
                 f"L={L}, D={ETA_D}, {ETA_NB} bits, k={ETA_K}", x="B", baseline="dense_sdpa",
                 memory=True, cost=_eta_serving_cost, device=device,
                 points=[_eta_serving_point(B, L, device, torch_max=4096) for B in batches])


# --------------------------------------------------------------------------- MIMN

MIMN_DIMS = dict(x_dim=32, mem_dim=32, slots=8, ctrl_dim=32, miu_dim=32)


def _mimn_encoder(backend: str, device: str = "cpu"):
    from ..nn import MIMNEncoder
    torch.manual_seed(0)
    return MIMNEncoder(**MIMN_DIMS, mur=True, miu_k=1, backend=backend).to(device)


def _mimn_step_flops(backward: bool = False) -> int:
    """Flops of one MIMN step of one row, the flop model of the mimn sweeps.

    Forward (mat-vecs and the O(m·D) memory work; elementwise activations left out): the
    controller GRU 2·3Hc·(Dx+D+Hc), the heads 2·Hc·(4D+2), the norms, two content
    addressings and the read 8·m·D, the erase/add write 3·m·D, MUR 2·m², and the MIU GRU
    2·3Hs·(D+Dx+Hs) on each of its miu_k channels — about 45 kflop at the sweep's sizes.
    Backward (per row-step, without the forward): the recomputation of the step from its
    chunk's checkpoint (one forward) plus, for every product, the gradients of both its
    operands (twice the forward): 3× the forward.
    """
    x, D, m, c, s = (MIMN_DIMS[k] for k in ("x_dim", "mem_dim", "slots", "ctrl_dim",
                                             "miu_dim"))
    miu_k = 1
    gru = lambda i, h: 2 * 3 * h * (i + h)  # noqa: E731
    fwd = (gru(x + D, c) + 2 * c * (4 * D + 2) + 8 * m * D + 3 * m * D + 2 * m * m
           + miu_k * gru(D + x, s))
    return 3 * fwd if backward else fwd


def _mimn_state_bytes() -> int:
    d = MIMN_DIMS
    return F32 * (d["ctrl_dim"] + d["mem_dim"] + d["slots"] * d["mem_dim"] + d["slots"]
                  + d["slots"] * d["miu_dim"])


def mimn_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """MIMNEncoder over whole sequences, fused kernels vs the eager per-step equations (the
    torch reference: one torch op per equation per step). Forward and forward+backward."""
    B = 256
    Dx, D = MIMN_DIMS["x_dim"], MIMN_DIMS["mem_dim"]
    steps = [200] if quick else [200, 1000]

    def cost(p: Dict[str, int], impl: str) -> Cost:
        """Forward: read x (B, T, x_dim), write the reads (B, T, D); the backward reads the
        reads' gradient and x again. Flops: :func:`_mimn_step_flops` per row-step, forward
        and backward; the compute floor is that at the measured fp32 GEMM rate, so
        pct_of_bound is the % of the GEMM bound each row reaches."""
        rows = B * p["T"]
        fwd = Cost(bytes=F32 * rows * (Dx + D), flops=rows * _mimn_step_flops())
        if impl.endswith("_fwd_bwd"):
            return Cost(bytes=2 * fwd.bytes,
                        flops=fwd.flops + rows * _mimn_step_flops(backward=True))
        return fwd

    sweep = Sweep("mimn", f"MIMNEncoder B={B}, x_dim=D=32, slots=8, ctrl=miu=32, MUR, miu_k=1",
                  x="T", baseline="eager_torch_fwd",
                  baseline_of=lambda impl: "eager_torch_fwd_bwd" if impl.endswith("_fwd_bwd")
                  else "eager_torch_fwd", cost=cost, roofline=True, device=device)

    def build(T: int):
        def make():
            x = torch.randn(B, T, Dx, generator=torch.Generator().manual_seed(T)).to(device)
            impls = {}
            for be in backends_for(device):
                enc = _mimn_encoder(be, device)
                name = "eager_torch" if be == "torch" else be

                def fwd(enc=enc):
                    with torch.no_grad():
                        return enc(x)

                def fwd_bwd(enc=enc):
                    reads, st = enc(x)
                    (reads.sum() + enc.reg_loss(st)).backward()

                impls[name + "_fwd"] = fwd
                impls[name + "_fwd_bwd"] = fwd_bwd
            return impls
        return make

    # x, the reads and the per-step states the backward keeps
    sweep.points = [Point({"T": T, "B": B}, build(T), pairs=B * T,
                          mem_bytes=B * T * (F32 * (Dx + D) + 4 * _mimn_state_bytes()))
                    for T in steps]
    return sweep


def mimn_step_sweep(quick: bool, device: str = "cpu") -> Sweep:
    """Serving: one event applied to one user's state vs re-running the user's whole history
    of T events; the step's cost must not depend on T. ``step_*`` goes through the op
    (mimn_step: checks and dispatch on every call), ``bound_step_*`` through
    ``ops.mimn.bind_step`` (parameters packed once: the per-event update of the updater)."""
    steps = [1000] if quick else [100, 1000, 10000]
    Dx, D = MIMN_DIMS["x_dim"], MIMN_DIMS["mem_dim"]
    be = backends_for(device)[0]

    def cost(p: Dict[str, int], impl: str) -> Cost:
        """The step reads and writes the user's state (h, r, M, g, S) and reads the event;
        re-running reads T+1 events and writes their reads. The weights stay in cache."""
        if impl == "rerun_history":
            T = p["T"] + 1
            return Cost(bytes=F32 * T * (Dx + D) + _mimn_state_bytes(),
                        flops=T * _mimn_step_flops())
        return Cost(bytes=2 * _mimn_state_bytes() + F32 * (Dx + D), flops=_mimn_step_flops())

    sweep = Sweep("mimn_step", "MIMN per-event update of one user (B=1) vs re-running the "
                  "history", x="T", baseline="rerun_history", cost=cost, device=device)

    def build(T: int):
        def make():
            enc = _mimn_encoder(be, device)
            x = torch.randn(1, T, Dx, generator=torch.Generator().manual_seed(T)).to(device)
            with torch.no_grad():
                _, state = enc(x)
            event = torch.randn(1, Dx).to(device)

            bound = bind_step(enc.params(), be)
            state = type(state)(*(t.contiguous() for t in state))

            def step():                      # through the op: checks and dispatch per call
                with torch.no_grad():
                    return enc.step(event, state)

            def bound_step():                # the serving path: parameters bound once
                with torch.no_grad():
                    return bound(event, state)

            def rerun():
                with torch.no_grad():
                    return enc(torch.cat([x, event.unsqueeze(1)], 1))

            return {f"bound_step_{be}": bound_step, f"step_{be}": step,
                    "rerun_history": rerun}
        return make

    sweep.points = [Point({"T": T}, build(T), pairs=1,
                          mem_bytes=T * (F32 * (Dx + D) + 4 * _mimn_state_bytes()))
                    for T in steps]
    return sweep


KERNEL_SWEEPS: Dict[str, Callable[..., Sweep]] = {
    "hamming_topk": hamming_topk_sweep,
    "simhash_sign": simhash_sweep,
    "eta_serving": eta_serving_sweep,
    "eta_batch": eta_batch_sweep,
    "mimn": mimn_sweep,
    "mimn_step": mimn_step_sweep,
}
