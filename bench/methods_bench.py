"""Every merge method on full-size synthetic SD1.5 fine-tunes of one base, in one run (issue 12).

Inputs: a base A (random fp16 values at the exact SD1.5 key layout) and three "fine-tunes" F1..F3 = A + 0.01 · N(0, 1)
per float entry, so the task vectors Fi - A are small and dense like real ones. Each file is written one tensor at a
time (building costs a few hundred MB, not a model's worth), and reused when it already exists in ``--dir``.

Each case runs ``lib_merge.merge.merge_to_file`` in its own process (fp16 output like the inputs, default threads)
while this process samples its RssAnon (anonymous memory; mmap'd file pages are page cache, not a cost) every
10 ms, as ``bench/merge_bench.py`` does. ``idle`` (python + import torch) is the memory baseline; the 2-model
weighted_sum is the time baseline. Two checks close the table:

* streaming: a 4-model TIES peaks at most 1.5 GB of anonymous memory above idle;
* speed: TIES and DARE over 4 models take at most 3x the in-process time of the 2-model weighted sum.

    python bench/methods_bench.py [--dir bench/out] [--cases ties,dare,...] [--threads N] [--quick]

``--quick`` uses the tiny layout (a smoke test of the script, seconds); its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import sample_run as _sample  # noqa: E402  (one sampler for every bench script)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NOISE = 0.01  # fine-tune perturbation: F = A + NOISE * N(0, 1)
TIES_OVER_IDLE_MB = 1536  # 1.5 GB, in MB of 2^20 bytes
SPEED_FACTOR = 3.0
OPTIONAL_METHODS = ("cosine_a", "cosine_b", "smooth_add")  # benched when the registry has them

IDLE_CODE = """
import time, torch
t = time.perf_counter()
print(json.dumps({"inproc": time.perf_counter() - t}))
"""

MERGE_CODE = """
import os, time, torch
if KERNELS:
    os.environ["BLOCKMERGE_KERNELS"] = KERNELS
from lib_merge.merge import merge_to_file
t = time.perf_counter()
res = merge_to_file(RECIPE, OUT, overwrite=True, threads=THREADS)
print(json.dumps({"inproc": time.perf_counter() - t, "sha256": res.sha256}))
"""


@dataclass
class Case:
    name: str
    models: int  # how many of A, F1, F2, F3 (0: idle)
    recipe: dict = field(default_factory=dict)  # Recipe fields other than models
    kernels: str = ""  # BLOCKMERGE_KERNELS for the case ("numpy": the numpy path even with numba installed)


def fixed_cases() -> list[Case]:
    four = 4
    return [
        Case("idle", 0),
        Case("weighted_sum", 2, {"mode": "weighted_sum", "alpha": 0.5}),
        Case("slerp", 2, {"mode": "weighted_sum", "method": "slerp", "alpha": 0.5}),
        Case("train_difference", 3, {"mode": "add_difference", "method": "train_difference", "alpha": 1.0}),
        Case("extract", 3, {"mode": "add_difference", "method": "extract", "alpha": 0.5, "beta": 0.5}),
        Case("tensor_swap", 2, {"mode": "weighted_sum", "method": "tensor_swap", "alpha": 0.5, "beta": 0.25}),
        Case("add_noise", 2, {"mode": "weighted_sum", "method": "add_noise", "alpha": 0.01, "seed": 1}),
        Case("linear_combination", four, {"mode": "linear_combination"}),
        Case("task_arithmetic", four, {"mode": "task_arithmetic", "alpha": 0.5}),
        Case("ties", four, {"mode": "ties", "alpha": 1.0, "params": {"density": 0.2}}),
        Case("dare", four, {"mode": "dare", "alpha": 1.0, "seed": 1}),
        Case("dare_ties", four, {"mode": "dare_ties", "alpha": 1.0, "seed": 1}),
        Case("ties_numpy", four, {"mode": "ties", "alpha": 1.0, "params": {"density": 0.2}}, kernels="numpy"),
        Case("dare_numpy", four, {"mode": "dare", "alpha": 1.0, "seed": 1}, kernels="numpy"),
        Case("della", four, {"mode": "della", "alpha": 1.0, "seed": 1}),
        Case("model_stock", four, {"mode": "model_stock", "alpha": 1.0}),
        Case("geometric_median", four, {"mode": "geometric_median", "alpha": 1.0}),
    ]


def optional_cases() -> list[Case]:
    """cosine_a / cosine_b / smooth_add, as a method (with the first mode it pairs with) or as a mode, when the
    registry has them at run time; absent ones are skipped."""
    from lib_merge.methods import METHODS, MODES
    out = []
    for name in OPTIONAL_METHODS:
        if name in METHODS:
            m = METHODS[name]
            mode = m.modes[0] if m.modes else "weighted_sum"
            recipe = {"mode": mode, "method": name, "alpha": 0.5}
        elif name in MODES:
            mode = name
            recipe = {"mode": name, "alpha": 0.5}
        else:
            continue
        md = MODES[mode]
        if md.seeded or (name in METHODS and METHODS[name].seeded):
            recipe["seed"] = 1
        out.append(Case(name, 4 if md.variadic else md.models, recipe))
    return out


# -- inputs ---------------------------------------------------------------------------------------------------
def write_finetune(base: Path, out: Path, seed: int, change: Callable | None = None) -> None:
    """``base`` + NOISE · N(0, 1) on every float tensor (same header, same byte layout), one tensor at a time.
    ``change(key, t, gen)``, when given, edits each noisy fp32 tensor in place before the cast back (lora_bench
    adds a low-rank ΔW to attention weights); without it the bytes are as before."""
    import torch
    from lib_merge.io.sources import SafetensorsSource
    from lib_merge.dtypes import ST_TO_TORCH
    gen = torch.Generator().manual_seed(seed)
    with open(base, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = f.read(n)
    src = SafetensorsSource(base)
    try:
        entries = json.loads(head)
        keys = sorted(src.infos, key=lambda k: entries[k]["data_offsets"][0])
        with open(out, "wb") as f:
            f.write(n.to_bytes(8, "little"))
            f.write(head)
            for k in keys:
                t = src.read(k)
                if ST_TO_TORCH[src.infos[k].dtype].is_floating_point and t.numel() > 0:
                    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                    tuned = noise.mul_(NOISE).add_(t.float())
                    if change is not None:
                        change(k, tuned, gen)
                    t = tuned.to(t.dtype)
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    finally:
        src.close()


def build_file(p: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` then rename to ``p``, unless ``p`` exists (a half-written file never has the final name)."""
    if not p.exists():
        t = time.perf_counter()
        tmp = p.with_name(p.name + ".tmp")
        write(tmp)
        os.replace(tmp, p)
        print(f"built {p.name} ({p.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
    return p


def build_inputs(d: Path, quick: bool, count: int = 4) -> list[Path]:
    """A and F1..F3 (the first ``count`` of them) in ``d``, built when missing."""
    from lib_merge import synthetic
    tag = "tiny" if quick else "sd15"
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / f"mb_{tag}_{n}.safetensors" for n in ("A", "F1", "F2", "F3")[:count]]
    listing = synthetic.load_listing("sd15")
    build_file(paths[0], lambda tmp: synthetic.write_checkpoint(tmp, synthetic.tiny(listing) if quick else listing,
                                                                seed=1))
    for i, p in enumerate(paths[1:], start=1):
        build_file(p, lambda tmp: write_finetune(paths[0], tmp, seed=100 + i))
    return paths


# -- one case in its own process --------------------------------------------------------------------------------
def sample_run(code: str, env_vars: dict) -> dict:
    """One case in its own process, sampled as merge_bench samples it; a failing case is a row, not the end."""
    return _sample(code, env_vars, strict=False)


def warm(paths: list[Path]) -> None:
    """Inputs in the page cache before each case, so every case reads from memory alike."""
    subprocess.run(["sh", "-c", "sync; cat " + " ".join(f"'{p}'" for p in paths) + " > /dev/null"], check=True)


# -- report ---------------------------------------------------------------------------------------------------
MB = 1 << 20


def table(cases: list[Case], results: dict[str, dict]) -> list[str]:
    base = results.get("weighted_sum", {}).get("inproc")
    idle = results.get("idle", {}).get("peak_anon")
    lines = [f"{'case':<20} {'models':>6} {'wall s':>8} {'merge s':>8} {'x ws':>6} {'peak anon MB':>13} "
             f"{'over idle MB':>13}"]
    for c in cases:
        r = results[c.name]
        if "error" in r:
            lines.append(f"{c.name:<20} {c.models:>6} FAILED: {r['error']}")
            continue
        ratio = f"{r['inproc'] / base:6.2f}" if base and c.models else f"{'-':>6}"
        over = f"{(r['peak_anon'] - idle) / MB:13.0f}" if idle is not None else f"{'-':>13}"
        lines.append(f"{c.name:<20} {c.models:>6} {r['wall']:8.2f} {r['inproc']:8.2f} {ratio} "
                     f"{r['peak_anon'] / MB:13.0f} {over}")
    return lines


def checks(results: dict[str, dict]) -> list[str]:
    """The two issue-12 requirements, PASS/FAIL (or SKIP when a case they need did not run)."""
    out = []
    idle, ties = results.get("idle"), results.get("ties")
    if idle and ties and "error" not in ties:
        over = (ties["peak_anon"] - idle["peak_anon"]) / MB
        out.append(f"{'PASS' if over <= TIES_OVER_IDLE_MB else 'FAIL'} streaming: 4-model ties peak anon "
                   f"{over:.0f} MB over idle (limit {TIES_OVER_IDLE_MB} MB)")
    else:
        out.append("SKIP streaming: needs the idle and ties cases")
    ws = results.get("weighted_sum")
    for name in ("ties", "dare"):
        r = results.get(name)
        if ws and "error" not in ws and r and "error" not in r:
            x = r["inproc"] / ws["inproc"]
            out.append(f"{'PASS' if x <= SPEED_FACTOR else 'FAIL'} speed: 4-model {name} {r['inproc']:.2f} s = "
                       f"{x:.2f}x the 2-model weighted_sum's {ws['inproc']:.2f} s (limit {SPEED_FACTOR:g}x)")
        else:
            out.append(f"SKIP speed: needs the weighted_sum and {name} cases")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all; idle and "
                    "weighted_sum are always run as the baselines)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny layout: a smoke test of this script")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("BLOCKMERGE_CACHE", str(d / "cache"))

    cases = fixed_cases() + optional_cases()
    if args.cases:
        wanted = {n.strip() for n in args.cases.split(",") if n.strip()}
        unknown = wanted - {c.name for c in cases}
        if unknown:
            ap.error(f"unknown case {sorted(unknown)[0]!r}; cases: {', '.join(c.name for c in cases)}")
        cases = [c for c in cases if c.name in wanted | {"idle", "weighted_sum"}]

    paths = build_inputs(d, args.quick)
    from lib_merge import hashing
    for p in paths:  # hashed once and cached (path, size, mtime), as a user's second merge would find them
        hashing.sha256_file(p)
    out = d / "mb_out.safetensors"
    results: dict[str, dict] = {}
    for c in cases:
        if out.exists():
            out.unlink()
        if not args.quick:
            warm(paths[:max(c.models, 1)])
        if c.models == 0:
            r = sample_run(IDLE_CODE, {})
        else:
            recipe = {"models": [str(p) for p in paths[:c.models]], **c.recipe}
            r = sample_run(MERGE_CODE, {"RECIPE": recipe, "OUT": str(out), "THREADS": args.threads,
                                        "KERNELS": c.kernels})
        results[c.name] = r
        status = f"FAILED: {r['error']}" if "error" in r else (
            f"wall {r['wall']:.2f} s, merge {r['inproc']:.2f} s, peak anon {r['peak_anon'] / MB:.0f} MB")
        print(f"  ran {c.name}: {status}", flush=True)
    if out.exists():
        out.unlink()

    size = paths[0].stat().st_size / 1e9
    absent = [n for n in OPTIONAL_METHODS if n not in {c.name for c in optional_cases()}]
    print()
    print(f"{'tiny (smoke test)' if args.quick else 'sd15'}: A + {len(paths) - 1} fine-tunes of {size:.2f} GB each "
          f"(fp16, F = A + {NOISE} N(0,1)), fp16 output, {os.cpu_count()} cores, threads "
          f"{args.threads or 'default'}; merge s = in-process merge_to_file time, x ws = merge s / 2-model "
          f"weighted_sum's; MB = 2^20 bytes" + (f"; not in the registry: {', '.join(absent)}" if absent else ""))
    from lib_merge.methods import kernels
    print(f"CPU kernels for ties, dare, dare_ties: {kernels.status()}; *_numpy cases: BLOCKMERGE_KERNELS=numpy")
    for line in table(cases, results) + [""] + checks(results):
        print(line)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
