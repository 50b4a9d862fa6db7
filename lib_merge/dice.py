"""Random ratios (supermerger's "Let the Dice roll"): ``R``, ``U`` and ``X`` tokens in block weights and in
elemental rules.

Block weights (one draw per block): ``R`` = U[0, 1], ``U`` = U[-0.5, 1.5] (1.5 - 2r), ``X`` = U[lower, upper] with
that block's bounds from ``random_lower`` / ``random_upper``. Elemental rules (one draw per key the rule matches,
as supermerger's per-element random): ``R`` = U[0, 1], ``U`` = U[-1, 1] (1 - 2r, supermerger's elemental U),
``X`` = U[lower, upper] with the bounds of the key's block.

Every number comes from its own CPU ``random.Random`` seeded by the text ``"<seed>/<what>/<where>"`` (the vector
and the block, or the rule's position and the key). So a drawn value does not depend on the other tokens, the
key order, threads, device or machine: Python guarantees ``random()`` for a given seed across versions.
"""
from __future__ import annotations

import math
import random
import secrets
from dataclasses import dataclass, field

from .arch import ArchSpec
from .errors import MergeError

TOKENS = ("R", "U", "X")
SEED_LIMIT = 2 ** 63  # seeds are 0 .. 2**63 - 1 (fits every generator a seeded method may use)


def is_token(text: str) -> bool:
    """Upper case only, as supermerger writes them (a stray ``x`` stays a typo, not a random ratio)."""
    return text.strip() in TOKENS


def draw_seed() -> int:
    """A fresh seed for a recipe that asks for random ratios without one (recorded, so it can be re-run)."""
    return secrets.randbelow(2 ** 31)


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise MergeError(f"seed must be 0 .. 2**63-1 (leave it out to draw one), seed: {seed}")


def unit(seed: int, *where: str) -> float:
    """The uniform [0, 1) number for one place (see the module doc)."""
    return random.Random("/".join((str(seed), *where))).random()


def block_value(token: str, r: float, lower: float, upper: float) -> float:
    if token == "R":
        return r
    if token == "U":
        return 1.5 - 2.0 * r
    return lower + (upper - lower) * r


def element_value(token: str, r: float, lower: float, upper: float) -> float:
    if token == "U":
        return 1.0 - 2.0 * r
    return block_value(token, r, lower, upper)


def parse_bounds(text: str | None, arch: ArchSpec, what: str) -> list[float] | None:
    """A bounds vector in the forms block weights take (26/20 values BASE first, 25/19 without BASE: then the
    BASE bound is missing and an ``X`` at BASE is an error)."""
    from .weights import full_vector, parse_number, split_values
    if not text or not text.strip():
        return None
    tokens = split_values(text)
    values = [parse_number(t, f"{what} value {i + 1}") for i, t in enumerate(tokens)]
    return full_vector(values, arch, math.nan, what)


@dataclass
class Dice:
    """The seed, the X bounds, and a record of every number drawn (stored in the output's metadata)."""
    seed: int
    blocks: tuple[str, ...]
    lower: list[float] | None = None
    upper: list[float] | None = None
    drawn: dict = field(default_factory=dict)
    x_used: bool = False

    def _bounds(self, token: str, index: int, where: str) -> tuple[float, float]:
        if token != "X":
            return 0.0, 0.0
        self.x_used = True
        if self.lower is None or self.upper is None:
            missing = "--random-lower" if self.lower is None else "--random-upper"
            raise MergeError(f"X needs --random-lower and --random-upper vectors (missing {missing}), {where}")
        lo, hi = self.lower[index], self.upper[index]
        block = self.blocks[index]
        if math.isnan(lo) or math.isnan(hi):
            raise MergeError(f"X at BASE needs BASE bounds (the bounds vectors leave BASE out), {where}")
        if lo > hi:
            raise MergeError(f"random lower bound {lo:g} is above the upper bound {hi:g} at block {block}, {where}")
        return lo, hi

    def block(self, vector: str, token: str, index: int) -> float:
        """The value of block ``index`` of the ``vector`` ("alpha"/"beta") weights."""
        name = self.blocks[index]
        lo, hi = self._bounds(token, index, f"{vector} weights block {name}")
        v = block_value(token, unit(self.seed, vector, name), lo, hi)
        self.drawn.setdefault(vector, {})[name] = v
        return v

    def element(self, rule_index: int, rule_text: str, token: str, key: str, block: str) -> float:
        """The value elemental rule number ``rule_index`` gives ``key`` (one draw per key)."""
        lo, hi = self._bounds(token, self.blocks.index(block), f"elemental rule {rule_text!r}")
        v = element_value(token, unit(self.seed, "elemental", str(rule_index), key), lo, hi)
        entry = self.drawn.setdefault("elemental", {}).setdefault(str(rule_index), {"rule": rule_text, "values": {}})
        entry["values"][key] = v
        return v

    def record(self) -> dict:
        """What the metadata keeps: the seed and every drawn number, by vector and block or by rule and key."""
        return {"seed": self.seed, **self.drawn}
