"""A declared parameter of a mode or method: name, type, default, range and a one-line meaning.

The declaration is the only place a parameter is described: the recipe checks values against it, the CLI parses
``-p NAME=VALUE`` with it and ``methods`` prints it, so nothing lists a parameter a second time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import MergeError

TYPE_WORDS = {float: "number", int: "whole number", bool: "true or false", tuple: "list of numbers"}


@dataclass(frozen=True)
class Param:
    name: str
    type: type  # float, int, bool, or tuple (a list of numbers, e.g. one weight per model)
    default: Any  # None: no value unless given (the owner says what that means)
    meaning: str
    low: float | None = None  # inclusive bounds, None = unbounded
    high: float | None = None

    def check(self, value: Any, where: str) -> Any:
        """``value`` (a recipe/API value) as this parameter's type, else an error naming it and ``where``."""
        word = TYPE_WORDS[self.type]
        if self.type is tuple:
            return self._check_list(value, where)
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is int:
            ok = type(value) is int
        else:
            ok = not isinstance(value, bool) and isinstance(value, (int, float))
        if not ok:
            raise MergeError(f"parameter {self.name} must be a {word} (got {type(value).__name__} {value!r}), {where}")
        if self.type is bool:
            return value
        value = self.type(value)
        if not math.isfinite(value):
            raise MergeError(f"parameter {self.name} must be finite (got {value!r}), {where}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise MergeError(f"parameter {self.name} must lie in {self.range_text()} (got {value!r}), {where}")
        return value

    def _check_list(self, value: Any, where: str) -> tuple[float, ...]:
        if not isinstance(value, (list, tuple)) or not value:
            raise MergeError(f"parameter {self.name} must be a list of numbers (got {type(value).__name__} "
                             f"{value!r}), {where}")
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise MergeError(f"parameter {self.name} must hold finite numbers (got {v!r}), {where}")
            if (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
                raise MergeError(f"parameter {self.name} values must lie in {self.range_text()} (got {v!r}), {where}")
            out.append(float(v))
        return tuple(out)

    def parse_text(self, text: str, where: str) -> Any:
        """A command-line value (``-p gamma=2``, ``-p model_weights=1,0.5``) as this parameter's type."""
        t = text.strip()
        if self.type is tuple:
            try:
                values = [float(x) for x in t.split(",")]
            except ValueError:
                raise MergeError(f"parameter {self.name} must be numbers separated by commas (got {text!r}), "
                                 f"{where}") from None
            return self.check(values, where)
        if self.type is bool:
            low = t.lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise MergeError(f"parameter {self.name} must be true or false (got {text!r}), {where}")
            return self.check(low in ("true", "1", "yes", "on"), where)
        try:
            value = int(t) if self.type is int else float(t)
        except ValueError:
            raise MergeError(f"parameter {self.name} must be a {TYPE_WORDS[self.type]} (got {text!r}), "
                             f"{where}") from None
        return self.check(value, where)

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"[{lo}, {hi}]"

    def describe(self) -> str:
        """One line for ``methods`` and help texts."""
        bounds = "" if self.low is None and self.high is None else f", in {self.range_text()}"
        default = "none" if self.default is None else repr(self.default)
        return f"{self.name} ({TYPE_WORDS[self.type]}, default {default}{bounds}): {self.meaning}"


def check_declared(declared: tuple[Param, ...], given: Mapping[str, Any], owner: str) -> tuple[tuple[str, Any], ...]:
    """Every parameter of ``declared`` with its value (given, else the default), in declaration order; a name
    that is not declared is an error naming ``owner`` ("method ties") and the names it takes."""
    names = {p.name for p in declared}
    for name in given:
        if name not in names:
            takes = f"it takes {', '.join(p.name for p in declared)}" if declared else "it takes none"
            raise MergeError(f"unknown parameter {name!r} for {owner} ({takes}), -p {name}")
    return tuple((p.name, p.check(given[p.name], owner) if p.name in given else p.default)
                  for p in declared)
