"""Check BlockMerge's own LoRA tools in a running WebUI (the harness), over HTTP as a user would (issue 13).

    python bench/webui_lora_tools_check.py --models-dir <webui>/models/Stable-diffusion --lora-dir <webui>/models/Lora \
        [--url ...] [--a synthA]

0. Builds TUNED = A + a rank-4 change of every UNet attention projection (``blockmerge_check_tuned``, next to A).
1. ``POST /blockmerge/v1/lora/extract`` (TUNED against A, rank 8) writes a LoRA into the LoRA folder that the
   WebUI lists at once (``/sdapi/v1/loras``); A + ``<lora:…:1>`` renders like TUNED (the issue: "the same image
   within fp32 noise").
2. ``python -m lib_merge lora bake A LORA`` writes a checkpoint that renders like A + ``<lora:…:1>``.
3. ``POST /blockmerge/v1/lora/merge`` of the LoRA with itself at 0.5 + 0.5 (the same ΔW) renders like it.
4. Baking it into the live test merge (``lora`` in ``/blockmerge/v1/test``, A alone: weighted_sum at alpha 0)
   renders like A + ``<lora:…:1>``; a strength-only change re-merges only the patched tensors; the WebUI's
   ``<lora:…>`` still works on top; an X/Y/Z grid over ``BlockMerge: LoRA strength`` gives distinct cells and
   leaves the live merge as it was; Restore gives A back bit-exactly (fingerprint) and the original image.
Prints each step's seconds and mean pixel differences (0-255); exits 1 on any failure. Deletes what it wrote.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_check import call, common_parser, endpoints, ensure_loaded  # noqa: E402

EXTRACT, MERGED = "blockmerge_check_extract", "blockmerge_check_merged"
TUNED, BAKED = "blockmerge_check_tuned", "blockmerge_check_baked"
ROOT = Path(__file__).resolve().parent.parent


def make_tuned(a_file: Path, out: Path, rank: int = 4, seed: int = 7) -> int:
    """A + a seeded rank-``rank`` change (std 0.5 × the weight's) of every UNet attention projection; returns
    how many weights changed. Everything else is A's exact bytes."""
    g = torch.Generator().manual_seed(seed)
    tensors, changed = {}, 0
    with safe_open(str(a_file), "pt") as f:
        meta = f.metadata()
        for k in f.keys():
            t = f.get_tensor(k)
            if (k.startswith("model.diffusion_model.") and t.dim() == 2 and ".attn" in k
                    and k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))):
                w = t.float()
                up = torch.randn(w.shape[0], rank, generator=g)
                down = torch.randn(rank, w.shape[1], generator=g)
                d = up @ down
                t = (w + d * (0.5 * float(w.std()) / float(d.std()))).to(t.dtype)
                changed += 1
            tensors[k] = t
    save_file(tensors, str(out), metadata=meta)
    return changed


def pixels(png: bytes):
    from PIL import Image
    import numpy as np
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def mean_diff(a: bytes, b: bytes) -> float:
    """Mean absolute pixel difference, 0-255."""
    return float(abs(pixels(a) - pixels(b)).mean())


def xyz_lora_strength(u: str, bm: str, out: Path, check) -> None:
    """An X/Y/Z grid over ``BlockMerge: LoRA strength`` (0, 0.5, 1) on the live merge: 3 distinct cells, and the
    live weights after the grid are the ones before it (fingerprint)."""
    code, info, _ = call(u + "/sdapi/v1/script-info")
    xyz = next(x for x in info if x["name"] == "x/y/z plot" and not x["is_img2img"])
    labels = next(a for a in xyz["args"] if a["label"] == "X type")["choices"]
    if not check("BlockMerge: LoRA strength" in labels, "the X/Y/Z axis BlockMerge: LoRA strength is registered"):
        return
    fp = call(bm + "/fingerprint")[1]["fingerprint"]
    args = [labels.index("BlockMerge: LoRA strength"), "0,0.5,1", [], 0, "", [], 0, "", [],
            True, True, False, False, False, False, False, 0, False]
    code, r, s = call(u + "/sdapi/v1/txt2img", "POST", {
        "prompt": "a cat", "seed": 1, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
        "script_name": "x/y/z plot", "script_args": args})
    if not check(code == 200, f"LoRA strength grid: HTTP {code} in {s:.1f} s {'' if code == 200 else r}"):
        return
    cells = [base64.b64decode(i) for i in r["images"]][1:]
    for i, png in enumerate(cells):
        (out / f"xyz_lora_strength_{i}.png").write_bytes(png)
    check(len(cells) == 3 and len({hashlib.sha256(c).hexdigest() for c in cells}) == 3,
          f"LoRA strength grid: {len(cells)} cells, {len({hashlib.sha256(c).hexdigest() for c in cells})} distinct")
    check(call(bm + "/fingerprint")[1]["fingerprint"] == fp, "after the grid, the live weights are as before")


def main() -> int:
    ap = common_parser(os.path.join(tempfile.gettempdir(), "blockmerge-webui-lora-tools-check"))
    ap.add_argument("--models-dir", required=True, help="the WebUI's models/Stable-diffusion")
    ap.add_argument("--lora-dir", required=True, help="the WebUI's models/Lora")
    ap.add_argument("--close", type=float, default=3.0, help="largest mean pixel difference counted as close")
    args = ap.parse_args()
    u, bm, out = endpoints(args)
    failures: list[str] = []

    def check(cond: bool, label: str) -> bool:
        print(f"{'ok  ' if cond else 'FAIL'} {label}")
        if not cond:
            failures.append(label)
        return cond

    def render(tag: str, extra: str = "") -> bytes:
        code, r, s = call(u + "/sdapi/v1/txt2img", "POST", {"prompt": "a cat" + extra, "seed": 1, "steps": 2,
                                                          "width": 64, "height": 64, "sampler_name": "Euler"})
        if code != 200:
            check(False, f"txt2img {tag}: HTTP {code} {r}")
            return b""
        png = base64.b64decode(r["images"][0])
        (out / f"{tag}.png").write_bytes(png)
        print(f"  txt2img {tag:<34} {s:5.1f} s  sha256 {hashlib.sha256(png).hexdigest()[:12]}")
        return png

    models_dir, lora_dir = Path(args.models_dir), Path(args.lora_dir)
    ensure_loaded(u, args.a)
    code, models, _ = call(u + "/sdapi/v1/sd-models")
    a_file = Path(next(m["filename"] for m in models if m["model_name"] == args.a))
    tuned_file, baked_file = models_dir / f"{TUNED}.safetensors", models_dir / f"{BAKED}.safetensors"
    print(f"TUNED: {make_tuned(a_file, tuned_file)} attention weights changed (rank 4)")
    call(u + "/sdapi/v1/refresh-checkpoints", "POST", {})

    def load(name: str) -> None:
        code, r, s = call(u + "/sdapi/v1/options", "POST", {"sd_model_checkpoint": name})
        check(code == 200, f"load {name}: HTTP {code} in {s:.1f} s")

    load(TUNED)
    tuned = render("TUNED")
    load(args.a)
    fp0 = call(bm + "/fingerprint")[1]["fingerprint"]
    plain = render("A")
    check(tuned != plain, f"TUNED renders differently from A (mean diff {mean_diff(tuned, plain):.2f})")

    # 1. extract into the LoRA folder
    code, r, s = call(bm + "/lora/extract", "POST", {"tuned": TUNED, "base": args.a, "output": EXTRACT, "rank": 8,
                                                    "overwrite": True})
    check(code == 200, f"lora/extract: HTTP {code} in {s:.1f} s {'' if code == 200 else r}")
    check((lora_dir / f"{EXTRACT}.safetensors").is_file(), "the extracted LoRA is in the LoRA folder")
    code, loras, _ = call(u + "/sdapi/v1/loras")
    check(code == 200 and any(x.get("name") == EXTRACT for x in loras), "the WebUI lists it without a restart")
    with_lora = render("A + <lora:extract>", f" <lora:{EXTRACT}:1>")
    d = mean_diff(with_lora, tuned)
    check(d <= args.close and d < mean_diff(plain, tuned),
          f"A + <lora:{EXTRACT}:1> renders like TUNED (mean diff {d:.2f}; A vs TUNED {mean_diff(plain, tuned):.2f})")

    # 2. bake into a checkpoint with the CLI
    r = subprocess.run([sys.executable, "-m", "lib_merge", "lora", "bake", str(a_file),
                        str(lora_dir / f"{EXTRACT}.safetensors"), "-o", str(baked_file), "--overwrite"],
                       cwd=ROOT, capture_output=True, text=True)
    check(r.returncode == 0, f"lora bake: exit {r.returncode} {r.stderr.strip()[-300:]}")
    call(u + "/sdapi/v1/refresh-checkpoints", "POST", {})
    load(BAKED)
    baked_file_img = render("baked checkpoint")
    d = mean_diff(baked_file_img, with_lora)
    check(d <= args.close, f"the baked checkpoint renders like A + <lora:…:1> (mean diff {d:.2f})")
    load(args.a)
    check(call(bm + "/fingerprint")[1]["fingerprint"] == fp0, "A loaded again: the same fingerprint")

    # 3. merge it with itself: the same ΔW
    code, r, s = call(bm + "/lora/merge", "POST", {"loras": [{"name": EXTRACT, "ratio": 0.5},
                                                            {"name": EXTRACT, "ratio": 0.5}],
                                                  "output": MERGED, "overwrite": True})
    check(code == 200, f"lora/merge: HTTP {code} in {s:.1f} s {'' if code == 200 else r}")
    merged = render("A + <lora:merged>", f" <lora:{MERGED}:1>")
    d = mean_diff(merged, with_lora)
    check(d <= args.close, f"0.5 + 0.5 of one LoRA renders like it (mean diff {d:.2f})")

    # 4. bake into the live test merge
    body = {"model_b": TUNED, "alpha": 0.0, "lora": [{"name": EXTRACT, "strength": 1.0}]}
    code, r, s = call(bm + "/test", "POST", body)
    check(code == 200, f"test merge with the LoRA baked in: HTTP {code} in {s:.1f} s, "
          f"{r.get('written') if code == 200 else r}")
    patched = r.get("written") if code == 200 else None
    baked = render("A baked live")
    d_lora, d_plain = mean_diff(baked, with_lora), mean_diff(baked, plain)
    check(d_lora <= args.close and d_lora < d_plain,
          f"baked live renders like <lora:…> on A (diff {d_lora:.2f}) and not like A (diff {d_plain:.2f})")
    on_top = render("A baked live + <lora:extract>", f" <lora:{EXTRACT}:1>")
    check(on_top != baked, "the WebUI's <lora:…> still works on top of the live merge")
    again = render("A baked live (again)")
    check(again == baked, "the WebUI's <lora:…> leaves the live merge in place")
    body["lora"][0]["strength"] = 0.5
    code, r, s = call(bm + "/test", "POST", body)
    check(code == 200 and r.get("written") == patched,
          f"strength 0.5: HTTP {code} in {s:.1f} s, re-merged {r.get('written') if code == 200 else r} tensors "
          f"(the patched ones: {patched})")
    half = render("A baked live at 0.5")
    check(half != baked, "strength 0.5 renders differently")
    xyz_lora_strength(u, bm, out, check)
    code, r, s = call(bm + "/restore", "POST", {})
    check(code == 200, f"restore: HTTP {code} in {s:.1f} s")
    check(call(bm + "/fingerprint")[1]["fingerprint"] == fp0, "fingerprint after restore equals the original")
    check(render("A restored") == plain, "restored image identical to the original")

    for name in (EXTRACT, MERGED):
        (lora_dir / f"{name}.safetensors").unlink(missing_ok=True)
    for f in (tuned_file, baked_file):
        f.unlink(missing_ok=True)
    call(u + "/sdapi/v1/refresh-loras", "POST", {})
    call(u + "/sdapi/v1/refresh-checkpoints", "POST", {})
    print("ALL OK" if not failures else f"FAILED: {len(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
