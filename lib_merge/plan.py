"""The ratio plan: for every output key, what to do (merge / copy from A / copy from B / bake VAE), with
which ratios, in which output dtype. Pure function of the recipe and the sources' headers."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import presets
from .arch import ArchSpec, Detected, FIRST_CONV, block_of, detect, part_of
from .dtypes import OUTPUT_DTYPES, is_float
from .elemental import apply_rules, parse_rules
from .errors import MergeError
from .modes import Mode, get_mode
from .recipe import Recipe
from .sources import Source, TensorInfo
from .weights import parse_weights

SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
})


def is_never_merged(key: str) -> bool:
    """Keys always copied from A bit-exact (position ids, schedule buffers, EMA)."""
    return key.endswith("position_ids") or key in SCHEDULE_BUFFERS or key.startswith("model_ema.")


def is_pruned(key: str) -> bool:
    return key.startswith("model_ema.") or key in SCHEDULE_BUFFERS


@dataclass(frozen=True)
class KeyPlan:
    key: str
    action: str  # "merge" | "copy_a" | "copy_b" | "bake_vae"
    block: str
    alpha: float
    beta: float
    out_dtype: str
    shape: tuple[int, ...]
    channels: int | None = None  # merge only the first N input channels (inpainting/pix2pix first conv)


@dataclass
class Report:
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)  # keys copied from A because of --force
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = list(self.notes)
        for what, keys in (("kept from A (not in every input)", self.only_a),
                           ("only in B" , self.only_b), ("copied from A (--force: name/shape differ)", self.forced)):
            if keys:
                out.append(f"{len(keys)} keys {what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}")
        return out


@dataclass
class Plan:
    arch: ArchSpec
    detected: list[Detected]
    keys: list[KeyPlan]
    alpha_vector: list[float] | None
    beta_vector: list[float] | None
    report: Report
    mode: Mode

    def by_key(self) -> dict[str, KeyPlan]:
        return {k.key: k for k in self.keys}


def vector_for(weights: str | None, preset: str | None, arch: ArchSpec, base: float, what: str) -> list[float] | None:
    if preset:  # never both: Recipe.validate (options.check_exclusive) refused that already
        return presets.resolve(preset, arch)
    if weights:
        # A lone non-numeric token is a preset name (as supermerger's weights box accepts).
        tok = weights.strip()
        if tok and "," not in tok and " " not in tok and not _is_number(tok):
            return presets.resolve(tok, arch)
        return parse_weights(weights, arch, base, what)
    return None


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_parts(text: str | None, arch: ArchSpec, what: str):
    """``unet,te,vae,IN00-IN05,M00,BASE`` -> predicate(key, block) -> bool. ``None`` when no text."""
    if not text or not text.strip():
        return None
    kinds: set[str] = set()
    blocks: set[str] = set()
    names = arch.blocks
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        low = tok.lower()
        if low in ("unet", "te", "vae"):
            kinds.add(low)
            continue
        ends = tok.upper().split("-")
        if not all(e in names for e in ends) or len(ends) > 2:
            raise MergeError(f"unknown part {tok!r} (unet, te, vae, or block IDs/ranges of {arch.label}), {what}")
        idx = sorted(names.index(e) for e in ends)
        blocks.update(names[idx[0]:idx[-1] + 1])

    def pred(key: str, block: str) -> bool:
        return part_of(key) in kinds or (part_of(key) == "unet" and block in blocks) or (
            block == "BASE" and "BASE" in blocks and part_of(key) != "vae")

    return pred


def build_plan(recipe: Recipe, sources: list[Source], bake_vae: Source | None = None) -> Plan:
    recipe.validate()
    mode = get_mode(recipe.mode)
    detected = [detect(s.shapes(), str(s.path)) for s in sources]
    report = Report()
    a_det = detected[0]
    arch = a_det.arch
    for s, d in zip(sources[1:], detected[1:]):
        if d.arch.name != arch.name:
            msg = f"architectures differ: A is {arch.label}, {s.path} is {d.arch.label}"
            if not recipe.force:
                raise MergeError(msg + " (use --force to merge only the keys both share)")
            report.notes.append(msg + "; --force: merging keys with the same name and shape")
    # inpainting / pix2pix: A must hold the extra channels
    if len(sources) > 1:
        extra = [d for d in detected[1:] if d.in_channels > a_det.in_channels]
        if extra:
            i = detected.index(extra[0])
            raise MergeError(f"model {'ABC'[i]} is the {extra[0].variant} model ({extra[0].in_channels}-channel first conv) "
                             f"and A is not: put it first (or use --swap-ab), {sources[i].path}")

    alpha_vec = vector_for(recipe.weights, recipe.preset, arch, recipe.alpha, "--weights")
    beta_vec = vector_for(recipe.weights_beta, recipe.preset_beta, arch, recipe.beta, "--weights-beta")
    if alpha_vec is not None and len(alpha_vec) == len(arch.blocks):
        report.notes.append("alpha has no effect: the block weights set every block, BASE included")
    rules = parse_rules(recipe.elemental, arch)
    include = parse_parts(recipe.include, arch, "--include")
    exclude = parse_parts(recipe.exclude, arch, "--exclude")
    swap = recipe.swap_ab
    if swap:
        report.notes.append("--swap-ab: A and B swapped, every ratio r became 1 - r")

    a = sources[0]
    others = sources[1:mode.models]
    out_st = OUTPUT_DTYPES[recipe.dtype]
    keys: list[KeyPlan] = []
    names = list(a.infos)
    b_only: list[str] = []
    if len(sources) > 1:
        b_only = [k for k in sources[1].infos if k not in a.infos]
        report.only_b = sorted(b_only)

    def out_dtype(info: TensorInfo) -> str:
        if not is_float(info.dtype) or out_st is None:
            return info.dtype
        return out_st

    bake_keys = {}
    if bake_vae is not None:
        bake_keys = _bake_map(bake_vae, a)

    for key in names:
        info = a.infos[key]
        if recipe.prune and is_pruned(key):
            continue
        block = block_of(key, arch)
        part = part_of(key)
        alpha = alpha_vec[arch.blocks.index(block)] if alpha_vec is not None else recipe.alpha
        alpha = apply_rules(rules, key, block, alpha)
        beta = beta_vec[arch.blocks.index(block)] if beta_vec is not None else recipe.beta
        if swap:
            alpha = 1.0 - alpha
        od = out_dtype(info)

        def plan(action, channels=None, od=od, shape=info.shape):
            keys.append(KeyPlan(key, action, block, alpha, beta, od, tuple(shape), channels))

        if part == "vae" and bake_keys:
            plan("bake_vae", shape=bake_vae.infos[bake_keys[key]].shape)
            continue
        if mode.models == 1 or is_never_merged(key) or not is_float(info.dtype):
            plan("copy_a")
            continue
        if part == "vae" and recipe.vae != "merge":
            if recipe.vae == "a":
                plan("copy_a")
            else:
                binfo = sources[1].infos.get(key)
                if binfo is None:
                    raise MergeError(f"--vae b: model B has no VAE key {key}, {sources[1].path}")
                plan("copy_b", od=out_dtype(binfo), shape=binfo.shape)
            continue
        selected = (include is None or include(key, block)) and not (exclude is not None and exclude(key, block))
        if not selected:
            plan("copy_a")
            continue
        missing = [s for s in others if key not in s.infos]
        if missing:
            report.only_a.append(key)
            plan("copy_a")
            continue
        shapes = [s.infos[key].shape for s in others]
        if any(not is_float(s.infos[key].dtype) for s in others):
            plan("copy_a")
            continue
        if all(sh == info.shape for sh in shapes):
            if mode.check_ratio:
                for r in (alpha,) + ((beta,) if mode.uses_beta else ()):
                    problem = mode.check_ratio(r)
                    if problem:
                        raise MergeError(f"{mode.name}: {problem}, block {block} key {key}")
            plan("merge")
            continue
        if key == FIRST_CONV and all(len(sh) == 4 and sh[0] == info.shape[0] and sh[2:] == info.shape[2:]
                                     and sh[1] in (4, info.shape[1]) for sh in shapes):
            plan("merge", channels=min(sh[1] for sh in shapes))
            continue
        if recipe.force:
            report.forced.append(key)
            plan("copy_a")
            continue
        bad = next(s for s in others if s.infos[key].shape != info.shape)
        raise MergeError(f"shape differs: {list(bad.infos[key].shape)} vs A's {list(info.shape)} "
                         f"(use --force to keep A's), {bad.path} key {key}")

    if recipe.copy_b_only and b_only:
        b = sources[1]
        for key in sorted(b_only):
            binfo = b.infos[key]
            keys.append(KeyPlan(key, "copy_b", block_of(key, arch), 0.0, 0.0, out_dtype(binfo), binfo.shape))
    return Plan(arch, detected, keys, alpha_vec, beta_vec, report, mode)


def _bake_map(vae: Source, a: Source) -> dict[str, str]:
    """A's VAE key -> key in the VAE file. Shapes must match."""
    a_vae = [k for k in a.infos if k.startswith("first_stage_model.")]
    if not a_vae:
        raise MergeError(f"--bake-vae: model A has no VAE keys, {a.path}")
    prefixed = any(k.startswith("first_stage_model.") for k in vae.infos)
    mapping = {}
    for k in a_vae:
        src = k if prefixed else k[len("first_stage_model."):]
        info = vae.infos.get(src)
        if info is None:
            raise MergeError(f"--bake-vae: the VAE file lacks {src}, {vae.path}")
        if info.shape != a.infos[k].shape:
            raise MergeError(f"--bake-vae: shape {list(info.shape)} differs from A's {list(a.infos[k].shape)}, "
                             f"{vae.path} key {src}")
        mapping[k] = src
    return mapping
