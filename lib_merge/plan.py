"""The ratio plan: for every output key, what to do (merge / copy from A / copy from B / bake VAE), with
which ratios, in which output dtype. Pure function of the recipe and the sources' headers, except that a
method with a statistics pass (cosine_a/b) reads A and B once here, so that both sinks get the same numbers."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import MutableMapping

from . import presets
from .adjust import Adjustment, for_key, parse_adjust
from .arch import ArchSpec, Detected, FIRST_CONV, block_of, detect, legacy_keeps_a, part_of
from .dtypes import OUTPUT_DTYPES, is_float
from .dice import Dice, draw_seed, parse_bounds
from .elemental import apply_rules, parse_rules
from .errors import MergeError
from .methods import Formula, Mode, bind, get_mode
from .methods.stats import with_stats
from .lora.apply import LoraPatch, counts, plan_lora
from .recipe import Recipe, parse_lora
from .roles import label
from .io.sources import Source, TensorInfo
from .weights import parse_weights_info

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
    # fields marked "value" are what the merged value depends on (the live re-merge signature reads them)
    alpha: float = field(metadata={"value": True})
    beta: float = field(metadata={"value": True})
    out_dtype: str = field()
    shape: tuple[int, ...] = field()
    # merge only the first N input channels (inpainting/pix2pix first conv)
    channels: int | None = field(default=None, metadata={"value": True})
    # Adjust (§1.12), applied to the merged fp32 result; only on "merge" keys
    adjust: Adjustment | None = field(default=None, metadata={"value": True})
    # LoRA patches added to the merged fp32 value (or to A's, on a "copy_a" key) before Adjust (lora.apply)
    lora: tuple[LoraPatch, ...] = field(default=(), metadata={"value": True})


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
    detected: list[Detected]  # in plan order (after --swap-ab)
    keys: list[KeyPlan]
    alpha_vector: list[float] | None
    beta_vector: list[float] | None
    report: Report
    mode: Mode
    formula: Formula  # the mode bound to the recipe's method and parameters: what the sinks compute
    order: tuple[int, ...] = (0, 1, 2)  # plan role i reads input order[i]: (1, 0, …) with --swap-ab
    seed: int | None = None  # the seed random ratios were drawn with (the recipe's, or one drawn here)
    random: dict | None = None  # the seed and every drawn number (Dice.record), for the metadata

    def by_key(self) -> dict[str, KeyPlan]:
        return {k.key: k for k in self.keys}

    def arrange(self, items: list) -> list:
        """``items`` given in the recipe's order (A, B, C, …), put in the plan's order (what the sink reads)."""
        return [items[i] for i in self.order[: len(items)]]


@dataclass(frozen=True)
class VectorInfo:
    values: list[float]  # full vector, BASE first
    base_from_ratio: bool  # 25/19 values: BASE is the plain ratio
    notes: tuple[str, ...]
    from_preset: bool
    tokens: dict[int, str] = field(default_factory=dict)  # full-vector index -> random token (R, U, X)


def vector_for(weights: str | None, preset: str | None, arch: ArchSpec, base: float,
               what: str = "--weights", preset_what: str = "--preset") -> VectorInfo | None:
    """The block vector from a weight string or a preset name (a lone non-numeric token in the weights is a
    preset name, as supermerger's weights box accepts); ``None`` when neither is given."""
    # never both weights and a preset: Recipe.validate (options.check_exclusive) refused that already
    tok = (weights or "").strip()
    if tok and not preset and "," not in tok and " " not in tok and ";" not in tok and not _is_number(tok):
        preset, what, preset_what = tok, what, what
    if preset:
        r = presets.lookup(preset, arch)
        notes = []
        if r.name != preset.strip():
            notes.append(f"preset {preset.strip()!r} is {r.name} (names match in any case), {preset_what}")
        if r.converted:
            notes.append(f"preset {r.name} has no SDXL version: its SD1 values were converted to SDXL's 20 "
                         f"(IN09-IN11 and OUT09-OUT11 dropped), {preset_what}")
        return VectorInfo(r.values, False, tuple(notes), True)
    if weights:
        w = parse_weights_info(weights, arch, base, what, random_ok=True)
        notes = []
        if w.converted_from:
            n_xl = 20 if w.converted_from == 26 else 19
            notes.append(f"{w.converted_from} values converted to SDXL's {n_xl} "
                         f"(IN09-IN11 and OUT09-OUT11 dropped), {what}")
        return VectorInfo(w.values, w.base_from_ratio, tuple(notes), False, w.tokens)
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
        i, j = names.index(ends[0]), names.index(ends[-1])
        if i > j:
            raise MergeError(f"reversed block range {tok!r} (write {ends[1]}-{ends[0]}), {what}")
        blocks.update(names[i:j + 1])

    def pred(key: str, block: str) -> bool:
        return part_of(key) in kinds or (part_of(key) == "unet" and block in blocks) or (
            block == "BASE" and "BASE" in blocks and part_of(key) != "vae")

    return pred


def _default(name: str) -> float:
    return next(f.default for f in fields(Recipe) if f.name == name)


def _order(recipe: Recipe, sources: list[Source], detected: list[Detected]) -> tuple[int, ...]:
    """Which input plays A, B, C. ``--swap-ab`` swaps A and B whenever it is given (the recipe records it); the
    model with the extra input channels (inpainting / pix2pix) must end up as A."""
    order = tuple(range(len(sources)))
    if recipe.swap_ab and len(sources) > 1:
        order = (1, 0, *order[2:])
    a = detected[order[0]]
    for role, i in enumerate(order[1:], 1):
        d = detected[i]
        if d.in_channels <= a.in_channels:
            continue
        if recipe.swap_ab:
            raise MergeError(f"--swap-ab would make the {d.variant} model B ({d.in_channels}-channel first conv); "
                             f"it is A already: drop --swap-ab, {sources[i].path}")
        raise MergeError(f"model {label(role)} is the {d.variant} model ({d.in_channels}-channel first conv) "
                         f"and A is not: put it first (or use --swap-ab), {sources[i].path}")
    return order


class _Usage:
    """What the plan saw while choosing ratios, for the notes: which ratios were really used, which rules hit,
    the first out-of-range ratio."""

    def __init__(self) -> None:
        self.alpha_used = False
        self.beta_used = False
        self.rule_hits: set[int] = set()
        self.merged = 0
        self.outside: list[str] = []  # weighted_sum ratios outside [0, 1]
        self.over_one: list[str] = []  # triple_sum alpha + beta > 1


def build_plan(recipe: Recipe, sources: list[Source], bake_vae: Source | None = None,
               stats_cache: MutableMapping | None = None) -> Plan:
    """``stats_cache``: where a live session keeps the statistics pass's result between re-merges (see
    ``methods.stats.with_stats``); a file merge passes none and runs the pass once."""
    recipe.validate()
    mode = get_mode(recipe.mode)
    formula = bind(recipe.mode, recipe.method, recipe.params, recipe.seed, len(sources))
    given = [detect(s.shapes(), str(s.path)) for s in sources]
    report = Report()
    for s, d in zip(sources[1:], given[1:]):
        if d.arch.name != given[0].arch.name:
            msg = f"architectures differ: A is {given[0].arch.label}, {s.path} is {d.arch.label}"
            if not recipe.force:
                raise MergeError(msg + " (use --force to merge only the keys both share)")
            report.notes.append(msg + "; --force: merging keys with the same name and shape")
    order = _order(recipe, sources, given)
    sources = [sources[i] for i in order]
    detected = [given[i] for i in order]
    arch = detected[0].arch
    if recipe.swap_ab:
        report.notes.append(f"--swap-ab: A and B swapped (A is now {sources[0].path.name}), "
                            "every ratio r became 1 - r")

    alpha_v = vector_for(recipe.weights, recipe.preset, arch, recipe.alpha, "--weights", "--preset")
    beta_v = vector_for(recipe.weights_beta, recipe.preset_beta, arch, recipe.beta, "--weights-beta", "--preset-beta")
    for v in (alpha_v, beta_v):
        if v is not None:
            report.notes.extend(v.notes)
    if (alpha_v and alpha_v.from_preset) or (beta_v and beta_v.from_preset):
        report.notes.extend(presets.user_problems())
    rules = parse_rules(recipe.elemental, arch)
    dice = _dice(recipe, arch, [alpha_v, beta_v], rules, report)
    alpha_vec = _drawn(alpha_v, "alpha", dice)
    beta_vec = _drawn(beta_v, "beta", dice)
    draw = (lambda i, rule, key, block: dice.element(i, rule.text, rule.token, key, block)) if dice else None
    include = parse_parts(recipe.include, arch, "--include")
    exclude = parse_parts(recipe.exclude, arch, "--exclude")
    legacy = recipe.supermerger_time_embed_out11
    adjust = parse_adjust(recipe.adjust, "adjust")  # a Recipe built in Python may hold text or zeros
    use = _Usage()

    a = sources[0]
    others = sources[1:formula.models]
    out_st = OUTPUT_DTYPES[recipe.dtype]
    keys: list[KeyPlan] = []
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

    for key, info in a.infos.items():
        if recipe.prune and is_pruned(key):
            continue
        block = block_of(key, arch, legacy)
        part = part_of(key)
        hits: set[int] = set()
        alpha = alpha_vec[arch.blocks.index(block)] if alpha_vec is not None else recipe.alpha
        alpha = apply_rules(rules, key, block, alpha, hits, draw)
        use.rule_hits |= hits
        alpha_plain = not hits and (alpha_vec is None or (alpha_v.base_from_ratio and block == "BASE"))
        beta = beta_vec[arch.blocks.index(block)] if beta_vec is not None else recipe.beta
        beta_plain = beta_vec is None or (beta_v.base_from_ratio and block == "BASE")
        ratio = alpha
        if recipe.swap_ab:
            alpha = 1.0 - alpha
        od = out_dtype(info)

        adj = for_key(adjust, key, arch.name, info.shape[0] if info.shape else 0)

        def plan(action, channels=None, od=od, shape=info.shape):
            keys.append(KeyPlan(key, action, block, alpha, beta, od, tuple(shape), channels,
                                adj if action == "merge" else None))

        if part == "vae" and bake_keys:
            plan("bake_vae", shape=bake_vae.infos[bake_keys[key]].shape)
            continue
        selected = (include is None or include(key, block)) and not (exclude is not None and exclude(key, block))
        if formula.models == 1 and adj is not None and selected and is_float(info.dtype):
            plan("merge")  # one model: the merge is A itself, then adjusted
            continue
        if formula.models == 1 or is_never_merged(key) or not is_float(info.dtype):
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
        if not selected or (legacy and legacy_keeps_a(key, arch)):
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
        channels = None
        if not all(sh == info.shape for sh in shapes):
            if key == FIRST_CONV and all(len(sh) == 4 and sh[0] == info.shape[0] and sh[2:] == info.shape[2:]
                                         and sh[1] in (4, info.shape[1]) for sh in shapes):
                channels = min(sh[1] for sh in shapes)
            elif recipe.force:
                report.forced.append(key)
                plan("copy_a")
                continue
            else:
                bad = next(s for s in others if s.infos[key].shape != info.shape)
                raise MergeError(f"shape differs: {list(bad.infos[key].shape)} vs A's {list(info.shape)} "
                                 f"(use --force to keep A's), {bad.path} key {key}")
        for r in (alpha,) + ((beta,) if formula.uses_beta else ()):
            problem = formula.ratio_problem(r)
            if problem:
                raise MergeError(f"{formula.name}: {problem}, block {block} key {key}")
        _count_ratios(use, mode, key, block, ratio, beta)
        use.alpha_used |= alpha_plain and formula.mode.per_key_ratio
        use.beta_used |= beta_plain and formula.uses_beta
        plan("merge", channels=channels)

    keys = _with_lora(keys, parse_lora(recipe.lora, "recipe"), a, arch, report)
    if recipe.copy_b_only and b_only:
        b = sources[1]
        for key in sorted(b_only):
            binfo = b.infos[key]
            keys.append(KeyPlan(key, "copy_b", block_of(key, arch, legacy), 0.0, 0.0, out_dtype(binfo), binfo.shape))
    if (include is not None or exclude is not None) and formula.models > 1 and not use.merged:
        parts = " ".join(f"--{n} {v!r}" for n, v in (("include", recipe.include), ("exclude", recipe.exclude)) if v)
        raise MergeError(f"--include/--exclude leave nothing to merge (every key would be A's), {parts}")
    report.notes.extend(_ratio_notes(recipe, formula, rules, use, alpha_v, beta_v))
    if formula.method.stats is not None and len(sources) > 1:
        formula = with_stats(formula, stats_keys(sources[0], sources[1]), sources[0].read, sources[1].read,
                             tuple(_identity(s) for s in sources[:2]), stats_cache)
    if legacy:
        report.notes.append(_legacy_note(arch))
    if (dice is None or not dice.x_used) and (recipe.random_lower or recipe.random_upper):
        report.notes.append("--random-lower/--random-upper have no effect: no X token drew from them")
    return Plan(arch, detected, keys, alpha_vec, beta_vec, report, mode, formula, order,
                dice.seed if dice else None, dice.record() if dice else None)


def _with_lora(keys: list[KeyPlan], entries: list, a: Source, arch: ArchSpec, report: Report) -> list[KeyPlan]:
    """The key plans with the LoRAs' patches attached. LoRAs are matched against A's weights; a patched key
    taken from A stays "copy_a" (its value is A's, patched), one taken from B or the baked VAE is an error."""
    if not entries:
        return keys
    patches = plan_lora(entries, a.shapes(), arch)
    out = []
    for kp in keys:
        todo = patches.get(kp.key)
        if todo and kp.action not in ("merge", "copy_a"):
            source = "model B" if kp.action == "copy_b" else "the baked VAE"
            raise MergeError(f"a LoRA patches {kp.key}, which comes from {source}; LoRAs patch merged or A's "
                             f"weights only, {todo[0].source[0]} module {todo[0].module}")
        out.append(replace(kp, lora=todo) if todo else kp)
    planned = {kp.key for kp in keys}
    missing = [k for k in patches if k not in planned]
    if missing:  # a key the output leaves out (--prune): the module must not vanish silently
        raise MergeError(f"a LoRA patches {missing[0]}, which the output does not hold, "
                         f"{patches[missing[0]][0].source[0]} module {patches[missing[0]][0].module}")
    n_keys, n_mods = counts(patches)
    report.notes.append(f"{len(entries)} LoRA{'s' if len(entries) > 1 else ''} baked in: {n_mods} modules "
                        f"into {n_keys} weights (after the merge, before Adjust)")
    return out


def stats_keys(a: Source, b: Source) -> list[str]:
    """The keys a statistics pass reads (supermerger's stage 0): float tensors A and B both have with the same
    shape, except never-merged keys and the VAE (the cosine methods, the only ones with a pass, skip it)."""
    out = []
    for key, info in a.infos.items():
        other = b.infos.get(key)
        if (other is not None and other.shape == info.shape and is_float(info.dtype) and is_float(other.dtype)
                and not is_never_merged(key) and part_of(key) != "vae"):
            out.append(key)
    return out


def _identity(s: Source) -> tuple:
    """What a source's contents are known by: path, size and modification time."""
    try:
        st = os.stat(s.path)
        return (str(s.path), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(s.path), id(s))


def _dice(recipe: Recipe, arch: ArchSpec, vectors: list[VectorInfo | None], rules: list,
          report: Report) -> Dice | None:
    """The random-ratio generator when a vector or a rule holds R/U/X (``None`` otherwise): the recipe's seed,
    or a fresh one, said in a note (the merge records it, so the result can be re-run)."""
    lower = parse_bounds(recipe.random_lower, arch, "--random-lower")
    upper = parse_bounds(recipe.random_upper, arch, "--random-upper")
    if not any(v is not None and v.tokens for v in vectors) and not any(r.token for r in rules):
        return None
    seed = recipe.seed if recipe.seed is not None else draw_seed()
    report.notes.append(f"random weights drawn with seed {seed}")
    return Dice(seed, tuple(arch.blocks), lower, upper)


def _drawn(v: VectorInfo | None, vector: str, dice: Dice | None) -> list[float] | None:
    """The block vector with its random tokens drawn (in block order)."""
    if v is None:
        return None
    values = list(v.values)
    for i, token in sorted(v.tokens.items()):
        values[i] = dice.block(vector, token, i)
    return values


def _count_ratios(use: _Usage, mode: Mode, key: str, block: str, alpha: float, beta: float) -> None:
    use.merged += 1
    if mode.name == "weighted_sum" and not 0.0 <= alpha <= 1.0:
        use.outside.append(f"block {block} key {key}, alpha {alpha:g}")
    if mode.name == "triple_sum" and alpha + beta > 1.0:
        use.over_one.append(f"block {block} key {key}, alpha {alpha:g} + beta {beta:g}")


def _ratio_notes(recipe: Recipe, mode: Formula, rules: list, use: _Usage,
                 alpha_v: VectorInfo | None, beta_v: VectorInfo | None) -> list[str]:
    """Notes about ratios that do not do what the user may think (never errors)."""
    notes = []
    alpha_given = recipe.alpha != _default("alpha")  # the recipe cannot tell "--alpha 0.5" from no --alpha
    if alpha_given and not use.alpha_used:
        if mode.models == 1:
            why = f"{mode.name} takes A only"
        elif not mode.mode.per_key_ratio:
            why = f"{mode.name} weighs the models by model_weights"
        elif alpha_v is not None and not alpha_v.base_from_ratio:
            why = "the block weights set every block, BASE included"
        else:
            why = "every merged key takes its ratio from the block weights or an elemental rule"
        notes.append(f"alpha has no effect: {why}, --alpha {recipe.alpha:g}")
    beta_given = recipe.beta != _default("beta")
    if not mode.uses_beta:
        given = [f for f, v in (("--beta", beta_given), ("--weights-beta", recipe.weights_beta),
                                ("--preset-beta", recipe.preset_beta)) if v]
        if given:
            notes.append(f"{'/'.join(given)} ignored: {mode.name} takes no beta (triple_sum and sum_twice do)")
    elif beta_given and not use.beta_used and use.merged:
        notes.append(f"beta has no effect: the beta block weights set every block, BASE included, "
                     f"--beta {recipe.beta:g}")
    for i, r in enumerate(rules):
        if i not in use.rule_hits:
            notes.append(f"elemental rule matches no key, {r.text!r}")
    if use.outside:
        notes.append(f"weighted_sum: alpha outside [0, 1] at {len(use.outside)} keys (extrapolation), "
                     f"first: {use.outside[0]}")
    if use.over_one:
        notes.append(f"triple_sum: alpha + beta > 1 at {len(use.over_one)} keys (A gets a negative weight), "
                     f"first: {use.over_one[0]}")
    return notes


def _legacy_note(arch: ArchSpec) -> str:
    if arch.name == "sdxl":
        return ("--supermerger-time-embed-out11: time_embed and label_emb kept from A "
                "(as supermerger 2023-07 to 2025-11 did on SDXL)")
    return (f"--supermerger-time-embed-out11: time_embed takes the {arch.last_out} ratio "
            "(as supermerger 2023-07 to 2025-11 did)")


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
