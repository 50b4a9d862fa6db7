"""Lazy readers for checkpoints: safetensors by header + ``pread``; .ckpt/.pt/.pth by our restricted reader.

A source exposes ``infos`` (key -> :class:`TensorInfo`), ``metadata`` and ``read(key)``; nothing is read
until asked, and safetensors tensors are read with one ``pread`` each (never a whole file in memory).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .. import pages
from ..dtypes import ITEMSIZE, ST_TO_TORCH, TORCH_TO_ST
from ..errors import MergeError

MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    start: int = 0  # absolute byte offset in the file (safetensors only)
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


class Source:
    """Base class: a checkpoint whose tensors can be read one at a time."""

    path: Path
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]

    def read(self, key: str) -> torch.Tensor:
        """``key`` whole, in a fresh tensor (sources that hold tensors in memory override this)."""
        info = self.infos.get(key)
        if info is None:
            raise MergeError(f"key not found, {self.path} key {key}")
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        return self.read_bytes_into(key, buf).reshape(info.shape)

    def read_bytes_into(self, key: str, buf: torch.Tensor, elem_start: int = 0,
                        elem_count: int | None = None) -> torch.Tensor:  # pragma: no cover - interface
        """Elements [elem_start, elem_start + elem_count) of ``key`` into uint8 ``buf``; returns a typed view."""
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.infos.items()}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_safetensors_header(path: Path, fd: int, size: int) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Read and validate a safetensors header. Returns (infos, metadata, data_start)."""
    if size < 8:
        raise MergeError(f"truncated safetensors file (only {size} bytes), {path}")
    n = int.from_bytes(os.pread(fd, 8, 0), "little")
    if n > size - 8:
        raise MergeError(f"corrupt safetensors header: header length {n} is longer than the file ({size} bytes), {path}")
    if n > MAX_HEADER:
        raise MergeError(f"corrupt safetensors header: header length {n} is too large, {path}")
    raw = os.pread(fd, n, 8)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"corrupt safetensors header (not JSON: {e.__class__.__name__}), {path}") from None
    if not isinstance(header, dict):
        raise MergeError(f"corrupt safetensors header (not a JSON object), {path}")
    data_start = 8 + n
    data_size = size - data_start
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise MergeError(f"corrupt safetensors metadata (not an object), {path}")
    infos: dict[str, TensorInfo] = {}
    for key, ent in header.items():
        try:
            dtype = ent["dtype"]
            shape = tuple(int(x) for x in ent["shape"])
            s, e = (int(x) for x in ent["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"corrupt safetensors header entry, {path} key {key}") from None
        if dtype not in ST_TO_TORCH:
            raise MergeError(f"unsupported dtype {dtype}, {path} key {key}")
        if any(d < 0 for d in shape) or not 0 <= s <= e:
            raise MergeError(f"corrupt safetensors header entry (bad shape/offsets), {path} key {key}")
        if e > data_size:
            raise MergeError(f"truncated safetensors file: {key} ends at byte {data_start + e} "
                             f"but the file has {size} bytes, {path}")
        info = TensorInfo(dtype, shape, data_start + s, data_start + e)
        if info.nbytes != e - s:
            raise MergeError(f"corrupt safetensors header: {key} has {e - s} bytes for shape {list(shape)} {dtype}, {path}")
        infos[key] = info
    return infos, {str(k): str(v) for k, v in meta.items()}, data_start


def pread_into(fd: int, buf: memoryview, offset: int, path: Path | str = "") -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (loops over short reads)."""
    done = 0
    n = len(buf)
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise MergeError(f"unexpected end of file while reading, {path}")
        done += got


class SafetensorsSource(Source):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise MergeError(f"cannot open model: {e.strerror}, {self.path}") from None
        try:
            st = os.fstat(self.fd)
            self.size = st.st_size
            self.mtime_ns = st.st_mtime_ns
            self.infos, self.metadata, self.data_start = parse_safetensors_header(self.path, self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self.bytes_read = 0
        self._mm: mmap.mmap | None = None
        self._map_lock = threading.Lock()

    def mapped(self, key: str) -> torch.Tensor:
        """``key`` as a read-only view of the mapped file (no copy: its pages are the page cache's, mapped in one
        call). Callers must never write through it; :meth:`unmap_pages` drops the pages from this process."""
        info = self.infos[key]
        with self._map_lock:
            if self._mm is None:
                self._mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            mm = self._mm
        if info.numel == 0:
            return torch.empty(info.shape, dtype=ST_TO_TORCH[info.dtype])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only buffer: never written through these views
            t = torch.frombuffer(mm, dtype=ST_TO_TORCH[info.dtype], count=info.numel, offset=info.start)
        pages.advise(t, pages.POPULATE_READ)
        self.bytes_read += info.nbytes
        return t.reshape(info.shape)

    def unmap_pages(self, t: torch.Tensor) -> None:
        """Drop a :meth:`mapped` view's pages from this process's RSS (they stay in the page cache)."""
        pages.advise(t.reshape(-1), pages.DONTNEED)

    def read_bytes_into(self, key: str, buf: torch.Tensor, elem_start: int = 0, elem_count: int | None = None) -> torch.Tensor:
        """Read elements [elem_start, elem_start+elem_count) of ``key`` into uint8 tensor ``buf``; returns a typed view."""
        info = self.infos[key]
        item = ITEMSIZE[info.dtype]
        count = info.numel - elem_start if elem_count is None else elem_count
        nbytes = count * item
        view = buf[:nbytes]
        if nbytes:
            pread_into(self.fd, memoryview(view.numpy()), info.start + elem_start * item, self.path)
            self.bytes_read += nbytes
        return view.view(ST_TO_TORCH[info.dtype])

    def close(self) -> None:
        self._mm = None  # never mm.close(): views hold a reference, and the mapping goes with the last of them
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TensorDictSource(Source):
    """A source backed by an in-memory dict (used for .ckpt files and tests)."""

    def __init__(self, path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tensors = dict(tensors)
        self.metadata = dict(metadata or {})
        self.infos = {}
        for k, t in self.tensors.items():
            if t.dtype not in TORCH_TO_ST:
                raise MergeError(f"unsupported dtype {t.dtype}, {self.path} key {k}")
            self.infos[k] = TensorInfo(TORCH_TO_ST[t.dtype], tuple(t.shape))
        st = os.stat(self.path) if self.path.exists() else None
        self.size = st.st_size if st else 0
        self.mtime_ns = st.st_mtime_ns if st else 0
        self.bytes_read = 0

    def read(self, key: str) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            raise MergeError(f"key not found, {self.path} key {key}")
        return t.contiguous()

    def read_bytes_into(self, key: str, buf: torch.Tensor, elem_start: int = 0, elem_count: int | None = None) -> torch.Tensor:
        t = self.read(key).reshape(-1)
        count = t.numel() - elem_start if elem_count is None else elem_count
        return t[elem_start:elem_start + count]


PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


def open_source(path: str | os.PathLike) -> Source:
    """Open a checkpoint by its suffix: ``.safetensors`` lazily, pickles through the safe loader; a diffusers
    folder with LDM key names."""
    p = Path(path)
    if not p.exists():
        raise MergeError(f"model file not found, {p}")
    if p.is_dir():
        from .diffusers.source import DiffusersSource  # a diffusers folder reads as a single-file checkpoint
        return DiffusersSource(p)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsSource(p)
    if suffix in PICKLE_SUFFIXES:
        from .ckpt_reader import load_checkpoint
        return TensorDictSource(p, load_checkpoint(p))
    raise MergeError(f"unsupported model file type {suffix or '(none)'} (use .safetensors, .ckpt, .pt or .pth), {p}")
