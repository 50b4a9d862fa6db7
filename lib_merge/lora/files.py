"""LoRA files: reading kohya / A1111 / LyCORIS safetensors (never a pickle) and the metadata of the files we write.

A module is the part of a key before the first ``.``; what follows names its tensor. The kinds applied are the
ones the WebUI's built-in Lora extension computes the same way (``kinds``): plain LoRA (``lora_up`` /
``lora_down`` / ``alpha``, with LoCon's optional ``lora_mid``), LyCORIS LoHa (``hada_*``) and LoKr (``lokr_*``).
Any other kind (DoRA, GLoRA, IA3, OFT, full/diff, norm, …) is an error naming the file, module and kind, never
a silent skip.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import MergeError
from ..io.sources import SafetensorsSource
from .kinds import KINDS, LoraModule, Module, build_module
from .names import LORA_PREFIXES

BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
# tensor name -> the kind it belongs to, for the kinds that are not applied (named in the error)
UNSUPPORTED_PARTS = {
    "dora_scale": "DoRA", "oft_blocks": "OFT", "oft_diag": "OFT", "a1.weight": "GLoRA", "a2.weight": "GLoRA",
    "b1.weight": "GLoRA", "b2.weight": "GLoRA", "weight": "IA3", "on_input": "IA3", "diff": "full (diff)",
    "diff_b": "full (diff)", "w_norm": "norm", "b_norm": "norm", "bias_indices": "LyCORIS bias",
    "bias_values": "LyCORIS bias", "bias_size": "LyCORIS bias", "scale": "LyCORIS scale",
}

__all__ = ["LoraModule", "Module", "read_lora", "lora_metadata", "module_kind"]


def module_kind(path: Path, module: str, parts: set[str]) -> str:
    """The kind (``lora``/``loha``/``lokr``) whose tensor names cover ``parts``; an error naming the kind if none."""
    for kind, names in KINDS.items():
        if parts <= names:
            return kind
    alien = sorted(p for p in parts if not any(p in names for names in KINDS.values()))
    if alien:
        kind = UNSUPPORTED_PARTS.get(alien[0], "unknown")
        raise MergeError(f"unsupported LoRA module kind {kind} ({alien[0]}; only LoRA, LoHa and LoKr are applied), "
                         f"{path} module {module}")
    raise MergeError(f"LoRA module mixes tensors of different kinds ({', '.join(sorted(parts))}), "
                     f"{path} module {module}")


def read_lora(path: str | os.PathLike) -> dict[str, Module]:
    """Every module of a LoRA safetensors file; unknown module kinds and broken modules are errors."""
    p = Path(path)
    if not p.exists():
        raise MergeError(f"LoRA file not found, {p}")
    if p.suffix.lower() != ".safetensors":
        raise MergeError(f"LoRA files are read as .safetensors only (pickles are not loaded), {p}")
    with SafetensorsSource(p) as src:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key in src.infos:
            module, _, part = key.partition(".")
            if not module.startswith(LORA_PREFIXES):
                raise MergeError(f"unknown LoRA module name (expected lora_unet_/lora_te_/lora_te1_/lora_te2_), "
                                 f"{p} module {module}")
            parts.setdefault(module, {})[part] = src.read(key)
    out = {}
    for name, got in sorted(parts.items()):
        kind = module_kind(p, name, set(got))
        out[name] = build_module(kind, name, got, p)
    return out


def lora_metadata(arch: str, dim: int, alpha: float, recipe: dict) -> dict[str, str]:
    """The ``ss_*`` fields the WebUI and kohya tools read, plus our recipe (inputs by file name and sha256)."""
    meta = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": BASE_VERSION[arch],
        "blockmerge_recipe": json.dumps(recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
    }
    if arch == "sd2":
        meta["ss_v2"] = "True"  # the WebUI's SD-version filter reads this, not ss_base_model_version
    return meta
