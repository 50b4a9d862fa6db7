"""Check "Free memory" in a running WebUI (the harness in ../shared/webui-harness), over HTTP as a user would.

    python bench/webui_free_check.py --pid PID [--url http://127.0.0.1:7860] [--b synthB] [--warm FILE ...]

Test-merges A + B, waits for the caches to be copied into RAM (GET status), frees (POST free) and compares the
bytes the route says it freed with the drop of the WebUI process's anonymous memory (RssAnon, /proc/PID/status);
then test-merges with another alpha (every tensor recomputed, B read from its file again) and with the first
alpha again (same fingerprint as the first merge), test-merges GRAD_V (BASE and M00 back to A: A's tensors of
those keys go at the next free) and frees, restores (bit-exact)
and frees again (nothing is kept with nothing merged). PASS when each drop is at least 90 % of the bytes freed.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from webui_check import call, common_parser, endpoints, ensure_loaded, proc_memory  # noqa: E402

MIN_SHARE = 0.9  # of the bytes the route reports freed, the process's RssAnon must drop at least this much


def gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def rss_anon(pid: int) -> int:
    return proc_memory(pid)["RssAnon"]


def disk_reads(pid: int) -> int:
    """Bytes the process made the kernel read from disk (page-cache misses), /proc/PID/io."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def wait_copied(bm: str, timeout: float = 600) -> dict:
    """GET status until the background copy into RAM is done; the last status."""
    t0 = time.perf_counter()
    while True:
        code, st, _ = call(bm + "/status")
        if st.get("cache_pending_bytes", 0) == 0 or time.perf_counter() - t0 > timeout:
            print(f"  caches copied into RAM after {time.perf_counter() - t0:.1f} s: {gb(st['cache_bytes'])}"
                  + (f" ({gb(st['cache_pending_bytes'])} still pending)" if st.get("cache_pending_bytes") else ""))
            return st
        time.sleep(0.5)


def peak_during(pid: int, fn):
    """``fn()`` and the highest RssAnon seen while it ran (sampled every 10 ms)."""
    peak, stop = [rss_anon(pid)], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon(pid))
            time.sleep(0.01)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        return fn(), peak[0]
    finally:
        stop.set()
        t.join()


def free_and_measure(bm: str, pid: int, label: str) -> tuple[bool, dict]:
    """POST free between two RssAnon reads; print the figures side by side; PASS/FAIL on the drop."""
    st = wait_copied(bm)
    time.sleep(1.0)  # let the WebUI settle (gradio's own threads allocate a little)
    before = rss_anon(pid)
    (code, r, s), peak = peak_during(pid, lambda: call(bm + "/free", "POST", {}))
    time.sleep(0.5)
    after = rss_anon(pid)
    freed, kept = r.get("freed_bytes", 0), r.get("cache_bytes", -1)
    drop = before - after
    print(f"POST free ({label}): HTTP {code} in {s:.2f} s (server {r.get('seconds')} s); {r.get('message')!r}")
    print(f"  {'caches before':>16} {'freed (route)':>14} {'kept':>12} | {'RssAnon before':>15} {'after':>12} "
          f"{'drop':>12} {'drop/freed':>10}")
    share = drop / freed if freed else float("nan")
    print(f"  {gb(st['cache_bytes']):>16} {gb(freed):>14} {gb(kept):>12} | {gb(before):>15} {gb(after):>12} "
          f"{gb(drop):>12} {share:>10.1%}")
    ok = code == 200 and freed > 0 and drop >= MIN_SHARE * freed
    print(f"{'PASS' if ok else 'FAIL'}: RssAnon dropped {gb(drop)} >= {MIN_SHARE:.0%} of the {gb(freed)} freed ({label})")
    print(f"  RssAnon peak during the request: {gb(peak)} ({gb(peak - before)} above the level before)")
    return ok, r


def main() -> int:
    ap = common_parser(os.path.join(tempfile.gettempdir(), "blockmerge-webui-free-check"))
    ap.add_argument("--pid", type=int, required=True, help="WebUI process id (its /proc/PID/status is read)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--warm", nargs="*", default=[], metavar="FILE", help="read these files once first (page cache)")
    args = ap.parse_args()
    u, bm, _ = endpoints(args)
    ok = True
    body = {"model_b": args.b, "alpha": args.alpha}

    ensure_loaded(u, args.a)
    code, st, _ = call(bm + "/status")
    if st.get("live"):
        call(bm + "/restore", "POST", {})
    call(bm + "/free", "POST", {})  # start from empty caches
    code, fp0, s = call(bm + "/fingerprint")
    print(f"fingerprint original: {fp0['fingerprint'][:16]} ({fp0['tensors']} tensors, {s:.1f} s)")
    print("WebUI memory at the start: " + ", ".join(f"{k} {gb(v)}" for k, v in proc_memory(args.pid).items()))
    for f in args.warm:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass

    code, r, s = call(bm + "/test", "POST", body)
    print(f"POST test {body}: HTTP {code}, {r.get('written')} tensors written, {s:.2f} s; {r.get('message')!r}")
    ok &= code == 200
    code, fp1, _ = call(bm + "/fingerprint")
    print(f"fingerprint merged: {fp1['fingerprint'][:16]}")
    passed, _ = free_and_measure(bm, args.pid, "test merge live: B's tensors go, A's written tensors stay")
    ok &= passed

    # another alpha first: every tensor is recomputed from B read again (the same recipe would write nothing)
    other = {**body, "alpha": round(1 - args.alpha / 2, 3)}
    reads0, disk0 = sum(call(bm + "/status")[1]["bytes_read"].values()), disk_reads(args.pid)
    code, r, s = call(bm + "/test", "POST", other)
    reads1, disk1 = sum(call(bm + "/status")[1]["bytes_read"].values()), disk_reads(args.pid)
    print(f"POST test {other} after free: HTTP {code}, {r.get('written')} written, {s:.2f} s, "
          f"read {gb(reads1 - reads0)} from the files ({gb(disk1 - disk0)} of it from disk: not in the page cache)")
    ok &= code == 200
    code, r, s = call(bm + "/test", "POST", body)
    code_fp, fp2, _ = call(bm + "/fingerprint")
    same = fp2["fingerprint"] == fp1["fingerprint"]
    print(f"POST test {body} again: HTTP {code}, {r.get('written')} written, {s:.2f} s; "
          f"fingerprint {fp2['fingerprint'][:16]}")
    print(f"{'PASS' if code == 200 and same else 'FAIL'}: the test merge after free equals the first one (fingerprint)")
    ok &= code == 200 and same

    # GRAD_V puts BASE (text encoder) and M00 back to A: A's tensors of those keys are no longer needed
    code, r, s = call(bm + "/test", "POST", {"model_b": args.b, "preset": "GRAD_V"})
    print(f"POST test GRAD_V: HTTP {code}, {r.get('written')} written, {s:.2f} s; {r.get('message')!r}")
    ok &= code == 200
    code_fp, fp_v, _ = call(bm + "/fingerprint")
    passed, _ = free_and_measure(bm, args.pid, "GRAD_V live: B's tensors and A's of BASE and M00 go")
    ok &= passed
    code_a, r_a, _ = call(bm + "/test", "POST", {"model_b": args.b, "preset": "GRAD_A"})
    code, r, s = call(bm + "/test", "POST", {"model_b": args.b, "preset": "GRAD_V"})
    code_fp, fp_v2, _ = call(bm + "/fingerprint")
    same = code_a == code == 200 and fp_v2["fingerprint"] == fp_v["fingerprint"]
    print(f"{'PASS' if same else 'FAIL'}: after that free, GRAD_A (HTTP {code_a}, {r_a.get('written')} written) then "
          f"GRAD_V again (HTTP {code}, {r.get('written')} written) gives the GRAD_V weights of before (fingerprint)")
    ok &= same

    code, r, s = call(bm + "/restore", "POST", {})
    code_fp, fp3, _ = call(bm + "/fingerprint")
    exact = fp3["fingerprint"] == fp0["fingerprint"]
    print(f"POST restore: HTTP {code}, {r.get('restored')} tensors, {r.get('seconds')} s; {r.get('message')!r}")
    print(f"{'PASS' if code == 200 and exact else 'FAIL'}: restore after free is bit-exact (fingerprint)")
    ok &= code == 200 and exact

    passed, r = free_and_measure(bm, args.pid, "after Restore: everything goes")
    ok &= passed
    empty = r.get("cache_bytes") == 0 and call(bm + "/status")[1]["cache_bytes"] == 0
    print(f"{'PASS' if empty else 'FAIL'}: nothing cached after Restore + free")
    ok &= empty
    print("WebUI memory at the end: " + ", ".join(f"{k} {gb(v)}" for k, v in proc_memory(args.pid).items()))
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
