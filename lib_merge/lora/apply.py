"""LoRAs baked into a merge (the recipe's ``lora`` field, ``merge … --lora PATH[:STRENGTH[:BLOCKS]]``).

Order, for every key a LoRA patches: the merge formula's fp32 value (or A's value, where the key is copied from
A: excluded parts, keys only A has, the one-model modes), then + Σ strength · ΔW exactly as ``lora bake`` adds it
to an fp32 model (``bake.plan_patches`` picks the modules, ``bake.patched`` adds them), then Adjust, then one
cast to the output dtype. So a merge with ``--lora`` equals ``lora bake`` run on the fp32 merge, and Adjust
tweaks the final look, LoRA included (supermerger applies its LoRAs to the merged model too).

A patched key is computed whole by both sinks (the row-blocked ``patched`` needs every row), and its key plan
carries its patches as a value field: what the value depends on (the LoRA file's identity, the module, the
strength after block weights) is compared by the live re-merge, the module's tensors are not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from torch import Tensor

from ..arch import ArchSpec
from ..recipe import LoraEntry, Recipe


@dataclass(frozen=True)
class LoraPatch:
    """One LoRA module added to one key. Equality (the live signature) reads the file's identity, the module
    name and the strength; ``patch`` is what ``bake.patched`` takes for it (its tensors are not compared)."""
    source: tuple  # the LoRA file: real path, size, modification time (ns)
    module: str
    strength: float  # the entry's strength times the key's block weight
    patch: Any = field(compare=False, repr=False)


def _bake():
    """``lora.bake``, imported when first used: it imports ``merge`` (for its output checks), which imports the
    plan and the sinks that import this module."""
    from . import bake
    return bake


def file_identity(path: str | os.PathLike) -> tuple:
    """What a LoRA file's contents are known by between two live merges: real path, size, mtime."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return (real,)
    return (real, st.st_size, st.st_mtime_ns)


def plan_lora(entries: Sequence[LoraEntry], shapes: Mapping[str, Sequence[int]], arch: ArchSpec
              ) -> dict[str, tuple[LoraPatch, ...]]:
    """Model key -> its patches, LoRA by LoRA in recipe order (the order ``lora bake`` adds them in). Every
    module is matched to a weight of A's shapes first: one that matches none is an error naming the LoRA file
    and the module (``bake.plan_patches``)."""
    bake = _bake()
    out: dict[str, list[LoraPatch]] = {}
    for e in entries:
        lo = bake.LoraInput(Path(e.path), e.strength, e.blocks_text())
        ident = file_identity(e.path)
        for key, patches in bake.plan_patches([lo], dict(shapes), arch).items():
            out.setdefault(key, []).extend(LoraPatch(ident, p[0].name, float(p[1]), p) for p in patches)
    return {k: tuple(v) for k, v in out.items()}


def add_lora(patches: Iterable[LoraPatch], value: Tensor) -> Tensor:
    """``value`` (a key's whole fp32 result, owned by the caller: added to in place) + Σ strength · ΔW, in fp32:
    ``lora bake``'s numbers."""
    todo = [p.patch for p in patches]
    return _bake().patched(value, todo, inplace=True) if todo else value


def row_block(patches: Iterable[LoraPatch], shape: Sequence[int]) -> int | None:
    """Elements per block of rows in which a key's patches can be added chunk by chunk (plain LoRA only: the
    file sink then streams the key), or None when the key must be patched whole."""
    todo = [p.patch for p in patches]
    if not todo or not shape or not _bake().by_rows(todo):
        return None
    cols = 1
    for d in shape[1:]:
        cols *= d
    return _bake().row_step(cols) * cols


def add_lora_rows(patches: Iterable[LoraPatch], chunk: Tensor, shape: Sequence[int], elem_start: int) -> None:
    """``chunk`` (fp32, the flattened elements of whole rows from ``elem_start`` on, a ``row_block`` of them or the
    last rows) += the patches' rows, in place: the numbers ``add_lora`` gives those rows."""
    cols = 1
    for d in shape[1:]:
        cols *= d
    _bake().add_rows(chunk.view(-1, cols), [p.patch for p in patches], elem_start // cols)


def counts(patches: Mapping[str, tuple[LoraPatch, ...]]) -> tuple[int, int]:
    """(weights patched, module applications) for the report."""
    return len(patches), sum(len(v) for v in patches.values())


def bake_recipe(model: str | os.PathLike, loras: Iterable[Any]) -> Recipe:
    """``lora bake MODEL LORA…`` as a merge recipe: A alone (``no_interpolation``), every tensor in A's dtype, the
    LoRAs (``bake.LoraInput``) baked in. ``merge_to_file`` of it with bake's metadata writes the same bytes as
    ``bake_loras`` (tested), on the multi-threaded file sink: what ``bake_loras`` can switch to."""
    entries = [LoraEntry(os.fspath(lo.path), lo.strength, getattr(lo, "blocks", None)) for lo in loras]
    return Recipe(models=[os.fspath(model)], mode="no_interpolation", dtype="keep", lora=entries)
