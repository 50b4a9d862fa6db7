"""Live test-merge benchmark on a full-size SD1.5 model held in memory as the WebUI holds it (fp32 parameters
with the real key names), side by side in one run: first (cold) test merge, a full re-merge from warm caches, a
re-merge after changing one block (OUT05), and a restore; plus the plain-torch floors for the same work.

    python bench/live_bench.py [--dir bench/out] [--cache cpu|mmap|gpu]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lib_merge import synthetic  # noqa: E402
from lib_merge.arch import ARCHS, block_of  # noqa: E402
from lib_merge.live import CachePolicy, LiveSession, fingerprint  # noqa: E402
from lib_merge.recipe import Recipe  # noqa: E402

GRAD_V = [0.0, 1, 0.9166666667, 0.8333333333, 0.75, 0.6666666667, 0.5833333333, 0.5, 0.4166666667, 0.3333333333,
          0.25, 0.1666666667, 0.0833333333, 0, 0.0833333333, 0.1666666667, 0.25, 0.3333333333, 0.4166666667, 0.5,
          0.5833333333, 0.6666666667, 0.75, 0.8333333333, 0.9166666667, 1.0]


def rss() -> tuple[int, int]:
    anon = hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return anon, hwm


class Target:
    def __init__(self, module):
        self.module = module
        self._params = dict(module.named_parameters())

    def params(self):
        return self._params

    def prepare(self, keys):
        pass

    def written(self, keys):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--cache", default="cpu", choices=[p.value for p in CachePolicy])
    args = ap.parse_args()
    d = Path(args.dir)
    sys.argv = [sys.argv[0], "--dir", str(d)]
    from merge_bench import build_inputs, warm  # noqa: E402
    a, b = build_inputs("sd15", d)
    warm(a, b)  # page cache warm, as the peers were measured: the first merge then measures our work, not the disk
    listing = synthetic.load_listing("sd15")
    module = synthetic.build_module(listing, dtype=torch.float32)
    synthetic.load_into(module, a)
    target = Target(module)
    params = target.params()
    n_el = sum(p.numel() for p in params.values())
    out05 = [k for k in params if block_of(k, ARCHS["sd1"]) == "OUT05"]
    share = sum(params[k].numel() for k in out05) / n_el
    anon0, _ = rss()
    fp0 = fingerprint(params)
    print(f"model: {len(params)} UNet + text-encoder tensors, {n_el / 1e9:.3f} G elements fp32; "
          f"OUT05 share {share * 100:.1f} %; torch threads {torch.get_num_threads()}; cache {args.cache}")

    import gc
    gc.collect()
    anon_before, _ = rss()
    session = LiveSession(target, a, cache=args.cache)
    vec = list(GRAD_V)
    r = Recipe(models=[str(a), str(b)], weights=",".join(map(str, vec)))
    rep_first = session.apply(r)
    t = time.perf_counter()
    session.wait_cached()
    copy_s = time.perf_counter() - t
    anon1, _ = rss()
    vec2 = [0.5] * 26
    rep_full = session.apply(Recipe(models=[str(a), str(b)], weights=",".join(map(str, vec2))))
    vec3 = list(vec2)
    vec3[19] = 0.9  # OUT05
    rep_block = session.apply(Recipe(models=[str(a), str(b)], weights=",".join(map(str, vec3))))
    t = time.perf_counter()
    n_restored = session.restore()
    restore_s = time.perf_counter() - t
    exact = fingerprint(params) == fp0
    anon2, hwm = rss()
    session.close()
    del session
    gc.collect()
    # floors: plain torch on the same data (A and B held in the files' fp16, as our caches hold them)
    from lib_merge.io.sources import open_source
    with open_source(a) as sa, open_source(b) as sb:
        t = time.perf_counter()
        A16 = {k: sa.read(k) for k in params}
        B16 = {k: sb.read(k) for k in params}
        read_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(A16[k])
            p.lerp_(B16[k].float(), 0.5)
    floor_full = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        for k in out05:
            params[k].copy_(A16[k])
            params[k].lerp_(B16[k].float(), 0.5)
    floor_block = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(A16[k])
    floor_restore = time.perf_counter() - t
    del A16, B16

    print()
    print(f"{'step':<34} {'BlockMerge s':>12} {'floor s':>8} {'tensors':>8}  note")
    print(f"{'first test merge (empty caches)':<34} {rep_first.seconds:12.2f} {read_s + floor_full:8.2f} "
          f"{rep_first.written:8d}  reads {rep_first.bytes_read / 1e9:.2f} GB (floor = read A,B fp16 + merge)")
    print(f"{'  then: copy of the caches into RAM':<34} {copy_s:12.2f} {'':>8} {'':>8}  in the background "
          f"(waited for here); cache '{args.cache}'")
    print(f"{'full re-merge (warm caches)':<34} {rep_full.seconds:12.2f} {floor_full:8.2f} {rep_full.written:8d}  "
          f"reads {rep_full.bytes_read} B")
    print(f"{'one-block re-merge (OUT05)':<34} {rep_block.seconds:12.2f} {floor_block:8.2f} {rep_block.written:8d}  "
          f"reads {rep_block.bytes_read} B; {rep_block.seconds / rep_full.seconds * 100:.1f} % of the full re-merge "
          f"(goal <= {1.5 * share * 100:.1f} % = 1.5 x OUT05's share)")
    print(f"{'restore':<34} {restore_s:12.2f} {floor_restore:8.2f} {n_restored:8d}  bit-exact (fingerprint): {exact}")
    print(f"\nanonymous memory: model {anon0 / 1e9:.2f} GB; before the first merge {anon_before / 1e9:.2f} GB, "
          f"after it {anon1 / 1e9:.2f} GB (caches +{(anon1 - anon_before) / 1e9:.2f} GB); "
          f"peak RSS of this process before the floors ran (VmHWM) {hwm / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
