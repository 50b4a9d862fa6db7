"""BlockMerge axes in the WebUI's own X/Y/Z plot script.

Axes only record values on the cell's ``p`` (``p.blockmerge_xyz``); the AlwaysOn script's ``process()`` merges
in memory through the test-merge path (cached sources, only changed tensors recomputed). The X/Y/Z script's
``run`` is wrapped once per import: checks across axes before the first cell, and the pre-grid state (the previous
live merge, or the original weights) back afterwards, also after an interrupted or failed grid.
"""
from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any

from .. import presets
from ..arch import ARCHS
from ..errors import MergeError
from ..adjust import parse_adjust
from ..dice import check_seed
from ..methods.modes import MODES, get_mode
from ..methods.formula import params_for
from ..methods.params import check_declared
from ..methods.registry import METHODS, Method, get_method
from ..options import SUBTARGETS, check_subtargets
from ..weights import format_vector, parse_number, parse_weights
from . import host
from .chain import step_body
from .service import SERVICE

PREFIX = "BlockMerge: "
MARK = "_blockmerge_wrapped"


def find_xyz_module():
    from modules import scripts
    for d in scripts.scripts_data:
        if d.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid"):
            return d.module
    return None


def _set(field: str):
    def apply(p, x, xs):
        cur = dict(getattr(p, "blockmerge_xyz", None) or {})
        cur[field] = round(x, 6) if isinstance(x, float) else x
        p.blockmerge_xyz = cur
    return apply


def _split_bar(text: str) -> list[str]:
    """Values containing commas (weight strings, elemental rules) are separated by '|'."""
    return [v.strip() for v in text.split("|") if v.strip()]


def parse_block_values(text: str, arch_name: str = "sd1") -> dict[str, float]:
    """``OUT05=0.3 IN01=1`` -> {block: value}."""
    arch = ARCHS[arch_name]
    out = {}
    for tok in text.replace(",", " ").split():
        name, sep, val = tok.partition("=")
        name = name.strip().upper()
        if not sep:
            raise MergeError(f"block value needs BLOCK=VALUE, {tok!r}")
        if name not in arch.blocks:
            raise MergeError(f"unknown block {name!r} for {arch.label}, block value {tok!r}")
        out[name] = parse_number(val, f"block value {tok!r}")
    if not out:
        raise MergeError(f"empty block value, {text!r}")
    return out


PARAM_AXIS = "BlockMerge: method parameter"


def _param_items(text: str) -> list[tuple[str, str, str]]:
    """``density=0.1 gamma=2`` -> [(item, name, value text)]; the syntax only, no method needed."""
    out = []
    for item in text.split():
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise MergeError(f"method parameter needs NAME=VALUE, {PARAM_AXIS} {item!r}")
        out.append((item, name.strip(), value))
    if not out:
        raise MergeError(f"empty method parameter, {PARAM_AXIS} {text!r}")
    return out


def parse_method_params(text: str, method: Method, mode: str = "weighted_sum") -> dict[str, Any]:
    """One cell's ``NAME=VALUE`` items, each parsed and checked by the declaration of NAME of ``method`` inside
    ``mode`` (a variadic mode such as ties declares its own)."""
    declared, owner = params_for(mode, method.name)
    out = {}
    for item, name, value in _param_items(text):
        decl = next((p for p in declared if p.name == name), None)
        if decl is None:
            try:
                check_declared(declared, {name: None}, owner)  # raises: unknown parameter, naming the declared ones
            except MergeError as e:
                raise MergeError(f"{str(e).rpartition(', ')[0]}, {PARAM_AXIS} {item!r}") from None
        out[name] = decl.parse_text(value, f"{owner}, {PARAM_AXIS} {item!r}")
    return out


def check_param_value(text: str) -> None:
    """A method parameter value on its own (``confirm`` cannot see a method axis): each name must be declared
    by some method and its value read by that declaration; the cell's method is checked in the wrapped run."""
    owners = [(f"method {m.name}", p) for m in METHODS.values() for p in m.params] + \
        [(f"mode {m.name}", p) for m in MODES.values() for p in m.params]
    for item, name, value in _param_items(text):
        found = [(owner, p) for owner, p in owners if p.name == name]
        if not found:
            known = ", ".join(f"{p.name} ({owner})" for owner, p in owners) or "none"
            raise MergeError(f"no mode or method takes parameter {name!r} (declared: {known}), {PARAM_AXIS} {item!r}")
        owner, decl = found[0]
        decl.parse_text(value, f"{owner}, {PARAM_AXIS} {item!r}")


LORA_AXIS = PREFIX + "LoRA strength"
_LORA_PAIR = re.compile(r"\s*([^:]+?)\s*:\s*(\S+)\s*")
_NEEDS_LORAS = (f"{LORA_AXIS} needs LoRAs in the base recipe: select them in the tab's \"Bake into the test merge\" "
                "part (or send lora to POST test) and run Test merge")


def parse_lora_strengths(text: str) -> float | list[tuple[str, float]]:
    """One cell's value: a number (every baked LoRA takes it) or ``NAME:STRENGTH`` pairs separated by spaces
    (names may hold spaces; each pair ends at the space after its number)."""
    t = str(text).strip()
    where = f"{LORA_AXIS} {text!r}"
    if not t:
        raise MergeError(f"empty LoRA strength, {where}")
    bad = MergeError(f"LoRA strength must be a number or NAME:STRENGTH pairs separated by spaces, {where}")
    if ":" not in t:
        try:
            v = float(t)
        except ValueError:
            raise bad from None
        if not math.isfinite(v):
            raise bad
        return round(v, 6)
    pairs, pos = [], 0
    while pos < len(t):
        m = _LORA_PAIR.match(t, pos)
        if m is None:
            raise bad
        pairs.append((m.group(1), round(parse_number(m.group(2), where), 6)))
        pos = m.end()
    return pairs


def _lora_index(name: str, items: list[dict], where: str) -> int:
    """The baked LoRA ``name`` stands for: its name in the LoRA list, without ``.safetensors``, or its file's
    stem (as ``<lora:stem:…>`` names it) when that names one LoRA only."""
    names = [str(e.get("name", "")) for e in items]
    for i, n in enumerate(names):
        if name in (n, n.removesuffix(".safetensors")):
            return i
    stems = [i for i, n in enumerate(names) if PurePosixPath(n).stem == name]
    if len(stems) == 1:
        return stems[0]
    baked = ", ".join(names)
    if stems:
        raise MergeError(f"LoRA {name!r} names {len(stems)} baked LoRAs ({baked}): give its name in the list, {where}")
    raise MergeError(f"LoRA {name!r} is not baked in the base recipe (baked: {baked}), {where}")


def lora_with_strengths(items: list[dict] | None, text: str) -> list[dict]:
    """The base recipe's ``lora`` list with one cell's strengths on top: a number sets every LoRA's strength;
    pairs set the named ones (the others keep the base's)."""
    if not items:
        raise MergeError(_NEEDS_LORAS)
    value = parse_lora_strengths(text)
    out = [dict(e) for e in items]
    if isinstance(value, float):
        for e in out:
            e["strength"] = value
        return out
    for name, strength in value:
        out[_lora_index(name, out, f"{LORA_AXIS} {text!r}")]["strength"] = strength
    return out


def _confirm(kind: str):
    def confirm(p, xs):
        for x in xs:
            if kind == "preset":
                presets.resolve(x, ARCHS[_arch_name()])
            elif kind == "weights":
                parse_weights(x, ARCHS[_arch_name()], 0.5, "BlockMerge: weights")
            elif kind == "block_value":
                parse_block_values(x, _arch_name())
            elif kind in ("model_b", "model_c"):
                host.checkpoint_by_name(x, kind)
            elif kind == "mode":
                get_mode(x)
            elif kind == "method":
                get_method(x)
            elif kind == "method_params":
                check_param_value(x)
            elif kind == "seed":
                check_seed(x)
            elif kind == "adjust":
                parse_adjust(x, f"{PREFIX}adjust")
            elif kind == "subtargets":
                check_subtargets([x])
            elif kind == "lora_strength":
                lora_with_strengths((SERVICE.base_params or {}).get("lora"), x)
            elif kind == "elemental":
                from ..elemental import parse_rules
                parse_rules(x, ARCHS[_arch_name()])
    return confirm


def _arch_name() -> str:
    m = host.loaded_model()
    return "sdxl" if m is not None and getattr(m, "is_sdxl", False) else "sd1"


def axis_options(xyz) -> list:
    A = xyz.AxisOption
    fmt = xyz.format_value_add_label
    ckpts = lambda: host.checkpoint_titles()  # noqa: E731
    return [
        A(PREFIX + "alpha", float, _set("alpha"), format_value=fmt, cost=0.8),
        A(PREFIX + "beta", float, _set("beta"), format_value=fmt, cost=0.8),
        A(PREFIX + "preset", str, _set("preset"), format_value=fmt, confirm=_confirm("preset"), cost=0.8,
          choices=lambda: presets.names(_arch_name())),
        A(PREFIX + "weights", str, _set("weights"), format_value=fmt, confirm=_confirm("weights"), cost=0.8,
          prepare=_split_bar),
        A(PREFIX + "block value", str, _set("block_value"), format_value=fmt, confirm=_confirm("block_value"),
          cost=0.5),
        A(PREFIX + "model B", str, _set("model_b"), format_value=fmt, confirm=_confirm("model_b"), cost=0.9,
          choices=ckpts),
        A(PREFIX + "model C", str, _set("model_c"), format_value=fmt, confirm=_confirm("model_c"), cost=0.9,
          choices=ckpts),
        A(PREFIX + "merge mode", str, _set("mode"), format_value=fmt, confirm=_confirm("mode"), cost=0.8,
          choices=lambda: list(MODES)),
        A(PREFIX + "method", str, _set("method"), format_value=fmt, confirm=_confirm("method"), cost=0.8,
          choices=lambda: list(METHODS)),
        A(PARAM_AXIS, str, _set("method_params"), format_value=fmt, confirm=_confirm("method_params"), cost=0.8,
          prepare=_split_bar),
        A(PREFIX + "seed", int, _set("seed"), format_value=fmt, confirm=_confirm("seed"), cost=0.8),
        A(PREFIX + "adjust", str, _set("adjust"), format_value=fmt, confirm=_confirm("adjust"), cost=0.5,
          prepare=_split_bar),
        A(PREFIX + "elemental", str, _set("elemental"), format_value=fmt, confirm=_confirm("elemental"), cost=0.6,
          prepare=_split_bar),
        A(PREFIX + "sub-target", str, _set("subtargets"), format_value=fmt, confirm=_confirm("subtargets"), cost=0.8,
          choices=lambda: list(SUBTARGETS)),
        A(LORA_AXIS, str, _set("lora_strength"), format_value=fmt, confirm=_confirm("lora_strength"), cost=0.6),
    ]


def register() -> bool:
    """Add the axes (once) and wrap the script's ``run`` (once per import of xyz_grid.py)."""
    xyz = find_xyz_module()
    if xyz is None:
        return False
    if not any(getattr(o, "label", "").startswith(PREFIX) for o in xyz.axis_options):
        xyz.axis_options.extend(axis_options(xyz))
    wrap_run(xyz)
    return True


def unregister() -> None:
    xyz = find_xyz_module()
    if xyz is not None:
        orig = getattr(xyz.Script.run, MARK, None)
        if orig is not None:
            xyz.Script.run = orig


# -- per cell ------------------------------------------------------------------------------------------------
def cell_params(base: dict | None, axes: dict[str, Any], arch_name: str) -> dict:
    """The merge settings of one cell: the base recipe with the axes' values on top. A nested base (a chain,
    ``model_a: {"recipe": …}``) stays model A: the axes set the outer step's fields, the cells merge on top of it."""
    p = dict(base or {"mode": "weighted_sum", "alpha": 0.5})
    if step_body(p.get("model_a")) is None:
        p.pop("model_a", None)  # the loaded checkpoint
    for k in ("model_b", "model_c", "mode", "alpha", "beta", "elemental", "seed", "adjust"):
        if k in axes:
            p[k] = axes[k]
    if "method" in axes and axes["method"] != (p.get("method") or "linear"):
        p["method"] = axes["method"]
        p.pop("params", None)  # the base's parameters belong to its own method
    if "method_params" in axes:
        method = get_method(p.get("method") or "linear")
        p["params"] = {**(p.get("params") or {}),
                       **parse_method_params(axes["method_params"], method, p.get("mode") or "weighted_sum")}
    if "lora_strength" in axes:
        p["lora"] = lora_with_strengths(p.get("lora"), axes["lora_strength"])
    if "subtargets" in axes:
        p["subtargets"] = [] if axes["subtargets"] == "all" else [axes["subtargets"]]
    if "preset" in axes:
        p["preset"] = axes["preset"]
        p.pop("weights", None)
    if "weights" in axes:
        p["weights"] = axes["weights"]
        p.pop("preset", None)
    if "block_value" in axes:
        arch = ARCHS[arch_name]
        if p.get("preset"):
            vec = presets.resolve(p["preset"], arch)
        elif p.get("weights"):
            vec = parse_weights(p["weights"], arch, float(p.get("alpha", 0.5)))
        else:
            vec = [float(p.get("alpha", 0.5))] * len(arch.blocks)
        for b, v in parse_block_values(axes["block_value"], arch_name).items():
            vec[arch.blocks.index(b)] = v
        p["weights"] = format_vector(vec)
        p.pop("preset", None)
    return p


def process_cell(p) -> None:
    """Called from the AlwaysOn script's ``process()``: merge this cell's settings in memory."""
    axes = getattr(p, "blockmerge_xyz", None)
    if not axes:
        return
    try:  # the cell's settings are parsed here too (a method parameter by the cell's method): a failure stops the grid
        res = SERVICE.test_merge(cell_params(SERVICE.base_params, axes, _arch_name()), keep_base=True)
    except Exception as e:  # the WebUI swallows exceptions from process(): record, stop the grid
        SERVICE.xyz_failure = f"cell {_describe(axes)}: {e}"
        host.state().interrupt()
        raise
    SERVICE.xyz_cells.append({"axes": dict(axes), "written": res["written"], "seconds": res["seconds"]})


def _describe(axes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in axes.items())


# -- around the whole grid -----------------------------------------------------------------------------------
def _labels(script, args) -> list[str]:
    opts = getattr(script, "current_axis_options", None) or []
    out = []
    for idx in (args[0], args[3], args[6]):
        try:
            out.append(opts[int(idx)].label)
        except (IndexError, TypeError, ValueError):
            out.append("")
    return out


def check_grid(labels: list[str], base: dict | None) -> None:
    """Checks across axes, before the first cell."""
    ours = [lb[len(PREFIX):] for lb in labels if lb.startswith(PREFIX)]
    if not ours:
        return
    others = [lb for lb in labels if lb and not lb.startswith(PREFIX) and lb != "Nothing"]
    for lb in others:
        if lb.startswith(("Checkpoint name", "Refiner", "FP8")):
            raise MergeError(f"BlockMerge axes cannot be combined with the {lb!r} axis (it reloads the model)")
    if base is None and "model B" not in ours:
        raise MergeError("run Test merge first or add a BlockMerge: model B axis")
    mode = (base or {}).get("mode") or "weighted_sum"
    if "beta" in ours and "merge mode" not in ours and not get_mode(mode).uses_beta:
        raise MergeError(f"beta has no effect in mode {mode} (its formula has no beta), BlockMerge: beta")
    subs = base.get("subtargets") if base else None
    vector = None
    if base and base.get("preset"):
        vector = f"preset {base['preset']}"
    elif base and base.get("weights"):
        vector = "block weights"
    if "preset" in ours:
        vector = vector or "a BlockMerge: preset axis"
    if "weights" in ours:
        vector = vector or "a BlockMerge: weights axis"
    if "block value" in ours and vector is None:
        vector = "a BlockMerge: block value axis"
    for sweep in ("alpha", "beta"):
        if sweep in ours and vector and not (sweep == "alpha" and subs):
            if sweep == "beta" and base and not (base.get("weights_beta") or base.get("preset_beta")):
                continue
            raise MergeError(f"{sweep} has no effect while {vector} is set; sweep BlockMerge: block value or preset")


def _axis_values(script, args, label: str) -> list[str] | None:
    """The values the grid will give axis ``label`` (as the script reads them), or None if it is not an axis."""
    opts = getattr(script, "current_axis_options", None) or []
    for i in (0, 3, 6):
        try:
            opt = opts[int(args[i])]
        except (IndexError, TypeError, ValueError):
            continue
        if opt.label != label:
            continue
        if opt.choices is not None and args[i + 2]:
            return [str(v) for v in args[i + 2]]
        text = str(args[i + 1] or "")
        return opt.prepare(text) if opt.prepare else [v.strip() for v in text.split(",") if v.strip()]
    return None


def check_methods(methods: list[str], modes: list[str], param_values: list[str], seeded_ok: bool) -> None:
    """Checks across the method, merge mode, method parameter and seed axes (and the base recipe), before the
    first cell: every method of the grid pairs with every mode, takes every parameter value, and has a seed."""
    where = PREFIX + "method"
    for name in methods:
        method = get_method(name)
        for mode in modes:
            try:
                method.check_mode(mode)
            except MergeError as e:
                raise MergeError(f"{str(e).rpartition(', ')[0]}, {where}") from None
        for mode in modes:
            for value in param_values:
                parse_method_params(value, method, mode)
            seeded = method.seeded or get_mode(mode).seeded
            if seeded and not seeded_ok:
                who = f"method {name}" if method.seeded else f"mode {mode}"
                raise MergeError(f"{who} draws random numbers: set a seed in the base recipe or add a "
                                 f"BlockMerge: seed axis, {where}")


def _check_method_axes(script, args, base: dict | None) -> None:
    axes = {lb: _axis_values(script, args, PREFIX + lb) for lb in ("method", "merge mode", "method parameter", "seed")}
    if axes["method"] is None and axes["method parameter"] is None and axes["merge mode"] is None:
        return
    base = base or {}
    check_methods(axes["method"] or [base.get("method") or "linear"],
                  axes["merge mode"] or [base.get("mode") or "weighted_sum"],
                  axes["method parameter"] or [], base.get("seed") is not None or axes["seed"] is not None)


def wrap_run(xyz) -> None:
    cls = xyz.Script
    if getattr(cls.run, MARK, None) is not None:
        return
    orig = cls.run

    def run(self, p, *args):
        labels = _labels(self, args)
        if not any(lb.startswith(PREFIX) for lb in labels):
            return orig(self, p, *args)
        check_grid(labels, SERVICE.base_params)
        _check_method_axes(self, args, SERVICE.base_params)
        before = dict(SERVICE.live_params) if SERVICE.live_params else None
        base = SERVICE.base_params
        SERVICE.xyz_failure = None
        SERVICE.xyz_cells = []
        try:
            result = orig(self, p, *args)
        finally:
            try:
                if before is not None:
                    SERVICE.test_merge(before)
                else:
                    SERVICE.restore()
            finally:
                SERVICE.base_params = base
        if SERVICE.xyz_failure:
            failure, SERVICE.xyz_failure = SERVICE.xyz_failure, None
            raise MergeError(f"X/Y/Z grid stopped: {failure}; the model was restored")
        return result

    setattr(run, MARK, orig)
    cls.run = run
