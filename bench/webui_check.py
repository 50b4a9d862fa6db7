"""Check the live test merge in a running WebUI (the harness in ../shared/webui-harness), over HTTP as a user would.

    python bench/webui_check.py [--url http://127.0.0.1:7860] [--b synthB] [--out DIR]

Loads the model if needed, renders a baseline image, test-merges (GRAD_V), renders, re-merges one block,
saves (fp32, the live dtype on --no-half), restores, renders again, and compares: the live fingerprint before
vs after restore, the baseline vs restored image bytes, the saved file's tensors vs the live merged weights.
Prints each step's seconds and the source bytes read.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def call(url: str, method: str = "GET", body: dict | None = None, timeout: float = 900):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
            code = r.status
    except urllib.error.HTTPError as e:
        out, code = json.loads(e.read() or b"{}"), e.code
    return code, out, time.perf_counter() - t


def proc_memory(pid: int) -> dict[str, int]:
    mem = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:")):
                mem[line.split(":")[0]] = int(line.split()[1]) * 1024
    return mem


class MemorySampler:
    """Samples a process's VmRSS / RssAnon / RssFile every 20 ms and keeps each phase's peaks."""

    def __init__(self, pid: int):
        self.pid, self.phase, self.peaks = pid, "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                mem = proc_memory(self.pid)
            except OSError:
                return
            peak = self.peaks.setdefault(self.phase, {})
            for k in ("VmRSS", "RssAnon", "RssFile"):
                peak[k] = max(peak.get(k, 0), mem.get(k, 0))
            time.sleep(0.02)

    def report(self) -> None:
        self._stop.set()
        self._thread.join()
        print("WebUI memory peaks by step (sampled every 20 ms):")
        for phase, peak in self.peaks.items():
            print(f"  {phase:<28} " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in peak.items()))


def common_parser(out_default: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--a", default="synthA", help="checkpoint to load as A")
    ap.add_argument("--b", default="synthB")
    ap.add_argument("--out", default=out_default)
    return ap


def endpoints(args) -> tuple[str, str, Path]:
    """The WebUI's base URL, BlockMerge's API prefix, and the output folder (created)."""
    u = args.url.rstrip("/")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return u, u + "/blockmerge/v1", out


def ensure_loaded(u: str, a: str) -> bool:
    """Load checkpoint ``a`` (and render once, which loads the model) unless it is loaded. True if it loaded."""
    for _ in range(120):  # A1111 loads its checkpoint in the background at startup: wait for it
        code, st, _ = call(u + "/blockmerge/v1/status")
        if st.get("loaded") or st.get("selected"):  # Forge loads lazily: it only has a selected checkpoint
            break
        time.sleep(1)
    if st.get("loaded") and st["loaded"].startswith(a):
        return False
    if not st.get("loaded") and (st.get("selected") or "").startswith(a):
        return True  # Forge: the first render loads it
    code, r, s = call(u + "/sdapi/v1/options", "POST", {"sd_model_checkpoint": a})
    print(f"loaded {a}: HTTP {code} in {s:.1f} s")
    return True


def main() -> int:
    ap = common_parser(os.path.join(tempfile.gettempdir(), "blockmerge-webui-check"))
    ap.add_argument("--save-name", default="blockmerge-check")
    ap.add_argument("--pid", type=int, default=None, help="WebUI process id, to report its memory")
    ap.add_argument("--warm", nargs="*", default=[], metavar="FILE",
                    help="read these files once first, so the first merge reads B through the page cache "
                         "(the condition of the peers' measurements)")
    args = ap.parse_args()
    u, bm, out = endpoints(args)
    ok = True

    sampler = MemorySampler(args.pid) if args.pid else None
    if args.pid:
        print("WebUI process memory at the start: " + ", ".join(f"{k} {v / 1e9:.2f} GB"
                                                            for k, v in proc_memory(args.pid).items()))

    def phase(name: str) -> None:
        if sampler:
            sampler.phase = name

    def txt2img(tag):
        code, r, s = call(u + "/sdapi/v1/txt2img", "POST", {"prompt": "a cat", "seed": 1, "steps": 2, "width": 64,
                                                          "height": 64, "sampler_name": "Euler"})
        assert code == 200, r
        png = base64.b64decode(r["images"][0])
        (out / f"{tag}.png").write_bytes(png)
        info = json.loads(r["info"])["infotexts"][0]
        print(f"txt2img {tag}: {s:.1f} s, image sha256 {hashlib.sha256(png).hexdigest()[:12]}")
        return png, info

    phase("load + warmup")
    if ensure_loaded(u, args.a):
        txt2img("warmup")
    phase("txt2img original")
    phase("fingerprint")
    code, fp0, s = call(bm + "/fingerprint")
    print(f"fingerprint before: {fp0['fingerprint'][:16]} ({fp0['tensors']} tensors, {s:.1f} s)")
    img0, info0 = txt2img("original")

    for f in args.warm:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass
    phase("first test merge")
    code, r, s = call(bm + "/test", "POST", {"model_b": args.b, "preset": "GRAD_V"})
    print(f"POST test (GRAD_V, first, cold caches{', page cache warm' if args.warm else ''}): HTTP {code}, {r.get('written')} tensors, merge {r.get('seconds')} s, "
          f"request {s:.2f} s (queue wait {r.get('queue_wait')} s); {r.get('timings')}")
    ok &= code == 200
    phase("txt2img merged")
    img1, info1 = txt2img("merged")
    print(f"  merged image differs from original: {img1 != img0}; infotext has BlockMerge: {'BlockMerge:' in info1}")
    ok &= img1 != img0 and "BlockMerge:" in info1

    vec = [0.0, 1, 0.9166666667, 0.8333333333, 0.75, 0.6666666667, 0.5833333333, 0.5, 0.4166666667, 0.3333333333,
           0.25, 0.1666666667, 0.0833333333, 0, 0.0833333333, 0.1666666667, 0.25, 0.3333333333, 0.4166666667, 0.5,
           0.5833333333, 0.6666666667, 0.75, 0.8333333333, 0.9166666667, 1.0]
    vec[19] = 0.9  # OUT05
    phase("re-merge OUT05")
    code, r, s = call(bm + "/test", "POST", {"model_b": args.b, "weights": ",".join(map(str, vec))})
    print(f"POST test (OUT05 changed): HTTP {code}, {r.get('written')} tensors written, {r.get('unchanged')} unchanged, "
          f"merge {r.get('seconds')} s")
    phase("fingerprint")
    code, fp_live, _ = call(bm + "/fingerprint")

    phase("save")
    code, r, s = call(bm + "/save", "POST", {"output": args.save_name, "dtype": "fp32", "overwrite": True})
    print(f"POST save (fp32): HTTP {code}, {r.get('name')} [{r.get('short_hash')}] in {s:.1f} s")
    ok &= code == 200
    if code == 200:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from lib_merge.live import fingerprint
        from lib_merge.io.sources import open_source
        with open_source(r["path"]) as src:
            saved = {k: src.read(k) for k in fp_live["keys"]}  # the keys the live model holds
        same = fingerprint(saved) == fp_live["fingerprint"]
        print(f"  saved file's UNet + text encoder == live merged weights (fingerprint): {same}")
        ok &= same
    code, models, _ = call(u + "/sdapi/v1/sd-models")
    print(f"  registered in the checkpoint list: {any(m['model_name'] == args.save_name for m in models)}")

    phase("restore")
    code, r, s = call(bm + "/restore", "POST", {})
    print(f"POST restore: HTTP {code}, {r.get('restored')} tensors, {r.get('seconds')} s")
    phase("fingerprint")
    code, fp1, _ = call(bm + "/fingerprint")
    print(f"fingerprint after restore: {fp1['fingerprint'][:16]}  bit-exact: {fp1['fingerprint'] == fp0['fingerprint']}")
    ok &= fp1["fingerprint"] == fp0["fingerprint"]
    phase("interrupt")
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        zip(("code", "body", "s"), call(bm + "/test", "POST", {"model_b": args.b, "alpha": 0.3}))))
    worker.start()
    time.sleep(0.2)
    while worker.is_alive():  # the WebUI's own Interrupt, until the request answers
        call(u + "/sdapi/v1/interrupt", "POST", {})
        time.sleep(0.05)
    code, fp2, _ = call(bm + "/fingerprint")
    print(f"POST test interrupted by /sdapi/v1/interrupt: HTTP {result['code']}, {result['body'].get('detail')!r}, "
          f"{result['s']:.2f} s; weights as before (fingerprint): {fp2['fingerprint'] == fp0['fingerprint']}")
    ok &= result["code"] == 409 and fp2["fingerprint"] == fp0["fingerprint"]

    phase("txt2img restored")
    img2, info2 = txt2img("restored")
    print(f"  restored image identical to original: {img2 == img0}; BlockMerge in infotext: {'BlockMerge:' in info2}")
    ok &= img2 == img0 and "BlockMerge:" not in info2
    code, st, _ = call(bm + "/status")
    print("source bytes read:", {Path(k).name: v for k, v in st["bytes_read"].items()})
    if sampler:
        sampler.report()
        print("WebUI process memory at the end: " + ", ".join(f"{k} {v / 1e9:.2f} GB"
                                                          for k, v in proc_memory(args.pid).items()))
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
