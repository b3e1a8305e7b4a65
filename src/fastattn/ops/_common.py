"""Input checks and backend plumbing shared by the op modules.

Shape and dtype checks run in the public wrappers (they also hold for fake tensors under
torch.compile); checks that read values (lengths, hist_index, idx ranges) run inside the
op implementations, where the data is real.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

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


def layout(B: int, U: int, L: int, lengths: Optional[Tensor], hist_index: Optional[Tensor],
           device) -> Tuple[Tensor, Tensor]:
    """Materialised (lengths (U,), hist_index (B,)) int64, value ranges checked.

    Called inside op implementations, so the checks see real data.
    """
    if lengths is None:
        lens = ref.default_lengths(U, L, device)
    else:
        lens = lengths.to(torch.int64).contiguous()
        if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > L):
            raise ValueError(f"lengths must lie in [0, L={L}], got values in "
                             f"[{int(lens.min())}, {int(lens.max())}]")
    if hist_index is None:
        hist = ref.default_hist_index(B, U, device)
    else:
        hist = hist_index.to(torch.int64).contiguous()
        if hist.numel() and (int(hist.min()) < 0 or int(hist.max()) >= U):
            raise ValueError(f"hist_index must lie in [0, U={U}), got values in "
                             f"[{int(hist.min())}, {int(hist.max())}]")
    return lens, hist


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
