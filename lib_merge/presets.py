"""Named block-weight presets: shipped TSV files (read-only) plus a user file.

Shipped: ``presets/sd1.tsv`` (26 values) and ``presets/sdxl.tsv`` (20 values), at the repository root and
installed as package data. User presets: ``presets/user.tsv`` inside the WebUI extension; for the CLI
``~/.config/blockmerge/user.tsv``; the environment variable ``BLOCKMERGE_PRESETS`` overrides either.
Lines are ``NAME<TAB>v1,v2,…`` (also ``NAME:values``); CRLF and values like ``1.`` are accepted.
"""
from __future__ import annotations

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


def parse_preset_text(text: str, origin: str, expect: int | None = None) -> list[tuple[str, list[float]]]:
    """Parse preset lines; a malformed line is an error naming ``origin`` and the line number."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip().rstrip("\r")
        if not line or line.startswith("#") or line.lower().startswith("preset_name"):
            continue
        if "\t" in line:
            name, _, vals = line.partition("\t")
        elif ":" in line:
            name, _, vals = line.partition(":")
        else:
            raise MergeError(f"preset line has no TAB or ':' between name and values, {origin} line {n}")
        name = name.strip()
        tokens = [t.strip() for t in vals.replace(" ", "").split(",") if t.strip() != ""]
        if not name:
            raise MergeError(f"preset line has no name, {origin} line {n}")
        lengths = (expect,) if expect else tuple(LENGTH_FAMILY)
        if len(tokens) not in lengths:
            want = " or ".join(str(x) for x in lengths)
            raise MergeError(f"preset {name} has {len(tokens)} values, expected {want}, {origin} line {n}")
        values = [parse_number(t, f"preset {name}, {origin} line {n}") for t in tokens]
        out.append((name, values))
    return out


def _read_file(path: Path, source: str, expect: int | None) -> list[Preset]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise MergeError(f"cannot read presets file: {e.strerror}, {path}") from None
    return [Preset(n, LENGTH_FAMILY[len(v)], tuple(v), source) for n, v in parse_preset_text(text, str(path), expect)]


def load_all() -> list[Preset]:
    """Shipped presets (sd1, sdxl) followed by user presets (which override shipped ones of the same name)."""
    d = shipped_dir()
    return (_read_file(d / "sd1.tsv", "shipped", 26) + _read_file(d / "sdxl.tsv", "shipped", 20)
            + _read_file(user_presets_path(), "user", None))


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


def resolve(name: str, arch: ArchSpec) -> list[float]:
    """The full block vector (BASE first) for ``name`` on ``arch``.

    On SDXL a native 20-value preset of that name wins; otherwise the SD1 preset is converted.
    """
    key = name.strip()
    if arch.name == "sdxl":
        xl = table("sdxl")
        if key in xl:
            return list(xl[key].values)
    sd1 = table("sd1")
    if key in sd1:
        vals = list(sd1[key].values)
        return sd1_to_sdxl(vals) if arch.name == "sdxl" else vals
    raise MergeError(f"unknown preset, {key!r} (see `python -m lib_merge presets list`)")


def find(name: str) -> list[Preset]:
    return [p for p in load_all() if p.name == name]


def _write_user(presets: list[tuple[str, list[float]]]) -> None:
    path = user_presets_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{n}\t{','.join(repr(float(v)) for v in vals)}\n" for n, vals in presets), encoding="utf-8")
    os.replace(tmp, path)


def save_user_preset(name: str, values: list[float]) -> Path:
    """Add or replace a user preset. Shipped files are never written."""
    name = name.strip()
    if not name or not _NAME.match(name):
        raise MergeError(f"invalid preset name (letters, digits and _ . * / + - only), {name!r}")
    if len(values) not in LENGTH_FAMILY:
        raise MergeError(f"preset {name} has {len(values)} values, expected 26 or 20")
    existing = [(p.name, list(p.values)) for p in _read_file(user_presets_path(), "user", None)]
    fam = LENGTH_FAMILY[len(values)]
    existing = [(n, v) for n, v in existing if not (n == name and LENGTH_FAMILY[len(v)] == fam)]
    existing.append((name, list(values)))
    _write_user(existing)
    return user_presets_path()


def delete_user_preset(name: str) -> bool:
    """Delete a user preset; shipped presets cannot be deleted (error)."""
    existing = [(p.name, list(p.values)) for p in _read_file(user_presets_path(), "user", None)]
    kept = [(n, v) for n, v in existing if n != name]
    if len(kept) == len(existing):
        if any(p.name == name for p in load_all()):
            raise MergeError(f"shipped presets are read-only, {name}")
        raise MergeError(f"unknown preset, {name!r}")
    _write_user(kept)
    return True
