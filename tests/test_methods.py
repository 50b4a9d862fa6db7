"""Methods with declared parameters (issue 12, first slice): formulas on hand-computed tensors, the recipe's
method/params/seed, file merge == live merge, the live re-merge signature, the CLI's ``methods`` and ``-p``."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load
from lib_merge import synthetic as S
from lib_merge.arch import ARCHS, block_of
from lib_merge.errors import MergeError
from lib_merge.io import filesink
from lib_merge.live import CachePolicy, LiveSession
from lib_merge.merge import merge_to_file, normalize_recipe
from lib_merge.methods import METHODS, MODES, Param, bind
from lib_merge.recipe import RECIPE_VERSION, Recipe, as_recipe
from lib_merge.reproduce import reproduce
from lib_merge.io.sources import open_source
from test_live import ModuleTarget

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lib_merge", *map(str, args)], capture_output=True, text=True,
                          env=env)


def run(mode, method, a, b, c=None, alpha=0.5, beta=0.0, params=None, seed=None, key="k.weight"):
    f = bind(mode, method, params or {}, seed)
    clone = lambda t: None if t is None else t.clone().float()  # noqa: E731
    return f.compute(clone(a), clone(b), clone(c), alpha, beta, key)


T = torch.tensor


# -- SLERP ------------------------------------------------------------------------------------------------
def test_slerp_orthogonal_unit_vectors_follow_the_arc():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    for t in (0.25, 0.5, 1 / 3):
        expect = T([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)])
        assert torch.allclose(run("weighted_sum", "slerp", a, b, alpha=t), expect, atol=1e-7, rtol=0)
    # the norm is kept on the arc (a linear mix of orthogonal unit vectors would shrink to 0.707)
    assert abs(float(run("weighted_sum", "slerp", a, b).norm()) - 1.0) < 1e-6


def test_slerp_general_angle_matches_the_formula():
    a, b = T([[1.0, 2.0], [0.5, -1.0]]), T([[-0.5, 1.5], [2.0, 0.25]])
    t = 0.3
    af, bf = a.reshape(-1).double(), b.reshape(-1).double()
    w = math.acos(float(af @ bf) / (float(af.norm()) * float(bf.norm())))
    expect = a * (math.sin((1 - t) * w) / math.sin(w)) + b * (math.sin(t * w) / math.sin(w))
    assert torch.equal(run("weighted_sum", "slerp", a, b, alpha=t), expect)


@pytest.mark.parametrize("b", [T([2.0, 4.0, 6.0]), T([-1.0, -2.0, -3.0]), T([0.0, 0.0, 0.0])],
                         ids=["parallel", "anti-parallel", "zero"])
def test_slerp_is_linear_for_parallel_anti_parallel_and_zero(b):
    a = T([1.0, 2.0, 3.0])
    got = run("weighted_sum", "slerp", a, b, alpha=0.25)
    assert torch.equal(got, a.lerp(b, 0.25)) and torch.isfinite(got).all()


def test_slerp_identical_inputs_ends_and_one_element():
    a = T([0.3, -1.2, 5.0])
    assert torch.equal(run("weighted_sum", "slerp", a, a.clone(), alpha=0.7), a.lerp(a, 0.7))
    b = T([-2.0, 0.5, 1.0])
    assert torch.equal(run("weighted_sum", "slerp", a, b, alpha=0.0), a)
    assert torch.equal(run("weighted_sum", "slerp", a, b, alpha=1.0), b)
    zero = torch.zeros(3)
    assert torch.equal(run("weighted_sum", "slerp", zero, zero, alpha=0.4), zero)
    assert torch.equal(run("weighted_sum", "slerp", T(2.0), T(4.0), alpha=0.25), T(2.5))  # 0-dim: linear
    assert torch.equal(run("weighted_sum", "slerp", T([2.0]), T([-4.0]), alpha=0.5), T([-1.0]))


# -- train difference, tensor swap, extract, add noise ---------------------------------------------------------
def test_train_difference_formula_and_zero_cases():
    a, b, c = T([1.0, 0.0, 2.0, 3.0]), T([3.0, 1.0, 2.0, 3.0]), T([2.0, 1.0, 0.0, 3.0])
    got = run("add_difference", "train_difference", a, b, c, alpha=0.5)
    # d = B - C = [1, 0, 2, 0]; |B - A| = [2, 1, 0, 0]; s = [2/3, 0 (d = 0), 0, 0 (0/0)]
    assert torch.allclose(got, T([1.0 + 1.0 * (2 / 3) * 1.8 * 0.5, 0.0, 2.0, 3.0]), atol=1e-6, rtol=0)
    assert torch.equal(run("add_difference", "train_difference", a, b, b.clone(), alpha=0.7), a)  # B == C: A
    assert torch.equal(run("add_difference", "train_difference", a, b, c, alpha=0.0), a)


def test_tensor_swap_rows_from_b_and_back():
    a, b = torch.zeros(10, 2), torch.ones(10, 2)
    got = run("weighted_sum", "tensor_swap", a, b, alpha=0.3, beta=0.2)  # rows [2, 5) from B
    assert got[:, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    got = run("weighted_sum", "tensor_swap", a, b, alpha=0.75, beta=0.5)  # B, with rows [2, 5) from A
    assert got[:, 0].tolist() == [1, 1, 0, 0, 0, 1, 1, 1, 1, 1]
    assert torch.equal(run("weighted_sum", "tensor_swap", a, b, alpha=0.0, beta=0.4), a)
    assert torch.equal(run("weighted_sum", "tensor_swap", T(1.0), T(2.0), alpha=1.0, beta=0.0), T(1.0))


def test_tensor_swap_dim1_slices_columns_with_the_documented_bounds():
    a, b = torch.zeros(4, 10), torch.ones(4, 10)
    got = run("weighted_sum", "tensor_swap_dim1", a, b, alpha=0.5, beta=0.25)  # n = 4 (dim 1 <= 100): cols [1, 3)
    assert got[0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0] and torch.equal(got[0], got[3])
    a, b = torch.zeros(2, 200), torch.ones(2, 200)
    got = run("weighted_sum", "tensor_swap_dim1", a, b, alpha=0.5, beta=0.25)  # n = 200: cols [50, 150)
    assert got[1].tolist() == [0.0] * 50 + [1.0] * 100 + [0.0] * 50
    got = run("weighted_sum", "tensor_swap_dim1", torch.zeros(8), torch.ones(8), alpha=0.5, beta=0.25)  # 1-dim: dim 0
    assert got.tolist() == [0, 0, 1, 1, 1, 1, 0, 0]


def test_self_scale_scales_a_except_spared_keys():
    a, b = T([2.0, -4.0]), T([9.0, 9.0])
    assert torch.equal(run("weighted_sum", "self_scale", a, b, alpha=0.25), T([0.5, -1.0]))
    assert torch.equal(run("weighted_sum", "self_scale", a, b, alpha=0.0), a)
    assert torch.equal(run("weighted_sum", "self_scale", a, b, alpha=0.25, key="x.norm.weight"), a)


def test_extract_formula_with_gamma():
    a, b, c = T([[1.0, 1.0]]), T([[2.0, 1.0]]), T([[1.0, 2.0]])
    # B - A = [1, 0], C - A = [0, 1]: cos 0, d = 0.5^gamma
    for gamma in (1.0, 2.0):
        d = 0.5 ** gamma
        for alpha, beta in ((0.0, 0.0), (0.5, 1.0), (1.0, 0.3)):
            w = d + beta * (1 - 2 * d)
            expect = a + T([[1 - alpha, alpha]]) * w
            got = run("add_difference", "extract", a, b, c, alpha=alpha, beta=beta, params={"gamma": gamma})
            assert torch.allclose(got, expect, atol=1e-7, rtol=0), (gamma, alpha, beta)


def test_add_noise_is_seeded_per_key_and_spares_norms():
    a = torch.zeros(4, 3)
    one = run("weighted_sum", "add_noise", a, a, alpha=0.5, seed=7, key="x.weight")
    assert torch.equal(one, run("weighted_sum", "add_noise", a, a, alpha=0.5, seed=7, key="x.weight"))
    assert not torch.equal(one, run("weighted_sum", "add_noise", a, a, alpha=0.5, seed=8, key="x.weight"))
    assert not torch.equal(one, run("weighted_sum", "add_noise", a, a, alpha=0.5, seed=7, key="y.weight"))
    f = bind("weighted_sum", "add_noise", {}, 7)
    g = torch.Generator().manual_seed(f.key_seed("x.weight"))
    assert torch.equal(one, torch.randn(4, 3, generator=g) * 0.5)
    for key in ("a.norm1.weight", "b.to_out.0.weight", "c.proj_out.bias"):
        assert torch.equal(run("weighted_sum", "add_noise", a, a, alpha=0.5, seed=7, key=key), a)
    with pytest.raises(MergeError, match=r"^method add_noise draws random numbers: give a seed, --seed$"):
        bind("weighted_sum", "add_noise")


# -- declarations and the recipe ----------------------------------------------------------------------------
def test_pairings_and_params_are_checked_against_the_declaration():
    with pytest.raises(MergeError, match=r"^method slerp works with mode weighted_sum only, not add_difference, "
                                         r"--method slerp$"):
        bind("add_difference", "slerp")
    with pytest.raises(MergeError, match=r"^unknown parameter 'gama' for method extract \(it takes gamma\), -p gama$"):
        bind("add_difference", "extract", {"gama": 1.0})
    with pytest.raises(MergeError, match=r"^parameter gamma must be a number \(got str '2'\), method extract$"):
        bind("add_difference", "extract", {"gamma": "2"})
    with pytest.raises(MergeError, match=r"^parameter gamma must lie in \[0, inf\] \(got -1.0\), method extract$"):
        bind("add_difference", "extract", {"gamma": -1})
    assert bind("add_difference", "extract").params == (("gamma", 1.0),)
    with pytest.raises(MergeError, match=r"^unknown method 'slurp'"):
        bind("weighted_sum", "slurp")
    for m in METHODS.values():  # every declaration is complete
        assert m.formula and all(isinstance(p, Param) and p.meaning for p in m.params)
        assert m.modes is None or all(x in MODES for x in m.modes)


def test_recipe_v2_fields_and_v1_still_loads():
    r = Recipe.from_dict({"models": ["a", "b", "c"], "mode": "add_difference", "method": "extract",
                          "params": {"gamma": 2}, "version": 2})
    r.validate()
    assert (r.method, r.params) == ("extract", {"gamma": 2})
    d = r.to_dict()
    assert d["version"] == RECIPE_VERSION == 2 and d["method"] == "extract" and d["params"] == {"gamma": 2}
    assert Recipe.from_dict(d) == r
    v1 = Recipe.from_dict({"models": ["a", "b"], "version": 1})
    assert (v1.method, v1.params, v1.seed) == ("linear", {}, None)
    with pytest.raises(MergeError, match=r"^unsupported recipe version 3, r.json$"):
        Recipe.from_dict({"version": 3}, "r.json")
    with pytest.raises(MergeError, match=r"^params must be an object of parameter names and values \(got str 'x'\), api$"):
        Recipe.from_dict({"params": "x"}, "api")
    with pytest.raises(MergeError, match=r"^unknown parameter 'gamma' for method slerp \(it takes none\), -p gamma$"):
        as_recipe({"models": ["a", "b"], "method": "slerp", "params": {"gamma": 1}})


# -- file merge == live merge; reproduce ------------------------------------------------------------------------
CASES = [
    ("slerp", dict(mode="weighted_sum", alpha=0.3, preset="GRAD_V")),
    ("tensor_swap", dict(mode="weighted_sum", alpha=0.4, beta=0.3)),
    ("tensor_swap_dim1", dict(mode="weighted_sum", alpha=0.7, beta=0.6)),
    ("self_scale", dict(mode="weighted_sum", alpha=0.9)),
    ("add_noise", dict(mode="weighted_sum", alpha=0.01, seed=123)),
    ("train_difference", dict(mode="add_difference", alpha=0.7)),
    ("extract", dict(mode="add_difference", alpha=0.3, beta=0.6, params={"gamma": 2.0})),
    ("smooth_add", dict(mode="add_difference", alpha=0.6)),
    ("cosine_a", dict(mode="weighted_sum", alpha=0.3)),
    ("cosine_b", dict(mode="weighted_sum", alpha=0.2, preset="GRAD_V")),
]


def _names(kw):
    return ["sd15_a", "sd15_b", "sd15_c"] if kw["mode"] == "add_difference" else ["sd15_a", "sd15_b"]


@pytest.mark.parametrize("method,kw", CASES, ids=[c[0] for c in CASES])
def test_file_merge_equals_live_merge(method, kw, models, sd15_listing, tmp_path):
    r = Recipe(models=[str(models[n]) for n in _names(kw)], method=method, dtype="fp32", vae="a", **kw)
    out = merge_to_file(r, tmp_path / "f.safetensors").output
    saved = load(out)
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    session = LiveSession(ModuleTarget(module), models["sd15_a"], cache=CachePolicy.CPU)
    try:
        session.apply(r)
        params = dict(module.named_parameters())
        a = load(models["sd15_a"])
        differs = 0
        for k, p in params.items():
            assert torch.equal(p.detach(), saved[k]), k
            differs += not torch.equal(saved[k], a[k].float())
        assert differs > 0
    finally:
        session.close()


def test_elementwise_method_does_not_depend_on_chunk_size(models, tmp_path, monkeypatch):
    r = Recipe(models=[str(models[n]) for n in ("sd15_a", "sd15_b", "sd15_c")], mode="add_difference",
               method="train_difference", alpha=0.6, dtype="fp32")
    whole = load(merge_to_file(r, tmp_path / "whole.safetensors").output)
    monkeypatch.setattr(filesink, "CHUNK_ELEMS", 7)
    monkeypatch.setattr(filesink, "BUF_BYTES", 28)
    chunked = load(merge_to_file(r, tmp_path / "chunked.safetensors", threads=3).output)
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_add_noise_does_not_depend_on_threads_and_seed_changes_it(models, tmp_path):
    r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], method="add_noise", alpha=0.1, seed=5)
    one = load(merge_to_file(r, tmp_path / "1.safetensors", threads=1).output)
    four = load(merge_to_file(r, tmp_path / "4.safetensors", threads=4).output)
    assert all(torch.equal(one[k], four[k]) for k in one)
    r.seed = 6
    other = load(merge_to_file(r, tmp_path / "6.safetensors").output)
    assert any(not torch.equal(one[k], other[k]) for k in one)


def test_recipe_v2_reproduces_and_records_method(tmp_path, sd15_listing):
    a = S.write_checkpoint(tmp_path / "a.safetensors", sd15_listing, 1)
    b = S.write_checkpoint(tmp_path / "b.safetensors", sd15_listing, 2)
    r = normalize_recipe(Recipe(models=[a, b], method="slerp", alpha=0.3, preset="GRAD_V"))
    res = merge_to_file(r, tmp_path / "o.safetensors")
    ours = json.loads(res.metadata["blockmerge_recipe"])
    assert (ours["version"], ours["method"], ours["params"]) == (2, "slerp", {})
    ok, new, detail = reproduce(str(res.output))
    assert ok and new.read_bytes() == res.output.read_bytes(), detail


def test_version1_file_written_before_methods_still_reproduces(tmp_path, sd15_listing):
    """A file as version 1 wrote it (no method, params or seed in its recipe) reproduces bit-identically."""
    a = S.write_checkpoint(tmp_path / "a.safetensors", sd15_listing, 1)
    b = S.write_checkpoint(tmp_path / "b.safetensors", sd15_listing, 2)
    r = normalize_recipe(Recipe(models=[a, b], alpha=0.3))
    res = merge_to_file(r, tmp_path / "tmp.safetensors")
    meta = dict(res.metadata)
    ours = json.loads(meta["blockmerge_recipe"])
    for name in ("method", "params", "seed"):
        ours.pop(name, None)  # seed is left out of the recipe when unset
    ours["version"] = 1
    meta["blockmerge_recipe"] = json.dumps(ours, sort_keys=True, separators=(",", ":"))
    old = merge_to_file(r, tmp_path / "old.safetensors", metadata=meta).output
    with open_source(old) as s:
        assert json.loads(s.metadata["blockmerge_recipe"])["version"] == 1
    ok, new, detail = reproduce(str(old))
    assert ok and new.read_bytes() == old.read_bytes(), detail
    got, want = load(new), load(res.output)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_linear_is_todays_merge_bit_for_bit(models, tmp_path):
    names = [str(models["sd15_a"]), str(models["sd15_b"])]
    plain = load(merge_to_file(Recipe(models=names, preset="GRAD_V"), tmp_path / "p.safetensors").output)
    lin = load(merge_to_file(Recipe(models=names, preset="GRAD_V", method="linear"), tmp_path / "l.safetensors").output)
    assert plain.keys() == lin.keys() and all(torch.equal(plain[k], lin[k]) for k in plain)


# -- live re-merge from the signature -----------------------------------------------------------------------------
def test_param_change_and_one_block_change_remerge_only_what_changes(models, sd15_listing):
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    session = LiveSession(ModuleTarget(module), models["sd15_a"], cache=CachePolicy.CPU)
    names = [str(models[n]) for n in ("sd15_a", "sd15_b", "sd15_c")]
    try:
        base = dict(models=names, mode="add_difference", method="extract", alpha=0.3, beta=0.5)
        first = session.apply(Recipe(**base, params={"gamma": 1.0}))
        assert first.written == len(session.keys)
        again = session.apply(Recipe(**base, params={"gamma": 1.0}))
        assert again.written == 0
        changed = session.apply(Recipe(**base, params={"gamma": 3.0}))
        assert changed.written == len(session.keys)  # gamma reaches every key
        two = [str(models["sd15_a"]), str(models["sd15_b"])]
        ones = ",".join(["0.5"] * 26)
        session.apply(Recipe(models=two, method="slerp", weights=ones))
        out05 = ",".join("0.2" if i == 1 + 12 + 1 + 5 else "0.5" for i in range(26))
        rep = session.apply(Recipe(models=two, method="slerp", weights=out05))
        in_out05 = [k for k in session.keys if block_of(k, ARCHS["sd1"]) == "OUT05"]
        assert 0 < rep.written == len(in_out05) < len(session.keys)
        rep = session.apply(Recipe(models=two, method="linear", weights=out05))
        assert rep.written == len(session.keys)  # a method change re-merges every key it touches
    finally:
        session.close()


# -- command line -------------------------------------------------------------------------------------------------
def test_cli_methods_lists_every_mode_and_method():
    r = cli("methods")
    assert r.returncode == 0, r.stderr
    for name in list(MODES) + list(METHODS):
        assert f"  {name} " in r.stdout, name
    assert "gamma (number, default 1.0, in [0, inf])" in r.stdout
    assert "[with: weighted_sum, whole tensors]" in r.stdout  # slerp's pairing


def test_cli_method_and_params(models, tmp_path):
    a, b, c = (models[n] for n in ("sd15_a", "sd15_b", "sd15_c"))
    out = tmp_path / "x.safetensors"
    r = cli("merge", a, b, c, "-o", out, "--mode", "add_difference", "--method", "extract", "-p", "gamma=2",
            "--alpha", "0.3", "-q")
    assert r.returncode == 0, r.stderr
    with open_source(out) as s:
        ours = json.loads(s.metadata["blockmerge_recipe"])
    assert (ours["method"], ours["params"]) == ("extract", {"gamma": 2.0})
    for args, msg in [
        (["--method", "extract", "-p", "gama=2"], "error: unknown parameter 'gama' for method extract (it takes gamma), -p gama"),
        (["--method", "extract", "--param", "gamma=x"], "error: parameter gamma must be a number (got 'x'), method extract, -p gamma=x"),
        (["--method", "extract", "-p", "gamma"], "error: -p takes NAME=VALUE, -p 'gamma'"),
        (["--method", "slerp"], "error: method slerp works with mode weighted_sum only, not add_difference, --method slerp"),
    ]:
        r = cli("merge", a, b, c, "-o", tmp_path / "y.safetensors", "--mode", "add_difference", *args)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [msg], r.stderr


def test_extract_refuses_ratios_outside_unit_and_swap_ab_needs_a_symmetric_method(models, tmp_path):
    names = [str(models[n]) for n in ("sd15_a", "sd15_b", "sd15_c")]
    with pytest.raises(MergeError, match=r"^add_difference/extract: ratio 1.5 is outside \[0, 1\], block BASE key "):
        merge_to_file(Recipe(models=names, mode="add_difference", method="extract", alpha=1.5), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(MergeError, match=r"^--swap-ab works with the linear and slerp methods only, not tensor_swap$"):
        Recipe(models=names[:2], method="tensor_swap", swap_ab=True).validate()
    Recipe(models=names[:2], method="slerp", swap_ab=True).validate()


def test_slerp_dot_products_over_several_chunks_match_fp64():
    """The fp64 sums run over fixed chunks (no whole-tensor fp64 copies): a tensor spanning several chunks and
    a ragged tail gives the dot products and norms of a whole-tensor fp64 computation."""
    from lib_merge.methods.pairwise import DOT_CHUNK, _dots
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3 * DOT_CHUNK + 5, generator=g)
    b = torch.randn(3 * DOT_CHUNK + 5, generator=g)
    aa, bb, ab = _dots(a, b)
    ad, bd = a.double(), b.double()
    for got, want in ((aa, ad @ ad), (bb, bd @ bd), (ab, ad @ bd)):
        assert abs(got - float(want)) <= 1e-9 * abs(float(want))
