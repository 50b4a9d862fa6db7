"""Check BlockMerge's own LoRA tools in a running WebUI (the harness), over HTTP as a user would (issue 13).

    python bench/webui_lora_tools_check.py --lora-dir <webui>/models/Lora [--url ...] [--a synthA] [--b synthB]

1. ``POST /blockmerge/v1/lora/extract`` (B against A, rank 8) writes a LoRA into the LoRA folder that the WebUI
   lists at once (``/sdapi/v1/loras``) and whose ``<lora:…>`` changes the image.
2. ``POST /blockmerge/v1/lora/merge`` of that LoRA with itself at 0.5 + 0.5 (the same ΔW) renders close to it.
3. Baking it into the live test merge (``lora`` in ``/blockmerge/v1/test``, A alone: weighted_sum at alpha 0)
   renders close to the WebUI's own ``<lora:…>`` on A and far from plain A; a strength-only change re-merges
   only the patched tensors; the WebUI's ``<lora:…>`` still works on top; Restore gives A back bit-exactly
   (fingerprint) and the original image's bytes.
Prints each step's seconds and pixel differences; exits 1 on any failure. Deletes the LoRA files it wrote.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_check import call, common_parser, endpoints, ensure_loaded  # noqa: E402

EXTRACT, MERGED = "blockmerge_check_extract", "blockmerge_check_merged"


def pixels(png: bytes):
    from PIL import Image
    import numpy as np
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def mean_diff(a: bytes, b: bytes) -> float:
    """Mean absolute pixel difference, 0-255."""
    return float(abs(pixels(a) - pixels(b)).mean())


def main() -> int:
    ap = common_parser(os.path.join(tempfile.gettempdir(), "blockmerge-webui-lora-tools-check"))
    ap.add_argument("--lora-dir", required=True)
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

    ensure_loaded(u, args.a)
    lora_dir = Path(args.lora_dir)
    fp0 = call(bm + "/fingerprint")[1]["fingerprint"]
    plain = render("A")

    # 1. extract into the LoRA folder
    code, r, s = call(bm + "/lora/extract", "POST", {"tuned": args.b, "base": args.a, "output": EXTRACT, "rank": 8,
                                                    "overwrite": True})
    check(code == 200, f"lora/extract: HTTP {code} in {s:.1f} s {'' if code == 200 else r}")
    check((lora_dir / f"{EXTRACT}.safetensors").is_file(), "the extracted LoRA is in the LoRA folder")
    code, loras, _ = call(u + "/sdapi/v1/loras")
    check(code == 200 and any(x.get("name") == EXTRACT for x in loras), "the WebUI lists it without a restart")
    with_lora = render("A + <lora:extract>", f" <lora:{EXTRACT}:1>")
    check(with_lora != plain, f"<lora:{EXTRACT}> changes the image (mean diff {mean_diff(with_lora, plain):.2f})")

    # 2. merge it with itself: the same ΔW
    code, r, s = call(bm + "/lora/merge", "POST", {"loras": [{"name": EXTRACT, "ratio": 0.5},
                                                            {"name": EXTRACT, "ratio": 0.5}],
                                                  "output": MERGED, "overwrite": True})
    check(code == 200, f"lora/merge: HTTP {code} in {s:.1f} s {'' if code == 200 else r}")
    merged = render("A + <lora:merged>", f" <lora:{MERGED}:1>")
    d = mean_diff(merged, with_lora)
    check(d <= args.close, f"0.5 + 0.5 of one LoRA renders like it (mean diff {d:.2f})")

    # 3. bake into the live test merge
    body = {"model_b": args.b, "alpha": 0.0, "lora": [{"name": EXTRACT, "strength": 1.0}]}
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
    code, r, s = call(bm + "/restore", "POST", {})
    check(code == 200, f"restore: HTTP {code} in {s:.1f} s")
    check(call(bm + "/fingerprint")[1]["fingerprint"] == fp0, "fingerprint after restore equals the original")
    check(render("A restored") == plain, "restored image identical to the original")

    for name in (EXTRACT, MERGED):
        (lora_dir / f"{name}.safetensors").unlink(missing_ok=True)
    call(u + "/sdapi/v1/refresh-loras", "POST", {})
    print("ALL OK" if not failures else f"FAILED: {len(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
