"""Check the live test merge with a merge method (slerp, add_noise) in a running WebUI, over HTTP as a user would.

    python bench/webui_method_check.py [--url http://127.0.0.1:7860] [--b synthB] [--pid PID] [--warm FILE ...]

The companion of webui_check.py (which covers the linear merge): through ``/blockmerge/v1/test`` with the fields
``method``, ``params`` and ``seed`` it test-merges slerp, then add_noise, then the modes ties and dare (whose Save
must equal ``/merge`` of the same recipe to a file, sha256), and for each checks that the route
succeeds, a txt2img renders while the merge is live, re-sending the same request recomputes nothing (0 tensors
written), changing alpha (or the seed) re-merges, and Restore gives back bit-exact weights (fingerprint) and the
original image's bytes. Requests with a bad method or parameter must answer 422 naming the field and change
nothing. Prints each step's seconds and the process's VmHWM after it (with --pid), and the sampled peaks.
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
from webui_check import MemorySampler, call, common_parser, endpoints, ensure_loaded, proc_memory  # noqa: E402


def main() -> int:
    ap = common_parser(os.path.join(tempfile.gettempdir(), "blockmerge-webui-method-check"))
    ap.add_argument("--pid", type=int, default=None, help="WebUI process id, to report its memory")
    ap.add_argument("--seed", type=int, default=1234, help="add_noise's seed")
    ap.add_argument("--warm", nargs="*", default=[], metavar="FILE",
                    help="read these files once first, so the first merge reads B through the page cache")
    args = ap.parse_args()
    u, bm, out = endpoints(args)
    failures: list[str] = []

    sampler = MemorySampler(args.pid) if args.pid else None

    def hwm() -> str:
        return f", VmHWM {proc_memory(args.pid)['VmHWM'] / 1e9:.2f} GB" if args.pid else ""

    def phase(name: str) -> None:
        if sampler:
            sampler.phase = name

    def check(ok: bool, what: str) -> bool:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)
        return ok

    def txt2img(tag: str):
        phase(f"txt2img {tag}")
        code, r, s = call(u + "/sdapi/v1/txt2img", "POST", {"prompt": "a cat", "seed": 1, "steps": 2, "width": 64,
                                                          "height": 64, "sampler_name": "Euler"})
        if code != 200:
            check(False, f"txt2img {tag}: HTTP {code} {r}")
            return b"", ""
        png = base64.b64decode(r["images"][0])
        (out / f"{tag}.png").write_bytes(png)
        info = json.loads(r["info"])["infotexts"][0]
        print(f"txt2img {tag}: HTTP {code}, {s:.1f} s, image sha256 {hashlib.sha256(png).hexdigest()[:12]}{hwm()}")
        return png, info

    def fingerprint() -> str:
        phase("fingerprint")
        code, fp, s = call(bm + "/fingerprint")
        assert code == 200, fp
        return fp["fingerprint"]

    def test(step: str, body: dict) -> dict:
        phase(step)
        code, r, s = call(bm + "/test", "POST", {"model_b": args.b, **body})
        print(f"POST test {step} {json.dumps(body)}: HTTP {code}, {r.get('written')} written, "
              f"{r.get('unchanged')} unchanged, merge {r.get('seconds')} s, request {s:.2f} s{hwm()}"
              + (f"; {r.get('detail')}" if code != 200 else f"; {r.get('timings')}"))
        r["_code"] = code
        return r

    def restore(step: str, fp0: str, img0: bytes) -> None:
        phase(f"restore {step}")
        code, r, s = call(bm + "/restore", "POST", {})
        print(f"POST restore ({step}): HTTP {code}, {r.get('restored')} tensors, {r.get('seconds')} s, "
              f"request {s:.2f} s{hwm()}")
        check(code == 200 and (r.get("restored") or 0) > 0, f"restore after {step} answers 200 and restores tensors")
        fp = fingerprint()
        check(fp == fp0, f"weights after restore ({step}) bit-exact (fingerprint {fp[:16]} vs {fp0[:16]})")
        img, info = txt2img(f"restored-{step}")
        check(img == img0 and "BlockMerge:" not in info, f"image after restore ({step}) identical to the original")

    if args.pid:
        print("WebUI process memory at the start: " + ", ".join(f"{k} {v / 1e9:.2f} GB"
                                                            for k, v in proc_memory(args.pid).items()))
    phase("load + warmup")
    if ensure_loaded(u, args.a):
        txt2img("warmup")
    code, st, _ = call(bm + "/status")
    if st.get("live"):
        call(bm + "/restore", "POST", {})  # a merge left live by an earlier run: start from A's own weights
    fp0 = fingerprint()
    print(f"fingerprint before: {fp0[:16]}")
    img0, _ = txt2img("original")
    for f in args.warm:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass

    # --- bad requests first: nothing may change ---
    bad = [("unknown method", {"method": "slerpp"}, ("method", "slerpp")),
           ("slerp takes no parameter", {"method": "slerp", "params": {"gama": 1}}, ("params", "gama")),
           ("extract, misspelt parameter", {"method": "extract", "mode": "add_difference", "model_c": args.a,
                                            "params": {"gama": 1}}, ("params", "gama")),
           ("add_noise without a seed", {"method": "add_noise", "alpha": 0.01}, ("seed",))]
    for what, body, names in bad:
        r = test(f"bad: {what}", body)
        detail = str(r.get("detail", ""))
        check(r["_code"] == 422 and all(n in detail for n in names),
              f"{what}: HTTP 422 naming {' and '.join(names)} (got {r['_code']}: {detail!r})")
    code, st, _ = call(bm + "/status")
    check(not st.get("live") and fingerprint() == fp0, "after the bad requests no merge is live, weights unchanged")

    # --- slerp ---
    r = test("slerp alpha 0.5", {"method": "slerp", "alpha": 0.5})
    check(r["_code"] == 200 and r.get("live") and (r.get("written") or 0) > 0, "slerp merges and is live")
    n_slerp = r.get("written")
    img, info = txt2img("slerp")
    check(bool(img) and img != img0 and "BlockMerge:" in info, "txt2img while slerp is live: differs from the "
                                                               "original, infotext has BlockMerge")
    print(f"  infotext BlockMerge part: {info[info.find('BlockMerge:'):][:160]!r}")
    r = test("slerp alpha 0.5 again", {"method": "slerp", "alpha": 0.5})
    check(r["_code"] == 200 and r.get("written") == 0, "re-sending the same slerp request recomputes nothing")
    r = test("slerp alpha 0.3", {"method": "slerp", "alpha": 0.3})
    check(r["_code"] == 200 and r.get("written") == n_slerp, f"slerp alpha 0.3 re-merges all {n_slerp} tensors")
    restore("slerp", fp0, img0)

    # --- add_noise ---
    noise = {"method": "add_noise", "alpha": 0.01, "seed": args.seed}
    r = test(f"add_noise alpha 0.01 seed {args.seed}", noise)
    check(r["_code"] == 200 and r.get("live") and (r.get("written") or 0) > 0, "add_noise merges and is live")
    n_noise = r.get("written")
    fp_noise = fingerprint()
    img, info = txt2img("add_noise")
    check(bool(img) and img != img0 and "BlockMerge:" in info, "txt2img while add_noise is live: differs from "
                                                               "the original, infotext has BlockMerge")
    print(f"  infotext BlockMerge part: {info[info.find('BlockMerge:'):][:160]!r}")
    r = test("add_noise same again", noise)
    check(r["_code"] == 200 and r.get("written") == 0, "re-sending the same add_noise request recomputes nothing")
    r = test("add_noise alpha 0.02", {**noise, "alpha": 0.02})
    check(r["_code"] == 200 and r.get("written") == n_noise, f"add_noise alpha 0.02 re-merges all {n_noise} tensors")
    r = test(f"add_noise seed {args.seed + 1}", {**noise, "seed": args.seed + 1})
    check(r["_code"] == 200 and r.get("written") == n_noise, f"a new seed re-merges all {n_noise} tensors")
    r = test(f"add_noise alpha 0.01 seed {args.seed} (back)", noise)
    check(r["_code"] == 200 and fingerprint() == fp_noise, "back to the first add_noise request: the same weights "
                                                           "bit for bit (the seed reproduces the noise)")
    restore("add_noise", fp0, img0)

    # --- TIES and DARE (task vectors of B over A; the numba kernels when the WebUI's Python has numba) ---
    for mode, body in (("ties", {"mode": "ties", "alpha": 1.0, "params": {"density": 0.3}}),
                       ("dare", {"mode": "dare", "alpha": 1.0, "params": {"density": 0.3}, "seed": args.seed})):
        r = test(f"{mode} density 0.3", body)
        check(r["_code"] == 200 and r.get("live") and (r.get("written") or 0) > 0, f"{mode} merges and is live")
        n_tv = r.get("written")
        img, info = txt2img(mode)
        check(bool(img) and img != img0 and "BlockMerge:" in info, f"txt2img while {mode} is live: differs from "
                                                                   "the original, infotext has BlockMerge")
        r = test(f"{mode} same again", body)
        check(r["_code"] == 200 and r.get("written") == 0, f"re-sending the same {mode} request recomputes nothing")
        body = {**body, "params": {"density": 0.5}}
        r = test(f"{mode} density 0.5", body)
        check(r["_code"] == 200 and r.get("written") == n_tv, f"{mode} density 0.5 re-merges all {n_tv} tensors")
        phase(f"{mode} save vs file merge")
        name = f"blockmerge-method-check-{mode}"
        code, saved, s = call(bm + "/save", "POST", {"output": name, "dtype": "fp32", "overwrite": True})
        print(f"POST save {mode} (fp32): HTTP {code} in {s:.1f} s{hwm()}")
        code2, merged, s2 = call(bm + "/merge", "POST", {"model_a": args.a, "model_b": args.b, **body,
                                                         "output": name, "overwrite": True, "dtype": "fp32",
                                                         "vae": "a"})  # the same name: the metadata names it
        print(f"POST merge {mode} (fp32, the same recipe to a file): HTTP {code2} in {s2:.1f} s{hwm()}")
        check(code == 200 and code2 == 200 and saved.get("sha256") == merged.get("sha256"),
              f"{mode}: Save of the live merge == the file merge of the same recipe (sha256 "
              f"{str(saved.get('sha256'))[:12]} vs {str(merged.get('sha256'))[:12]})")
        restore(mode, fp0, img0)

    code, st, _ = call(bm + "/status")
    print("source bytes read:", {Path(k).name: v for k, v in (st.get("bytes_read") or {}).items()})
    if sampler:
        sampler.report()
        print("WebUI process memory at the end: " + ", ".join(f"{k} {v / 1e9:.2f} GB"
                                                          for k, v in proc_memory(args.pid).items()))
    print("ALL OK" if not failures else f"FAILED ({len(failures)}): " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
