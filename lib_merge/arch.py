"""Architectures as data: detection from a header, key -> block, key -> part, elements.

Block mapping follows supermerger: SD1/SD2 ``time_embed`` -> IN00, ``model.diffusion_model.out.`` -> OUT11;
SDXL ``time_embed``/``label_emb`` -> IN00, ``out.`` -> OUT08; text encoder, VAE and anything outside the
UNet -> BASE.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import MergeError

UNET = "model.diffusion_model."


def _block_names(n_in: int, n_out: int) -> tuple[str, ...]:
    return ("BASE", *(f"IN{i:02d}" for i in range(n_in)), "M00", *(f"OUT{i:02d}" for i in range(n_out)))


@dataclass(frozen=True)
class ArchSpec:
    """Everything that differs between architectures, as plain data."""

    name: str  # "sd1" | "sd2" | "sdxl"
    label: str
    blocks: tuple[str, ...]  # BASE first
    context_dim: int  # in-features of attn2.to_k
    te_prefixes: tuple[str, ...]
    embed_keys: tuple[str, ...]  # UNet keys (substrings) that belong to IN00
    preset_family: str  # which shipped preset file: "sd1" | "sdxl"

    @property
    def last_out(self) -> str:
        return self.blocks[-1]


ARCHS: dict[str, ArchSpec] = {
    "sd1": ArchSpec("sd1", "SD1.x", _block_names(12, 12), 768,
                    ("cond_stage_model.",), ("time_embed",), "sd1"),
    "sd2": ArchSpec("sd2", "SD2.x", _block_names(12, 12), 1024,
                    ("cond_stage_model.",), ("time_embed",), "sd1"),
    "sdxl": ArchSpec("sdxl", "SDXL", _block_names(9, 9), 2048,
                     ("conditioner.", "cond_stage_model."), ("time_embed", "label_emb"), "sdxl"),
}

SD1_BLOCKS = ARCHS["sd1"].blocks
SDXL_BLOCKS = ARCHS["sdxl"].blocks

VARIANTS = {4: "normal", 9: "inpainting", 8: "pix2pix"}
FIRST_CONV = UNET + "input_blocks.0.0.weight"

# Element selectors: name -> substrings of a key (any matches).
ELEMENTS: dict[str, tuple[str, ...]] = {
    "attn1": ("attn1",),
    "attn2": ("attn2",),
    "ff": ("ff.net",),
    "norm": ("norm",),
    "proj": ("proj_in", "proj_out"),
    "resnet": ("in_layers", "out_layers", "emb_layers", "skip_connection"),
}

_IN = re.compile(r"\.input_blocks\.(\d+)\.")
_OUT = re.compile(r"\.output_blocks\.(\d+)\.")


def block_of(key: str, arch: ArchSpec, legacy_time_embed: bool = False) -> str:
    """The block ID (``BASE``, ``IN00`` …) a state-dict key belongs to.

    ``legacy_time_embed``: as supermerger from 2023-07 (0182d3b) to 2025-11 (before 2cbd062) did on SD1/SD2,
    ``time_embed`` takes the last OUT block's ratio (its ``weight_index = -2`` wrapped to OUT11), so recipes
    from those versions reproduce exactly. On SDXL those versions never merged the embedding keys: see
    :func:`legacy_keeps_a`.
    """
    if not key.startswith(UNET):
        return "BASE"
    if legacy_time_embed and arch.name != "sdxl" and "time_embed" in key:
        return arch.last_out
    if any(s in key for s in arch.embed_keys):
        return "IN00"
    if key.startswith(UNET + "out."):
        return arch.last_out
    m = _IN.search(key)
    if m:
        return f"IN{int(m.group(1)):02d}"
    if ".middle_block." in key:
        return "M00"
    m = _OUT.search(key)
    if m:
        return f"OUT{int(m.group(1)):02d}"
    return "BASE"


def legacy_keeps_a(key: str, arch: ArchSpec) -> bool:
    """SDXL keys that supermerger 2023-07..2025-11 left unmerged (A's values): ``time_embed`` and ``label_emb``
    (its SDXL block function answered "Not Merge" for them)."""
    return arch.name == "sdxl" and key.startswith(UNET) and any(s in key for s in arch.embed_keys)


def part_of(key: str, arch: ArchSpec | None = None) -> str:
    """``unet``, ``te`` (text encoder), ``vae``, or ``other``."""
    if key.startswith(UNET):
        return "unet"
    if key.startswith(("cond_stage_model.", "conditioner.")):
        return "te"
    if key.startswith("first_stage_model."):
        return "vae"
    return "other"


def elements_of(key: str) -> list[str]:
    """Names from :data:`ELEMENTS` that a key belongs to."""
    return [name for name, subs in ELEMENTS.items() if any(s in key for s in subs)]


@dataclass(frozen=True)
class Detected:
    arch: ArchSpec
    variant: str  # normal | inpainting | pix2pix
    in_channels: int
    evidence: str


def detect(shapes: Mapping[str, Sequence[int]], source: str = "checkpoint") -> Detected:
    """Detect the architecture from key names and shapes (no tensor data needed)."""
    unet_keys = [k for k in shapes if k.startswith(UNET)]
    if not unet_keys:
        raise MergeError(f"not a Stable Diffusion checkpoint (no {UNET}* keys), {source}")
    ctx = None
    ctx_key = None
    for k in unet_keys:
        if k.endswith("attn2.to_k.weight"):
            shape = shapes[k]
            if len(shape) == 2:
                ctx, ctx_key = int(shape[1]), k
                break
    has_label = any(k.startswith(UNET + "label_emb.") for k in unet_keys)
    if ctx is None:
        raise MergeError(f"unknown architecture: no cross-attention (attn2.to_k) key found, {source}")
    if ctx == 2048 and has_label:
        arch = ARCHS["sdxl"]
    elif ctx == 768 and not has_label:
        arch = ARCHS["sd1"]
    elif ctx == 1024 and not has_label:
        arch = ARCHS["sd2"]
    else:
        raise MergeError(
            f"unsupported architecture: cross-attention width {ctx} at {ctx_key}"
            f"{' with label_emb (SDXL refiner?)' if has_label else ''}, {source}")
    conv = shapes.get(FIRST_CONV)
    if conv is None or len(conv) != 4:
        raise MergeError(f"unknown architecture: missing or malformed {FIRST_CONV}, {source}")
    ch = int(conv[1])
    if ch not in VARIANTS:
        raise MergeError(f"unsupported first conv with {ch} input channels at {FIRST_CONV}, {source}")
    evidence = f"{ctx_key} in-features {ctx}; {FIRST_CONV} has {ch} input channels"
    return Detected(arch, VARIANTS[ch], ch, evidence)
