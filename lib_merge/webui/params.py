"""Merge settings as the tab and the API send them (the CLI's names) -> a validated :class:`Recipe`."""
from __future__ import annotations

import math
from typing import Any, Callable

from ..elemental import subtarget_rule
from ..errors import MergeError
from ..modes import MODES, get_mode
from ..recipe import VAE_CHOICES, Recipe

FIELDS = {"model_a", "model_b", "model_c", "mode", "alpha", "beta", "weights", "weights_beta", "preset",
          "preset_beta", "elemental", "dtype", "vae", "subtargets", "output", "overwrite"}


def _num(params: dict, name: str, default: float) -> float:
    v = params.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise MergeError(f"{name} must be a number, {name}: {v!r}") from None
    if not math.isfinite(v):
        raise MergeError(f"{name} must be a finite number, {name}: {v!r}")
    return float(v)


def _str(params: dict, name: str) -> str | None:
    v = params.get(name)
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if not isinstance(v, str):
        raise MergeError(f"{name} must be a string, {name}: {v!r}")
    return v.strip()


def to_recipe(params: dict[str, Any], resolve_model: Callable[[str, str], str], model_a_path: str | None,
              default_vae: str = "a") -> Recipe:
    """``resolve_model(name, field) -> file path`` (checkpoint names only). ``model_a_path`` is used when
    ``model_a`` is absent (the loaded checkpoint for live merges)."""
    if not isinstance(params, dict):
        raise MergeError("the request body must be a JSON object")
    unknown = sorted(set(params) - FIELDS)
    if unknown:
        raise MergeError(f"unknown field, {unknown[0]}")
    mode_name = _str(params, "mode") or "weighted_sum"
    if mode_name not in MODES:
        raise MergeError(f"unknown mode, mode: {mode_name!r} (one of {', '.join(MODES)})")
    mode = get_mode(mode_name)
    if params.get("weights") and params.get("preset"):
        raise MergeError("give weights or preset, not both, weights/preset")
    if params.get("weights_beta") and params.get("preset_beta"):
        raise MergeError("give weights_beta or preset_beta, not both, weights_beta/preset_beta")
    a_name = _str(params, "model_a")
    a = resolve_model(a_name, "model_a") if a_name else model_a_path
    if not a:
        raise MergeError("model_a is required (no checkpoint is loaded), model_a")
    models = [a]
    for i, field in enumerate(("model_b", "model_c")[: mode.models - 1]):
        name = _str(params, field)
        if not name:
            raise MergeError(f"mode {mode_name} needs {field}, {field}")
        models.append(resolve_model(name, field))
    alpha = _num(params, "alpha", 0.5)
    beta = _num(params, "beta", 0.25)
    elemental = _str(params, "elemental")
    subs = params.get("subtargets") or []
    if isinstance(subs, str):
        subs = [s.strip() for s in subs.replace(",", " ").split() if s.strip()]
    if not isinstance(subs, list) or not all(isinstance(s, str) for s in subs):
        raise MergeError(f"subtargets must be a list of attn1, attn2, ff, all, subtargets: {subs!r}")
    has_vector = bool(params.get("weights") or params.get("preset"))
    rule = subtarget_rule(subs, alpha) if has_vector else None
    if rule:
        elemental = rule + ("\n" + elemental if elemental else "")
    vae = _str(params, "vae") or default_vae
    if vae not in VAE_CHOICES:
        raise MergeError(f"vae must be merge, a or b, vae: {vae!r}")
    dtype = _str(params, "dtype") or "keep"
    recipe = Recipe(models=models, mode=mode_name, alpha=alpha, beta=beta, weights=_str(params, "weights"),
                    weights_beta=_str(params, "weights_beta"), preset=_str(params, "preset"),
                    preset_beta=_str(params, "preset_beta"), elemental=elemental, dtype=dtype, vae=vae)
    recipe.validate()
    return recipe
