"""File hashes as the WebUI computes them, with a cache keyed by real path, size and mtime."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_lock = threading.Lock()
BLOCK = 1 << 20


def cache_path() -> Path:
    env = os.environ.get("BLOCKMERGE_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blockmerge"
    return base / "hashes.json"


def _load() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(data: dict) -> None:
    p = cache_path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, p)
    except OSError:
        pass  # a cache that cannot be written only costs time


def _ident(path: Path) -> tuple[str, int, int]:
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_size, st.st_mtime_ns


def sha256_file(path: str | Path, progress=None) -> str:
    """Full sha256 of a file (cached)."""
    real, size, mtime = _ident(Path(path))
    with _lock:
        ent = _load().get(real)
    if ent and ent.get("size") == size and ent.get("mtime_ns") == mtime:
        return ent["sha256"]
    h = hashlib.sha256()
    with open(real, "rb", buffering=0) as f:
        buf = bytearray(16 * BLOCK)
        mv = memoryview(buf)
        done = 0
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


def legacy_hash(path: str | Path) -> str:
    """The WebUI's old short hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def short_hash(sha256: str) -> str:
    return sha256[:10]
