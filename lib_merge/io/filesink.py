"""Stream a planned merge into a safetensors file.

The output header is computed from the plan before any tensor is read; the file is pre-sized and each
tensor (in chunks) is written at its final offset. Worker threads read, merge and cast chunks into pooled
buffers; the main thread writes them in file order and hashes the bytes as they are written, so the output's
sha256 costs no second pass. Only a few chunks are in memory at once. The file is written under a temporary
name (``.NAME.PID.partial``) in the target folder and renamed at the end; on any error or interrupt the temporary
file is removed, and one left by a killed process is removed by the next run that writes the same output.

What the user's machine can refuse (device, folder permissions, free space) is checked before the first byte is
written, and an ``OSError`` from writing becomes a one-line ``MergeError`` naming the output.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import shutil
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..methods.compute import merge_tensors
from ..dtypes import ITEMSIZE, ST_TO_TORCH
from ..errors import InternalError, MergeError, MergeInterrupted
from ..finite import InputReader, NonFinite
from ..lora.apply import add_lora_rows, row_block
from ..plan import KeyPlan, Plan
from ..roles import label
from .sources import Source

CHUNK_ELEMS = int(os.environ.get("BLOCKMERGE_CHUNK", 1 << 19))  # elements per chunk: small enough to stay in cache
BUF_BYTES = CHUNK_ELEMS * 4  # each raw/output buffer; 8-byte dtypes get half as many elements per chunk


DEVICE_NAMES = {"cuda": "CUDA", "mps": "MPS", "xpu": "XPU"}  # GPU backends a merge can compute on, besides cpu
NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


# -- pre-flight checks ---------------------------------------------------------------------------------------
def check_device(device: str | torch.device) -> torch.device:
    """The compute device, refused before any work when torch does not know it or this machine lacks it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or (dev.type != "cpu" and dev.type not in DEVICE_NAMES):
        raise MergeError(f"unknown device {str(device)!r} (cpu, cuda, cuda:N, mps or xpu), --device")
    if dev.type == "cpu":
        return dev
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    name = DEVICE_NAMES[dev.type]
    if backend is None or not backend.is_available():
        raise MergeError(f"{name} is not available, --device {device}")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise MergeError(f"{name} device {dev.index} does not exist ({count} found), --device {device}")
    return dev


def partial_path(target: Path, pid: int | None = None) -> Path:
    """Where ``target`` is written until it is complete: ``.NAME.PID.partial`` beside it."""
    return target.with_name(f".{target.name}.{os.getpid() if pid is None else pid}.partial")


class PartialFile:
    """The one way outputs are written: ``.NAME.PID.partial`` beside ``target``, opened exclusively; ``commit()``
    closes it (a full disk on a network file system may show only then), re-checks the target and renames;
    leaving the ``with`` block without a commit removes the partial file."""

    def __init__(self, target: Path, overwrite: bool):
        self.target, self.overwrite = target, overwrite
        self.tmp = partial_path(target)
        self.fd = -1
        self.done = False

    def __enter__(self) -> "PartialFile":
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise write_error(e, self.target) from None
        return self

    def commit(self) -> None:
        closing, self.fd = self.fd, -1
        _checked(os.close, self.target, closing)
        if self.target.is_dir():
            raise MergeError(f"output is a folder, {self.target}")
        if self.target.exists() and not self.overwrite:
            raise MergeError(f"output exists (use --overwrite to replace it), {self.target}")
        _checked(os.replace, self.target, self.tmp, self.target)
        self.done = True

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        if not self.done:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by another user
        return True
    return True


def remove_stale_partials(target: Path) -> list[str]:
    """Remove ``.NAME.PID.partial`` files of ``target`` whose process has ended (a killed run); one note each."""
    prefix, notes = f".{target.name}.", []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return notes
    for name in names:
        pid = name[len(prefix):-len(".partial")] if name.startswith(prefix) and name.endswith(".partial") else ""
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            os.unlink(target.parent / name)
        except FileNotFoundError:
            continue
        except OSError as e:
            notes.append(f"could not remove a partial file left by an interrupted run ({e.strerror}), "
                         f"{target.parent / name}")
            continue
        notes.append(f"removed a partial file left by an interrupted run (process {pid} has ended), "
                     f"{target.parent / name}")
    return notes


def _human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def write_error(e: OSError, target: Path) -> MergeError:
    """An OSError from creating, writing or renaming the output, as the one line a user can act on."""
    if e.errno in NO_SPACE:
        return MergeError(f"disk full while writing the output (the partial file was removed), {target}")
    if e.errno in NO_PERMISSION:
        return MergeError(f"cannot write to the output folder ({e.strerror}), {target.parent}")
    if e.errno == errno.EEXIST:
        return MergeError(f"this output is already being written by this process, {target}")
    return MergeError(f"cannot write the output ({e.strerror or e}), {target}")


def check_free_space(target: Path, nbytes: int) -> None:
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        return  # cannot tell (some network file systems): the write itself will say
    if free < nbytes:
        raise MergeError(f"not enough free space: the output needs {_human(nbytes)}, {_human(free)} free, {target}")


def data_bytes(plan: Plan) -> int:
    """Bytes of tensor data in the output (the file adds a header of a few hundred kB at most)."""
    total = 0
    for kp in plan.keys:
        n = ITEMSIZE[kp.out_dtype]
        for d in kp.shape:
            n *= d
        total += n
    return total


def prepare_output(target: Path, nbytes: int) -> list[str]:
    """Everything about the output that can fail, checked before the inputs are hashed and before any byte is
    written: stale partial files are removed, the folder accepts a new file (a real attempt: permission bits
    say nothing for root or read-only mounts) and has room for ``nbytes``. Returns notes for the user."""
    notes = remove_stale_partials(target)
    probe = partial_path(target)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.unlink(probe)
    except OSError as e:
        raise write_error(e, target) from None
    check_free_space(target, nbytes)
    return notes


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
    whole: bool  # compute the whole tensor (non-elementwise modes or methods, partial channels, Adjust, LoRA)


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


ARENA_MAX = 64 << 20  # largest whole input a thread keeps a buffer for between tasks (bytes)


class _Scratch(threading.local):
    """Per-thread read and fp32 buffers, one per input (grown to the inputs a task reads), and whole-tensor
    read buffers for modes that stream their inputs (reused: a fresh buffer costs a page fault per 4 KiB)."""

    def __init__(self):
        self.raw: list[torch.Tensor] = []
        self.f32: list[torch.Tensor] = []
        self.arena: list[torch.Tensor] = []

    def whole(self, i: int, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` for input ``i`` of a whole-tensor task."""
        if nbytes > ARENA_MAX:
            return torch.empty(nbytes, dtype=torch.uint8)
        while len(self.arena) <= i:
            self.arena.append(torch.empty(0, dtype=torch.uint8))
        if self.arena[i].numel() < nbytes:
            self.arena[i] = torch.empty(nbytes, dtype=torch.uint8)
        return self.arena[i]

    def ensure(self, n: int) -> "_Scratch":
        while len(self.raw) < n:
            self.raw.append(torch.empty(BUF_BYTES, dtype=torch.uint8))
            self.f32.append(torch.empty(CHUNK_ELEMS, dtype=torch.float32))
        return self


WHOLE_BUDGET = 1 << 30  # bytes of whole-tensor working memory the threads may hold at once


class _Budget:
    """Bounds the working memory of whole-tensor tasks across threads: a task waits while others hold its
    share of the budget; one larger than the budget runs alone. (Chunked tasks use fixed scratch buffers.)"""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cond:
            while self.used > 0 and self.used + n > self.budget:
                self.cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def whole_bytes(kp: KeyPlan, inputs: int) -> int:
    """Working memory of one whole-tensor task, estimated: fp32 copies of every input and of a few
    intermediates (a task vector's sign, sum and count; a top-k's magnitudes)."""
    n = 1
    for d in kp.shape:
        n *= d
    return 4 * n * (inputs + 4)


def whole_task(plan: Plan, kp: KeyPlan) -> bool:
    """The key's value needs the whole tensor at once: a non-elementwise formula, partial channels, Adjust or a
    LoRA patch."""
    return bool(kp.lora) or kp.action == "merge" and (kp.channels is not None or kp.adjust is not None
                                                      or not plan.formula.elementwise)


def _streams_lora(plan: Plan, kp: KeyPlan) -> bool:
    """A LoRA-patched key that only the patch makes whole (the formula alone would stream it)."""
    return bool(kp.lora) and not (kp.action == "merge" and (kp.channels is not None or kp.adjust is not None
                                                            or not plan.formula.elementwise))


def _tasks(plan: Plan, offsets: dict[str, tuple[int, int]], in_items: Callable[[KeyPlan], int],
           lora_rows: bool = True) -> list[_Task]:
    """The output in write order: whole tensors, or chunks. ``lora_rows``: plain-LoRA keys go by blocks of rows
    (CPU sinks; the LoRA factors live on the CPU)."""
    tasks = []
    for kp in sorted(plan.keys, key=lambda k: k.key):
        start, end = offsets[kp.key]
        item = ITEMSIZE[kp.out_dtype]
        numel = (end - start) // item
        chunk = min(CHUNK_ELEMS, BUF_BYTES // max(item, in_items(kp)))
        whole = whole_task(plan, kp)
        if whole and lora_rows and _streams_lora(plan, kp):  # plain LoRA: patched block of rows by block, as add_lora does
            rows = row_block(kp.lora, kp.shape)
            whole = rows is None or rows > chunk
            chunk = rows or chunk
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
        self.device = check_device(device)
        self.budget = _Budget(WHOLE_BUDGET)
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
            srcs = [(label(i), s, kp.key) for i, s in enumerate(self.sources[: self.plan.formula.models])]
        else:
            src, key = self._src_for(kp)
            role = {"copy_a": "A", "copy_b": "B"}.get(kp.action, "VAE")
            srcs = [(role, src, key)]
        return [(f"{role} ({s.path.name})", lambda start, n, s=s, k=k: s.read(k).reshape(-1)[start:start + n])
                for role, s, k in srcs]

    def _whole_input(self, src: Source, kp: KeyPlan, scratch: "_Scratch", i: int) -> torch.Tensor:
        """Input ``i`` of a streamed whole-tensor task in its file dtype, never to be written: on the CPU a view
        of the mapped file where the source can map (no copy), else read into the thread's reused buffer."""
        if self.device.type == "cpu" and hasattr(src, "mapped"):
            return src.mapped(kp.key)
        t = src.read_bytes_into(kp.key, scratch.whole(i, src.infos[kp.key].nbytes)).view(kp.shape)
        return t.to(device=self.device)

    def _release_inputs(self, srcs: list[Source], ins: list[torch.Tensor]) -> None:
        """Drop the pages of :meth:`_whole_input`'s mapped views from this process (file pages only: never
        advise anonymous memory here)."""
        if self.device.type != "cpu":
            return
        for s, t in zip(srcs, ins):
            if hasattr(s, "mapped"):
                s.unmap_pages(t)

    def _in_itemsize(self, kp: KeyPlan) -> int:
        if kp.action == "merge":
            srcs = [(s, kp.key) for s in self.sources[: self.plan.formula.models]]
        else:
            srcs = [self._src_for(kp)]
        return max(ITEMSIZE[s.infos[k].dtype] for s, k in srcs)

    def _run(self, task: _Task, scratch: _Scratch, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (uint8) with the task's output bytes; returns the filled view."""
        kp = task.kp
        out_t = ST_TO_TORCH[kp.out_dtype]
        nbytes = task.elem_count * ITEMSIZE[kp.out_dtype]
        if task.whole:  # a "copy_a" key is whole only when LoRAs patch it: its one input is A
            srcs = self.sources[: self.plan.formula.models] if kp.action == "merge" else self.sources[:1]
            need = whole_bytes(kp, len(srcs))
            self.budget.acquire(need)
            try:
                if self.plan.formula.mode.streams:  # reads its inputs in their own dtype and never writes them
                    ins = [self._whole_input(s, kp, scratch, i) for i, s in enumerate(srcs)]
                else:  # an fp32 copy of each input, which the formula may overwrite (from the mapped file view)
                    views = [self._whole_input(s, kp, scratch, i) for i, s in enumerate(srcs)]
                    ins = [v.to(device=self.device, dtype=torch.float32, copy=True) for v in views]
                    self._release_inputs(srcs, views)
                    del views
                res = merge_tensors(self.plan.formula, kp, ins, device=self.device, owned=True)
                if self.plan.formula.mode.streams:
                    self._release_inputs(srcs, ins)
                del ins
                return res.to(device="cpu", dtype=out_t).reshape(-1).view(torch.uint8)
            finally:
                self.budget.release(need)  # the fp32 temporaries are gone: only the output-dtype result is kept
        if kp.lora:  # a plain-LoRA key in whole rows (_tasks): the formula's chunk, then the rows' patches
            return self._patched_rows(task, scratch, out)
        if kp.action != "merge":
            src, key = self._src_for(kp)
            info = src.infos[key]
            if info.dtype == kp.out_dtype:
                return src.read_bytes_into(key, out, task.elem_start, task.elem_count).view(torch.uint8)
            t = src.read_bytes_into(key, scratch.ensure(1).raw[0], task.elem_start, task.elem_count)
            view = out[:nbytes].view(out_t)
            view.copy_(t)
            return out[:nbytes]
        srcs = self.sources[: self.plan.formula.models]
        scratch.ensure(len(srcs))
        tensors = [s.read_bytes_into(kp.key, scratch.raw[i], task.elem_start, task.elem_count)
                   for i, s in enumerate(srcs)]
        if self.device.type == "cpu":
            res = merge_tensors(self.plan.formula, kp, tensors, scratch.f32)
            view = out[:nbytes].view(out_t)
            view.copy_(res.reshape(-1))
        else:
            res = merge_tensors(self.plan.formula, kp, [t.to(self.device, non_blocking=False) for t in tensors],
                                device=self.device)
            view = out[:nbytes].view(out_t)
            view.copy_(res.reshape(-1).to(dtype=out_t).cpu())
        return out[:nbytes]

    def _patched_rows(self, task: _Task, scratch: _Scratch, out: torch.Tensor) -> torch.Tensor:
        """A chunk of whole rows of a LoRA-patched key: A's values (or the formula's) in fp32, plus the LoRA rows
        (``add_lora_rows``: the blocks ``add_lora`` adds on the whole tensor), cast to the output dtype."""
        kp = task.kp
        n = task.elem_count
        srcs = self.sources[: self.plan.formula.models] if kp.action == "merge" else self.sources[:1]
        scratch.ensure(len(srcs))
        tensors = [s.read_bytes_into(kp.key, scratch.raw[i], task.elem_start, n) for i, s in enumerate(srcs)]
        if kp.action == "merge":
            res = merge_tensors(self.plan.formula, replace(kp, lora=()), tensors, scratch.f32)
        else:
            res = scratch.f32[0][:n]
            res.copy_(tensors[0])
        add_lora_rows(kp.lora, res.reshape(-1), kp.shape, task.elem_start)
        nbytes = n * ITEMSIZE[kp.out_dtype]
        out[:nbytes].view(ST_TO_TORCH[kp.out_dtype]).copy_(res.reshape(-1))
        return out[:nbytes]

    # -- the whole file --------------------------------------------------------------------------------
    def write(self, target: Path, overwrite: bool, progress: Callable[[int, int], None] | None = None,
              cancel: Callable[[], bool] | None = None) -> str:
        """Write the file; returns its sha256."""
        header, offsets = build_header(self.plan, self.metadata)
        tasks = _tasks(self.plan, offsets, self._in_itemsize, lora_rows=self.device.type == "cpu")
        total = max((e for _, e in offsets.values()), default=len(header))
        target = Path(target)
        check_free_space(target, total)
        with PartialFile(target, overwrite) as out:
            fd = out.fd
            _checked(os.ftruncate, target, fd, total)
            h = hashlib.sha256()
            _pwrite_all(fd, memoryview(header), 0, target)
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
                            written = self._drain_one(fd, h, pending, pool, written, total, progress, cancel, target)
                    while pending:
                        written = self._drain_one(fd, h, pending, pool, written, total, progress, cancel, target)
                except BaseException:
                    for _, f in pending:
                        f.cancel()
                    raise
            if written != total:
                raise InternalError(f"wrote {written} of {total} bytes, {target}")
            out.commit()
            self.plan.report.notes.extend(self.nonfinite.notes())
            return h.hexdigest()

    @staticmethod
    def _drain_one(fd, h, pending, pool, written, total, progress, cancel, target) -> int:
        task, fut = pending.popleft()
        buf, data = fut.result()
        try:
            if task.offset != written:
                raise InternalError(f"out-of-order write at {task.kp.key}")
            mv = memoryview(data.numpy())
            _pwrite_all(fd, mv, task.offset, target)
            h.update(mv)
        finally:
            pool.put(buf)
        written += len(mv)
        if progress:
            progress(written, total)
        if cancel and cancel():
            raise MergeInterrupted("merge interrupted, nothing written")
        return written


def _checked(call: Callable, target: Path, *args) -> None:
    try:
        call(*args)
    except OSError as e:
        raise write_error(e, target) from None


def _pwrite_all(fd: int, data: memoryview, offset: int, target: Path) -> None:
    """Write all of ``data`` at ``offset`` (loops over short writes); disk full etc. name the output."""
    n = 0
    try:
        while n < len(data):
            n += os.pwrite(fd, data[n:], offset + n)
    except OSError as e:
        raise write_error(e, target) from None
