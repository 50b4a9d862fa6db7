"""A diffusers folder read as a single-file (LDM) checkpoint: the merge sees LDM keys, read lazily from the
component files (safetensors by ``pread``, ``.bin`` through the safe pickle loader)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...dtypes import ITEMSIZE, ST_TO_TORCH
from ...errors import MergeError
from ..sources import Source, TensorInfo
from .files import is_diffusers_folder, weight_files
from .keymap import COMPONENTS, Row, component_map, ldm_shape, modern_vae_name

ARCH_BY_CONTEXT = {768: "sd1", 1024: "sd2"}


def _open_file(p: Path) -> Source:
    from ..sources import SafetensorsSource, TensorDictSource
    if p.suffix == ".safetensors":
        return SafetensorsSource(p)
    from ..ckpt_reader import load_checkpoint
    return TensorDictSource(p, load_checkpoint(p))


@dataclass(frozen=True)
class Piece:
    """One diffusers tensor that an LDM tensor is made of (one, or three for a joined q/k/v)."""

    source: Source
    key: str
    numel: int


def detect_folder_arch(unet: dict[str, tuple[Source, str]], folder: Path) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` from the UNet's cross-attention width (and SDXL's ``add_embedding``)."""
    ctx = next((src.infos[key].shape for name, (src, key) in sorted(unet.items(), key=lambda kv: kv[0])
                if name.endswith("attn2.to_k.weight")), None)
    if ctx is None or len(ctx) != 2:
        raise MergeError(f"not a Stable Diffusion UNet (no attn2.to_k weight), {folder / 'unet'}")
    if "add_embedding.linear_1.weight" in unet:
        if ctx[1] == 2048:
            return "sdxl"
    elif ctx[1] in ARCH_BY_CONTEXT:
        return ARCH_BY_CONTEXT[ctx[1]]
    raise MergeError(f"unsupported diffusers UNet: cross-attention width {ctx[1]}, {folder / 'unet'}")


class DiffusersSource(Source):
    """``infos`` are keyed by LDM names; ``notes`` say which diffusers tensors have no single-file name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not is_diffusers_folder(self.path):
            raise MergeError(f"model path is a folder but not a diffusers model (no model_index.json "
                             f"or unet/config.json), {self.path}")
        self.files: list[Source] = []
        self.notes: list[str] = []
        self._transpose: set[str] = set()  # LDM keys stored transposed (read whole: the small text projection)
        try:
            comps = {c: self._open_component(c) for c in COMPONENTS["sdxl"]}
            if not comps["unet"]:
                raise MergeError(f"diffusers folder without UNet weights, {self.path / 'unet'}")
            self.arch = detect_folder_arch(comps["unet"], self.path)
            self.pieces: dict[str, tuple[Piece, ...]] = {}
            self.infos: dict[str, TensorInfo] = {}
            for comp in COMPONENTS[self.arch]:
                self._map_component(comp, comps[comp])
            if self.arch != "sdxl" and comps["text_encoder_2"]:
                self.notes.append(f"{self.path.name}: text_encoder_2 ignored ({self.arch} has one text encoder)")
        except BaseException:
            self.close()
            raise
        unet = weight_files(self.path, "unet")
        self.metadata = dict(self.files[0].metadata) if unet and unet[0].suffix == ".safetensors" else {}
        st = os.stat(self.path)
        self.size, self.mtime_ns = 0, st.st_mtime_ns

    def _open_component(self, comp: str) -> dict[str, tuple[Source, str]]:
        keys: dict[str, tuple[Source, str]] = {}
        for p in weight_files(self.path, comp):
            src = _open_file(p)
            self.files.append(src)
            for k in src.infos:
                keys[modern_vae_name(k) if comp == "vae" else k] = (src, k)
        return keys

    def _map_component(self, comp: str, keys: dict[str, tuple[Source, str]]) -> None:
        if not keys:
            return
        cmap = component_map(self.arch, comp)
        unknown = sorted(k for k in keys if k not in cmap.by_diffusers)
        if unknown:
            self.notes.append(f"{self.path.name}: {len(unknown)} {comp} tensor(s) with no single-file name "
                              f"left out (first: {', '.join(unknown[:3])})")
        missing = []
        for ldm, rows in cmap.by_ldm.items():
            have = [keys.get(r.diffusers) for r in rows]
            if not any(have):
                continue
            if not all(have):
                missing.append(next(r.diffusers for r, h in zip(rows, have) if h is None))
                continue
            self._add(ldm, rows, have)
        if missing:
            raise MergeError(f"incomplete q/k/v split: {missing[0]} is missing, {self.path / comp}")

    def _add(self, ldm: str, rows: tuple[Row, ...], have: list[tuple[Source, str]]) -> None:
        infos = [src.infos[k] for src, k in have]
        dtypes = {i.dtype for i in infos}
        if len(dtypes) != 1:
            raise MergeError(f"q/k/v parts differ in dtype ({', '.join(sorted(dtypes))}), "
                             f"{have[0][0].path} key {rows[0].diffusers}")
        shape = ldm_shape(rows, [i.shape for i in infos], str(have[0][0].path))
        self.infos[ldm] = TensorInfo(infos[0].dtype, shape)
        self.pieces[ldm] = tuple(Piece(src, k, i.numel) for (src, k), i in zip(have, infos))
        if rows[0].transform == "T":
            self._transpose.add(ldm)

    @property
    def bytes_read(self) -> int:
        return sum(getattr(f, "bytes_read", 0) for f in self.files)

    def _lookup(self, key: str) -> TensorInfo:
        info = self.infos.get(key)
        if info is None:
            raise MergeError(f"key not found, {self.path} key {key}")
        return info

    def read(self, key: str) -> torch.Tensor:
        info = self._lookup(key)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        return self.read_bytes_into(key, buf).reshape(info.shape)

    def read_bytes_into(self, key: str, buf: torch.Tensor, elem_start: int = 0, elem_count: int | None = None) -> torch.Tensor:
        """Elements [elem_start, elem_start+elem_count) of LDM tensor ``key`` into uint8 ``buf``; a typed view."""
        info = self._lookup(key)
        item = ITEMSIZE[info.dtype]
        count = info.numel - elem_start if elem_count is None else elem_count
        out = buf[:count * item].view(ST_TO_TORCH[info.dtype])
        if key in self._transpose:
            piece = self.pieces[key][0]
            whole = piece.source.read(piece.key).t().contiguous().reshape(-1)
            out.copy_(whole[elem_start:elem_start + count])
            return out
        pos, base = 0, 0
        for piece in self.pieces[key]:
            lo, hi = max(elem_start, base), min(elem_start + count, base + piece.numel)
            if lo < hi:
                dst = buf[pos * item:(pos + hi - lo) * item]
                got = piece.source.read_bytes_into(piece.key, dst, lo - base, hi - lo)
                if got.data_ptr() != dst.data_ptr():
                    out[pos:pos + hi - lo].copy_(got.reshape(-1))
                pos += hi - lo
            base += piece.numel
        return out

    def close(self) -> None:
        for f in self.files:
            f.close()
