"""LoRA work in the WebUI (issue 13): extract a LoRA from two checkpoints, merge LoRAs, into the LoRA folder.

One code path for the tab and the HTTP API: both send a request dict with the API's field names (``POST
/blockmerge/v1/lora/extract``, ``/lora/merge``) to :func:`extract` / :func:`merge`, which check every field, name
the files, call the engine (``lib_merge.lora``) and refresh the WebUI's LoRA list. Callers hold the queue lock.

Names, as everywhere in the tab and the API, are never paths: checkpoints are exact checkpoint-list aliases;
LoRA inputs are names from :func:`lora_names` (the files in the LoRA folder, relative to it, ``/`` between
subfolders, ``.safetensors`` optional), looked up in that listing and never joined to the folder, so a name
cannot reach a file outside it; an output is a bare file name placed directly in the LoRA folder. An existing
output is replaced only with ``overwrite`` (else :class:`Conflict`, HTTP 409).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import MergeError
from ..io.filesink import check_device
from ..lora.extract import OUT_DTYPES, extract_lora
from ..lora.merge import MergeInput, merge_loras
from . import host
from .names import output_path
from .params import flag
from .service import Conflict

EXTRACT_FIELDS = ("tuned", "base", "output", "rank", "energy", "conv_rank", "text_encoder", "dtype", "overwrite",
                  "device")
MERGE_FIELDS = ("loras", "output", "rank", "dtype", "overwrite")
LORA_ITEM_FIELDS = ("name", "ratio")
LORA_SUFFIX = ".safetensors"
DEFAULT_DTYPE = "fp16"  # issue 13: LoRA files are written in fp16 unless asked


# -- the LoRA folder ----------------------------------------------------------------------------------------------
def lora_files(folder: Path | None = None) -> dict[str, Path]:
    """Every ``.safetensors`` file under the LoRA folder: name (relative, ``/``-separated) -> path, sorted.
    Linked subfolders are followed as the WebUI's own LoRA list follows them (each real folder once: no loops);
    .pt/.ckpt LoRAs are left out (the engine never unpickles)."""
    base = Path(os.path.realpath(folder if folder is not None else host.lora_dir()))
    out: dict[str, Path] = {}
    if not base.is_dir():
        return out
    seen: set[str] = set()
    for root, dirs, files in os.walk(base, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        for f in files:
            if f.lower().endswith(LORA_SUFFIX) and not f.startswith("."):
                p = Path(root) / f
                out[p.relative_to(base).as_posix()] = p
    return dict(sorted(out.items()))


def lora_names() -> list[str]:
    """The names the tab's LoRA list shows and the API takes."""
    return list(lora_files())


def resolve_lora(name: Any, field: str, files: dict[str, Path]) -> Path:
    """A LoRA name from :func:`lora_names` (``.safetensors`` optional) -> its file; anything else is an error
    naming the field and the name."""
    if not isinstance(name, str) or not name.strip():
        raise MergeError(f"a LoRA name is required, {field}")
    n = name.strip()
    path = files.get(n) or files.get(n + LORA_SUFFIX)
    if path is None:
        raise MergeError(f"unknown LoRA {n!r} (use a name from the LoRA folder's list), {field}")
    return path


def output_in_lora_dir(output: Any, overwrite: bool) -> Path:
    """The output: a bare name placed directly in the LoRA folder (created if missing, as the WebUI does).
    An existing file without ``overwrite`` is a conflict."""
    folder = host.lora_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = output_path(output, folder)
    if out.exists() and not overwrite:
        raise Conflict(f"output exists in the LoRA folder (set overwrite to replace it), output: {out.name!r}")
    return out


# -- field checks (the API's names in every message) -------------------------------------------------------------
def check_fields(body: Any, allowed: tuple[str, ...], prefix: str = "") -> dict:
    """``body`` is an object with known fields only; ``prefix`` names where it sits (``loras[0].``)."""
    if not isinstance(body, dict):
        raise MergeError(f"must be a JSON object, {prefix.rstrip('.') or 'body'}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise MergeError(f"unknown field, {prefix}{unknown[0]}")
    return body


def whole(body: dict, name: str, low: int = 1) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if type(v) is not int:
        raise MergeError(f"{name} must be a whole number, {name}: {v!r}")
    if v < low:
        raise MergeError(f"{name} must be at least {low}, {name}: {v!r}")
    return v


def number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergeError(f"{field} must be a finite number, {field}: {value!r}")
    return float(value)


def out_dtype(body: dict) -> str:
    v = body.get("dtype") or DEFAULT_DTYPE
    if v not in OUT_DTYPES:
        *first, last = OUT_DTYPES
        raise MergeError(f"dtype must be {', '.join(first)} or {last}, dtype: {v!r}")
    return v


def merge_rank(body: dict) -> int | str | None:
    """``rank``: a whole number ≥ 1, ``"auto"``, or null (concatenate: the exact sum)."""
    v = body.get("rank")
    if v is None or v == "auto":
        return v
    if type(v) is not int or v < 1:
        raise MergeError(f"rank must be a whole number of at least 1, \"auto\" or null, rank: {v!r}")
    return v


def stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# -- operations -------------------------------------------------------------------------------------------------
Progress = Callable[[str], None]


def extract(body: dict, progress: Progress | None = None) -> dict:
    """``POST lora/extract``: ΔW = tuned − base of two listed checkpoints -> a LoRA file in the LoRA folder."""
    t0 = time.perf_counter()
    check_fields(body, EXTRACT_FIELDS)
    tuned = host.checkpoint_by_name(body.get("tuned"), "tuned")
    base = host.checkpoint_by_name(body.get("base"), "base")
    rank, conv_rank = whole(body, "rank"), whole(body, "conv_rank")
    energy = body.get("energy")
    if (rank is None) == (energy is None):
        raise MergeError("give exactly one of rank or energy, rank/energy")
    if energy is not None:
        energy = number(energy, "energy")
        if not 0.0 < energy <= 1.0:
            raise MergeError(f"energy must be in (0, 1], energy: {energy!r}")
    text_encoder = flag(body, "text_encoder")
    dtype = out_dtype(body)
    device = body.get("device", "cpu")
    if not isinstance(device, str):
        raise MergeError(f"device must be a device name like cpu or cuda, device: {device!r}")
    try:
        check_device(device)  # the SVD's device (the issue: "on the device the user chose")
    except MergeError as e:
        raise MergeError(str(e).replace("--device", "device")) from None
    overwrite = flag(body, "overwrite")
    out = output_in_lora_dir(body.get("output"), overwrite)
    if progress:
        progress("extracting LoRA")
    res = extract_lora(tuned.filename, base.filename, out, rank=rank, energy=energy, conv_rank=conv_rank,
                       text_encoder=text_encoder, dtype=dtype, device=device, overwrite=overwrite)
    listed = host.refresh_loras()
    return {"output": out.name, "path": str(out), "sha256": res.sha256, "arch": res.arch,
            "tuned": tuned.name, "base": base.name, "rank": rank, "energy": energy, "conv_rank": conv_rank,
            "ranks": stats([m.rank for m in res.modules]), "rel_error": stats([m.rel_error for m in res.modules]),
            "modules": [{"name": m.name, "rank": m.rank, "rel_error": m.rel_error, "method": m.method}
                        for m in res.modules],
            "unchanged": len(res.unchanged), "uncovered_text_encoder": res.uncovered_te,
            "summary": res.summary(), "lora_list_refreshed": listed,
            "seconds": round(time.perf_counter() - t0, 3)}


def merge_inputs(loras: Any, files: dict[str, Path]) -> list[MergeInput]:
    """``loras``: a non-empty list of ``{name, ratio}`` (ratio defaults to 1) -> the engine's inputs."""
    if not isinstance(loras, list) or not loras:
        raise MergeError("give at least one LoRA as a list of {name, ratio}, loras")
    out = []
    for i, item in enumerate(loras):
        where = f"loras[{i}]"
        check_fields(item, LORA_ITEM_FIELDS, where + ".")
        path = resolve_lora(item.get("name"), where + ".name", files)
        ratio = item.get("ratio")
        out.append(MergeInput(path, 1.0 if ratio is None else number(ratio, where + ".ratio")))
    return out


def merge(body: dict, progress: Progress | None = None) -> dict:
    """``POST lora/merge``: LoRAs of the LoRA folder at their ratios -> one LoRA file in the LoRA folder."""
    t0 = time.perf_counter()
    check_fields(body, MERGE_FIELDS)
    files = lora_files()
    inputs = merge_inputs(body.get("loras"), files)
    rank = merge_rank(body)
    dtype = out_dtype(body)
    overwrite = flag(body, "overwrite")
    out = output_in_lora_dir(body.get("output"), overwrite)
    if progress:
        progress("merging LoRAs")
    res = merge_loras(inputs, out, rank=rank, dtype=dtype, overwrite=overwrite)
    listed = host.refresh_loras()
    names = {p: n for n, p in files.items()}
    answer = {"output": out.name, "path": str(out), "sha256": res.sha256, "arch": res.arch,
              "loras": [{"name": names[i.path], "ratio": i.ratio} for i in inputs], "rank": rank,
              "ranks": stats([m.rank for m in res.modules]), "modules": len(res.modules),
              "left_out": len(res.left_out), "summary": res.summary(), "lora_list_refreshed": listed,
              "seconds": round(time.perf_counter() - t0, 3)}
    if rank is not None:
        answer["rel_error"] = stats([m.rel_error for m in res.modules])
    return answer
