"""The choices a recipe offers and the rules across its fields, each defined once.

The CLI, the tab, the WebUI settings, the X/Y/Z axes and the HTTP API import these lists and call these checks
instead of spelling them out again, so a new dtype or sub-target (or a changed rule) is one edit here. The engine
never imports the WebUI; the WebUI imports this module.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .dtypes import OUTPUT_DTYPES
from .errors import MergeError

# Output dtypes by their CLI spelling; "keep" = each tensor keeps A's dtype.
DTYPE_CHOICES: tuple[str, ...] = tuple(OUTPUT_DTYPES)
# The default of the WebUI setting "Default dtype of saved merges" (the CLI and recipes default to "keep").
DEFAULT_SAVE_DTYPE = "fp16"

# What the VAE keys of a saved file hold: merged with the BASE ratio, or copied from A or B.
VAE_CHOICES: tuple[str, ...] = ("merge", "a", "b")

# What a merge writes: one safetensors file, or a diffusers folder (``lib_merge.folder_output``).
OUTPUT_FORMATS: tuple[str, ...] = ("safetensors", "diffusers")

# Sub-targets of block weights -> the element name their keys contain; "all" = no restriction.
SUBTARGET_ELEMENTS: dict[str, str] = {"attn1": "attn1", "attn2": "attn2", "ff": "ff.net"}
SUBTARGETS: tuple[str, ...] = ("all", *SUBTARGET_ELEMENTS)

# Pairs of recipe fields of which at most one may be given: a weight vector or a preset, for alpha and for beta.
ONE_OF: tuple[tuple[str, str], ...] = (("weights", "preset"), ("weights_beta", "preset_beta"))


def choice_list(choices: Iterable[str]) -> str:
    """``("a", "b", "c")`` -> ``"a, b or c"`` (for messages and help texts)."""
    items = list(choices)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
    """A value outside its list is an error naming the field and the value."""
    choices = tuple(choices)
    if value not in choices:
        raise MergeError(f"{field} must be {choice_list(choices)}, {field}: {value!r}")


def check_one_of(first: str, first_value: Any, second: str, second_value: Any) -> None:
    """Two fields of which at most one may be set (a weight vector and a preset say the same thing twice)."""
    if first_value and second_value:
        raise MergeError(f"give {first} or {second}, not both, {first}/{second}")


def check_exclusive(values: Mapping[str, Any]) -> None:
    """Every pair of :data:`ONE_OF` over a field -> value mapping (a recipe's fields, a request body)."""
    for first, second in ONE_OF:
        check_one_of(first, values.get(first), second, values.get(second))


def check_subtargets(subtargets: Iterable[str]) -> list[str]:
    """The chosen sub-targets, each one of :data:`SUBTARGETS` (else an error naming the first unknown one)."""
    chosen = list(subtargets)
    for s in chosen:
        if s not in SUBTARGETS:
            raise MergeError(f"sub-target must be {choice_list(SUBTARGETS)}, subtargets: {s!r}")
    return chosen
