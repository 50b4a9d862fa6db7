"""The streamed CPU kernels of TIES, DARE and DARE-TIES (``methods/streamed.py``) give the whole-tensor formulas'
bits: across chunk boundaries, with fp16 and fp32 inputs, NaN/±inf entries, ties at the threshold, a bracket the
sample misjudges, and densities that keep all or nothing; they never write their inputs; DARE's draws do not
depend on chunking. Every test runs twice: on the numpy path and on the numba kernels (``methods/kernels.py``)."""
import math

import numpy as np
import pytest
import torch

from lib_merge.methods import kernels
from lib_merge.methods import streamed as S
from lib_merge.methods import taskvec as tv

BACKENDS = ["numpy", "numba"]


def use_backend(monkeypatch, backend):
    """Run on one backend; the numba one must load wherever numba is installed (a silent numpy fallback would
    make these tests check the numpy path twice)."""
    if backend == "numba":
        pytest.importorskip("numba")
        monkeypatch.delenv("BLOCKMERGE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("BLOCKMERGE_KERNELS", "numpy")
    kernels.reset()
    assert (kernels.get() is not None) == (backend == "numba"), kernels.status()


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request, monkeypatch):
    use_backend(monkeypatch, request.param)
    yield request.param
    kernels.reset()


def _bits(t):
    return t.contiguous().view(torch.int32)


def whole_ties(tensors, alpha, density):
    a, ds = tv._deltas(tv._fp32_copies(tensors))
    for d in ds:
        tv.keep_top(d, density)
    return a.add_(tv.disjoint_mean(ds), alpha=alpha)


def whole_dare(tensors, alpha, density, seed, elect):
    a, ds = tv._deltas(tv._fp32_copies(tensors))
    tv.drop_and_rescale(ds, density, seed)
    return a.add_(tv.disjoint_mean(ds) if elect else tv._summed(ds), alpha=alpha)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(S, "CHUNK", 512)
    monkeypatch.setattr(S, "SAMPLE", 256)


def _models(n, k=3, dtype=torch.float16, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g)
    ms = [a + 0.05 * torch.randn(n, generator=g) for _ in range(k)]
    out = [t.to(dtype) for t in [a] + ms]
    return [t.view(shape) for t in out] if shape else out


def _poison(ts):
    """NaN and ±inf in a few chunks of the fine-tunes, exact zeros (ties at 0) in others."""
    ts[1][100] = float("nan")
    ts[2][700] = float("inf")
    ts[3][700] = float("-inf")
    ts[1][1500:1700] = ts[0][1500:1700]
    ts[2][1500:1800] = ts[0][1500:1800]
    ts[3][2100] = float("nan")
    ts[2][2100] = float("inf")
    return ts


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 1e-4, 0.2, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("poison", [False, True])
def test_ties_streamed_equals_the_whole_formula_bit_for_bit(small_chunks, dtype, density, poison):
    ts = _models(2500, dtype=dtype, seed=1)
    if poison:
        ts = _poison(ts)
    before = [t.clone() for t in ts]
    got = tv.ties(ts, 0.7, 0.0, {"density": density}, "k", None)
    want = whole_ties(ts, 0.7, density)
    assert got.dtype == torch.float32
    assert torch.equal(_bits(got), _bits(want))
    for t, b in zip(ts, before):  # inputs are read, never written
        assert torch.equal(t.view(torch.uint8) if t.dtype != torch.bfloat16 else t.view(torch.int16),
                           b.view(torch.uint8) if b.dtype != torch.bfloat16 else b.view(torch.int16))


def test_ties_streamed_with_many_ties_at_the_threshold_and_a_nan_task_vector(small_chunks):
    ts = _models(3000, seed=2)
    ts[1] = ts[0] + torch.tensor(0.5, dtype=torch.float16) * (torch.arange(3000) % 3 == 0)  # one value, repeated
    ts[2] = torch.full_like(ts[0], float("nan"))  # threshold NaN: keep_top then drops nothing
    for density in (0.1, 0.34, 0.9):
        assert torch.equal(_bits(tv.ties(ts, 1.0, 0.0, {"density": density}, "k", None)),
                           _bits(whole_ties(ts, 1.0, density)))


def test_threshold_is_exact_when_the_sample_misjudges_the_bracket(small_chunks, monkeypatch):
    ts = _models(4000, dtype=torch.float32, seed=3)
    a, m = ts[0], ts[1]
    k = math.ceil(0.3 * 4000)
    want = float(torch.sort((m - a).abs(), descending=True).values[k - 1])
    assert S.thresholds(a, [m], 0.3) == [want]
    for bracket in [(np.float32(0.0), np.float32(1e-9)), (np.float32(5.0), np.float32(6.0)),
                    (np.float32(0.0), np.float32(100.0))]:  # all below, all above, everything inside
        monkeypatch.setattr(S, "_bracket", lambda a, m, k, b=bracket: b)
        assert S.thresholds(a, [m], 0.3) == [want]


def test_threshold_counts_nan_largest_like_the_partition():
    a = torch.zeros(10)
    m = torch.tensor([1.0, float("nan"), 3.0, 2.0, float("nan"), 0.5, 0.1, 4.0, 0.2, 0.3])
    assert S.thresholds(a, [m], 0.2) == [None]  # the 2nd largest is NaN: nothing dropped
    assert S.thresholds(a, [m], 0.3) == [4.0]
    assert S.thresholds(a, [m], 0.5) == [2.0]


@pytest.mark.parametrize("elect", [False, True])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("poison", [False, True])
def test_dare_streamed_equals_the_whole_formula_bit_for_bit(small_chunks, elect, density, poison):
    ts = _models(2501, seed=4)  # odd length: the last chunk is odd
    if poison:
        ts = _poison(ts)
    mode = tv.dare_ties if elect else tv.dare
    got = mode(ts, 0.8, 0.0, {"density": density}, "k", 99)
    assert torch.equal(_bits(got), _bits(whole_dare(ts, 0.8, density, 99, elect)))


def test_dare_does_not_depend_on_the_chunk_size(monkeypatch):
    ts = _models(70001, seed=5)
    got = []
    for chunk in (1 << 10, 1 << 12, 1 << 16):
        monkeypatch.setattr(S, "CHUNK", chunk)
        got.append(tv.dare(ts, 1.0, 0.0, {"density": 0.4}, "k", 7))
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


def test_keep_draws_are_one_stream_per_key_and_model():
    whole = S.KeepDraws(5, 1).next(1001)
    d = S.KeepDraws(5, 1)
    parts = np.concatenate([d.next(10), d.next(500), d.next(491)])
    assert np.array_equal(whole, parts)
    assert not np.array_equal(whole, S.KeepDraws(5, 2).next(1001))
    assert not np.array_equal(whole, S.KeepDraws(6, 1).next(1001))
    u = S.KeepDraws(1, 1).next(1 << 20)
    keep = S.keep_fixed(u, 0.3, np.empty(u.size, dtype=bool))
    assert abs(keep.mean() - 0.3) < 0.003  # 6 sigma
    assert S.keep_fixed(u, 1.0, np.empty(u.size, dtype=bool)).all()
    assert not S.keep_fixed(u, 0.0, np.empty(u.size, dtype=bool)).any()
    p = np.full(u.size, 0.3, dtype=np.float32)
    assert np.array_equal(S.keep_varying(u, p), keep)  # DELLA's rule, one probability: DARE's mask
