"""Fused CPU kernels for TIES, DARE and DARE-TIES, compiled by numba when it is installed (``pip install numba``,
the ``fast`` extra): one loop reads every model's entry straight from the mapped file (fp16 or fp32), computes
the task vectors, trims or drops, elects the sign, takes the mean and writes ``A + alpha · τ``, with no
intermediate array and no per-chunk Python call.

They give the numbers ``streamed.py``'s numpy path gives, bit for bit (tests run both on the same inputs):
the same fp32 operations in the same order, masked entries as +0, and the last step rounded as torch's
``add(a, tau, alpha=alpha)`` rounds it (:func:`_probe_fma` checks once whether torch fuses that multiply-add on
this machine: the kernels are only used when they reproduce torch's result). A chunk whose sign-election total is not
finite is flagged, and the caller computes it again by the exact formulas, as the numpy path does.

Without numba (or with ``BLOCKMERGE_KERNELS=numpy``), or for other dtypes (bf16, fp64, mixed task-vector
dtypes), :mod:`streamed` uses its numpy path. Compiled kernels are cached next to this file (``__pycache__``).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

@dataclass(frozen=True)
class Kernels:
    ties: Callable
    dare: Callable
    bracket_counts: Callable
    sample_magnitudes: Callable
    fused: bool  # torch rounds add(a, b, alpha=x) once (a fused multiply-add): the kernels' last step does too


_lock = threading.Lock()
_state: dict = {}  # "kernels": Kernels or None, "why": why not; owned by get()/reset() under _lock


def _load() -> tuple[Optional[Kernels], str]:
    """The kernels (imported, compiled or loaded from numba's cache, probed) and the status line."""
    if os.environ.get("BLOCKMERGE_KERNELS", "").lower() in ("numpy", "off", "0"):
        return None, "off (BLOCKMERGE_KERNELS=numpy)"
    try:
        from . import _jit
        fused = _probe_fma(_jit.ties)
    except ImportError:
        return None, "numpy (pip install numba: TIES and DARE about 2x faster)"
    except Exception as e:  # e.g. no cache locator, no compiler for this CPU: the numpy path gives the same numbers
        return None, f"numpy (numba failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    if fused is None:
        return None, "numpy (the kernels do not round as torch does on this machine)"
    import numba
    return (Kernels(_jit.ties, _jit.dare, _jit.bracket_counts, _jit.sample_magnitudes, fused),
            f"numba {numba.__version__}")


def _probe_fma(ties: Callable) -> Optional[bool]:
    """Whether torch's ``add(a, d, alpha=x)`` rounds x · d + a once (fused) on this machine, in the vectorized
    body and in the tail alike: TIES with one task vector kept whole is A + alpha · δ, so the kernel run with
    either rounding is compared with torch's result. None when neither matches."""
    g = torch.Generator().manual_seed(12345)
    n = 2085  # several tiles and a tail, vectorized loops and their scalar remainders
    a = torch.randn(n, generator=g) * 3
    m = a + torch.randn(n, generator=g)
    alpha = 0.3  # not a power of two: fused and unfused results differ on many entries
    want = torch.add(a, m - a, alpha=alpha).numpy().view(np.int32)
    for fused in (True, False):
        out = np.empty(n, np.float32)
        ties(a.numpy(), (m.numpy(),), np.zeros(1, np.float32), np.float32(alpha), fused, out, np.zeros(1, bool), n)
        if np.array_equal(out.view(np.int32), want):
            return fused
    return None


def get() -> Optional[Kernels]:
    """The compiled kernels, or None when they cannot be used (:func:`status` says why). Loaded once."""
    with _lock:
        if "kernels" not in _state:
            _state["kernels"], _state["why"] = _load()
        return _state["kernels"]


def status() -> str:
    """What computes TIES and DARE on the CPU: ``numba X.Y`` or why numpy does."""
    get()
    return _state["why"]


def disable(error: BaseException) -> None:
    """Stop using the kernels in this process (one failed on real inputs): the numpy path takes over."""
    with _lock:
        _state["kernels"] = None
        _state["why"] = f"numpy (a kernel failed: {type(error).__name__})"


def reset() -> None:
    """Forget the loaded state (tests switch ``BLOCKMERGE_KERNELS``)."""
    with _lock:
        _state.clear()


def flat_input(t: Tensor) -> Optional[np.ndarray]:
    """A flat numpy view of an input the kernels read (fp16 as its uint16 bits, fp32), else None."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    t = t.detach()  # a live model's parameter may require grad; numpy() refuses those
    if t.dtype == torch.float16:
        return t.reshape(-1).view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float32:
        return t.reshape(-1).numpy()
    return None


def inputs(a: Tensor, ms: list[Tensor]) -> Optional[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
    """A and the task-vector models as the kernels take them, or None (another dtype, or task-vector models of
    different dtypes: the kernels take them as one typed tuple)."""
    fa = flat_input(a)
    fm = tuple(flat_input(m) for m in ms)
    if fa is None or any(x is None for x in fm) or len({x.dtype for x in fm}) != 1:
        return None
    return fa, fm
