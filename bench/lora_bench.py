"""LoRA extract, bake and merge on full-size synthetic SD1.5 checkpoints, in one run (issue 13, Performance).

Inputs: BASE = methods_bench's A (random fp16 values at the exact SD1.5 key layout, shared with that script when
``--dir`` is the same) and TUNED = BASE + NOISE · N(0, 1) on every float entry (as methods_bench's fine-tunes)
plus a rank-8 ΔW (per-entry std LOWRANK_STD) on every 2-D attention weight, so that a rank-32 LoRA captures
something real there and its error figures mean something; elsewhere ΔW is flat noise, the randomized SVD's worst
case. Files are written one tensor at a time and reused when they already exist in ``--dir``.

Each case runs the command line (``lib_merge.cli.main``) in its own process while this process samples its
RssAnon every 10 ms with merge_bench's sampler. ``idle`` (python + import torch) is the memory baseline; a 2-model
weighted_sum of BASE and TUNED (fp16 out) is the time baseline. Cases:

* ``extract_r32``: ``lora extract TUNED BASE --rank 32`` (randomized SVD where the engine chooses it);
* ``extract_r32_exact``: the same with ``--exact-svd``;
* ``bake``: ``lora bake BASE extract_r32's LoRA``;
* ``lora_merge`` / ``lora_merge_r32``: ``lora merge`` of the two extracted LoRAs, without and with ``--rank 32``
  (both are 282 modules of rank 32, so the cost is that of merging two independent LoRAs of that size).

The error columns come from the engine's own ``--json`` report (per module ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F). Two checks
close the table: randomized/exact − 1 of the mean error (and of the worst module) within 1 %, and bake at most
1.5x the weighted_sum's in-process time.

    python bench/lora_bench.py [--dir bench/out] [--cases bake,lora_merge,...] [--device cpu|cuda] [--quick]

Full size: about 6.5 GB in ``--dir`` (BASE and TUNED 2.1 GB each, the bake/merge output 2.1 GB while a case runs,
LoRAs of 68-135 MB); the exact extract dominates the time (exact SVDs of 282 UNet modules up to 1280×23040: on
the order of 10-25 minutes on 2 cores, against about a minute or two for the randomized one); ``--cases
extract_r32,bake`` leaves it out (and the error check SKIPs).

``--quick`` uses the tiny layout (a smoke test of the script, seconds); its figures mean nothing (every module is
smaller than rank 32, so both extracts are exact).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import sample_run as _sample  # noqa: E402  (one sampler for every bench script)
from methods_bench import MB, NOISE, build_file, build_inputs, warm, write_finetune  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RANK = 32
LOWRANK = 8  # rank of TUNED's change on attention weights
LOWRANK_STD = 0.03  # per-entry std of that change (NOISE is 0.01: the low-rank part holds ~90 % of ΔW's energy)
ERROR_TOLERANCE = 0.01  # randomized SVD error within 1 % of the exact truncation error
BAKE_FACTOR = 1.5  # bake at most 1.5x the weighted_sum time

IDLE_CODE = """
import time, torch
t = time.perf_counter()
print(json.dumps({"inproc": time.perf_counter() - t}))
"""

CLI_CODE = """
import contextlib, io, time, torch
from lib_merge.cli import main
buf = io.StringIO()
t = time.perf_counter()
with contextlib.redirect_stdout(buf):
    rc = main(ARGV)
inproc = time.perf_counter() - t
if rc:
    sys.exit(rc)
print(json.dumps({"inproc": inproc, "report": json.loads(buf.getvalue()) if "--json" in ARGV else None}))
"""


@dataclass(frozen=True)
class Case:
    """A command line with ``{base}``, ``{tuned}``, ``{out}``, ``{lora_r32}``, ``{lora_exact}``, ``{lora_out}``,
    ``{device}`` filled in by ``argv``; ``needs``: cases whose output it reads; no argv: the idle baseline."""
    name: str
    args: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()


CASES = [
    Case("idle"),
    Case("weighted_sum", ("merge", "{base}", "{tuned}", "--mode", "weighted_sum", "--alpha", "0.5", "--dtype", "fp16",
                          "-o", "{out}")),
    Case("extract_r32", ("lora", "extract", "{tuned}", "{base}", "--rank", str(RANK), "--device", "{device}",
                         "--json", "-o", "{lora_r32}")),
    Case("extract_r32_exact", ("lora", "extract", "{tuned}", "{base}", "--rank", str(RANK), "--device", "{device}",
                               "--exact-svd", "--json", "-o", "{lora_exact}")),
    Case("bake", ("lora", "bake", "{base}", "{lora_r32}", "-o", "{out}"), needs=("extract_r32",)),
    Case("lora_merge", ("lora", "merge", "{lora_r32}", "{lora_exact}", "--json", "-o", "{lora_out}"),
         needs=("extract_r32", "extract_r32_exact")),
    Case("lora_merge_r32", ("lora", "merge", "{lora_r32}", "{lora_exact}", "--rank", str(RANK), "--json",
                            "-o", "{lora_out}"), needs=("extract_r32", "extract_r32_exact")),
]
BASELINES = ("idle", "weighted_sum")


def argv(case: Case, files: dict[str, str]) -> list[str]:
    return ["--quiet", *(a.format(**files) for a in case.args)]


def select(names: set[str]) -> list[Case]:
    """The named cases, the baselines and the cases they read the outputs of, in run order."""
    by_name = {c.name: c for c in CASES}
    wanted = set(names) | set(BASELINES)
    for n in list(wanted):
        wanted.update(by_name[n].needs)
    return [c for c in CASES if c.name in wanted]


# -- inputs ---------------------------------------------------------------------------------------------------
def add_lowrank(key: str, t, gen) -> None:
    """In place on a 2-D attention weight: + (U @ V) · LOWRANK_STD / √r with U, V standard normal, rank r =
    LOWRANK (capped by the smaller side), so each entry's std is LOWRANK_STD. Other tensors are left alone."""
    import torch
    if t.dim() != 2 or "attn" not in key or not key.endswith(".weight"):
        return
    r = min(LOWRANK, *t.shape)
    u = torch.randn(t.shape[0], r, generator=gen, dtype=torch.float32)
    v = torch.randn(r, t.shape[1], generator=gen, dtype=torch.float32)
    t.addmm_(u, v, alpha=LOWRANK_STD / r ** 0.5)


def build_lora_inputs(d: Path, quick: bool) -> tuple[Path, Path]:
    """(BASE, TUNED) in ``d``, built when missing."""
    base = build_inputs(d, quick, count=1)[0]
    tuned = d / f"lb_{'tiny' if quick else 'sd15'}_T.safetensors"
    build_file(tuned, lambda tmp: write_finetune(base, tmp, seed=300, change=add_lowrank))
    return base, tuned


# -- report ---------------------------------------------------------------------------------------------------
def errors(r: dict) -> list[float] | None:
    """The per-module relative errors of a case's ``--json`` report (None without one)."""
    report = (r or {}).get("report") or {}
    mods = report.get("modules")
    if not mods:
        return None
    return [float(m["rel_error"]) for m in mods]


def lowrank_count(r: dict) -> str:
    mods = ((r or {}).get("report") or {}).get("modules")
    if not mods:
        return "-"
    return f"{sum(1 for m in mods if m.get('method') == 'lowrank')}/{len(mods)}"


def table(cases: list[Case], results: dict[str, dict]) -> list[str]:
    base = results.get("weighted_sum", {}).get("inproc")
    idle = results.get("idle", {}).get("peak_anon")
    lines = [f"{'case':<18} {'wall s':>7} {'run s':>7} {'x ws':>6} {'peak anon MB':>12} {'over idle MB':>12} "
             f"{'lowrank':>8} {'err min':>8} {'median':>8} {'mean':>8} {'max':>8}"]
    for c in cases:
        r = results[c.name]
        if "error" in r:
            lines.append(f"{c.name:<18} FAILED: {r['error']}")
            continue
        ratio = f"{r['inproc'] / base:6.2f}" if base and c.args else f"{'-':>6}"
        over = f"{(r['peak_anon'] - idle) / MB:12.0f}" if idle is not None else f"{'-':>12}"
        errs = errors(r)
        stats = (f"{min(errs):8.4f} {statistics.median(errs):8.4f} {statistics.fmean(errs):8.4f} {max(errs):8.4f}"
                 if errs else " ".join(f"{'-':>8}" for _ in range(4)))
        lines.append(f"{c.name:<18} {r['wall']:7.2f} {r['inproc']:7.2f} {ratio} {r['peak_anon'] / MB:12.0f} {over} "
                     f"{lowrank_count(r):>8} {stats}")
    return lines


def _excess(fast: float, exact: float) -> float:
    """fast/exact − 1, with 0/0 = 0 (a rank at full size is exact both ways)."""
    if exact == 0.0:
        return 0.0 if fast == 0.0 else float("inf")
    return fast / exact - 1.0


def checks(results: dict[str, dict]) -> list[str]:
    """The issue-13 performance requirements, PASS/FAIL (or SKIP when a case they need did not run)."""
    out = []
    fast, exact = errors(results.get("extract_r32")), errors(results.get("extract_r32_exact"))
    if fast and exact:
        mean_f, mean_e = statistics.fmean(fast), statistics.fmean(exact)
        x = _excess(mean_f, mean_e)
        out.append(f"{'PASS' if x <= ERROR_TOLERANCE else 'FAIL'} extract error: randomized mean {mean_f:.5f} vs "
                   f"exact {mean_e:.5f}, {100 * x:+.3f} % (limit +{100 * ERROR_TOLERANCE:g} %)")
        f_by = {m["name"]: float(m["rel_error"]) for m in results["extract_r32"]["report"]["modules"]}
        e_by = {m["name"]: float(m["rel_error"]) for m in results["extract_r32_exact"]["report"]["modules"]}
        if set(f_by) != set(e_by):
            out.append(f"FAIL extract modules: the two extracts cover different modules "
                       f"({len(f_by)} randomized, {len(e_by)} exact)")
        else:
            name, worst = max(((n, _excess(f_by[n], e_by[n])) for n in f_by), key=lambda p: p[1])
            out.append(f"{'PASS' if worst <= ERROR_TOLERANCE else 'FAIL'} extract error, worst module: {name} "
                       f"{f_by[name]:.5f} vs exact {e_by[name]:.5f}, {100 * worst:+.3f} % "
                       f"(limit +{100 * ERROR_TOLERANCE:g} %)")
    else:
        out.append("SKIP extract error: needs the extract_r32 and extract_r32_exact cases")
    ws, bake = results.get("weighted_sum"), results.get("bake")
    if ws and "error" not in ws and bake and "error" not in bake:
        x = bake["inproc"] / ws["inproc"]
        out.append(f"{'PASS' if x <= BAKE_FACTOR else 'FAIL'} bake speed: rank-{RANK} bake {bake['inproc']:.2f} s = "
                   f"{x:.2f}x the weighted_sum's {ws['inproc']:.2f} s (limit {BAKE_FACTOR:g}x)")
    else:
        out.append("SKIP bake speed: needs the weighted_sum and bake cases")
    return out


def main(argv_: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all; idle, weighted_sum "
                    "and the extracts a case reads are always run)")
    ap.add_argument("--device", default="cpu", help="SVD device of the extracts: cpu (default) or cuda")
    ap.add_argument("--quick", action="store_true", help="tiny layout: a smoke test of this script")
    args = ap.parse_args(argv_)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("BLOCKMERGE_CACHE", str(d / "cache"))

    cases = CASES
    if args.cases:
        wanted = {n.strip() for n in args.cases.split(",") if n.strip()}
        unknown = wanted - {c.name for c in CASES}
        if unknown:
            ap.error(f"unknown case {sorted(unknown)[0]!r}; cases: {', '.join(c.name for c in CASES)}")
        cases = select(wanted)

    base, tuned = build_lora_inputs(d, args.quick)
    from lib_merge import hashing
    for p in (base, tuned):  # hashed once and cached (path, size, mtime), as a user's second run would find them
        hashing.sha256_file(p)
    files = {"base": str(base), "tuned": str(tuned), "out": str(d / "lb_out.safetensors"),
             "lora_r32": str(d / "lb_lora_r32.safetensors"), "lora_exact": str(d / "lb_lora_r32_exact.safetensors"),
             "lora_out": str(d / "lb_lora_merged.safetensors"), "device": args.device}
    made = [Path(files[k]) for k in ("out", "lora_r32", "lora_exact", "lora_out")]
    for p in made:
        if p.exists():
            p.unlink()
    results: dict[str, dict] = {}
    try:
        for c in cases:
            for p in (Path(files["out"]), Path(files["lora_out"])):
                if p.exists():
                    p.unlink()
            if any("error" in results.get(n, {"error": "not run"}) for n in c.needs):
                results[c.name] = {"error": f"needs {', '.join(c.needs)}", "wall": 0.0, "peak_anon": 0}
                print(f"  skipped {c.name}: {results[c.name]['error']}", flush=True)
                continue
            if not args.quick:  # the checkpoints this case reads in the page cache, as in the other benches
                warm([p for p, slot in ((base, "{base}"), (tuned, "{tuned}")) if slot in c.args] or [base])
            r = _sample(CLI_CODE, {"ARGV": argv(c, files)}, strict=False) if c.args else _sample(IDLE_CODE, {}, False)
            results[c.name] = r
            if c.name.startswith("extract") and "error" not in r:  # the LoRA's hash known, as for the models
                hashing.remember(r["report"]["output"], r["report"]["sha256"])
            status = f"FAILED: {r['error']}" if "error" in r else (
                f"wall {r['wall']:.2f} s, run {r['inproc']:.2f} s, peak anon {r['peak_anon'] / MB:.0f} MB")
            print(f"  ran {c.name}: {status}", flush=True)
    finally:
        for p in made:
            if p.exists():
                p.unlink()

    size = base.stat().st_size / 1e9
    print()
    print(f"{'tiny (smoke test)' if args.quick else 'sd15'}: BASE and TUNED of {size:.2f} GB each (fp16; TUNED = "
          f"BASE + {NOISE} N(0,1) + rank-{LOWRANK} ΔW of std {LOWRANK_STD} on 2-D attention weights), "
          f"{os.cpu_count()} cores, extract device {args.device}; run s = in-process command time, x ws = run s / "
          f"weighted_sum's; lowrank = modules by randomized SVD / modules; err = per-module "
          f"‖ΔW − ΔW_r‖_F / ‖ΔW‖_F from the command's --json report; MB = 2^20 bytes")
    for line in table(cases, results) + [""] + checks(results):
        print(line)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
