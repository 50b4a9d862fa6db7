"""``inspect``: what a checkpoint is, without reading its tensors."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .arch import block_of, detect, part_of
from .errors import MergeError
from .io.diffusers.files import folder_bytes
from .io.sources import open_source
from .methods import params_for


def summarize(path: str | Path) -> dict:
    with open_source(path) as src:
        infos = src.infos
        size = src.path.stat().st_size if src.path.is_file() else folder_bytes(src.path)
        summary: dict = {"file": str(src.path), "size_bytes": size, "keys": len(infos),
                         "dtypes": dict(Counter(i.dtype for i in infos.values()).most_common())}
        try:
            det = detect(src.shapes(), str(src.path))
            summary["architecture"] = det.arch.name
            summary["architecture_label"] = det.arch.label
            summary["variant"] = det.variant
            summary["evidence"] = det.evidence
            arch = det.arch
        except MergeError as e:
            summary["architecture"] = None
            summary["architecture_error"] = str(e)
            arch = None
        parts: Counter = Counter()
        params_by_part: Counter = Counter()
        blocks: Counter = Counter()
        for k, i in infos.items():
            p = part_of(k)
            parts[p] += 1
            params_by_part[p] += i.numel
            if arch is not None and p != "vae":
                blocks[block_of(k, arch)] += i.numel
        summary["parts"] = {p: {"keys": parts[p], "params": params_by_part[p]} for p in ("unet", "te", "vae", "other") if parts[p]}
        if arch is not None:
            summary["block_params"] = {b: blocks.get(b, 0) for b in arch.blocks}
        summary["metadata"] = dict(src.metadata)
        merge = merge_summary(src.metadata.get("blockmerge_recipe"))
        if merge:
            summary["merge"] = merge
    return summary


def merge_summary(recipe_json: str | None) -> dict | None:
    """How a BlockMerge output was made, read through the mode's and method's declarations: every declared
    parameter with its value (given, else the default). None for files without a BlockMerge recipe."""
    try:
        data = json.loads(recipe_json) if recipe_json else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    out = {k: data.get(k) for k in ("mode", "method", "alpha", "seed", "adjust", "lora") if data.get(k) is not None}
    out["models"] = data.get("models") or []
    try:
        declared, _ = params_for(data.get("mode") or "weighted_sum", data.get("method") or "linear")
        given = data.get("params") or {}
        out["params"] = {p.name: given.get(p.name, p.default) for p in declared}
        out["defaults"] = sorted(p.name for p in declared if p.name not in given)
    except MergeError:  # a mode or method this version does not know: show what the file says
        out["params"] = data.get("params") or {}
    return out


def model_text(m, depth: int = 0) -> str:
    """A recorded model: its file name, or a nested step as ``[mode method alpha: A, B]`` (a merge chain)."""
    inner = m.get("recipe") if isinstance(m, dict) else None
    if not isinstance(inner, dict):
        return str(m)
    if depth >= 16:
        return "[…]"
    models = inner.get("models") if isinstance(inner.get("models"), list) else []
    how = " ".join(str(inner[k]) for k in ("mode", "method") if inner.get(k)) or "weighted_sum"
    ratio = f" {inner['preset']}" if inner.get("preset") else (f" alpha {inner['alpha']}" if "alpha" in inner else "")
    return f"[{how}{ratio}: {', '.join(model_text(x, depth + 1) for x in models)}]"


def _lora_text(e) -> str:
    """``style.safetensors:0.8:OUTALL``, as ``--lora`` takes it."""
    if not isinstance(e, dict):
        return str(e)
    blocks = e.get("blocks")
    if isinstance(blocks, list):
        blocks = ",".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in blocks)
    return f"{e.get('path')}:{e.get('strength')}" + (f":{blocks}" if blocks else "")


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}T"


def format_summary(s: dict) -> str:
    lines = [f"file:         {s['file']}", f"size:         {s['size_bytes'] / 1e9:.3f} GB ({s['size_bytes']} bytes)"]
    if s.get("architecture"):
        lines.append(f"architecture: {s['architecture_label']} ({s['variant']})")
    else:
        lines.append(f"architecture: unknown ({s.get('architecture_error')})")
    lines.append(f"keys:         {s['keys']}  dtypes: " + ", ".join(f"{d} {n}" for d, n in s["dtypes"].items()))
    lines.append("parts:        " + ", ".join(f"{p} {v['keys']} keys / {_human(v['params'])} params" for p, v in s["parts"].items()))
    if "block_params" in s:
        bp = s["block_params"]
        total = sum(bp.values()) or 1
        lines.append("blocks (params, UNet + text encoder):")
        row = []
        for i, (b, n) in enumerate(bp.items()):
            row.append(f"{b:>5} {_human(n):>7} {100 * n / total:4.1f}%")
            if len(row) == 4:
                lines.append("  " + "   ".join(row))
                row = []
        if row:
            lines.append("  " + "   ".join(row))
    merge = s.get("merge")
    if merge:
        params = ", ".join(f"{k}={v}" + (" (default)" if k in merge.get("defaults", ()) else "")
                           for k, v in merge["params"].items())
        lines.append(f"merged with:  {merge.get('mode')} / {merge.get('method') or 'linear'}, alpha "
                     f"{merge.get('alpha')}" + (f", {params}" if params else "")
                     + (f", seed {merge['seed']}" if "seed" in merge else "")
                     + (f", adjust {merge['adjust']}" if "adjust" in merge else ""))
        lines.append(f"models:       {', '.join(model_text(m) for m in merge['models'])}")
        if isinstance(merge.get("lora"), list):
            lines.append("LoRAs:        " + ", ".join(_lora_text(e) for e in merge["lora"]))
    meta = s.get("metadata") or {}
    if meta:
        lines.append("metadata:")
        for k, v in meta.items():
            v = v if len(v) <= 100 else v[:97] + "..."
            lines.append(f"  {k}: {v}")
    else:
        lines.append("metadata:     (none)")
    return "\n".join(lines)


def to_json(s: dict) -> str:
    return json.dumps(s, indent=2)
