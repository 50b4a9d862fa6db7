"""Drive the BlockMerge tab in headless Chromium as a user would (clicks and typing), in a running WebUI (harness).

    <harness venv>/bin/python bench/webui_tab_check.py [--url http://127.0.0.1:7860/] [--b synthB] [--out DIR]

Opens the WebUI, clicks the BlockMerge tab, picks model B and preset GRAD_V, ticks "Block weights", sets a
64x64 2-step preview, clicks Test merge, Preview, Save, Restore, Stop, Free memory, and after each click waits for
the tab's status line. Checks against the HTTP API: weights merged after Test merge, the preview's infotext
carries the recipe, the saved file is registered, Restore brings back the original fingerprint, Stop clicked
during a Test merge leaves the weights as they were, and Free memory then empties the caches. Screenshots go to
--out.
Needs Debian's chromium and the `websockets` package (>= 11; the harness venv has it).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

ROOT = "((document.querySelector('gradio-app') || {}).shadowRoot || document)"


def get(url: str):
    with urllib.request.urlopen(url, timeout=600) as r:
        return json.loads(r.read())


class Page:
    """A minimal DevTools-protocol client for one page."""

    def __init__(self, ws_url: str):
        self.ws = connect(ws_url, max_size=None)
        self.n = 0

    def cdp(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expr: str):
        res = self.cdp("Runtime.evaluate", expression=expr, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr}: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def wait(self, expr: str, timeout: float, what: str):
        end = time.time() + timeout
        while time.time() < end:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.3)
        raise TimeoutError(f"timed out waiting for {what}")

    def q(self, selector: str) -> str:
        return f"{ROOT}.querySelector({json.dumps(selector)})"

    def click(self, selector: str) -> None:
        if not self.js(f"(() => {{ const e = {self.q(selector)}; if (!e) return false; e.click(); return true; }})()"):
            raise RuntimeError(f"no element {selector}")

    def type_into(self, selector: str, text: str, enter: bool = False) -> None:
        self.js(f"(() => {{ const e = {self.q(selector)}; e.focus(); e.value = ''; "
                "e.dispatchEvent(new Event('input', {bubbles: true})); })()")
        self.cdp("Input.insertText", text=text)
        if enter:
            time.sleep(0.3)
            for kind in ("keyDown", "keyUp"):
                self.cdp("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
        self.js(f"{self.q(selector)}.blur()")

    def set_number(self, elem_id: str, value: float) -> None:
        self.js(f"(() => {{ const e = {self.q('#' + elem_id + ' input[type=number]')}; e.value = {value}; "
                "e.dispatchEvent(new Event('input', {bubbles: true})); "
                "e.dispatchEvent(new Event('change', {bubbles: true})); e.blur(); })()")

    def status(self) -> str:
        return self.js(f"({self.q('#blockmerge_status')} || {{innerText: ''}}).innerText") or ""

    def wait_status(self, contains: str, timeout: float = 600) -> str:
        end = time.time() + timeout
        while time.time() < end:
            s = self.status()
            if contains in s:
                return s
            if "error" in s.lower() and contains not in s:
                raise RuntimeError(f"status line: {s}")
            time.sleep(0.3)
        raise TimeoutError(f"status never said {contains!r}; last: {self.status()!r}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.cdp("Page.captureScreenshot", format="png",
                                                   captureBeyondViewport=True)["data"]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7860/")
    ap.add_argument("--b", default="synthB")
    ap.add_argument("--save-name", default="blockmerge-tab-check")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "blockmerge-tab-check"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--port", type=int, default=9334)
    args = ap.parse_args()
    u = args.url.rstrip("/")
    bm = u + "/blockmerge/v1"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(120):  # A1111 loads its checkpoint in the background at startup; Forge at first use
        st = get(bm + "/status")
        if st.get("loaded") or st.get("selected"):
            break
        time.sleep(1)
    fp0 = get(bm + "/fingerprint")["fingerprint"]  # on Forge this loads the selected checkpoint
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
        print(f"{'ok  ' if cond else 'FAIL'} {label}", flush=True)

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
        print("tab open", flush=True)
        page.type_into("#blockmerge_model_b input", args.b, enter=True)
        page.wait(f"({page.q('#blockmerge_model_b input')}.value || '').startsWith({json.dumps(args.b)})", 10,
                  "model B to be chosen")
        page.click("#blockmerge_use_blocks input")
        page.type_into("#blockmerge_preset input", "GRAD_V", enter=True)
        page.wait_status("preset GRAD_V set", 30)
        weights = page.js(f"{page.q('#blockmerge_weights_alpha textarea')}.value")
        print(f"preset applied, weight text: {weights}", flush=True)
        page.click("#blockmerge_preview_acc .label-wrap")
        time.sleep(0.5)
        for elem, v in (("blockmerge_steps", 2), ("blockmerge_width", 64), ("blockmerge_height", 64),
                        ("blockmerge_seed", 1)):
            page.set_number(elem, v)
        page.screenshot(out / "1_settings.png")

        t = time.time()
        page.click("#blockmerge_test")
        s = page.wait_status("test merge live", 300)
        print(f"Test merge clicked: {time.time() - t:.1f} s; status: {s}", flush=True)
        st = get(bm + "/status")
        want = get(bm + "/presets")["presets"]["sd1"]["GRAD_V"]["values"]
        got = [float(x) for x in (st["params"] or {}).get("weights", "").split(",") if x]
        check("after Test merge the API reports a live merge with GRAD_V's weights", st["live"] and len(got) == 26
              and all(abs(x - y) < 1e-9 for x, y in zip(got, want)))
        check("weights changed", get(bm + "/fingerprint")["fingerprint"] != fp0)

        t = time.time()
        page.click("#blockmerge_preview")
        s = page.wait_status("preview rendered", 600)
        info = page.js(f"{page.q('#blockmerge_infotext textarea')}.value")
        has_img = page.js(f"!!{page.q('#blockmerge_image img')}")
        print(f"Preview clicked: {time.time() - t:.1f} s; status: {s}", flush=True)
        check("preview image shown, infotext has the BlockMerge recipe", has_img and "BlockMerge:" in (info or ""))
        page.screenshot(out / "2_preview.png")

        page.type_into("#blockmerge_output textarea", args.save_name)
        page.click("#blockmerge_overwrite input")
        t = time.time()
        page.click("#blockmerge_save")
        s = page.wait_status("saved", 600)
        print(f"Save clicked: {time.time() - t:.1f} s; status: {s}", flush=True)
        names = [m["model_name"] for m in get(u + "/sdapi/v1/sd-models")]
        check(f"{args.save_name} registered in the checkpoint list", args.save_name in names)

        t = time.time()
        page.click("#blockmerge_restore")
        s = page.wait_status("restored", 120)
        print(f"Restore clicked: {time.time() - t:.1f} s; status: {s}", flush=True)
        check("fingerprint after Restore equals the original (bit-exact)",
              get(bm + "/fingerprint")["fingerprint"] == fp0)
        page.screenshot(out / "3_restored.png")

        # Stop: click it over and over while a Test merge runs; the merge must roll back to the original
        page.click("#blockmerge_test")
        page.js(f"window.__bmStop = setInterval(() => {{ const b = {page.q('#blockmerge_stop')}; if (b) b.click(); }}, 30)")
        try:
            s = page.wait(f"(() => {{ const t = ({page.q('#blockmerge_status')} || {{}}).innerText || ''; "
                          "return (t.includes('interrupted') || t.includes('test merge live')) ? t : ''; })()",
                          120, "the Test merge to end")
        finally:
            page.js("clearInterval(window.__bmStop)")
        print(f"Test merge with Stop clicked: status: {s}", flush=True)
        check("Stop interrupts a Test merge and the weights stay as they were",
              "interrupted" in s and get(bm + "/fingerprint")["fingerprint"] == fp0)

        held = get(bm + "/status")["cache_bytes"]
        t = time.time()
        page.click("#blockmerge_free")
        s = page.wait_status("freed", 120)
        print(f"Free memory clicked: {time.time() - t:.1f} s; status: {s}", flush=True)
        check(f"Free memory empties the caches with nothing merged ({held / 1e9:.2f} GB before)",
              "caches 0 MB" in s and get(bm + "/status")["cache_bytes"] == 0)
        page.screenshot(out / "4_freed.png")
    finally:
        proc.terminate()
        proc.wait(10)
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
