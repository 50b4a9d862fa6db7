"""safetensors metadata for merged files: the WebUI's ``sd_merge_recipe``/``sd_merge_models`` and our recipe.

Inputs are recorded by file name and sha256 only: a shared model must not reveal the folders of the machine it
was made on, and ``reproduce`` finds inputs by sha256 anyway.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .recipe import Recipe
from .roles import is_model_role, lora_role, role


# The WebUI's own spellings of the modes its built-in merger has (modules/extras.py interp_method).
WEBUI_INTERP = {"weighted_sum": "Weighted sum", "add_difference": "Add difference",
                "no_interpolation": "No interpolation"}


@dataclass(frozen=True)
class InputFile:
    role: str  # "a", "b", "c", … (roles.role) or "vae"
    name: str  # file name with its extension, no folder ("model.safetensors")
    sha256: str
    legacy_hash: str
    metadata: dict[str, str]


def file_name(path) -> str:
    """The bare file name recorded for an input given as a str or Path, relative or absolute."""
    return os.path.basename(os.fspath(path))


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
                   is_inpainting: bool, is_pix2pix: bool, save_as_half: bool,
                   nested_resolved: dict[str, dict] | None = None) -> dict[str, str]:
    """All values are strings (safetensors requires it). Deterministic: no timestamps. ``save_as_half``: every
    written float tensor is fp16 (what the WebUI's flag means, whatever the dtype option said). A chain's nested
    recipes are recorded in place of their model (``{"recipe": {…}}``, with their own ``resolved`` numbers from
    ``nested_resolved``, keyed by role prefix); ``inputs`` holds every file of the tree by role path."""
    by_role = {i.role: i for i in inputs}
    top = [by_role.get(role(i)) for i in range(len(recipe.models))]
    hashes = [m.sha256 if m else None for m in top] + [None] * (3 - len(top))
    vae = by_role.get("vae")
    sd_recipe = {
        "type": "blockmerge",
        "primary_model_hash": hashes[0],
        "secondary_model_hash": hashes[1],
        "tertiary_model_hash": hashes[2],
        "interp_method": WEBUI_INTERP.get(recipe.mode, recipe.mode),
        "multiplier": float(recipe.alpha),
        "save_as_half": bool(save_as_half),
        "custom_name": output_name,
        "config_source": None,
        "bake_in_vae": vae.name if vae else None,
        "discard_weights": "",
        "is_inpainting": is_inpainting,
        "is_instruct_pix2pix": is_pix2pix,
    }
    models = [i for i in inputs if is_model_role(i.role)]  # every model file of the tree: not VAEs, not LoRAs
    lineage: dict = {}
    for m in models:
        parent = _parse(m.metadata.get("sd_merge_models"))
        if isinstance(parent, dict):
            lineage.update(parent)
    for m in models:
        lineage[m.sha256] = {"name": m.name, "legacy_hash": m.legacy_hash,
                             "sd_merge_recipe": _parse(m.metadata.get("sd_merge_recipe"))}
    ours = _recorded(recipe, by_role, "", nested_resolved or {})
    ours["inputs"] = [{"role": i.role, "name": i.name, "sha256": i.sha256} for i in inputs]
    ours["resolved"] = resolved
    return {
        "format": "pt",
        "sd_merge_recipe": _json(sd_recipe),
        "sd_merge_models": _json(lineage),
        "blockmerge_recipe": _json(ours),
    }


def _recorded(recipe: Recipe, by_role: dict[str, InputFile], prefix: str, nested: dict[str, dict]) -> dict:
    """The recipe's JSON form with every file named by its bare name (its sha256 is in ``inputs``)."""
    ours = recipe.to_dict()
    ours["alpha"], ours["beta"] = float(recipe.alpha), float(recipe.beta)  # the API's 1 is the CLI's 1.0
    models = []
    for i, m in enumerate(recipe.models):
        r = prefix + role(i)
        if isinstance(m, Recipe):
            inner = _recorded(m, by_role, r + ".", nested)
            del inner["version"]  # one version, at the top
            inner["resolved"] = nested.get(r + ".", {})
            models.append({"recipe": inner})
        else:
            models.append(by_role[r].name)
    ours["models"] = models
    vae = by_role.get(prefix + "vae")
    ours["bake_vae"] = vae.name if vae else None
    if "lora" in ours:  # each LoRA by file name; its sha256 is in inputs (role lora1, lora2, …)
        ours["lora"] = [{**e, "path": by_role[prefix + lora_role(i)].name} for i, e in enumerate(ours["lora"])]
    return ours


def output_stem(path: str | Path) -> str:
    return Path(path).name.rsplit(".safetensors", 1)[0]
