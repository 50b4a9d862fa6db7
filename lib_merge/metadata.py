"""safetensors metadata for merged files: the WebUI's ``sd_merge_recipe``/``sd_merge_models`` and our recipe."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .recipe import Recipe


@dataclass(frozen=True)
class InputFile:
    role: str  # "a" | "b" | "c" | "vae"
    path: str  # as recorded in the recipe
    name: str  # file stem
    sha256: str
    legacy_hash: str
    metadata: dict[str, str]


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _parse(text: str | None):
    if not text:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def build_metadata(recipe: Recipe, inputs: list[InputFile], output_name: str, resolved: dict,
                   is_inpainting: bool, is_pix2pix: bool) -> dict[str, str]:
    """All values are strings (safetensors requires it). Deterministic: no timestamps."""
    models = [i for i in inputs if i.role in ("a", "b", "c")]
    hashes = [m.sha256 for m in models] + [None] * (3 - len(models))
    vae = next((i for i in inputs if i.role == "vae"), None)
    sd_recipe = {
        "type": "blockmerge",
        "primary_model_hash": hashes[0],
        "secondary_model_hash": hashes[1],
        "tertiary_model_hash": hashes[2],
        "interp_method": recipe.mode,
        "multiplier": recipe.alpha,
        "save_as_half": recipe.dtype == "fp16",
        "custom_name": output_name,
        "config_source": None,
        "bake_in_vae": vae.name if vae else None,
        "discard_weights": "",
        "is_inpainting": is_inpainting,
        "is_instruct_pix2pix": is_pix2pix,
    }
    lineage: dict = {}
    for m in models:
        parent = _parse(m.metadata.get("sd_merge_models"))
        if isinstance(parent, dict):
            lineage.update(parent)
    for m in models:
        lineage[m.sha256] = {"name": m.name, "legacy_hash": m.legacy_hash,
                             "sd_merge_recipe": _parse(m.metadata.get("sd_merge_recipe"))}
    ours = recipe.to_dict()
    ours["inputs"] = [{"role": i.role, "name": i.name, "sha256": i.sha256} for i in inputs]
    ours["resolved"] = resolved
    return {
        "format": "pt",
        "sd_merge_recipe": _json(sd_recipe),
        "sd_merge_models": _json(lineage),
        "blockmerge_recipe": _json(ours),
    }


def output_stem(path: str | Path) -> str:
    return Path(path).name.rsplit(".safetensors", 1)[0]
