"""Issue 12's last methods: smooth_add (add_difference) and cosine_a / cosine_b (weighted_sum, with a
statistics pass over the sources): formulas on hand-computed tensors, scipy as reference, file merge == live
merge, the CLI."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import load
from lib_merge import synthetic as S
from lib_merge.io.sources import open_source
from lib_merge.live import CachePolicy, LiveSession
from lib_merge.methods import METHODS, bind, stats
from lib_merge.plan import build_plan, stats_keys
from lib_merge.recipe import Recipe
from test_live import ModuleTarget
from test_methods import T, cli, run


# -- smooth_add -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3, 3)])
def test_smooth_add_matches_scipy_called_directly(shape):
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(shape, generator=g) for _ in range(3))
    d = (b - c).numpy()
    ref = ndimage.gaussian_filter(ndimage.median_filter(d, size=3, mode="reflect"), sigma=1.0, mode="reflect",
                                  truncate=4.0)
    got = run("add_difference", "smooth_add", a, b, c, alpha=0.3)
    assert torch.allclose(got, a + 0.3 * torch.from_numpy(ref), atol=1e-6, rtol=0)
    assert not torch.allclose(got, a + 0.3 * (b - c), atol=1e-3)  # the filters did change B - C


def test_smooth_add_by_hand_constant_difference_and_spike():
    a = torch.zeros(5, 5)
    # a constant difference survives both filters; a single spike is removed by the median
    b, c = torch.full((5, 5), 2.0), torch.zeros(5, 5)
    assert torch.allclose(run("add_difference", "smooth_add", a, b, c, alpha=0.5), torch.ones(5, 5), atol=1e-6)
    spike = torch.zeros(5, 5)
    spike[2, 2] = 100.0
    assert torch.equal(run("add_difference", "smooth_add", a, spike, torch.zeros(5, 5), alpha=1.0), a)


def test_smooth_add_alpha_zero_is_a_and_scalars_pass_through():
    a, b, c = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(run("add_difference", "smooth_add", a, b, c, alpha=0.0), a)
    assert torch.equal(run("add_difference", "smooth_add", T(2.0), T(3.0), T(1.0), alpha=0.5), T(3.0))
    assert torch.equal(run("add_difference", "smooth_add", T([2.0]), T([3.0]), T([1.0]), alpha=0.5), T([3.0]))
    got = run("add_difference", "smooth_add", a, b, c, alpha=0.7)
    assert not torch.isnan(got).any()


# -- cosine_a / cosine_b ----------------------------------------------------------------------------------------
def cos_run(method, a, b, alpha, stats, key="k.weight"):
    f = replace(bind("weighted_sum", method), stats=stats)
    return f.compute(a.clone().float(), b.clone().float(), None, alpha, 0.0, key)


A2 = T([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
B2 = T([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
R = 1 / math.sqrt(2)


def test_cosine_b_by_hand_on_a_2x3_matrix():
    # columns: cos (1,0)·(1,0) = 1, (0,1)·(1,1) = 1/√2, (1,1)·(0,1) = 1/√2; flattened: 3 / (2·2) = 0.75
    s = T([(1 + 0.75) / 2, (R + 0.75) / 2, (R + 0.75) / 2])
    k = ((s - 0.5) / 0.5 - 0.25).clamp(0, 1)
    got = cos_run("cosine_b", A2, B2, 0.25, (0.5, 1.0))
    assert torch.allclose(got, k * A2 + (1 - k) * B2, atol=1e-6, rtol=0)
    assert torch.allclose(k, T([0.5, R + 0.75 - 1 - 0.25, R + 0.75 - 1 - 0.25]), atol=1e-6)
    # cosine_b subtracts alpha itself: a negative alpha raises k (more A); cosine_a subtracts |alpha|
    more_a = cos_run("cosine_b", A2, B2, -0.25, (0.5, 1.0))
    assert torch.allclose(more_a, (k + 0.5).clamp(0, 1) * A2 + (1 - (k + 0.5).clamp(0, 1)) * B2, atol=1e-6)


def test_cosine_a_by_hand_on_a_2x3_matrix():
    # normalised columns: A (1,0) (0,1) (r,r), B (1,0) (r,r) (0,1): s = 1, r, r; flattened: (1 + 2r) / 3
    g = (1 + 2 * R) / 3
    s = T([(1 + g) / 2, (R + g) / 2, (R + g) / 2])
    for alpha in (0.1, -0.1):  # |alpha|: the sign does not matter
        k = ((s - 0.6) / 0.4 - 0.1).clamp(0, 1)
        got = cos_run("cosine_a", A2, B2, alpha, (0.6, 1.0))
        assert torch.allclose(got, k * A2 + (1 - k) * B2, atol=1e-6, rtol=0)


def test_cosine_alpha_pushes_toward_b_and_alpha_zero_is_not_a():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    stats = (-0.5, 0.5)
    for m in ("cosine_a", "cosine_b"):
        dist = [float((cos_run(m, a, b, t, stats) - b).norm()) for t in (0.0, 0.3, 0.6, 1.5)]
        assert dist[0] > dist[1] > dist[2] >= dist[3] == 0.0, (m, dist)  # k = 0 everywhere: B exactly
    assert bind("weighted_sum", "cosine_a").method.keeps_a is None  # alpha 0 keeps the most similar columns only


def test_cosine_identical_zero_one_d_and_scalar_tensors_are_nan_free():
    a = T([[1.0, 2.0], [3.0, -4.0]])
    for m in ("cosine_a", "cosine_b"):
        # identical: every s is 1; a range ending at 1 gives k = 1 - alpha, and k·A + (1-k)·A is A
        assert torch.allclose(cos_run(m, a, a, 0.3, (0.0, 1.0)), a, atol=1e-6)
        zero = torch.zeros(2, 3)
        out = cos_run(m, zero, zero, 0.3, (0.0, 1.0))
        assert torch.equal(out, zero)
        # zero A against nonzero B: s = 0, so k = clip(0 - 0.3) = 0: B
        assert torch.equal(cos_run(m, zero, B2, 0.3, (0.0, 1.0)), B2)
        # empty range (max == min) or no statistics: k = 1 - alpha, a plain weighted sum
        for empty in ((0.5, 0.5), None):
            assert torch.allclose(cos_run(m, A2, B2, 0.25, empty), 0.75 * A2 + 0.25 * B2, atol=1e-6)
        # 1-D: the cosine along dim 0 is one number (= the flattened one): k = clip((cos - 0)/1 - 0.2)
        a1, b1 = T([3.0, 4.0]), T([4.0, 3.0])  # cos = 24/25
        k = 24 / 25 - 0.2
        assert torch.allclose(cos_run(m, a1, b1, 0.2, (0.0, 1.0)), k * a1 + (1 - k) * b1, atol=1e-6)
        # 0-dim and one element: cos 1 (same sign), -1 (opposite)
        assert torch.allclose(cos_run(m, T(2.0), T(5.0), 0.5, (0.0, 1.0)), T(0.5 * 2 + 0.5 * 5))
        assert torch.equal(cos_run(m, T([2.0]), T([-5.0]), 0.5, (0.0, 1.0)), T([-5.0]))
        assert not torch.isnan(cos_run(m, zero, B2, 0.0, (0.0, 0.0))).any()


def test_cosine_leaves_vae_keys_as_a():
    for m in ("cosine_a", "cosine_b"):
        got = cos_run(m, A2, B2, 0.5, (0.0, 1.0), key="first_stage_model.decoder.conv_in.weight")
        assert torch.equal(got, A2)


def test_reduce_range_drops_nan_and_trims_percentiles():
    v = np.concatenate([np.arange(101, dtype=np.float32), [np.nan, np.nan]])
    # 1st percentile (midpoint) of 0..100 is 1: 0 goes; 99th of 1..100 is 99.5: 100 goes
    assert stats.reduce_range(v) == (1.0, 99.0)
    assert stats.reduce_range(np.array([np.nan], dtype=np.float32)) is None
    assert stats.reduce_range(np.array([0.25], dtype=np.float32)) == (0.25, 0.25)


@pytest.mark.parametrize("method", ["cosine_a", "cosine_b"])
def test_stats_pass_on_a_full_layout_checkpoint(method, models):
    names = [str(models["sd15_a"]), str(models["sd15_b"])]
    with open_source(names[0]) as a, open_source(names[1]) as b:
        plan = build_plan(Recipe(models=names, method=method, alpha=0.3), [a, b])
        keys = stats_keys(a, b)
        assert keys and not any(k.startswith("first_stage_model.") for k in keys)
        assert any(k.startswith("cond_stage_model.") for k in keys) and any(k.startswith("model.") for k in keys)
        fn = METHODS[method].stats
        vals = []
        for k in keys:
            x, y = a.read(k).double(), b.read(k).double()
            if x.dim() == 0:
                x, y = x.reshape(1), y.reshape(1)
            if method == "cosine_a":
                x, y = x / x.norm(dim=0).clamp_min(1e-12), y / y.norm(dim=0).clamp_min(1e-12)
            cos = (x * y).sum(0) / (x.norm(dim=0) * y.norm(dim=0)).clamp_min(1e-8)
            if method == "cosine_b":
                cos = (cos + float((x * y).sum() / (x.norm() * y.norm()))) / 2
            vals.append(cos.reshape(-1))
            assert torch.allclose(fn(a.read(k).float(), b.read(k).float()).double().reshape(-1), vals[-1],
                                  atol=1e-5)
        v = torch.cat(vals).numpy()
        lo, hi = plan.formula.stats
        v = v[v >= np.percentile(v, 1, method="midpoint")]
        v = v[v <= np.percentile(v, 99, method="midpoint")]
        assert lo == pytest.approx(v.min(), abs=1e-5) and hi == pytest.approx(v.max(), abs=1e-5) and lo < hi


def test_live_stats_pass_runs_again_only_when_a_source_changes(models, sd15_listing, monkeypatch):
    calls = []
    real = stats.collect
    monkeypatch.setattr(stats, "collect", lambda *a: calls.append(1) or real(*a))
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    session = LiveSession(ModuleTarget(module), models["sd15_a"], cache=CachePolicy.CPU)
    try:
        r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], method="cosine_a", alpha=0.3)
        first = session.apply(r)
        stats_1 = session.plan.formula.stats
        assert len(calls) == 1 and first.written > 0
        again = session.apply(replace(r, alpha=0.6))
        assert len(calls) == 1 and again.written > 0 and session.plan.formula.stats == stats_1
        session.apply(replace(r, models=[str(models["sd15_a"]), str(models["sd15_c"])]))
        assert len(calls) == 2 and session.plan.formula.stats != stats_1
    finally:
        session.close()


def test_cli_cosine_a_and_its_mode(models, tmp_path):
    a, b, c = (models[n] for n in ("sd15_a", "sd15_b", "sd15_c"))
    r = cli("merge", a, b, "-o", tmp_path / "x.safetensors", "--method", "cosine_a", "--alpha", "0.2")
    assert r.returncode == 0, r.stderr
    merged, base = load(tmp_path / "x.safetensors"), load(a)
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    assert all(torch.equal(merged[k], base[k]) for k in base if k.startswith("first_stage_model."))
    r = cli("merge", a, b, c, "-o", tmp_path / "y.safetensors", "--method", "cosine_a", "--mode", "add_difference")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: method cosine_a works with mode weighted_sum only, not add_difference, --method cosine_a"], r.stderr
