"""Output names from the tab or the API: bare names inside the models folder, nothing else."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import MergeError

_BAD = set('<>:"|?*\0')


def output_path(name: str, models_dir: Path, field: str = "output") -> Path:
    """``name`` (with or without ``.safetensors``) -> a path directly inside ``models_dir``."""
    if not isinstance(name, str) or not name.strip():
        raise MergeError(f"an output name is required, {field}")
    n = name.strip()
    if "/" in n or "\\" in n or os.path.isabs(n):
        raise MergeError(f"output name must be a bare file name (no folders), {field}: {n!r}")
    if n in (".", "..") or ".." in n:
        raise MergeError(f"output name must not contain '..', {field}: {n!r}")
    if any(c in _BAD for c in n) or n.startswith("."):
        raise MergeError(f"output name has a character that is not allowed, {field}: {n!r}")
    if not n.lower().endswith(".safetensors"):
        n += ".safetensors"
    base = Path(os.path.realpath(models_dir))
    path = base / n
    if Path(os.path.realpath(path)).parent != base:
        raise MergeError(f"output name leaves the models folder, {field}: {n!r}")
    return path
