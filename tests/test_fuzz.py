"""Fuzz tests (issue 12): per op family, random shapes, dtypes, devices and values, good and
bad, run in every backend (Triton on its test device: CUDA with a GPU, else the
interpreter). Every outcome must be the reference result or a clear ValueError / TypeError /
IndexError, the same in every backend: never a crash, a hang or a silent disagreement.

A draw either is valid (then every backend must match ``reference.py``) or carries exactly
one defect chosen from the family's list (then every backend must refuse it, with the same
exception type). MIMN is not fuzzed here (its value checks are issue 13's).
"""
import faulthandler
import os

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import reference as ref

from conftest import checks_values_on_host, device_of
from helpers import TOL, random_sigs

BACKENDS = tuple(b for b in ("torch", "cpp", "numba", "triton")
                 if fastattn.backends()["available"][b])
CLEAR = (ValueError, TypeError, IndexError)
HANG_S = 300                    # one call of these tiny shapes takes well under a second
# FASTATTN_FUZZ_EXAMPLES raises the count for a longer hunt (60 keeps `make test` short).
FUZZ = settings(max_examples=int(os.environ.get("FASTATTN_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Defects of a value, not of a type or shape: on CUDA these are device-side asserts.
VALUE_DEFECTS = frozenset({"length>L", "length<0", "hist>=U", "hist<0", "bad row", "idx>=L",
                           "idx<-1", "rows range"})


def _run_everywhere(call, defect=None):
    """{backend: ("ok", outputs on CPU) | ("error", exception type)}; anything else raised
    (a crash) propagates and fails the test. A value defect skips the backends that check
    values on the device (:func:`conftest.checks_values_on_host`)."""
    seen = {}
    for name in BACKENDS:
        if defect in VALUE_DEFECTS and not checks_values_on_host(name):
            continue
        dev = device_of(name)
        # A hang (even inside a kernel, where no Python signal gets through) ends the run
        # with every thread's traceback instead of waiting forever.
        faulthandler.dump_traceback_later(HANG_S, exit=True)
        try:
            out = call(name, dev)
        except CLEAR as exc:
            seen[name] = ("error", type(exc), str(exc))
            continue
        finally:
            faulthandler.cancel_dump_traceback_later()
        outs = out if isinstance(out, tuple) else (out,)
        seen[name] = ("ok", tuple(t.detach().cpu() for t in outs))
    return seen


def _judge(seen, defect, want, close):
    """Valid draw: every backend returns ``want`` (compared with ``close``). A defect: every
    backend refuses it with the same exception type."""
    event(f"defect: {defect}")         # --hypothesis-show-statistics shows the mix
    if defect is None:
        for name, res in seen.items():
            assert res[0] == "ok", f"{name} refused a valid input: {res}"
            for got, exp in zip(res[1], want):
                close(got, exp)
    else:
        kinds = {res[0] for res in seen.values()}
        assert kinds == {"error"}, f"defect {defect!r} not refused everywhere: {seen}"
        types = {res[1] for res in seen.values()}
        assert len(types) == 1, f"backends disagree on defect {defect!r}: {seen}"


def _exact(got, exp):
    assert torch.equal(got, exp), (got, exp)


def _move(tensors, dev, meta=None):
    """Tensors to ``dev``; the one named ``meta`` to the meta device (a device mix-up)."""
    return {k: None if v is None else v.to("meta" if k == meta else dev)
            for k, v in tensors.items()}


@st.composite
def layouts(draw, max_b=5, max_u=3, max_l=40):
    """(B, U, L, lengths or None, hist_index or None), valid."""
    B = draw(st.integers(0, max_b))
    U = draw(st.integers(1, max_u))
    L = draw(st.integers(0, max_l))
    lengths = draw(st.none() | st.lists(st.integers(0, L), min_size=U, max_size=U))
    if U in (1, B) and draw(st.booleans()):
        hist = None
    else:
        hist = draw(st.lists(st.integers(0, U - 1), min_size=B, max_size=B))
    idt = draw(st.sampled_from([torch.int64, torch.int32]))     # both index dtypes accepted
    t = lambda v: None if v is None else torch.tensor(v, dtype=idt)  # noqa: E731
    return B, U, L, t(lengths), t(hist)


def _layout_defect(draw, B, U, L, lengths, hist, defects):
    """Apply one layout defect (or none) from ``defects``; returns (lengths, hist, defect)."""
    defect = draw(st.sampled_from((None,) + defects))
    if defect == "length>L":
        lengths = torch.full((U,), L + 1)
    elif defect == "length<0":
        lengths = torch.full((U,), -1)
    elif defect == "lengths dtype":
        lengths = torch.full((U,), float(L))
    elif defect == "lengths shape":
        lengths = torch.full((U + 1,), L)
    elif defect == "hist>=U":
        hist = torch.full((B,), U) if B else None
        defect = defect if B else None
    elif defect == "hist<0":
        hist = torch.full((B,), -1) if B else None
        defect = defect if B else None
    elif defect == "hist shape":
        hist = torch.zeros(B + 1, dtype=torch.int64)
    return lengths, hist, defect


LAYOUT_DEFECTS = ("length>L", "length<0", "lengths dtype", "lengths shape", "hist>=U",
                  "hist<0", "hist shape")


# --------------------------------------------------------------------------- hamming

@FUZZ
@given(data=st.data(), lay=layouts(), W=st.integers(1, 8), nbits=st.integers(1, 20),
       topk=st.integers(1, 50), indexed=st.booleans())
def test_fuzz_hamming(data, lay, W, nbits, topk, indexed):
    B, U, L, lengths, hist = lay
    draw = data.draw
    lengths, hist, defect = _layout_defect(
        draw, B, U, L, lengths, hist,
        LAYOUT_DEFECTS + ("q dtype", "W mismatch", "k<1", "k type", "device", "bad row"))
    q = random_sigs(B, W, nbits=nbits)
    if indexed:
        N = draw(st.integers(0 if L == 0 or (lengths is not None and not lengths.any())
                             else 1, 12))
        k_sig = random_sigs(N, W, nbits=nbits)
        rows = torch.randint(0, max(N, 1), (U, L)) if N else torch.full((U, L), -1)
        lens_now = lengths if lengths is not None and not lengths.is_floating_point() \
            and lengths.shape == (U,) and lengths.min() >= 0 else None
        if lens_now is not None and L:                   # -1 padding past each length
            past = torch.arange(L)[None, :] >= lens_now.clamp(max=L)[:, None]
            rows = torch.where(past, -1, rows)
        if N == 0 and lengths is None and L:
            lengths = torch.zeros(U, dtype=torch.int64)  # an empty table: empty histories
    else:
        k_sig, rows = random_sigs(U, L, W, nbits=nbits), None
    k = topk
    if defect == "q dtype":
        q = q.to(torch.int32)
    elif defect == "W mismatch":
        q = random_sigs(B, W + 1)
    elif defect == "k<1":
        k = 0
    elif defect == "k type":
        k = float(topk)
    elif defect == "bad row":
        if rows is not None and L:
            lengths = None                               # every position valid
            rows[0, 0] = -1 if draw(st.booleans()) else k_sig.shape[0]
        else:
            defect = None
    meta = "q" if defect == "device" else None
    if U not in (1, B) and hist is None and defect is None:
        defect = "U vs B"                                 # no hist_index to resolve U
    tensors = dict(q=q, k=k_sig, lengths=lengths, hist=hist, rows=rows)

    def call(name, dev):
        t = _move(tensors, dev, meta)
        return fastattn.hamming_topk(t["q"], t["k"], k, lengths=t["lengths"],
                                     hist_index=t["hist"], hist_rows=t["rows"], backend=name)
    seen = _run_everywhere(call, defect)
    want = None
    if defect is None:
        want = ref.hamming_topk(q, k_sig, k, lengths, hist, hist_rows=rows)
    _judge(seen, defect, want, _exact)
    if defect is None and not indexed and B and U == B:
        # The distance op on the same draw (one history per query).
        seen = _run_everywhere(lambda name, dev: fastattn.hamming_distance(
            q.to(dev)[:, None], k_sig.to(dev)[:, None], backend=name))
        _judge(seen, None, (ref.hamming_distance(q[:, None], k_sig[:, None]),), _exact)


# --------------------------------------------------------------------------- gather

@FUZZ
@given(data=st.data(), lay=layouts(), K=st.integers(0, 12), Dv=st.integers(1, 9),
       dtype=st.sampled_from(FLOATS), indexed=st.booleans())
def test_fuzz_gather(data, lay, K, Dv, dtype, indexed):
    B, U, L, _, hist = lay
    draw = data.draw
    _, hist, defect = _layout_defect(draw, B, U, L, None, hist, ("hist>=U", "hist<0",
                                                                 "hist shape"))
    extra = draw(st.sampled_from((None, "idx>=L", "idx<-1", "idx dtype", "values dtype",
                                  "device", "bad row")))
    if defect is None:
        defect = extra
    idx = torch.randint(-1, max(L, 1), (B, K)) if L else torch.full((B, K), -1)
    if indexed:
        N = draw(st.integers(1, 10))
        values = torch.randn(N, Dv).to(dtype)
        rows = torch.randint(0, N, (U, L))
    else:
        values, rows = torch.randn(U, L, Dv).to(dtype), None
    if defect == "idx>=L" and idx.numel():
        idx[0, 0] = L
    elif defect == "idx<-1" and idx.numel():
        idx[-1, -1] = -2
    elif defect == "idx dtype":
        idx = idx.to(torch.int32)
    elif defect == "values dtype":
        values = values.to(torch.int64)
    elif defect == "bad row":
        if rows is not None and idx.numel() and L:
            idx[0, 0] = 0
            h0 = 0 if hist is None else int(hist[0])
            rows[h0, 0] = -1
        else:
            defect = None
    elif defect in ("idx>=L", "idx<-1"):
        defect = None                                    # nothing to corrupt
    if U not in (1, B) and hist is None and defect is None:
        defect = "U vs B"
    meta = "idx" if defect == "device" else None
    tensors = dict(values=values, idx=idx, hist=hist, rows=rows)

    def call(name, dev):
        t = _move(tensors, dev, meta)
        v = t["values"].requires_grad_(t["values"].is_floating_point())
        out = fastattn.topk_gather(v, t["idx"], hist_index=t["hist"], hist_rows=t["rows"],
                                   backend=name)
        (g,) = torch.autograd.grad(out, v, torch.ones_like(out)) if out.numel() else \
            (torch.zeros_like(v),)
        return out, g
    seen = _run_everywhere(call, defect)
    want = None
    if defect is None:
        v = values.double().requires_grad_()
        dense = v if rows is None else ref.history_from_table(v, rows, None)
        out = ref.topk_gather(dense, idx, hist)
        (g,) = torch.autograd.grad(out, v, torch.ones_like(out)) if out.numel() else \
            (torch.zeros_like(v),)
        want = (out, g)

    def close(got, exp):
        torch.testing.assert_close(got.double(), exp.double(), **TOL[dtype])
    _judge(seen, defect, want, close)


# --------------------------------------------------------------------------- attention

@FUZZ
@given(data=st.data(), lay=layouts(max_l=30), H=st.sampled_from([None, 1, 2]),
       Dh=st.integers(1, 8), Dv=st.integers(1, 5), dtype=st.sampled_from(FLOATS),
       W=st.integers(1, 8), topk=st.integers(1, 40),
       op=st.sampled_from(["eta", "target", "topk"]))
def test_fuzz_attention(data, lay, H, Dh, Dv, dtype, W, topk, op):
    B, U, L, lengths, hist = lay
    draw = data.draw
    lengths, hist, defect = _layout_defect(draw, B, U, L, lengths, hist, LAYOUT_DEFECTS)
    extra = draw(st.sampled_from((None, "q dtype mix", "Dh mismatch", "scale", "device",
                                  "sig W")))
    if defect is None:
        defect = extra if not (op != "eta" and extra == "sig W") else None
    hk = () if H is None else (H,)
    q = torch.randn(B, *hk, Dh).to(dtype)
    keys = torch.randn(U, L, *hk, Dh).to(dtype)
    values = torch.randn(U, L, *hk, Dv).to(dtype)
    qs, ks = random_sigs(B, W, nbits=12), random_sigs(U, L, W, nbits=12)
    scale = None
    if defect == "q dtype mix":
        q = q.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif defect == "Dh mismatch":
        q = torch.randn(B, *hk, Dh + 1).to(dtype)
    elif defect == "scale":
        scale = float("nan")
    elif defect == "sig W":
        qs = random_sigs(B, W + 1)
    if op == "topk":
        # An explicit retrieval: positions of each query's history (lengths do not apply).
        lengths = None if defect is None or defect.startswith("length") else lengths
        if defect is not None and defect.startswith("length"):
            defect = None
        idx = torch.randint(-1, max(L, 1), (B, topk)) if L else torch.full((B, topk), -1)
    else:
        idx = None
    if U not in (1, B) and hist is None and defect is None:
        defect = "U vs B"
    meta = "keys" if defect == "device" else None
    tensors = dict(q=q, keys=keys, values=values, qs=qs, ks=ks, lengths=lengths, hist=hist,
                   idx=idx)

    def run(fns, t, leaves):
        if op == "eta":
            out = fns.eta_attention(*leaves, t["qs"], t["ks"], topk, lengths=t["lengths"],
                                    hist_index=t["hist"], scale=scale, **fns.kw)
        elif op == "target":
            out = fns.target_attention(*leaves, lengths=t["lengths"], hist_index=t["hist"],
                                       scale=scale, **fns.kw)
        else:
            out = fns.topk_attention(*leaves, t["idx"], hist_index=t["hist"], scale=scale,
                                     **fns.kw)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True) \
            if out.numel() else [None] * 3
        return (out,) + tuple(torch.zeros_like(x) if g is None else g
                              for x, g in zip(leaves, grads))

    class Ops:
        pass

    def call(name, dev):
        t = _move(tensors, dev, meta)
        leaves = [t[k].requires_grad_(t[k].is_floating_point())
                  for k in ("q", "keys", "values")]
        ops = Ops()
        ops.eta_attention, ops.target_attention = fastattn.eta_attention, \
            fastattn.target_attention
        ops.topk_attention, ops.kw = fastattn.topk_attention, dict(backend=name)
        return run(ops, t, leaves)
    seen = _run_everywhere(call, defect)
    want = None
    if defect is None:
        r = Ops()
        r.kw = {}
        single = H is None

        def ref_topk(q_, k_, v_, idx_, hist_index=None, scale=None):
            if single:
                q_, k_, v_ = q_.unsqueeze(1), k_.unsqueeze(2), v_.unsqueeze(2)
            out, _ = ref.topk_attention(q_, k_, v_, idx_, hist_index, scale)
            return out.squeeze(1) if single else out
        r.eta_attention = lambda q_, k_, v_, qs_, ks_, kk, lengths=None, hist_index=None, \
            scale=None: ref.eta_attention(q_, k_, v_, qs_, ks_, kk, lengths, hist_index, scale)
        r.target_attention = lambda q_, k_, v_, lengths=None, hist_index=None, scale=None: \
            ref.target_attention(q_, k_, v_, lengths, hist_index, scale)
        r.topk_attention = ref_topk
        leaves = [x.double().requires_grad_() for x in (q, keys, values)]
        want = run(r, tensors, leaves)

    def close(got, exp):
        torch.testing.assert_close(got.double(), exp.double(), **TOL[dtype])
        assert torch.isfinite(got).all()
    _judge(seen, defect, want, close)


# --------------------------------------------------------------------------- simhash

@FUZZ
@given(data=st.data(), N=st.integers(0, 6), D=st.integers(1, 12), nbits=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fuzz_simhash(data, N, D, nbits, dtype):
    gathered = data.draw(st.booleans())            # the rows= form: signatures of x[rows]
    defect = data.draw(st.sampled_from((None, "planes D", "int x", "device") + (
        ("rows range", "rows dtype", "rows shape") if gathered else ())))
    rows = None
    if gathered:
        rows = torch.tensor(data.draw(st.lists(st.integers(0, max(N - 1, 0)), max_size=8)
                                      if N else st.just([])), dtype=torch.int64)
        if defect == "rows range":
            rows = torch.cat([rows, torch.tensor([data.draw(st.sampled_from([N, -1]))])])
        elif defect == "rows dtype":
            rows = rows.double()
        elif defect == "rows shape":
            rows = rows.view(1, -1)
    x, planes = torch.randn(N, D, dtype=torch.float64), torch.randn(D, nbits,
                                                                     dtype=torch.float64)
    # Keep every projection away from 0, where fp32 and fp64 signs may legitimately differ.
    proj = x @ planes
    x = torch.where((proj.abs() < 1e-3).any(1, keepdim=True), x + 0.5, x)
    x, planes = x.to(dtype), planes.to(dtype)
    if defect == "planes D":
        planes = torch.randn(D + 1, nbits, dtype=dtype)
    elif defect == "int x":
        x = x.to(torch.int64)
    meta = "planes" if defect == "device" else None
    seen = _run_everywhere(lambda name, dev: fastattn.simhash_sign(
        **_move(dict(x=x, planes=planes, rows=rows), dev, meta), backend=name), defect)
    want = None
    if defect is None:
        xs = x if rows is None else x[rows]
        signs = ref.simhash_sign(xs.double(), planes.double())
        near = ((xs.double() @ planes.double()).abs() < 1e-4).any()
        want = (signs,) if not near else None
        if want is None:
            return                                       # a tie at 0: no single answer
    _judge(seen, defect, want, _exact)


# --------------------------------------------------------------------------- unique

@FUZZ
@given(data=st.data(), U=st.integers(0, 5), L=st.integers(0, 30), span=st.integers(1, 40),
       idt=st.sampled_from([torch.int64, torch.int32]))
def test_fuzz_unique_rows(data, U, L, span, idt):
    draw = data.draw
    ids = torch.randint(-span, span, (U, L), dtype=idt)
    lengths = draw(st.none() | st.lists(st.integers(0, L), min_size=U, max_size=U))
    lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
    defect = draw(st.sampled_from((None, "length>L", "length<0", "lengths shape", "float ids",
                                   "ids ndim", "device")))
    if defect == "length>L":
        lengths = torch.full((U,), L + 1)
    elif defect == "length<0":
        lengths = torch.full((U,), -1)
    elif defect == "lengths shape":
        lengths = torch.zeros(U + 1, dtype=torch.int64)
    elif defect == "float ids":
        ids = ids.double()
    elif defect == "ids ndim":
        ids = ids.reshape(-1)
    if defect in ("length>L", "length<0") and U == 0:
        defect = None                                    # an empty (0,) lengths is valid
    meta = "ids" if defect == "device" and lengths is not None else None
    if defect == "device" and meta is None:
        defect = None
    seen = _run_everywhere(lambda name, dev: fastattn.unique_rows(
        **_move(dict(ids=ids, lengths=lengths), dev, meta), backend=name), defect)
    want = ref.unique_rows(ids, lengths) if defect is None else None
    _judge(seen, defect, want, _exact)
