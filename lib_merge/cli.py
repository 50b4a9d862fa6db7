"""Command line: ``python -m lib_merge merge|inspect|presets|reproduce|demo``."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from .errors import MergeError
from .modes import MODES
from .options import DTYPE_CHOICES, VAE_CHOICES, choice_list

EPILOG = """examples:
  python -m lib_merge demo
  python -m lib_merge merge A.safetensors B.safetensors -o out.safetensors --alpha 0.3
  python -m lib_merge merge A.safetensors B.safetensors -o out.safetensors --preset GRAD_V --dtype fp16
  python -m lib_merge merge A.safetensors B.safetensors C.safetensors -o out.safetensors --mode add_difference --alpha 1
  python -m lib_merge merge A.safetensors B.safetensors -o out.safetensors --elemental "OUT03-OUT05:attn2:0.2"
  python -m lib_merge inspect out.safetensors
  python -m lib_merge reproduce out.safetensors
"""

MERGE_HELP = {
    "mode": "how the models combine (default weighted_sum): " + "; ".join(f"{m.name}: {m.formula}" for m in MODES.values()),
    "alpha": "ratio of B (default 0.5); with a full weight vector or a preset it has no effect",
    "beta": "ratio of C for triple_sum / sum_twice (default 0.25)",
    "weights": "block weights for alpha: 26 values BASE,IN00..IN11,M00,OUT00..OUT11 (SDXL 20), "
               "or 25/19 without BASE (BASE = alpha), or a preset name",
    "weights_beta": "block weights for beta (same forms as --weights)",
    "preset": "block-weight preset for alpha (see `presets list`)",
    "preset_beta": "block-weight preset for beta",
    "elemental": "elemental rules 'Blocks:Elements:Ratio', comma or newline separated, e.g. 'OUT03-OUT05:attn2:0.2'; "
                 "NOT and ranges allowed; the last matching rule wins",
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
    "supermerger_time_embed_out11": "give time_embed the OUT11 ratio as supermerger 2023-07..2025-11 did "
                                    "(SDXL: keep time_embed/label_emb from A), to reproduce its recipes exactly",
}


def _merge_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge 1-3 models into a new .safetensors file",
                       description="Merge A [B [C]] into OUT. no_interpolation takes A; weighted_sum, sigmoid and "
                                   "inv_sigmoid take A B; add_difference, triple_sum and sum_twice take A B C.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL", help="A [B [C]] (.safetensors, or .ckpt/.pt through a safe loader)")
    p.add_argument("-o", "--output", required=True, help="output path, ending in .safetensors")
    p.add_argument("--mode", choices=list(MODES), default=None, help=MERGE_HELP["mode"])
    p.add_argument("--alpha", type=float, default=None, help=MERGE_HELP["alpha"])
    p.add_argument("--beta", type=float, default=None, help=MERGE_HELP["beta"])
    for name in ("weights", "weights_beta", "preset", "preset_beta", "elemental"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=MERGE_HELP[name])
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES), default=None, help=MERGE_HELP["dtype"])
    p.add_argument("--vae", choices=list(VAE_CHOICES), default=None, help=MERGE_HELP["vae"])
    p.add_argument("--bake-vae", dest="bake_vae", default=None, metavar="FILE", help=MERGE_HELP["bake_vae"])
    for name in ("include", "exclude"):
        p.add_argument("--" + name, default=None, metavar="PARTS", help=MERGE_HELP[name])
    for name in ("prune", "force", "copy_b_only", "swap_ab", "supermerger_time_embed_out11"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None, help=MERGE_HELP[name])
    p.add_argument("--overwrite", action="store_true", help=MERGE_HELP["overwrite"])
    p.add_argument("--recipe", default=None, metavar="FILE", help="read the recipe from a JSON or YAML file "
                   "(the blockmerge_recipe object); flags given on the command line override it")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: number of cores, at most 4)")
    p.add_argument("--device", default="cpu", help="compute device: cpu (default) or cuda")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_merge", description="BlockMerge: block-weighted merging of "
                                "Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL), streamed tensor by tensor.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _merge_parser(sub)
    i = sub.add_parser("inspect", help="architecture, dtypes, size, block summary and metadata of a checkpoint")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--hash", action="store_true", help="also compute the sha256 (cached)")
    pr = sub.add_parser("presets", help="list or show block-weight presets")
    psub = pr.add_subparsers(dest="presets_cmd", metavar="list|show")
    psub.required = True
    pl = psub.add_parser("list", help="list preset names")
    pl.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1")
    ps = psub.add_parser("show", help="show a preset's values")
    ps.add_argument("name")
    ps.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1")
    r = sub.add_parser("reproduce", help="re-run the recipe stored in a merged file and check the bytes are identical")
    r.add_argument("file")
    r.add_argument("-o", "--output", default=None, help="where to write (default: <stem>.reproduced.safetensors beside FILE)")
    r.add_argument("--search", action="append", default=[], metavar="DIR", help="folder (with subfolders) to look for inputs by sha256; "
                   "the hash cache, the output's folder and the current folder are always looked in")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--threads", type=int, default=None)
    d = sub.add_parser("demo", help="build two small checkpoints with the real SD1.5 key layout, merge them, inspect")
    d.add_argument("dir", nargs="?", default=None, help="parent folder (a fresh subfolder is made each run)")
    return p


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0

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
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def cmd_merge(args) -> int:
    from .merge import merge_to_file
    from .recipe import Recipe, load_recipe_file
    recipe = load_recipe_file(args.recipe) if args.recipe else Recipe()
    if args.models:
        recipe.models = list(args.models)
    for f in fields(Recipe):
        if f.name == "models":
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(recipe, f.name, v)
    from .merge import normalize_recipe
    recipe = normalize_recipe(recipe)
    res = merge_to_file(recipe, args.output, overwrite=args.overwrite, threads=args.threads, device=args.device,
                        progress=Progress(not args.quiet))
    for line in res.plan.report.lines():
        print(f"note: {line}")
    print(f"wrote {res.output} ({res.output.stat().st_size / 1e9:.3f} GB) in {res.seconds:.2f} s")
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


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce
    ok, new, detail = reproduce(args.file, args.output, args.search, args.overwrite, args.threads,
                                progress=Progress(not args.quiet))
    print(detail)
    return 0 if ok else 1


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.dir)
    return 0


COMMANDS = {"merge": cmd_merge, "inspect": cmd_inspect, "presets": cmd_presets, "reproduce": cmd_reproduce,
            "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MergeError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
