"""``LiveSession.free``: the caches let go of everything the live merge does not need (issue 14 §3)."""
import sys
import threading

import pytest
import torch

from lib_merge import pages
from lib_merge import synthetic as S
from lib_merge.errors import MergeError, MergeInterrupted
from lib_merge.live import CachePolicy, LiveSession, fingerprint
from lib_merge.recipe import Recipe
from test_live import ModuleTarget

JOIN_S = 10


def _session(models, sd15_listing, policy):
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    return LiveSession(ModuleTarget(module), models["sd15_a"], cache=policy), module


@pytest.fixture(params=[CachePolicy.CPU, CachePolicy.MMAP], ids=lambda p: p.value)
def live(request, models, sd15_listing):
    session, module = _session(models, sd15_listing, request.param)
    yield session, module
    session.close()


def recipe(models, names=("sd15_a", "sd15_b"), **kw):
    return Recipe(models=[str(models[n]) for n in names], **kw)


def fp(module):
    return fingerprint(dict(module.named_parameters()))


def held(cache) -> dict[str, int]:
    """key -> bytes of the cache's RAM copies (mapped views are no cost)."""
    return {k: t.numel() * t.element_size() for k, t in cache._tensors.items() if k not in cache._mapped}


def test_free_keeps_only_the_restore_source_and_reports_the_dropped_bytes(live, models):
    """alpha 0.5 writes every key, GRAD_V then puts BASE and M00 back to A: A's cache still holds those keys
    (no longer needed) and B's cache holds everything. Free drops exactly that, and says how much."""
    session, module = live
    session.apply(recipe(models, alpha=0.5))
    session.apply(recipe(models, preset="GRAD_V"))
    assert session.wait_cached(60)
    merged = set(session.merged_keys())
    b = session.others[str(models["sd15_b"].resolve())]
    a_held, b_held = held(session.a), held(b)
    assert 0 < len(merged) < len(session.a) and len(b) == len(session.keys)
    before = session.snapshot().cache_bytes
    assert before == sum(a_held.values()) + sum(b_held.values())
    if session.policy is CachePolicy.CPU:
        assert before > 0
    else:
        assert before == 0  # mmap: views of the files, no copies

    rep = session.free()
    assert rep.bytes_freed == sum(n for k, n in a_held.items() if k not in merged) + sum(b_held.values())
    assert rep.bytes_kept == sum(n for k, n in a_held.items() if k in merged) == session.snapshot().cache_bytes
    assert set(session.a._tensors) == merged and len(b) == 0
    assert session.snapshot().merged_tensors == len(merged)  # the live weights are untouched


def test_a_kept_tensor_is_a_private_copy_of_its_old_arena(live_cpu_free, models):
    """A's copies share one arena: keeping some of them must not keep the whole arena alive."""
    session, module = live_cpu_free
    session.apply(recipe(models, alpha=0.5))
    session.apply(recipe(models, preset="GRAD_V"))
    assert session.wait_cached(60)
    merged = session.merged_keys()
    key = merged[0]
    old = session.a._tensors[key]
    arena_bytes = old.untyped_storage().nbytes()
    assert arena_bytes > old.numel() * old.element_size()  # cut from a shared arena
    session.free()
    new = session.a._tensors[key]
    assert torch.equal(new, old)
    kept = sum(session.a._tensors[k].numel() * session.a._tensors[k].element_size() for k in merged)
    assert new.untyped_storage().nbytes() < arena_bytes and new.untyped_storage().nbytes() >= kept


@pytest.fixture
def live_cpu_free(models, sd15_listing):
    session, module = _session(models, sd15_listing, CachePolicy.CPU)
    yield session, module
    session.close()


def test_remerge_after_free_reads_again_and_equals_one_without_free(live, models):
    session, module = live
    original = fp(module)
    session.apply(recipe(models, preset="GRAD_A"))
    want = fp(module)
    session.apply(recipe(models, preset="GRAD_V"))
    reads = sum(session.bytes_read().values())
    session.free()
    rep = session.apply(recipe(models, preset="GRAD_A"))
    assert fp(module) == want  # bit-identical to the merge made from warm caches
    assert rep.bytes_read > 0 and sum(session.bytes_read().values()) > reads  # B came from its file again
    assert session.restore() > 0 and fp(module) == original


def test_restore_after_free_is_bit_exact_and_then_nothing_is_kept(live, models):
    session, module = live
    original = fp(module)
    session.apply(recipe(models, alpha=0.3))
    session.free()
    assert session.restore() == len(session.keys)
    assert fp(module) == original
    rep = session.free()
    assert rep.bytes_kept == 0 and session.cache_bytes() == 0 and session.snapshot().cache_bytes == 0
    assert len(session.a) == 0 and session.others == {}
    session.apply(recipe(models, alpha=0.3))  # a test merge after freeing everything works
    session.restore()
    assert fp(module) == original


def test_free_with_nothing_merged_drops_every_cache(live_cpu_free, models):
    session, module = live_cpu_free
    session.apply(recipe(models, alpha=0.4))
    assert session.wait_cached(60)
    total = session.cache_bytes()
    session.restore()
    rep = session.free()
    assert rep.bytes_freed == total > 0 and rep.bytes_kept == 0 and session.others == {}


def test_rollback_after_free_recomputes_the_live_merge_exactly(live, models):
    """B's tensors are gone after Free: an interrupted re-merge puts the previous merge back from A's kept
    tensors and B read from its file again, bit for bit."""
    session, module = live
    original = fp(module)
    session.apply(recipe(models, alpha=0.25))
    merged = fp(module)
    session.free()
    calls = []
    with pytest.raises(MergeInterrupted):
        session.apply(recipe(models, alpha=0.75), cancel=lambda: calls.append(1) or len(calls) > 40)
    assert len(calls) > 40 and fp(module) == merged and session.recipe.alpha == 0.25
    session.restore()
    assert fp(module) == original


def test_a_source_changed_after_free_still_blocks_before_a_rollback_would_read_it(live, models, tmp_path):
    """The live merge's B cache stays registered (empty) after Free, so a B replaced on disk is still noticed:
    a rollback would otherwise recompute the live merge from the new file."""
    import os
    import shutil
    import time
    session, module = live
    b2 = tmp_path / "b2.safetensors"
    shutil.copy(models["sd15_b"], b2)
    session.apply(Recipe(models=[str(models["sd15_a"]), str(b2)], alpha=0.5))
    session.free()
    shutil.copy(models["sd15_c"], tmp_path / "new")
    os.utime(tmp_path / "new", ns=(time.time_ns(), time.time_ns() + 10**9))
    os.replace(tmp_path / "new", b2)
    with pytest.raises(MergeError, match=r"changed on disk while the live merge was made from it; Restore first, "):
        session.apply(recipe(models, alpha=0.3))


def test_free_closes_caches_of_files_the_live_merge_does_not_use(live, models):
    session, module = live
    session.apply(recipe(models, names=("sd15_a", "sd15_b", "sd15_c"), mode="add_difference", alpha=0.5))
    session.apply(recipe(models, alpha=0.5))
    assert str(models["sd15_c"].resolve()) in session.others
    session.free()
    assert list(session.others) == [str(models["sd15_b"].resolve())]


def test_trim_heap_is_best_effort(monkeypatch):
    assert pages.trim_heap() in (True, False)
    monkeypatch.setattr(pages, "_MALLOC_TRIM", None)  # no glibc (macOS, Windows, musl)
    assert pages.trim_heap() is False


# -- races ------------------------------------------------------------------------------------------------------
def test_free_waits_for_a_running_merge(live_cpu_free, models):
    """One lock: a Free that arrives while a test merge runs starts when the merge has ended, and then keeps
    what that merge wrote."""
    session, module = live_cpu_free
    inside, go, freed = threading.Event(), threading.Event(), threading.Event()
    reports = []

    def cancel():
        inside.set()
        go.wait(JOIN_S)
        return False

    merge = threading.Thread(target=lambda: session.apply(recipe(models, alpha=0.5), cancel=cancel))
    merge.start()
    assert inside.wait(JOIN_S)
    free = threading.Thread(target=lambda: (reports.append(session.free()), freed.set()))
    free.start()
    assert not freed.wait(0.3)  # held back by the merge
    go.set()
    merge.join(JOIN_S)
    free.join(JOIN_S)
    assert not merge.is_alive() and not free.is_alive() and session.is_merged
    assert set(session.a._tensors) == set(session.merged_keys()) == set(session.keys)
    assert session.wait_cached(JOIN_S)  # the copier may still be bringing kept mapped tensors into RAM
    assert reports[0].bytes_kept == session.cache_bytes()


def test_status_polls_beside_free_and_remerges(live_cpu_free, models):
    """A status poll reads the caches' sizes without the request lock while Free swaps their entries."""
    session, module = live_cpu_free
    stop = threading.Event()
    errors = []

    def requests():
        try:
            for i in range(6):
                session.apply(recipe(models, alpha=0.2 + 0.1 * i))
                session.free()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            stop.set()

    polls, failures = 0, []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        worker = threading.Thread(target=requests)
        worker.start()
        while not stop.is_set():
            polls += 1
            try:
                snap = session.snapshot()
                assert snap.cache_bytes >= 0 and snap.cache_pending >= 0
            except RuntimeError as e:
                failures.append(str(e))
        worker.join(JOIN_S)
    finally:
        sys.setswitchinterval(old)
    assert not worker.is_alive() and not errors
    assert polls > 0 and failures == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_caches_give_their_memory_back(models, sd15_listing):
    module = S.build_module(sd15_listing, dtype=torch.float32).cuda()
    S.load_into(module, models["sd15_a"])
    session = LiveSession(ModuleTarget(module), models["sd15_a"], cache=CachePolicy.GPU)
    original = fp(module)
    session.apply(recipe(models, alpha=0.5))
    cached = session.cache_bytes()
    assert cached > 0
    session.restore()
    reserved = torch.cuda.memory_reserved()
    rep = session.free()
    assert rep.bytes_freed == cached and rep.bytes_kept == 0
    assert torch.cuda.memory_reserved() < reserved
    session.apply(recipe(models, alpha=0.5))
    session.restore()
    assert fp(module) == original
    session.close()


def test_free_with_a_chain_live_keeps_its_files_registered_and_rolls_back_exactly(live, models, tmp_path):
    """A merge chain's B and C are leaves inside a nested recipe: Free keeps their (emptied) caches registered like
    any input of the live merge, a changed leaf still blocks, and an interrupted re-merge rolls back bit for bit."""
    import os
    import shutil
    import time
    session, module = live
    original = fp(module)
    c2 = tmp_path / "c2.safetensors"
    shutil.copy(models["sd15_c"], c2)
    step1 = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.3)
    chain = Recipe(models=[step1, str(c2)], alpha=0.5)
    session.apply(chain)
    merged = fp(module)
    session.free()
    assert set(session.others) == {str(models["sd15_b"].resolve()), str(c2.resolve())}
    assert all(len(c) == 0 for c in session.others.values())
    calls = []
    with pytest.raises(MergeInterrupted):
        session.apply(Recipe(models=[step1, str(c2)], alpha=0.8), cancel=lambda: calls.append(1) or len(calls) > 40)
    assert fp(module) == merged
    session.free()
    shutil.copy(models["sd15_b"], tmp_path / "new")
    os.utime(tmp_path / "new", ns=(time.time_ns(), time.time_ns() + 10**9))
    os.replace(tmp_path / "new", c2)
    with pytest.raises(MergeError, match=r"changed on disk while the live merge was made from it; Restore first, "):
        session.apply(recipe(models, alpha=0.3))
    session.restore()
    assert fp(module) == original
