"""Stream a planned merge into a safetensors file.

The output header is computed from the plan before any tensor is read; the file is pre-sized and each
tensor (in chunks) is written at its final offset. Worker threads read, merge and cast chunks into pooled
buffers; the main thread writes them in file order and hashes the bytes as they are written, so the output's
sha256 costs no second pass. Only a few chunks are in memory at once. The file is written under a temporary
name in the target folder and renamed at the end; on any error the temporary file is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .compute import merge_tensors
from .dtypes import ITEMSIZE, ST_TO_TORCH
from .errors import MergeError, MergeInterrupted
from .finite import InputReader, NonFinite
from .plan import KeyPlan, Plan
from .sources import Source

CHUNK_ELEMS = int(os.environ.get("BLOCKMERGE_CHUNK", 1 << 19))  # elements per chunk: small enough to stay in cache
BUF_BYTES = CHUNK_ELEMS * 4  # each raw/output buffer; 8-byte dtypes get half as many elements per chunk


def build_header(plan: Plan, metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (starting with ``{"``, space-padded to 8 bytes) and each key's absolute byte range."""
    order = sorted(plan.keys, key=lambda k: k.key)
    entries: dict = {"__metadata__": metadata}
    offsets = {}
    pos = 0
    for kp in order:
        n = 1
        for d in kp.shape:
            n *= d
        size = n * ITEMSIZE[kp.out_dtype]
        entries[kp.key] = {"dtype": kp.out_dtype, "shape": list(kp.shape), "data_offsets": [pos, pos + size]}
        offsets[kp.key] = (pos, pos + size)
        pos += size
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    header = len(raw).to_bytes(8, "little") + raw
    return header, {k: (s + start, e + start) for k, (s, e) in offsets.items()}


@dataclass
class _Task:
    kp: KeyPlan
    offset: int  # absolute output offset of this chunk
    elem_start: int
    elem_count: int
    whole: bool  # compute the whole tensor (non-elementwise modes, partial channels)


class _Pool:
    """A fixed set of reusable byte buffers (bounded memory, no allocation churn)."""

    def __init__(self, n: int, size: int):
        self.q: queue.Queue = queue.Queue()
        for _ in range(n):
            self.q.put(torch.empty(size, dtype=torch.uint8))

    def get(self) -> torch.Tensor:
        return self.q.get()

    def put(self, buf: torch.Tensor) -> None:
        self.q.put(buf)


class _Scratch(threading.local):
    def __init__(self):
        self.raw = [torch.empty(BUF_BYTES, dtype=torch.uint8) for _ in range(3)]
        self.f32 = [torch.empty(CHUNK_ELEMS, dtype=torch.float32) for _ in range(3)]


def _tasks(plan: Plan, offsets: dict[str, tuple[int, int]], in_items: Callable[[KeyPlan], int]) -> list[_Task]:
    tasks = []
    for kp in sorted(plan.keys, key=lambda k: k.key):
        start, end = offsets[kp.key]
        item = ITEMSIZE[kp.out_dtype]
        numel = (end - start) // item
        chunk = min(CHUNK_ELEMS, BUF_BYTES // max(item, in_items(kp)))
        whole = kp.action in ("merge",) and (kp.channels is not None or not plan.mode.elementwise)
        if whole or numel <= chunk:
            tasks.append(_Task(kp, start, 0, numel, whole))
            continue
        for s in range(0, numel, chunk):
            n = min(chunk, numel - s)
            tasks.append(_Task(kp, start + s * item, s, n, False))
    return tasks


class FileSink:
    def __init__(self, plan: Plan, sources: list[Source], bake: Source | None, metadata: dict[str, str],
                 threads: int | None = None, device: str = "cpu"):
        self.plan = plan
        self.sources = sources
        self.bake = bake
        self.metadata = metadata
        self.threads = max(1, threads or min(os.cpu_count() or 1, 4))
        self.device = torch.device(device)
        self.nonfinite = NonFinite()  # NaN/Inf found while writing; notes added to plan.report at the end
        self.bake_map: dict[str, str] = {}
        if bake is not None:
            prefixed = any(k.startswith("first_stage_model.") for k in bake.infos)
            self.bake_map = {k.key: (k.key if prefixed else k.key[len("first_stage_model."):])
                             for k in plan.keys if k.action == "bake_vae"}

    # -- one task --------------------------------------------------------------------------------------
    def _src_for(self, kp: KeyPlan) -> tuple[Source, str]:
        if kp.action == "copy_b":
            return self.sources[1], kp.key
        if kp.action == "bake_vae":
            return self.bake, self.bake_map[kp.key]
        return self.sources[0], kp.key

    def _input_readers(self, kp: KeyPlan) -> list[InputReader]:
        """The inputs a key's values come from (read again only when its output chunk holds NaN/Inf)."""
        if kp.action == "merge":
            srcs = [("ABC"[i], s, kp.key) for i, s in enumerate(self.sources[: self.plan.mode.models])]
        else:
            src, key = self._src_for(kp)
            role = {"copy_a": "A", "copy_b": "B"}.get(kp.action, "VAE")
            srcs = [(role, src, key)]
        return [(f"{role} ({s.path.name})", lambda start, n, s=s, k=k: s.read(k).reshape(-1)[start:start + n])
                for role, s, k in srcs]

    def _in_itemsize(self, kp: KeyPlan) -> int:
        if kp.action == "merge":
            srcs = [(s, kp.key) for s in self.sources[: self.plan.mode.models]]
        else:
            srcs = [self._src_for(kp)]
        return max(ITEMSIZE[s.infos[k].dtype] for s, k in srcs)

    def _run(self, task: _Task, scratch: _Scratch, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (uint8) with the task's output bytes; returns the filled view."""
        kp = task.kp
        out_t = ST_TO_TORCH[kp.out_dtype]
        nbytes = task.elem_count * ITEMSIZE[kp.out_dtype]
        if task.whole:
            tensors = [s.read(kp.key) for s in self.sources[: self.plan.mode.models]]
            res = merge_tensors(self.plan.mode, kp, tensors, device=self.device)
            return res.to(device="cpu", dtype=out_t).reshape(-1).view(torch.uint8)
        if kp.action != "merge":
            src, key = self._src_for(kp)
            info = src.infos[key]
            if info.dtype == kp.out_dtype:
                return src.read_bytes_into(key, out, task.elem_start, task.elem_count).view(torch.uint8)
            t = src.read_bytes_into(key, scratch.raw[0], task.elem_start, task.elem_count)
            view = out[:nbytes].view(out_t)
            view.copy_(t)
            return out[:nbytes]
        srcs = self.sources[: self.plan.mode.models]
        tensors = [s.read_bytes_into(kp.key, scratch.raw[i], task.elem_start, task.elem_count)
                   for i, s in enumerate(srcs)]
        if self.device.type == "cpu":
            res = merge_tensors(self.plan.mode, kp, tensors, scratch.f32)
            view = out[:nbytes].view(out_t)
            view.copy_(res.reshape(-1))
        else:
            res = merge_tensors(self.plan.mode, kp, [t.to(self.device, non_blocking=False) for t in tensors],
                                device=self.device)
            view = out[:nbytes].view(out_t)
            view.copy_(res.reshape(-1).to(dtype=out_t).cpu())
        return out[:nbytes]

    # -- the whole file --------------------------------------------------------------------------------
    def write(self, target: Path, overwrite: bool, progress: Callable[[int, int], None] | None = None,
              cancel: Callable[[], bool] | None = None) -> str:
        """Write the file; returns its sha256."""
        header, offsets = build_header(self.plan, self.metadata)
        tasks = _tasks(self.plan, offsets, self._in_itemsize)
        total = max((e for _, e in offsets.values()), default=len(header))
        target = Path(target)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        ok = False
        try:
            os.ftruncate(fd, total)
            h = hashlib.sha256()
            os.pwrite(fd, header, 0)
            h.update(header)
            written = len(header)
            window = self.threads * 2
            pool = _Pool(window + 1, BUF_BYTES)
            scratch = _Scratch()

            def job(task: _Task):
                buf = pool.get()
                try:
                    data = self._run(task, scratch, buf)
                    self.nonfinite.check_chunk(task.kp, data, task.elem_start, task.elem_count,
                                               lambda: self._input_readers(task.kp))
                    return buf, data
                except BaseException:
                    pool.put(buf)
                    raise

            pending: deque = deque()
            it = iter(tasks)
            with ThreadPoolExecutor(self.threads, thread_name_prefix="blockmerge") as ex:
                try:
                    for task in it:
                        pending.append((task, ex.submit(job, task)))
                        if len(pending) >= window:
                            written = self._drain_one(fd, h, pending, pool, written, total, progress, cancel)
                    while pending:
                        written = self._drain_one(fd, h, pending, pool, written, total, progress, cancel)
                except BaseException:
                    for _, f in pending:
                        f.cancel()
                    raise
            if written != total:
                raise MergeError(f"internal error: wrote {written} of {total} bytes, {target}")
            os.close(fd)
            fd = -1
            if target.exists() and not overwrite:
                raise MergeError(f"output exists (use --overwrite), {target}")
            os.replace(tmp, target)
            ok = True
            self.plan.report.notes.extend(self.nonfinite.notes())
            return h.hexdigest()
        finally:
            if fd >= 0:
                os.close(fd)
            if not ok:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    @staticmethod
    def _drain_one(fd, h, pending, pool, written, total, progress, cancel) -> int:
        task, fut = pending.popleft()
        buf, data = fut.result()
        try:
            if task.offset != written:
                raise MergeError(f"internal error: out-of-order write at {task.kp.key}")
            mv = memoryview(data.numpy())
            n = 0
            while n < len(mv):
                n += os.pwrite(fd, mv[n:], task.offset + n)
            h.update(mv)
        finally:
            pool.put(buf)
        written += len(mv)
        if progress:
            progress(written, total)
        if cancel and cancel():
            raise MergeInterrupted("merge interrupted, nothing written")
        return written
