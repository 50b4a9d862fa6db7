"""LoRA files: reading kohya / A1111 LoRA safetensors (never a pickle) and the metadata of the files we write.

A module is the part of a key before ``.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``. Anything else a
LoRA file may hold (LyCORIS ``hada_*`` / ``lokr_*``, ``lora_mid``, ``dora_scale``, ``.diff`` …) is not applied in
this slice, and is an error naming the module rather than a silent skip.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergeError
from ..io.sources import SafetensorsSource
from .names import LORA_PREFIXES

PARTS = {"lora_up.weight": "up", "lora_down.weight": "down", "alpha": "alpha"}
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass(frozen=True)
class LoraModule:
    name: str
    up: torch.Tensor
    down: torch.Tensor
    alpha: float  # alpha missing in the file: the rank

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """up (out, r) and down (r, in·k·k) in fp32: conv factors reshaped to the matrices they multiply as."""
        return (self.up.to(torch.float32).reshape(self.up.shape[0], -1),
                self.down.to(torch.float32).reshape(self.down.shape[0], -1))


def _split(key: str) -> tuple[str, str]:
    for suffix in PARTS:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], PARTS[suffix]
    module, _, rest = key.partition(".")
    return module, rest


def read_lora(path: str | os.PathLike) -> dict[str, LoraModule]:
    """Every module of a LoRA safetensors file; unknown module kinds and broken modules are errors."""
    p = Path(path)
    if not p.exists():
        raise MergeError(f"LoRA file not found, {p}")
    if p.suffix.lower() != ".safetensors":
        raise MergeError(f"LoRA files are read as .safetensors only (pickles are not loaded), {p}")
    with SafetensorsSource(p) as src:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key in src.infos:
            module, part = _split(key)
            if part not in PARTS.values():
                raise MergeError(f"unsupported LoRA module kind ({part}; only plain LoRA lora_up/lora_down/alpha "
                                 f"is applied), {p} module {module}")
            if not module.startswith(LORA_PREFIXES):
                raise MergeError(f"unknown LoRA module name (expected lora_unet_/lora_te_/lora_te1_/lora_te2_), "
                                 f"{p} module {module}")
            parts.setdefault(module, {})[part] = src.read(key)
    out = {}
    for name, got in sorted(parts.items()):
        if "up" not in got or "down" not in got:
            missing = "lora_up" if "up" not in got else "lora_down"
            raise MergeError(f"LoRA module has no {missing}.weight, {p} module {name}")
        up, down = got["up"], got["down"]
        if up.dim() not in (2, 4) or down.dim() != up.dim() or up.shape[1] != down.shape[0]:
            raise MergeError(f"LoRA module factors do not fit (up {tuple(up.shape)}, down {tuple(down.shape)}), "
                             f"{p} module {name}")
        alpha = float(got["alpha"].reshape(-1)[0]) if "alpha" in got else float(down.shape[0])
        out[name] = LoraModule(name, up, down, alpha)
    return out


def lora_metadata(arch: str, dim: int, alpha: float, recipe: dict) -> dict[str, str]:
    """The ``ss_*`` fields the WebUI and kohya tools read, plus our recipe (inputs by file name and sha256)."""
    return {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": BASE_VERSION[arch],
        "blockmerge_recipe": json.dumps(recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
    }
