"""CPU kernels for the task-vector modes (TIES, DARE, DARE-TIES) that stream whole tensors through small fp32
chunks: the inputs stay in their own dtype and are never written, intermediates live in cache-sized buffers
(no fp32 copy of any input, no whole-size temporary), and every entry gets the numbers the whole-tensor
formulas in ``taskvec.py`` give it (tests compare the bits).

- A task vector's top-k threshold is its exact k-th largest magnitude: an evenly spaced sample brackets it,
  one pass counts the entries above the bracket and collects those inside, and a partition of the few
  collected gives the value (the whole-tensor partition when the sample misjudged the bracket).
- Masks and sign votes use numpy's comparison and boolean-multiply loops (several times faster than torch's
  on the CPU). Zeroing by multiplying with a mask equals a masked fill for finite values, so a chunk whose sum
  is not finite is computed again by the masked-fill formulas (``exact``), which treat NaN and ±inf as the
  whole-tensor code does.
- DARE's keep masks come from :class:`KeepDraws`: one SFC64 stream per key and model (numpy's ``random_raw``,
  a stream numpy keeps fixed across versions), one 32-bit draw per entry in order, so a mask depends on
  neither chunking, threads nor device.
- When numba is installed, the counting pass and the merge pass run as compiled kernels (``kernels.py``) with
  the same numbers; the numpy chunks below then only redo the chunks the kernels flag (a non-finite total),
  and do everything for inputs the kernels do not take (bf16, mixed task-vector dtypes).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import kernels

CHUNK = 1 << 15  # elements per chunk: torch splits an op over its threads only above 32768 elements (its grain
# size), so every op on a chunk stays on the calling thread (no thread-pool wake-ups per op: 2 threads on a busy
# machine made 64 Ki chunks 8x slower); a chunk's buffers stay in cache
SAMPLE = 1 << 16  # sample size that brackets a top-k threshold
U32 = float(1 << 32)
ZERO = "zero"  # a trim that zeroes the whole task vector (the density rounds to no entry)
Trim = Optional[Union[float, str]]  # None: keep everything; ZERO; else the smallest magnitude kept
Exact = Callable[[list[Tensor]], Tensor]  # the whole-tensor formula for one chunk's masked deltas


class Chunks:
    """Cache-sized fp32 and bool buffers for a streamed pass over ``n`` entries of A and ``deltas`` task
    vectors. The task vectors' chunks are the rows of one 2-D buffer, so one numpy call treats them all (a
    chunk costs a few dozen calls whatever the number of models)."""

    def __init__(self, n: int, deltas: int):
        self.n = n
        self.size = min(CHUNK, n)
        self.deltas = deltas
        self.t = torch.empty((deltas + 3, self.size), dtype=torch.float32)  # A, δ…, total, spare
        self.p = torch.empty((deltas, self.size), dtype=torch.float32)  # products / magnitudes
        self.b = np.empty((2 * deltas + 1, self.size), dtype=bool)  # masks per δ, DARE's keep masks, scratch
        self.cnt = np.empty(self.size, dtype=np.uint8)  # agreeing task vectors per entry (≤ MAX_MODELS - 1)

    def spans(self):
        """(start, end, views) per chunk; the views are cut to the chunk's length."""
        full = Views(self, self.size)
        for s in range(0, self.n, self.size):
            e = min(self.n, s + self.size)
            yield s, e, (full if e - s == self.size else Views(self, e - s))


class Views:
    """One chunk's buffers (torch tensors and their numpy views): ``a``; ``D`` (a row per task vector, ``Dt``
    in torch); ``total``; ``P`` (products, a row per task vector); masks ``M`` and DARE's keep masks ``K`` (a
    row per task vector); ``scratch``; ``cnt``."""

    def __init__(self, c: Chunks, L: int):
        k = c.deltas
        self.L = L
        self.a = c.t[0, :L]
        self.d = [c.t[1 + i, :L] for i in range(k)]
        self.total = c.t[1 + k, :L]
        self.an, self.tn = self.a.numpy(), self.total.numpy()
        self.Dt = c.t[1:1 + k, :L]
        self.D = self.Dt.numpy()
        self.P = c.p[:, :L].numpy()
        self.M = c.b[:k, :L]
        self.K = c.b[k:2 * k, :L]
        self.scratch = c.b[2 * k, :L]
        self.cnt = c.cnt[:L]

    def load_deltas(self, ms: list[Tensor], s: int, e: int) -> None:
        """Every task vector's chunk, m − A, in fp32 (A's chunk already loaded)."""
        for d, m in zip(self.d, ms):
            d.copy_(m[s:e])
        np.subtract(self.D, self.an, out=self.D)


def _split(t: Tensor) -> Tensor:
    return t.reshape(-1)


# -- the exact k-th largest magnitude -------------------------------------------------------------------------
def _bracket(a: Tensor, m: Tensor, k: int) -> tuple[np.float32, np.float32]:
    """Magnitudes that enclose the k-th largest |m − a| with high probability, from an evenly spaced sample."""
    n = a.numel()
    step = max(1, n // SAMPLE)
    sample = _kernel_sample(a, m, step)
    if sample is None:
        sample = (m[::step].float() - a[::step].float()).abs_().numpy()
    s = sample.size
    q = (n - k) / n
    margin = 4.0 * math.sqrt(q * (1.0 - q) / s) + 2.0 / s
    lo, hi = max(0, math.floor((q - margin) * s)), min(s - 1, math.ceil((q + margin) * s))
    sample.partition([lo, hi])  # NaN sorts last
    return np.float32(sample[lo]), np.float32(sample[hi])


def thresholds(a: Tensor, ms: list[Tensor], density: float) -> list[Trim]:
    """Each task vector's trim as ``taskvec.keep_top`` makes it: keep the k = ⌈density · n⌉ largest magnitudes
    (ties with the k-th kept too). The threshold is the exact k-th largest |m − a| (NaN counted largest), found
    in one streamed pass over all task vectors; a NaN threshold drops nothing (|δ| < NaN is false)."""
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite chunks go to the exact formula
        a, ms = _split(a), [_split(m) for m in ms]
        n = a.numel()
        k = math.ceil(density * n)
        if k >= n:
            return [None] * len(ms)
        if k == 0:
            return [ZERO] * len(ms)
        brackets = [_bracket(a, m, k) for m in ms]
        cap = n // 16 + SAMPLE  # most candidates collected per task vector before giving up on its bracket
        lo = np.array([br[0] for br in brackets], dtype=np.float32)[:, None]
        hi = np.array([br[1] for br in brackets], dtype=np.float32)[:, None]
        counted = _kernel_counts(a, ms, lo, hi, cap)
        if counted is None:
            counted = _numpy_counts(a, ms, lo, hi, cap)
        above, within, parts = counted
        out: list[Trim] = []
        for i, m in enumerate(ms):
            t = _pick(a, m, k, brackets[i], above[i], within[i], parts[i], cap)
            out.append(None if math.isnan(t) else t)
        return out


def _kernel_inputs(a: Tensor, ms: list[Tensor]):
    """The loaded kernels and A and the models as they take them, or None (no kernels, or inputs they do not
    take: the numpy path runs)."""
    kern = kernels.get()
    ins = kernels.inputs(a, ms) if kern is not None else None
    return None if ins is None else (kern, ins)


def _kernel_counts(a: Tensor, ms: list[Tensor], lo: np.ndarray, hi: np.ndarray, cap: int):
    """``_numpy_counts`` by the compiled kernel (None when it cannot run on these inputs)."""
    got = _kernel_inputs(a, ms)
    if got is None:
        return None
    kern, ins = got
    above = np.zeros(len(ms), dtype=np.int64)
    within = np.zeros(len(ms), dtype=np.int64)
    cand = np.empty((len(ms), min(cap, a.numel()) + 1), dtype=np.float32)
    if not _run(kern.bracket_counts, ins[0], ins[1], lo[:, 0].copy(), hi[:, 0].copy(), above, within, cand):
        return None
    parts = [[cand[i, :min(int(within[i]), cand.shape[1] - 1)]] for i in range(len(ms))]
    return [int(x) for x in above], [int(x) for x in within], parts


def _kernel_sample(a: Tensor, m: Tensor, step: int) -> Optional[np.ndarray]:
    """|m − a| at every ``step``-th entry by the compiled kernel (torch's strided copies of a 64 Ki sample cost
    1.5 ms a tensor), or None when it cannot run on these inputs."""
    got = _kernel_inputs(a, [m])
    if got is None:
        return None
    kern, ins = got
    out = np.empty(-(-a.numel() // step), dtype=np.float32)
    return out if _run(kern.sample_magnitudes, ins[0], ins[1][0], step, out) else None


def _numpy_counts(a: Tensor, ms: list[Tensor], lo: np.ndarray, hi: np.ndarray, cap: int):
    """Per task vector: the entries whose magnitude is above its bracket (NaN counted above), how many lie
    inside it, and those inside (collected while at most ``cap``)."""
    with np.errstate(invalid="ignore", over="ignore"):
        n = a.numel()
        above, within = [0] * len(ms), [0] * len(ms)
        parts: list[list[np.ndarray]] = [[] for _ in ms]
        c = Chunks(n, len(ms))
        for s, e, v in c.spans():
            v.a.copy_(a[s:e])
            v.load_deltas(ms, s, e)
            mag, le, inside = v.D, v.M, v.K
            np.abs(mag, out=mag)
            np.less_equal(mag, hi, out=le)
            np.greater_equal(mag, lo, out=inside)
            np.logical_and(inside, le, out=inside)
            for i in range(len(ms)):
                above[i] += v.L - np.count_nonzero(le[i])  # NaN compares false: counted above, as the largest
                got = np.count_nonzero(inside[i])
                within[i] += got
                if got and within[i] <= cap:
                    parts[i].append(mag[i][inside[i]])
        return above, within, parts


def _pick(a: Tensor, m: Tensor, k: int, bracket: tuple[np.float32, np.float32], above: int, within: int,
          parts: list[np.ndarray], cap: int) -> float:
    r = k - above  # the threshold is the r-th largest of the bracketed magnitudes
    lo, hi = bracket
    if 1 <= r <= within:
        if lo == hi:
            return float(lo)
        if within <= cap:
            cands = np.concatenate(parts)
            cands.partition(within - r)
            return float(cands[within - r])
    whole = (m.float() - a.float()).abs_().numpy()  # the sample misjudged the bracket: partition everything
    n = whole.size
    whole.partition(n - k)
    return float(whole[n - k])


def trim_exact(d: Tensor, trim: Trim) -> Tensor:
    """keep_top's masked fill given its threshold."""
    if trim == ZERO:
        return d.zero_()
    if trim is not None:
        d.masked_fill_(torch.lt(d.abs(), torch.tensor(trim, dtype=torch.float32)), 0.0)
    return d


# -- DARE's draws -------------------------------------------------------------------------------------------
class KeepDraws:
    """Uniform 32-bit draws for one task vector of one key, one per entry in order: the stream of an SFC64
    generator seeded with (key seed, model index), two draws per 64-bit output, low half first. An entry is
    kept with probability p when its draw u satisfies u < p · 2³²."""

    def __init__(self, seed: int, model: int):
        self.bits = np.random.SFC64(np.random.SeedSequence([seed, model]))

    def next(self, n: int) -> np.ndarray:
        """The next ``n`` draws (every call but a stream's last asks an even number)."""
        raw = self.bits.random_raw((n + 1) // 2)
        u = np.empty(2 * raw.size, dtype=np.uint32)
        np.bitwise_and(raw, np.uint64(0xFFFFFFFF), out=u[0::2], casting="unsafe")
        np.right_shift(raw, np.uint64(32), out=u[1::2], casting="unsafe")
        return u[:n]


def keep_below(p: float) -> int:
    """The draws u kept with probability ``p`` are u < this (p as float32, as torch compares a tensor with it;
    ≤ 0 keeps none, ≥ 2³² keeps all)."""
    return math.ceil(float(np.float32(p)) * U32)


def keep_fixed(u: np.ndarray, p: float, out: np.ndarray) -> np.ndarray:
    """``u < p · 2³²`` for one probability ``p`` (:func:`keep_below`)."""
    thr = keep_below(p)
    if thr >= 1 << 32:
        out.fill(True)
    elif thr <= 0:
        out.fill(False)
    else:
        np.less(u, np.uint32(thr), out=out)
    return out


def keep_varying(u: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``u < p · 2³²`` for a probability per entry (float32 array)."""
    return u.astype(np.float64) < p.astype(np.float64) * U32


# -- one chunk of the merge ----------------------------------------------------------------------------------
def _disjoint_mean(v: Views) -> Optional[Tensor]:
    """TIES' sign election and disjoint mean of the chunk's masked task vectors (overwritten), as
    ``taskvec.disjoint_mean`` computes them; None when their sum is not finite."""
    np.sum(v.D, axis=0, out=v.tn)  # row by row, in model order
    if not np.isfinite(v.tn).all():
        return None
    torch.sign(v.total, out=v.total)
    np.multiply(v.D, v.tn, out=v.P)
    np.greater(v.P, np.float32(0.0), out=v.M)  # non-zero with the elected sign
    np.sum(v.M, axis=0, dtype=np.uint8, out=v.cnt)
    np.multiply(v.D, v.M, out=v.D)
    np.sum(v.D, axis=0, out=v.tn)
    np.add(v.tn, np.float32(0.0), out=v.tn)  # −0 (dropped negative entries only) to +0, as masked fills leave it
    np.equal(v.cnt, 0, out=v.scratch)  # count 0 (tn is 0 there) divides by 1, as clamp(min=1) does
    np.add(v.cnt, v.scratch, out=v.cnt, casting="unsafe")
    np.divide(v.tn, v.cnt, out=v.tn)
    return v.total


def _summed(v: Views) -> Optional[Tensor]:
    np.sum(v.D, axis=0, out=v.tn)
    if not np.isfinite(v.tn).all():
        return None
    np.add(v.tn, np.float32(0.0), out=v.tn)  # −0 to +0, as above
    return v.total


def _cuts(trims: list[Trim]) -> Optional[np.ndarray]:
    """The smallest magnitude each task vector keeps, a column for numpy (ZERO keeps none: +inf, the chunk's
    non-finite entries then going to the exact formula; everything kept: 0), or None when all keep all."""
    if all(t is None for t in trims):
        return None
    vals = [math.inf if t == ZERO else 0.0 if t is None else t for t in trims]
    return np.array(vals, dtype=np.float32)[:, None]


def ties(tensors: list[Tensor], alpha: float, density: float, exact: Exact) -> Tensor:
    """A + alpha · TIES(δ…) in fp32, streamed (``taskvec.ties``'s numbers)."""
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite chunks go to the exact formula
        a, ms = _split(tensors[0]), [_split(m) for m in tensors[1:]]
        trims = thresholds(a, ms, density)
        cut = _cuts(trims)
        out = torch.empty(a.numel(), dtype=torch.float32)
        c = Chunks(a.numel(), len(ms))
        redo = _kernel_ties(a, ms, cut, alpha, out)
        for s, e, v in c.spans():
            if redo is not None and not redo[s // CHUNK]:
                continue
            v.a.copy_(a[s:e])
            v.load_deltas(ms, s, e)
            if cut is not None:
                np.abs(v.D, out=v.P)
                np.greater_equal(v.P, cut, out=v.M)
                np.multiply(v.D, v.M, out=v.D)
            tau = _disjoint_mean(v)
            if tau is None:
                v.load_deltas(ms, s, e)
                tau = exact([trim_exact(d, trim) for d, trim in zip(v.d, trims)])
            torch.add(v.a, tau, alpha=alpha, out=out[s:e])
        return out.view(tensors[0].shape)


def dare(tensors: list[Tensor], alpha: float, density: float, seed: int, elect: bool, exact: Exact) -> Tensor:
    """A + alpha · Σᵢ (or TIES' disjoint mean, ``elect``) of the DARE-masked, rescaled task vectors, streamed."""
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite chunks go to the exact formula
        a, ms = _split(tensors[0]), [_split(m) for m in tensors[1:]]
        draws = [KeepDraws(seed, i) for i in range(1, len(tensors))]
        out = torch.empty(a.numel(), dtype=torch.float32)
        c = Chunks(a.numel(), len(ms))

        def rescaled(v: Views, s: int, e: int) -> None:
            v.load_deltas(ms, s, e)
            if density > 0.0:  # numpy: torch would split this (k × chunk)-element op over its threads
                np.divide(v.D, np.float32(density), out=v.D)

        redo = _kernel_dare(a, ms, seed, density, elect, alpha, out)
        pos = 0  # the entry the draws are at
        for s, e, v in c.spans():
            if redo is not None:
                if not redo[s // CHUNK]:
                    continue
                _skip(draws, s - pos)
            pos = e
            v.a.copy_(a[s:e])
            for dr, keep in zip(draws, v.K):
                keep_fixed(dr.next(v.L), density, keep)
            rescaled(v, s, e)
            np.multiply(v.D, v.K, out=v.D)
            tau = _disjoint_mean(v) if elect else _summed(v)
            if tau is None:
                rescaled(v, s, e)
                tau = exact([d.masked_fill_(torch.from_numpy(~keep), 0.0) for d, keep in zip(v.d, v.K)])
            torch.add(v.a, tau, alpha=alpha, out=out[s:e])
        return out.view(tensors[0].shape)


# -- the compiled kernels -----------------------------------------------------------------------------------
def _run(kernel: Callable, *args) -> bool:
    """Call a compiled kernel; False (and the numpy path from now on) when it fails."""
    try:
        kernel(*args)
        return True
    except Exception as e:  # e.g. numba cannot compile for this machine: the numpy path gives the same numbers
        kernels.disable(e)
        return False


def _kernel_ties(a: Tensor, ms: list[Tensor], cut: Optional[np.ndarray], alpha: float,
                 out: Tensor) -> Optional[np.ndarray]:
    """``ties``'s merge pass by the compiled kernel into ``out``; returns the flags of the chunks to compute again
    (their totals are not finite), or None when the kernel cannot run (the numpy path does every chunk)."""
    got = _kernel_inputs(a, ms)
    if got is None:
        return None
    kern, ins = got
    cuts = np.zeros(len(ms), dtype=np.float32) if cut is None else cut[:, 0].copy()
    redo = np.zeros(a.numel() // CHUNK + 1, dtype=bool)
    if not _run(kern.ties, ins[0], ins[1], cuts, np.float32(alpha), kern.fused, out.numpy(), redo, CHUNK):
        return None
    return redo


def _kernel_dare(a: Tensor, ms: list[Tensor], seed: int, density: float, elect: bool, alpha: float,
                 out: Tensor) -> Optional[np.ndarray]:
    """``dare``'s pass by the compiled kernel into ``out`` (the same draws: each model's SFC64 stream, stepped by
    the kernel from numpy's seeded state); returns the flags of the chunks to compute again, or None when the
    kernel cannot run."""
    got = _kernel_inputs(a, ms)
    if got is None:
        return None
    kern, ins = got
    n = a.numel()
    state = np.stack([KeepDraws(seed, i).bits.state["state"]["state"] for i in range(1, len(ms) + 1)])
    thr = np.int64(min(max(keep_below(density), 0), 1 << 32))  # keep_fixed's rule as one comparison
    redo = np.zeros(n // CHUNK + 1, dtype=bool)
    if not _run(kern.dare, ins[0], ins[1], state.astype(np.uint64), thr, np.float32(density), elect,
                np.float32(alpha), kern.fused, out.numpy(), redo, CHUNK):
        return None
    return redo


DISCARD = 1 << 20  # draws discarded at a time when the numpy path skips chunks the kernel did


def _skip(draws: list[KeepDraws], entries: int) -> None:
    """Move each model's draws ``entries`` (even) entries on: the chunks before a chunk the kernel left to the
    numpy path (SFC64 cannot jump: draw and discard, a span at a time; every chunk is skipped at most once)."""
    for d in draws:
        for s in range(0, entries // 2, DISCARD):
            d.bits.random_raw(min(DISCARD, entries // 2 - s))
