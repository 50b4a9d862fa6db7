"""The live sink on a real torch model holding the real SD1.5 key names (tiny shapes)."""
import pytest
import torch

from conftest import load
from lib_merge import presets
from lib_merge import synthetic as S
from lib_merge.arch import ARCHS, block_of
from lib_merge.errors import MergeError, MergeInterrupted
from lib_merge.live import CachePolicy, LiveSession, fingerprint
from lib_merge.merge import merge_to_file
from lib_merge.recipe import Recipe


class ModuleTarget:
    """A LiveTarget over a plain module whose parameter names are file keys."""

    def __init__(self, module):
        self.module = module
        self.prepared = []
        self.written_keys = []

    def params(self):
        return dict(self.module.named_parameters())

    def prepare(self, keys):
        self.prepared.append(list(keys))

    def written(self, keys):
        self.written_keys.append(list(keys))


def _live(models, sd15_listing, policy):
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    target = ModuleTarget(module)
    session = LiveSession(target, models["sd15_a"], cache=policy)
    return session, target, module


@pytest.fixture(params=[CachePolicy.CPU, CachePolicy.MMAP], ids=lambda p: p.value)
def live(request, models, sd15_listing):
    """A session under each policy a CPU machine has: what a merge writes must not depend on it."""
    session, target, module = _live(models, sd15_listing, request.param)
    yield session, target, module
    session.close()


@pytest.fixture
def live_cpu(models, sd15_listing):
    """A ``cpu`` session: tests of what the RAM cache saves (no file reads after the first merge)."""
    session, target, module = _live(models, sd15_listing, CachePolicy.CPU)
    yield session, target, module
    session.close()


def recipe(models, **kw):
    names = kw.pop("names", ["sd15_a", "sd15_b"])
    return Recipe(models=[str(models[n]) for n in names], **kw)


def test_merge_then_restore_is_bit_exact(live, models):
    session, target, module = live
    before = fingerprint(dict(module.named_parameters()))
    rep = session.apply(recipe(models, preset="GRAD_V"))
    grad_v = presets.resolve("GRAD_V", ARCHS["sd1"])
    moved = [k for k in session.keys if grad_v[SD1_IDX[block_of(k, ARCHS["sd1"])]] != 0]
    assert 0 < len(moved) < len(session.keys)
    assert rep.written == len(moved) and rep.unchanged == len(session.keys) - len(moved)
    assert fingerprint(dict(module.named_parameters())) != before
    assert session.is_merged
    n = session.restore()
    assert n > 0 and not session.is_merged
    assert fingerprint(dict(module.named_parameters())) == before


def test_ratio_zero_keys_are_checked_not_written_and_later_merges_read_no_file(live_cpu, models):
    """GRAD_V puts BASE and M00 at 0: those keys stay A (not written, A not cached: the live weight holds it),
    B is still cached for them, and a later recipe that moves them reads no file and equals a fresh merge."""
    session, target, module = live_cpu
    params = dict(module.named_parameters())
    m00 = [k for k in session.keys if block_of(k, ARCHS["sd1"]) in ("M00", "BASE")]
    before = {k: params[k].detach().clone() for k in m00}
    session.apply(recipe(models, preset="GRAD_V"))
    assert session.wait_cached(60)
    assert set(session.verified) == set(session.keys)  # every key was checked against A's file
    assert all(torch.equal(params[k], before[k]) for k in m00)
    assert not any(k in session.a for k in m00)
    assert all(k in session.others[str(models["sd15_b"].resolve())] for k in m00)
    reads = dict(session.bytes_read())
    rep = session.apply(recipe(models, alpha=0.5))
    grad_v = presets.resolve("GRAD_V", ARCHS["sd1"])
    at_half = [k for k in session.keys if grad_v[SD1_IDX[block_of(k, ARCHS["sd1"])]] == 0.5]  # IN06, OUT05
    assert rep.written == len(session.keys) - len(at_half) and rep.unchanged == len(at_half)
    assert session.bytes_read() == reads and rep.bytes_read == 0
    fresh_module = S.build_module(S.tiny(S.load_listing("sd15")), dtype=torch.float32)
    S.load_into(fresh_module, models["sd15_a"])
    LiveSession(ModuleTarget(fresh_module), models["sd15_a"]).apply(recipe(models, alpha=0.5))
    assert fingerprint(params) == fingerprint(dict(fresh_module.named_parameters()))
    session.restore()
    assert all(torch.equal(params[k], before[k]) for k in m00)


def test_mismatch_in_an_unwritten_key_is_still_refused(live, models):
    session, target, module = live
    key = next(k for k in session.keys if block_of(k, ARCHS["sd1"]) == "M00")
    before = fingerprint(dict(module.named_parameters()))
    with torch.no_grad():
        dict(module.named_parameters())[key].view(-1)[0] += 1.0
    changed = fingerprint(dict(module.named_parameters()))
    with pytest.raises(MergeError, match=f"loaded model differs from its file at {key}; reload it"):
        session.apply(recipe(models, preset="GRAD_V"))
    assert fingerprint(dict(module.named_parameters())) == changed != before  # nothing else was left merged


def test_cpu_cache_is_copied_into_ram_after_the_first_merge(live_cpu, models, tmp_path):
    session, target, module = live_cpu
    before = fingerprint(dict(module.named_parameters()))
    session.apply(recipe(models, preset="GRAD_V"))
    assert session.wait_cached(60)
    reads = dict(session.bytes_read())
    assert session.a.uncopied() == 0 and all(c.uncopied() == 0 for c in session.others.values())
    # the cache no longer depends on the file: the copies are plain RAM tensors with A's bytes
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(session.a.get(key), load(models["sd15_a"])[key])
    session.apply(recipe(models, preset="GRAD_A"))
    assert session.bytes_read() == reads
    session.restore()
    assert fingerprint(dict(module.named_parameters())) == before


def test_live_values_follow_the_formula(live, models):
    session, target, module = live
    session.apply(recipe(models, alpha=0.3))
    A, B = load(models["sd15_a"]), load(models["sd15_b"])
    for k, p in module.named_parameters():
        want = torch.lerp(A[k].float(), B[k].float(), 0.3)
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)


def test_incremental_remerge_touches_only_changed_block(live_cpu, models):
    session, target, module = live_cpu
    vec = ["0.5"] * 26
    session.apply(recipe(models, weights=",".join(vec)))
    read_after_first = dict(session.bytes_read())
    vec[SD1_IDX["OUT05"]] = "0.9"
    rep = session.apply(recipe(models, weights=",".join(vec)))
    out05 = [k for k in session.keys if block_of(k, ARCHS["sd1"]) == "OUT05"]
    assert rep.written == len(out05) and rep.unchanged == len(session.keys) - len(out05)
    assert session.bytes_read() == read_after_first and rep.bytes_read == 0  # no file reads after the first merge
    # equal to a fresh merge of the same recipe
    fresh_module = S.build_module(S.tiny(S.load_listing("sd15")), dtype=torch.float32)
    S.load_into(fresh_module, models["sd15_a"])
    fresh = LiveSession(ModuleTarget(fresh_module), models["sd15_a"])
    fresh.apply(recipe(models, weights=",".join(vec)))
    assert fingerprint(dict(module.named_parameters())) == fingerprint(dict(fresh_module.named_parameters()))


SD1_IDX = {b: i for i, b in enumerate(ARCHS["sd1"].blocks)}


def test_interrupt_midway_rolls_back_to_previous_merge(live, models):
    session, target, module = live
    session.apply(recipe(models, alpha=0.25))
    merged = fingerprint(dict(module.named_parameters()))
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 40

    with pytest.raises(MergeInterrupted):
        session.apply(recipe(models, alpha=0.75), cancel=cancel)
    assert fingerprint(dict(module.named_parameters())) == merged  # previous merge, never mixed
    assert session.recipe.alpha == 0.25


def test_interrupt_of_first_merge_restores_original(live, models):
    session, target, module = live
    before = fingerprint(dict(module.named_parameters()))
    calls = []
    with pytest.raises(MergeInterrupted):
        session.apply(recipe(models, alpha=0.75), cancel=lambda: calls.append(1) or len(calls) > 100)
    assert fingerprint(dict(module.named_parameters())) == before and not session.is_merged


def test_exception_midway_rolls_back(live, models, monkeypatch):
    session, target, module = live
    before = fingerprint(dict(module.named_parameters()))
    import lib_merge.live.session as L
    real = L.merge_tensors
    n = []

    def flaky(*a, **k):
        n.append(1)
        if len(n) == 50:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(L, "merge_tensors", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        session.apply(recipe(models, alpha=0.6))
    assert fingerprint(dict(module.named_parameters())) == before


def test_save_after_test_merge_equals_preview(live, models, tmp_path):
    session, target, module = live
    r = recipe(models, preset="GRAD_A", elemental="OUT03-OUT05:attn2:0.2", vae="a")
    session.apply(r)
    for dtype, cast in (("fp32", torch.float32), ("fp16", torch.float16)):
        out = tmp_path / f"saved_{dtype}.safetensors"
        merge_to_file(Recipe(**{**r.__dict__, "dtype": dtype}), out)
        saved = load(out)
        for k, p in module.named_parameters():
            assert torch.equal(saved[k], p.detach().to(cast)), k


def test_loaded_model_differs_from_file_is_refused(live, models):
    session, target, module = live
    with torch.no_grad():
        next(iter(module.parameters())).add_(1.0)
    with pytest.raises(MergeError, match="loaded model differs from its file at .*; reload it"):
        session.apply(recipe(models))


def test_check_is_bitwise_zero_sign_counts(live, models):
    """-0.0 == +0.0 as floats, but a restore would then not be bit-exact: the check compares bits."""
    session, target, module = live
    name, p = next(iter(module.named_parameters()))
    with torch.no_grad():
        p.view(-1)[0] = 0.0
    a = load(models["sd15_a"])
    a[name].view(-1)[0] = -0.0
    from safetensors.torch import save_file
    path = models["sd15_a"].parent / "zero_sign.safetensors"
    save_file(a, str(path))
    session = LiveSession(target, path)
    with pytest.raises(MergeError, match=f"loaded model differs from its file at {name}; reload it"):
        session.apply(Recipe(models=[str(path), str(models["sd15_b"])]))
    assert p.view(-1)[0].item() == 0.0 and not torch.signbit(p.view(-1)[0])


def test_nan_weights_in_a_merge_and_restore_bit_exact(live, models, tmp_path):
    """A float comparison would call a NaN weight a mismatch; the bitwise check accepts the loaded copy."""
    session, target, module = live
    name, p = next(iter(module.named_parameters()))
    a = load(models["sd15_a"])
    a[name].view(-1)[:3] = float("nan")
    from safetensors.torch import save_file
    path = tmp_path / "nan.safetensors"
    save_file(a, str(path))
    with torch.no_grad():
        p.view(-1)[:3] = float("nan")
    before = fingerprint(dict(module.named_parameters()))
    session = LiveSession(target, path)
    session.apply(Recipe(models=[str(path), str(models["sd15_b"])]))
    assert fingerprint(dict(module.named_parameters())) != before
    session.restore()
    assert fingerprint(dict(module.named_parameters())) == before


def test_model_a_must_be_loaded_checkpoint(live, models):
    session, target, module = live
    with pytest.raises(MergeError, match="model A of a test merge must be the loaded checkpoint"):
        session.apply(recipe(models, names=["sd15_b", "sd15_a"]))


def test_three_model_modes_and_switching_modes(live, models):
    session, target, module = live
    before = fingerprint(dict(module.named_parameters()))
    session.apply(recipe(models, names=["sd15_a", "sd15_b", "sd15_c"], mode="add_difference", alpha=0.5))
    A, B, C = (load(models[n]) for n in ("sd15_a", "sd15_b", "sd15_c"))
    k = "model.diffusion_model.middle_block.1.proj_in.weight"
    torch.testing.assert_close(dict(module.named_parameters())[k], A[k].float() + 0.5 * (B[k].float() - C[k].float()))
    rep = session.apply(recipe(models, mode="no_interpolation", names=["sd15_a"]))
    assert rep.written == len(session.keys)
    assert fingerprint(dict(module.named_parameters())) == before


def test_cache_policy_parse_names_the_bad_value():
    assert CachePolicy.parse("mmap") is CachePolicy.MMAP and CachePolicy.parse(" CPU ") is CachePolicy.CPU
    assert CachePolicy.parse(CachePolicy.GPU) is CachePolicy.GPU
    with pytest.raises(MergeError, match=r"^unknown cache policy 'ram' \(use cpu, mmap, gpu\), cache policy$"):
        CachePolicy.parse("ram")
    with pytest.raises(MergeError, match=r"unknown cache policy 'cuda' \(use cpu, mmap, gpu\), blockmerge_cache_device"):
        CachePolicy.parse("cuda", "blockmerge_cache_device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_policy_without_cuda_is_refused_before_anything_changes(live_cpu, models):
    session, target, module = live_cpu
    msg = "the gpu cache policy needs a CUDA device and torch sees none, cache policy gpu"
    with pytest.raises(MergeError, match=msg):
        LiveSession(target, models["sd15_a"], cache="gpu")
    session.apply(recipe(models, alpha=0.4))
    merged = fingerprint(dict(module.named_parameters()))
    with pytest.raises(MergeError, match=msg):
        session.set_policy(CachePolicy.GPU)
    assert session.policy is CachePolicy.CPU and session.snapshot().policy is CachePolicy.CPU
    session.apply(recipe(models, alpha=0.6))
    session.apply(recipe(models, alpha=0.4))
    assert fingerprint(dict(module.named_parameters())) == merged


def test_policy_change_keeps_the_merge_and_applies_to_later_requests(live_cpu, models):
    """cpu -> mmap drops the RAM copies (the files are unchanged: their views hold the same values) and a
    re-merge maps the files again; mmap -> cpu copies into RAM after the next merge. Restore stays exact."""
    session, target, module = live_cpu
    before = fingerprint(dict(module.named_parameters()))
    session.apply(recipe(models, alpha=0.3))
    assert session.wait_cached(60)
    b = session.others[str(models["sd15_b"].resolve())]
    assert len(b) == len(session.keys)
    assert session.set_policy("mmap") and not session.set_policy(CachePolicy.MMAP)
    assert len(session.a) == 0 and len(b) == 0 and session.snapshot().policy is CachePolicy.MMAP
    reads = sum(session.bytes_read().values())
    session.apply(recipe(models, alpha=0.7))
    assert sum(session.bytes_read().values()) > reads  # mapped from the files again
    assert 0 < len(b) and b.uncopied() == 0  # views of the file: nothing to copy under mmap
    assert session.set_policy("cpu")
    session.apply(recipe(models, alpha=0.3))
    assert session.wait_cached(60) and all(c.uncopied() == 0 for c in session.others.values())
    fresh_module = S.build_module(S.tiny(S.load_listing("sd15")), dtype=torch.float32)
    S.load_into(fresh_module, models["sd15_a"])
    LiveSession(ModuleTarget(fresh_module), models["sd15_a"], cache="mmap").apply(recipe(models, alpha=0.3))
    assert fingerprint(dict(module.named_parameters())) == fingerprint(dict(fresh_module.named_parameters()))
    session.restore()
    assert fingerprint(dict(module.named_parameters())) == before


def test_status_snapshot_counts_merged_tensors(live, models):
    session, target, module = live
    snap = session.snapshot()
    assert not snap.merged and snap.merged_tensors == 0 and snap.policy is session.policy
    rep = session.apply(recipe(models, preset="GRAD_V"))
    snap = session.snapshot()
    assert snap.merged and snap.merged_tensors == rep.written == len(session.merged_keys())
    assert snap.bytes_read == session.bytes_read() and snap.bytes_read[str(models["sd15_b"].resolve())] > 0
    session.restore()
    assert session.snapshot().merged_tensors == 0 and not session.snapshot().merged


def _rewrite(path, tmp_path):
    """Change a model file on disk (new bytes, new mtime) as a user re-saving or replacing it would."""
    import os
    import shutil
    import time
    copy = tmp_path / ("changed-" + path.name)
    shutil.copy(path, copy)
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    os.replace(copy, path)


def test_a_changed_file_used_earlier_does_not_block_later_merges(live, models, tmp_path):
    """B used once, restored, then replaced on disk: later test merges (another B, or the new file) work and
    read the new bytes; only a file that the live merge was made from blocks, with what to do."""
    import shutil
    session, target, module = live
    b2 = tmp_path / "b2.safetensors"
    shutil.copy(models["sd15_c"], b2)
    session.apply(Recipe(models=[str(models["sd15_a"]), str(b2)], alpha=0.5))
    _rewrite(b2, tmp_path)
    with pytest.raises(MergeError, match=r"changed on disk while the live merge was made from it; Restore first, "):
        session.apply(recipe(models, alpha=0.3))
    session.restore()
    session.apply(recipe(models, alpha=0.3))  # another B: the stale cache of b2 is dropped, not in the way
    shutil.copy(models["sd15_b"], b2)  # b2 now holds sd15_b's bytes
    session.apply(Recipe(models=[str(models["sd15_a"]), str(b2)], alpha=0.3))
    want = load(merge_to_file(recipe(models, alpha=0.3, dtype="fp32"), tmp_path / "want.safetensors").output)
    params = dict(module.named_parameters())
    assert all(torch.equal(params[k].detach(), want[k]) for k in session.keys)


def test_a_source_that_failed_to_open_and_vanished_does_not_block(live, models, tmp_path):
    session, target, module = live
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(MergeError, match="corrupt safetensors header"):
        session.apply(Recipe(models=[str(models["sd15_a"]), str(bad)]))
    bad.unlink()
    rep = session.apply(recipe(models, alpha=0.5))
    assert rep.written > 0
