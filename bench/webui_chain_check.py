"""Check merge chains in a running WebUI (the harness in ../shared/webui-harness), over HTTP as a user would.

    python bench/webui_chain_check.py [--url http://127.0.0.1:7860] [--a synthA] [--b synthB] [--out DIR]

Test-merges A + B (GRAD_V), renders; then a chained test merge (that merge as model A, B again with GRAD_A)
and renders: the image must differ from the unchained one and the infotext must carry the nested recipe. Re-merges
one block (OUT05) of the outer step and counts the tensors written (OUT05's only), saves (fp32; the live dtype
on --no-half) and compares the file with the live weights and with a ``POST merge`` of the same nested body (same
sha256), restores and compares the fingerprint with the original's. Prints PASS/FAIL per check and each step's
seconds. Leaves ``blockmerge-chain-check.safetensors`` in the models folder: delete it after.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_check import call, common_parser, endpoints, ensure_loaded  # noqa: E402


def blockmerge_param(infotext: str) -> dict | None:
    """The ``BlockMerge`` generation parameter (the WebUI quotes a value holding commas as a JSON string)."""
    at = infotext.find("BlockMerge: ")
    if at < 0:
        return None
    text, _ = json.JSONDecoder().raw_decode(infotext, at + len("BlockMerge: "))
    return json.loads(text)


def main() -> int:
    ap = common_parser(os.path.join(tempfile.gettempdir(), "blockmerge-webui-chain-check"))
    ap.add_argument("--save-name", default="blockmerge-chain-check")
    args = ap.parse_args()
    u, bm, out = endpoints(args)
    results: list[bool] = []

    def check(what: str, ok: bool) -> None:
        results.append(bool(ok))
        print(f"{'PASS' if ok else 'FAIL'} {what}")

    def txt2img(tag: str) -> tuple[bytes, str]:
        import base64
        import hashlib
        code, r, s = call(u + "/sdapi/v1/txt2img", "POST", {"prompt": "a cat", "seed": 1, "steps": 2, "width": 64,
                                                          "height": 64, "sampler_name": "Euler"})
        assert code == 200, r
        png = base64.b64decode(r["images"][0])
        (out / f"{tag}.png").write_bytes(png)
        print(f"  txt2img {tag}: {s:.1f} s, image sha256 {hashlib.sha256(png).hexdigest()[:12]}")
        return png, json.loads(r["info"])["infotexts"][0]

    if ensure_loaded(u, args.a):
        txt2img("warmup")
    code, fp0, s = call(bm + "/fingerprint")
    print(f"fingerprint before: {fp0['fingerprint'][:16]} ({fp0['tensors']} tensors, {s:.1f} s)")

    step = {"model_b": args.b, "preset": "GRAD_V"}
    code, r, s = call(bm + "/test", "POST", step)
    print(f"POST test A+B (GRAD_V): HTTP {code}, {r.get('written')} tensors, merge {r.get('seconds')} s, "
          f"request {s:.2f} s")
    check("unchained test merge", code == 200)
    img_step, _ = txt2img("step")

    code, presets, _ = call(bm + "/presets")
    grad_a = presets["presets"]["sd1"]["GRAD_A"]["values"]
    chain = {"model_a": {"recipe": step}, "model_b": args.b, "preset": "GRAD_A"}
    code, r, s = call(bm + "/test", "POST", chain)
    print(f"POST test chain ((A+B, GRAD_V) + B, GRAD_A): HTTP {code}, {r.get('written')} written, "
          f"{r.get('unchanged')} unchanged, merge {r.get('seconds')} s, request {s:.2f} s; {r.get('timings')}")
    check("chained test merge", code == 200 and r.get("written", 0) > 0)
    code, rec, _ = call(bm + "/recipe")
    nested = (rec.get("recipe") or {}).get("models", [None])[0]
    check("GET recipe holds the nested recipe", isinstance(nested, dict) and nested["recipe"]["preset"] == "GRAD_V")
    img_chain, info = txt2img("chain")
    check("chained image differs from the unchained one", img_chain != img_step)
    recorded = blockmerge_param(info)
    check("infotext names the chain (the nested recipe in BlockMerge)",
          recorded is not None and recorded["preset"] == "GRAD_A" and recorded["models"][1] == f"{args.b}.safetensors"
          and recorded["models"][0]["recipe"]["preset"] == "GRAD_V"
          and recorded["models"][0]["recipe"]["models"] == [f"{args.a}.safetensors", f"{args.b}.safetensors"])

    # one block of the outer step: GRAD_A as a vector (same ratios: nothing rewritten) with OUT05 changed
    from lib_merge.arch import ARCHS, block_of
    from lib_merge.io.sources import open_source
    code, listed, _ = call(u + "/sdapi/v1/sd-models")
    a_file = next(m["filename"] for m in listed if m["model_name"] == args.a)
    with open_source(a_file) as src:
        n_out05 = sum(1 for k, info_ in src.infos.items() if k.startswith("model.diffusion_model.")
                      and info_.dtype.startswith("F") and block_of(k, ARCHS["sd1"]) == "OUT05")
    vec = list(grad_a)
    vec[19] = 0.123  # OUT05
    remerge = {**chain, "weights": ",".join(repr(float(v)) for v in vec)}
    remerge.pop("preset")
    code, r, s = call(bm + "/test", "POST", remerge)
    print(f"POST test chain, OUT05 of the outer step changed: HTTP {code}, {r.get('written')} written, "
          f"{r.get('unchanged')} unchanged, merge {r.get('seconds')} s, request {s:.2f} s")
    check(f"re-merge writes OUT05's {n_out05} tensors only", code == 200 and r.get("written") == n_out05)
    code, fp_live, _ = call(bm + "/fingerprint")

    code, saved, s = call(bm + "/save", "POST", {"output": args.save_name, "dtype": "fp32", "overwrite": True})
    print(f"POST save (fp32): HTTP {code}, {saved.get('name')} [{saved.get('short_hash')}] in {s:.1f} s")
    check("save", code == 200)
    if code == 200:
        from lib_merge.live import fingerprint
        with open_source(saved["path"]) as src:
            tensors = {k: src.read(k) for k in src.infos if k.startswith(("model.diffusion_model.", "cond_stage_model."))
                       and src.infos[k].dtype.startswith("F")}
        check("saved file's UNet + text encoder == live weights (fingerprint)",
              fingerprint(tensors) == fp_live["fingerprint"])
        body = {**remerge, "model_a": {"recipe": {**step, "model_a": args.a}}, "output": args.save_name,
                "overwrite": True, "dtype": "fp32", "vae": "a"}
        code, merged, s = call(bm + "/merge", "POST", body)
        print(f"POST merge of the same nested body: HTTP {code}, {merged.get('name')} in {s:.1f} s")
        check("save sha256 == POST merge sha256 of the nested body",
              code == 200 and merged.get("sha256") == saved.get("sha256"))

    code, r, s = call(bm + "/restore", "POST", {})
    print(f"POST restore: HTTP {code}, {r.get('restored')} tensors, {r.get('seconds')} s")
    code, fp1, _ = call(bm + "/fingerprint")
    check("restore is bit-exact (fingerprint)", fp1["fingerprint"] == fp0["fingerprint"])
    code, st, _ = call(bm + "/status")
    print("source bytes read:", {Path(k).name: v for k, v in st["bytes_read"].items()})
    ok = all(results)
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
