"""Modes over any number of models, A the base (issue 12): linear combination, task arithmetic, TIES, DARE,
DARE-TIES, DELLA, Model Stock, geometric median. Formulas on hand-computed tensors; file merge == live merge;
seeded draws independent of threads and chunking; the CLI, the recipe and reproduce with four models."""
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import load
from lib_merge import synthetic as S
from lib_merge.errors import MergeError
from lib_merge.io import filesink
from lib_merge.live import CachePolicy, LiveSession
from lib_merge.merge import merge_to_file
from lib_merge.methods import bind
from lib_merge.methods import compute as compute_mod
from lib_merge.methods.taskvec import disjoint_mean, keep_probabilities, keep_top, stock_ratio
from lib_merge.recipe import Recipe
from lib_merge.reproduce import reproduce
from lib_merge.io.sources import open_source
from lib_merge.plan import build_plan
from test_live import ModuleTarget

ROOT = Path(__file__).resolve().parent.parent
T = torch.tensor


def run(mode, tensors, alpha=1.0, params=None, seed=None, key="k.weight"):
    f = bind(mode, "linear", params or {}, seed, len(tensors))
    return f.compute_all([t.clone().float() for t in tensors], alpha, 0.0, key)


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lib_merge", *map(str, args)], capture_output=True, text=True,
                          env=env)


A, B, C = T([1.0, 2.0, 3.0, 4.0]), T([2.0, 0.0, 3.0, 8.0]), T([0.0, 0.0, 5.0, 4.0])  # δB = [1,-2,0,4], δC = [-1,-2,2,0]


# -- linear combination, task arithmetic ---------------------------------------------------------------------
def test_linear_combination_weights_default_mean_and_count_check():
    assert torch.equal(run("linear_combination", [A, B], params={"model_weights": [1.0, 1.0]}), A + B)
    assert torch.equal(run("linear_combination", [A, B, C], params={"model_weights": [0.5, 2.0, -1.0]}),
                       A * 0.5 + B * 2.0 - C)
    assert torch.allclose(run("linear_combination", [A, B, C]), (A + B + C) / 3, atol=1e-6, rtol=0)
    with pytest.raises(MergeError, match=r"^mode linear_combination: model_weights has 2 values for 3 models"):
        bind("linear_combination", "linear", {"model_weights": [1.0, 1.0]}, None, 3)


def test_task_arithmetic_adds_every_task_vector():
    assert torch.equal(run("task_arithmetic", [A, B, C], alpha=1.0), T([1.0, -2.0, 5.0, 8.0]))
    assert torch.equal(run("task_arithmetic", [A, B, C], alpha=0.5), A + 0.5 * ((B - A) + (C - A)))
    assert torch.equal(run("task_arithmetic", [A, B, C], alpha=0.0), A)


# -- TIES ---------------------------------------------------------------------------------------------------
def test_ties_trims_elects_and_takes_the_disjoint_mean():
    # density 0.5 keeps 2 of 4: δB -> [0,-2,0,4]; δC -> [0,-2,2,0] (|2| ties with the 2nd largest: kept)
    # sum [0,-4,2,4] -> signs [0,-,+,+]; agreeing means [0, -2, 2, 4]
    assert torch.equal(run("ties", [A, B, C], params={"density": 0.5}), T([1.0, 0.0, 5.0, 8.0]))
    assert torch.equal(run("ties", [A, B, C], alpha=0.5, params={"density": 0.5}), A + 0.5 * T([0.0, -2.0, 2.0, 4.0]))


def test_ties_mixed_and_all_negative_signs():
    a = torch.zeros(3)
    m1, m2, m3 = T([3.0, -1.0, -2.0]), T([-1.0, -1.0, -4.0]), T([-1.0, 2.0, -3.0])
    # sums: [1, 0, -9] -> signs [+, 0, -]; entry 0: only 3 agrees; entry 1: no elected sign; entry 2: mean of all
    got = run("ties", [a, m1, m2, m3], params={"density": 1.0})
    assert torch.equal(got, T([3.0, 0.0, -3.0]))
    neg = run("ties", [a, -m1.abs(), -m2.abs()], params={"density": 1.0})
    assert torch.equal(neg, -(m1.abs() + m2.abs()) / 2)


def test_ties_edge_cases_density_zero_identical_and_zero_inputs():
    assert torch.equal(run("ties", [A, B, C], params={"density": 0.0}), A)
    assert torch.equal(run("ties", [A, A, A]), A)
    z = torch.zeros(5)
    assert torch.equal(run("ties", [z, z, z]), z)
    d = T([0.5, -3.0, 1.0, 2.0, -0.1])
    assert torch.equal(keep_top(d.clone(), 0.4), T([0.0, -3.0, 0.0, 2.0, 0.0]))
    assert torch.equal(keep_top(d.clone(), 0.01), T([0.0, -3.0, 0.0, 0.0, 0.0]))  # ⌈0.05⌉ = 1 kept
    assert torch.isfinite(run("ties", [A, B * 1e30, C])).all()


# -- TIES memory: the lean keep_top / disjoint_mean give the plain formulas' bits ----------------------------
def _plain_keep_top(d, density):
    n, k = d.numel(), math.ceil(density * d.numel())
    if k >= n:
        return d
    if k == 0:
        return d.zero_()
    mag = d.abs()
    return d.masked_fill_(mag < torch.kthvalue(mag.reshape(-1), n - k + 1).values, 0.0)


def _plain_disjoint_mean(deltas):
    sign = sum(deltas[1:], deltas[0].clone()).sign_()
    total, count = torch.zeros_like(sign), torch.zeros_like(sign)
    for d in deltas:
        agree = (d * sign) > 0
        total.add_(d.masked_fill_(~agree, 0.0))
        count.add_(agree)
    return total.div_(count.clamp_(min=1.0))


def _bits(t):
    return t.view(torch.int32)


@pytest.mark.parametrize("kind", ["normal", "ties", "signed_zeros", "nonfinite"])
def test_keep_top_and_disjoint_mean_equal_the_plain_formulas_bit_for_bit(kind, monkeypatch):
    g = torch.Generator().manual_seed(5)
    for trial in range(60):
        n, m = int(torch.randint(1, 200, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        ds = []
        for _ in range(m):
            d = torch.randn(n, generator=g)
            if kind != "normal":
                d = torch.round(d * 2) / 2  # many ties with the threshold, many zeros
            if kind in ("signed_zeros", "nonfinite"):
                d[torch.rand(n, generator=g) < 0.1] = -0.0
            if kind == "nonfinite":
                for v in (float("nan"), float("inf"), -float("inf")):
                    d[torch.rand(n, generator=g) < 0.05] = v
            ds.append(d)
        density = (0.0, 0.01, 0.2, 0.5, 0.99, 1.0)[trial % 6]
        for d in ds:
            assert torch.equal(_bits(keep_top(d.clone(), density)), _bits(_plain_keep_top(d.clone(), density)))
        got = disjoint_mean([d.clone() for d in ds])
        assert torch.equal(_bits(got), _bits(_plain_disjoint_mean([d.clone() for d in ds])))
    x = torch.randn(6, 5, 3, generator=g)
    want = _plain_keep_top(x.clone(), 0.3)
    # on the CPU the threshold comes from an in-place partition, not torch.kthvalue (a copy plus int64 indices)
    monkeypatch.setattr(torch, "kthvalue", lambda *a, **k: pytest.fail("kthvalue copies 3x the tensor"))
    assert torch.equal(keep_top(x.clone(), 0.3), want)


# -- DARE, DARE-TIES, DELLA ----------------------------------------------------------------------------------
def test_dare_masks_rescale_and_is_seeded():
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(4000, generator=g) for _ in range(3))
    got = run("dare", [a, b, c], params={"density": 0.25}, seed=7)
    again = run("dare", [a, b, c], params={"density": 0.25}, seed=7)
    other = run("dare", [a, b, c], params={"density": 0.25}, seed=8)
    assert torch.equal(got, again) and not torch.equal(got, other)
    # every entry is A plus a sum over kept deltas, each divided by the density
    db, dc = (b - a) / 0.25, (c - a) / 0.25
    options = torch.stack([a, a + db, a + dc, a + db + dc])
    assert ((options - got).abs() <= 1e-5 * (1 + options.abs())).any(dim=0).all()
    kept_b = ((got - a).abs() > 1e-6).float().mean()
    assert 0.3 < float(kept_b) < 0.55  # 1 - 0.75² = 0.44 of entries get at least one delta
    # density 1 keeps everything: plain task arithmetic
    assert torch.equal(run("dare", [a, b, c], params={"density": 1.0}, seed=7), run("task_arithmetic", [a, b, c]))
    assert torch.equal(run("dare", [a, b, c], params={"density": 0.0}, seed=7), a)
    assert torch.equal(run("dare", [a, b, c], alpha=0.0, params={"density": 0.5}, seed=7), a)


def test_dare_key_seed_differs_per_key_and_needs_a_seed():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(100, generator=g), torch.randn(100, generator=g)
    assert not torch.equal(run("dare", [a, b], params={"density": 0.5}, seed=1, key="x"),
                           run("dare", [a, b], params={"density": 0.5}, seed=1, key="y"))
    with pytest.raises(MergeError, match=r"^mode dare draws random numbers: give a seed, --seed$"):
        bind("dare", "linear", {}, None, 2)


def test_dare_ties_at_density_one_is_ties_and_della_at_epsilon_zero_is_dare_ties():
    g = torch.Generator().manual_seed(5)
    ins = [torch.randn(6, 50, generator=g) for _ in range(4)]
    assert torch.equal(run("dare_ties", ins, params={"density": 1.0}, seed=3), run("ties", ins, params={"density": 1.0}))
    assert torch.equal(run("della", ins, params={"density": 0.4, "epsilon": 0.0}, seed=3),
                       run("dare_ties", ins, params={"density": 0.4}, seed=3))
    assert not torch.equal(run("della", ins, params={"density": 0.4, "epsilon": 0.2}, seed=3),
                           run("dare_ties", ins, params={"density": 0.4}, seed=3))
    assert torch.isfinite(run("della", ins, params={"density": 0.1, "epsilon": 0.1}, seed=3)).all()


def test_della_keep_probabilities_rank_magnitudes_per_row():
    p = keep_probabilities(T([[3.0, -1.0, 2.0], [0.0, -5.0, 4.0]]), 0.5, 0.1)
    assert torch.allclose(p, T([[0.6, 0.4, 0.5], [0.4, 0.6, 0.5]]), atol=1e-7, rtol=0)
    assert torch.equal(keep_probabilities(T([7.0]), 0.3, 0.1), T([0.3]))
    assert torch.equal(keep_probabilities(T(2.0), 0.3, 0.1), T(0.3))


# -- Model Stock, geometric median -----------------------------------------------------------------------------
def test_model_stock_ratio_from_the_mean_cosine():
    a = T([1.0, 1.0])
    b, c = a + T([1.0, 0.0]), a + T([1.0, 1.0])  # cos θ = 1/√2
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    assert abs(stock_ratio([T([1.0, 0.0]), T([1.0, 1.0])]) - t) < 1e-12
    assert torch.allclose(run("model_stock", [a, b, c]), a + t * T([1.0, 0.5]), atol=1e-6, rtol=0)
    assert torch.equal(run("model_stock", [a, a + T([1.0, 0.0]), a + T([0.0, 1.0])]), a)  # orthogonal: t = 0
    assert torch.equal(run("model_stock", [a, a + T([2.0, 2.0]), a + T([2.0, 2.0])]), a + 2.0)  # parallel: t = 1
    assert torch.equal(run("model_stock", [a, a, a]), a)  # zero task vectors
    with pytest.raises(MergeError, match=r"mode model_stock takes 3 or more \(at most 10\) models \(A B C \[D …\]\), got 2"):
        Recipe(models=["a", "b"], mode="model_stock").validate()


def test_geometric_median_weiszfeld():
    a, b, c = T([0.0]), T([1.0]), T([10.0])  # on a line the median is the middle point
    assert abs(float(run("geometric_median", [a, b, c])) - 1.0) < 1e-3
    pts = [T([0.0, 0.0]), T([2.0, 0.0]), T([1.0, math.sqrt(3.0)])]  # equilateral: the centroid
    got = run("geometric_median", pts)
    assert torch.allclose(got, T([1.0, math.sqrt(3.0) / 3]), atol=1e-5, rtol=0)
    assert torch.equal(run("geometric_median", pts, alpha=0.0), pts[0])
    assert torch.allclose(run("geometric_median", pts, alpha=0.5), (pts[0] + got) / 2, atol=1e-6, rtol=0)
    same = run("geometric_median", [b, b.clone(), b.clone()])
    assert torch.equal(same, b) and torch.isfinite(same).all()
    one_step = run("geometric_median", [a, b, c], params={"max_iter": 1})
    assert abs(float(one_step) - 1.0) > 1e-3  # max_iter is read


# -- files, live, threads, chunking, recipes --------------------------------------------------------------------
@pytest.fixture(scope="module")
def four(tmp_path_factory, sd15_listing):
    d = tmp_path_factory.mktemp("four")
    return [str(S.write_checkpoint(d / f"m{i}.safetensors", sd15_listing, seed=60 + i)) for i in range(4)]


CASES = [("linear_combination", {"params": {"model_weights": [0.4, 0.3, 0.2, 0.1]}}),
         ("task_arithmetic", {"alpha": 0.7}),
         ("ties", {"alpha": 1.0, "params": {"density": 0.3}}),
         ("dare", {"alpha": 0.8, "params": {"density": 0.3}, "seed": 11}),
         ("dare_ties", {"alpha": 1.0, "seed": 12}),
         ("della", {"alpha": 1.0, "params": {"density": 0.4, "epsilon": 0.15}, "seed": 13}),
         ("model_stock", {"alpha": 1.0}),
         ("geometric_median", {"alpha": 0.9, "params": {"max_iter": 20}})]


@pytest.mark.parametrize("mode,kw", CASES, ids=[c[0] for c in CASES])
def test_file_merge_equals_live_merge_on_four_models(mode, kw, four, sd15_listing, tmp_path):
    r = Recipe(models=four, mode=mode, dtype="fp32", vae="a", **kw)
    saved = load(merge_to_file(r, tmp_path / "f.safetensors").output)
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, four[0])
    session = LiveSession(ModuleTarget(module), four[0], cache=CachePolicy.CPU)
    try:
        session.apply(r)
        a = load(four[0])
        differs = 0
        for k, p in module.named_parameters():
            assert torch.equal(p.detach(), saved[k]), k
            differs += not torch.equal(saved[k], a[k].float())
        assert differs > 0
    finally:
        session.close()


def test_whole_tensor_modes_do_not_depend_on_threads_and_elementwise_ones_not_on_chunks(four, tmp_path, monkeypatch):
    r = Recipe(models=four, mode="dare_ties", alpha=1.0, seed=3, dtype="fp32")
    one = load(merge_to_file(r, tmp_path / "1.safetensors", threads=1).output)
    many = load(merge_to_file(r, tmp_path / "4.safetensors", threads=4).output)
    assert all(torch.equal(one[k], many[k]) for k in one)
    r2 = Recipe(models=four, mode="task_arithmetic", alpha=0.6, dtype="fp32")
    whole = load(merge_to_file(r2, tmp_path / "w.safetensors").output)
    monkeypatch.setattr(filesink, "CHUNK_ELEMS", 7)
    monkeypatch.setattr(filesink, "BUF_BYTES", 28)
    chunked = load(merge_to_file(r2, tmp_path / "c.safetensors", threads=3).output)
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_whole_tensor_budget_bounds_concurrent_work(four, tmp_path, monkeypatch):
    """Four threads, every whole-tensor task larger than the budget: they must run one at a time."""
    running, peak, lock = [0], [0], threading.Lock()
    real = compute_mod.merge_tensors

    def counting(*args, **kw):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            threading.Event().wait(0.002)
            return real(*args, **kw)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(filesink, "merge_tensors", counting)
    monkeypatch.setattr(filesink, "WHOLE_BUDGET", 1)
    merge_to_file(Recipe(models=four, mode="ties", alpha=1.0), tmp_path / "t.safetensors", threads=4)
    assert peak[0] == 1
    peak[0] = 0
    monkeypatch.setattr(filesink, "WHOLE_BUDGET", 1 << 40)
    merge_to_file(Recipe(models=four, mode="ties", alpha=1.0), tmp_path / "u.safetensors", threads=4)
    assert peak[0] > 1  # the test can see concurrency when the budget allows it


def test_block_weighted_ties_leaves_zero_blocks_exactly_a(four, tmp_path):
    w = ",".join(["1"] + ["0"] * 12 + ["1"] * 13)  # BASE 1, IN00-IN11 0, M00 and OUT 1
    out = load(merge_to_file(Recipe(models=four, mode="ties", weights=w, dtype="fp32"), tmp_path / "b.safetensors").output)
    a = load(four[0])
    ins = [k for k in a if k.startswith("model.diffusion_model.input_blocks.") and a[k].is_floating_point()]
    outs = [k for k in a if k.startswith("model.diffusion_model.output_blocks.") and a[k].is_floating_point()]
    assert ins and all(torch.equal(out[k], a[k].float()) for k in ins)
    assert any(not torch.equal(out[k], a[k].float()) for k in outs)


def test_refusals_name_the_field(four):
    with pytest.raises(MergeError, match=r"^mode linear_combination reads no per-key ratio: .*, --weights$"):
        Recipe(models=four, mode="linear_combination", weights="GRAD_V").validate()
    with pytest.raises(MergeError, match=r"^unknown parameter 'gamma' for mode ties \(it takes density\), -p gamma$"):
        Recipe(models=four, mode="ties", params={"gamma": 1.0}).validate()
    with pytest.raises(MergeError, match=r"^method slerp works with mode weighted_sum only, not ties, --method slerp$"):
        Recipe(models=four, mode="ties", method="slerp").validate()
    with pytest.raises(MergeError, match=r"^parameter density must lie in \[0, 1\] \(got 1.5\), mode ties$"):
        Recipe(models=four, mode="ties", params={"density": 1.5}).validate()
    with pytest.raises(MergeError, match=r"takes 2 or more \(at most 10\) models"):
        Recipe(models=four * 3, mode="ties").validate()


def test_recipe_records_four_inputs_and_reproduces(four, tmp_path):
    r = Recipe(models=four, mode="della", alpha=0.9, seed=21, params={"density": 0.5}, dtype="fp16")
    res = merge_to_file(r, tmp_path / "d.safetensors")
    meta = json.loads(res.metadata["blockmerge_recipe"])
    assert [i["role"] for i in meta["inputs"]] == ["a", "b", "c", "d"]
    assert meta["mode"] == "della" and meta["params"] == {"density": 0.5} and meta["seed"] == 21
    ok, new, _ = reproduce(res.output, tmp_path / "again.safetensors")
    assert ok and new.read_bytes() == res.output.read_bytes()


def test_remerge_after_a_parameter_change_recomputes_what_it_touches(four, sd15_listing):
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, four[0])
    session = LiveSession(ModuleTarget(module), four[0], cache=CachePolicy.CPU)
    try:
        r = Recipe(models=four, mode="ties", alpha=1.0, params={"density": 0.2}, vae="a")
        first = session.apply(r)
        assert session.apply(r).written == 0
        again = session.apply(Recipe(models=four, mode="ties", alpha=1.0, params={"density": 0.5}, vae="a"))
        assert again.written == first.written > 0
    finally:
        session.close()


def test_cli_ties_with_four_models_and_list_params(four, tmp_path):
    out = tmp_path / "t.safetensors"
    p = cli("merge", *four, "-o", out, "--mode", "ties", "-p", "density=0.3", "--alpha", "1")
    assert p.returncode == 0, p.stderr
    meta = json.loads(open_source(out).metadata["blockmerge_recipe"])
    assert meta["params"] == {"density": 0.3}
    p = cli("merge", *four, "-o", tmp_path / "l.safetensors", "--mode", "linear_combination",
            "-p", "model_weights=1,0,0,0")
    assert p.returncode == 0, p.stderr
    a, got = load(four[0]), load(tmp_path / "l.safetensors")
    assert all(torch.equal(got[k], a[k]) for k in a)  # weights 1,0,0,0: A itself
    p = cli("merge", *four, "-o", tmp_path / "x.safetensors", "--mode", "ties", "-p", "gamma=2")
    assert p.returncode == 2 and p.stderr.strip() == \
        "error: unknown parameter 'gamma' for mode ties (it takes density), -p gamma"
    p = cli("merge", *four, "-o", tmp_path / "x.safetensors", "--mode", "linear_combination", "-p", "model_weights=1,x")
    assert p.returncode == 2 and "model_weights must be numbers separated by commas" in p.stderr
    listing = cli("methods").stdout
    for name in ("ties", "dare", "dare_ties", "della", "model_stock", "geometric_median", "task_arithmetic",
                 "linear_combination"):
        assert f"  {name} " in listing
    assert "-p density (number, default 0.2, in [0, 1])" in listing
    assert "-p max_iter (whole number, default 100" in listing


def test_plan_reads_every_model(four):
    srcs = [open_source(p) for p in four]
    try:
        plan = build_plan(Recipe(models=four, mode="ties"), srcs)
        assert plan.formula.models == 4
    finally:
        for s in srcs:
            s.close()


def test_inspect_reads_the_declaration_of_the_recorded_mode(four, tmp_path):
    out = tmp_path / "i.safetensors"
    merge_to_file(Recipe(models=four, mode="della", alpha=0.8, seed=9, params={"density": 0.4}), out)
    p = cli("inspect", out)
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("merged with:"))
    assert line == "merged with:  della / linear, alpha 0.8, density=0.4, epsilon=0.1 (default), seed 9"
    assert "models:       m0.safetensors, m1.safetensors, m2.safetensors, m3.safetensors" in p.stdout
    j = json.loads(cli("inspect", out, "--json").stdout)
    assert j["merge"]["params"] == {"density": 0.4, "epsilon": 0.1} and j["merge"]["defaults"] == ["epsilon"]


def test_streamed_modes_read_mapped_views_and_match_the_copying_read(four, tmp_path, monkeypatch):
    from lib_merge.io.sources import SafetensorsSource
    src = SafetensorsSource(four[1])
    try:
        for key, info in src.infos.items():
            assert torch.equal(src.mapped(key).view(torch.uint8), src.read(key).view(torch.uint8)), key
    finally:
        src.close()
    calls = []
    real = SafetensorsSource.mapped
    monkeypatch.setattr(SafetensorsSource, "mapped", lambda self, key: calls.append(key) or real(self, key))
    r = Recipe(models=four, mode="ties", alpha=1.0, params={"density": 0.3}, dtype="fp32")
    mapped = load(merge_to_file(r, tmp_path / "m.safetensors").output)
    assert len(calls) >= 4 * 100  # every merged key of all four models came from the mapping
    monkeypatch.delattr(SafetensorsSource, "mapped")  # no mapping: read into the thread's reused buffers
    copied = load(merge_to_file(r, tmp_path / "c.safetensors").output)
    assert mapped.keys() == copied.keys() and all(torch.equal(mapped[k], copied[k]) for k in mapped)
    for p in four:  # sources untouched
        assert SafetensorsSource(p).read(next(iter(load(p)))).numel() > 0
