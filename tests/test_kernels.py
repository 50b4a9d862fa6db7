"""The numba kernels (``methods/kernels.py``, ``methods/_jit.py``): they do the work when numba is installed, give
the numpy path's bits on inputs that span many tiles and chunks, draw DARE's masks from the same SFC64 streams,
run from several threads at once, and hand over to the numpy path (same numbers) when they cannot run."""
import threading

import numpy as np
import pytest
import torch

from lib_merge.methods import kernels
from lib_merge.methods import streamed as S
from lib_merge.methods import taskvec as tv

pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("BLOCKMERGE_KERNELS", raising=False)
    kernels.reset()
    yield
    kernels.reset()


def _bits(t):
    return t.contiguous().view(torch.int32)


def _models(n, k=3, dtypes=(torch.float16,) * 4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g)
    ms = [a + 0.02 * torch.randn(n, generator=g) for _ in range(k)]
    return [t.to(dt) for t, dt in zip([a] + ms, dtypes)]


def _on_numpy(monkeypatch, fn):
    monkeypatch.setenv("BLOCKMERGE_KERNELS", "numpy")
    kernels.reset()
    try:
        return fn()
    finally:
        monkeypatch.delenv("BLOCKMERGE_KERNELS")
        kernels.reset()


def _no_numpy_path(monkeypatch):
    """Make the numpy path fail if anything reaches it."""
    def refuse(*a, **k):
        raise AssertionError("the numpy path ran")
    monkeypatch.setattr(S, "_numpy_counts", refuse)
    monkeypatch.setattr(S.Views, "load_deltas", refuse)


def test_the_kernels_load_and_say_so():
    assert kernels.get() is not None
    assert kernels.status().startswith("numba ")
    assert kernels.get().fused in (True, False)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("BLOCKMERGE_KERNELS", "numpy")
    kernels.reset()
    assert kernels.get() is None
    assert "BLOCKMERGE_KERNELS=numpy" in kernels.status()


@pytest.mark.parametrize("mode", ["ties", "dare", "dare_ties"])
@pytest.mark.parametrize("dtypes", [(torch.float16,) * 4, (torch.float32,) * 4,
                                    (torch.float32, torch.float16, torch.float16, torch.float16)])
def test_kernels_alone_give_the_numpy_paths_bits(monkeypatch, mode, dtypes):
    ts = _models(3 * (1 << 15) + 777, dtypes=dtypes, seed=1)  # many tiles, several chunks, an odd tail
    fn = getattr(tv, mode)
    params = {"density": 0.3}
    want = _on_numpy(monkeypatch, lambda: fn(ts, 0.3, 0.0, params, "k", 11))
    _no_numpy_path(monkeypatch)
    got = fn(ts, 0.3, 0.0, params, "k", 11)
    assert torch.equal(_bits(got), _bits(want))
    assert not torch.equal(got, ts[0].float())  # the task vectors moved it off A


@pytest.mark.parametrize("mode, exact", [("ties", "disjoint_mean"), ("dare_ties", "disjoint_mean"),
                                         ("dare", "_summed")])
def test_a_non_finite_chunk_goes_to_the_exact_formula(monkeypatch, mode, exact):
    ts = _models(6 * 1024 + 3, seed=2)
    monkeypatch.setattr(S, "CHUNK", 1024)
    ts[1][1500] = float("inf")
    ts[2][1500] = float("-inf")
    ts[3][2560] = float("nan")
    ts[2][5500] = float("nan")  # chunks 1, 2 and 5: the numpy path's draws skip chunks 0, 3 and 4
    fn = getattr(tv, mode)
    want = _on_numpy(monkeypatch, lambda: fn(ts, 0.6, 0.0, {"density": 1.0}, "k", 3))
    exact_calls = []
    real = getattr(tv, exact)
    monkeypatch.setattr(tv, exact, lambda ds: exact_calls.append(1) or real(ds))
    got = fn(ts, 0.6, 0.0, {"density": 1.0}, "k", 3)
    assert torch.equal(_bits(got), _bits(want))
    assert len(exact_calls) == 3  # chunks 1, 2 and 5 have a non-finite total; the others do not
    for lo, hi in ((0, 1024), (3072, 5120), (6144, 6147)):
        assert torch.isfinite(got[lo:hi]).all()
    got = fn(ts, 0.6, 0.0, {"density": 0.4}, "k", 3)  # some entries dropped: the skipped draws must line up
    assert torch.equal(_bits(got), _bits(_on_numpy(monkeypatch, lambda: fn(ts, 0.6, 0.0, {"density": 0.4}, "k", 3))))


def test_mixed_task_vector_dtypes_use_the_numpy_path_with_the_same_numbers(monkeypatch):
    ts = _models(4000, dtypes=(torch.float16, torch.float16, torch.float32, torch.float16), seed=3)
    assert kernels.inputs(ts[0], ts[1:]) is None
    assert kernels.inputs(ts[0].to(torch.bfloat16), [t.to(torch.bfloat16) for t in ts[1:]]) is None
    got = tv.ties(ts, 1.0, 0.0, {"density": 0.2}, "k", None)
    a, ds = tv._deltas(tv._fp32_copies(ts))
    for d in ds:
        tv.keep_top(d, 0.2)
    assert torch.equal(_bits(got), _bits(a.add_(tv.disjoint_mean(ds), alpha=1.0)))


@pytest.mark.parametrize("n", [1, 2, 511, 512, 513, 4097])
def test_kernel_draws_are_keep_draws_streams(n):
    from lib_merge.methods import _jit
    state = np.stack([S.KeepDraws(9, i).bits.state["state"]["state"] for i in (1, 2)]).astype(np.uint64)
    streams = [S.KeepDraws(9, i) for i in (1, 2)]
    U = np.empty((2, _jit.TILE + 2), np.uint32)
    done = 0
    while done < n:
        L = min(_jit.TILE, n - done)
        _jit.draws(state, U, L)
        for i in range(2):
            assert np.array_equal(U[i, :L], streams[i].next(L))
        done += L


def test_a_failing_kernel_hands_over_to_numpy(monkeypatch):
    ts = _models(3000, seed=4)
    want = _on_numpy(monkeypatch, lambda: tv.dare(ts, 0.5, 0.0, {"density": 0.4}, "k", 5))
    real = kernels.get()

    def broken(*a):
        raise RuntimeError("no machine code for you")
    monkeypatch.setitem(kernels._state, "kernels", kernels.Kernels(real.ties, broken, real.bracket_counts,
                                                                   real.sample_magnitudes, real.fused))
    got = tv.dare(ts, 0.5, 0.0, {"density": 0.4}, "k", 5)
    assert torch.equal(_bits(got), _bits(want))
    assert kernels.get() is None and "a kernel failed: RuntimeError" in kernels.status()


def test_kernels_run_from_several_threads_at_once(monkeypatch):
    sets = [_models(200_000, seed=10 + i) for i in range(4)]
    serial = [tv.ties(ts, 0.5, 0.0, {"density": 0.2}, "k", None) for ts in sets]
    out: dict[int, torch.Tensor] = {}

    def work(i):
        out[i] = tv.ties(sets[i], 0.5, 0.0, {"density": 0.2}, "k", None)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert torch.equal(_bits(out[i]), _bits(serial[i]))


def test_inputs_that_require_grad_are_read_as_they_are():
    ts = _models(2000, seed=6)
    ps = [torch.nn.Parameter(t.float()) for t in ts]  # a live model's weights, read under no_grad
    with torch.no_grad():
        got = tv.ties(ps, 0.5, 0.0, {"density": 0.2}, "k", None)
    assert kernels.get() is not None
    assert torch.equal(_bits(got), _bits(tv.ties([t.float() for t in ts], 0.5, 0.0, {"density": 0.2}, "k", None)))


def test_a_compiler_failure_at_load_leaves_the_numpy_path(monkeypatch):
    def no_compiler(ties):
        raise RuntimeError("cannot cache function 'ties': no locator available\nmore")
    monkeypatch.setattr(kernels, "_probe_fma", no_compiler)
    kernels.reset()
    assert kernels.get() is None
    assert kernels.status() == "numpy (numba failed: RuntimeError: cannot cache function 'ties': no locator available)"
    ts = _models(1000, seed=7)
    assert torch.isfinite(tv.ties(ts, 1.0, 0.0, {"density": 0.2}, "k", None)).all()


def test_methods_says_what_computes_ties_and_dare(capsys):
    from lib_merge.cli import main
    assert main(["methods"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"CPU kernels for ties, dare and dare_ties: {kernels.status()}")


def test_the_first_load_from_several_threads_at_once_loads_once(monkeypatch):
    """Four merges start together before the kernels are loaded: one thread loads them (under the lock), every
    thread computes with them and gets the serial result."""
    loads = []
    real = kernels._load
    monkeypatch.setattr(kernels, "_load", lambda: loads.append(1) or real())
    sets = [_models(50_000, seed=20 + i) for i in range(4)]
    kernels.reset()
    barrier = threading.Barrier(4)
    out: dict[int, torch.Tensor] = {}

    def work(i):
        barrier.wait()
        out[i] = tv.dare(sets[i], 0.5, 0.0, {"density": 0.3}, "k", 2)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [1] and kernels.get() is not None
    for i in range(4):
        assert torch.equal(_bits(out[i]), _bits(tv.dare(sets[i], 0.5, 0.0, {"density": 0.3}, "k", 2)))


@pytest.mark.parametrize("mode, extra", [("ties", {"params": {"density": 0.3}}), ("dare", {"seed": 4}),
                                         ("dare_ties", {"seed": 4, "params": {"density": 0.5}})])
def test_a_file_merge_is_the_same_file_on_either_path(monkeypatch, models, tmp_path, mode, extra):
    from lib_merge.merge import merge_to_file
    recipe = {"models": [str(models[f"sd15_{n}"]) for n in "abc"], "mode": mode, "alpha": 0.8,
              "preset": "GRAD_V", **extra}
    (tmp_path / "numba").mkdir()
    (tmp_path / "numpy").mkdir()  # one file name for both: the metadata records it
    real = kernels.get()
    calls = []

    def spy(f):
        return lambda *a: calls.append(1) or f(*a)
    monkeypatch.setitem(kernels._state, "kernels", kernels.Kernels(spy(real.ties), spy(real.dare),
                                                                   real.bracket_counts, real.sample_magnitudes,
                                                                   real.fused))
    fast = merge_to_file(recipe, tmp_path / "numba" / "out.safetensors")
    assert len(calls) > 100  # the kernels merged the tensors (hundreds of keys)
    slow = _on_numpy(monkeypatch, lambda: merge_to_file(recipe, tmp_path / "numpy" / "out.safetensors"))
    assert fast.sha256 == slow.sha256


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n, step", [(1, 1), (1000, 1), (100_003, 7), (70_000, 70_000)])
def test_the_kernel_sample_is_torchs_strided_sample(dtype, n, step):
    a, m = _models(n, k=1, dtypes=(dtype, dtype), seed=8)
    want = (m[::step].float() - a[::step].float()).abs_().numpy()
    got = S._kernel_sample(a, m, step)
    assert got is not None and np.array_equal(got.view(np.int32), want.view(np.int32))


def test_the_compaction_never_writes_past_the_candidate_buffer():
    """A tile whose bracketed entries exactly fill the buffer's last columns: the branch-free compaction writes
    one slot past the last entry it keeps, so it must only run while that slot is inside the buffer."""
    from lib_merge.methods import _jit
    n = _jit.TILE
    a = np.zeros(n, np.float32)
    m = np.ones(n, np.float32)
    m[-1] = np.nan  # the last entry is not in the bracket: the compaction writes its slot after the last kept
    big = np.full((1, n), -7.0, np.float32)
    cand = big[:, :n - 1]  # room for n - 1 entries; big's last column is a sentinel
    above, within = np.zeros(1, np.int64), np.zeros(1, np.int64)
    _jit.bracket_counts(a, (m,), np.zeros(1, np.float32), np.full(1, 10, np.float32), above, within, cand)
    assert within[0] == n - 1 and above[0] == 1
    assert big[0, -1] == -7.0
