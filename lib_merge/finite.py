"""NaN/Inf bookkeeping for a file merge, done on each chunk as it is written (no second pass over the data).

The common case costs one fp32-accumulated sum per output chunk, over bytes that are already in cache: a finite
sum means every value is finite (a NaN or Inf makes the sum NaN or Inf). Only when the sum is not finite (a
NaN/Inf, or, rarely, an overflow of the sum itself) are the values counted exactly, and then the chunk's inputs
are read again to say which input holds them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .dtypes import ST_TO_TORCH, is_float
from .plan import KeyPlan

# (role, read(elem_start, elem_count) -> tensor) for each input that feeds a key
InputReader = tuple[str, Callable[[int, int], torch.Tensor]]


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf values in a float tensor (any float dtype, fp8 included)."""
    if t.numel() == 0:
        return 0
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.to(torch.float32)
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return 0
    return int(t.numel() - torch.isfinite(t).sum())


@dataclass
class _Tally:
    count: int = 0
    first: str | None = None  # smallest key (the file order) with a NaN/Inf

    def add(self, key: str, n: int) -> None:
        self.count += n
        if self.first is None or key < self.first:
            self.first = key


@dataclass
class NonFinite:
    """NaN/Inf counts for the output and for each input role (A, B, C, VAE), with the first key of each."""

    output: _Tally = field(default_factory=_Tally)
    inputs: dict[str, _Tally] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check_chunk(self, kp: KeyPlan, data: torch.Tensor, elem_start: int, elem_count: int,
                    inputs: Callable[[], list[InputReader]]) -> None:
        """``data``: the chunk's output bytes (uint8). ``inputs`` is called only when the chunk holds NaN/Inf."""
        if not is_float(kp.out_dtype):
            return
        n = count_nonfinite(data.view(ST_TO_TORCH[kp.out_dtype]))
        if not n:
            return
        found = [(role, count_nonfinite(read(elem_start, elem_count))) for role, read in inputs()]
        with self.lock:
            self.output.add(kp.key, n)
            for role, m in found:
                if m:
                    self.inputs.setdefault(role, _Tally()).add(kp.key, m)

    def notes(self) -> list[str]:
        """One line per input that holds NaN/Inf at merged/copied keys, then one for the output."""
        out = [f"model {role} holds NaN/Inf: {t.count} values, first at {t.first}"
               for role, t in sorted(self.inputs.items())]
        if self.output.count:
            cause = "" if self.inputs else " (the inputs are finite there: the values overflow the output dtype)"
            out.append(f"the output holds NaN/Inf: {self.output.count} values, first at {self.output.first}{cause}")
        return out


