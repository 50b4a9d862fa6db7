"""A merge as a value: the recipe that can be printed, stored in metadata, compared and re-run."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import MergeError
from .modes import get_mode
from .options import DTYPE_CHOICES, VAE_CHOICES, check_choice, check_exclusive

RECIPE_VERSION = 1


@dataclass
class Recipe:
    models: list[str] = field(default_factory=list)  # paths of A, B, C (as many as the mode takes)
    mode: str = "weighted_sum"
    alpha: float = 0.5
    beta: float = 0.25
    weights: str | None = None
    weights_beta: str | None = None
    preset: str | None = None
    preset_beta: str | None = None
    elemental: str | None = None
    dtype: str = "keep"
    vae: str = "merge"
    bake_vae: str | None = None
    prune: bool = False
    include: str | None = None
    exclude: str | None = None
    force: bool = False
    copy_b_only: bool = False
    swap_ab: bool = False
    supermerger_time_embed_out11: bool = False  # SD1/SD2 time_embed takes OUT11's ratio (supermerger 2023-07..2025-11)

    def validate(self) -> None:
        m = get_mode(self.mode)
        if len(self.models) != m.models:
            names = "A" if m.models == 1 else "A B" if m.models == 2 else "A B C"
            raise MergeError(f"mode {self.mode} takes {m.models} model{'s' if m.models > 1 else ''} ({names}), "
                             f"got {len(self.models)}")
        check_choice("dtype", self.dtype, DTYPE_CHOICES)
        check_choice("vae", self.vae, VAE_CHOICES)
        if self.vae == "b" and m.models < 2:
            raise MergeError("--vae b needs a model B, --vae")
        check_exclusive(vars(self))
        if self.swap_ab and self.mode not in ("weighted_sum", "sigmoid", "inv_sigmoid"):
            raise MergeError(f"--swap-ab works with weighted_sum, sigmoid and inv_sigmoid only, not {self.mode}")
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                raise MergeError(f"{name} must be a finite number, {v!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = RECIPE_VERSION
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise MergeError(f"recipe must be an object, {origin}")
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise MergeError(f"unsupported recipe version {version!r}, {origin}")
        known = {f.name for f in fields(cls)}
        unknown = [k for k in data if k not in known and k not in ("version", "resolved", "inputs")]
        if unknown:
            raise MergeError(f"unknown recipe field {unknown[0]!r}, {origin}")
        kw = {k: v for k, v in data.items() if k in known}
        kw["models"] = _model_entries(kw.get("models", []), origin)
        r = cls(**kw)
        r.alpha = float(r.alpha)
        r.beta = float(r.beta)
        return r


def _model_entries(models: Any, origin: str) -> list[str]:
    """``models`` as paths or file names: strings (a merged file records bare file names, older ones absolute
    paths), or objects with a ``name`` or ``path`` string."""
    if not isinstance(models, list):
        raise MergeError(f"recipe field models must be a list of file names, {origin}")
    out = []
    for m in models:
        if isinstance(m, dict):
            m = m.get("path", m.get("name"))
        if not isinstance(m, str) or not m:
            raise MergeError(f"recipe field models has an entry that is not a file name: {m!r}, {origin}")
        out.append(m)
    return out


def load_recipe_file(path: str | Path) -> Recipe:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise MergeError(f"cannot read recipe: {e.strerror}, {p}") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise MergeError(f"reading YAML recipes needs PyYAML (pip install pyyaml), {p}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MergeError(f"recipe is not valid YAML ({str(e).splitlines()[0]}), {p}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MergeError(f"recipe is not valid JSON ({e.msg} at line {e.lineno}), {p}") from None
    return Recipe.from_dict(data, str(p))
