"""Named block-weight presets: shipped TSV files (read-only) plus a user file.

Shipped: ``presets/sd1.tsv`` (26 values) and ``presets/sdxl.tsv`` (20 values), at the repository root and
installed as package data. User presets: ``presets/user.tsv`` inside the WebUI extension; for the CLI
``~/.config/blockmerge/user.tsv``; the environment variable ``BLOCKMERGE_PRESETS`` overrides either.
Lines are ``NAME<TAB>v1,v2,…`` (also ``NAME:values``); CRLF and values like ``1.`` are accepted.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .arch import ARCHS, ArchSpec
from .errors import MergeError
from .weights import parse_number, sd1_to_sdxl

LENGTH_FAMILY = {26: "sd1", 20: "sdxl"}
_NAME = re.compile(r"^[A-Za-z0-9_.*/+\-]+$")

_user_path_override: Path | None = None


def shipped_dir() -> Path:
    repo = Path(__file__).resolve().parent.parent / "presets"
    if (repo / "sd1.tsv").exists():
        return repo
    from importlib import resources
    return Path(str(resources.files("lib_merge") / "_presets"))


def set_user_presets_path(path: str | os.PathLike | None) -> None:
    """Used by the WebUI adapter: user presets live in the extension's ``presets/user.tsv``."""
    global _user_path_override
    _user_path_override = Path(path) if path else None


def user_presets_path() -> Path:
    env = os.environ.get("BLOCKMERGE_PRESETS")
    if env:
        return Path(env)
    if _user_path_override is not None:
        return _user_path_override
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "blockmerge" / "user.tsv"


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "sd1" (26 values) or "sdxl" (20 values)
    values: tuple[float, ...]
    source: str  # "shipped" | "user"


def parse_preset_text(text: str, origin: str, expect: int | None = None,
                      problems: list[str] | None = None) -> list[tuple[str, list[float]]]:
    """Parse preset lines. A malformed line is an error naming ``origin`` and the line number, unless
    ``problems`` is given: then the message goes there and the line is skipped (a user file with one bad line
    must not take the shipped presets down with it)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip().rstrip("\r")
        if not line or line.startswith("#") or line.lower().startswith("preset_name"):
            continue
        try:
            out.append(_parse_line(line, f"{origin} line {n}", expect))
        except MergeError as e:
            if problems is None:
                raise
            problems.append(f"{e}; line skipped")
    return out


def _parse_line(line: str, where: str, expect: int | None) -> tuple[str, list[float]]:
    if "\t" in line:
        name, _, vals = line.partition("\t")
    elif ":" in line:
        name, _, vals = line.partition(":")
    else:
        raise MergeError(f"preset line has no TAB or ':' between name and values, {where}")
    name = name.strip()
    tokens = [t.strip() for t in vals.replace(" ", "").split(",") if t.strip() != ""]
    if not name:
        raise MergeError(f"preset line has no name, {where}")
    lengths = (expect,) if expect else tuple(LENGTH_FAMILY)
    if len(tokens) not in lengths:
        want = " or ".join(str(x) for x in lengths)
        raise MergeError(f"preset {name} has {len(tokens)} values, expected {want}, {where}")
    return name, [parse_number(t, f"preset {name}, {where}") for t in tokens]


def _read_text(path: Path) -> str:
    """A presets file's text ("" when it does not exist: the user file is created on first save)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise MergeError(f"cannot read presets file: {e.strerror}, {path}") from None


def _read_file(path: Path, source: str, expect: int | None, problems: list[str] | None = None) -> list[Preset]:
    text = _read_text(path)
    parsed = parse_preset_text(text, str(path), expect, problems)
    return [Preset(n, LENGTH_FAMILY[len(v)], tuple(v), source) for n, v in parsed]


def load_all_checked() -> tuple[list[Preset], list[str]]:
    """Shipped presets (sd1, sdxl) then user presets, and the user file's skipped lines (one message each).

    Shipped files are strict (a bad line there is a packaging bug: error); a bad line in ``user.tsv`` is
    reported with its line number and skipped."""
    d = shipped_dir()
    problems: list[str] = []
    found = (_read_file(d / "sd1.tsv", "shipped", 26) + _read_file(d / "sdxl.tsv", "shipped", 20)
             + _read_file(user_presets_path(), "user", None, problems))
    return found, problems


def load_all() -> list[Preset]:
    """Shipped presets (sd1, sdxl) followed by user presets (which override shipped ones of the same name)."""
    return load_all_checked()[0]


def user_problems() -> list[str]:
    """One message per skipped line of the user presets file (empty when it is fine or absent)."""
    problems: list[str] = []
    _read_file(user_presets_path(), "user", None, problems)
    return problems


def table(family: str) -> dict[str, Preset]:
    """name -> preset for one family, user presets winning."""
    out: dict[str, Preset] = {}
    for p in load_all():
        if p.family == family:
            out[p.name] = p
    return out


def names(arch: ArchSpec | str = "sd1") -> list[str]:
    a = ARCHS[arch] if isinstance(arch, str) else arch
    n = list(table("sd1"))
    if a.name == "sdxl":
        n = list(table("sdxl")) + [x for x in n if x not in table("sdxl")]
    return n


@dataclass(frozen=True)
class Resolved:
    name: str  # the preset's own spelling (a name given in another case resolves to it)
    values: list[float]  # full vector for the architecture, BASE first
    converted: bool  # an SD1 preset converted to SDXL (no native one of that name)


def lookup(name: str, arch: ArchSpec) -> Resolved:
    """Resolve ``name`` for ``arch``: on SDXL a native 20-value preset of that name wins, otherwise the SD1
    preset is converted. An exact name wins; else a unique case-insensitive match is used."""
    key = name.strip()
    xl = table("sdxl") if arch.name == "sdxl" else {}
    sd1 = table("sd1")
    for match in (lambda tab: tab.get(key), lambda tab: _casefold_match(key, tab)):
        for tab, converted in ((xl, False), (sd1, arch.name == "sdxl")):
            found = match(tab)
            if found is not None:
                vals = list(found.values)
                return Resolved(found.name, sd1_to_sdxl(vals) if converted else vals, converted)
    close = difflib.get_close_matches(key.upper(), [n.upper() for n in {**sd1, **xl}], n=1)
    hint = ""
    if close:
        real = next(n for n in {**sd1, **xl} if n.upper() == close[0])
        hint = f" (did you mean {real}?)"
    raise MergeError(f"unknown preset, {key!r}{hint} (see `python -m lib_merge presets list`)")


def _casefold_match(key: str, tab: dict[str, Preset]) -> Preset | None:
    hits = [p for n, p in tab.items() if n.casefold() == key.casefold()]
    if len(hits) > 1:
        raise MergeError(f"preset name matches {', '.join(p.name for p in hits)} in different case: "
                         f"write it exactly, {key!r}")
    return hits[0] if hits else None


def resolve(name: str, arch: ArchSpec) -> list[float]:
    """The full block vector (BASE first) for ``name`` on ``arch`` (see :func:`lookup`)."""
    return lookup(name, arch).values


def find(name: str) -> list[Preset]:
    return [p for p in load_all() if p.name == name]


@dataclass(frozen=True)
class _Line:
    name: str | None  # None: a comment, a blank or a malformed line (kept verbatim)
    family: str | None
    raw: str


def _user_lines() -> list[_Line]:
    """The user file line by line. Rewriting keeps every line it does not replace as written, malformed ones
    included, so saving a preset never deletes what the user wrote (the skipped line stays for them to fix)."""
    path = user_presets_path()
    text = _read_text(path)
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        parsed = None
        if line and not line.startswith("#") and not line.lower().startswith("preset_name"):
            try:
                parsed = _parse_line(line, str(path), None)
            except MergeError:
                pass
        out.append(_Line(parsed[0], LENGTH_FAMILY[len(parsed[1])], raw) if parsed else _Line(None, None, raw))
    return out


def _write_user(lines: list[_Line]) -> None:
    path = user_presets_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line.raw + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def save_user_preset(name: str, values: list[float]) -> Path:
    """Add or replace a user preset. Shipped files are never written."""
    name = name.strip()
    if not name or not _NAME.match(name):
        raise MergeError(f"invalid preset name (letters, digits and _ . * / + - only), {name!r}")
    if len(values) not in LENGTH_FAMILY:
        raise MergeError(f"preset {name} has {len(values)} values, expected 26 or 20")
    fam = LENGTH_FAMILY[len(values)]
    lines = [ln for ln in _user_lines() if not (ln.name == name and ln.family == fam)]
    lines.append(_Line(name, fam, f"{name}\t{','.join(repr(float(v)) for v in values)}"))
    _write_user(lines)
    return user_presets_path()


def delete_user_preset(name: str) -> bool:
    """Delete a user preset; shipped presets cannot be deleted (error)."""
    lines = _user_lines()
    kept = [ln for ln in lines if ln.name != name]
    if len(kept) == len(lines):
        if any(p.name == name for p in load_all()):
            raise MergeError(f"shipped presets are read-only, {name}")
        raise MergeError(f"unknown preset, {name!r}")
    _write_user(kept)
    return True
