"""Input checks and backend plumbing shared by the op modules.

Shape and dtype checks run in the public wrappers (they also hold for fake tensors under
torch.compile); checks that read values (lengths, hist_index, idx ranges) run inside the
op implementations, where the data is real: on the host for CPU tensors (ValueError), as
device-side asserts for CUDA tensors (no host sync; see :func:`host_checks`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy
import torch
from torch import Tensor

from ..backends import cpu_threads, load, resolve
from .. import reference as ref

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, *, dtypes: Sequence[torch.dtype], ndim=None,
                 what: str = "") -> Tensor:
    """TypeError unless ``t`` is a tensor of one of ``dtypes``; ValueError on wrong ndim."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}{what}, got "
                        f"{str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        ok = t.dim() in ndim if isinstance(ndim, tuple) else t.dim() == ndim
        if not ok:
            raise ValueError(f"{name} must have {ndim} dims{what}, got shape {tuple(t.shape)}")
    return t


def check_signature(name: str, t, ndim=None, shape: str = "") -> Tensor:
    return check_tensor(name, t, dtypes=(torch.int64,), ndim=ndim,
                        what=f" (packed SimHash words{', ' + shape if shape else ''})")


def check_same_device(**tensors: Optional[Tensor]) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(present.values())).device


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def check_lengths(lengths: Optional[Tensor], U: int, name: str = "lengths") -> Optional[Tensor]:
    """Shape/dtype check of lengths (U,); its value range is checked in the op (real data)."""
    if lengths is None:
        return None
    check_tensor(name, lengths, dtypes=INDEX_DTYPES, ndim=1, what=f" and shape (U,)=({U},)")
    if lengths.shape[0] != U:
        raise ValueError(f"{name} must have shape (U,)=({U},), got {tuple(lengths.shape)}")
    return lengths


def check_hist_index(hist_index: Optional[Tensor], B: int, U: int) -> Optional[Tensor]:
    if hist_index is None:
        if U not in (B, 1):
            raise ValueError(f"hist_index is None, so the number of histories U={U} must equal "
                             f"the number of queries B={B} (one history per query) or be 1 "
                             "(one shared history); pass hist_index (B,) otherwise")
        return None
    check_tensor("hist_index", hist_index, dtypes=INDEX_DTYPES, ndim=1,
                 what=f" and shape (B,)=({B},)")
    if hist_index.shape[0] != B:
        raise ValueError(f"hist_index must have shape (B,)=({B},), got {tuple(hist_index.shape)}")
    return hist_index


def check_hist_rows(hist_rows) -> Tensor:
    """Shape/dtype check of an indexed history map hist_rows (U, L) int32/int64."""
    return check_tensor("hist_rows", hist_rows, dtypes=INDEX_DTYPES, ndim=2,
                        what=" and shape (U, L)")


def check_table(name: str, t: Tensor, hist_rows: Optional[Tensor], ndim: int,
                shape: str) -> None:
    """ValueError unless ``t`` has ``ndim`` dims: the (N, ...) table of the indexed form when
    ``hist_rows`` is given, the (U, L, ...) histories otherwise (one dim more)."""
    want = ndim if hist_rows is not None else ndim + 1
    if t.dim() != want:
        form = (f"a table {shape} with hist_rows" if hist_rows is not None
                else f"(U, L, ...) histories without hist_rows, table {shape} with it")
        raise ValueError(f"{name} must be {form}, got shape {tuple(t.shape)}")


def host_checks(t: Tensor) -> bool:
    """Whether value checks on ``t`` may read it on the host (DESIGN §7, "Value checks").

    CPU tensors: yes, in eager mode, so a bad value raises ValueError naming it. CUDA
    tensors (and anything under torch.compile tracing): no. Reading a CUDA value blocks the
    host until the GPU catches up and makes a forward impossible to capture in a CUDA
    graph, so there the check is a device-side assert (``torch._assert_async``) that
    stops the stream before any kernel reads out of bounds.
    """
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def require(ok: Tensor, what: str, message: Callable[[], str]) -> None:
    """Unless the 0-dim bool tensor ``ok`` holds: ValueError(message()) (host check, the
    message may read values), or on the device an asynchronous assert saying ``what``."""
    if host_checks(ok):
        if not bool(ok):
            raise ValueError(message())
    else:
        torch._assert_async(ok, "fastattn: " + what)


def _flat_position(rows: Tensor, bad: Tensor) -> Tuple[int, int]:
    """(u, l) of the first True in ``bad`` (U, L), row-major (host only: a failed check)."""
    flat = int(torch.nonzero(bad.reshape(-1))[0, 0])
    return divmod(flat, rows.shape[1])


def require_range(name: str, t: Tensor, lo: int, hi: int, interval: str,
                  note: str = "") -> None:
    """Every value of ``t`` in [lo, hi] (``interval`` names it in the message)."""
    if not t.numel():
        return
    what = f"{name} must lie in {interval}{note}"
    if host_checks(t):  # one reduction, one sync; the message reads the range itself
        mn, mx = (int(v) for v in torch.aminmax(t))
        if mn < lo or mx > hi:
            raise ValueError(f"{what}, got values in [{mn}, {mx}]")
        return
    require(((t >= lo) & (t <= hi)).all(), what, lambda: what)


def checked_rows(hist_rows: Tensor, lens: Tensor, n_rows: int) -> Tensor:
    """hist_rows as contiguous int64 with every valid position (l < lengths[u]) holding a
    table row in [0, n_rows); positions past the length are not read (they may hold -1)."""
    rows = hist_rows.to(torch.int64).contiguous()
    U, L = rows.shape
    if rows.numel() == 0:
        return rows
    valid = torch.arange(L, device=rows.device) < lens[:, None]
    bad = valid & ((rows < 0) | (rows >= n_rows))

    def message() -> str:
        u, l = _flat_position(rows, bad)
        return (f"hist_rows[{u}, {l}] = {int(rows[u, l])} is outside the table "
                f"[0, N={n_rows}) at a valid position (l < lengths[{u}] = "
                f"{int(lens[u])}); -1 may only pad positions past the length")
    require(~bad.any(), f"hist_rows must hold a table row in [0, N={n_rows}) at every valid "
            "position", message)
    return rows


def slot_rows(hist_rows: Tensor, hist: Tensor, idx: Tensor, n_rows: int) -> Tensor:
    """Table row (B, K) int64 of each selected slot: hist_rows[hist[b], idx[b, j]], -1 where
    idx = -1. ``idx`` must already be checked to lie in [-1, L); a selected position whose
    row is outside [0, n_rows) (e.g. -1 padding inside the selection) raises ValueError."""
    sel = idx >= 0
    if hist_rows.numel() == 0:   # no position at all: idx can only hold -1
        return idx.contiguous()
    U, L = hist_rows.shape
    pos = idx.clamp(min=0)
    # One history per query: no flat index. (Deciding reads hist: CPU only, no CUDA sync.)
    if U == idx.shape[0] and hist.device.type == "cpu" and torch.equal(hist, torch.arange(U)):
        at = torch.gather(hist_rows, 1, pos)
    else:
        at = hist_rows.reshape(-1).index_select(0, (hist[:, None] * L + pos).reshape(-1))
    flat = torch.where(sel, at.view(idx.shape).to(torch.int64), -1)
    if not idx.numel():
        return flat
    bad = sel & ((flat < 0) | (flat >= n_rows))

    def message() -> str:
        b, j = _flat_position(idx, bad)
        return (f"hist_rows[{int(hist[b])}, {int(idx[b, j])}] = {int(flat[b, j])}, "
                f"selected by idx[{b}, {j}], is outside the table [0, N={n_rows}): a "
                "selected position must hold a table row")
    require(~bad.any(), f"hist_rows must hold a table row in [0, N={n_rows}) at every "
            "position idx selects", message)
    return flat


def checked_lengths(lengths: Optional[Tensor], U: int, L: int, device) -> Tensor:
    """Materialised lengths (U,) int64, values checked to lie in [0, L]."""
    if lengths is None:
        return ref.default_lengths(U, L, device)
    lens = lengths.to(torch.int64).contiguous()
    require_range("lengths", lens, 0, L, f"[0, L={L}]")
    return lens


def checked_hist_index(hist_index: Optional[Tensor], B: int, U: int, device) -> Tensor:
    """Materialised hist_index (B,) int64, values checked to lie in [0, U)."""
    if hist_index is None:
        return ref.default_hist_index(B, U, device)
    hist = hist_index.to(torch.int64).contiguous()
    require_range("hist_index", hist, 0, U - 1, f"[0, U={U})")
    return hist


def layout(B: int, U: int, L: int, lengths: Optional[Tensor], hist_index: Optional[Tensor],
           device) -> Tuple[Tensor, Tensor]:
    """Materialised (lengths (U,), hist_index (B,)) int64, value ranges checked.

    Called inside op implementations, so the checks see real data.
    """
    return (checked_lengths(lengths, U, L, device),
            checked_hist_index(hist_index, B, U, device))


def host_layout(B: int, U: int, L: int, lengths: Optional[Tensor],
                hist_index: Optional[Tensor]) -> Tuple["numpy.ndarray", "numpy.ndarray"]:
    """:func:`layout` for the CPU kernels: (lengths (U,), hist_index (B,)) as int64 numpy
    arrays, values checked. A default is built in numpy: as a torch tensor plus its numpy
    view it would cost ~5 µs, a visible share of a small retrieval (~40 µs in all)."""
    if lengths is None:
        lens = numpy.full(U, L, dtype=numpy.int64)
    else:
        lens = np(checked_lengths(lengths, U, L, None))
    if hist_index is None and U in (B, 1):
        hist = (numpy.arange(B, dtype=numpy.int64) if U == B
                else numpy.zeros(B, dtype=numpy.int64))
    else:                            # an explicit one, or no default (which raises there)
        hist = np(checked_hist_index(hist_index, B, U, "cpu"))
    return lens, hist


def eager_plain(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may skip the ``torch.ops`` dispatcher and run an op's implementation
    directly: eager mode (no torch.compile tracing, no functorch transform), no Python
    dispatch or ``__torch_function__`` mode active, and every given tensor a plain CPU
    ``torch.Tensor`` that needs no grad (no subclass, fake or meta tensor). Then the custom
    op would only forward to the same function, at ~40 us of dispatch per call (a sizeable
    share of a small retrieval); everywhere else the op goes through ``torch.ops``."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._len_torch_function_stack()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    for t in tensors:        # a loop, not all(genexpr), and is_cpu: this runs on every call
        if t is not None and (type(t) is not Tensor or not t.is_cpu or t.requires_grad):
            return False
    return True


def backend_for(device, backend: Optional[str]) -> str:
    return resolve(device, backend)


def kernels(name: str):
    return load(name)


def np(t: Tensor):
    """Zero-copy numpy view of a contiguous CPU tensor (for the cpp and numba kernels).

    Inside custom ops nothing requires grad, so the detach is usually skipped: this runs
    ~30 times per MIMN step, where it is a visible part of the per-event cost.
    """
    return (t.detach() if t.requires_grad else t).numpy()


def set_numba_threads() -> None:
    import numba
    numba.set_num_threads(min(cpu_threads(), numba.config.NUMBA_NUM_THREADS))


def cpu_call(backend: str, name: str, *args):
    """Call CPU kernel ``name`` of ``backend`` ("cpp" or "numba") with tensors as numpy views.

    Tensors must be contiguous CPU tensors (outputs preallocated); the C++ kernels get the
    thread count as their last argument, numba gets it through numba.set_num_threads.
    """
    conv = [np(a) if isinstance(a, Tensor) else a for a in args]
    if backend == "cpp":
        return getattr(kernels("cpp"), name)(*conv, cpu_threads())
    set_numba_threads()
    return getattr(kernels("numba"), name)(*conv)


class HostBufferPool:
    """Large host buffers reused from one call to the next instead of freshly allocated.

    A fresh multi-hundred-MB CPU tensor is mmap'd and every page faults in (zeroed by the
    kernel) on first write: 140-220 ms for 300 MB on the 2-core CI-class machine, against 35
    ms to write it again. A buffer is handed out as a tensor over a numpy array; it is free
    again once no tensor holds that array (its reference count), so a buffer saved for a
    backward, retained, or still referenced anywhere is never handed out twice. At most
    ``keep`` bytes of free buffers are kept.
    """

    def __init__(self, keep: int):
        import threading

        import numpy as np
        self.keep = keep
        self._bufs: list = []
        self._lock = threading.Lock()
        # the count of a buffer only the pool holds, seen the way _free sees one (the list,
        # the loop's name, the argument): measured, not assumed per Python version
        for a in [np.empty(1)]:
            self._base = self._refs(a)

    @staticmethod
    def _refs(a) -> int:
        import sys
        return sys.getrefcount(a)

    def _free(self) -> list:
        out = []
        for a in self._bufs:
            if self._refs(a) <= self._base:
                out.append(a)
        return out

    def take(self, shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype``, starting on a
        64-byte boundary."""
        import numpy as np
        npdt = torch.empty(0, dtype=dtype).numpy().dtype
        pad = 64 // npdt.itemsize           # room to start the view on a 64-byte line
        n = pad + int(np.prod(shape, dtype=np.int64))
        with self._lock:
            free = self._free()
            fits = [a for a in free if a.dtype == npdt and a.size >= n]
            buf = min(fits, key=lambda a: a.size) if fits else None
            if buf is None:
                buf = np.empty(n, dtype=npdt)
                self._bufs.append(buf)
            # drop free buffers beyond `keep` bytes, largest first (not the one handed out)
            spare = sorted((a for a in free if a is not buf), key=lambda a: a.nbytes)
            total = sum(a.nbytes for a in spare)
            while spare and total > self.keep:
                a = spare.pop()
                total -= a.nbytes
                self._bufs = [b for b in self._bufs if b is not a]
            at = (-buf.ctypes.data) % 64 // npdt.itemsize
            return torch.from_numpy(buf[at:at + n - pad]).view(shape)
