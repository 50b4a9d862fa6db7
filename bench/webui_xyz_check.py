"""X/Y/Z grids with BlockMerge axes in a running WebUI, over /sdapi/v1/txt2img, as a client would.

    python bench/webui_xyz_check.py [--url http://127.0.0.1:7860] [--b synthB]

1. preset (GRAD_V, GRAD_A) x block value (OUT05=0, OUT05=0.5, OUT05=1): 6 distinct cells;
2. alpha (0, 0.5, 1) on a base recipe without weights: 3 distinct cells;
3. the live weights after each grid equal those before (fingerprint), and /blockmerge/v1/test then /restore
   leave them as they were. Prints cells, seconds and source bytes read.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_check import call, common_parser, endpoints, ensure_loaded  # noqa: E402


def main() -> int:
    args = common_parser(os.path.join(tempfile.gettempdir(), "blockmerge-xyz-check")).parse_args()
    u, bm, out = endpoints(args)
    ok = True
    if ensure_loaded(u, args.a):
        call(u + "/sdapi/v1/txt2img", "POST", {"prompt": "warmup", "steps": 1, "width": 64, "height": 64})
    code, info, _ = call(u + "/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = next(a for a in xyz["args"] if a["label"] == "X type")["choices"]
    ours = [lb for lb in labels if lb.startswith("BlockMerge:")]
    print(f"X/Y/Z axes: {len(labels)} in all, BlockMerge's: {ours}")
    idx = {lb: labels.index(lb) for lb in ours}

    def run_grid(tag, x_label, x_values, y_label=None, y_values="", y_drop=None):
        script_args = [idx[x_label], x_values, [], idx[y_label] if y_label else 0, y_values, y_drop or [], 0, "", [],
                       True, True, False, False, False, False, False, 0, False]
        code, r, s = call(u + "/sdapi/v1/txt2img", "POST", {
            "prompt": "a cat", "seed": 1, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
            "script_name": "x/y/z plot", "script_args": script_args})
        if code != 200:
            print(f"{tag}: HTTP {code} {r}")
            return None, s
        imgs = [base64.b64decode(i) for i in r["images"]]
        cells = imgs[1:]
        for i, png in enumerate(imgs):
            (out / f"{tag}_{i}.png").write_bytes(png)
        distinct = len({hashlib.sha256(c).hexdigest() for c in cells})
        infos = json.loads(r["info"])["infotexts"]
        print(f"{tag}: HTTP {code}, {len(cells)} cells, {distinct} distinct, {s:.1f} s; "
              f"BlockMerge in every cell's infotext: {all('BlockMerge:' in t for t in infos[1:])}")
        return (len(cells), distinct), s

    code, fp0, _ = call(bm + "/fingerprint")
    code, r, s = call(bm + "/test", "POST", {"model_b": args.b, "alpha": 0.5})
    print(f"base recipe: POST test weighted_sum alpha 0.5: HTTP {code}, {r.get('written')} tensors, {r.get('seconds')} s")
    call(bm + "/restore", "POST", {})
    code, st0, _ = call(bm + "/status")
    res, s = run_grid("preset_x_blockvalue", "BlockMerge: block value", "OUT05=0,OUT05=0.5,OUT05=1",
                      "BlockMerge: preset", "", ["GRAD_V", "GRAD_A"])
    ok &= res == (6, 6)
    code, fp1, _ = call(bm + "/fingerprint")
    print(f"  after the grid, weights as before (fingerprint): {fp1['fingerprint'] == fp0['fingerprint']}")
    ok &= fp1["fingerprint"] == fp0["fingerprint"]
    res, s = run_grid("alpha", "BlockMerge: alpha", "0,0.5,1")
    ok &= res == (3, 3)
    code, fp2, _ = call(bm + "/fingerprint")
    print(f"  after the grid, weights as before (fingerprint): {fp2['fingerprint'] == fp0['fingerprint']}")
    ok &= fp2["fingerprint"] == fp0["fingerprint"]
    code, r, _ = call(u + "/sdapi/v1/txt2img", "POST", {
        "prompt": "a cat", "seed": 1, "steps": 2, "width": 64, "height": 64, "script_name": "x/y/z plot",
        "script_args": [idx["BlockMerge: alpha"], "0,1", [], idx["BlockMerge: preset"], "", ["GRAD_V"], 0, "", [],
                        True, True, False, False, False, False, False, 0, False]})
    print(f"alpha x preset grid refused: HTTP {code}: {str(r)[:160]}")
    code, r1, s1 = call(bm + "/test", "POST", {"model_b": args.b, "preset": "GRAD_V"})
    code, r2, s2 = call(bm + "/restore", "POST", {})
    code, fp3, _ = call(bm + "/fingerprint")
    print(f"POST test {r1.get('seconds')} s ({r1.get('written')} tensors) then POST restore {r2.get('seconds')} s: "
          f"weights as before: {fp3['fingerprint'] == fp0['fingerprint']}")
    ok &= fp3["fingerprint"] == fp0["fingerprint"]
    code, st, _ = call(bm + "/status")
    reads = {Path(k).name: v for k, v in st["bytes_read"].items()}
    before = {Path(k).name: v for k, v in st0["bytes_read"].items()}
    print(f"source bytes read during the grids and test/restore (after the base merge): "
          f"{ {k: v - before.get(k, 0) for k, v in reads.items()} }")
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
