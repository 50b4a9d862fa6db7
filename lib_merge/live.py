"""The live sink: apply a planned merge in place to a loaded model's parameters, re-merge incrementally,
roll back on interrupt, restore the original weights exactly.

Host-independent: the host adapter (``lib_merge.webui``) supplies a :class:`LiveTarget`, i.e. the mapping from
file keys to live parameters plus hooks around reads and writes. Source tensors are cached in their file dtype
(A's cache is both a merge input and the restore source, so restore is exact by construction), read once.

The work is memory-bandwidth bound, so it streams: each tensor is processed in cache-sized chunks: the chunk of
A and B is read from the file into its place in the cache, A's chunk is checked against the live weights (at the
first write of a key), merged in fp32 scratch buffers that are reused, and written into the live parameter.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch

from .compute import merge_tensors
from .dtypes import ST_TO_TORCH
from .errors import MergeError, MergeInterrupted
from . import pages
from .plan import KeyPlan, Plan, build_plan
from .recipe import Recipe
from .sources import Source, open_source

CHUNK = 1 << 20  # elements per chunk (4 MiB of fp32): cache-friendly, and few GIL round trips per tensor


class LiveTarget(Protocol):
    """What the host provides. All keys are file keys (``model.diffusion_model.…``)."""

    def params(self) -> dict[str, torch.Tensor]:
        """File key -> live parameter tensor, looked up now (low-VRAM hosts move ``.data`` around)."""

    def prepare(self, keys: Iterable[str]) -> None:
        """Before reading/hashing/writing: put host-side patches (e.g. baked LoRA) back so params hold A."""

    def written(self, keys: Iterable[str]) -> None:
        """After every write: clear host caches that depend on these weights."""


@dataclass(frozen=True)
class SourceId:
    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> "SourceId":
        real = os.path.realpath(path)
        st = os.stat(real)
        return cls(real, st.st_size, st.st_mtime_ns)


class TensorCache:
    """A file's tensors in the file's dtype: in RAM (``cpu``), on a GPU (``cuda…``), or mapped (``mmap``).

    ``cpu`` and ``mmap`` first map safetensors files (no copy: the first merge reads straight from the page
    cache); ``cpu`` then copies the mapped tensors into one anonymous arena in the background
    (:meth:`materialize`), after which the cache no longer touches the file.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        self.id = SourceId.of(path)
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}
        self.bytes_read = 0
        self._src: Source | None = None
        self._mm = None
        self._mapped: set[str] = set()
        self._stop = threading.Event()

    def source(self) -> Source:
        if self._src is None:
            self._src = open_source(self.id.path)
        return self._src

    @staticmethod
    def _arena(sizes: list[int]) -> list[torch.Tensor]:
        """One anonymous mapping cut into uint8 slots of ``sizes`` bytes (transparent huge pages where allowed):
        far fewer page faults than one allocation per tensor."""
        total = sum((n + 63) // 64 * 64 for n in sizes)
        mm = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena = torch.frombuffer(mm, dtype=torch.uint8)  # the views keep the mapping alive
        pages.advise(arena, pages.HUGEPAGE)
        # no MADV_POPULATE_WRITE of the whole arena: one long call holds the mmap lock and stalls every other
        # thread that maps memory (seconds on a VM); copy_ faults it in 2 MiB huge pages as it goes
        slots, off = [], 0
        for n in sizes:
            slots.append(arena[off:off + n])
            off += (n + 63) // 64 * 64
        return slots

    def chunk(self, key: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of ``key`` (flattened), reading them now if they are not cached yet."""
        return self.get(key).reshape(-1)[start:end]

    def get(self, key: str, populate: bool = True) -> torch.Tensor:
        """``key`` from the cache, reading (mapping) it now if needed. ``populate``: map its pages now."""
        t = self.tensors.get(key)
        if t is not None:
            return t
        t = self.peek(key, populate)
        if self._mappable():
            self._mapped.add(key)
        elif self.device not in ("cpu", "mmap"):
            t = t.to(self.device)
        self.tensors[key] = t
        return t

    def peek(self, key: str, populate: bool = True) -> torch.Tensor:
        """``key`` read from the file (a mapped view where possible) without keeping it in the cache."""
        src = self.source()
        info = src.infos.get(key)
        if info is None:
            raise MergeError(f"key not found, {src.path} key {key}")
        self.bytes_read += info.nbytes
        return self._mmap_view(info, populate) if self._mappable() else src.read(key)

    def put(self, key: str, t: torch.Tensor) -> None:
        """Cache ``t`` as ``key``'s file tensor (the caller guarantees it holds the file's exact values)."""
        if self.device not in ("cpu", "mmap"):
            t = t.to(self.device)
        self.tensors[key] = t

    def _mappable(self) -> bool:
        return self.device in ("mmap", "cpu") and hasattr(self.source(), "data_start")

    def _mmap_view(self, info, populate: bool = True) -> torch.Tensor:
        if self._mm is None:
            with open(self.id.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: never written through these views
            t = torch.frombuffer(self._mm, dtype=ST_TO_TORCH[info.dtype], count=info.numel, offset=info.start)
        if populate:
            pages.advise(t, pages.POPULATE_READ)  # one call maps the tensor's cached pages: no fault per page
        return t.reshape(info.shape)

    def release(self, keys: Iterable[str]) -> None:
        """Drop mapped tensors' pages from this process's RSS (they stay in the page cache and come back on the
        next access): mapped sources then cost no resident memory. One call for the span of ``keys``."""
        if self._mm is None:
            return
        known = self.source().infos
        infos = [known[k] for k in keys if k in known]
        if not infos:
            return
        start = min(i.start for i in infos)
        end = max(i.end for i in infos)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = torch.frombuffer(self._mm, dtype=torch.uint8, count=1)
        # file pages: dropping them from this mapping loses nothing (they stay in the page cache)
        pages.advise_range(base.data_ptr() + start, end - start, pages.DONTNEED)

    def materialize(self) -> int:
        """Copy the mapped tensors into RAM (one arena) so the cache stops depending on the file. Returns bytes
        copied. Runs in the background after a merge; stops early when the cache is closed."""
        if self.device != "cpu":
            return 0
        keys = [k for k in list(self._mapped) if k in self.tensors]
        if not keys:
            return 0
        src = self.source()
        keys.sort(key=lambda k: src.infos[k].start)  # file order: released spans are contiguous
        slots = self._arena([src.infos[k].nbytes for k in keys])
        copied = 0
        for k, raw in zip(keys, slots):
            if self._stop.is_set():
                break
            view = self.tensors[k]
            slot = raw.view(view.dtype)
            slot.copy_(view.reshape(-1))
            self.tensors[k] = slot.view(view.shape)
            self.release([k])  # at once: mapped pages never pile up in RSS beside the copies
            self._mapped.discard(k)
            copied += slot.numel() * slot.element_size()
        if not self._mapped:
            self._mm = None  # unmapped once the last view is gone: the file's pages leave our RSS
        return copied

    def valid(self) -> bool:
        try:
            return SourceId.of(self.id.path) == self.id
        except OSError:
            return False

    def close(self) -> None:
        self._stop.set()
        if self._src is not None:
            self._src.close()
            self._src = None
        self.tensors.clear()
        self._mapped.clear()
        self._mm = None


Signature = tuple  # (mode, source ids, alpha, beta, channels) or ORIGINAL
ORIGINAL: Signature = ("original",)


@dataclass
class ApplyReport:
    written: int = 0  # tensors written in this request
    unchanged: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)


class LiveSession:
    """Live merge state for one loaded model whose weights came from file A."""

    def __init__(self, target: LiveTarget, a_path: str | os.PathLike, cache_device: str = "cpu"):
        self.target = target
        self.cache_device = cache_device
        self.a = TensorCache(a_path, cache_device)
        self.others: dict[str, TensorCache] = {}
        self.signatures: dict[str, Signature] = {}  # key -> what the live param holds now (absent = ORIGINAL)
        self.verified: set[str] = set()
        self.recipe: Recipe | None = None
        self.plan: Plan | None = None
        self.lock = threading.RLock()
        self._scratch_bufs: dict[str, list[torch.Tensor]] = {}
        self._prev: tuple[Plan, list[TensorCache]] | None = None
        self._copier: threading.Thread | None = None
        params = target.params()
        a_src = self.a.source()
        for k, p in params.items():
            info = a_src.infos.get(k)
            if info is None:
                raise MergeError(f"loaded model has parameter {k} that model A's file lacks, {a_src.path}")
            if tuple(info.shape) != tuple(p.shape):
                raise MergeError(f"loaded model's {k} has shape {list(p.shape)}, file has {list(info.shape)}; "
                                 f"reload it, {a_src.path}")
        self.keys = list(params)

    # -- caches ---------------------------------------------------------------------------------------
    def cache_for(self, path: str) -> TensorCache:
        sid = SourceId.of(path)
        if sid.path == self.a.id.path:
            return self.a
        c = self.others.get(sid.path)
        if c is None or c.id != sid:
            if c is not None:
                c.close()
            c = TensorCache(path, self.cache_device)
            self.others[sid.path] = c
        return c

    def bytes_read(self) -> dict[str, int]:
        out = {self.a.id.path: self.a.bytes_read}
        out.update({p: c.bytes_read for p, c in self.others.items()})
        return out

    def _scratch(self, device: torch.device) -> list[torch.Tensor]:
        bufs = self._scratch_bufs.get(str(device))
        if bufs is None:
            bufs = [torch.empty(CHUNK, dtype=torch.float32, device=device) for _ in range(3)]
            self._scratch_bufs[str(device)] = bufs
        return bufs

    # -- one key --------------------------------------------------------------------------------------
    def _check(self, key: str, a: torch.Tensor, live: torch.Tensor, scratch: torch.Tensor) -> bool:
        """The live chunk must equal A's file chunk cast to the live dtype (before the key's first write).
        Returns True when ``scratch`` now holds A's chunk in fp32 (reusable by the merge)."""
        if live.dtype == torch.float32 and live.device == scratch.device:
            view = scratch[: a.numel()]
            view.copy_(a)
            ready = True
        else:
            view = a.to(device=live.device, dtype=live.dtype)
            ready = False
        if not torch.equal(_bits(view), _bits(live)):
            raise _Mismatch(key)
        return ready

    def _verify(self, key: str, param: torch.Tensor) -> None:
        """First request only, for a key it leaves untouched: check the live weight against A's file without
        caching A (the live weight itself holds A's values while the key is not merged)."""
        with torch.no_grad():
            a = self.a.peek(key).reshape(-1)
            flat = param.view(-1)
            scratch = self._scratch(param.device)[0]
            for s0 in range(0, flat.numel(), CHUNK):
                e0 = min(flat.numel(), s0 + CHUNK)
                self._check(key, a[s0:e0], flat[s0:e0], scratch)
        self.verified.add(key)

    def _ensure_a(self, key: str, param: torch.Tensor) -> None:
        """Before a verified key's first write: cache A's values, taken from the live weight (it still holds
        them, bit-checked at the first request) when the cast back to the file dtype is exact; else from the file."""
        if key in self.a.tensors or key not in self.verified:
            return
        file_dtype = ST_TO_TORCH[self.a.source().infos[key].dtype]
        if self.cache_device != "mmap" and _widens(file_dtype, param.dtype):
            self.a.put(key, param.detach().to(device="cpu" if self.cache_device == "cpu" else param.device,
                                              dtype=file_dtype, copy=True))
        else:
            self.a.get(key)

    def _write(self, param: torch.Tensor, kp: KeyPlan | None, key: str, sig: Signature, mode,
               caches: list[TensorCache]) -> None:
        """Put into ``param`` the value ``sig`` stands for (computed in fp32, cast once by ``copy_``).

        A key written for the first time is checked chunk by chunk before each chunk is overwritten; on a
        mismatch the chunks already written are put back from A's cache (exact: they were checked equal).
        """
        check = key not in self.verified
        self._ensure_a(key, param)
        with torch.no_grad():
            flat = param.view(-1)
            n = flat.numel()
            scratch = self._scratch(param.device)
            whole = sig != ORIGINAL and (kp.channels is not None or not mode.elementwise)
            if whole or (sig == ORIGINAL and not check):
                if check:
                    for s0 in range(0, n, CHUNK):
                        e0 = min(n, s0 + CHUNK)
                        self._check(key, self.a.chunk(key, s0, e0), flat[s0:e0], scratch[0])
                if sig == ORIGINAL:
                    param.copy_(self.a.get(key))
                else:
                    param.copy_(merge_tensors(mode, kp, [c.get(key) for c in caches], device=param.device))
            else:
                written_upto = 0
                try:
                    for s0 in range(0, n, CHUNK):
                        e0 = min(n, s0 + CHUNK)
                        a = self.a.chunk(key, s0, e0)
                        ready = self._check(key, a, flat[s0:e0], scratch[0]) if check else False
                        if sig == ORIGINAL:
                            flat[s0:e0].copy_(a)
                        else:
                            chunks = [a] + [c.chunk(key, s0, e0) for c in caches[1:]]
                            flat[s0:e0].copy_(merge_tensors(mode, kp, chunks, scratch, device=param.device,
                                                            a_ready=ready))
                        written_upto = e0
                except _Mismatch:
                    if written_upto:
                        flat[:written_upto].copy_(self.a.get(key).reshape(-1)[:written_upto])
                    raise
        self.verified.add(key)
        if sig == ORIGINAL:
            self.signatures.pop(key, None)
        else:
            self.signatures[key] = sig

    @staticmethod
    def _signature(plan: Plan, kp: KeyPlan | None, ids: tuple) -> Signature:
        if kp is None or kp.action != "merge" or plan.mode.is_identity(kp.alpha, kp.beta):
            return ORIGINAL  # the live weight already holds A: nothing to write, nothing to cache
        beta = kp.beta if plan.mode.uses_beta else None
        return (plan.mode.name, ids[: plan.mode.models], kp.alpha, beta, kp.channels)

    # -- requests -------------------------------------------------------------------------------------
    def apply(self, recipe: Recipe, cancel: Callable[[], bool] | None = None,
              progress: Callable[[int, int], None] | None = None) -> ApplyReport:
        """Make the live weights equal to ``recipe``; recompute only keys whose signature changed.

        On interrupt or any error the keys written so far go back to what they held before (the previous
        merge, recomputed from the caches, or the original): never a mix.
        """
        with self.lock:
            t0 = time.perf_counter()
            if os.path.realpath(recipe.models[0]) != self.a.id.path:
                raise MergeError(f"model A of a test merge must be the loaded checkpoint, {recipe.models[0]}")
            if recipe.swap_ab:  # it would make B the base, whose unmerged keys the live weights do not hold
                raise MergeError("swap_ab is for file merges: a test merge's A is the loaded checkpoint, swap_ab")
            for c in [self.a, *self.others.values()]:
                if not c.valid():
                    raise MergeError(f"source file changed on disk since it was cached; reload, {c.id.path}")
            before = sum(self.bytes_read().values())
            caches = [self.a] + [self.cache_for(p) for p in recipe.models[1:]]
            plan = build_plan(recipe, [c.source() for c in caches])
            ids = tuple(c.id for c in caches)
            params = self.target.params()
            by_key = plan.by_key()
            report = ApplyReport()
            todo: list[tuple[KeyPlan | None, str, Signature | None]] = []  # sig None: only verify
            for k in self.keys:
                kp = by_key.get(k)
                sig = self._signature(plan, kp, ids)
                if self.signatures.get(k, ORIGINAL) != sig:
                    todo.append((kp, k, sig))
                else:
                    report.unchanged += 1
                    if k not in self.verified:
                        todo.append((kp, k, None))
            a_infos = self.a.source().infos
            todo.sort(key=lambda t: a_infos[t[1]].start)  # file order: sequential reads, contiguous releases
            self.target.prepare([k for _, k, _ in todo])
            mode = plan.mode
            used = caches[: mode.models]
            done: list[tuple[str, Signature]] = []
            try:
                for i, (kp, k, sig) in enumerate(todo):
                    if cancel and cancel():
                        raise MergeInterrupted("test merge interrupted; the previous weights are back")
                    if sig is None:
                        self._verify(k, params[k])
                    else:
                        prev = self.signatures.get(k, ORIGINAL)
                        self._write(params[k], kp, k, sig, mode, used)
                        done.append((k, prev))
                    for c in used:
                        c.release([k])  # the key's mapped source pages leave RSS as soon as it is done
                    if progress:
                        progress(i + 1, len(todo))
                self._prefetch(used[1:])
            except BaseException as e:
                self._rollback(done, params)
                if isinstance(e, _Mismatch):
                    raise MergeError(f"loaded model differs from its file at {e.key}; reload it") from None
                raise
            finally:
                self.target.written([k for k, _ in done])
            self.recipe, self.plan, self._prev = recipe, plan, (plan, used)
            self._materialize_later()
            report.written = len(done)
            report.seconds = time.perf_counter() - t0
            report.bytes_read = sum(self.bytes_read().values()) - before
            report.notes = plan.report.lines()
            return report

    def _prefetch(self, caches: list[TensorCache]) -> None:
        """Cache B's (and C's) tensors that this request did not need, so that no later re-merge reads a file:
        ``cpu`` maps them now (cheap) and copies them into RAM in the background; a GPU cache reads them now."""
        if self.cache_device == "mmap":
            return
        for c in caches:
            for k in self.keys:
                if k not in c.tensors and k in c.source().infos:
                    c.get(k, populate=False)

    def _materialize_later(self) -> None:
        """``cpu`` caches: copy what the merge mapped into RAM in the background (once per new batch of keys)."""
        if self.cache_device != "cpu" or (self._copier is not None and self._copier.is_alive()):
            return
        caches = [self.a, *self.others.values()]
        if not any(c._mapped for c in caches):
            return

        def run():
            for c in caches:
                c.materialize()

        # not a daemon: interpreter shutdown waits for it instead of killing it inside a torch call
        self._copier = threading.Thread(target=run, name="blockmerge-cache-copy", daemon=False)
        self._copier.start()

    def wait_cached(self, timeout: float | None = None) -> bool:
        """Wait for the background copy into RAM (tests, benchmarks). True when nothing is left mapped."""
        if self._copier is not None:
            self._copier.join(timeout)
        return not any(c._mapped for c in [self.a, *self.others.values()])

    def _rollback(self, done: list[tuple[str, Signature]], params: dict[str, torch.Tensor]) -> None:
        """Put back what the written keys held before this request (not interruptible)."""
        by_key = self._prev[0].by_key() if self._prev else {}
        for key, prev in reversed(done):
            if prev == ORIGINAL or self._prev is None:
                self._write(params[key], None, key, ORIGINAL, None, [])
            else:
                plan, caches = self._prev
                self._write(params[key], by_key[key], key, prev, plan.mode, caches)

    def restore(self) -> int:
        """Original weights back (copy from A's cache). Returns how many tensors were written."""
        with self.lock:
            keys = [k for k, s in self.signatures.items() if s != ORIGINAL]
            self.target.prepare(keys)
            params = self.target.params()
            with torch.no_grad():
                for k in keys:
                    params[k].copy_(self.a.get(k))
                    del self.signatures[k]
            self.target.written(keys)
            self.recipe, self.plan, self._prev = None, None, None
            return len(keys)

    @property
    def is_merged(self) -> bool:
        """A recipe is applied (even one that leaves every weight at A's value, e.g. alpha 0)."""
        return self.recipe is not None

    def close(self) -> None:
        for c in [self.a, *self.others.values()]:
            c._stop.set()
        if self._copier is not None:
            self._copier.join()
        self.a.close()
        for c in self.others.values():
            c.close()
        self.others.clear()


def _widens(file_dtype: torch.dtype, live_dtype: torch.dtype) -> bool:
    """Every value of ``file_dtype`` survives a cast to ``live_dtype`` and back."""
    return file_dtype == live_dtype or (live_dtype == torch.float32 and file_dtype.is_floating_point
                                        and torch.finfo(file_dtype).bits < 32)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers: equality is then bit-exact (NaN equals itself, -0 differs from +0) and
    torch compares it with memcmp, about 80x faster than a float comparison."""
    return t.view(_BITS[t.element_size()])


class _Mismatch(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def fingerprint(params: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted (key, dtype, shape, bytes): what "bit-exact" means for live weights."""
    h = hashlib.sha256()
    for k in sorted(params):
        t = params[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return h.hexdigest()
