"""Command line: ``blockmerge`` (or ``python -m lib_merge``) ``merge|inspect|presets|methods|reproduce|lora|demo``.

Every fault a user can cause ends as one line ``error: <what>, <which>`` and exit code 2 (``--debug`` shows the
traceback); Ctrl-C and SIGTERM end as one line too (exit 130 / 143), after the partial output is removed.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import fields
from typing import Iterator

from .errors import MergeError
from .methods import METHODS, MODES, params_for
from .methods.params import check_declared
from .options import DTYPE_CHOICES, OUTPUT_FORMATS, VAE_CHOICES, choice_list

EPILOG = """examples:
  {prog} demo
  {prog} merge A.safetensors B.safetensors -o out.safetensors --alpha 0.3
  {prog} merge DIFFUSERS_FOLDER B.safetensors --format diffusers -o OUT_FOLDER
  {prog} merge A.safetensors B.safetensors -o out.safetensors --preset GRAD_V --dtype fp16
  {prog} merge A.safetensors B.safetensors C.safetensors -o out.safetensors --mode add_difference --alpha 1
  {prog} merge A.safetensors B.safetensors -o out.safetensors --elemental "OUT03-OUT05:attn2:0.2"
  {prog} merge A.safetensors B.safetensors -o out.safetensors --method slerp --alpha 0.3
  {prog} merge A.safetensors B.safetensors -o out.safetensors --lora style.safetensors:0.8:OUTALL
  {prog} merge BASE.safetensors FT1.safetensors FT2.safetensors FT3.safetensors -o out.safetensors --mode ties -p density=0.2 --alpha 1
  {prog} methods
  {prog} merge --recipe recipe.yaml -o out.safetensors --weights GRAD_A
  {prog} inspect out.safetensors
  {prog} reproduce out.safetensors
  {prog} lora extract TUNED.safetensors BASE.safetensors -o diff.safetensors --rank 32
  {prog} lora bake MODEL.safetensors style.safetensors:0.8 -o baked.safetensors
  {prog} lora bake MODEL.safetensors style.safetensors:0.8:OUTALL -o baked.safetensors
  {prog} lora merge a.safetensors:0.7 b.safetensors:-0.3 -o ab.safetensors --rank auto
"""

MERGE_HELP = {
    "mode": "how the models combine (default weighted_sum): " + "; ".join(f"{m.name}: {m.formula}" for m in MODES.values()),
    "method": "how two tensors combine inside the mode (default linear: the mode's formula): "
              + ", ".join(METHODS) + "; see `methods`",
    "param": "set a declared parameter of the mode or method, NAME=VALUE (repeatable; see `methods`)",
    "alpha": "ratio of B (default 0.5); with a full weight vector or a preset it has no effect",
    "beta": "ratio of C for triple_sum / sum_twice (default 0.25)",
    "weights": "block weights for alpha: 26 values BASE,IN00..IN11,M00,OUT00..OUT11 (SDXL 20), "
               "or 25/19 without BASE (BASE = alpha), or a preset name; a value may be random: R = [0,1], "
               "U = [-0.5,1.5], X = [lower,upper] of --random-lower/--random-upper",
    "weights_beta": "block weights for beta (same forms as --weights)",
    "preset": "block-weight preset for alpha (see `presets list`)",
    "preset_beta": "block-weight preset for beta",
    "elemental": "elemental rules 'Blocks:Elements:Ratio', comma or newline separated, e.g. 'OUT03-OUT05:attn2:0.2'; "
                 "NOT and ranges allowed; the last matching rule wins; a ratio R, U (= [-1,1]) or X draws one per key",
    "dtype": f"output dtype: {choice_list(DTYPE_CHOICES)} (each tensor keeps A's dtype; default)",
    "vae": "VAE keys: merge (with the BASE ratio; default), a (copy A's) or b (copy B's)",
    "bake_vae": "replace the VAE with this file (with or without the first_stage_model. prefix)",
    "prune": "drop EMA weights and DDPM schedule buffers",
    "include": "merge only these parts (comma list: unet, te, vae, block IDs or ranges like IN00-IN05); the rest is A",
    "exclude": "copy these parts from A (same forms as --include; exclude wins)",
    "force": "merge models of different architectures: only keys with the same name and shape merge",
    "overwrite": "replace an existing output file",
    "copy_b_only": "copy keys that exist only in B into the output",
    "swap_ab": "swap A and B, each ratio r becoming 1 - r (weighted_sum, sigmoid, inv_sigmoid): lets B be the "
               "inpainting/pix2pix model, or the model whose unmerged keys are kept",
    "seed": "seed of every random draw, recorded in the recipe: R/U/X ratios (default: one is drawn, printed and "
            "recorded) and add_noise (per key; needs a seed)",
    "random_lower": "per-block lower bounds of X (same forms as --weights)",
    "random_upper": "per-block upper bounds of X (same forms as --weights)",
    "adjust": "Adjust (supermerger's detail/colour tweak, after the merge): 8 numbers IN,OUT,OUT2,contrast,"
              "brightness,cyan_red,magenta_green,yellow_blue (about -5..5; all zeros = off)",
    "lora": "bake a LoRA into the merge (repeatable): W = merge + strength · ΔW, after the merge formula and "
            "before --adjust, the numbers `lora bake` gives on the fp32 merge; STRENGTH default 1, BLOCKS a LoRA "
            "block-weight preset or 12/17/20/26 values as for `lora bake`",
    "supermerger_time_embed_out11": "give time_embed the OUT11 ratio as supermerger 2023-07..2025-11 did "
                                    "(SDXL: keep time_embed/label_emb from A), to reproduce its recipes exactly",
}


def _common_options(top: bool) -> argparse.ArgumentParser:
    """``--debug`` and ``-q``, accepted before and after the subcommand. Below the top level they default to
    SUPPRESS, so a subcommand that does not see them leaves the top level's value alone."""
    c = argparse.ArgumentParser(add_help=False)
    default = False if top else argparse.SUPPRESS
    c.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    c.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bar")
    return c


def _merge_parser(sub, common, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge models into a new .safetensors file", parents=[common],
                       description="Merge A [B [C …]] into OUT. no_interpolation takes A; weighted_sum, sigmoid and "
                                   "inv_sigmoid take A B; add_difference, triple_sum and sum_twice take A B C; "
                                   "linear_combination, task_arithmetic, ties, dare, dare_ties, della and "
                                   "geometric_median take A B and any more (A the base), model_stock A B C and "
                                   "any more.",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL", help="A [B [C …]] (.safetensors, .ckpt/.pt through a safe loader, "
                   "or a diffusers folder); @FILE.yaml: a recipe file whose result stands in for that model (a merge "
                   "chain, no intermediate file)")
    p.add_argument("-o", "--output", required=True, help="output path, ending in .safetensors "
                   "(a folder with --format diffusers)")
    p.add_argument("--format", choices=list(OUTPUT_FORMATS), default="safetensors",
                   help="safetensors: one file (default); diffusers: a diffusers folder (unet/, vae/, text_encoder/…; "
                        "needs twice the output's size on its disk while it is written)")
    p.add_argument("--mode", choices=list(MODES), default=None, help=MERGE_HELP["mode"])
    p.add_argument("--method", choices=list(METHODS), default=None, help=MERGE_HELP["method"])
    p.add_argument("-p", "--param", dest="param_items", action="append", default=None, metavar="NAME=VALUE",
                   help=MERGE_HELP["param"])
    p.add_argument("--seed", type=int, default=None, help=MERGE_HELP["seed"])
    p.add_argument("--alpha", type=float, default=None, help=MERGE_HELP["alpha"])
    p.add_argument("--beta", type=float, default=None, help=MERGE_HELP["beta"])
    for name in ("weights", "weights_beta", "preset", "preset_beta", "elemental"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=MERGE_HELP[name])
    for name in ("random_lower", "random_upper"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar="VALUES", help=MERGE_HELP[name])
    p.add_argument("--adjust", default=None, metavar="IN,OUT,OUT2,C,BR,CR,MG,YB", help=MERGE_HELP["adjust"])
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:STRENGTH[:BLOCKS]]",
                   help=MERGE_HELP["lora"])
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES), default=None, help=MERGE_HELP["dtype"])
    p.add_argument("--vae", choices=list(VAE_CHOICES), default=None, help=MERGE_HELP["vae"])
    p.add_argument("--bake-vae", dest="bake_vae", default=None, metavar="FILE", help=MERGE_HELP["bake_vae"])
    for name in ("include", "exclude"):
        p.add_argument("--" + name, default=None, metavar="PARTS", help=MERGE_HELP[name])
    for name in ("prune", "force", "copy_b_only", "swap_ab", "supermerger_time_embed_out11"):  # --no-X turns off a recipe file's X
        p.add_argument("--" + name.replace("_", "-"), dest=name, action=argparse.BooleanOptionalAction, default=None,
                       help=MERGE_HELP[name])
    p.add_argument("--overwrite", action="store_true", help=MERGE_HELP["overwrite"])
    p.add_argument("--recipe", default=None, metavar="FILE", help="read the recipe from a JSON or YAML file "
                   "(the blockmerge_recipe object; relative model paths are relative to the file's folder); "
                   "flags given on the command line override its fields (--weights replaces its preset)")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: number of cores, at most 4)")
    p.add_argument("--device", default="cpu", help="compute device: cpu (default) or cuda")
    return p


def _lora_parser(sub, common) -> None:
    """``lora extract``, ``lora bake`` and ``lora merge`` (issue 13)."""
    lo = sub.add_parser("lora", help="extract a LoRA from two checkpoints, bake LoRAs into a checkpoint, "
                        "or merge LoRAs into one", parents=[common])
    lsub = lo.add_subparsers(dest="lora_cmd", metavar="extract|bake|merge")
    lsub.required = True
    e = lsub.add_parser("extract", parents=[common], help="ΔW = TUNED − BASE per Linear/Conv weight, "
                        "truncated by SVD, as a kohya/A1111 LoRA file the WebUI loads")
    e.add_argument("tuned", metavar="TUNED")
    e.add_argument("base", metavar="BASE")
    e.add_argument("-o", "--output", required=True, help="output path, ending in .safetensors")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, default=None, help="rank kept per module (capped by its smaller side)")
    g.add_argument("--energy", type=float, default=None, metavar="FRACTION",
                   help="per module, the smallest rank keeping this fraction of ΔW's squared Frobenius norm")
    e.add_argument("--conv-rank", dest="conv_rank", type=int, default=None,
                   help="rank of conv k×k (k > 1) modules (default: as --rank / --energy)")
    e.add_argument("--text-encoder", dest="text_encoder", action="store_true",
                   help="also extract the text encoders (CLIP-L; SD2's and SDXL's OpenCLIP with q/k/v split)")
    e.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="LoRA dtype (default fp16)")
    e.add_argument("--device", default="cpu", help="SVD device: cpu (default) or cuda")
    e.add_argument("--exact-svd", dest="exact_svd", action="store_true", help="always the exact SVD (by default a "
                   "rank small against the matrix uses a randomized SVD, within 1 %% of the exact error)")
    e.add_argument("--overwrite", action="store_true", help=MERGE_HELP["overwrite"])
    e.add_argument("--verbose", action="store_true", help="print every module's rank and relative error")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    b = lsub.add_parser("bake", parents=[common], help="W' = W + strength · ΔW (LoRA, LoCon, LoHa, LoKr; "
                        "compvis- or diffusers-style names)")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH[:BLOCKS]]", help="LoRA .safetensors files "
                   "(strength 1 by default); BLOCKS: a LoRA block-weight preset (NONE, ALL, INS, IND, INALL, MIDD, "
                   "OUTD, OUTS, OUTALL, ALL0.5) or 12/17/20/26 comma-separated values, as the LoRA Block Weight "
                   "extension takes them")
    b.add_argument("-o", "--output", required=True, help="output path, ending in .safetensors")
    b.add_argument("--overwrite", action="store_true", help=MERGE_HELP["overwrite"])
    m = lsub.add_parser("merge", parents=[common], help="merge LoRAs into one: factors concatenated (the exact "
                        "sum of the ΔW), or with --rank the summed ΔW re-compressed by SVD")
    m.add_argument("loras", nargs="+", metavar="LORA[:RATIO]", help="LoRA .safetensors files (ratio 1 by default; "
                   "negative subtracts)")
    m.add_argument("-o", "--output", required=True, help="output path, ending in .safetensors")
    m.add_argument("--rank", default=None, metavar="N|auto", help="re-compress each module's summed ΔW to rank N "
                   "by SVD (auto: the module's largest input rank); without it the factors are concatenated "
                   "(rank = the sum of the ranks, exact)")
    m.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="LoRA dtype (default fp16)")
    m.add_argument("--exact-svd", dest="exact_svd", action="store_true", help="always the exact SVD with --rank")
    m.add_argument("--overwrite", action="store_true", help=MERGE_HELP["overwrite"])
    m.add_argument("--json", action="store_true", help="print the report as JSON")


def default_prog() -> str:
    """``blockmerge`` (the console script), or ``python -m lib_merge`` when run that way."""
    return "python -m lib_merge" if os.path.basename(sys.argv[0] or "") == "__main__.py" else "blockmerge"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or default_prog()
    epilog = EPILOG.format(prog=prog)
    p = argparse.ArgumentParser(prog=prog, description="BlockMerge: block-weighted merging of "
                                "Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL), streamed tensor by tensor.",
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[_common_options(top=True)])
    common = _common_options(top=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _merge_parser(sub, common, epilog)
    i = sub.add_parser("inspect", help="architecture, dtypes, size, block summary and metadata of a checkpoint",
                       parents=[common])
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--hash", action="store_true", help="also compute the sha256 (cached)")
    pr = sub.add_parser("presets", help="list or show block-weight presets", parents=[common])
    psub = pr.add_subparsers(dest="presets_cmd", metavar="list|show")
    psub.required = True
    pl = psub.add_parser("list", help="list preset names", parents=[common])
    pl.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1")
    ps = psub.add_parser("show", help="show a preset's values", parents=[common])
    ps.add_argument("name")
    ps.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1")
    sub.add_parser("methods", help="every mode and method: formula, models, allowed pairings, parameters",
                   parents=[common])
    r = sub.add_parser("reproduce", help="re-run the recipe stored in a merged file and check the bytes are identical",
                       parents=[common])
    r.add_argument("file")
    r.add_argument("-o", "--output", default=None, help="where to write (default: <stem>.reproduced.safetensors "
                   "beside FILE; for a diffusers folder, FOLDER.reproduced)")
    r.add_argument("--search", action="append", default=[], metavar="DIR", help="folder (with subfolders) to look for inputs by sha256; "
                   "the hash cache, the output's folder and the current folder are always looked in")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--threads", type=int, default=None)
    _lora_parser(sub, common)
    d = sub.add_parser("demo", help="build two small checkpoints with the real SD1.5 key layout, merge them, inspect",
                       parents=[common])
    d.add_argument("dir", nargs="?", default=None, help="parent folder (a fresh subfolder is made each run)")
    return p


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0
        self.open_line = False  # a bar is drawn without its newline yet

    def close(self) -> None:
        """End a half-drawn bar, so an error message starts its own line."""
        if self.open_line:
            sys.stderr.write("\n")
            self.open_line = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{stage:<24} [{bar:<30}] {frac * 100:5.1f}%")
        self.open_line = True
        if done >= total:
            self.close()
        sys.stderr.flush()


def merge_recipe(args):
    """The ``--recipe`` file (or the defaults) with every field given on the command line laid over it."""
    from .adjust import parse_adjust
    from .recipe import Recipe, load_recipe_file, with_overrides
    base = load_recipe_file(args.recipe) if args.recipe else Recipe()
    changes = {"models": [load_recipe_file(m[1:]) if m.startswith("@") else m for m in args.models]} if args.models else {}
    for f in fields(Recipe):
        v = getattr(args, f.name, None) if f.name != "models" else None
        if isinstance(v, str) and not v.strip():
            raise MergeError(f"empty {f.name.replace('_', ' ')}, --{f.name.replace('_', '-')}")
        if f.name == "adjust" and v is not None:
            v = parse_adjust(v, "--adjust") or [0.0] * 8  # all zeros: off, also over a recipe file's adjust
        if f.name == "lora" and v is not None:  # --lora replaces a recipe file's list
            v = [lora_entry(text) for text in v]
        if v is not None:
            changes[f.name] = v
    if args.param_items:
        mode, method = changes.get("mode", base.mode), changes.get("method", base.method)
        given = dict(base.params) if (mode, method) == (base.mode, base.method) else {}
        changes["params"] = {**given, **parse_params(mode, method, args.param_items)}
    return with_overrides(base, changes)


def lora_entry(text: str) -> dict:
    """``--lora PATH[:STRENGTH[:BLOCKS]]`` as a recipe ``lora`` entry (read as ``lora bake`` reads it)."""
    from .lora.bake import parse_lora_arg
    lo = parse_lora_arg(text)
    return {"path": str(lo.path), "strength": lo.strength, "blocks": lo.blocks}


def parse_params(mode: str, method: str, items: list[str]) -> dict:
    """``-p NAME=VALUE`` options, each parsed by the mode's or the method's declaration of NAME."""
    declared, owner = params_for(mode, method)
    out = {}
    for item in items:
        name, eq, text = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise MergeError(f"-p takes NAME=VALUE, -p {item!r}")
        decl = next((p for p in declared if p.name == name), None)
        if decl is None:
            check_declared(declared, {name: None}, owner)  # raises: unknown parameter, naming the declared ones
        out[name] = decl.parse_text(text, f"{owner}, -p {item}")
    return out


def cmd_merge(args) -> int:
    from .merge import merge_to_file, normalize_recipe
    recipe = normalize_recipe(merge_recipe(args))
    write = merge_to_file
    if args.format == "diffusers":
        from .folder_output import merge_to_folder as write
    res = write(recipe, args.output, overwrite=args.overwrite, threads=args.threads, device=args.device,
                progress=args.progress)
    for line in res.plan.report.lines():
        print(f"note: {line}")
    size = res.output.stat().st_size if res.output.is_file() else sum(
        p.stat().st_size for p in res.output.rglob("*") if p.is_file())
    print(f"wrote {res.output} ({size / 1e9:.3f} GB) in {res.seconds:.2f} s")
    print(f"sha256 {res.sha256}  short hash [{res.short_hash}]")
    return 0


def cmd_inspect(args) -> int:
    from .inspection import format_summary, summarize, to_json
    s = summarize(args.file)
    if args.hash:
        from . import hashing
        s["sha256"] = hashing.sha256_file(args.file)
        s["short_hash"] = s["sha256"][:10]
    if args.json:
        print(to_json(s))
    else:
        print(format_summary(s))
        if args.hash:
            print(f"sha256:       {s['sha256']}  [{s['short_hash']}]")
    return 0


def cmd_presets(args) -> int:
    """``presets list``: one line per preset, ``NAME<TAB>source<TAB>values`` (the values as the architecture
    uses them, so a line can be pasted into user.tsv); ``presets show NAME``: the values, block by block."""
    from . import presets
    from .arch import ARCHS
    from .weights import format_vector
    arch = ARCHS[args.arch]
    for problem in presets.user_problems():
        print(f"note: {problem}", file=sys.stderr)
    if args.presets_cmd == "list":
        table = {**presets.table("sd1"), **(presets.table("sdxl") if args.arch == "sdxl" else {})}
        for name in presets.names(arch):
            p = table[name]
            converted = "" if p.family == arch.preset_family else " (converted from SD1)"
            print(f"{name}\t{p.source}{converted}\t{format_vector(presets.resolve(name, arch))}")
        print(f"user presets: {presets.user_presets_path()}", file=sys.stderr)
        return 0
    found = presets.lookup(args.name, arch)
    print(f"{found.name}\t{format_vector(found.values)}")
    print("  " + "  ".join(f"{b}={v:g}" for b, v in zip(arch.blocks, found.values)))
    return 0


def methods_text() -> str:
    """The ``methods`` listing, generated from the mode and method declarations."""
    lines = ["modes (--mode; the formula across models):"]
    for m in MODES.values():
        extra = "".join([", uses beta" if m.uses_beta else "", ", whole tensors" if not m.elementwise else "",
                         ", seeded" if m.seeded else ""])
        lines.append(f"  {m.name:<18} {m.formula}  [models: {m.models_text()}{extra}]")
        for p in m.params:
            lines.append(f"      -p {p.describe()}")
    lines.append("methods (--method; how two tensors combine inside a mode; -p NAME=VALUE sets a parameter):")
    for meth in METHODS.values():
        modes = "every mode" if meth.modes is None else ", ".join(meth.modes)
        extra = "".join([", whole tensors" if not meth.elementwise else "", ", uses beta" if meth.uses_beta else "",
                         ", seeded" if meth.seeded else ""])
        lines.append(f"  {meth.name:<18} {meth.formula}  [with: {modes}{extra}]")
        for p in meth.params:
            lines.append(f"      -p {p.describe()}")
        if not meth.params:
            lines.append("      (no parameters)")
    return "\n".join(lines)


def cmd_methods(args) -> int:
    from .methods import kernels
    print(methods_text())
    print(f"CPU kernels for ties, dare and dare_ties: {kernels.status()}")
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce
    ok, new, detail = reproduce(args.file, args.output, args.search, args.overwrite, args.threads,
                                progress=args.progress)
    print(detail)
    return 0 if ok else 1


def cmd_lora(args) -> int:
    if args.lora_cmd == "extract":
        import json
        from .lora.extract import extract_lora
        res = extract_lora(args.tuned, args.base, args.output, rank=args.rank, energy=args.energy,
                           conv_rank=args.conv_rank, text_encoder=args.text_encoder, dtype=args.dtype,
                           device=args.device, overwrite=args.overwrite, exact=args.exact_svd)
        if args.json:
            print(json.dumps(res.to_json(), indent=1))
            return 0
        for line in res.summary(args.verbose):
            print(line)
        print(f"wrote {res.output} in {res.seconds:.2f} s")
        print(f"sha256 {res.sha256}")
        return 0
    if args.lora_cmd == "merge":
        return cmd_lora_merge(args)
    from .lora.bake import bake_loras, parse_lora_arg
    res = bake_loras(args.model, [parse_lora_arg(t) for t in args.loras], args.output, overwrite=args.overwrite)
    print(f"baked {res.modules} LoRA modules into {res.patched} weights ({res.arch})")
    print(f"wrote {res.output} in {res.seconds:.2f} s")
    print(f"sha256 {res.sha256}")
    return 0


def cmd_lora_merge(args) -> int:
    import json
    from .lora.merge import merge_loras, parse_merge_arg
    res = merge_loras([parse_merge_arg(t) for t in args.loras], args.output, rank=args.rank, dtype=args.dtype,
                      overwrite=args.overwrite, exact=args.exact_svd)
    if args.json:
        print(json.dumps(res.to_json(), indent=1))
        return 0
    for line in res.summary():
        print(line)
    print(f"wrote {res.output} in {res.seconds:.2f} s")
    print(f"sha256 {res.sha256}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.dir)
    return 0


COMMANDS = {"merge": cmd_merge, "inspect": cmd_inspect, "presets": cmd_presets, "methods": cmd_methods,
            "reproduce": cmd_reproduce, "lora": cmd_lora,
            "demo": cmd_demo}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so the same cleanup (partial file removed) runs."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the command runs, SIGTERM raises ``Terminated`` in the main thread (only it may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise the broken pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def fail(args, message: str, code: int) -> int:
    args.progress.close()
    print("error: " + " ".join(message.splitlines()), file=sys.stderr)
    return code


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    args.progress = Progress(not args.quiet)
    with sigterm_as_interrupt():
        try:
            code = COMMANDS[args.command](args)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return code
        except MergeError as e:
            if args.debug:
                raise
            return fail(args, str(e), 2)
        except Terminated:
            return fail(args, "terminated by SIGTERM", 128 + signal.SIGTERM)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
            _stdout_to_devnull()
            return 128 + getattr(signal, "SIGPIPE", 13)
        except KeyboardInterrupt:
            return fail(args, "interrupted", 130)
