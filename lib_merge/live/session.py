"""A live session: apply a planned merge in place to a loaded model's parameters, re-merge incrementally,
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
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Protocol

import torch

from .. import pages
from ..methods.compute import merge_tensors
from ..dtypes import ST_TO_TORCH
from ..errors import MergeError, MergeInterrupted
from ..plan import KeyPlan, Plan, build_plan
from ..recipe import Recipe
from ..roles import role
from .cache import SourceId, TensorCache
from .chain import ChainInput, LiveInput, input_id, leaf_caches, recorded_tree
from .policy import CachePolicy

CHUNK = 1 << 20  # elements per chunk (4 MiB of fp32): cache-friendly, and few GIL round trips per tensor


class LiveTarget(Protocol):
    """What the host provides. All keys are file keys (``model.diffusion_model.…``)."""

    def params(self) -> dict[str, torch.Tensor]:
        """File key -> live parameter tensor, looked up now (low-VRAM hosts move ``.data`` around)."""

    def prepare(self, keys: Iterable[str]) -> None:
        """Before reading/hashing/writing: put host-side patches (e.g. baked LoRA) back so params hold A."""

    def written(self, keys: Iterable[str]) -> None:
        """After every write: clear host caches that depend on these weights."""


Signature = tuple  # Formula.signature (what the key's value depends on) or ORIGINAL
ORIGINAL: Signature = ("original",)


@dataclass(frozen=True)
class LiveStatus:
    """What a status poll shows, taken at one instant (the poll runs beside a merge, without its lock)."""
    merged: bool  # a recipe is applied
    merged_tensors: int  # live parameters that hold something other than A's weights
    bytes_read: dict[str, int]  # real path -> bytes read from that file by this session's caches
    policy: CachePolicy
    cache_bytes: int = 0  # RAM / VRAM the caches hold now (mapped file pages are no cost)
    cache_pending: int = 0  # mapped bytes the background copier is still to copy into RAM


@dataclass(frozen=True)
class FreeReport:
    bytes_freed: int  # RAM / VRAM the caches let go
    bytes_kept: int  # what they hold (once copied to RAM): A's tensors of the keys the live merge wrote (restore source)


@dataclass
class ApplyReport:
    written: int = 0  # tensors written in this request
    unchanged: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)


class LiveSession:
    """Live merge state for one loaded model whose weights came from file A.

    Concurrency: requests (apply, restore, a policy change, close) run one at a time under ``lock``; the
    background copier (:meth:`_materialize_later`) touches only the caches, which guard themselves. A status
    poll runs beside a request without waiting for it: the state it reads (``signatures``, ``others``, the
    recipe) changes only under the short ``_state`` lock, and :meth:`snapshot` reads it under the same lock.
    """

    def __init__(self, target: LiveTarget, a_path: str | os.PathLike,
                 cache: CachePolicy | str = CachePolicy.CPU):
        self.target = target
        self.policy = CachePolicy.parse(cache)
        self.a = TensorCache(a_path, self.policy)
        self.others: dict[str, TensorCache] = {}  # guarded by _state
        self.signatures: dict[str, Signature] = {}  # key -> what the live param holds now (absent = ORIGINAL)
        self.verified: set[str] = set()
        self.recipe: Recipe | None = None
        self.plan: Plan | None = None
        self._stats: dict = {}  # the statistics pass of the current sources (cosine methods): alpha-only re-merges reuse it
        self.lock = threading.RLock()
        self._state = threading.Lock()
        self._scratch_bufs: dict[str, list[torch.Tensor]] = {}
        self._prev: tuple[Plan, list[TensorCache]] | None = None
        self._copier: threading.Thread | None = None
        self._copier_stop = threading.Event()
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
        """The cache of ``path``; a new one when the file changed on disk (the old one is closed once the copier
        has left it)."""
        with self.lock:
            sid = SourceId.of(path)
            if sid.path == self.a.id.path:
                return self.a
            c = self.others.get(sid.path)
            if c is None or c.id != sid:
                if c is not None:
                    c.close()
                c = TensorCache(path, self.policy)
                with self._state:
                    self.others[sid.path] = c
            return c

    def _drop_stale_caches(self) -> None:
        """Files changed or gone since they were cached. A's is an error (it is the restore source). Another
        file's cache is dropped (a later merge that names the file reads it anew), unless the live merge was made
        from it: an interrupted request rolls back to that merge from its caches, so Restore comes first."""
        if not self.a.valid():
            raise MergeError(f"model A's file changed on disk since it was loaded; reload the checkpoint, "
                             f"{self.a.id.path}")
        live = leaf_caches(self._prev[1]) if self._prev is not None and self.merged_keys() else []
        for path, c in list(self.others.items()):
            if c.valid():
                continue
            if any(c is used for used in live):
                raise MergeError(f"source file changed on disk while the live merge was made from it; "
                                 f"Restore first, {c.id.path}")
            with self._state:
                del self.others[path]
            c.close()

    def _caches(self) -> list[TensorCache]:
        with self._state:
            return [self.a, *self.others.values()]

    def bytes_read(self) -> dict[str, int]:
        return {c.id.path: c.bytes_read for c in self._caches()}

    def snapshot(self) -> LiveStatus:
        """The state a status poll shows, consistent at one instant; never waits for a running merge. The caches'
        sizes are read just after, each under its cache's own lock."""
        with self._state:
            caches = [self.a, *self.others.values()]
            snap = LiveStatus(merged=self.recipe is not None,
                              merged_tensors=sum(1 for v in self.signatures.values() if v != ORIGINAL),
                              bytes_read={c.id.path: c.bytes_read for c in caches},
                              policy=self.policy)
        return replace(snap, cache_bytes=sum(c.held_bytes() for c in caches),
                       cache_pending=sum(c.pending_bytes() for c in caches))

    def cache_bytes(self) -> int:
        """RAM / VRAM the caches hold now (copies; mapped file pages are no cost)."""
        return sum(c.held_bytes() for c in self._caches())

    def merged_keys(self) -> list[str]:
        """Keys whose live parameter holds a merge now."""
        with self._state:
            return [k for k, v in self.signatures.items() if v != ORIGINAL]

    def _scratch(self, device: torch.device, n: int = 3) -> list[torch.Tensor]:
        """At least ``n`` fp32 chunk buffers on ``device`` (one per input of the formula)."""
        bufs = self._scratch_bufs.setdefault(str(device), [])
        while len(bufs) < n:
            bufs.append(torch.empty(CHUNK, dtype=torch.float32, device=device))
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
        if key in self.a or key not in self.verified:
            return
        file_dtype = ST_TO_TORCH[self.a.source().infos[key].dtype]
        if self.policy is not CachePolicy.MMAP and _widens(file_dtype, param.dtype):
            self.a.put(key, param.detach().to(device=self.a.device, dtype=file_dtype, copy=True))
        else:
            self.a.get(key)

    def _write(self, param: torch.Tensor, kp: KeyPlan | None, key: str, sig: Signature, formula,
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
            scratch = self._scratch(param.device, len(caches))
            whole = sig != ORIGINAL and (kp.channels is not None or kp.adjust is not None or bool(kp.lora)
                                         or not formula.elementwise)
            if whole or (sig == ORIGINAL and not check):
                if check:
                    for s0 in range(0, n, CHUNK):
                        e0 = min(n, s0 + CHUNK)
                        self._check(key, self.a.chunk(key, s0, e0), flat[s0:e0], scratch[0])
                if sig == ORIGINAL:
                    param.copy_(self.a.get(key))
                else:
                    ins = caches if kp.action == "merge" else caches[:1]  # "copy_a" + LoRA: A patched
                    param.copy_(merge_tensors(formula, kp, [c.get(key) for c in ins], device=param.device))
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
                            own_a = caches[0] is self.a  # else A is a nested recipe's value
                            first = a if own_a else caches[0].chunk(key, s0, e0)
                            ins = caches[: formula.models] if kp.action == "merge" else caches[:1]
                            chunks = [first] + [c.chunk(key, s0, e0) for c in ins[1:]]
                            flat[s0:e0].copy_(merge_tensors(formula, kp, chunks, scratch, device=param.device,
                                                            a_ready=ready and own_a))
                        written_upto = e0
                except _Mismatch:
                    if written_upto:
                        flat[:written_upto].copy_(self.a.get(key).reshape(-1)[:written_upto])
                    raise
        self.verified.add(key)
        with self._state:
            if sig == ORIGINAL:
                self.signatures.pop(key, None)
            else:
                self.signatures[key] = sig

    @staticmethod
    def _signature(plan: Plan, kp: KeyPlan | None, ids: tuple, chained_a: bool = False) -> Signature:
        """``chained_a``: A is a nested recipe, so "A's value" is that step's value, not the loaded weight."""
        if kp is not None and kp.action == "copy_a" and (kp.lora or chained_a):
            return ("copy_a", ids[:1], kp.lora)  # A's value with LoRAs added: depends on A and the patches only
        if kp is not None and chained_a and kp.action == "merge" and kp.adjust is None and not kp.lora \
                and plan.formula.is_identity(kp.alpha, kp.beta):
            return ("copy_a", ids[:1], ())
        if kp is None or kp.action != "merge" or (kp.adjust is None and not kp.lora
                                                  and plan.formula.is_identity(kp.alpha, kp.beta)):
            return ORIGINAL  # the live weight already holds A: nothing to write, nothing to cache
        return plan.formula.signature(kp, ids)

    def _input(self, model: "str | Recipe", at: str) -> LiveInput:
        """A file's cache, or a nested recipe over the caches of its files (a merge chain)."""
        if isinstance(model, Recipe):
            return ChainInput(model, [self._input(m, f"{at}.{role(i)}") for i, m in enumerate(model.models)], at)
        return self.cache_for(model)

    # -- requests -------------------------------------------------------------------------------------
    def apply(self, recipe: Recipe, cancel: Callable[[], bool] | None = None,
              progress: Callable[[int, int], None] | None = None) -> ApplyReport:
        """Make the live weights equal to ``recipe``; recompute only keys whose signature changed.

        On interrupt or any error the keys written so far go back to what they held before (the previous
        merge, recomputed from the caches, or the original): never a mix.
        """
        with self.lock:
            t0 = time.perf_counter()
            first = recipe.leaves()[0][1]  # a chain's first leaf: the model its A steps start from
            if os.path.realpath(first) != self.a.id.path:
                raise MergeError(f"model A of a test merge must be the loaded checkpoint, {first}")
            if recipe.swap_ab:  # it would make B the base, whose unmerged keys the live weights do not hold
                raise MergeError("swap_ab is for file merges: a test merge's A is the loaded checkpoint, swap_ab")
            self._drop_stale_caches()
            before = sum(self.bytes_read().values())
            caches = [self._input(m, role(i)) for i, m in enumerate(recipe.models)]
            plan = build_plan(recipe, [c.source() for c in caches], stats_cache=self._stats)
            by_key = plan.by_key()
            report = ApplyReport()
            todo: list[tuple[KeyPlan | None, str, Signature | None]] = []  # sig None: only verify
            for k in self.keys:
                kp = by_key.get(k)
                sig = self._signature(plan, kp, tuple(input_id(c, k) for c in caches), caches[0] is not self.a)
                if self.signatures.get(k, ORIGINAL) != sig:
                    todo.append((kp, k, sig))
                else:
                    report.unchanged += 1
                    if k not in self.verified:
                        todo.append((kp, k, None))
            a_infos = self.a.source().infos
            todo.sort(key=lambda t: a_infos[t[1]].start)  # file order: sequential reads, contiguous releases
            self.target.prepare([k for _, k, _ in todo])
            params = self.target.params()  # after prepare: a host may replace parameters when it unpatches
            used = caches[: plan.formula.models]
            done: list[tuple[str, Signature]] = []
            try:
                for i, (kp, k, sig) in enumerate(todo):
                    if cancel and cancel():
                        raise MergeInterrupted("test merge interrupted; the previous weights are back")
                    if sig is None:
                        self._verify(k, params[k])
                    else:
                        prev = self.signatures.get(k, ORIGINAL)
                        self._write(params[k], kp, k, sig, plan.formula, used)
                        done.append((k, prev))
                    for c in used:
                        c.release([k])  # the key's mapped source pages leave RSS as soon as it is done
                    if progress:
                        progress(i + 1, len(todo))
                self._prefetch([c for c in leaf_caches(used) if c is not self.a])
            except BaseException as e:
                self._rollback(done, params)
                if isinstance(e, _Mismatch):
                    raise MergeError(f"loaded model differs from its file at {e.key}; reload it") from None
                raise
            finally:
                self.target.written([k for k, _ in done])
            with self._state:
                # the seeds random ratios were drawn with (nested steps too), so the recipe re-runs
                recipe = recorded_tree(recipe, caches, plan)
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
        if not self.policy.prefetches:
            return
        for c in caches:
            for k in self.keys:
                if k not in c and k in c.source().infos:
                    c.get(k, populate=False)

    def _materialize_later(self) -> None:
        """``cpu`` caches: copy what the merge mapped into RAM in the background (once per new batch of keys).
        The thread is the session's: started and stopped under ``lock``; it touches only the caches."""
        if not self.policy.copies_to_ram or (self._copier is not None and self._copier.is_alive()):
            return
        caches = self._caches()
        if not any(c.uncopied() for c in caches):
            return
        stop = self._copier_stop = threading.Event()

        def run():
            for c in caches:
                if stop.is_set():
                    return
                c.materialize(stop)

        # not a daemon: interpreter shutdown waits for it instead of killing it inside a torch call
        self._copier = threading.Thread(target=run, name="blockmerge-cache-copy", daemon=False)
        self._copier.start()

    def _stop_copier(self) -> None:
        """Stop the copier at its next tensor and wait for it (a copy of one tensor: milliseconds)."""
        self._copier_stop.set()
        if self._copier is not None:
            self._copier.join()
            self._copier = None

    def wait_cached(self, timeout: float | None = None) -> bool:
        """Wait for the background copy into RAM (tests, benchmarks). True when nothing is left to copy."""
        copier = self._copier
        if copier is not None:
            copier.join(timeout)
        return not any(c.uncopied() for c in self._caches())

    def set_policy(self, cache: CachePolicy | str) -> bool:
        """Keep the caches under another policy from the next merge on (the live weights do not change).
        Returns True when the policy changed."""
        policy = CachePolicy.parse(cache)
        with self.lock:
            if policy is self.policy:
                return False
            policy.device()  # refuses gpu without CUDA before anything changes
            self._stop_copier()
            for c in self._caches():
                c.set_policy(policy)
            with self._state:
                self.policy = policy
            return True

    def _rollback(self, done: list[tuple[str, Signature]], params: dict[str, torch.Tensor]) -> None:
        """Put back what the written keys held before this request (not interruptible)."""
        by_key = self._prev[0].by_key() if self._prev else {}
        for key, prev in reversed(done):
            if prev == ORIGINAL or self._prev is None:
                self._write(params[key], None, key, ORIGINAL, None, [])
            else:
                plan, caches = self._prev
                self._write(params[key], by_key[key], key, prev, plan.formula, caches)

    def restore(self) -> int:
        """Original weights back (copy from A's cache). Returns how many tensors were written."""
        with self.lock:
            keys = self.merged_keys()
            self.target.prepare(keys)
            params = self.target.params()
            with torch.no_grad():
                for k in keys:
                    params[k].copy_(self.a.get(k))
                    with self._state:
                        del self.signatures[k]
            self.target.written(keys)
            with self._state:
                self.recipe, self.plan, self._prev = None, None, None
            return len(keys)

    def free(self) -> FreeReport:
        """Drop every cached tensor the live merge does not need, and give the memory back to the system.

        Kept: A's tensors of the keys the live merge wrote (the restore source; nothing after Restore). B's and
        C's tensors go: a later re-merge, or the rollback of an interrupted one, reads them from the files again
        (the caches the live merge was made from stay registered, empty, so that a changed file is still
        noticed before a rollback would read it). Caches of files the live merge does not use are closed."""
        with self.lock:
            self._stop_copier()
            keep = set(self.merged_keys())
            live = leaf_caches(self._prev[1]) if self._prev is not None and keep else []
            freed = 0
            for path, c in list(self.others.items()):
                freed += c.drop()
                if not any(c is used for used in live):
                    with self._state:
                        del self.others[path]
                    c.close()
            freed += self.a.drop(keep)  # last: the copies it may make come after B's memory went back
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # the allocator's cached blocks: VRAM really goes back
            pages.trim_heap()
            # counted before the copier starts (it moves bytes from pending to held while it runs): what the
            # caches hold once kept tensors still mapped (a copy was stopped) are in RAM
            kept = sum(c.held_bytes() + c.pending_bytes() for c in self._caches())
            self._materialize_later()  # ``cpu``: those mapped tensors go on to RAM
            return FreeReport(bytes_freed=freed, bytes_kept=kept)

    @property
    def is_merged(self) -> bool:
        """A recipe is applied (even one that leaves every weight at A's value, e.g. alpha 0)."""
        return self.recipe is not None

    def close(self) -> None:
        """Stop the copier, then close every cache (each waits for the copier to have left it)."""
        with self.lock:
            self._stop_copier()
            for c in self._caches():
                c.close()
            with self._state:
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
