"""``reproduce``: re-run the recipe stored in a merged file and check the new file is byte-identical."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import hashing
from .errors import MergeError
from .merge import merge_to_file
from .recipe import Recipe
from .sources import open_source

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def _find_by_hash(sha: str, dirs: list[str]) -> str | None:
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                if f.lower().endswith(MODEL_SUFFIXES):
                    p = os.path.join(root, f)
                    try:
                        if hashing.sha256_file(p) == sha:
                            return p
                    except OSError:
                        continue
    return None


def reproduce(file: str, output: str | None = None, search: list[str] | None = None, overwrite: bool = False,
              threads: int | None = None, progress=None) -> tuple[bool, Path, str]:
    src_path = Path(file)
    with open_source(src_path) as src:
        meta = dict(src.metadata)
    raw = meta.get("blockmerge_recipe")
    if not raw:
        raise MergeError(f"no blockmerge_recipe in the metadata (not made by BlockMerge?), {src_path}")
    data = json.loads(raw)
    recipe = Recipe.from_dict(data, f"{src_path} metadata")
    custom_name = json.loads(meta.get("sd_merge_recipe", "{}")).get("custom_name")
    inputs = {i["role"]: i for i in data.get("inputs", [])}
    locate: dict[str, str] = {}
    wanted = list(zip("abc", recipe.models)) + ([("vae", recipe.bake_vae)] if recipe.bake_vae else [])
    for role, recorded in wanted:
        sha = inputs.get(role, {}).get("sha256")
        if os.path.isfile(recorded) and (sha is None or hashing.sha256_file(recorded) == sha):
            locate[recorded] = recorded
            continue
        found = _find_by_hash(sha, search or []) if sha else None
        if not found:
            raise MergeError(f"input {role.upper()} not found at its recorded path or by sha256 {sha[:10] if sha else '?'} "
                             f"in --search folders, {recorded}")
        locate[recorded] = found
    new = Path(output) if output else src_path.with_name(src_path.name.rsplit(".safetensors", 1)[0] + ".reproduced.safetensors")
    res = merge_to_file(recipe, new, overwrite=overwrite, threads=threads, locate=locate, output_name=custom_name,
                        progress=progress)
    original = hashing.sha256_file(src_path)
    if res.sha256 == original:
        return True, new, f"identical: {new} has sha256 {res.sha256} like {src_path}"
    return False, new, f"DIFFERENT: {new} has sha256 {res.sha256}, {src_path} has {original}"
