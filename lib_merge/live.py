"""The live sink: apply a planned merge in place to a loaded model's parameters, re-merge incrementally,
roll back on interrupt, restore the original weights exactly.

Host-independent: the host adapter (``lib_merge.webui``) supplies a :class:`LiveTarget`, i.e. the mapping from
file keys to live parameters plus hooks around reads and writes. Source tensors are cached in their file dtype
(A's cache is both a merge input and the restore source, so restore is exact by construction), read once.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from .compute import merge_tensors
from .errors import MergeError, MergeInterrupted
from .plan import KeyPlan, Plan, build_plan
from .recipe import Recipe
from .sources import Source, open_source


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
    """A file's tensors for some keys, in the file's dtype, read once; ``device`` cpu/cuda, or ``mmap`` views."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        self.id = SourceId.of(path)
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}
        self.bytes_read = 0
        self._src: Source | None = None
        self._mm = None

    def source(self) -> Source:
        if self._src is None:
            self._src = open_source(self.id.path)
        return self._src

    def get(self, key: str) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            src = self.source()
            if self.device == "mmap" and hasattr(src, "data_start"):
                t = self._mmap_view(src, key)
            else:
                t = src.read(key)
                self.bytes_read += t.numel() * t.element_size()
                if self.device not in ("cpu", "mmap"):
                    t = t.to(self.device)
            self.tensors[key] = t
        return t

    def _mmap_view(self, src, key: str) -> torch.Tensor:
        import mmap
        import warnings
        from .dtypes import ST_TO_TORCH
        if self._mm is None:
            with open(self.id.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        info = src.infos[key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: we never write through these views
            t = torch.frombuffer(self._mm, dtype=ST_TO_TORCH[info.dtype], count=info.numel, offset=info.start)
        return t.reshape(info.shape)

    def valid(self) -> bool:
        try:
            return SourceId.of(self.id.path) == self.id
        except OSError:
            return False

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None
        self.tensors.clear()
        self._mm = None


Signature = tuple  # (mode, source ids, alpha, beta, channels)


@dataclass
class ApplyReport:
    written: int = 0  # tensors written in this request
    unchanged: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)


ORIGINAL: Signature = ("original",)


class LiveSession:
    """Live merge state for one loaded model whose weights came from file A."""

    def __init__(self, target: LiveTarget, a_path: str | os.PathLike, cache_device: str = "cpu",
                 compute_device: str | torch.device | None = None):
        self.target = target
        self.a = TensorCache(a_path, cache_device)
        self.cache_device = cache_device
        self.others: dict[str, TensorCache] = {}
        self.signatures: dict[str, Signature] = {}  # key -> what the live param holds now
        self.recipe: Recipe | None = None
        self.plan: Plan | None = None
        self.verified = False
        self.compute_device = compute_device
        self.lock = threading.RLock()
        keys = list(target.params())
        a_src = self.a.source()
        missing = [k for k in keys if k not in a_src.infos]
        if missing:
            raise MergeError(f"loaded model has parameter {missing[0]} that model A's file lacks, {a_src.path}")
        for k in keys:
            if tuple(a_src.infos[k].shape) != tuple(target.params()[k].shape):
                raise MergeError(f"loaded model's {k} has shape {list(target.params()[k].shape)}, "
                                 f"file has {list(a_src.infos[k].shape)}; reload it, {a_src.path}")
        self.keys = keys

    # -- caches ---------------------------------------------------------------------------------------
    def cache_for(self, path: str) -> TensorCache:
        sid = SourceId.of(path)
        if sid == self.a.id:
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

    def verify_original(self) -> None:
        """At the first merge: every live param must equal A's file tensor cast to its dtype."""
        if self.verified:
            return
        params = self.target.params()
        self.target.prepare(self.keys)
        for k in self.keys:
            p = params[k]
            a = self.a.get(k)
            if not torch.equal(a.to(device=p.device, dtype=p.dtype), p.detach()):
                raise MergeError(f"loaded model differs from its file at {k}; reload it")
        self.verified = True

    # -- merge ----------------------------------------------------------------------------------------
    def _signature(self, plan: Plan, kp: KeyPlan, ids: tuple) -> Signature:
        if kp.action in ("copy_a",) or (kp.action == "merge" and plan.mode.models == 1):
            return ORIGINAL
        if kp.action != "merge":
            return ORIGINAL
        used = ids[: plan.mode.models]
        beta = kp.beta if plan.mode.uses_beta else None
        return (plan.mode.name, used, kp.alpha, beta, kp.channels)

    def _value(self, plan_mode, kp: KeyPlan, caches: list[TensorCache], device) -> torch.Tensor:
        tensors = [c.get(kp.key) for c in caches]
        return merge_tensors(plan_mode, kp, tensors, device=device)

    def _write(self, key: str, sig: Signature, value: Callable[[], torch.Tensor]) -> None:
        p = self.target.params()[key]
        with torch.no_grad():
            if sig == ORIGINAL:
                p.copy_(self.a.get(key))
            else:
                p.copy_(value())
        self.signatures[key] = sig

    def apply(self, recipe: Recipe, cancel: Callable[[], bool] | None = None,
              progress: Callable[[int, int], None] | None = None) -> ApplyReport:
        """Make the live weights equal to ``recipe``; recompute only keys whose signature changed."""
        with self.lock:
            t0 = time.perf_counter()
            if os.path.realpath(recipe.models[0]) != self.a.id.path:
                raise MergeError(f"model A of a test merge must be the loaded checkpoint, {recipe.models[0]}")
            for c in [self.a, *self.others.values()]:
                if not c.valid():
                    raise MergeError(f"source file changed on disk since it was cached; reload, {c.id.path}")
            before = sum(self.bytes_read().values())
            caches = [self.a] + [self.cache_for(p) for p in recipe.models[1:]]
            plan = build_plan(recipe, [c.source() for c in caches])
            ids = tuple(c.id for c in caches)
            self.verify_original()
            todo: list[tuple[KeyPlan, Signature]] = []
            report = ApplyReport()
            by_key = plan.by_key()
            for k in self.keys:
                kp = by_key.get(k)
                sig = ORIGINAL if kp is None else self._signature(plan, kp, ids)
                if self.signatures.get(k, ORIGINAL) != sig:
                    todo.append((kp, sig))
                else:
                    report.unchanged += 1
            self.target.prepare([kp.key for kp, _ in todo])
            done: list[tuple[str, Signature]] = []  # (key, previous signature) for rollback
            mode = plan.mode
            try:
                for i, (kp, sig) in enumerate(todo):
                    if cancel and cancel():
                        raise MergeInterrupted("test merge interrupted; the previous weights are back")
                    prev = self.signatures.get(kp.key, ORIGINAL)
                    device = self.compute_device or self.target.params()[kp.key].device
                    self._write(kp.key, sig, lambda: self._value(mode, kp, caches[: mode.models], device))
                    done.append((kp.key, prev))
                    if progress:
                        progress(i + 1, len(todo))
            except BaseException:
                self._rollback(done)
                raise
            finally:
                self.target.written([k for k, _ in done])
            self.recipe = recipe
            self.plan = plan
            self._prev_plan_caches = (plan, caches)
            report.written = len(todo)
            report.seconds = time.perf_counter() - t0
            report.bytes_read = sum(self.bytes_read().values()) - before
            report.notes = plan.report.lines()
            return report

    def _rollback(self, done: list[tuple[str, Signature]]) -> None:
        """Put back what the written keys held before this request (not interruptible)."""
        prev_plan = getattr(self, "_prev_plan_caches", None)
        for key, prev in reversed(done):
            if prev == ORIGINAL or prev_plan is None:
                self._write(key, ORIGINAL, lambda: None)
                if prev != ORIGINAL:
                    self.signatures[key] = ORIGINAL
                continue
            plan, caches = prev_plan
            kp = plan.by_key()[key]
            device = self.compute_device or self.target.params()[key].device
            self._write(key, prev, lambda: self._value(plan.mode, kp, caches[: plan.mode.models], device))
        if done:
            self.target.written([k for k, _ in done])

    def restore(self) -> int:
        """Original weights back (copy from A's cache). Returns how many tensors were written."""
        with self.lock:
            keys = [k for k, s in self.signatures.items() if s != ORIGINAL]
            self.target.prepare(keys)
            params = self.target.params()
            with torch.no_grad():
                for k in keys:
                    params[k].copy_(self.a.get(k))
                    self.signatures[k] = ORIGINAL
            self.target.written(keys)
            self.recipe = None
            self.plan = None
            return len(keys)

    @property
    def is_merged(self) -> bool:
        return any(s != ORIGINAL for s in self.signatures.values())

    def close(self) -> None:
        self.a.close()
        for c in self.others.values():
            c.close()
        self.others.clear()


def fingerprint(params: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted (key, dtype, shape, bytes): what "bit-exact" means for live weights."""
    h = hashlib.sha256()
    for k in sorted(params):
        t = params[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
