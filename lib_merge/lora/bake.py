"""Bake LoRAs into a checkpoint: W' = W + Σ strength · ΔW, streamed key by key (ΔW per kind: ``kinds``).

Every module of every LoRA is matched to a weight of the model before a byte is written: a module with no
matching weight (names: ``names``, compvis or diffusers style, OpenCLIP q/k/v into their third of the joined
``in_proj_weight``), or whose ΔW has another shape, is an error naming it (never a silent skip). Patched weights
are computed in fp32 and written in the model's dtype; every other tensor is copied unchanged. The file is
written by the merge path (``apply.bake_recipe``: the model alone with the LoRAs baked in) on the multi-threaded
file sink, with this module's own recipe in the metadata.

Block weights (``LORA:STRENGTH:BLOCKS``, see ``blocks``) multiply the strength of each module by the value of
its weight's block; a module whose strength comes to 0 is not applied at all, so the weights of a block at 0 are
the model's bytes unchanged.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import hashing
from ..arch import ArchSpec, block_of
from ..errors import MergeError
from ..merge import check_output_path, merge_to_file
from ..metadata import file_name
from .apply import bake_recipe, counts
from .blocks import parse_blocks
from .files import read_lora
from .kinds import LoraModule, Module, rows_cols
from .names import module_map, resolve


@dataclass(frozen=True)
class LoraInput:
    path: Path
    strength: float = 1.0
    blocks: str | None = None  # a LoRA block-weight preset name or vector (``blocks``); None: every block 1


@dataclass
class BakeResult:
    output: Path
    sha256: str
    arch: str
    patched: int  # model weights changed
    modules: int  # LoRA modules applied (over all LoRAs)
    seconds: float


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_lora_arg(text: str) -> LoraInput:
    """``PATH[:STRENGTH[:BLOCKS]]``; a tail that is not a number stays part of the path (``C:\\…``). BLOCKS has
    no ``:`` (a preset name or a comma vector), so it is taken only after a numeric STRENGTH."""
    parts = text.rsplit(":", 2)
    if len(parts) == 3 and parts[0] and parts[2].strip() and _number(parts[1]) is not None:
        head, blocks = parts[0], parts[2].strip()
        value = _number(parts[1])
    else:
        head, sep, tail = text.rpartition(":")
        value = _number(tail) if sep and head else None
        if value is None:
            return LoraInput(Path(text))
        blocks = None
    if not math.isfinite(value):
        raise MergeError(f"LoRA strength must be a finite number, {text}")
    return LoraInput(Path(head), value, blocks)


def block_strengths(lo: LoraInput) -> dict[str, float] | None:
    """Block ID -> value for a LoRA given with BLOCKS (checked before any LoRA file is read); None without."""
    return None if lo.blocks is None else parse_blocks(lo.blocks, f"LoRA {lo.path}")


Patch = tuple[Module, float, int]  # (module, strength, first row of the weight its ΔW lands in)


def plan_patches(loras: list[LoraInput], shapes: dict[str, tuple[int, ...]], arch: ArchSpec
                 ) -> dict[str, list[Patch]]:
    """Model key -> the patches to add to it; every module's name and shape is checked before any work. With
    block weights the strength is strength · value of the key's block; modules at strength 0 are left out."""
    table = module_map(shapes)
    strengths = [block_strengths(lo) for lo in loras]
    patches: dict[str, list[Patch]] = {}
    for lo, blocks in zip(loras, strengths):
        for name, mod in read_lora(lo.path).items():
            target = resolve(name, table)
            if target is None:
                raise MergeError(f"LoRA module has no matching weight in the model, {lo.path} module {name}")
            shape = shapes[target.key]
            first, count = target.rows(shape)
            want = (count, rows_cols(tuple(shape))[1])
            got = mod.dims()
            if got != want:
                where = "" if target.part is None else f" ({'qkv'[target.part]} third of the joined in_proj)"
                raise MergeError(f"LoRA module does not fit the model weight {target.key} {tuple(shape)}{where} "
                                 f"(ΔW {got[0]}×{got[1]}, needs {want[0]}×{want[1]}), {lo.path} module {name}")
            strength = lo.strength if blocks is None else lo.strength * blocks[block_of(target.key, arch)]
            if strength != 0.0:
                patches.setdefault(target.key, []).append((mod, strength, first))
    return patches


CHUNK_ELEMS = 1 << 19  # fp32 elements per row block (2 MB, reused): no full-size fp32 temporary. The file sink
# patches plain-LoRA keys in these same row blocks (``row_step``), so its numbers are the whole-tensor path's.


def row_step(cols: int) -> int:
    """Rows per block of a weight with ``cols`` columns: how ``patched`` (and the file sink) cut a weight."""
    return max(1, CHUNK_ELEMS // max(cols, 1))


def by_rows(todo: list[Patch]) -> bool:
    """Every patch multiplies only the rows asked for (plain LoRA, no CP core): it can be added block by block
    of rows without building ΔW whole."""
    return all(isinstance(mod, LoraModule) and mod.mid is None for mod, _, _ in todo)


def add_rows(acc: torch.Tensor, todo: list[Patch], i: int) -> None:
    """``acc`` (fp32 rows i.. of a weight, as a (rows, cols) matrix) += Σ strength · ΔW's rows, in place: the
    block ``patched`` computes for the same rows."""
    j = i + acc.shape[0]
    for first, add, count in [(first, *_contribution(mod, strength)) for mod, strength, first in todo]:
        lo, hi = max(i, first), min(j, first + count)
        if lo < hi:
            add(acc[lo - i:hi - i], lo - first, hi - first)


def _contribution(mod: Module, strength: float):
    """(add(acc, a, b): acc += strength · ΔW rows a..b in place, row count). Plain LoRA multiplies only the rows
    asked for; the other kinds build their fp32 ΔW once per weight (as the WebUI does)."""
    if isinstance(mod, LoraModule) and mod.mid is None:
        up, down = mod.matrices()
        scale = strength * mod.scale
        return (lambda acc, a, b: acc.addmm_(up[a:b], down, alpha=scale)), up.shape[0]
    full = mod.delta().mul_(strength)
    return (lambda acc, a, b: acc.add_(full[a:b])), full.shape[0]


def patched(w: torch.Tensor, todo: list[Patch], inplace: bool = False) -> torch.Tensor:
    """W + Σ strength · ΔW in W's dtype, computed in fp32 one block of rows at a time; each ΔW lands in the rows
    from its first row on (0, or a q/k/v third of a joined in_proj). ``inplace``: W is an fp32 tensor the caller
    owns, added to where it is (the same numbers, without a copy of W)."""
    mat = w.reshape(w.shape[0], -1)
    rows, cols = mat.shape
    parts = [(first, *_contribution(mod, strength)) for mod, strength, first in todo]
    inplace = inplace and w.dtype == torch.float32 and w.is_contiguous()
    out = mat if inplace else torch.empty_like(mat)
    step = row_step(cols)
    buf = None if inplace else torch.empty(min(step, rows), cols, dtype=torch.float32)
    for i in range(0, rows, step):
        j = min(rows, i + step)
        if inplace:
            acc = mat[i:j]
        else:
            acc = buf[:j - i]
            acc.copy_(mat[i:j])
        for first, add, count in parts:
            lo, hi = max(i, first), min(j, first + count)
            if lo < hi:
                add(acc[lo - i:hi - i], lo - first, hi - first)
        if not inplace:
            out[i:j].copy_(acc)
    return out.reshape(w.shape)


def bake_loras(model: str | os.PathLike, loras: list[LoraInput], output: str | os.PathLike, *,
               overwrite: bool = False) -> BakeResult:
    t0 = time.monotonic()
    if not loras:
        raise MergeError("give at least one LoRA file, LORA")
    for lo in loras:
        block_strengths(lo)  # a bad BLOCKS is named by its LoRA file, before anything is read
    out = check_output_path(output, [Path(model), *(lo.path for lo in loras)], overwrite)
    recipe = {
        "type": "blockmerge_lora", "lora": "bake", "model": file_name(model),
        "loras": [{"name": file_name(lo.path), "strength": lo.strength,
                   **({"blocks": lo.blocks} if lo.blocks is not None else {})} for lo in loras],
        "inputs": [{"role": "model", "name": file_name(model), "sha256": hashing.sha256_file(model)}]
        + [{"role": f"lora{i + 1}", "name": file_name(lo.path), "sha256": hashing.sha256_file(lo.path)}
           for i, lo in enumerate(loras)],
    }
    meta = {"format": "pt",
            "blockmerge_recipe": json.dumps(recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=False)}
    # the merge path (A alone, the LoRAs baked in, every tensor in A's dtype) on the multi-threaded file sink
    res = merge_to_file(bake_recipe(model, loras), out, overwrite=overwrite, metadata=meta)
    patched_keys, n_mod = counts({kp.key: kp.lora for kp in res.plan.keys if kp.lora})
    return BakeResult(out, res.sha256, res.plan.arch.name, patched_keys, n_mod, time.monotonic() - t0)
