"""Write a single-file (LDM) checkpoint as a diffusers folder, one tensor at a time.

Each component's weights go to ``<component>/<diffusion_pytorch_model|model>.safetensors`` under their diffusers
names (header first, then each tensor's bytes in header order, hashed as they are written), with its
``config.json``. LDM tensors without a diffusers home (EMA copies, schedule buffers, OpenCLIP's ``logit_scale``,
SD2's unused last text block and projection) are not written and are reported in the notes.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from ...arch import detect
from ...dtypes import ITEMSIZE
from ...errors import MergeError, MergeInterrupted
from ..sources import Source
from .configs import component_config, copy_support_files
from .keymap import COMPONENTS, PARTS, Row, component_map, diffusers_shape, to_diffusers

FILE_NAMES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
              "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Entry:
    """One diffusers tensor to write: its name, the table row it comes from, dtype and shape."""

    name: str
    row: Row
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class FolderPlan:
    arch: str
    components: dict[str, list[Entry]]
    dropped: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for es in self.components.values() for e in es)


def plan_folder(src: Source, arch: str | None = None) -> FolderPlan:
    """Which diffusers tensors the LDM keys of ``src`` become, per component (sorted by name)."""
    arch = arch or detect(src.shapes(), str(src.path)).arch.name
    comps: dict[str, list[Entry]] = {}
    placed: set[str] = set()
    for comp in COMPONENTS[arch]:
        cmap = component_map(arch, comp)
        entries = []
        for ldm, rows in cmap.by_ldm.items():
            info = src.infos.get(ldm)
            if info is None:
                continue
            placed.add(ldm)
            for r in rows:
                entries.append(Entry(r.diffusers, r, info.dtype, diffusers_shape(r, info.shape, str(src.path))))
        if entries:
            comps[comp] = sorted(entries, key=lambda e: e.name)
    if "unet" not in comps:
        raise MergeError(f"no UNet tensors to write, {src.path}")
    return FolderPlan(arch, comps, sorted(k for k in src.infos if k not in placed))


def _header(entries: list[Entry], metadata: Mapping[str, str]) -> bytes:
    head: dict = {"__metadata__": dict(metadata)}
    pos = 0
    for e in entries:
        head[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _tensor(src: Source, e: Entry) -> torch.Tensor:
    """The diffusers tensor of ``e``: a q/k/v part reads only its third of the joined LDM tensor."""
    if e.row.transform in PARTS:
        info = src.infos[e.row.ldm]
        part = info.numel // 3
        buf = torch.empty(part * ITEMSIZE[info.dtype], dtype=torch.uint8)
        return src.read_bytes_into(e.row.ldm, buf, PARTS.index(e.row.transform) * part, part)
    return to_diffusers(e.row, src.read(e.row.ldm))


def write_safetensors(path: Path, src: Source, entries: list[Entry], metadata: Mapping[str, str],
                      progress: Progress | None = None, done: int = 0, total: int = 0,
                      cancel: Callable[[], bool] | None = None) -> str:
    """Stream ``entries`` from ``src`` into a new safetensors file; returns its sha256."""
    h = hashlib.sha256()
    raw = _header(entries, metadata)
    with open(path, "xb") as f:
        for chunk in (len(raw).to_bytes(8, "little"), raw):
            f.write(chunk)
            h.update(chunk)
        for e in entries:
            if cancel is not None and cancel():
                raise MergeInterrupted("conversion interrupted, nothing written")
            data = _tensor(src, e).contiguous().reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != e.nbytes:
                raise MergeError(f"tensor size differs from its header entry, {src.path} key {e.row.ldm}")
            f.write(data)
            h.update(data)
            done += e.nbytes
            if progress:
                progress(done, total)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def write_folder(src: Source, folder: Path, *, template: Path | None = None,
                 overrides: Mapping[str, Mapping] | None = None, metadata: Mapping[str, str] | None = None,
                 progress: Progress | None = None, cancel: Callable[[], bool] | None = None
                 ) -> tuple[dict[str, str], list[str]]:
    """Write ``src`` as a diffusers folder into the empty folder ``folder``. ``template``: a diffusers input whose
    configs, tokenizers and scheduler are copied; ``overrides``: component -> config fields set last;
    ``metadata`` goes into the UNet file's header. Returns (relative path -> sha256 of each weight file, notes)."""
    plan = plan_folder(src)
    notes = []
    if plan.dropped:
        notes.append(f"diffusers folder: {len(plan.dropped)} tensor(s) with no diffusers name not written "
                     f"(first: {', '.join(plan.dropped[:3])})")
    hashes: dict[str, str] = {}
    done, total = 0, plan.total_bytes
    for comp, entries in plan.components.items():
        (folder / comp).mkdir()
        shapes = {e.name: e.shape for e in entries}
        cfg = component_config(plan.arch, comp, shapes, template, (overrides or {}).get(comp))
        (folder / comp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        meta = {"format": "pt", **(metadata or {})} if comp == "unet" else {"format": "pt"}
        rel = f"{comp}/{FILE_NAMES[comp]}"
        hashes[rel] = write_safetensors(folder / rel, src, entries, meta, progress, done, total, cancel)
        done += sum(e.nbytes for e in entries)
    notes += copy_support_files(plan.arch, folder, tuple(plan.components), template)
    return hashes, notes


def folder_digest(hashes: Mapping[str, str]) -> str:
    """The folder's content hash from its weight files' hashes (as :func:`lib_merge.hashing.sha256_folder`)."""
    return hashlib.sha256("".join(sorted(f"{rel}\t{h}\n" for rel, h in hashes.items())).encode()).hexdigest()
