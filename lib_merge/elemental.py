"""Elemental rules in supermerger's grammar: ``Blocks:Elements:Ratio``.

One rule per line or comma. ``Blocks`` is a space-separated list of block IDs or ranges (``IN00-IN05``),
optionally led by ``NOT``; blank = every block. ``Elements`` is a space-separated list of substrings of the
key, optionally led by ``NOT``; blank = every key. The last matching rule wins. ``Ratio`` may be a random token
(R, U, X: :mod:`lib_merge.dice`), drawn once per matching key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .arch import SD1_BLOCKS, ArchSpec
from .dice import is_token
from .errors import MergeError
from .options import SUBTARGET_ELEMENTS, check_subtargets


@dataclass(frozen=True)
class Rule:
    blocks: frozenset[str] | None  # None = every block
    not_blocks: bool
    elements: tuple[str, ...] | None  # None = every key
    not_elements: bool
    ratio: float  # 0.0 where a random token stands
    text: str
    token: str | None = None  # "R" | "U" | "X": every matching key draws its own ratio (lib_merge.dice)

    def matches(self, key: str, block: str) -> bool:
        if self.blocks is not None and ((block in self.blocks) == self.not_blocks):
            return False
        if self.elements is not None:
            hit = any(e in key for e in self.elements)
            if hit == self.not_elements:
                return False
        return True


def _expand_block(token: str, arch: ArchSpec, rule: str) -> list[str]:
    names = arch.blocks
    parts = token.split("-")
    for p in parts:
        if p not in names:
            if arch.name == "sdxl" and p in SD1_BLOCKS:
                raise MergeError(f"block {p} does not exist on SDXL (IN00-IN08, M00, OUT00-OUT08), "
                                 f"elemental rule {rule!r}")
            raise MergeError(f"unknown block {p!r}, elemental rule {rule!r}")
    if len(parts) == 1:
        return parts
    if len(parts) != 2:
        raise MergeError(f"bad block range {token!r}, elemental rule {rule!r}")
    i, j = names.index(parts[0]), names.index(parts[1])
    if i > j:
        raise MergeError(f"reversed block range {token!r} (write {parts[1]}-{parts[0]}), elemental rule {rule!r}")
    return list(names[i:j + 1])


def _split_not(field: str) -> tuple[bool, list[str]]:
    tokens = field.split()
    if tokens and tokens[0].upper() == "NOT":
        return True, tokens[1:]
    return False, tokens


def parse_rule(text: str, arch: ArchSpec) -> Rule:
    raw = text.strip()
    if raw.count(":") != 2:
        raise MergeError(f"elemental rule needs exactly two ':' (Blocks:Elements:Ratio), {raw!r}")
    bfield, efield, rfield = (f.strip() for f in raw.split(":"))
    not_b, btoks = _split_not(bfield)
    blocks: set[str] | None = None
    if btoks:
        blocks = set()
        for t in btoks:
            blocks.update(_expand_block(t.upper(), arch, raw))
    elif not_b:
        raise MergeError(f"NOT with no blocks, elemental rule {raw!r}")
    not_e, etoks = _split_not(efield)
    if not_e and not etoks:
        raise MergeError(f"NOT with no elements, elemental rule {raw!r}")
    r = rfield.strip()
    blocks_or_none = frozenset(blocks) if blocks is not None else None
    elements = tuple(etoks) if etoks else None
    if is_token(r):
        return Rule(blocks_or_none, not_b, elements, not_e, 0.0, raw, r)
    try:
        ratio = float(r)
    except ValueError:
        raise MergeError(f"ratio {r!r} is not a number (nor R, U, X), elemental rule {raw!r}") from None
    if not math.isfinite(ratio):
        raise MergeError(f"ratio {r!r} is not a finite number, elemental rule {raw!r}")
    return Rule(blocks_or_none, not_b, elements, not_e, ratio, raw)


def parse_rules(text: str | None, arch: ArchSpec) -> list[Rule]:
    if not text:
        return []
    rules = []
    for line in text.replace("\r", "\n").split("\n"):
        for entry in line.split(","):
            if entry.strip():
                rules.append(parse_rule(entry, arch))
    return rules


Draw = Callable[[int, Rule, str, str], float]  # (rule index, rule, key, block) -> the drawn ratio


def apply_rules(rules: list[Rule], key: str, block: str, ratio: float, hits: set[int] | None = None,
                draw: Draw | None = None) -> float:
    """The ratio after the rules: the last matching rule wins. ``hits`` collects the indices of the rules
    that matched (so the plan can say which rule matches no key: usually a typo in an element). A rule with a
    random token asks ``draw`` for its ratio (the plan's :class:`lib_merge.dice.Dice`)."""
    for i, r in enumerate(rules):
        if r.matches(key, block):
            if r.token is not None:
                if draw is None:
                    raise MergeError(f"random ratio {r.token} needs a seed (a merge draws one), "
                                     f"elemental rule {r.text!r}")
                ratio = draw(i, r, key, block)
            else:
                ratio = r.ratio
            if hits is not None:
                hits.add(i)
    return ratio


def subtarget_rule(subtargets: list[str], ratio: float) -> str | None:
    """The elemental rule equivalent to sub-target selectors: keys outside them get ``ratio``.

    ``attn1`` -> ``attn1``, ``attn2`` -> ``attn2``, ``ff`` -> ``ff.net``; ``all`` (or nothing) -> no rule.
    """
    chosen = [s for s in check_subtargets(subtargets) if s != "all"]
    if not chosen or "all" in subtargets:
        return None
    return f":NOT {' '.join(SUBTARGET_ELEMENTS[s] for s in chosen)}:{ratio!r}"
