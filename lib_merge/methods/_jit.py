"""The numba-compiled kernels behind :mod:`kernels` (imported only when numba is installed; see there).

Module-level functions, so numba caches their machine code in ``__pycache__`` (a new process loads it instead of
compiling). Every loop indexes tile-sized slices by its loop variable alone: an offset index (``x[t0 + j]``)
kept LLVM from vectorizing and cost 5x.
"""
import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

TILE = 512  # entries per inner step: a tile's task vectors stay in L1 while each loop over it vectorizes


@intrinsic
def to_f32(typingctx, x):
    """An input entry as fp32: fp16 bits (uint16) widened exactly; fp32 as it is."""
    if x == types.uint16:
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.uint16), codegen
    if x == types.float32:
        def codegen(context, builder, sig, args):
            return args[0]
        return types.float32(types.float32), codegen
    return None


@intrinsic
def fma32(typingctx, a, b, c):
    """a · b + c rounded once (as torch's vectorized ``add(c, b, alpha=a)``)."""
    if a == b == c == types.float32:
        def codegen(context, builder, sig, args):
            return builder.fma(args[0], args[1], args[2])
        return types.float32(types.float32, types.float32, types.float32), codegen
    return None


jit = nb.njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
inline = nb.njit(nogil=True, boundscheck=False, error_model="numpy", cache=True, inline="always")  # small helpers
Z = np.float32(0.0)
ONE = np.float32(1.0)


@jit
def finish(a_t, s, c, alpha, fused, out, L):
    """out = A + alpha · (sum / max(count, 1)), the sum made +0 where it is −0. (Every loop here indexes
    tile-sized slices by the loop variable alone: an offset index keeps LLVM from vectorizing.)"""
    if fused:
        for j in range(L):
            cnt = c[j]
            out[j] = fma32(alpha, (s[j] + Z) / (cnt if cnt > Z else ONE), a_t[j])
    else:
        for j in range(L):
            cnt = c[j]
            out[j] = a_t[j] + alpha * ((s[j] + Z) / (cnt if cnt > Z else ONE))


@inline
def start_tile(at, a_t, T, L):
    """A's tile in fp32 into ``a_t``; the totals ``T`` to +0."""
    for j in range(L):
        a_t[j] = to_f32(at[j])
        T[j] = Z


@inline
def flag(bad, t0, L, chunk):
    """Mark the chunks (``chunk`` entries each) that the tile [t0, t0 + L) touches."""
    for q in range(t0 // chunk, (t0 + L - 1) // chunk + 1):
        bad[q] = True


@jit
def elect(D, k, T, s, c, L):
    """TIES' sign election (sign of the total ``T``) and the sum and count of the task vectors that agree;
    returns False when a total is not finite."""
    ok = True
    for j in range(L):
        t = T[j]
        ok &= (t - t) == Z
        T[j] = ONE if t > Z else (-ONE if t < Z else Z)
        s[j] = Z
        c[j] = Z
    for i in range(k):
        Di = D[i]
        for j in range(L):
            d = Di[j]
            g = d * T[j] > Z
            s[j] += d if g else Z
            c[j] += ONE if g else Z
    return ok


@jit
def plain_sum(D, k, T, s, c, L):
    """Σᵢ of the task vectors (no election): count 1 everywhere; False when a sum is not finite."""
    ok = True
    for j in range(L):
        t = T[j]
        ok &= (t - t) == Z
        s[j] = t
        c[j] = ONE
    return ok


@jit
def ties(a, ms, cut, alpha, fused, out, bad, chunk):
    """A + alpha · TIES(δ…) for whole flat tensors; ``cut[i]``: the smallest magnitude task vector i keeps
    (0 keeps all; +inf keeps none that is finite); ``bad[c]`` set where chunk c (``chunk`` entries each) has a
    total that is not finite."""
    n = a.shape[0]
    k = len(ms)
    D = np.empty((k, TILE), np.float32)
    a_t = np.empty(TILE, np.float32)
    T = np.empty(TILE, np.float32)
    s = np.empty(TILE, np.float32)
    c = np.empty(TILE, np.float32)
    for t0 in range(0, n, TILE):
        L = min(TILE, n - t0)
        start_tile(a[t0:t0 + L], a_t, T, L)
        for i in range(k):
            m = ms[i][t0:t0 + L]
            Di = D[i]
            ci = cut[i]
            for j in range(L):
                d = to_f32(m[j]) - a_t[j]
                d = Z if abs(d) < ci else d
                Di[j] = d
                T[j] += d
        if not elect(D, k, T, s, c, L):
            flag(bad, t0, L, chunk)
        finish(a_t, s, c, alpha, fused, out[t0:t0 + L], L)


U11 = np.uint64(11)
U3 = np.uint64(3)
U24 = np.uint64(24)
U40 = np.uint64(40)
U32 = np.uint64(32)
ONE64 = np.uint64(1)
LOW32 = np.uint64(0xFFFFFFFF)


@jit
def draws(state, U, L):
    """The next ``L`` 32-bit draws of each model's SFC64 stream into ``U[i, :L]``: numpy's SFC64 step on
    ``state[i]`` (its a, b, c, counter), two draws per 64-bit output, low half first (``streamed.KeepDraws``).
    A stream's state stays in registers through the tile (through memory, the steps were 20% slower)."""
    k = state.shape[0]
    for i in range(k):
        a, b, c, w = state[i, 0], state[i, 1], state[i, 2], state[i, 3]
        Ui = U[i]
        for h in range((L + 1) // 2):
            tmp = a + b + w
            w += ONE64
            a = b ^ (b >> U11)
            b = c + (c << U3)
            c = ((c << U24) | (c >> U40)) + tmp
            Ui[2 * h] = np.uint32(tmp & LOW32)
            Ui[2 * h + 1] = np.uint32(tmp >> U32)
        state[i, 0], state[i, 1], state[i, 2], state[i, 3] = a, b, c, w


@jit
def dare(a, ms, state, thr, density, do_elect, alpha, fused, out, bad, chunk):
    """A + alpha · (Σᵢ or TIES' mean of) the DARE-dropped, rescaled task vectors of whole flat tensors: entry j
    of model i is kept when its draw (:func:`draws`, from ``state[i]``) is below ``thr``; kept ones are divided
    by ``density`` (when it is above 0)."""
    n = a.shape[0]
    k = len(ms)
    D = np.empty((k, TILE), np.float32)
    U = np.empty((k, TILE + 2), np.uint32)
    a_t = np.empty(TILE, np.float32)
    T = np.empty(TILE, np.float32)
    s = np.empty(TILE, np.float32)
    c = np.empty(TILE, np.float32)
    rescale = density > Z
    for t0 in range(0, n, TILE):
        L = min(TILE, n - t0)
        start_tile(a[t0:t0 + L], a_t, T, L)
        draws(state, U, L)
        for i in range(k):
            m = ms[i][t0:t0 + L]
            Ui = U[i]
            Di = D[i]
            if rescale:
                for j in range(L):
                    d = (to_f32(m[j]) - a_t[j]) / density
                    d = d if np.int64(Ui[j]) < thr else Z
                    Di[j] = d
                    T[j] += d
            else:
                for j in range(L):
                    d = to_f32(m[j]) - a_t[j]
                    d = d if np.int64(Ui[j]) < thr else Z
                    Di[j] = d
                    T[j] += d
        if do_elect:
            ok = elect(D, k, T, s, c, L)
        else:
            ok = plain_sum(D, k, T, s, c, L)
        if not ok:
            flag(bad, t0, L, chunk)
        finish(a_t, s, c, alpha, fused, out[t0:t0 + L], L)


@jit
def bracket_counts(a, ms, lo, hi, above, within, cand):
    """Per task vector i: how many |mᵢ − a| are above ``hi[i]`` (NaN counted above) and how many lie in
    [lo[i], hi[i]]; the latter are collected in ``cand[i]`` while they fit (``cand`` has one spare column: the
    compaction writes one entry past the last it keeps)."""
    n = a.shape[0]
    k = len(ms)
    room = cand.shape[1] - 1  # the last column takes the write past the last entry kept
    P = np.empty(TILE, np.float32)
    for i in range(k):
        m = ms[i]
        li = lo[i]
        hii = hi[i]
        ab = 0
        w = 0
        for t0 in range(0, n, TILE):
            L = min(TILE, n - t0)
            mt = m[t0:t0 + L]
            at = a[t0:t0 + L]
            got = 0
            for j in range(L):
                x = abs(to_f32(mt[j]) - to_f32(at[j]))
                P[j] = x
                ab += not (x <= hii)
                got += (x >= li) & (x <= hii)
            if got and w + got <= room:  # branch-free compaction (an if per entry mispredicts)
                ci = cand[i, w:w + got + 1]
                q = 0
                for j in range(L):
                    x = P[j]
                    ci[q] = x
                    q += (x >= li) & (x <= hii)
            w += got
        above[i] = ab
        within[i] = w


@jit
def sample_magnitudes(a, m, step, out):
    """|m − a| at entries 0, step, 2·step, … into ``out``."""
    for j in range(out.shape[0]):
        out[j] = abs(to_f32(m[j * step]) - to_f32(a[j * step]))
