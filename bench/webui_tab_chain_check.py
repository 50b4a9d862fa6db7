"""Drive the tab's merge chain in headless Chromium (clicks), in a running WebUI (harness).

    <harness venv>/bin/python bench/webui_tab_chain_check.py [--url http://127.0.0.1:7860/] [--b synthB]

Test merge (B, GRAD_V), "Merge again from the preview", the chain shown; preset GRAD_A, Test merge again (the
API then reports model A as the nested step), Preview (the infotext names the chain), Save, Restore (fingerprint
back to the original), Clear chain. Uses the Page client of webui_tab_check.py; screenshots go to --out. Leaves
``blockmerge-tab-chain-check.safetensors`` in the models folder: delete it after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_tab_check import ROOT, Page, get  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7860/")
    ap.add_argument("--b", default="synthB")
    ap.add_argument("--save-name", default="blockmerge-tab-chain-check")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "blockmerge-tab-chain-check"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--port", type=int, default=9335)
    args = ap.parse_args()
    u = args.url.rstrip("/")
    bm = u + "/blockmerge/v1"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(120):
        if get(bm + "/status").get("loaded"):
            break
        time.sleep(1)
    fp0 = get(bm + "/fingerprint")["fingerprint"]
    profile = tempfile.mkdtemp(prefix="blockmerge-chromium-")
    proc = subprocess.Popen([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,1800",
                             "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={args.port}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ok = True

    def check(label: str, cond: bool) -> None:
        nonlocal ok
        ok &= bool(cond)
        print(f"{'PASS' if cond else 'FAIL'} {label}", flush=True)

    try:
        targets = None
        for _ in range(60):
            try:
                targets = get(f"http://127.0.0.1:{args.port}/json")
                break
            except OSError:
                time.sleep(0.5)
        page = Page(next(t for t in targets if t.get("type") == "page")["webSocketDebuggerUrl"])
        page.cdp("Page.enable")
        page.cdp("Page.navigate", url=u + "/")
        page.wait(f"!!{page.q('#tabs > .tab-nav button')}", 180, "the WebUI to render")
        page.js(f"(() => {{ for (const b of {ROOT}.querySelectorAll('#tabs > .tab-nav button')) "
                "if (b.innerText.trim() === 'BlockMerge') b.click(); })()")
        page.wait(f"!!{page.q('#blockmerge_test')} && {page.q('#blockmerge_test')}.offsetParent !== null", 30,
                  "the BlockMerge tab")
        chain_disabled = f"{page.q('#blockmerge_chain')}.disabled"
        check("Merge again from the preview is disabled while nothing is live", page.js(chain_disabled))
        page.type_into("#blockmerge_model_b input", args.b, enter=True)
        page.wait(f"({page.q('#blockmerge_model_b input')}.value || '').startsWith({json.dumps(args.b)})", 10, "model B")
        page.click("#blockmerge_use_blocks input")
        page.type_into("#blockmerge_preset input", "GRAD_V", enter=True)
        page.wait_status("preset GRAD_V set", 30)
        page.click("#blockmerge_preview_acc .label-wrap")
        time.sleep(0.5)
        for elem, v in (("blockmerge_steps", 2), ("blockmerge_width", 64), ("blockmerge_height", 64),
                        ("blockmerge_seed", 1)):
            page.set_number(elem, v)

        t = time.time()
        page.click("#blockmerge_test")
        page.wait_status("test merge live", 300)
        print(f"Test merge (B, GRAD_V): {time.time() - t:.1f} s", flush=True)
        page.wait(f"!{chain_disabled}", 10, "the chain button to be enabled")
        page.click("#blockmerge_chain")
        s = page.wait_status("merges on top of", 30)
        shown = page.js(f"{page.q('#blockmerge_chain_info')}.innerText")
        print(f"Merge again from the preview: status {s!r}; chain {shown!r}", flush=True)
        check("the tab shows the chain", f"Base: (synthA × {args.b}, GRAD_V) → this merge" in (shown or ""))
        check("Clear chain is shown", page.js(f"{page.q('#blockmerge_clear_chain')}.offsetParent !== null"))
        page.type_into("#blockmerge_preset input", "GRAD_A", enter=True)
        page.wait_status("preset GRAD_A set", 30)
        t = time.time()
        page.click("#blockmerge_test")
        s = page.wait_status("test merge live", 300)
        print(f"Test merge on the chain (B, GRAD_A): {time.time() - t:.1f} s; status: {s}", flush=True)
        st = get(bm + "/status")
        nested = ((st.get("params") or {}).get("model_a") or {}).get("recipe") or {}
        check("the live merge's model A is the nested step (A + B, GRAD_V weights)",
              st["live"] and nested.get("model_a") == "synthA.safetensors" and nested.get("model_b", "").startswith(args.b))
        page.screenshot(out / "1_chain.png")

        t = time.time()
        page.click("#blockmerge_preview")
        page.wait_status("preview rendered", 600)
        info = page.js(f"{page.q('#blockmerge_infotext textarea')}.value") or ""
        print(f"Preview: {time.time() - t:.1f} s", flush=True)
        check("the preview's infotext names the chain (nested recipe)", '\\"recipe\\"' in info or '"recipe"' in info)
        page.screenshot(out / "2_preview.png")

        page.type_into("#blockmerge_output textarea", args.save_name)
        page.click("#blockmerge_overwrite input")
        page.click("#blockmerge_save")
        s = page.wait_status("saved", 600)
        print(f"Save: {s}", flush=True)
        check("the chain saved and registered", args.save_name in [m["model_name"] for m in get(u + "/sdapi/v1/sd-models")])

        page.click("#blockmerge_restore")
        page.wait_status("restored", 120)
        check("Restore: the loaded checkpoint's own weights, bit-exact", get(bm + "/fingerprint")["fingerprint"] == fp0)
        page.wait(chain_disabled, 10, "the chain button to be disabled")
        check("Merge again from the preview is disabled after Restore", True)
        page.click("#blockmerge_clear_chain")
        page.wait_status("chain cleared", 30)
        check("Clear chain empties the chain line", "Base:" not in (page.js(f"{page.q('#blockmerge_chain_info')}.innerText") or ""))
        page.screenshot(out / "3_cleared.png")
    finally:
        proc.terminate()
        proc.wait(10)
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
