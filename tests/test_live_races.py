"""Races between the live caches' users: the request thread (test merges), the status route (no lock by design)
and the background copier. Each test reproduces a race of the code before issue 11 §6 in bounded time: a
widened thread switch where the window is wide enough to hit in every run, else instance wrappers that hold one
thread inside the window while the other acts (no luck involved)."""
import os
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from lib_merge import synthetic as S
from lib_merge.live import LiveSession
from lib_merge.recipe import Recipe
from test_live import ModuleTarget

JOIN_S = 10  # every wait is bounded: a broken fix fails instead of hanging CI


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions raised in background threads (the copier): they never reach the test otherwise."""
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def session_on(models, sd15_listing):
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    return LiveSession(ModuleTarget(module), models["sd15_a"]), module


def ab(models, alpha):
    return Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=alpha)


def test_status_during_test_merges_reads_a_consistent_snapshot(webui_stub):
    """GET status runs without a lock while a test merge writes the per-key state: before the fix a poll raised
    "dictionary changed size during iteration" (most polls, with thread switches every microsecond)."""
    from lib_merge.webui.service import Service
    webui_stub.load_model(webui_stub.checkpoint_aliases["synthA"])
    svc = Service()
    svc.test_merge({"model_b": "synthB", "alpha": 0.1})  # caches warm: the merges below only write
    stop = threading.Event()
    merge_errors = []

    def merges():
        try:
            for i in range(10):  # every write adds or removes a key's entry: alpha 0 leaves every weight A
                svc.test_merge({"model_b": "synthB", "alpha": 0.5 if i % 2 else 0.0})
        except BaseException as e:  # noqa: BLE001 - reported below
            merge_errors.append(e)
        finally:
            stop.set()

    polls, failures, counts = 0, [], set()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        worker = threading.Thread(target=merges)
        worker.start()
        while not stop.is_set():
            polls += 1
            try:
                st = svc.status()
                counts.add(st["merged_tensors"])
            except RuntimeError as e:
                failures.append(str(e))
        worker.join(JOIN_S)
    finally:
        sys.setswitchinterval(old)
    assert not worker.is_alive() and not merge_errors
    assert polls > 0 and failures == [], f"{len(failures)} of {polls} polls failed: {failures[:1]}"
    assert all(0 <= n <= 882 for n in counts)


def test_release_while_the_copier_unmaps_the_file(models, sd15_listing, thread_errors):
    """A second test merge releases mapped pages while the copier finishes copying the same cache and drops
    the file mapping: before the fix ``release`` checked the mapping, then used it after the copier had set it
    to None ("object does not implement Python buffer protocol"). The wrappers hold the copier until the
    request thread is inside ``release`` and let it run to the end there."""
    session, module = session_on(models, sd15_listing)
    b = session.cache_for(str(models["sd15_b"]))  # B's tensors are mapped, then copied (A's come from the model)
    go = threading.Event()
    real_materialize, real_release, real_source = b.materialize, b.release, b.source
    inside = threading.local()
    armed, fired = [], []

    def materialize(*args, **kw):  # the copier: held until the request thread is in release
        go.wait(JOIN_S)
        return real_materialize(*args, **kw)

    def release(keys):
        inside.release = True
        try:
            return real_release(keys)
        finally:
            inside.release = False

    def source():
        if armed and not fired and getattr(inside, "release", False) \
                and threading.current_thread() is threading.main_thread():
            fired.append(1)
            go.set()
            session.wait_cached(JOIN_S)  # the copier copies everything and unmaps the file now
        return real_source()

    b.materialize, b.release, b.source = materialize, release, source
    session.apply(ab(models, 0.3))  # maps B, starts the copier (held)
    armed.append(1)
    session.apply(ab(models, 0.6))
    go.set()
    assert session.wait_cached(JOIN_S)
    assert fired and thread_errors == []
    fresh, fresh_module = session_on(models, sd15_listing)
    fresh.apply(ab(models, 0.6))
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), fresh_module.parameters()))
    session.close()
    fresh.close()


def test_a_cache_is_closed_only_after_the_copier_left_it(models, sd15_listing, thread_errors, tmp_path):
    """``cache_for`` replaces the cache of a file that changed on disk; before the fix it closed the old cache
    while the copier was still copying into it (the copy then wrote into a closed cache, or failed on its
    cleared dict). Now closing waits for the copier to leave the cache."""
    import shutil
    b_path = tmp_path / "b.safetensors"
    shutil.copy(models["sd15_b"], b_path)
    session, module = session_on(models, sd15_listing)
    in_copy, go = threading.Event(), threading.Event()
    b = session.cache_for(str(b_path))
    real_release = b.release

    def release(keys):
        if threading.current_thread() is not threading.main_thread() and not in_copy.is_set():
            in_copy.set()
            go.wait(JOIN_S)
        return real_release(keys)

    b.release = release
    session.apply(Recipe(models=[str(models["sd15_a"]), str(b_path)], alpha=0.4))
    assert in_copy.wait(JOIN_S), "the copier did not start on B"
    st = os.stat(b_path)
    os.utime(b_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # B changed on disk
    replaced = []
    closer = threading.Thread(target=lambda: replaced.append(session.cache_for(str(b_path))))
    closer.start()
    closer.join(0.5)
    closed_while_copying = not closer.is_alive()
    go.set()
    closer.join(JOIN_S)
    assert session.wait_cached(JOIN_S) is not None
    assert not closer.is_alive() and replaced and replaced[0] is not b
    assert not closed_while_copying, "the cache was closed while the copier was copying into it"
    assert len(b) == 0 and thread_errors == []
    session.close()


def test_mapping_a_tensor_while_the_copier_unmaps_the_file(models, monkeypatch, thread_errors):
    """``peek`` maps a tensor while the copier drops the cache's mapping: before the fix ``_mmap_view`` checked
    the mapping, then read the attribute again to use it. The wrapper holds the request thread at the last step
    before the use (``warnings.catch_warnings``, the same in both versions) until the copier has finished."""
    import warnings
    from lib_merge.live import TensorCache
    from lib_merge.io.sources import open_source
    with open_source(models["sd15_b"]) as src:
        k1, k2 = list(src.infos)[:2]
    cache = TensorCache(models["sd15_b"], "cpu")
    cache.get(k1)  # mapped: the copier has one tensor to copy, then drops the mapping
    copier = threading.Thread(target=cache.materialize, name="blockmerge-cache-copy")
    real = warnings.catch_warnings
    fired = []

    def catch_warnings(*args, **kw):
        if threading.current_thread() is threading.main_thread() and not fired:
            fired.append(1)
            copier.start()
            copier.join(JOIN_S)
        return real(*args, **kw)

    monkeypatch.setattr(warnings, "catch_warnings", catch_warnings)
    got = cache.peek(k2)
    monkeypatch.setattr(warnings, "catch_warnings", real)
    assert fired and not copier.is_alive() and thread_errors == []
    assert torch.equal(got, load_file(str(models["sd15_b"]))[k2])
    assert cache.uncopied() == 0 and k1 in cache
    cache.close()
