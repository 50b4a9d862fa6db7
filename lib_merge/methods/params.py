"""A declared parameter of a mode or method: name, type, default, range and a one-line meaning.

The declaration is the only place a parameter is described: the recipe checks values against it, the CLI parses
``-p NAME=VALUE`` with it and ``methods`` prints it, so nothing lists a parameter a second time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import MergeError

TYPE_WORDS = {float: "number", int: "whole number", bool: "true or false"}


@dataclass(frozen=True)
class Param:
    name: str
    type: type  # float, int or bool
    default: Any
    meaning: str
    low: float | None = None  # inclusive bounds, None = unbounded
    high: float | None = None

    def check(self, value: Any, where: str) -> Any:
        """``value`` (a recipe/API value) as this parameter's type, else an error naming it and ``where``."""
        word = TYPE_WORDS[self.type]
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

    def parse_text(self, text: str, where: str) -> Any:
        """A command-line value (``-p gamma=2``) as this parameter's type."""
        t = text.strip()
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
        return f"{self.name} ({TYPE_WORDS[self.type]}, default {self.default!r}{bounds}): {self.meaning}"
