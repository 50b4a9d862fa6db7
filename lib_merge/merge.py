"""File merges end to end: sources -> ratio plan -> mode -> streamed safetensors file."""
from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from . import hashing
from .errors import MergeError
from .dtypes import is_float
from .io.filesink import FileSink, check_device, data_bytes, prepare_output
from .metadata import InputFile, build_metadata, file_name, output_stem
from .plan import Plan, build_plan
from .recipe import Recipe, as_recipe, check_path_text, parse_lora
from .roles import ROLE_LETTERS, lora_role
from .io.sources import Source, open_source


@dataclass
class MergeResult:
    output: Path
    sha256: str
    plan: Plan
    seconds: float
    metadata: dict[str, str]
    bytes_read: dict[str, int] | None = None

    @property
    def short_hash(self) -> str:
        return hashing.short_hash(self.sha256)


def normalize_recipe(recipe: Recipe) -> Recipe:
    """Input paths as absolute ``str`` (Path objects and relative paths accepted), so the recipe keeps naming the
    same files if the working folder changes. The metadata records only file names and sha256 either way."""
    return replace(recipe, models=[os.path.abspath(m) for m in recipe.models],
                   bake_vae=os.path.abspath(recipe.bake_vae) if recipe.bake_vae else None,
                   lora=[replace(e, path=os.path.abspath(e.path)) for e in parse_lora(recipe.lora, "recipe")])


def _hash(path: Path, progress: Callable[[str, int, int], None] | None) -> str:
    """sha256 of an input, reporting ("hashing NAME", done_bytes, total_bytes) while it reads."""
    stage = f"hashing {path.name}"
    return hashing.sha256_file(path, (lambda done, total: progress(stage, done, total)) if progress else None)


def _input(role: str, recorded, src: Source, progress) -> InputFile:
    return InputFile(role, file_name(recorded), _hash(src.path, progress), hashing.legacy_hash(src.path),
                     dict(src.metadata) if role != "vae" else {})


def _lora_input(role: str, recorded: str, path: Path, progress) -> InputFile:
    """A LoRA recorded like a model (name and sha256, so ``reproduce`` finds it); no lineage of its own."""
    return InputFile(role, file_name(recorded), _hash(path, progress), hashing.legacy_hash(path), {})


def writes_only_fp16(plan: Plan) -> bool:
    """The WebUI's ``save_as_half``: every float tensor the file holds is fp16."""
    floats = [kp.out_dtype for kp in plan.keys if is_float(kp.out_dtype)]
    return bool(floats) and all(dt == "F16" for dt in floats)


def check_output_path(output: str | os.PathLike, inputs: list[Path], overwrite: bool) -> Path:
    """What the output path alone can tell: the folder, the name, an input or a folder in the way."""
    if not isinstance(output, (str, os.PathLike)):
        raise MergeError(f"output must be a file path, got {type(output).__name__}")
    out = Path(output)
    check_path_text(str(out), "output")
    if out.suffix.lower() != ".safetensors":
        raise MergeError(f"output must end in .safetensors, {out}")
    if not out.parent.is_dir():
        raise MergeError(f"output folder does not exist, {out.parent}")
    if out.is_dir():
        raise MergeError(f"output is a folder, {out}")
    real = os.path.realpath(out)
    for p in inputs:
        if os.path.realpath(p) == real:
            raise MergeError(f"output would overwrite an input model, {out}")
    if out.exists() and not overwrite:
        raise MergeError(f"output exists (use --overwrite to replace it), {out}")
    return out


def check_threads(threads: object) -> int | None:
    if threads is None or (type(threads) is int and threads >= 0):
        return threads or None
    raise MergeError(f"threads must be a whole number (0 or None: one per core, at most 4), threads={threads!r}")


def merge_to_file(recipe: Recipe | dict, output: str | os.PathLike, *, overwrite: bool = False,
                  threads: int | None = None, device: str = "cpu", progress: Callable[[str, int, int], None] | None = None,
                  cancel: Callable[[], bool] | None = None, locate: dict[str, str] | None = None,
                  output_name: str | None = None, metadata: dict[str, str] | None = None) -> MergeResult:
    """Merge to ``output``. Inputs may be str or Path, relative or absolute: the metadata records their file
    names and sha256 only. ``locate`` maps a role ("a", "b", "c", …, "vae", "lora1", …) to where that input is now (the
    recipe's entry then only gives the recorded name), ``output_name`` is the name
    recorded in the metadata (default: the output's stem), and ``metadata`` replaces the metadata built here
    (reproduce of a file written with an older metadata layout). ``recipe`` may be a ``Recipe`` or a dict in
    the recipe's JSON form; either is type-checked and validated before anything is read. Everything a user can
    cause raises ``MergeError``, before the first output byte is written where it can be known then (device,
    output folder, free space)."""
    t0 = time.perf_counter()
    recipe = as_recipe(recipe)
    threads = check_threads(threads)
    check_device(device)
    locate = locate or {}
    recorded = [os.fspath(m) for m in recipe.models]
    paths = [Path(locate.get(role, m)) for role, m in zip(ROLE_LETTERS, recorded)]
    vae_rec = os.fspath(recipe.bake_vae) if recipe.bake_vae else None
    vae_path = Path(locate.get("vae", vae_rec)) if vae_rec else None
    lora_rec = [e.path for e in recipe.lora]
    lora_paths = [Path(locate.get(lora_role(i), rec)) for i, rec in enumerate(lora_rec)]
    out = check_output_path(output, paths + ([vae_path] if vae_path else []) + lora_paths, overwrite)
    with ExitStack() as stack:
        sources: list[Source] = [stack.enter_context(open_source(p)) for p in paths]
        bake = stack.enter_context(open_source(vae_path)) if vae_path else None
        located = replace(recipe, lora=[replace(e, path=str(p)) for e, p in zip(recipe.lora, lora_paths)])
        plan = build_plan(located, sources, bake)
        plan.report.notes.extend(prepare_output(out, data_bytes(plan)))
        inputs = [_input(role, rec, src, progress) for role, rec, src in zip(ROLE_LETTERS, recorded, sources)]
        if bake is not None:
            inputs.append(_input("vae", vae_rec, bake, progress))
        inputs += [_lora_input(lora_role(i), rec, p, progress) for i, (rec, p) in enumerate(zip(lora_rec, lora_paths))]
        if metadata is None:
            resolved = {"arch": plan.arch.name, "weights_alpha": plan.alpha_vector, "weights_beta": plan.beta_vector}
            if plan.random is not None:  # the seed (drawn here when the recipe had none) and every drawn number
                resolved["random"] = plan.random
                recipe = replace(recipe, seed=plan.seed)
            det = plan.detected[0]
            metadata = build_metadata(recipe, inputs, output_name or output_stem(out), resolved,
                                      det.variant == "inpainting", det.variant == "pix2pix", writes_only_fp16(plan))
        sink = FileSink(plan, plan.arrange(sources), bake, metadata, threads=threads, device=device)
        cb = (lambda done, total: progress("merging", done, total)) if progress else None
        digest = sink.write(out, overwrite, cb, cancel)
        read = {os.path.realpath(s.path): s.bytes_read for s in sources}
    hashing.remember(out, digest)
    return MergeResult(out, digest, plan, time.perf_counter() - t0, metadata, read)
