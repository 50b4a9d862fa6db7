"""Merge settings as the tab and the API send them (the CLI's names) -> a validated :class:`Recipe`."""
from __future__ import annotations

import math
import re
from typing import Any, Callable

from ..adjust import parse_adjust
from ..elemental import subtarget_rule
from ..errors import MergeError
from ..methods.modes import Mode, get_mode
from ..options import check_subtargets
from ..lora.blocks import parse_blocks
from ..recipe import MAX_CHAIN_DEPTH, READABLE_VERSIONS, LoraEntry, Recipe
from .chain import at_step

FIELDS = {"model_a", "model_b", "model_c", "more_models", "mode", "alpha", "beta", "weights", "weights_beta", "preset",
          "preset_beta", "elemental", "dtype", "vae", "subtargets", "supermerger_time_embed_out11", "seed",
          "method", "params", "adjust", "lora", "output", "overwrite"}
LORA_ITEM_FIELDS = ("name", "strength", "blocks")


def _num(params: dict, name: str, default: float) -> float:
    """A number, typed as the recipe's fields are: ``true`` is not 1.0; a numeric string (a form field) is read."""
    v = params.get(name, default)
    if v is None:
        return default
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise MergeError(f"{name} must be a number, {name}: {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MergeError(f"{name} must be a number, {name}: {v!r}")
    if not math.isfinite(v):
        raise MergeError(f"{name} must be a finite number, {name}: {v!r}")
    return float(v)


def _whole(params: dict, name: str) -> int | None:
    """A whole number or nothing (``true`` is not 1)."""
    v = params.get(name)
    if v is None:
        return None
    if type(v) is not int:
        raise MergeError(f"{name} must be a whole number, {name}: {v!r}")
    return v


def flag(params: dict, name: str, default: bool = False) -> bool:
    """A yes/no field: JSON ``true``/``false`` only (``"no"`` must not mean yes)."""
    v = params.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise MergeError(f"{name} must be true or false, {name}: {v!r}")
    return v


def _str(params: dict, name: str) -> str | None:
    v = params.get(name)
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if not isinstance(v, str):
        raise MergeError(f"{name} must be a string, {name}: {v!r}")
    return v.strip()


_CLI_HINT = re.compile(r", (--method|--seed|-p)( \S+)?$")
_API_FIELD = {"--method": "method", "--seed": "seed", "-p": "params"}


def api_wording(e: MergeError) -> MergeError:
    """The engine's method checks end with the command-line option (``, -p gama``); an API caller gets the
    field it sent (``, params gama``), the message otherwise the engine's own."""
    text = str(e)
    m = _CLI_HINT.search(text)
    if m is None:
        return e
    return MergeError(text[: m.start()] + f", {_API_FIELD[m.group(1)]}{m.group(2) or ''}")


def method_params(params: dict) -> dict[str, Any]:
    """``params``: a JSON object of parameter names and values, shaped as the recipe reads it; which names and
    values the method takes is the method's declaration's check (``Recipe.validate``)."""
    shape = {"version": READABLE_VERSIONS[-1], "params": params.get("params")}  # the field alone, any engine version
    return Recipe.from_dict(shape, "params").params


ResolveModel = Callable[[str, str], str]
Step = Callable[[dict, str], Recipe]  # a nested step's body and its field path -> its recipe


def model_entry(value: Any, field: str, resolve_model: ResolveModel, step: Step) -> str | Recipe | None:
    """One model field: a checkpoint name (-> its file path), ``{"recipe": {…}}`` (a nested step, read by
    ``step``), or nothing (None: an empty name)."""
    if isinstance(value, dict):
        extra = sorted(set(value) - {"recipe"})
        if extra or "recipe" not in value:
            raise MergeError(f"a nested step is {{\"recipe\": {{…}}}} only, {field}.{extra[0] if extra else 'recipe'}")
        if not isinstance(value["recipe"], dict):
            raise MergeError(f"recipe must be a JSON object of merge settings, {field}.recipe")
        return step(value["recipe"], f"{field}.recipe")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise MergeError(f"{field} must be a checkpoint name or {{\"recipe\": {{…}}}}, {field}: {value!r}")
    return resolve_model(value.strip(), field)


def _other_models(params: dict, mode: Mode, resolve_model: ResolveModel, step: Step) -> list[str | Recipe]:
    """B, C, … as file paths (or nested recipes): ``model_b`` and ``model_c`` where the mode takes them; a variadic
    mode (A the base, then any number) reads ``model_b``, an optional ``model_c`` and the list ``more_models``."""
    out: list[str | Recipe] = []
    for i, field in enumerate(("model_b", "model_c")):
        given = params.get(field)
        if i + 1 < mode.models and (given is None or (isinstance(given, str) and not given.strip())):
            raise MergeError(f"mode {mode.name} needs {field}, {field}")
        if mode.variadic or i + 1 < mode.models:
            m = model_entry(given, field, resolve_model, step)
            if m is not None:
                out.append(m)
    more = params.get("more_models") or []
    if isinstance(more, str):
        more = [m.strip() for m in more.split(",") if m.strip()]
    if not isinstance(more, list) or not all(isinstance(m, (str, dict)) for m in more):
        raise MergeError(f"more_models must be a list of checkpoint names, more_models: {more!r}")
    if more and not mode.variadic:
        raise MergeError(f"mode {mode.name} takes {mode.models_text()} only, more_models")
    for i, m in enumerate(more):
        entry = model_entry(m, f"more_models[{i}]", resolve_model, step)
        if entry is not None:
            out.append(entry)
    return out


def _lora_strength(item: dict, where: str) -> float:
    """A JSON number (default 1): ``"0.5"`` is refused, as ``lora/merge`` refuses a text ratio."""
    v = item.get("strength")
    if v is None:
        return 1.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MergeError(f"{where}.strength must be a finite number, {where}.strength: {v!r}")
    return float(v)


def _lora_blocks(item: dict, where: str) -> str | list[float] | None:
    """null, a LoRA block-weight preset name, a text of 12/17/20/26 numbers, or a list of them; checked by the
    engine's reader (``lora.blocks.parse_blocks``), the message naming ``lora[i].blocks``."""
    v = item.get("blocks")
    key = f"{where}.blocks"
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, str):
        parse_blocks(v, key)
        return v.strip()
    if not isinstance(v, list) or not all(not isinstance(x, bool) and isinstance(x, (int, float)) for x in v):
        raise MergeError(f"{key} must be null, a preset name or a list of numbers, {key}: {v!r}")
    values = [float(x) for x in v]
    if not all(math.isfinite(x) for x in values):
        raise MergeError(f"{key} must be finite numbers, {key}: {v!r}")
    parse_blocks(",".join(repr(x) for x in values), key)
    return values


def lora_entries(value: Any, resolve_lora: Callable[[Any, str], str] | None) -> list[LoraEntry]:
    """``lora``: a list of ``{name, strength, blocks}`` (strength defaults to 1, blocks to null) -> the recipe's
    entries. ``resolve_lora(name, field) -> file path`` looks a name up in the WebUI's LoRA list (never joins it
    onto a folder); without one (no LoRA folder), any LoRA is an error."""
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise MergeError(f"lora must be a list of {{name, strength, blocks}}, lora: {value!r}")
    out = []
    for i, item in enumerate(value):
        where = f"lora[{i}]"
        if not isinstance(item, dict):
            raise MergeError(f"{where} must be a JSON object with name, strength and blocks, {where}")
        unknown = sorted(set(item) - set(LORA_ITEM_FIELDS))
        if unknown:
            raise MergeError(f"unknown field, {where}.{unknown[0]}")
        if resolve_lora is None:
            raise MergeError(f"LoRAs cannot be baked here (no LoRA folder), {where}.name")
        path = resolve_lora(item.get("name"), f"{where}.name")
        out.append(LoraEntry(str(path), _lora_strength(item, where), _lora_blocks(item, where)))
    return out


def to_recipe(params: dict[str, Any], resolve_model: ResolveModel, model_a_path: str | None,
              default_vae: str = "a", resolve_lora: Callable[[Any, str], str] | None = None,
              depth: int = 0) -> Recipe:
    """``resolve_model(name, field) -> file path`` (checkpoint names only). ``model_a_path`` is used when
    ``model_a`` is absent (the loaded checkpoint for live merges; in nested steps too). ``resolve_lora``: see
    :func:`lora_entries`. A model field may be ``{"recipe": {…}}``: a nested step (a merge chain), read by this
    function with the same defaults, its errors naming the field path (``model_a.recipe.model_b``)."""
    if not isinstance(params, dict):
        raise MergeError("the request body must be a JSON object")
    unknown = sorted(set(params) - (FIELDS if depth == 0 else FIELDS - {"output", "overwrite"}))
    if unknown:
        raise MergeError(f"unknown field, {unknown[0]}")

    def step(body: dict, path: str) -> Recipe:
        if depth + 1 > MAX_CHAIN_DEPTH:
            raise MergeError(f"recipes are nested more than {MAX_CHAIN_DEPTH} deep, {path}")
        try:
            return to_recipe(body, resolve_model, model_a_path, default_vae, resolve_lora, depth + 1)
        except MergeError as e:
            raise at_step(e, path) from None

    mode_name = _str(params, "mode") or "weighted_sum"
    mode = get_mode(mode_name)  # the engine's check: an unknown name lists the modes
    a = model_entry(params.get("model_a"), "model_a", resolve_model, step) or model_a_path
    if not a:
        raise MergeError("model_a is required (no checkpoint is loaded), model_a")
    models = [a] + _other_models(params, mode, resolve_model, step)
    alpha = _num(params, "alpha", 0.5)
    beta = _num(params, "beta", 0.25)
    elemental = _str(params, "elemental")
    subs = params.get("subtargets") or []
    if isinstance(subs, str):
        subs = [s.strip() for s in subs.replace(",", " ").split() if s.strip()]
    if not isinstance(subs, list) or not all(isinstance(s, str) for s in subs):
        raise MergeError(f"subtargets must be a list of sub-target names, subtargets: {subs!r}")
    check_subtargets(subs)
    has_vector = bool(params.get("weights") or params.get("preset"))
    rule = subtarget_rule(subs, alpha) if has_vector else None
    if rule:
        elemental = rule + ("\n" + elemental if elemental else "")
    vae = _str(params, "vae") or default_vae
    dtype = _str(params, "dtype") or "keep"
    recipe = Recipe(models=models, mode=mode_name, alpha=alpha, beta=beta, weights=_str(params, "weights"),
                    weights_beta=_str(params, "weights_beta"), preset=_str(params, "preset"),
                    preset_beta=_str(params, "preset_beta"), elemental=elemental, dtype=dtype, vae=vae,
                    supermerger_time_embed_out11=flag(params, "supermerger_time_embed_out11"),
                    seed=_whole(params, "seed"), method=_str(params, "method") or "linear",
                    params=method_params(params), adjust=parse_adjust(params.get("adjust"), "adjust"),
                    lora=lora_entries(params.get("lora"), resolve_lora))
    try:
        recipe.validate()  # choices, the rules across fields, the method with the mode and its declared params
    except MergeError as e:
        raise api_wording(e) from None
    return recipe
