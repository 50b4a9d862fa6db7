"""Merges and conversions written as diffusers folders (``--format diffusers``).

The merge streams into a temporary single file beside the output (so it needs the output's size twice on that
disk while it runs), which is then written tensor by tensor into a temporary folder beside the output; the
folder takes the output's name only when complete. An existing folder is replaced only with ``overwrite``; an
input, or a folder holding an input, never is.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from . import hashing
from .errors import MergeError
from .io.diffusers.files import is_diffusers_folder
from .io.diffusers.writer import folder_digest, write_folder
from .io.sources import open_source
from .merge import MergeResult, merge_to_file, recipe_files
from .recipe import Recipe, as_recipe, check_path_text

Progress = Callable[[str, int, int], None]


@dataclass
class ConvertResult:
    output: Path
    sha256: str
    seconds: float
    notes: list[str] = field(default_factory=list)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_folder_output(output: str | os.PathLike, inputs: list[Path], overwrite: bool) -> Path:
    """What the output folder's path alone can tell: its parent, a file in the way, an input in the way."""
    if not isinstance(output, (str, os.PathLike)):
        raise MergeError(f"output must be a folder path, got {type(output).__name__}")
    out = Path(output)
    check_path_text(str(out), "output")
    if out.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise MergeError(f"--format diffusers writes a folder; the output looks like a file name, {out}")
    if not out.parent.is_dir():
        raise MergeError(f"output folder's parent does not exist, {out.parent}")
    if out.exists() and not out.is_dir():
        raise MergeError(f"output exists and is not a folder, {out}")
    real = os.path.realpath(out)
    for p in inputs:
        rp = os.path.realpath(p)
        if _inside(rp, real) or _inside(real, rp):
            raise MergeError(f"output would write into or replace an input model, {out}")
    if out.exists() and not overwrite:
        raise MergeError(f"output exists (use --overwrite to replace it), {out}")
    return out


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Give the complete folder ``tmp`` the output's name (the old folder goes only after that succeeded)."""
    old = None
    if out.exists():
        if not overwrite:
            raise MergeError(f"output exists (use --overwrite to replace it), {out}")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            os.rename(old / out.name, out)
        raise MergeError(f"cannot rename the finished folder into place: {e.strerror}, {out}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write(src_path: Path, out: Path, overwrite: bool, template: Path | None, overrides, metadata,
           progress: Progress | None, cancel) -> tuple[str, list[str]]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        cb = (lambda done, total: progress("writing diffusers", done, total)) if progress else None
        with open_source(src_path) as src:
            hashes, notes = write_folder(src, tmp, template=template, overrides=overrides, metadata=metadata,
                                         progress=cb, cancel=cancel)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for rel, digest in hashes.items():
        hashing.remember(out / rel, digest)
    digest = folder_digest(hashes)
    hashing.remember(out, digest)
    return digest, notes


def first_folder(models: list[Path]) -> Path | None:
    """The first diffusers folder among the inputs: its tokenizers, scheduler and configs are copied."""
    return next((m for m in models if is_diffusers_folder(m)), None)


def convert_to_folder(model: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False,
                      overrides: Mapping[str, Mapping] | None = None, progress: Progress | None = None,
                      cancel: Callable[[], bool] | None = None) -> ConvertResult:
    """Write a single-file checkpoint (or a diffusers folder) as a diffusers folder, tensor by tensor."""
    t0 = time.perf_counter()
    src = Path(model)
    out = check_folder_output(output, [src], overwrite)
    template = src if is_diffusers_folder(src) else None
    with open_source(src) as s:
        metadata = dict(s.metadata)
    metadata.pop("format", None)
    digest, notes = _write(src, out, overwrite, template, overrides, metadata, progress, cancel)
    return ConvertResult(out, digest, time.perf_counter() - t0, notes)


def merge_to_folder(recipe: Recipe | dict, output: str | os.PathLike, *, overwrite: bool = False,
                    threads: int | None = None, device: str = "cpu", progress: Progress | None = None,
                    cancel: Callable[[], bool] | None = None, overrides: Mapping[str, Mapping] | None = None,
                    locate: Mapping[str, str] | None = None, output_name: str | None = None,
                    metadata: dict[str, str] | None = None) -> MergeResult:
    """:func:`lib_merge.merge.merge_to_file`, written as a diffusers folder. The merge's metadata (recipe,
    inputs by name and sha256) goes into the UNet file's header; ``sha256`` is the folder's content hash.
    ``locate``, ``output_name`` and ``metadata`` are merge_to_file's (``reproduce`` passes them)."""
    t0 = time.perf_counter()
    recipe = as_recipe(recipe)
    files = [Path((locate or {}).get(role, p)) for role, p in recipe_files(recipe)]
    out = check_folder_output(output, files, overwrite)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".merging.safetensors", dir=out.parent)
    os.close(fd)
    os.unlink(name)
    tmp_file = Path(name)
    try:
        res = merge_to_file(recipe, tmp_file, threads=threads, device=device, progress=progress, cancel=cancel,
                            output_name=output_name or out.name, locate=locate, metadata=metadata)
        models = [Path((locate or {}).get(role, p)) for role, p in recipe.leaves()]  # A first, nested steps' in order
        digest, notes = _write(tmp_file, out, overwrite, first_folder(models), overrides, res.metadata,
                               progress, cancel)
    finally:
        tmp_file.unlink(missing_ok=True)
    res.plan.report.notes.extend(notes)
    return MergeResult(out, digest, res.plan, time.perf_counter() - t0, res.metadata, res.bytes_read)
