"""Read PyTorch checkpoints (``.ckpt``/``.pt``/``.pth``/``.bin``) ourselves, every pickle restricted.

We parse torch's two file formats instead of calling ``torch.load`` so that no torch version can route a
pickle around :class:`lib_merge.io.safe_pickle.RestrictedUnpickler` (see that module for why):

- zip (torch >= 1.6): ``<archive>/data.pkl`` holds the object; each storage it names by a persistent id
  ``('storage', type, key, location, numel)`` is the raw little-endian record ``<archive>/data/<key>``.
- legacy (older torch, or ``_use_new_zipfile_serialization=False``): five pickles in a row (magic number,
  protocol version, sys info, the object, the sorted storage keys), then per key an int64 element count and
  the raw bytes. Persistent ids are ``('storage', type, root_key, location, numel, view)``.
- anything else (a plain pickle, torch's pre-1.0 tar format) is read as a legacy file, so it stops at the
  first pickle: a refused global, or "no magic number".

Each pickle is bounded and sanity-checked by :mod:`lib_merge.io.pickle_bounds` before it is unpickled from memory.
Only the tensors of the state dict are built (after all pickles are read), so optimizer states and other
training leftovers outside it are never read from disk; the ``location`` is ignored, everything is CPU.
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeError
from .pickle_bounds import MAX_PICKLE_BYTES, pickle_length, take_pickle
from .safe_pickle import (MAGIC_NUMBER, PROTOCOL_VERSION, StorageRef, StorageType, TensorRef,
                          restricted_loads)

ZIP_MAGIC = b"PK\x03\x04"


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _text(v: Any, what: str) -> str:
    """Keys and tags are ``str`` (``bytes`` in pickles written by Python 2)."""
    if isinstance(v, bytes):
        return v.decode("ascii", "replace")
    if isinstance(v, str):
        return v
    raise MergeError(f"corrupt checkpoint: {what} is a {type(v).__name__}, not text")


def _count(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:
        raise MergeError(f"corrupt checkpoint: {what} is not a non-negative int")
    return v


def build_tensor(buf: bytearray, ref: TensorRef) -> torch.Tensor:
    """The tensor ``ref`` describes, viewing ``buf`` (the bytes of its storage record); bounds are checked."""
    st = ref.storage
    item = _element_size(ref.dtype)
    if st.byte_offset + st.nbytes > len(buf):
        raise MergeError(f"corrupt checkpoint: storage {st.key} has {len(buf)} bytes, "
                         f"a tensor needs {st.byte_offset + st.nbytes}")
    if st.byte_offset % item or st.nbytes % item:
        raise MergeError(f"corrupt checkpoint: storage {st.key} is not a whole number of {ref.dtype} elements")
    if st.nbytes == 0:
        flat = torch.empty(0, dtype=ref.dtype)
    else:
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=st.nbytes, offset=st.byte_offset).view(ref.dtype)
    try:
        return torch.as_strided(flat, ref.size, ref.stride, ref.offset)
    except (RuntimeError, ValueError, OverflowError) as e:
        raise MergeError(f"corrupt checkpoint: tensor does not fit its storage {st.key} "
                         f"({str(e).splitlines()[0][:160]})") from None


def read_exactly(fd: int, offset: int, nbytes: int, path: Path) -> bytearray:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise MergeError(f"truncated checkpoint: {nbytes - done} bytes missing at byte {offset + done}, {path}")
        done += got
    return buf


class ZipCheckpoint:
    """torch's zip format, read with :mod:`zipfile`; storage records are read only when a tensor needs them."""

    def __init__(self, f: io.BufferedReader, path: Path):
        self.f, self.path = f, path
        self.zf = zipfile.ZipFile(f)
        names = self.zf.namelist()
        if not names:
            raise MergeError(f"corrupt checkpoint: empty zip archive, {path}")
        self.prefix = names[0].split("/")[0]  # torch: every record lives under the first record's folder
        order = self._info("byteorder", required=False)
        if order is not None and self.zf.read(order) != b"little":
            raise MergeError(f"unsupported checkpoint: big-endian tensor data, {path}")
        pkl = self._info("data.pkl", required=False)
        if pkl is None:
            raise MergeError(f"not a PyTorch checkpoint: zip archive without {self.prefix}/data.pkl "
                             f"(a TorchScript or other zip file?), {path}")
        if pkl.file_size > MAX_PICKLE_BYTES:
            raise MergeError(f"corrupt checkpoint: data.pkl is {pkl.file_size} bytes, {path}")
        data = self.zf.read(pkl)
        data = data[:pickle_length(data, str(path))]
        self.obj = restricted_loads(data, str(path), self._persistent)
        self._buffers: dict[str, bytearray] = {}

    def _info(self, name: str, required: bool = True) -> zipfile.ZipInfo | None:
        try:
            return self.zf.getinfo(f"{self.prefix}/{name}")
        except KeyError:
            if required:
                raise MergeError(f"corrupt checkpoint: record {self.prefix}/{name} is missing, {self.path}") from None
            return None

    def _persistent(self, pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or len(pid) != 5 or _text(pid[0], "persistent id tag") != "storage":
            raise MergeError(f"corrupt checkpoint: unknown persistent id in data.pkl, {self.path}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, StorageType):
            raise MergeError(f"corrupt checkpoint: persistent id without a storage type, {self.path}")
        return StorageRef(_text(key, "storage key"), stype.dtype, 0,
                          _count(numel, "storage size") * _element_size(stype.dtype))

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        key = ref.storage.key
        if key not in self._buffers:
            info = self._info(f"data/{key}")
            if info.file_size < ref.storage.nbytes:
                raise MergeError(f"corrupt checkpoint: record data/{key} has {info.file_size} bytes, "
                                 f"its tensor needs {ref.storage.nbytes}, {self.path}")
            self._buffers[key] = self._read(info)
        return build_tensor(self._buffers[key], ref)

    def _read(self, info: zipfile.ZipInfo) -> bytearray:
        """A stored (uncompressed, as torch writes them) record is read straight into place; others by zipfile."""
        if info.compress_type != zipfile.ZIP_STORED:
            return bytearray(self.zf.read(info))
        fd = self.f.fileno()
        head = os.pread(fd, 30, info.header_offset)
        if len(head) < 30 or head[:4] != ZIP_MAGIC:
            raise MergeError(f"corrupt checkpoint: bad zip header for {info.filename}, {self.path}")
        start = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
        if start + info.file_size > os.fstat(fd).st_size:
            raise MergeError(f"truncated checkpoint: {info.filename} ends past the end of the file, {self.path}")
        return read_exactly(fd, start, info.file_size, self.path)


class LegacyCheckpoint:
    """torch's pre-zip format: a run of pickles, then the storages' bytes in key order."""

    def __init__(self, f: io.BufferedReader, path: Path):
        self.f, self.path = f, path
        src = str(path)
        f.seek(0)
        magic = restricted_loads(take_pickle(f, src), src)
        if type(magic) is not int or magic != MAGIC_NUMBER:
            raise MergeError(f"not a PyTorch checkpoint (neither a zip archive nor torch's legacy format: "
                             f"no magic number), {path}")
        version = restricted_loads(take_pickle(f, src), src)
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise MergeError(f"unsupported checkpoint: legacy protocol version {version!r}, {path}")
        sys_info = restricted_loads(take_pickle(f, src), src)
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise MergeError(f"unsupported checkpoint: big-endian tensor data, {path}")
        self.roots: dict[str, tuple[torch.dtype, int]] = {}  # root key -> (dtype, nbytes) of its first use
        self.obj = restricted_loads(take_pickle(f, src), src, self._persistent)
        keys = restricted_loads(take_pickle(f, src), src)
        if not isinstance(keys, list):
            raise MergeError(f"corrupt checkpoint: storage key list is a {type(keys).__name__}, {path}")
        self.offsets = self._scan([_text(k, "storage key") for k in keys], f.tell())
        self._buffers: dict[str, bytearray] = {}

    def _persistent(self, pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or len(pid) != 6 or _text(pid[0], "persistent id tag") != "storage":
            raise MergeError(f"corrupt checkpoint: unknown persistent id (a pickled module?), {self.path}")
        _, stype, root_key, _location, numel, view = pid
        if not isinstance(stype, StorageType):
            raise MergeError(f"corrupt checkpoint: persistent id without a storage type, {self.path}")
        root_key = _text(root_key, "storage key")
        item = _element_size(stype.dtype)
        dtype, nbytes = self.roots.setdefault(root_key, (stype.dtype, _count(numel, "storage size") * item))
        if view is None:
            return StorageRef(root_key, dtype, 0, nbytes)
        if not isinstance(view, tuple) or len(view) != 3:
            raise MergeError(f"corrupt checkpoint: bad storage view record, {self.path}")
        offset, size = _count(view[1], "view offset") * item, _count(view[2], "view size") * item
        if offset + size > nbytes:
            raise MergeError(f"corrupt checkpoint: storage view past the end of storage {root_key}, {self.path}")
        return StorageRef(root_key, stype.dtype, offset, size)

    def _scan(self, keys: list[str], pos: int) -> dict[str, int]:
        """File offset of each storage's bytes; each one's int64 element count is checked against the pickle."""
        size = os.fstat(self.f.fileno()).st_size
        offsets: dict[str, int] = {}
        for key in keys:
            if key not in self.roots:
                raise MergeError(f"corrupt checkpoint: storage {key} has data but no tensor, {self.path}")
            dtype, nbytes = self.roots[key]
            head = os.pread(self.f.fileno(), 8, pos)
            if len(head) < 8:
                raise MergeError(f"truncated checkpoint: storage {key} starts past the end, {self.path}")
            numel = int.from_bytes(head, "little", signed=True)
            if numel * _element_size(dtype) != nbytes:
                raise MergeError(f"corrupt checkpoint: storage {key} holds {numel} elements, "
                                 f"its tensors say {nbytes // _element_size(dtype)}, {self.path}")
            offsets[key] = pos + 8
            pos += 8 + nbytes
            if pos > size:
                raise MergeError(f"truncated checkpoint: storage {key} ends at byte {pos} "
                                 f"but the file has {size} bytes, {self.path}")
        return offsets

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        key = ref.storage.key
        if key not in self._buffers:
            self._buffers[key] = self._read(key)
        return build_tensor(self._buffers[key], ref)

    def _read(self, key: str) -> bytearray:
        if key not in self.offsets:
            raise MergeError(f"corrupt checkpoint: storage {key} has no data, {self.path}")
        return read_exactly(self.f.fileno(), self.offsets[key], self.roots[key][1], self.path)


def _state_dict_refs(obj: Any, path: Path) -> dict[str, TensorRef]:
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MergeError(f"checkpoint does not hold a state dict (got {type(obj).__name__}), {path}")
    refs = {str(k): v for k, v in obj.items() if isinstance(v, TensorRef)}
    if not refs:
        raise MergeError(f"checkpoint holds no tensors, {path}")
    return refs


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat tensor dict of a pickled checkpoint (``state_dict`` unwrapped); only allow-listed objects
    are ever built, and any problem is a one-line :class:`MergeError` naming the file."""
    p = Path(path)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise MergeError(f"cannot open model: {e.strerror}, {p}") from None
    try:
        with f:
            reader = ZipCheckpoint(f, p) if f.read(4) == ZIP_MAGIC else LegacyCheckpoint(f, p)
            refs = _state_dict_refs(reader.obj, p)
            # a shared storage is read once; tensors viewing one storage share its memory, as with torch.load
            return {k: reader.tensor(r) for k, r in refs.items()}
    except MergeError as e:
        if str(p) in str(e):
            raise
        raise MergeError(f"{e}, {p}") from None
    except Exception as e:  # corrupt zip, truncated pickle, nonsense values
        msg = " ".join(str(e).split())[:200]
        raise MergeError(f"cannot read checkpoint ({e.__class__.__name__}: {msg}), {p}") from None
