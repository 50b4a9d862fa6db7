"""Merge chains: a recipe standing where a model goes.

A nested recipe is opened as a :class:`RecipeSource`: a source whose tensors are the nested merge's output,
computed key by key (chunk by chunk where the formula allows) when the outer merge reads them, by the same code
that writes a file (``FileSink._run``). So a chain needs no intermediate file, reads each leaf tensor when the
outer merge needs it, and its values are exactly those of saving each step and merging the saved files: the
inner result is cast to the step's output dtype, as its file would hold it.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from .dtypes import ITEMSIZE, ST_TO_TORCH
from .errors import MergeError
from .io.filesink import BUF_BYTES, CHUNK_ELEMS, FileSink, _Scratch, _Task, whole_task
from .io.sources import Source, TensorInfo
from .plan import KeyPlan, Plan


class RecipeSource(Source):
    """The output of ``plan`` over ``sources`` (plan order), read like a file: ``infos`` are the step's output
    keys, dtypes and shapes. Thread-safe: the outer sink's workers read chunks of different keys at once."""

    def __init__(self, name: str, plan: Plan, sources: list[Source], bake: Source | None, device: str = "cpu"):
        self.path = Path(name)
        self.plan = plan
        self.leaves = sources
        self._sink = FileSink(plan, sources, bake, {}, threads=1, device=device)
        self._by_key: dict[str, KeyPlan] = plan.by_key()
        self.infos = {kp.key: TensorInfo(kp.out_dtype, tuple(kp.shape)) for kp in plan.keys}
        self.metadata: dict[str, str] = {}
        self.size, self.mtime_ns, self.bytes_read = 0, 0, 0
        self._scratch = _Scratch()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._whole: dict[str, list] = {}  # key -> [uint8 result, bytes not yet handed out]

    def read_bytes_into(self, key: str, buf: torch.Tensor, elem_start: int = 0,
                        elem_count: int | None = None) -> torch.Tensor:
        """Elements [elem_start, elem_start + elem_count) of the step's output for ``key``, into ``buf`` (uint8);
        returns a typed view, as :meth:`SafetensorsSource.read_bytes_into` does."""
        kp = self._by_key.get(key)
        if kp is None:
            raise MergeError(f"key not found, {self.path} key {key}")
        info = self.infos[key]
        item = ITEMSIZE[kp.out_dtype]
        count = info.numel - elem_start if elem_count is None else elem_count
        nbytes = count * item
        if whole_task(self.plan, kp):
            data = self._whole_bytes(kp, elem_start * item, nbytes)
            buf[:nbytes].copy_(data)
        else:  # in the inner sink's own chunk sizes (its read and fp32 buffers bound them)
            step = min(CHUNK_ELEMS, BUF_BYTES // max(item, self._sink._in_itemsize(kp)))
            for s in range(elem_start, elem_start + count, step):
                n = min(step, elem_start + count - s)
                pos = (s - elem_start) * item
                self._sink._run(_Task(kp, 0, s, n, False), self._scratch, buf[pos:pos + n * item])
        self.bytes_read += nbytes
        return buf[:nbytes].view(ST_TO_TORCH[kp.out_dtype])

    def _whole_bytes(self, kp: KeyPlan, start: int, nbytes: int) -> torch.Tensor:
        """Bytes [start, start + nbytes) of a whole-tensor key's result: computed once (the outer sink reads it
        in chunks, perhaps from several threads), kept until every byte was handed out."""
        with self._lock:
            key_lock = self._key_locks.setdefault(kp.key, threading.Lock())
        with key_lock:
            with self._lock:
                entry = self._whole.get(kp.key)
            if entry is None:
                total = self.infos[kp.key].nbytes
                data = self._sink._run(_Task(kp, 0, 0, self.infos[kp.key].numel, True), self._scratch,
                                       torch.empty(0, dtype=torch.uint8))
                entry = [data, total]
                with self._lock:
                    self._whole[kp.key] = entry
            part = entry[0][start:start + nbytes]
            with self._lock:
                entry[1] -= nbytes
                if entry[1] <= 0:
                    self._whole.pop(kp.key, None)
                    self._key_locks.pop(kp.key, None)
            return part

    def close(self) -> None:
        self._whole.clear()
