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
from .chain import RecipeSource
from .roles import describe_role, is_model_role, lora_role, role
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
    same files if the working folder changes; nested recipes too. The metadata records only file names and sha256
    either way."""
    return recipe.map_tree(lambda r: replace(
        r, models=[m if isinstance(m, Recipe) else os.path.abspath(m) for m in r.models],
        bake_vae=os.path.abspath(r.bake_vae) if r.bake_vae else None,
        lora=[replace(e, path=os.path.abspath(e.path)) for e in parse_lora(r.lora, "recipe")]))


def _hash(path: Path, progress: Callable[[str, int, int], None] | None) -> str:
    """sha256 of an input, reporting ("hashing NAME", done_bytes, total_bytes) while it reads."""
    stage = f"hashing {path.name}"
    return hashing.sha256_file(path, (lambda done, total: progress(stage, done, total)) if progress else None)


def _input(role: str, recorded: str, src: Source | Path, progress) -> InputFile:
    """An input file as the metadata records it: name, sha256, legacy hash, and (models only) its own metadata
    for the lineage. A LoRA (given as a path) is recorded like a model, so ``reproduce`` finds it."""
    path = src if isinstance(src, Path) else src.path
    meta = dict(src.metadata) if isinstance(src, Source) and is_model_role(role) else {}
    return InputFile(role, file_name(recorded), _hash(path, progress), hashing.legacy_hash(path), meta)


def recipe_files(recipe: Recipe, prefix: str = "") -> list[tuple[str, str]]:
    """Every file a recipe tree reads, as (role path, recorded path): models, the baked VAE, LoRAs."""
    out: list[tuple[str, str]] = []
    for i, m in enumerate(recipe.models):
        r = prefix + role(i)
        out += recipe_files(m, r + ".") if isinstance(m, Recipe) else [(r, os.fspath(m))]
    if recipe.bake_vae:
        out.append((prefix + "vae", os.fspath(recipe.bake_vae)))
    out += [(prefix + lora_role(i), e.path) for i, e in enumerate(recipe.lora)]
    return out


@dataclass
class _Step:
    """One recipe of a tree, opened: its plan over its sources (nested recipes as :class:`RecipeSource`)."""
    plan: Plan
    sources: list[Source]  # recipe order
    bake: Source | None
    recorded: Recipe  # the recipe as the metadata records it (a seed drawn here filled in), nested ones too
    resolved: dict
    nested_resolved: dict[str, dict]  # role prefix ("a.", "a.b.") -> that step's resolved numbers
    files: list[tuple[str, str, Source | Path]]  # (role path, recorded path, opened source or LoRA path)
    opened: list[Source]  # every file source (for bytes read)


def _open_step(recipe: Recipe, prefix: str, locate: dict[str, str], stack: ExitStack, device: str) -> _Step:
    sources: list[Source] = []
    files: list[tuple[str, str, Source | Path]] = []
    opened: list[Source] = []
    nested: dict[str, dict] = {}
    models: list[str | Recipe] = []
    for i, m in enumerate(recipe.models):
        r = prefix + role(i)
        if isinstance(m, Recipe):
            inner = _open_step(m, r + ".", locate, stack, device)
            name = f"{describe_role(r)} = recipe of {', '.join(file_name(p) for _, p in m.leaves())}"
            src = stack.enter_context(RecipeSource(name, inner.plan, inner.plan.arrange(inner.sources),
                                                   inner.bake, device))
            files += inner.files
            opened += inner.opened
            nested.update(inner.nested_resolved)
            nested[r + "."] = inner.resolved
            models.append(inner.recorded)
            sources.append(src)
            continue
        src = stack.enter_context(open_source(Path(locate.get(r, os.fspath(m)))))
        files.append((r, os.fspath(m), src))
        opened.append(src)
        models.append(m)
        sources.append(src)
    bake = None
    if recipe.bake_vae:
        vae_rec = os.fspath(recipe.bake_vae)
        bake = stack.enter_context(open_source(Path(locate.get(prefix + "vae", vae_rec))))
        files.append((prefix + "vae", vae_rec, bake))
        opened.append(bake)
    lora_paths = [Path(locate.get(prefix + lora_role(i), e.path)) for i, e in enumerate(recipe.lora)]
    files += [(prefix + lora_role(i), e.path, p) for i, (e, p) in enumerate(zip(recipe.lora, lora_paths))]
    located = replace(recipe, lora=[replace(e, path=str(p)) for e, p in zip(recipe.lora, lora_paths)])
    try:
        plan = build_plan(located, sources, bake)
    except MergeError as e:
        if not prefix:
            raise
        raise MergeError(f"in the recipe of model {describe_role(prefix[:-1])}: {e}") from None
    recorded = replace(recipe, models=models)
    resolved = {"arch": plan.arch.name, "weights_alpha": plan.alpha_vector, "weights_beta": plan.beta_vector}
    if plan.random is not None:  # the seed (drawn here when the recipe had none) and every drawn number
        resolved["random"] = plan.random
        recorded = replace(recorded, seed=plan.seed)
    for src in sources:
        if isinstance(src, RecipeSource):
            plan.report.notes.extend(f"{src.path}: {line}" for line in src.plan.report.lines())
    return _Step(plan, sources, bake, recorded, resolved, nested, files, opened)


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
    files = [Path(locate.get(r, os.fspath(p))) for r, p in recipe_files(recipe)]
    out = check_output_path(output, files, overwrite)
    with ExitStack() as stack:
        step = _open_step(recipe, "", locate, stack, str(device))
        plan, sources, bake = step.plan, step.sources, step.bake
        plan.report.notes.extend(n for s in step.opened for n in getattr(s, "notes", ()))  # e.g. diffusers folders
        plan.report.notes.extend(prepare_output(out, data_bytes(plan)))
        inputs = [_input(role, rec, src, progress) for role, rec, src in step.files]
        if metadata is None:
            det = plan.detected[0]
            metadata = build_metadata(step.recorded, inputs, output_name or output_stem(out), step.resolved,
                                      det.variant == "inpainting", det.variant == "pix2pix", writes_only_fp16(plan),
                                      step.nested_resolved)
        sink = FileSink(plan, plan.arrange(sources), bake, metadata, threads=threads, device=device)
        cb = (lambda done, total: progress("merging", done, total)) if progress else None
        digest = sink.write(out, overwrite, cb, cancel)
        read: dict[str, int] = {}
        for src in step.opened:
            read[os.path.realpath(src.path)] = read.get(os.path.realpath(src.path), 0) + src.bytes_read
    hashing.remember(out, digest)
    return MergeResult(out, digest, plan, time.perf_counter() - t0, metadata, read)
