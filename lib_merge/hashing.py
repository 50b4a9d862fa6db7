"""File hashes as the WebUI computes them, with a cache keyed by real path, size and mtime.

The cache (``hashes.json``) also tells ``reproduce`` where each hashed file lives on this machine. It is only
ever replaced whole (write a temporary file, then rename), so concurrent writers never leave half a file; a
cache that is damaged or of the wrong shape is set aside with a note and rebuilt, never a reason to fail a merge.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

_lock = threading.Lock()
BLOCK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


def cache_path() -> Path:
    env = os.environ.get("BLOCKMERGE_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blockmerge"
    return base / "hashes.json"


def _valid_entry(ent) -> bool:
    return (isinstance(ent, dict) and isinstance(ent.get("sha256"), str) and _HEX64.fullmatch(ent["sha256"]) is not None
            and type(ent.get("size")) is int and type(ent.get("mtime_ns")) is int)


def _set_aside(p: Path, why: str) -> None:
    """Keep the damaged cache for inspection (``hashes.json.bad-<time>``) and say so once on stderr."""
    bad = p.with_name(f"{p.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.replace(p, bad)
        where = f"set aside as {bad.name}"
    except OSError:
        where = "could not be set aside"
    print(f"note: hash cache {why} ({where}); rebuilding it, {p}", file=sys.stderr)


def _load() -> dict[str, dict]:
    """The cache's valid entries. A file that is not JSON, not an object, or has malformed entries is set aside
    (its valid entries are kept in the rebuilt cache)."""
    p = cache_path()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        _set_aside(p, "is not valid JSON")
        return {}
    if not isinstance(data, dict):
        _set_aside(p, f"is a JSON {type(data).__name__}, not an object")
        return {}
    good = {k: v for k, v in data.items() if _valid_entry(v)}
    if len(good) != len(data):
        _set_aside(p, f"has {len(data) - len(good)} malformed entries")
        _store(good)
    return good


def _store(data: dict) -> None:
    p = cache_path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, sort_keys=True)
            os.replace(tmp, p)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a cache that cannot be written only costs time


def _ident(path: Path) -> tuple[str, int, int]:
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_size, st.st_mtime_ns


def cached(path: str | Path) -> str | None:
    """The cached sha256 of ``path`` if its size and mtime still match, else None (no hashing)."""
    real, size, mtime = _ident(Path(path))
    with _lock:
        ent = _load().get(real)
    if ent and ent["size"] == size and ent["mtime_ns"] == mtime:
        return ent["sha256"]
    return None


def sha256_folder(path: str | Path, progress: Callable[[int, int], None] | None = None) -> str:
    """A diffusers folder's content hash: sha256 over the sorted lines ``relative path<TAB>file sha256`` of the
    weight files a merge reads from it (each file's hash cached as usual). The folder is remembered under this
    digest so ``reproduce`` finds it through the cache."""
    from .io.diffusers.files import used_weight_files
    root = Path(path)
    files = used_weight_files(root)
    total = sum(os.path.getsize(p) for p in files)
    done = 0
    lines = []
    for p in files:
        size = os.path.getsize(p)
        cb = (lambda d, t, base=done: progress(base + d, total)) if progress else None
        lines.append(f"{p.relative_to(root).as_posix()}\t{sha256_file(p, cb)}\n")
        done += size
    digest = hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
    remember(root, digest)
    return digest


def sha256_file(path: str | Path, progress: Callable[[int, int], None] | None = None) -> str:
    """Full sha256 of a file (cached). ``progress(done_bytes, total_bytes)`` is called after each block read
    (once with ``(size, size)`` when the cache answers). A folder gets :func:`sha256_folder`."""
    if os.path.isdir(path):
        return sha256_folder(path, progress)
    real, size, mtime = _ident(Path(path))
    hit = cached(real)
    if hit:
        if progress:
            progress(size, size)
        return hit
    h = hashlib.sha256()
    with open(real, "rb", buffering=0) as f:
        buf = bytearray(16 * BLOCK)
        mv = memoryview(buf)
        done = 0
        if progress:
            progress(0, size)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
            done += n
            if progress:
                progress(done, size)
    digest = h.hexdigest()
    remember(real, digest, size, mtime)
    return digest


def remember(path: str | Path, digest: str, size: int | None = None, mtime_ns: int | None = None) -> None:
    real = os.path.realpath(path)
    if size is None or mtime_ns is None:
        st = os.stat(real)
        size, mtime_ns = st.st_size, st.st_mtime_ns
    with _lock:
        data = _load()
        data[real] = {"sha256": digest, "size": size, "mtime_ns": mtime_ns}
        _store(data)


def paths_with(sha256: str) -> tuple[list[str], list[str]]:
    """Files on this machine that the cache says had ``sha256``: those unchanged since hashed, and those that
    still exist but whose size or mtime changed (reproduce then says "changed" rather than "not found")."""
    with _lock:
        data = _load()
    same, changed = [], []
    for real, ent in sorted(data.items()):
        if ent["sha256"] != sha256:
            continue
        try:
            st = os.stat(real)
        except OSError:
            continue
        (same if st.st_size == ent["size"] and st.st_mtime_ns == ent["mtime_ns"] else changed).append(real)
    return same, changed


def legacy_hash(path: str | Path) -> str:
    """The WebUI's old short hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits (a folder: the first 8
    hex digits of :func:`sha256_folder`; the WebUI has no short hash for folders)."""
    if os.path.isdir(path):
        return sha256_folder(path)[:8]
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def short_hash(sha256: str) -> str:
    return sha256[:10]
