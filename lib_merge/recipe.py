"""A merge as a value: the recipe that can be printed, stored in metadata, compared and re-run.

Recipes arrive from JSON/YAML files, API dicts and Python callers, so every field is parsed by its declared type
(``alpha: true`` is not 1.0, ``prune: "no"`` is not "on", a string ``models`` is not one model per letter) and a
wrong type is a one-line ``MergeError`` naming the field and where the recipe came from.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from .adjust import parse_adjust
from .dice import check_seed, is_token
from .errors import MergeError
from .lora.blocks import PRESETS as LORA_BLOCK_PRESETS, parse_blocks
from .weights import split_values
from .methods import bind, get_method, get_mode
from .roles import MAX_MODELS, label, role
from .options import DTYPE_CHOICES, ONE_OF, VAE_CHOICES, check_choice, check_exclusive

RECIPE_VERSION = 2  # 2: method and params; version 1 (neither) still loads, as method linear
# Fields added since version 2 (seed, random bounds, adjust, lora) are left out of the JSON when unset, so a
# recipe that does not use them serialises byte for byte as before and older files reproduce unchanged; an
# older engine refuses a recipe that uses them with "unknown recipe field", naming the field.
READABLE_VERSIONS = (1, 2)
OMITTED_WHEN_UNSET = ("seed", "random_lower", "random_upper", "adjust")
MAX_RECIPE_FILE_BYTES = 1 << 20  # a recipe is a few hundred bytes; anything near this is not one


@dataclass
class LoraEntry:
    """One LoRA baked into the merge: its file, strength, and block weights (``None``: every block 1; a LoRA
    block-weight preset name; or 12/17/20/26 numbers, see ``lib_merge.lora.blocks``)."""
    path: str
    strength: float = 1.0
    blocks: str | list[float] | None = None

    def blocks_text(self) -> str | None:
        """BLOCKS as ``lora bake`` takes it (a preset name, or the numbers joined by commas)."""
        if isinstance(self.blocks, list):
            return ",".join(repr(float(v)) for v in self.blocks)
        return self.blocks


MAX_CHAIN_DEPTH = 16  # recipes nested in recipes (merge chains); deeper is refused, not a recursion error


@dataclass
class Recipe:
    # A, B, C, … (as many as the mode takes): each a file path, or a Recipe whose result stands in for that
    # model (a merge chain, computed key by key in the same pass: lib_merge.chain)
    models: list[str | Recipe] = field(default_factory=list)
    mode: str = "weighted_sum"
    alpha: float = 0.5
    beta: float = 0.25
    weights: str | None = None
    weights_beta: str | None = None
    preset: str | None = None
    preset_beta: str | None = None
    elemental: str | None = None
    dtype: str = "keep"
    vae: str = "merge"
    bake_vae: str | None = None
    prune: bool = False
    include: str | None = None
    exclude: str | None = None
    force: bool = False
    copy_b_only: bool = False
    swap_ab: bool = False
    supermerger_time_embed_out11: bool = False  # SD1/SD2 time_embed takes OUT11's ratio (supermerger 2023-07..2025-11)
    method: str = "linear"  # how two tensors combine inside the mode (lib_merge.methods)
    params: dict[str, Any] = field(default_factory=dict)  # the method's declared parameters, by name
    seed: int | None = None  # seeds every random draw (add_noise; R/U/X ratios: a merge that needs one and has
    # none draws and records one)
    random_lower: str | None = None  # per-block lower bounds of X (same forms as weights)
    random_upper: str | None = None  # per-block upper bounds of X
    adjust: list[float] | None = None  # §1.12 detail/colour tweak: 8 floats, None when off (blank/all zeros)
    lora: list[LoraEntry] = field(default_factory=list)  # LoRAs baked into the merged values (after the formula,
    # before Adjust; ``lib_merge.lora.apply``)

    def validate(self) -> None:
        m = get_mode(self.mode)
        if not m.takes(len(self.models)) or len(self.models) > MAX_MODELS:
            count = f"{m.models} or more (at most {MAX_MODELS})" if m.variadic else str(m.models)
            raise MergeError(f"mode {self.mode} takes {count} model{'s' if m.models > 1 else ''} "
                             f"({m.models_text()}), got {len(self.models)}")
        # the method pairs with the mode, params are the declared ones, the mode takes this many models
        bind(self.mode, self.method, self.params, self.seed, len(self.models))
        if not m.per_key_ratio:
            given = [f"--{n.replace('_', '-')}" for n in ("weights", "preset", "elemental") if getattr(self, n)]
            if given:
                raise MergeError(f"mode {self.mode} reads no per-key ratio: block weights and elemental rules do "
                                 f"not apply, {given[0]}")
        check_choice("dtype", self.dtype, DTYPE_CHOICES)
        check_choice("vae", self.vae, VAE_CHOICES)
        if self.vae == "b" and m.models < 2:
            raise MergeError("--vae b needs a model B, --vae")
        check_exclusive(vars(self))
        if self.swap_ab and self.mode not in ("weighted_sum", "sigmoid", "inv_sigmoid"):
            raise MergeError(f"--swap-ab works with weighted_sum, sigmoid and inv_sigmoid only, not {self.mode}")
        if self.swap_ab and not get_method(self.method).swaps:
            raise MergeError(f"--swap-ab works with the linear and slerp methods only, not {self.method}")
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise MergeError(f"{name} must be a finite number, {v!r}")
        check_seed(self.seed)
        parse_adjust(self.adjust, "adjust")
        parse_lora(self.lora, "recipe")
        for i, m in enumerate(self.models):
            if isinstance(m, Recipe):
                try:
                    m.validate()
                except MergeError as e:
                    raise MergeError(f"in the recipe of model {label(i)}: {e}") from None

    def leaves(self, prefix: str = "") -> list[tuple[str, str]]:
        """Every model file of the tree as (role path, path): ``a``, ``b``, and ``a.a``, ``a.b`` … inside a
        nested recipe at A (depth first, A first)."""
        out: list[tuple[str, str]] = []
        for i, m in enumerate(self.models):
            r = prefix + role(i)
            out += m.leaves(r + ".") if isinstance(m, Recipe) else [(r, m)]
        return out

    def is_chain(self) -> bool:
        return any(isinstance(m, Recipe) for m in self.models)

    def map_tree(self, fn: "Callable[[Recipe], Recipe]") -> "Recipe":
        """``fn`` applied to this recipe and, first, to every nested one (bottom up)."""
        models = [m.map_tree(fn) if isinstance(m, Recipe) else m for m in self.models]
        return fn(replace(self, models=models))
    def to_dict(self) -> dict[str, Any]:
        """The JSON form. Random-ratio fields left unset are left out, so recipes (and the metadata of files)
        without random ratios read exactly as before they existed."""
        d = asdict(self)
        d["models"] = [{"recipe": m.to_dict()} if isinstance(m, Recipe) else m for m in self.models]
        d["adjust"] = parse_adjust(d["adjust"], "recipe")  # the normal form: 8 floats, or None (left out)
        for name in OMITTED_WHEN_UNSET:
            if d[name] is None:
                del d[name]
        if d["lora"]:
            d["lora"] = [asdict(e) for e in parse_lora(self.lora, "recipe")]
        else:
            del d["lora"]
        d["version"] = RECIPE_VERSION
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "recipe", depth: int = 0) -> "Recipe":
        """Parse every field by its type; ``origin`` (a file, "metadata", …) ends each error message. ``depth``:
        how deep this recipe is nested in a chain."""
        if not isinstance(data, Mapping):
            raise MergeError(f"recipe must be an object (a mapping of field names), got {_kind(data)}, {origin}")
        version = data.get("version", RECIPE_VERSION)
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise MergeError(f"unsupported recipe version {version!r}, {origin}")
        known = {f.name: f for f in fields(cls)}
        unknown = [k for k in data if k not in known and k not in ("version", "resolved", "inputs")]
        if unknown:
            raise MergeError(f"unknown recipe field {unknown[0]!r}, {origin}")
        kw = {k: _models(k, v, origin, depth) if k == "models" else _parser(f)(k, v, origin)
              for k, v in data.items() if (f := known.get(k)) is not None}
        return cls(**kw)


def as_recipe(value: Recipe | Mapping[str, Any], origin: str = "recipe") -> Recipe:
    """A typed, validated copy of what an API caller passed: a ``Recipe`` (fields may hold ``Path`` objects or
    ints) or a dict in the recipe's JSON form. Anything else is refused."""
    if isinstance(value, Recipe):
        value = {f.name: getattr(value, f.name) for f in fields(Recipe)}
    elif not isinstance(value, Mapping):
        got = "None" if value is None else type(value).__name__
        raise MergeError(f"recipe must be a Recipe or a dict, got {got}, {origin}")
    recipe = Recipe.from_dict(value, origin)
    recipe.validate()
    return recipe


LORA_FIELDS = ("path", "strength", "blocks")


def parse_lora(value: Any, origin: str) -> list[LoraEntry]:
    """The ``lora`` field: a list of entries, each a ``LoraEntry`` or an object with ``path`` (required),
    ``strength`` (a number, default 1) and ``blocks`` (null, a preset name, or a list of numbers; a text of
    numbers is read as that list). A bad entry is an error naming ``lora[i]`` and its field."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise MergeError(f"lora must be a list of LoRA entries (got {_got(value)}), {origin}")
    return [_lora_entry(f"lora[{i}]", e, origin) for i, e in enumerate(value)]


def _lora_entry(where: str, e: Any, origin: str) -> LoraEntry:
    if isinstance(e, LoraEntry):
        e = asdict(e)
    if not isinstance(e, Mapping):
        raise MergeError(f"{where} must be an object with path, strength and blocks (got {_got(e)}), {origin}")
    unknown = [k for k in e if k not in LORA_FIELDS]
    if unknown:
        raise MergeError(f"{where} has an unknown field {unknown[0]!r} (fields: {', '.join(LORA_FIELDS)}), {origin}")
    if "path" not in e:
        raise MergeError(f"{where} needs a path, {origin}")
    path = _path(f"{where}.path", e["path"], origin)
    strength = _number(f"{where}.strength", e.get("strength", 1.0), origin)
    return LoraEntry(path, strength, _lora_blocks(f"{where}.blocks", e.get("blocks"), origin))


def _lora_blocks(key: str, v: Any, origin: str) -> str | list[float] | None:
    """null, a preset name, or a list of numbers (checked: a known preset, an accepted length)."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, str):
        text = v.strip()
        tokens = split_values(text)
        if text in LORA_BLOCK_PRESETS or len(tokens) == 1:
            parse_blocks(text, f"{key}, {origin}")  # a known preset, or an error naming the unknown name
            return text
        for t in tokens:
            try:
                float(t)
            except ValueError:
                raise MergeError(f"{key} must be a preset name or numbers (got {t!r}), {origin}") from None
        v = [float(t) for t in tokens]
    if not isinstance(v, (list, tuple)):
        raise MergeError(f"{key} must be null, a preset name or a list of numbers (got {_got(v)}), {origin}")
    bad = [x for x in v if not _is_number(x)]
    if bad:
        raise MergeError(f"{key} list items must be numbers (got {_got(bad[0])}), {origin}")
    values = [_number(key, x, origin) for x in v]
    parse_blocks(",".join(repr(x) for x in values), f"{key}, {origin}")  # the accepted lengths
    return values


def with_overrides(recipe: Recipe, changes: Mapping[str, Any], origin: str = "command line") -> Recipe:
    """``recipe`` with ``changes`` applied (typed). Giving one of weights/preset drops the recipe's other one,
    so ``--weights`` replaces a recipe's ``preset`` instead of clashing with it."""
    data = {f.name: getattr(recipe, f.name) for f in fields(Recipe)}
    for a, b in ONE_OF:  # giving one of a pair drops the recipe's other
        if a in changes and b not in changes:
            data[b] = None
        elif b in changes and a not in changes:
            data[a] = None
    return Recipe.from_dict({**data, **changes}, origin)


# -- typed field parsers ------------------------------------------------------------------------------------
def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _got(v: Any) -> str:
    """How a wrong value reads in a message: JSON words for null/true/false, else its type and a short repr."""
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _number(key: str, v: Any, origin: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MergeError(f"{key} must be a number (got {_got(v)}), {origin}")
    if not math.isfinite(v):
        raise MergeError(f"{key} must be a finite number (got {v!r}), {origin}")
    return float(v)


def _flag(key: str, v: Any, origin: str) -> bool:
    if not isinstance(v, bool):
        raise MergeError(f"{key} must be true or false (got {_got(v)}), {origin}")
    return v


def _text(key: str, v: Any, origin: str) -> str:
    if not isinstance(v, str):
        raise MergeError(f"{key} must be a string (got {_got(v)}), {origin}")
    return v


def _joined(sep: str, item_ok: Callable[[Any], bool], what: str) -> Callable[[str, Any, str], str | None]:
    """An optional text field that also takes a list (YAML/JSON users write vectors and rule lists as lists)."""
    def parse(key: str, v: Any, origin: str) -> str | None:
        if isinstance(v, (list, tuple)):
            bad = [x for x in v if not item_ok(x)]
            if bad:
                raise MergeError(f"{key} list items must be {what} (got {_got(bad[0])}), {origin}")
            v = sep.join(str(x) for x in v)
        if v is None:
            return None
        if not isinstance(v, str):
            raise MergeError(f"{key} must be a string or a list of {what} (got {_got(v)}), {origin}")
        return v if v.strip() else None
    return parse


def _is_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float))


def _is_weight(x: Any) -> bool:
    """A block-weight list item: a number or a random token (R, U, X)."""
    return _is_number(x) or (isinstance(x, str) and is_token(x))


def _integer(key: str, v: Any, origin: str) -> int:
    if type(v) is not int:
        raise MergeError(f"{key} must be a whole number (got {_got(v)}), {origin}")
    return v


def _params(key: str, v: Any, origin: str) -> dict[str, Any]:
    """``params``: a mapping of parameter names to numbers or true/false; the method's declaration checks the
    names, types and ranges (``Recipe.validate``), since only then is the method known."""
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise MergeError(f"{key} must be an object of parameter names and values (got {_got(v)}), {origin}")
    for name, value in v.items():
        if not isinstance(name, str):
            raise MergeError(f"{key} names must be strings (got {_got(name)}), {origin}")
        ok = isinstance(value, (bool, int, float)) or (isinstance(value, (list, tuple)) and all(_is_number(x) for x in value))
        if not ok:
            raise MergeError(f"{key} {name} must be a number, true/false or a list of numbers (got {_got(value)}), "
                             f"{origin}")
    return {name: list(value) if isinstance(value, tuple) else value for name, value in v.items()}


def _as_is(key: str, v: Any, origin: str) -> Any:
    return v


def _optional(parse: Callable[[str, Any, str], Any]) -> Callable[[str, Any, str], Any]:
    """``X | None``: null (or blank text) means unset, anything else must be an X."""
    def parse_optional(key: str, v: Any, origin: str) -> Any:
        return None if v is None or (isinstance(v, str) and not v.strip()) else parse(key, v, origin)
    return parse_optional


def _path(key: str, v: Any, origin: str) -> str:
    if isinstance(v, Mapping):  # older recipes: {"path": ...}
        if "path" not in v:
            raise MergeError(f"{key} entry needs a 'path' (got keys {', '.join(map(str, v)) or 'none'}), {origin}")
        v = v["path"]
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str):
        raise MergeError(f"{key} must be a file path (got {_got(v)}), {origin}")
    if not v.strip():
        raise MergeError(f"{key} is an empty path, {origin}")
    check_path_text(v, key)
    return v


def _models(key: str, v: Any, origin: str, depth: int = 0) -> list["str | Recipe"]:
    """``models``: file paths, or ``{"recipe": {…}}`` objects (a nested recipe: a merge chain step)."""
    if not isinstance(v, (list, tuple)):
        raise MergeError(f"{key} must be a list of file paths (got {_got(v)}), {origin}")
    return [_model(f"{key}[{i}]", m, origin, depth) for i, m in enumerate(v)]


def _model(key: str, v: Any, origin: str, depth: int) -> "str | Recipe":
    if isinstance(v, Recipe):
        v = {"recipe": v}
    if not (isinstance(v, Mapping) and "recipe" in v):
        return _path(key, v, origin)
    extra = [k for k in v if k != "recipe"]
    if extra:
        raise MergeError(f"{key} has an unknown field {extra[0]!r} beside 'recipe', {origin}")
    if depth + 1 > MAX_CHAIN_DEPTH:
        raise MergeError(f"recipes are nested more than {MAX_CHAIN_DEPTH} deep, {key}, {origin}")
    inner = v["recipe"]
    if isinstance(inner, Recipe):
        inner = {f.name: getattr(inner, f.name) for f in fields(Recipe)}
    return Recipe.from_dict(inner, f"{key}.recipe, {origin}", depth + 1)


def check_path_text(path: str, which: str) -> None:
    """A path must be storable in the output's UTF-8 metadata and openable (no NUL byte)."""
    if "\x00" in path:
        raise MergeError(f"file path contains a NUL byte, {which} {path!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise MergeError(f"file name is not valid UTF-8 (rename the file), {which} {path!r}") from None


_BY_FIELD: dict[str, Callable[[str, Any, str], Any]] = {
    "bake_vae": _optional(_path),
    "weights": _joined(",", _is_weight, "numbers or R/U/X"),
    "weights_beta": _joined(",", _is_weight, "numbers or R/U/X"),
    "random_lower": _joined(",", _is_number, "numbers"),
    "random_upper": _joined(",", _is_number, "numbers"),
    "include": _joined(",", lambda x: isinstance(x, str), "strings"),
    "exclude": _joined(",", lambda x: isinstance(x, str), "strings"),
    "elemental": _joined("\n", lambda x: isinstance(x, str), "strings"),
    "params": _params,
    "adjust": lambda key, v, origin: parse_adjust(v, origin),
    "lora": lambda key, v, origin: parse_lora(v, origin),
}
_BY_TYPE: dict[str, Callable[[str, Any, str], Any]] = {"float": _number, "int": _integer, "bool": _flag, "str": _text}


def _parser(f) -> Callable[[str, Any, str], Any]:
    """The field's own parser, else one from its annotation (``T`` or ``T | None``); a type without a parser
    passes through unchanged (a field added later is never a crash here)."""
    if f.name in _BY_FIELD:
        return _BY_FIELD[f.name]
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = _BY_TYPE.get(t.removesuffix(" | None"), _as_is)
    return _optional(base) if t.endswith(" | None") else base


# -- files --------------------------------------------------------------------------------------------------
class _AliasFound(Exception):
    pass


def _refuse_aliases(yaml):
    """A SafeLoader that refuses aliases: a few hundred bytes of nested ``*refs`` expand to gigabytes."""
    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                ev = self.peek_event()
                raise _AliasFound(f"*{ev.anchor} at line {ev.start_mark.line + 1}")
            return super().compose_node(parent, index)
    return NoAliasLoader


def _parse_text(text: str, p: Path) -> Any:
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise MergeError(f"reading YAML recipes needs PyYAML (pip install pyyaml), {p}") from None
        try:
            return yaml.load(text, Loader=_refuse_aliases(yaml))
        except _AliasFound as e:
            raise MergeError(f"YAML aliases are not allowed in a recipe ({e}), {p}") from None
        except yaml.YAMLError as e:
            raise MergeError(f"recipe is not valid YAML ({str(e).splitlines()[0]}), {p}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MergeError(f"recipe is not valid JSON ({e.msg} at line {e.lineno}), {p}") from None
    except RecursionError:
        raise MergeError(f"recipe is nested too deeply, {p}") from None


def _against(folder: Path, path: str) -> str:
    return path if os.path.isabs(path) else str(folder / path)


def load_recipe_file(path: str | Path, _including: tuple[str, ...] = ()) -> Recipe:
    """Read a JSON or YAML recipe. Relative model paths are relative to the recipe file's folder (where the
    recipe's author put them), not to the folder the command runs in. A model may be a nested recipe, inline
    (``{"recipe": {…}}``) or another recipe file (``{"recipe": "step1.yaml"}``, relative to this file)."""
    p = Path(path)
    real = os.path.realpath(p)
    if real in _including:
        raise MergeError(f"recipe includes itself (a cycle of recipe files), {p}")
    if len(_including) >= MAX_CHAIN_DEPTH:
        raise MergeError(f"recipes are nested more than {MAX_CHAIN_DEPTH} deep, {p}")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_RECIPE_FILE_BYTES + 1)
    except OSError as e:
        raise MergeError(f"cannot read recipe: {e.strerror}, {p}") from None
    if len(raw) > MAX_RECIPE_FILE_BYTES:
        raise MergeError(f"recipe file is larger than {MAX_RECIPE_FILE_BYTES >> 20} MiB (not a recipe?), {p}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeError(f"recipe is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}), {p}") from None
    data = _parse_text(text, p)
    if isinstance(data, Mapping) and isinstance(data.get("models"), list):
        data = {**data, "models": [_included(m, p, (*_including, real)) for m in data["models"]]}
    r = Recipe.from_dict(data, str(p), len(_including))
    return r.map_tree(lambda x: replace(
        x, models=[m if isinstance(m, Recipe) else _against(p.parent, m) for m in x.models],
        bake_vae=_against(p.parent, x.bake_vae) if x.bake_vae else None,
        lora=[replace(e, path=_against(p.parent, e.path)) for e in x.lora]))


def _included(m: Any, p: Path, including: tuple[str, ...]) -> Any:
    """A ``{"recipe": "FILE"}`` model entry of recipe file ``p``, read (relative to ``p``'s folder)."""
    if not (isinstance(m, Mapping) and "recipe" in m and len(m) == 1):
        return m
    inner = m["recipe"]
    if isinstance(inner, str):
        return load_recipe_file(_against(p.parent, inner), including)
    if isinstance(inner, Mapping) and isinstance(inner.get("models"), list):
        return {"recipe": {**inner, "models": [_included(x, p, including) for x in inner["models"]]}}
    return m
