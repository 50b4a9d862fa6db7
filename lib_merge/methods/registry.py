"""Methods: how two tensors combine inside a mode (supermerger's "calculation mode"). Adding one is a single
decorated function that declares its formula, the modes it pairs with and its parameters.

A method function gets the fp32 scratch tensors ``a``, ``b``, ``c`` (as the mode's function does), the key's
final ratios, the declared parameters (defaults filled in), the key's name and, for seeded methods, the key's
seed (the recipe's seed plus a stable hash of the key name: ``Formula.key_seed``). ``linear`` has no function: it is each mode's own formula.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

from ..errors import MergeError
from ..options import choice_list
from .params import Param, check_declared

MethodFn = Callable[[Tensor, Optional[Tensor], Optional[Tensor], float, float, Mapping[str, Any], str, Optional[int]],
                    Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    formula: str
    modes: tuple[str, ...] | None  # the modes it combines with; None = every mode
    fn: MethodFn | None  # None: the mode's own formula (linear)
    elementwise: bool = True  # False: needs the whole tensor (a norm, a row range, a random draw)
    uses_beta: bool = False
    params: tuple[Param, ...] = ()
    keeps_a: Callable[[float, float], bool] | None = None  # True exactly where fn returns A untouched
    seeded: bool = False  # draws random numbers from the recipe's seed
    check_ratio: Callable[[float], Optional[str]] | None = None  # why a ratio is refused (alpha, beta if used)
    swaps: bool = False  # result(B, A, 1 - t) == result(A, B, t): --swap-ab keeps its meaning
    # statistics pass (cosine_a/b): the values one key contributes, from fp32 (A, B); the fn then gets the
    # reduced statistics (``stats.reduce_range``) as a ninth argument. None: no pass.
    stats: Callable[[Tensor, Tensor], Tensor] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def check_mode(self, mode: str) -> None:
        if self.modes is not None and mode not in self.modes:
            raise MergeError(f"method {self.name} works with mode {choice_list(self.modes)} only, not {mode}, "
                             f"--method {self.name}")

    def check_params(self, given: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """Every declared parameter with its value (given, else the default), in declaration order."""
        return check_declared(self.params, given, f"method {self.name}")


METHODS: dict[str, Method] = {}


def method(name: str, formula: str, modes: tuple[str, ...] | None, elementwise: bool = True,
           uses_beta: bool = False, params: tuple[Param, ...] = (),
           keeps_a: Callable[[float, float], bool] | None = None, seeded: bool = False,
           check_ratio: Callable[[float], Optional[str]] | None = None, swaps: bool = False,
           stats: Callable[[Tensor, Tensor], Tensor] | None = None):
    """Register a method under ``name``."""
    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(name, formula, modes, fn, elementwise, uses_beta, params, keeps_a, seeded,
                               check_ratio, swaps, stats)
        return fn
    return deco


def get_method(name: str) -> Method:
    m = METHODS.get(name)
    if m is None:
        raise MergeError(f"unknown method {name!r}, choose one of {', '.join(METHODS)}, --method")
    return m


METHODS["linear"] = Method("linear", "the mode's own formula", None, None, swaps=True)
