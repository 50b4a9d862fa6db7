"""Block-weight vectors: parsing weight strings, lengths per architecture, SD1 -> SDXL conversion."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .arch import SD1_BLOCKS, SDXL_BLOCKS, ArchSpec
from .dice import is_token
from .errors import MergeError

# Indices of the SD1 26-value vector kept for SDXL (BASE, IN00-IN08, M00, OUT00-OUT08), as supermerger.
SD1_TO_SDXL = [SD1_BLOCKS.index(b) for b in SDXL_BLOCKS]


def parse_number(token: str, what: str) -> float:
    t = token.strip()
    try:
        v = float(t)
    except ValueError:
        raise MergeError(f"not a number: {t!r}, {what}") from None
    if not math.isfinite(v):
        raise MergeError(f"not a finite number: {t!r}, {what}")
    return v


def split_values(text: str) -> list[str]:
    """Split a weight string on commas (spaces allowed around values, or as the only separator)."""
    text = text.strip()
    if "," in text:
        return [t.strip() for t in text.split(",")]
    return text.split()


def sd1_to_sdxl(values: list[float]) -> list[float]:
    return [values[i] for i in SD1_TO_SDXL]


def full_vector(values: list[float], arch: ArchSpec, base: float, what: str = "weights") -> list[float]:
    """Expand a 26/25 (SD1/SD2) or 20/19 (SDXL) vector to the architecture's full length (BASE first).

    25/19 values leave BASE out: BASE = ``base`` (alpha). A 26- or 25-value vector on SDXL converts as
    supermerger does (keep BASE, IN00-IN08, M00, OUT00-OUT08).
    """
    n = len(values)
    full = len(arch.blocks)
    if arch.name == "sdxl":
        if n == 26:
            return sd1_to_sdxl(values)
        if n == 25:
            return sd1_to_sdxl([base, *values])
        if n == 20:
            return list(values)
        if n == 19:
            return [base, *values]
        raise MergeError(f"{what} have {n} values; SDXL takes 20 (BASE first) or 19 (BASE = alpha), "
                         f"or an SD1 vector of 26/25")
    if n == full:
        return list(values)
    if n == full - 1:
        return [base, *values]
    raise MergeError(f"{what} have {n} values; {arch.label} takes {full} (BASE first) or {full - 1} (BASE = alpha)")


@dataclass(frozen=True)
class ParsedWeights:
    values: list[float]  # full vector, BASE first (0.0 where a random token stands)
    base_from_ratio: bool  # 25/19 values: BASE took the plain ratio (alpha or beta)
    converted_from: int | None  # 26 or 25 when an SD1 vector was converted to SDXL's 20
    tokens: dict[int, str] = field(default_factory=dict)  # full-vector index -> "R" | "U" | "X" (random_ok)


def parse_weights_info(text: str, arch: ArchSpec, base: float, what: str = "--weights",
                       random_ok: bool = False) -> ParsedWeights:
    """Parse a weight string and say how its length was read (for the plan's notes). With ``random_ok`` a value
    may be a random token (R, U, X: :mod:`lib_merge.dice`), returned in ``tokens`` for the plan to draw."""
    if ";" in text:
        raise MergeError(f"weights are separated by commas, not ';', {what}")
    tokens = split_values(text)
    if not tokens or tokens == [""]:
        raise MergeError(f"empty weight string, {what}")
    values: list[float | str] = []
    for i, t in enumerate(tokens):
        if t == "":
            raise MergeError(f"empty value at position {i + 1}, {what}")
        values.append(t if random_ok and is_token(t) else parse_number(t, f"{what} value {i + 1}" + (" (a number, R, U or X)" if random_ok else "")))
    n = len(values)
    full = full_vector(values, arch, base, what)
    converted = n if arch.name == "sdxl" and n in (26, 25) else None
    drawn = {i: v for i, v in enumerate(full) if isinstance(v, str)}
    numbers = [0.0 if isinstance(v, str) else v for v in full]
    return ParsedWeights(numbers, n in (len(arch.blocks) - 1, 25), converted, drawn)


def parse_weights(text: str, arch: ArchSpec, base: float, what: str = "--weights") -> list[float]:
    """Parse a weight string such as ``"0,1,1,…"`` into a full vector for ``arch``."""
    return parse_weights_info(text, arch, base, what).values


def format_vector(values: list[float]) -> str:
    return ",".join(_fmt(v) for v in values)


def _fmt(v: float) -> str:
    r = repr(float(v))
    return r[:-2] if r.endswith(".0") else r
