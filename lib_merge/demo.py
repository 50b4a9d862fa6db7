"""``demo``: two small checkpoints with the real SD1.5 key layout, merged with a preset, then inspected."""
from __future__ import annotations

import tempfile
from pathlib import Path

from . import synthetic
from .inspection import format_summary, summarize
from .merge import merge_to_file, normalize_recipe
from .recipe import Recipe


def run_demo(parent: str | None = None, preset: str = "GRAD_V") -> Path:
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="blockmerge-demo-", dir=parent))
    listing = synthetic.tiny(synthetic.load_listing("sd15"))
    a = synthetic.write_checkpoint(folder / "demoA.safetensors", listing, seed=1)
    b = synthetic.write_checkpoint(folder / "demoB.safetensors", listing, seed=2)
    print(f"built {a.name} and {b.name} ({len(listing)} keys each, real SD1.5 key names, tiny shapes) in {folder}")
    recipe = normalize_recipe(Recipe(models=[str(a), str(b)], mode="weighted_sum", preset=preset))
    out = folder / "demo-merged.safetensors"
    res = merge_to_file(recipe, out)
    print(f"merged with preset {preset} -> {out.name} in {res.seconds:.2f} s, sha256 {res.sha256[:10]}")
    for line in res.plan.report.lines():
        print(f"note: {line}")
    print()
    print(format_summary(summarize(out)))
    print()
    print(f"try: python -m lib_merge inspect {out}")
    return out
