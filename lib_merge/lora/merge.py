"""Merge LoRAs into one LoRA: ``lora merge L1[:r1] L2[:r2] … -o OUT [--rank N|auto]``.

The merged file at weight 1 applies Σ r_i · ΔW_i, with ΔW_i = up_i @ down_i · (alpha_i / rank_i) per module.

Without ``--rank`` the factors are **concatenated** along the rank dimension, never summed factor by factor:
kohya's ``merge_lora`` (and supermerger's "Merge LoRAs") adds the up and the down matrices of same-rank LoRAs
separately, which gives (Σ u_i)(Σ d_i) = Σ u_i d_i + the cross terms u_i d_j — not the sum of the ΔW. Stacking
``up = [u_1 | u_2 | …]`` and ``down = [d_1; d_2; …]`` gives exactly Σ u_i d_i, at rank Σ rank_i. Each part is
scaled the kohya way with the sign kept on one factor: up by sign(r)·√|r|, down by √|r| (supermerger's "same to
Strength"), so the merged LoRA at weight 1 equals the LoRAs at strengths r_i. When the inputs of a module share
one alpha/rank, it is kept (alpha = that scale · the new rank); when they differ, each alpha/rank is folded into
its factors (√ on each) and alpha = the new rank. Since nothing is summed, ranks need not be equal. A module
present in only some inputs is kept (scaled by its own ratio); inputs at ratio 0 add nothing, and a module with
only ratio-0 inputs is left out.

With ``--rank N`` each module's full ΔW = Σ r_i · ΔW_i (fp32) is re-compressed by truncated SVD to rank N (capped
by the matrix's smaller side; ``auto``: the largest rank the module has among the inputs), with ``svd.factorize``
(exact, or the seeded randomized SVD within 1 % of the exact truncation error); alpha = the rank kept, and each
module's relative error is reported. A module whose ΔW sums to exactly zero is left out.

Conv modules (1×1, 3×3) work as matrices (out, in·k·k), factors shaped as kohya writes them. Plain LoRA modules
only: anything else (LyCORIS LoHa/LoKr …) is an error naming the file and module. LoRAs for different base
models (SD1/SD2 against SDXL, from their module names and cross-attention width) are an error naming both files.
The output's ``ss_base_model_version`` is that family; where the names cannot tell SD1 from SD2, the inputs'
own ``ss_base_model_version`` decides, else SD1.
Everything is computed in memory (LoRAs are small), then written by the streamed writer (temp file, renamed).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import hashing
from ..errors import MergeError
from ..io.sources import SafetensorsSource
from ..merge import check_output_path
from ..metadata import file_name
from .bake import parse_lora_arg
from .extract import OUT_DTYPES
from .files import LoraModule, lora_metadata, read_lora
from .names import lora_family, same_family
from .svd import check_rank, factorize
from .writer import Entry, write_streamed

FAMILY_LABEL = {"sd1": "SD1", "sd2": "SD2", "sd": "SD1/SD2", "sdxl": "SDXL"}
META_FAMILY = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"))


@dataclass(frozen=True)
class MergeInput:
    path: Path
    ratio: float = 1.0


@dataclass(frozen=True)
class Part:
    """One input's module with its ratio."""
    path: Path
    module: LoraModule
    ratio: float


@dataclass(frozen=True)
class MergedModule:
    name: str
    up: torch.Tensor
    down: torch.Tensor
    alpha: float
    inputs: int  # how many inputs contributed
    rel_error: float  # 0 for the exact concatenation
    method: str  # concat | exact | lowrank

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraMergeResult:
    output: Path
    sha256: str
    arch: str
    rank: int | str | None
    modules: list[MergedModule]
    left_out: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> list[str]:
        ranks = [m.rank for m in self.modules]
        how = "concatenated (exact sum)" if self.rank is None else f"SVD to rank {self.rank}"
        lines = [f"{len(self.modules)} modules written ({self.arch}, {how}), {len(self.left_out)} left out (zero)",
                 f"rank: min {min(ranks)}, median {statistics.median(ranks):g}, max {max(ranks)}"]
        if self.rank is not None:
            errs = [m.rel_error for m in self.modules]
            lines.append(f"relative error: min {min(errs):.3g}, median {statistics.median(errs):.3g}, "
                         f"max {max(errs):.3g}")
        return lines

    def to_json(self) -> dict:
        return {"output": str(self.output), "sha256": self.sha256, "arch": self.arch, "rank": self.rank,
                "seconds": self.seconds, "left_out": self.left_out,
                "modules": [{"name": m.name, "rank": m.rank, "alpha": m.alpha, "inputs": m.inputs,
                             "rel_error": m.rel_error, "method": m.method} for m in self.modules]}


def parse_merge_arg(text: str) -> MergeInput:
    """``PATH[:RATIO]`` (block weights are for ``bake``, not for merging LoRAs)."""
    lo = parse_lora_arg(text)
    if lo.blocks is not None:
        raise MergeError(f"lora merge takes PATH[:RATIO], not block weights, {text}")
    return MergeInput(lo.path, lo.strength)


def parse_rank(text: str | int | None) -> int | str | None:
    """``--rank``: a whole number ≥ 1, ``auto``, or None (concatenate)."""
    if text is None or text == "auto":
        return text
    if isinstance(text, int) and not isinstance(text, bool):
        return check_rank(text, "--rank")
    try:
        value = int(str(text).strip())
    except ValueError:
        raise MergeError(f"rank must be a whole number or auto, got {text!r}, --rank") from None
    return check_rank(value, "--rank")


def _kernel(mod: LoraModule) -> tuple[int, ...]:
    """What down multiplies, without the rank: (in,) for Linear and conv 1×1 alike, (in, k, k) else."""
    tail = tuple(mod.down.shape[1:])
    return tail[:1] if tail[1:] == (1, 1) else tail


def _check_fits(name: str, first: Part, other: Part) -> None:
    a, b = first.module, other.module
    if a.up.shape[0] != b.up.shape[0] or _kernel(a) != _kernel(b):
        raise MergeError(f"LoRA modules do not fit each other (ΔW {a.up.shape[0]}×{math.prod(_kernel(a))} in "
                         f"{first.path}, {b.up.shape[0]}×{math.prod(_kernel(b))}), {other.path} module {name}")


def _family(modules: dict[str, LoraModule]) -> str | None:
    return lora_family({n: (tuple(m.up.shape), tuple(m.down.shape)) for n, m in modules.items()})


def _meta_family(path: Path) -> str | None:
    with SafetensorsSource(path) as src:
        version = src.metadata.get("ss_base_model_version", "")
    return next((fam for prefix, fam in META_FAMILY if version.startswith(prefix)), None)


def read_inputs(inputs: list[MergeInput]) -> tuple[dict[str, list[Part]], str]:
    """Module name -> its parts (input order), and the output's family (sd1/sd2/sdxl). Checks module kinds,
    base models and shapes before anything is computed."""
    by_name: dict[str, list[Part]] = {}
    known: tuple[str, Path] | None = None
    for inp in inputs:
        modules = read_lora(inp.path)
        for name, mod in modules.items():
            if not isinstance(mod, LoraModule) or mod.mid is not None:
                kind = "LoCon lora_mid" if isinstance(mod, LoraModule) else type(mod).__name__
                raise MergeError(f"lora merge takes plain LoRA modules only ({kind}), {inp.path} module {name}")
        fam = _family(modules)
        if known is not None and not same_family(known[0], fam):
            raise MergeError(f"LoRAs for different base models ({FAMILY_LABEL[known[0]]} and {FAMILY_LABEL[fam]}), "
                             f"{known[1]} and {inp.path}")
        if fam is not None and (known is None or known[0] == "sd"):
            known = (fam, inp.path)
        for name, mod in modules.items():
            part = Part(inp.path, mod, inp.ratio)
            if name in by_name:
                _check_fits(name, by_name[name][0], part)
            by_name.setdefault(name, []).append(part)
    family = known[0] if known else None
    if family in (None, "sd"):
        metas = [_meta_family(i.path) for i in inputs]
        family = next((m for m in metas if m and same_family(family, m)), "sd1")
    return by_name, family


def _shaped(first: LoraModule, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix factors in the first input's form: conv up (out, r, 1, 1), down (r, in, k, k)."""
    r = down.shape[0]
    if first.up.dim() == 4:
        up = up.reshape(up.shape[0], r, 1, 1)
    return up, down.reshape(r, *first.down.shape[1:])


def concat_module(name: str, parts: list[Part]) -> MergedModule:
    """Stack the parts along the rank: up = [sign(r)·√(|r|·s)·u_i …], down = [√(|r|·s)·d_i; …], where s is 1
    when all parts share alpha/rank (then kept in alpha) and the part's alpha/rank otherwise (alpha = rank)."""
    scales = {p.module.scale for p in parts}
    shared = len(scales) == 1
    ups, downs = [], []
    for p in parts:
        up, down = p.module.matrices()
        f = math.sqrt(abs(p.ratio) * (1.0 if shared else p.module.scale))
        ups.append(up * (math.copysign(f, p.ratio)))
        downs.append(down * f)
    up, down = _shaped(parts[0].module, torch.cat(ups, 1), torch.cat(downs, 0))
    rank = down.shape[0]
    alpha = scales.pop() * rank if shared else float(rank)
    return MergedModule(name, up, down, alpha, len(parts), 0.0, "concat")


def delta_of(parts: list[Part]) -> torch.Tensor:
    """Σ r_i · up_i @ down_i · alpha_i/rank_i in fp32, as a matrix (out, in·k·k)."""
    total = None
    for p in parts:
        up, down = p.module.matrices()
        d = (up @ down) * (p.ratio * p.module.scale)
        total = d if total is None else total.add_(d)
    return total


def svd_module(name: str, parts: list[Part], rank: int | str, exact: bool) -> MergedModule | None:
    """ΔW summed and truncated to ``rank`` (``auto``: the largest input rank of this module); None if ΔW = 0."""
    delta = delta_of(parts)
    if not torch.any(delta):
        return None
    first = parts[0].module
    r = max(p.module.rank for p in parts) if rank == "auto" else int(rank)
    shape = (first.up.shape[0], *_kernel(first))
    f = factorize(delta.reshape(shape), rank=r, exact=exact)
    up, down = _shaped(first, f.up.reshape(shape[0], f.rank), f.down.reshape(f.rank, -1))
    return MergedModule(name, up, down, float(f.rank), len(parts), f.rel_error, f.method)


def merge_loras(inputs: list[MergeInput], output: str | os.PathLike, *, rank: int | str | None = None,
                dtype: str = "fp16", overwrite: bool = False, exact: bool = False) -> LoraMergeResult:
    t0 = time.monotonic()
    if not inputs:
        raise MergeError("give at least one LoRA file, LORA")
    rank = parse_rank(rank)
    if dtype not in OUT_DTYPES:
        raise MergeError(f"unknown dtype {dtype!r} ({', '.join(OUT_DTYPES)}), --dtype")
    for inp in inputs:
        if not math.isfinite(inp.ratio):
            raise MergeError(f"LoRA ratio must be a finite number, {inp.path}")
    out = check_output_path(output, [i.path for i in inputs], overwrite)
    by_name, family = read_inputs(inputs)
    merged: list[MergedModule] = []
    left_out: list[str] = []
    for name, parts in sorted(by_name.items()):
        live = [p for p in parts if p.ratio != 0.0]
        m = None
        if live:
            m = concat_module(name, live) if rank is None else svd_module(name, live, rank, exact)
        if m is None:
            left_out.append(name)
        else:
            merged.append(m)
    if not merged:
        raise MergeError(f"the merged LoRA would be empty (every module's ΔW is zero), {out}")
    st = OUT_DTYPES[dtype]
    entries, tensors = [], {}
    for m in merged:
        for part, t, kind in ((".lora_up.weight", m.up, st), (".lora_down.weight", m.down, st),
                              (".alpha", torch.tensor(m.alpha, dtype=torch.float32), "F32")):
            entries.append(Entry(m.name + part, kind, tuple(t.shape)))
            tensors[m.name + part] = t
    top = max(merged, key=lambda m: m.rank)
    recipe = {
        "type": "blockmerge_lora", "lora": "merge", "rank": rank, "dtype": dtype, "exact_svd": exact,
        "loras": [{"name": file_name(i.path), "ratio": i.ratio} for i in inputs],
        "inputs": [{"role": f"lora{n + 1}", "name": file_name(i.path), "sha256": hashing.sha256_file(i.path)}
                   for n, i in enumerate(inputs)],
    }
    meta = lora_metadata(family, top.rank, top.alpha, recipe)
    sha = write_streamed(out, entries, tensors.__getitem__, meta, overwrite)
    return LoraMergeResult(out, sha, family, rank, merged, left_out, time.monotonic() - t0)
