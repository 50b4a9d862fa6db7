"""One source file's tensors, in the file's dtype, for live merges: the merge input and (for A) the restore source.

Two threads use a cache: the request thread (merges, restores; one at a time under the session's lock) and the
background copier (:meth:`TensorCache.materialize`). The cache owns every lock about its own state:

- ``_lock`` guards the entries, the set of mapped entries, the file mapping and the source handle. It is held only
  for dictionary-sized work, never across a copy or an ``madvise`` (long calls that release the GIL), so neither
  thread waits on the other's bandwidth-bound work.
- ``_copying`` is held by the copier for a whole pass over the cache; :meth:`TensorCache.close` takes it, so a
  cache is closed only after the copier has left it.

Readers take the mapping into a local under ``_lock`` and use the local: the copier may drop the cache's
reference to the mapping at any time (the views made from it keep it alive).
"""
from __future__ import annotations

import mmap
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch

from .. import pages
from ..dtypes import ST_TO_TORCH
from ..errors import MergeError
from ..io.sources import Source, TensorDictSource, open_source
from .policy import CachePolicy


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
    """A file's tensors in the file's dtype, kept as its :class:`CachePolicy` says.

    ``cpu`` and ``mmap`` first map safetensors files (no copy: the first merge reads straight from the page
    cache); ``cpu`` then copies the mapped tensors into one anonymous arena in the background
    (:meth:`materialize`), after which the cache no longer touches the file.
    """

    def __init__(self, path: str | os.PathLike, policy: CachePolicy | str = CachePolicy.CPU):
        self.id = SourceId.of(path)
        self.policy = CachePolicy.parse(policy)
        self.device = self.policy.device()
        self.bytes_read = 0
        self._tensors: dict[str, torch.Tensor] = {}
        self._mapped: set[str] = set()  # entries that are still views of the mapped file
        self._src: Source | None = None
        self._mm: mmap.mmap | None = None
        self._lock = threading.Lock()
        self._copying = threading.Lock()
        self._closed = threading.Event()

    # -- reading ----------------------------------------------------------------------------------------
    def source(self) -> Source:
        with self._lock:
            if self._src is None:
                self._src = open_source(self.id.path)
            return self._src

    def __contains__(self, key: str) -> bool:
        return key in self._tensors  # one dict lookup: atomic

    def __len__(self) -> int:
        return len(self._tensors)

    def chunk(self, key: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of ``key`` (flattened), reading them now if they are not cached yet."""
        return self.get(key).reshape(-1)[start:end]

    def get(self, key: str, populate: bool = True) -> torch.Tensor:
        """``key`` from the cache, reading (mapping) it now if needed. ``populate``: map its pages now."""
        t = self._tensors.get(key)
        if t is not None:
            return t
        t, mapped = self._read(key, populate)
        if not mapped and t.device != self.device:
            t = t.to(self.device)
        with self._lock:
            self._tensors[key] = t
            if mapped:
                self._mapped.add(key)
        return t

    def peek(self, key: str, populate: bool = True) -> torch.Tensor:
        """``key`` read from the file (a mapped view where possible) without keeping it in the cache."""
        return self._read(key, populate)[0]

    def _read(self, key: str, populate: bool) -> tuple[torch.Tensor, bool]:
        """``key`` from the file, and whether it is a view of the mapping (else a tensor read into RAM)."""
        src = self.source()
        info = src.infos.get(key)
        if info is None:
            raise MergeError(f"key not found, {src.path} key {key}")
        self.bytes_read += info.nbytes
        if self._mappable(src):
            return self._mmap_view(info, populate), True
        return src.read(key), False

    def _mappable(self, src: Source) -> bool:
        return self.policy.maps_files and hasattr(src, "data_start")

    def _mapping(self) -> mmap.mmap:
        with self._lock:
            if self._mm is None:
                with open(self.id.path, "rb") as f:
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._mm

    def _mmap_view(self, info, populate: bool = True) -> torch.Tensor:
        mm = self._mapping()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: never written through these views
            t = torch.frombuffer(mm, dtype=ST_TO_TORCH[info.dtype], count=info.numel, offset=info.start)
        if populate:
            pages.advise(t, pages.POPULATE_READ)  # one call maps the tensor's cached pages: no fault per page
        return t.reshape(info.shape)

    def put(self, key: str, t: torch.Tensor) -> None:
        """Cache ``t`` as ``key``'s file tensor (the caller guarantees it holds the file's exact values)."""
        t = t.to(self.device)
        with self._lock:
            self._tensors[key] = t
            self._mapped.discard(key)

    def release(self, keys: Iterable[str]) -> None:
        """Drop mapped tensors' pages from this process's RSS (they stay in the page cache and come back on the
        next access): mapped sources then cost no resident memory. One call for the span of ``keys``."""
        with self._lock:
            mm = self._mm
        if mm is None:
            return
        known = self.source().infos
        infos = [known[k] for k in keys if k in known]
        if not infos:
            return
        start = min(i.start for i in infos)
        end = max(i.end for i in infos)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = torch.frombuffer(mm, dtype=torch.uint8, count=1)
        # file pages: dropping them from this mapping loses nothing (they stay in the page cache)
        pages.advise_range(base.data_ptr() + start, end - start, pages.DONTNEED)

    # -- the background copy --------------------------------------------------------------------------------
    def uncopied(self) -> int:
        """How many cached tensors the copier still has to copy into RAM (0 unless the policy copies)."""
        return len(self._mapped) if self.policy.copies_to_ram else 0

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

    def materialize(self, stop: threading.Event | None = None) -> int:
        """Copy the mapped tensors into RAM (one arena) so the cache stops depending on the file. Returns bytes
        copied. Runs in the background after a merge; stops between tensors when ``stop`` is set or the cache
        is closed. Each copy is published under the lock: a reader gets the view or the copy, equal values."""
        if not self.policy.copies_to_ram:
            return 0
        with self._copying:
            if self._closed.is_set():
                return 0
            with self._lock:
                views = {k: self._tensors[k] for k in self._mapped if k in self._tensors}
            if not views:
                return 0
            infos = self.source().infos
            keys = sorted(views, key=lambda k: infos[k].start)  # file order: released spans are contiguous
            slots = self._arena([infos[k].nbytes for k in keys])
            copied = 0
            for k, raw in zip(keys, slots):
                if self._closed.is_set() or (stop is not None and stop.is_set()):
                    break
                view = views[k]
                slot = raw.view(view.dtype)
                slot.copy_(view.reshape(-1))
                with self._lock:
                    if self._tensors.get(k) is view:
                        self._tensors[k] = slot.view(view.shape)
                        self._mapped.discard(k)
                self.release([k])  # at once: mapped pages never pile up in RSS beside the copies
                copied += slot.numel() * slot.element_size()
            with self._lock:
                if not self._mapped:
                    self._mm = None  # unmapped once the last view is gone: the file's pages leave our RSS
            return copied

    # -- memory ---------------------------------------------------------------------------------------------
    def held_bytes(self) -> int:
        """Bytes of RAM or VRAM this cache holds: its copies, and an in-memory source's tensors (a ``.ckpt`` is
        read whole). Views of the mapped file are no cost (page cache; :meth:`release` keeps them out of RSS).
        Each piece of memory counts once."""
        with self._lock:
            held = [t for k, t in self._tensors.items() if k not in self._mapped]
            src = self._src
        if isinstance(src, TensorDictSource):
            held.extend(src.tensors.values())
        seen: dict[tuple[str, int], int] = {}
        for t in held:
            at = (str(t.device), t.data_ptr())
            seen[at] = max(seen.get(at, 0), t.numel() * t.element_size())
        return sum(seen.values())

    def pending_bytes(self) -> int:
        """Bytes of mapped tensors the copier is still to copy into RAM (0 unless the policy copies)."""
        if not self.policy.copies_to_ram:
            return 0
        with self._lock:
            views = [self._tensors[k] for k in self._mapped if k in self._tensors]
        return sum(t.numel() * t.element_size() for t in views)

    def drop(self, keep: Iterable[str] = ()) -> int:
        """Drop every entry but ``keep`` and close the source; a later read maps or reads the file again (the
        same values while the file is unchanged). Kept copies that share an arena with dropped ones are copied
        out first, so that the whole arena goes back to the system. Returns the bytes let go (:meth:`held_bytes`
        before minus after). Waits for a copy in progress to end (callers stop the copier first)."""
        keep = set(keep)
        with self._copying:
            before = self.held_bytes()
            with self._lock:
                entries = dict(self._tensors)
                mapped = set(self._mapped)
            kept = {k: t for k, t in entries.items() if k in keep}
            gone = {_storage(t) for k, t in entries.items() if k not in keep and k not in mapped}
            shared = [k for k, t in kept.items() if k not in mapped and _storage(t) in gone]
            kept.update(zip(shared, self._copies([kept[k] for k in shared])))
            with self._lock:
                self._tensors = kept
                self._mapped = mapped & set(kept)
                if not self._mapped:
                    self._mm = None
                src, self._src = self._src, None
            del entries
            if src is not None:
                src.close()
            return before - self.held_bytes()

    def _copies(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Private copies of ``tensors`` (one new arena on the CPU)."""
        if self.device.type != "cpu":
            return [t.clone() for t in tensors]
        slots = self._arena([t.numel() * t.element_size() for t in tensors])
        out = []
        for t, raw in zip(tensors, slots):
            slot = raw.view(t.dtype)
            slot.copy_(t.reshape(-1))
            out.append(slot.view(t.shape))
        return out

    # -- policy, validity, end ------------------------------------------------------------------------------
    def set_policy(self, policy: CachePolicy | str) -> None:
        """Keep the cache under another policy from now on (a changed setting). Entries move to the new device;
        for ``mmap`` they are dropped instead while the file is unchanged (mapped again on demand, with the
        same values). Waits for a copy in progress to end."""
        policy = CachePolicy.parse(policy)
        device = policy.device()
        with self._copying:
            if policy is self.policy:
                return
            drop = policy is CachePolicy.MMAP and self.valid()
            with self._lock:
                entries = dict(self._tensors)
                mapped = set(self._mapped)
            moved: dict[str, torch.Tensor] = {}
            if not drop:
                for k, t in entries.items():
                    keep_view = k in mapped and policy.maps_files
                    moved[k] = t if keep_view or t.device == device else t.to(device)
            with self._lock:
                self.policy, self.device = policy, device
                self._tensors = moved
                self._mapped = {k for k in mapped if k in moved and moved[k] is entries[k]}

    def valid(self) -> bool:
        try:
            return SourceId.of(self.id.path) == self.id
        except OSError:
            return False

    def close(self) -> None:
        """Stop the copier at its next tensor, wait for it to leave this cache, then drop everything."""
        self._closed.set()
        with self._copying:
            with self._lock:
                src, self._src = self._src, None
                self._tensors.clear()
                self._mapped.clear()
                self._mm = None
        if src is not None:
            src.close()


def _storage(t: torch.Tensor) -> tuple[str, int]:
    """Where the memory behind ``t`` begins: tensors cut from one arena share it."""
    return str(t.device), t.untyped_storage().data_ptr()
