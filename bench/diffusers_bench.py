"""Diffusers-folder benchmark on a full-size synthetic SD1.5 (exact real key layout, random fp16 values).

Each case runs in its own process with its RssAnon sampled every 10 ms (``merge_bench.sample_run``):
  merge          A + B -> one safetensors file (the plain merge, for comparison)
  to_diffusers   A -> diffusers folder (tensor by tensor)
  to_single      that folder -> single file (no_interpolation of the folder)
  merge_folder   A + B -> diffusers folder (``--format diffusers``: temp single file, then the folder)
  strict_load    diffusers builds the full-size UNet2DConditionModel and AutoencoderKL from the written
                 config.json files and loads the written weights with strict=True
Then checks that every tensor of A came back bit-identical.

    python bench/diffusers_bench.py [--dir bench/out] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from merge_bench import build_inputs, sample_run, warm  # noqa: E402

CASES = {
    "idle": """
import time, torch
print(json.dumps({"inproc": 0.0}))
""",
    "merge": """
import time, torch
t = time.perf_counter()
from lib_merge.merge import merge_to_file
merge_to_file({"models": [A, B], "alpha": 0.5}, OUT, overwrite=True, threads=THREADS)
print(json.dumps({"inproc": time.perf_counter() - t}))
""",
    "to_diffusers": """
import time, torch
t = time.perf_counter()
from lib_merge.folder_output import convert_to_folder
r = convert_to_folder(A, FOLDER, overwrite=True)
print(json.dumps({"inproc": time.perf_counter() - t, "notes": r.notes}))
""",
    "to_single": """
import time, torch
t = time.perf_counter()
from lib_merge.merge import merge_to_file
merge_to_file({"models": [FOLDER], "mode": "no_interpolation"}, BACK, overwrite=True, threads=THREADS)
print(json.dumps({"inproc": time.perf_counter() - t}))
""",
    "merge_folder": """
import time, torch
t = time.perf_counter()
from lib_merge.folder_output import merge_to_folder
merge_to_folder({"models": [A, B], "alpha": 0.5}, MFOLDER, overwrite=True, threads=THREADS)
print(json.dumps({"inproc": time.perf_counter() - t}))
""",
    "strict_load": """
import time, json as J, torch
t = time.perf_counter()
from diffusers import UNet2DConditionModel, AutoencoderKL
from safetensors.torch import load_file
from pathlib import Path
n = {}
for comp, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
    d = Path(FOLDER) / comp
    with torch.device("meta"):
        m = cls.from_config(J.loads((d / "config.json").read_text()))
    sd = load_file(str(d / "diffusion_pytorch_model.safetensors"))
    m.load_state_dict(sd, strict=True, assign=True)
    n[comp] = sum(p.numel() for p in m.parameters())
    del m, sd
print(json.dumps({"inproc": time.perf_counter() - t, "params": n}))
""",
    "compare": """
import time, torch
t = time.perf_counter()
from lib_merge.io.sources import open_source
with open_source(A) as a, open_source(BACK) as b:
    missing = sorted(set(a.infos) - set(b.infos))
    bad = [k for k in b.infos if (a.infos[k].dtype, a.infos[k].shape) != (b.infos[k].dtype, b.infos[k].shape)
           or not torch.equal(a.read(k).view(torch.uint8), b.read(k).view(torch.uint8))]
    print(json.dumps({"inproc": time.perf_counter() - t, "keys": len(a.infos), "missing": missing, "differ": bad}))
""",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(HERE / "out"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("BLOCKMERGE_CACHE", str(d / "cache"))
    a, b = build_inputs("sd15", d)
    env = {"A": str(a), "B": str(b), "OUT": str(d / "dif_merge.safetensors"), "FOLDER": str(d / "dif_folder"),
           "BACK": str(d / "dif_back.safetensors"), "MFOLDER": str(d / "dif_merged_folder"), "THREADS": args.threads}
    from lib_merge import hashing
    for p in (a, b):
        hashing.sha256_file(p)  # hashed once and cached, as in merge_bench: not part of the timings
    results = {}
    for case in ("idle", "merge", "to_diffusers", "to_single", "merge_folder", "strict_load", "compare"):
        warm(a, b)
        results[case] = r = sample_run(CASES[case], env)
        print(f"  ran {case}: wall {r['wall']:.2f} s", flush=True)
    idle = results["idle"]["peak_anon"]
    print(f"\nsd15 full size, input {a.stat().st_size / 1e9:.2f} GB fp16, {os.cpu_count()} cores")
    print(f"{'case':<14} {'wall s':>8} {'in-proc s':>10} {'peak anon MB':>13} {'anon - idle MB':>15}")
    for case, r in results.items():
        print(f"{case:<14} {r['wall']:8.2f} {r['inproc']:10.2f} {r['peak_anon'] / 1e6:13.0f} "
              f"{(r['peak_anon'] - idle) / 1e6:15.0f}")
    c = results["compare"]
    print(f"\nround trip single -> diffusers -> single: {c['keys']} tensors, missing {c['missing'] or 'none'}, "
          f"differing {c['differ'] or 'none'}")
    print(f"strict load (diffusers {results['strict_load']['params']}): ok")
    print(f"notes of the conversion: {results['to_diffusers'].get('notes')}")
    for p in (env["OUT"], env["BACK"]):
        Path(p).unlink(missing_ok=True)
    for p in (env["FOLDER"], env["MFOLDER"]):
        shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
