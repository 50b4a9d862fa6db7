"""Merge modes: the formula across models. Adding one is a single decorated function.

A mode function gets fp32 tensors ``a``, ``b``, ``c`` (``None`` when the mode takes fewer models) and the
key's final ratios ``alpha`` and ``beta``. A variadic mode (any number of models, A the base: task arithmetic,
TIES, …) gets the list of tensors, the ratios, its declared parameters, the key and the key's seed instead
(``methods/taskvec.py``). The inputs are scratch buffers owned by the engine: a function may
overwrite them and return one of them; a mode declared ``streams`` instead gets the inputs in their own dtype,
never writes them and returns a new fp32 tensor (``methods/streamed.py``). Shortcuts (ratio 0 or 1) live here so that file merges and live
merges give the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

from ..errors import MergeError
from .params import Param

ModeFn = Callable[[Tensor, Optional[Tensor], Optional[Tensor], float, float], Tensor]
VariadicFn = Callable[[list[Tensor], float, float, Mapping[str, Any], str, Optional[int]], Tensor]


@dataclass(frozen=True)
class Mode:
    name: str
    models: int  # how many models it takes (A, B, C); a variadic mode: the fewest
    uses_beta: bool
    elementwise: bool  # may be computed chunk by chunk
    formula: str
    fn: ModeFn | VariadicFn
    check_ratio: Callable[[float], Optional[str]] | None = None
    keeps_a: Callable[[float, float], bool] | None = None  # True where fn returns A untouched (its shortcut)
    variadic: bool = False  # takes ``models`` or more models, the tensors as a list
    params: tuple[Param, ...] = ()  # declared parameters (variadic modes)
    seeded: bool = False  # draws random numbers from the recipe's seed
    per_key_ratio: bool = True  # False: alpha is not read, so block weights and elemental rules are refused
    check_models: Callable[[Mapping[str, Any], int], Optional[str]] | None = None  # params vs the model count
    streams: bool = False  # fn reads its inputs in their own dtype, never writes them, returns a new fp32 tensor

    def is_identity(self, alpha: float, beta: float) -> bool:
        """The result is A itself for these ratios: a live merge need not touch (or cache) the key."""
        return self.models == 1 or (self.keeps_a is not None and self.keeps_a(alpha, beta))

    def takes(self, n: int) -> bool:
        """``n`` models are what this mode takes."""
        return n >= self.models if self.variadic else n == self.models

    def models_text(self) -> str:
        """"A B", "A B C", or "A B [C …]" for a variadic mode."""
        from ..roles import labels
        return f"{labels(self.models)} [{'C' if self.models == 2 else 'D'} …]" if self.variadic else labels(self.models)


MODES: dict[str, Mode] = {}


def mode(name: str, models: int, formula: str, uses_beta: bool = False, elementwise: bool = True,
         check_ratio: Callable[[float], Optional[str]] | None = None,
         keeps_a: Callable[[float, float], bool] | None = None):
    """Register a merge mode under ``name``. ``keeps_a(alpha, beta)`` must be True exactly where the function
    returns its ``a`` input unchanged."""
    def deco(fn: ModeFn) -> ModeFn:
        MODES[name] = Mode(name, models, uses_beta, elementwise, formula, fn, check_ratio, keeps_a)
        return fn
    return deco


def variadic_mode(name: str, models: int, formula: str, params: tuple[Param, ...] = (), elementwise: bool = False,
                  seeded: bool = False, per_key_ratio: bool = True,
                  check_models: Callable[[Mapping[str, Any], int], Optional[str]] | None = None,
                  streams: bool = False):
    """Register a mode over any number (``models`` or more) of models, A the base. Its function returns A
    untouched when alpha is 0 (unless it reads no per-key ratio)."""
    def deco(fn: VariadicFn) -> VariadicFn:
        keeps = _alpha_zero if per_key_ratio else None
        MODES[name] = Mode(name, models, False, elementwise, formula, fn, None, keeps, True, params, seeded,
                           per_key_ratio, check_models, streams)
        return fn
    return deco


def get_mode(name: str) -> Mode:
    m = MODES.get(name)
    if m is None:
        raise MergeError(f"unknown mode {name!r}, choose one of {', '.join(MODES)}")
    return m


def _lerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    if t == 0.0:
        return a
    if t == 1.0:
        return b
    return a.lerp_(b, t)


@mode("no_interpolation", 1, "A")
def no_interpolation(a, b, c, alpha, beta):
    return a


def _alpha_zero(alpha: float, beta: float) -> bool:
    return alpha == 0.0


def _both_zero(alpha: float, beta: float) -> bool:
    return alpha == 0.0 and beta == 0.0


@mode("weighted_sum", 2, "(1 - alpha) * A + alpha * B", keeps_a=_alpha_zero)
def weighted_sum(a, b, c, alpha, beta):
    return _lerp(a, b, alpha)


@mode("add_difference", 3, "A + alpha * (B - C)", keeps_a=_alpha_zero)
def add_difference(a, b, c, alpha, beta):
    if alpha == 0.0:
        return a
    return a.add_(b.sub_(c), alpha=alpha)


@mode("triple_sum", 3, "(1 - alpha - beta) * A + alpha * B + beta * C", uses_beta=True, keeps_a=_both_zero)
def triple_sum(a, b, c, alpha, beta):
    if alpha == 0.0 and beta == 0.0:
        return a
    out = a.mul_(1.0 - alpha - beta)
    out.add_(b, alpha=alpha)
    return out.add_(c, alpha=beta)


@mode("sum_twice", 3, "(1 - beta) * ((1 - alpha) * A + alpha * B) + beta * C", uses_beta=True,
      keeps_a=_both_zero)
def sum_twice(a, b, c, alpha, beta):
    return _lerp(_lerp(a, b, alpha), c, beta)


def _unit_check(t: float) -> str | None:
    return None if 0.0 <= t <= 1.0 else f"ratio {t} is outside [0, 1]"


def sigmoid_ratio(t: float) -> float:
    return t * t * (3.0 - 2.0 * t)


def inv_sigmoid_ratio(t: float) -> float:
    if t in (0.0, 1.0):
        return t  # exact at the ends (the formula gives 5.6e-17 at 0)
    return 0.5 - math.sin(math.asin(1.0 - 2.0 * t) / 3.0)


@mode("sigmoid", 2, "A + (B - A) * t', t' = t²(3 - 2t)", keeps_a=lambda alpha, beta: sigmoid_ratio(alpha) == 0.0)
def sigmoid(a, b, c, alpha, beta):
    return _lerp(a, b, sigmoid_ratio(alpha))


@mode("inv_sigmoid", 2, "A + (B - A) * t', t' = 0.5 - sin(asin(1 - 2t) / 3)", check_ratio=_unit_check,
      keeps_a=lambda alpha, beta: inv_sigmoid_ratio(alpha) == 0.0)
def inv_sigmoid(a, b, c, alpha, beta):
    return _lerp(a, b, inv_sigmoid_ratio(alpha))
