"""``reproduce``: re-run the recipe stored in a merged file and check the new file is byte-identical (a
diffusers folder written by a merge: a new folder whose weight files have the same content hash).

A merged file names its inputs by file name and sha256 (never by a local folder), so inputs are found by
sha256: where the local hash cache says a file with that hash lives, then (files written before names replaced
paths) the recorded path, then by name and by hash in the ``--search`` folders, the output's folder and the
current folder. A file at the recorded name whose hash differs is reported as changed, not as missing.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import hashing
from .errors import MergeError
from .merge import merge_to_file, recipe_files
from .metadata import file_name, output_stem
from .recipe import RECIPE_VERSION, Recipe
from .roles import describe_role, is_role_path
from .io.diffusers.files import is_diffusers_folder
from .io.sources import open_source
from .folder_output import merge_to_folder

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_HEX64 = re.compile(r"[0-9a-f]{64}")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Wanted:
    """One input as the merged file records it."""
    role: str
    recorded: str  # the recipe's entry: a bare file name (older files: a path)
    sha256: str | None

    @property
    def name(self) -> str:
        return file_name(self.recorded)

    @property
    def label(self) -> str:
        return describe_role(self.role)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _metadata_object(meta: dict[str, str], key: str, src: Path) -> dict:
    raw = meta.get(key)
    if not raw:
        raise MergeError(f"no {key} in the metadata (not made by BlockMerge?), {src}")
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        raise MergeError(f"{key} in the metadata is not valid JSON, {src}") from None
    if not isinstance(data, dict):
        raise MergeError(f"{key} in the metadata is not a JSON object, {src}")
    return data


def _recorded_inputs(data: dict, src: Path) -> dict[str, dict]:
    """The ``inputs`` list by role; anything malformed is a one-line error naming the entry."""
    inputs = data.get("inputs", [])
    if not isinstance(inputs, list):
        raise MergeError(f"blockmerge_recipe inputs is not a list: {_short(inputs)}, {src}")
    out: dict[str, dict] = {}
    for entry in inputs:
        ok = (isinstance(entry, dict) and is_role_path(str(entry.get("role")))
              and isinstance(entry.get("name", ""), str)
              and isinstance(entry.get("sha256"), str) and _HEX64.fullmatch(entry["sha256"]) is not None)
        if not ok:
            raise MergeError(f"blockmerge_recipe has a malformed inputs entry {_short(entry)}, {src}")
        out[entry["role"]] = entry
    return out


def _wanted(recipe: Recipe, inputs: dict[str, dict]) -> list[Wanted]:
    """Every file of the recipe tree (nested recipes' files by role path, ``a.b``)."""
    return [Wanted(role, rec, inputs.get(role, {}).get("sha256")) for role, rec in recipe_files(recipe)]


def is_legacy_layout(wanted: list[Wanted], inputs: dict[str, dict]) -> bool:
    """Files written before inputs were recorded by name recorded paths in ``models`` and file stems in
    ``inputs``; their metadata cannot be rebuilt byte for byte, so reproduce keeps it as it is."""
    return any(w.recorded != w.name or (w.role in inputs and inputs[w.role].get("name") != w.name) for w in wanted)


def _model_files(folder: str, recursive: bool) -> list[str]:
    if not os.path.isdir(folder):
        return []
    if not recursive:
        return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                      if f.lower().endswith(MODEL_SUFFIXES) and os.path.isfile(os.path.join(folder, f)))
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(MODEL_SUFFIXES)]
    return found


def _hash(path: str, progress: Progress | None) -> str | None:
    stage = f"hashing {os.path.basename(path)}"
    try:
        return hashing.sha256_file(path, (lambda d, t: progress(stage, d, t)) if progress else None)
    except OSError:
        return None


def locate_input(w: Wanted, search: list[str], out_dir: str, skip: set[str], progress: Progress | None = None) -> str:
    """Where input ``w`` is on this machine, or a MergeError saying it changed or is not found. Files the hash
    cache knew with this sha256 that changed since, and files at the recorded name, are checked before every
    model file of the folders is hashed."""
    same, stale = hashing.paths_with(w.sha256) if w.sha256 else ([], [])
    for p in same:
        if p not in skip:
            return p
    folders = list(dict.fromkeys([*search, out_dir, os.getcwd()]))
    by_name = stale + ([w.recorded] if w.recorded != w.name else []) + [os.path.join(d, w.name) for d in folders]
    changed: tuple[str, str] | None = None
    for p in by_name:
        if (os.path.isfile(p) or is_diffusers_folder(Path(p))) and os.path.realpath(p) not in skip:
            if w.sha256 is None:
                return p
            digest = _hash(p, progress)
            if digest == w.sha256:
                return p
            if digest and changed is None:
                changed = (p, digest)
    if w.sha256:
        for i, d in enumerate(folders):
            for p in _model_files(d, recursive=i < len(search)):
                if os.path.realpath(p) not in skip and _hash(p, progress) == w.sha256:
                    return p
    if changed:
        raise MergeError(f"input {w.label} {w.name} changed since the merge (sha256 {changed[1][:10]}, "
                         f"recorded {w.sha256[:10]}), {changed[0]}")
    where = "the hash cache, " + ", ".join(folders)
    raise MergeError(f"input {w.label} not found by sha256 {w.sha256[:10] if w.sha256 else '?'} "
                     f"({where}), {w.name}")


def _default_output(src: Path, folder: bool) -> Path:
    """``<stem>.reproduced.safetensors`` beside a file; ``<folder>.reproduced`` beside a diffusers folder."""
    return src.with_name(src.name + ".reproduced") if folder else \
        src.with_name(output_stem(src) + ".reproduced.safetensors")


def reproduce(file: str, output: str | None = None, search: list[str] | None = None, overwrite: bool = False,
              threads: int | None = None, progress: Progress | None = None) -> tuple[bool, Path, str]:
    src_path = Path(file)
    with open_source(src_path) as src:
        meta = dict(src.metadata)
    origin = f"{src_path} metadata"
    data = _metadata_object(meta, "blockmerge_recipe", src_path)
    custom_name = _metadata_object(meta, "sd_merge_recipe", src_path).get("custom_name")
    if custom_name is not None and not isinstance(custom_name, str):
        raise MergeError(f"sd_merge_recipe custom_name is not a string: {_short(custom_name)}, {src_path}")
    recipe = Recipe.from_dict(data, origin)
    inputs = _recorded_inputs(data, src_path)
    wanted = _wanted(recipe, inputs)
    legacy = is_legacy_layout(wanted, inputs)
    # an older layout or recipe version cannot be rebuilt byte for byte in today's metadata: keep it as it is
    keep_metadata = legacy or data.get("version", RECIPE_VERSION) < RECIPE_VERSION
    if not legacy and (missing := [w.label for w in wanted if not w.sha256]):
        raise MergeError(f"blockmerge_recipe records no sha256 for input {missing[0]}, {src_path}")
    folder = is_diffusers_folder(src_path)
    new = Path(output) if output else _default_output(src_path, folder)
    skip = {os.path.realpath(src_path), os.path.realpath(new)}
    out_dir = str(src_path.resolve().parent)
    locate = {w.role: locate_input(w, list(search or []), out_dir, skip, progress) for w in wanted}
    write = merge_to_folder if folder else merge_to_file
    res = write(recipe, new, overwrite=overwrite, threads=threads, locate=locate, output_name=custom_name,
                progress=progress, metadata=meta if keep_metadata else None)
    stage = f"hashing {src_path.name}"
    original = hashing.sha256_file(src_path, (lambda d, t: progress(stage, d, t)) if progress else None)
    note = " (metadata of an older BlockMerge layout kept as it was)" if keep_metadata else ""
    if res.sha256 == original:
        return True, new, f"identical: {new} has sha256 {res.sha256} like {src_path}{note}"
    return False, new, f"DIFFERENT: {new} has sha256 {res.sha256}, {src_path} has {original}{note}"
