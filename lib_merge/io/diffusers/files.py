"""Which files of a diffusers folder hold a component's weights, and what counts as a diffusers folder."""
from __future__ import annotations

import json
from pathlib import Path

from ...errors import MergeError

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_STEMS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
          "text_encoder": ("model", "pytorch_model"), "text_encoder_2": ("model", "pytorch_model")}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file())


def _candidates(component: str) -> list[str]:
    """File names in order of preference: full precision before the fp16 variant, safetensors before pickles,
    a single file before a sharded index."""
    names = []
    for variant in ("", ".fp16"):
        for suffix in (".safetensors", ".bin"):
            for stem in _STEMS[component]:
                if suffix == ".safetensors" and stem == "pytorch_model":
                    continue
                if suffix == ".bin" and component.startswith("text_encoder") and stem == "model":
                    continue
                names += [f"{stem}{variant}{suffix}", f"{stem}{variant}{suffix}.index.json"]
    return names


def weight_files(folder: Path, component: str) -> list[Path]:
    """The weight files of ``folder/component`` (several for a sharded checkpoint), [] when it has none."""
    sub = folder / component
    if not sub.is_dir():
        return []
    for name in _candidates(component):
        p = sub / name
        if not p.is_file():
            continue
        if not name.endswith(".index.json"):
            return [p]
        try:
            index = json.loads(p.read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise MergeError(f"malformed shard index, {p}") from None
        for s in shards:
            if not isinstance(s, str) or "/" in s or "\\" in s or s.startswith(".."):
                raise MergeError(f"malformed shard index (file name {s!r}), {p}")
        return [sub / s for s in shards]
    return []


def used_weight_files(folder: Path, components: tuple[str, ...] = ("unet", "vae", "text_encoder", "text_encoder_2")
                      ) -> list[Path]:
    return [p for c in components for p in weight_files(folder, c)]


def folder_bytes(folder: Path) -> int:
    """Bytes of the weight files a merge reads from ``folder``."""
    return sum(p.stat().st_size for p in used_weight_files(folder))
