"""A streamed safetensors sink for LoRA work: the header first, then one tensor at a time at its offset.

Like the merge's file sink, the file is written as ``.NAME.PID.partial`` beside the target and renamed at the
end (removed on any error), so a failed run never leaves a half file under the real name; the caller has
checked that the output is no input and does not exist unless overwriting (``merge.check_output_path``).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..dtypes import ITEMSIZE, ST_TO_TORCH
from ..errors import InternalError
from ..io.filesink import PartialFile, _pwrite_all, prepare_output


@dataclass(frozen=True)
class Entry:
    key: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def header_bytes(entries: list[Entry], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Header (keys sorted, space-padded to 8 bytes) and each key's absolute start offset."""
    table: dict = {"__metadata__": metadata}
    starts, pos = {}, 0
    for e in sorted(entries, key=lambda e: e.key):
        table[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        starts[e.key] = pos
        pos += e.nbytes
    raw = json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    head = len(raw).to_bytes(8, "little") + raw
    return head, {k: v + len(head) for k, v in starts.items()}


def write_streamed(target: Path, entries: Iterable[Entry], produce: Callable[[str], torch.Tensor],
                   metadata: dict[str, str], overwrite: bool) -> str:
    """Write ``produce(key)`` for every entry (in key order), cast to the entry's dtype; returns the sha256."""
    entries = sorted(entries, key=lambda e: e.key)
    head, starts = header_bytes(entries, metadata)
    total = len(head) + sum(e.nbytes for e in entries)
    target = Path(target)
    prepare_output(target, total)
    with PartialFile(target, overwrite) as out:
        h = hashlib.sha256()
        _pwrite_all(out.fd, memoryview(head), 0, target)
        h.update(head)
        for e in entries:
            t = produce(e.key)
            if tuple(t.shape) != e.shape:
                raise InternalError(f"{e.key} produced shape {tuple(t.shape)}, expected {e.shape}")
            data = t.detach().to("cpu", ST_TO_TORCH[e.dtype]).contiguous().reshape(-1).view(torch.uint8).numpy()
            mv = memoryview(data)
            _pwrite_all(out.fd, mv, starts[e.key], target)
            h.update(mv)
        out.commit()
        return h.hexdigest()
