"""Extract a LoRA from a fine-tune and its base: ΔW = TUNED − BASE per Linear/Conv weight, truncated by SVD.

With ``--text-encoder`` the text encoders are covered too, OpenCLIP's (SD2, SDXL's second) included: the ΔW of
a joined ``attn.in_proj_weight`` is split into its q/k/v row thirds, each written as its own module under the
name the WebUI loads (``…_self_attn_q_proj`` …). Each module keeps ``--rank`` (capped by its smaller side) or the smallest rank keeping ``--energy`` of ΔW's
squared Frobenius norm; conv k×k (k > 1) weights take ``--conv-rank`` when given. ``alpha`` = the rank kept, so
the WebUI applies up @ down unscaled. Modules whose ΔW is exactly zero are not written (they change nothing)
and are counted in the report.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import hashing
from ..arch import detect
from ..errors import MergeError
from ..io.filesink import check_device
from ..io.sources import open_source
from ..merge import check_output_path
from ..metadata import file_name
from .files import lora_metadata
from .names import extract_modules, uncovered_text_encoder
from .svd import Factors, check_energy, check_rank, factorize
from .writer import Entry, write_streamed

OUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}


@dataclass(frozen=True)
class ModuleReport:
    name: str
    key: str
    shape: tuple[int, ...]
    rank: int
    rel_error: float
    method: str = "exact"  # SVD used: exact | lowrank


@dataclass
class ExtractResult:
    output: Path
    sha256: str
    arch: str
    modules: list[ModuleReport]
    unchanged: list[str] = field(default_factory=list)
    uncovered_te: int = 0
    seconds: float = 0.0

    def summary(self, verbose: bool = False) -> list[str]:
        errs = [m.rel_error for m in self.modules]
        ranks = [m.rank for m in self.modules]
        lines = [f"{len(self.modules)} modules written ({self.arch}), {len(self.unchanged)} unchanged and left out"]
        fast = sum(1 for m in self.modules if m.method == "lowrank")
        if fast:
            lines.append(f"{fast} modules by randomized SVD (within 1 % of the exact error; --exact-svd for exact)")
        if errs:
            lines.append(f"rank kept: min {min(ranks)}, median {statistics.median(ranks):g}, max {max(ranks)}")
            lines.append(f"relative error: min {min(errs):.3g}, median {statistics.median(errs):.3g}, "
                         f"max {max(errs):.3g}")
        if self.uncovered_te:
            lines.append(f"note: {self.uncovered_te} text-encoder weights have no LoRA module name and are not "
                         f"extracted")
        if verbose:
            lines += [f"  {m.name}  rank {m.rank}  error {m.rel_error:.4g}  {m.method}" for m in self.modules]
        return lines

    def to_json(self) -> dict:
        return {"output": str(self.output), "sha256": self.sha256, "arch": self.arch, "seconds": self.seconds,
                "unchanged": self.unchanged, "uncovered_text_encoder": self.uncovered_te,
                "modules": [{"name": m.name, "key": m.key, "shape": list(m.shape), "rank": m.rank,
                             "rel_error": m.rel_error, "method": m.method} for m in self.modules]}


def _rank_rule(shape: tuple[int, ...], rank: int | None, energy: float | None,
               conv_rank: int | None) -> tuple[int | None, float | None]:
    if conv_rank is not None and len(shape) == 4 and (shape[2] > 1 or shape[3] > 1):
        return conv_rank, None
    return rank, energy


def extract_lora(tuned: str | os.PathLike, base: str | os.PathLike, output: str | os.PathLike, *,
                 rank: int | None = None, energy: float | None = None, conv_rank: int | None = None,
                 text_encoder: bool = False, dtype: str = "fp16", device: str = "cpu",
                 overwrite: bool = False, exact: bool = False) -> ExtractResult:
    """``exact``: always the exact SVD (by default a fixed small rank uses the randomized one, see ``svd``)."""
    t0 = time.monotonic()
    if (rank is None) == (energy is None):
        raise MergeError("give exactly one of --rank N or --energy FRACTION, --rank/--energy")
    if rank is not None:
        check_rank(rank, "--rank")
    if energy is not None:
        check_energy(energy)
    if conv_rank is not None:
        check_rank(conv_rank, "--conv-rank")
    if dtype not in OUT_DTYPES:
        raise MergeError(f"unknown dtype {dtype!r} ({', '.join(OUT_DTYPES)}), --dtype")
    dev = check_device(device)
    out = check_output_path(output, [Path(tuned), Path(base)], overwrite)
    with open_source(tuned) as ts, open_source(base) as bs:
        arch = detect(ts.shapes(), str(ts.path)).arch
        base_arch = detect(bs.shapes(), str(bs.path)).arch
        if base_arch.name != arch.name:
            raise MergeError(f"base is {base_arch.label} but the tuned model is {arch.label}, {bs.path}")
        by_key: dict[str, list] = {}
        for name, target in extract_modules(ts.shapes(), text_encoder):
            by_key.setdefault(target.key, []).append((name, target))
        factors: dict[str, Factors] = {}
        reports, unchanged = [], []
        for key, named in by_key.items():
            shape = ts.infos[key].shape
            binfo = bs.infos.get(key)
            if binfo is None or binfo.shape != shape:
                got = "missing" if binfo is None else f"shape {binfo.shape}, tuned {shape}"
                raise MergeError(f"base model does not match the tuned model ({got}), {bs.path} key {key}")
            full = ts.read(key).to(dev, torch.float32) - bs.read(key).to(dev, torch.float32)
            for name, target in named:
                first, count = target.rows(shape)
                delta = full[first:first + count]
                if not torch.any(delta):
                    unchanged.append(name)
                    continue
                if not bool(torch.isfinite(delta).all()):
                    raise MergeError(f"non-finite values in the difference, key {key}")
                r, e = _rank_rule(shape, rank, energy, conv_rank)
                f = factorize(delta, rank=r, energy=e, exact=exact)
                factors[name] = f
                reports.append(ModuleReport(name, key, tuple(delta.shape), f.rank, f.rel_error, f.method))
        uncovered = uncovered_text_encoder(ts.shapes()) if text_encoder else 0
    st = OUT_DTYPES[dtype]
    entries, tensors = [], {}
    for name, f in factors.items():
        for part, t in ((".lora_up.weight", f.up), (".lora_down.weight", f.down),
                        (".alpha", torch.tensor(float(f.rank)))):
            entries.append(Entry(name + part, st, tuple(t.shape)))
            tensors[name + part] = t
    if not entries:
        raise MergeError(f"the models are identical in every covered module: nothing to extract, {tuned}")
    dim = rank if rank is not None else max(f.rank for f in factors.values())
    recipe = {
        "type": "blockmerge_lora", "lora": "extract", "tuned": file_name(tuned), "base": file_name(base),
        "rank": rank, "energy": energy, "conv_rank": conv_rank, "text_encoder": text_encoder, "dtype": dtype,
        "exact_svd": exact,
        "inputs": [{"role": "tuned", "name": file_name(tuned), "sha256": hashing.sha256_file(tuned)},
                   {"role": "base", "name": file_name(base), "sha256": hashing.sha256_file(base)}],
    }
    meta = lora_metadata(arch.name, dim, float(dim), recipe)
    sha = write_streamed(out, entries, tensors.__getitem__, meta, overwrite)
    return ExtractResult(out, sha, arch.name, reports, unchanged, uncovered, time.monotonic() - t0)
