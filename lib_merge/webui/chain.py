"""Merge chains in requests: a model field (``model_a``, ``model_b``, ``model_c``, ``more_models[i]``) may be
``{"recipe": {<the same body fields>}}``, a nested step whose result stands in for that model.

These helpers walk the request dicts (the tab's and the API's form); ``params.to_recipe`` turns them into nested
:class:`Recipe` objects. Nothing here touches the WebUI.
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Callable, Iterator

from ..errors import MergeError

MODEL_FIELDS = ("model_a", "model_b", "model_c")
def step_body(value: Any) -> dict | None:
    """The body of a nested step (``{"recipe": {…}}`` -> ``{…}``), or None when ``value`` is a checkpoint name."""
    if isinstance(value, dict) and "recipe" in value and isinstance(value["recipe"], dict):
        return value["recipe"]
    return None


def model_slots(params: dict) -> Iterator[tuple[str, Any]]:
    """(field path, value) of every model field of one step: ``model_a`` … and ``more_models[i]``."""
    for f in MODEL_FIELDS:
        if f in params:
            yield f, params[f]
    more = params.get("more_models")
    if isinstance(more, list):
        for i, m in enumerate(more):
            yield f"more_models[{i}]", m


def map_models(params: dict, fn: Callable[[Any, str], Any]) -> dict:
    """``params`` with ``fn(value, field)`` applied to every model field of this step (not inside nested ones)."""
    out = dict(params)
    for f in MODEL_FIELDS:
        if out.get(f) is not None:
            out[f] = fn(out[f], f)
    if isinstance(out.get("more_models"), list):
        out["more_models"] = [fn(m, f"more_models[{i}]") for i, m in enumerate(out["more_models"])]
    return out


def at_step(e: MergeError, path: str) -> MergeError:
    """An error raised inside the nested step at ``path`` (``model_a.recipe``), its field named by the full path:
    ``unknown field, bogus`` -> ``unknown field, model_a.recipe.bogus``; a message that ends with no field
    (``…, method extract``: the owner of a parameter) gets the step's path appended. The error's class (409, 422 …) is kept."""
    text = str(e)
    head, sep, tail = text.rpartition(", ")
    first = re.match(r"[A-Za-z_0-9]*", tail).group(0) if sep else ""
    owner = first in ("mode", "method") and tail[len(first):len(first) + 1] == " "  # "mode ties": no field
    if first and not owner:
        new = f"{head}, {path}.{tail}"
    else:
        new = f"{text}, {path}"
    return type(e)(new)


def first_a(params: dict, path: str = "") -> tuple[str, Any]:
    """The field path and value of the chain's first leaf, following ``model_a`` into nested steps: the model a
    test merge starts from (``model_a.recipe.model_a``; the value is None when left to the loaded checkpoint)."""
    here = f"{path}model_a"
    body = step_body(params.get("model_a"))
    if body is not None:
        return first_a(body, f"{here}.recipe.")
    return here, params.get("model_a")


def pin_first_a(params: dict, name: str) -> dict:
    """``params`` with the chain's first leaf set to ``name`` (nested steps copied, never changed in place)."""
    body = step_body(params.get("model_a"))
    if body is None:
        return {**params, "model_a": name}
    return {**params, "model_a": {"recipe": pin_first_a(body, name)}}


def is_chain(params: dict | None) -> bool:
    return bool(params) and any(step_body(v) is not None for _, v in model_slots(params))


def _short(name: Any) -> str:
    return PurePosixPath(str(name)).name.removesuffix(".safetensors").removesuffix(".ckpt")


def describe(params: dict, loaded: str | None = None, weights_name: Callable[[str], str | None] | None = None) -> str:
    """A step in a few words, for the tab: ``(synthA × synthB, GRAD_V)``; nested steps in their own brackets.
    ``weights_name(text)``: the preset a weight vector equals (the tab sends a chosen preset as its vector)."""
    models = []
    for field, v in model_slots(params):
        body = step_body(v)
        if body is not None:
            models.append(describe(body, loaded, weights_name))
        elif v:
            models.append(_short(v))
        elif field == "model_a":
            models.append(_short(loaded) if loaded else "loaded checkpoint")
    if "model_a" not in params:
        models.insert(0, _short(loaded) if loaded else "loaded checkpoint")
    how = []
    mode, method = params.get("mode") or "weighted_sum", params.get("method") or "linear"
    if mode != "weighted_sum":
        how.append(mode)
    if method != "linear":
        how.append(method)
    if params.get("preset"):
        how.append(str(params["preset"]))
    elif params.get("weights"):
        how.append((weights_name(params["weights"]) if weights_name else None) or "block weights")
    elif params.get("alpha") is not None:
        how.append(f"alpha {float(params['alpha']):g}")
    return f"({' × '.join(models)}{', ' + ', '.join(how) if how else ''})"
