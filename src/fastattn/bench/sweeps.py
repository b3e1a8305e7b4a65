"""The benchmark sweeps: each compares fastattn backends with baselines at every point, in
one run, so every figure is a ratio measured on the same machine at the same moment.

A sweep is a name, a baseline and a list of points; each point builds its inputs once and
maps implementation names to zero-argument callables. Add a sweep by writing one function
that returns a :class:`Sweep` and listing it in :data:`SWEEPS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import fastattn

from ..backends import available


@dataclass
class Point:
    params: Dict[str, int]
    # impl name -> zero-argument callable; built lazily so inputs exist only while measured
    build: Callable[[], Dict[str, Callable[[], object]]]
    # per-behaviour work for throughput: (query, behaviour) pairs processed per call
    pairs: int = 0


@dataclass
class Sweep:
    name: str
    title: str
    x: str                      # the swept parameter, plotted on the x axis
    baseline: str               # speed-ups are reported against this implementation
    points: List[Point] = field(default_factory=list)
    memory: bool = False        # also record the peak memory each call adds
    # impl -> the baseline it is compared with, where that is not ``baseline``
    baseline_of: Optional[Callable[[str], str]] = None

    def baseline_for(self, impl: str) -> str:
        return self.baseline_of(impl) if self.baseline_of else self.baseline


def _cpu_backends(include_torch: bool = True) -> List[str]:
    names = [b for b in ("cpp", "numba") if available(b)]
    return names + (["torch"] if include_torch else [])


def _sigs(n: int, words: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(-2**63, 2**63 - 1, (n, words), dtype=torch.int64, generator=g)


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


# --------------------------------------------------------------------------- hamming_topk

def hamming_topk_sweep(quick: bool) -> Sweep:
    """hamming_topk (B=1024, 256 bits, k=64, one shared history) vs FAISS IndexBinaryFlat and
    vs the dense target attention it replaces."""
    B, NB, K, D = 1024, 256, 64, 128
    W = NB // 64
    lengths = [1024, 16384] if quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    torch_max = 4096 if quick else 16384    # the oracle materialises (B, L): slow, not wrong
    sweep = Sweep("hamming_topk", f"hamming_topk, B={B}, {NB} bits, k={K}, shared history",
                  x="L", baseline="faiss")

    def build(L: int):
        def make():
            g = torch.Generator().manual_seed(L)
            q, k = _sigs(B, W, g), _sigs(L, W, g).unsqueeze(0)
            impls = {}
            for be in _cpu_backends(include_torch=L <= torch_max):
                impls[be] = lambda be=be: fastattn.hamming_topk(q, k, K, backend=be)
            search = faiss_search(q, k[0], K)
            if search is not None:
                impls["faiss"] = search
            qf = torch.randn(1, 1, B, D, generator=g)
            kf = torch.randn(1, 1, L, D, generator=g)
            impls["dense_sdpa"] = lambda: F.scaled_dot_product_attention(qf, kf, kf)
            return impls
        return make

    sweep.points = [Point({"L": L, "B": B}, build(L), pairs=B * L) for L in lengths]
    return sweep


# --------------------------------------------------------------------------- simhash_sign

def simhash_sweep(quick: bool) -> Sweep:
    """simhash_sign vs the bare torch matmul it contains (x @ planes)."""
    D, NB = 128, 256
    sizes = [65536] if quick else [4096, 16384, 65536, 262144]
    sweep = Sweep("simhash_sign", f"simhash_sign, D={D} -> {NB} bits", x="N",
                  baseline="torch_matmul")

    def build(N: int):
        def make():
            g = torch.Generator().manual_seed(N)
            x, planes = torch.randn(N, D, generator=g), torch.randn(D, NB, generator=g)
            impls = {be: (lambda be=be: fastattn.simhash_sign(x, planes, backend=be))
                     for be in _cpu_backends()}
            impls["torch_matmul"] = lambda: torch.mm(x, planes)
            return impls
        return make

    sweep.points = [Point({"N": N}, build(N), pairs=N) for N in sizes]
    return sweep


# --------------------------------------------------------------------------- eta_attention

def eta_inputs(B: int, U: int, L: int, D: int, NB: int, g: torch.Generator,
                requires_grad: bool = False):
    q = torch.randn(B, D, generator=g)
    keys = torch.randn(U, L, D, generator=g)
    values = torch.randn(U, L, D, generator=g)
    planes = fastattn.make_planes(D, NB, g)
    q_sig, k_sig = fastattn.simhash_sign(q, planes), fastattn.simhash_sign(keys, planes)
    if requires_grad:
        for t in (q, keys, values):
            t.requires_grad_()
    return q, keys, values, q_sig, k_sig


def eta_serving_sweep(quick: bool) -> Sweep:
    """eta_attention forward, one user's history shared by B candidates, vs dense attention."""
    B, D, NB, K = 1024, 128, 256, 64
    lengths = [1024, 16384] if quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    torch_max = 4096 if quick else 16384
    sweep = Sweep("eta_serving", f"eta_attention forward, B={B} candidates, one shared history, "
                  f"D={D}, {NB} bits, k={K}", x="L", baseline="dense_sdpa", memory=True)

    def build(L: int):
        def make():
            g = torch.Generator().manual_seed(L)
            q, keys, values, q_sig, k_sig = eta_inputs(B, 1, L, D, NB, g)
            impls = {be: (lambda be=be: fastattn.eta_attention(q, keys, values, q_sig, k_sig, K,
                                                               backend=be))
                     for be in _cpu_backends(include_torch=L <= torch_max)}
            qh, kh, vh = q.view(1, 1, B, D), keys.view(1, 1, L, D), values.view(1, 1, L, D)
            impls["dense_sdpa"] = lambda: F.scaled_dot_product_attention(qh, kh, vh)
            impls["dense_target_attention"] = lambda: fastattn.target_attention(q, keys, values)
            # What a straightforward dense attention costs: the (B, L) scores in memory.
            scale = D ** -0.5
            impls["dense_naive"] = lambda: torch.softmax(q @ keys[0].T * scale, -1) @ values[0]
            return impls
        return make

    sweep.points = [Point({"L": L, "B": B}, build(L), pairs=B * L) for L in lengths]
    return sweep


def eta_training_sweep(quick: bool) -> Sweep:
    """eta_attention forward + backward, training layout (one history per row)."""
    B, D, NB, K = 256, 128, 256, 64
    lengths = [4096] if quick else [1024, 2048, 4096]
    sweep = Sweep("eta_training", f"eta_attention forward+backward, B={B} rows with their own "
                  f"history, D={D}, {NB} bits, k={K}", x="L", baseline="dense_sdpa",
                  memory=True)

    def build(L: int):
        def make():
            g = torch.Generator().manual_seed(L)
            q, keys, values, q_sig, k_sig = eta_inputs(B, B, L, D, NB, g, requires_grad=True)

            def step(f):
                out = f()
                out.backward(torch.ones_like(out))
                for t in (q, keys, values):
                    t.grad = None

            impls = {be: (lambda be=be: step(lambda: fastattn.eta_attention(
                q, keys, values, q_sig, k_sig, K, backend=be)))
                for be in _cpu_backends(include_torch=L <= 2048)}
            impls["dense_sdpa"] = lambda: step(lambda: F.scaled_dot_product_attention(
                q.view(B, 1, 1, D), keys.view(B, 1, L, D), values.view(B, 1, L, D)))
            return impls
        return make

    sweep.points = [Point({"L": L, "B": B}, build(L), pairs=B * L) for L in lengths]
    return sweep


# --------------------------------------------------------------------------- MIMN

def _mimn_encoder(backend: str):
    from ..nn import MIMNEncoder
    torch.manual_seed(0)
    return MIMNEncoder(32, 32, 8, 32, 32, mur=True, miu_k=1, backend=backend)


def mimn_sweep(quick: bool) -> Sweep:
    """MIMNEncoder over whole sequences, fused kernels vs the eager per-step equations (the
    torch reference: one torch op per equation per step). Forward and forward+backward."""
    B = 256
    steps = [200] if quick else [200, 1000]
    sweep = Sweep("mimn", f"MIMNEncoder B={B}, x_dim=D=32, slots=8, ctrl=miu=32, MUR, miu_k=1",
                  x="T", baseline="eager_torch_fwd",
                  baseline_of=lambda impl: "eager_torch_fwd_bwd" if impl.endswith("_fwd_bwd")
                  else "eager_torch_fwd")

    def build(T: int):
        def make():
            x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(T))
            impls = {}
            for be in _cpu_backends(include_torch=False) + ["torch"]:
                enc = _mimn_encoder(be)
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

    sweep.points = [Point({"T": T, "B": B}, build(T), pairs=B * T) for T in steps]
    return sweep


def mimn_step_sweep(quick: bool) -> Sweep:
    """Serving: one event applied to one user's state (mimn_step) vs re-running the user's
    whole history of T events; the step's cost must not depend on T."""
    steps = [1000] if quick else [100, 1000, 10000]
    sweep = Sweep("mimn_step", "MIMN per-event update of one user (B=1) vs re-running the "
                  "history", x="T", baseline="rerun_history")
    be = _cpu_backends(include_torch=False)[0] if _cpu_backends(False) else "torch"

    def build(T: int):
        def make():
            enc = _mimn_encoder(be)
            x = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(T))
            with torch.no_grad():
                _, state = enc(x)
            event = torch.randn(1, 32)

            def step():
                with torch.no_grad():
                    return enc.step(event, state)

            def rerun():
                with torch.no_grad():
                    return enc(torch.cat([x, event.unsqueeze(1)], 1))

            return {f"step_{be}": step, "rerun_history": rerun}
        return make

    sweep.points = [Point({"T": T}, build(T), pairs=1) for T in steps]
    return sweep


SWEEPS: Dict[str, Callable[[bool], Sweep]] = {
    "hamming_topk": hamming_topk_sweep,
    "simhash_sign": simhash_sweep,
    "eta_serving": eta_serving_sweep,
    "eta_training": eta_training_sweep,
    "mimn": mimn_sweep,
    "mimn_step": mimn_step_sweep,
}


def select(names: Optional[List[str]], quick: bool) -> List[Sweep]:
    chosen = names or list(SWEEPS)
    unknown = [n for n in chosen if n not in SWEEPS]
    if unknown:
        raise SystemExit(f"unknown sweep(s) {unknown}; choose from {list(SWEEPS)}")
    return [SWEEPS[n](quick) for n in chosen]
