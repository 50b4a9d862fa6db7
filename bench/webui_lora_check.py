"""Check the live test merge together with the WebUI's built-in LoRA, in a running WebUI (the harness), over HTTP.

    python bench/webui_lora_check.py --lora-dir <webui>/models/Lora [--url ...] [--a synthA] [--b synthB]

Builds a small random LoRA (rank 4, attn1/attn2 q/k/v of the UNet and q/v of the text encoder) from model A's key
names, then: renders with the LoRA on the original model; test-merges; renders without and with the LoRA and
without it again (the LoRA's own backup restore must not undo the merge); re-merges one block while the LoRA is
baked in; restores; checks the fingerprint and that the LoRA and plain renders equal the ones before the merge.
"""
from __future__ import annotations

import base64
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from webui_check import call, common_parser, endpoints, ensure_loaded  # noqa: E402

from lib_merge.io.sources import open_source  # noqa: E402


def lora_name(key: str) -> str | None:
    """Kohya-style LoRA module name for a checkpoint weight key (SD1), or None if the LoRA leaves it alone."""
    stem = key[: -len(".weight")]
    if key.startswith("model.diffusion_model.") and any(f".{a}.to_{p}.weight" in key for a in ("attn1", "attn2")
                                                         for p in "qkv"):
        return "lora_unet_" + stem[len("model.diffusion_model."):].replace(".", "_")
    if key.startswith("cond_stage_model.transformer.text_model.encoder.") and key.endswith(("q_proj.weight",
                                                                                             "v_proj.weight")):
        return "lora_te1_" + stem[len("cond_stage_model.transformer."):].replace(".", "_")
    return None


def build_lora(a_path: str, out: Path, rank: int = 4, seed: int = 7) -> int:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with open_source(a_path) as src:
        for key, info in src.infos.items():
            name = lora_name(key)
            if name is None or len(info.shape) != 2:
                continue
            n_out, n_in = info.shape
            tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, n_in, generator=g) * 0.1).half()
            tensors[f"{name}.lora_up.weight"] = (torch.randn(n_out, rank, generator=g) * 0.1).half()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"ss_network_module": "networks.lora"})
    return len(tensors) // 3


def main() -> int:
    ap = common_parser(os.path.join(tempfile.gettempdir(), "blockmerge-lora-check"))
    ap.add_argument("--lora-dir", required=True)
    ap.add_argument("--lora-name", default="blockmerge_check_lora")
    args = ap.parse_args()
    u, bm, out = endpoints(args)
    ok = True
    ensure_loaded(u, args.a)
    code, models, _ = call(u + "/sdapi/v1/sd-models")
    a_file = next(m["filename"] for m in models if m["model_name"] == args.a)
    lora_file = Path(args.lora_dir) / f"{args.lora_name}.safetensors"
    n = build_lora(a_file, lora_file)
    call(u + "/sdapi/v1/refresh-loras", "POST", {})
    print(f"LoRA {lora_file.name}: {n} modules")

    def render(tag: str, lora: bool) -> bytes:
        prompt = "a cat" + (f" <lora:{args.lora_name}:1>" if lora else "")
        code, r, s = call(u + "/sdapi/v1/txt2img", "POST", {"prompt": prompt, "seed": 1, "steps": 2, "width": 64,
                                                          "height": 64, "sampler_name": "Euler"})
        assert code == 200, r
        png = base64.b64decode(r["images"][0])
        (out / f"{tag}.png").write_bytes(png)
        print(f"  txt2img {tag:<28} {s:5.1f} s  sha256 {hashlib.sha256(png).hexdigest()[:12]}")
        return png

    def check(label: str, cond: bool) -> None:
        nonlocal ok
        ok &= cond
        print(f"{'ok  ' if cond else 'FAIL'} {label}")

    fp0 = call(bm + "/fingerprint")[1]["fingerprint"]
    plain0 = render("original", False)
    lora0 = render("original+lora", True)
    check("the LoRA changes the image", lora0 != plain0)
    code, r, _ = call(bm + "/test", "POST", {"model_b": args.b, "preset": "GRAD_V"})
    check(f"test merge after a LoRA render: HTTP {code}, {r.get('written')} tensors", code == 200)
    merged = render("merged", False)
    merged_lora = render("merged+lora", True)
    merged_again = render("merged, LoRA removed", False)
    check("merged image differs from the original", merged != plain0)
    check("the LoRA works on the merged model (image differs from merged, and from original+LoRA)",
          merged_lora != merged and merged_lora != lora0)
    check("removing the LoRA leaves the merge in place (same image as before the LoRA)", merged_again == merged)
    render("merged+lora (baked again)", True)
    vec = ["0.5"] * 26
    code, r, _ = call(bm + "/test", "POST", {"model_b": args.b, "weights": ",".join(vec)})
    check(f"re-merge while the LoRA is baked in: HTTP {code}, {r.get('written')} tensors", code == 200)
    code, fp_live, _ = call(bm + "/fingerprint")
    half = render("alpha 0.5 everywhere", False)
    code, r, _ = call(bm + "/restore", "POST", {})
    check(f"restore: HTTP {code}, {r.get('restored')} tensors", code == 200)
    fp1 = call(bm + "/fingerprint")[1]["fingerprint"]
    check("fingerprint after restore equals the original (bit-exact)", fp1 == fp0)
    lora1 = render("restored+lora", True)
    plain1 = render("restored", False)
    check("restored + LoRA image identical to original + LoRA", lora1 == lora0)
    check("restored image identical to original", plain1 == plain0)
    check("alpha-0.5 image differs from the GRAD_V one", half != merged)
    lora_file.unlink()
    call(u + "/sdapi/v1/refresh-loras", "POST", {})
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
