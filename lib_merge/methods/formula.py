"""A mode bound to a method and its parameter values: what the sinks compute for a key, and what a key's value
depends on (the live re-merge signature), derived from one place."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping

from torch import Tensor

from ..errors import MergeError
from .modes import Mode, get_mode
from .params import Param, check_declared
from .registry import Method, get_method

if TYPE_CHECKING:
    from ..plan import KeyPlan


@dataclass(frozen=True)
class Formula:
    mode: Mode
    method: Method
    params: tuple[tuple[str, Any], ...]  # every declared parameter of the mode and the method, defaults filled in
    seed: int | None = None
    n: int = 0  # how many models it reads (0: the mode's own count)
    stats: tuple | None = None  # the statistics pass's result (methods with ``stats``), set by ``with_stats``

    @property
    def name(self) -> str:
        return self.mode.name if self.method.fn is None else f"{self.mode.name}/{self.method.name}"

    @property
    def models(self) -> int:
        return self.n or self.mode.models

    @property
    def seeded(self) -> bool:
        return self.mode.seeded or self.method.seeded

    @property
    def uses_beta(self) -> bool:
        return self.mode.uses_beta or self.method.uses_beta

    @property
    def elementwise(self) -> bool:
        """May be computed chunk by chunk (else both sinks compute the whole tensor)."""
        return self.mode.elementwise and self.method.elementwise

    def ratio_problem(self, ratio: float) -> str | None:
        """Why a key's ratio (alpha, or beta where the formula reads it) is refused, else None."""
        for check in (self.mode.check_ratio, self.method.check_ratio):
            problem = check(ratio) if check is not None else None
            if problem:
                return problem
        return None

    def is_identity(self, alpha: float, beta: float) -> bool:
        """The result is A itself for these ratios: a live merge need not touch (or cache) the key."""
        if self.mode.models == 1:
            return True
        if self.method.fn is None:
            return self.mode.is_identity(alpha, beta)
        return self.method.keeps_a is not None and self.method.keeps_a(alpha, beta)

    def compute_all(self, tensors: list[Tensor], alpha: float, beta: float, key: str) -> Tensor:
        """The key's fp32 result from its inputs (A first), any number of them."""
        if self.mode.variadic:
            return self.mode.fn(tensors, alpha, beta, dict(self.params), key, self.key_seed(key))
        ins = list(tensors) + [None] * (3 - len(tensors))
        return self.compute(ins[0], ins[1], ins[2], alpha, beta, key)

    def compute(self, a: Tensor, b: Tensor | None, c: Tensor | None, alpha: float, beta: float, key: str) -> Tensor:
        if self.mode.variadic:
            return self.compute_all([t for t in (a, b, c) if t is not None], alpha, beta, key)
        if self.method.fn is None:
            return self.mode.fn(a, b, c, alpha, beta)
        if self.method.stats is not None:
            return self.method.fn(a, b, c, alpha, beta, dict(self.params), key, self.key_seed(key), self.stats)
        return self.method.fn(a, b, c, alpha, beta, dict(self.params), key, self.key_seed(key))

    def key_seed(self, key: str) -> int | None:
        """The seed of ``key``'s generator: the recipe's seed plus a stable hash of the key name (never
        Python's ``hash``, which changes per process), so draws depend on neither order nor threads."""
        if not self.seeded or self.seed is None:
            return None
        return (self.seed + zlib.crc32(key.encode("utf-8"))) % (1 << 63)

    def signature(self, kp: "KeyPlan", sources: tuple) -> tuple:
        """Everything the key's merged value depends on: the formula, its parameters, the key's seed, the
        statistics pass's numbers, the sources it reads, and the key plan's value fields (beta only where the
        formula reads it)."""
        values = tuple((f.name, getattr(kp, f.name)) for f in fields(kp) if f.metadata.get("value")
                       and (f.name != "beta" or self.uses_beta))
        return (self.mode.name, self.method.name, self.params, self.key_seed(kp.key), self.stats,
                sources[: self.models], values)


def declared(mode: Mode, method: Method) -> tuple[Param, ...]:
    """The parameters a mode bound to a method takes: the mode's, then the method's."""
    return mode.params + method.params


def owner(mode: Mode, method: Method) -> str:
    """How messages name what takes the parameters: "method slerp", "mode ties"."""
    return f"method {method.name}" if method.fn is not None or not mode.params else f"mode {mode.name}"


def params_for(mode: str, method: str) -> tuple[tuple[Param, ...], str]:
    """The parameters ``mode`` with ``method`` takes, and how messages name their owner."""
    m, meth = get_mode(mode), get_method(method)
    return declared(m, meth), owner(m, meth)


def bind(mode: str, method: str = "linear", params: Mapping[str, Any] | None = None,
         seed: int | None = None, models: int | None = None) -> Formula:
    """Check that ``method`` combines with ``mode``, that ``params`` are their declared ones and, given
    ``models`` (the count of inputs), that the mode takes that many; bind them."""
    m = get_mode(mode)
    meth = get_method(method)
    meth.check_mode(mode)
    values = check_declared(declared(m, meth), params or {}, owner(m, meth))
    if (m.seeded or meth.seeded) and seed is None:
        raise MergeError(f"{owner(m, meth)} draws random numbers: give a seed, --seed")
    if models is not None and m.check_models is not None:
        problem = m.check_models(dict(values), models)
        if problem:
            raise MergeError(f"mode {m.name}: {problem}")
    return Formula(m, meth, values, seed, models if m.variadic and models else 0)
