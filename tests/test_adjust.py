"""Adjust (§1.12): the 6 UNet keys scaled / shifted after the merge, in both sinks, recorded in the recipe."""
import json

import pytest
import torch

from conftest import load
from lib_merge import adjust as ADJ
from lib_merge import synthetic as S
from lib_merge.cli import main
from lib_merge.errors import MergeError
from lib_merge.live import CachePolicy, LiveSession
from lib_merge.merge import merge_to_file
from test_live import ModuleTarget
from lib_merge.recipe import Recipe, as_recipe
from lib_merge.reproduce import reproduce

U = "model.diffusion_model."
F = [1.0, -2.0, 3.0, 1.5, 2.0, -1.0, 0.5, 3.0]


def _merge(paths, out, arch="sd15", **kw):
    kw.setdefault("models", [str(paths[f"{arch}_a"]), str(paths[f"{arch}_b"])])
    kw = {"alpha": 0.3, "dtype": "fp32", **kw}
    r = Recipe(**kw)
    merge_to_file(r, out)
    return load(out)


def _expected_shift(f, sdxl):
    # written out from the spec, independently of lib_merge.adjust's tables
    if sdxl:
        br, cr, mg, yb = (0, 0, 1), (1, 0, 0), (-1, -1, 0), (-1, 1, 0)
    else:
        br, cr, mg, yb = (-1, 1 / 3, 2 / 3), (1, 1, 0), (0, -1, -1), (1, 0, 1)
    cols = [0.02 * (f[4] * br[j] + f[5] * cr[j] + f[6] * mg[j] + f[7] * yb[j]) for j in range(3)]
    return torch.tensor([0.02 * f[3], *cols])


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd2"])
def test_six_keys_hand_computed_rest_untouched(models, tmp_path, arch):
    plain = _merge(models, tmp_path / "plain.safetensors", arch)
    adj = _merge(models, tmp_path / "adj.safetensors", arch, adjust=F)
    scales = {"input_blocks.0.0.weight": 1 - 0.01 * F[0], "input_blocks.0.0.bias": 1 + 0.02 * F[0],
              "out.0.weight": 1 - 0.01 * F[1], "out.0.bias": 1 + 0.02 * F[1], "out.2.weight": 1 - 0.01 * F[2]}
    for k, s in scales.items():
        assert torch.equal(adj[U + k], plain[U + k] * s), k
    n = plain[U + "out.2.bias"].numel()  # the tiny checkpoints have 3 latent channels: the shift's first 3
    want = plain[U + "out.2.bias"] + _expected_shift(F, arch == "sdxl")[:n]
    torch.testing.assert_close(adj[U + "out.2.bias"], want, rtol=0, atol=1e-7)
    assert not torch.equal(adj[U + "out.2.bias"], plain[U + "out.2.bias"])
    six = {U + k for k in list(scales) + ["out.2.bias"]}
    assert six == set(ADJ.KEYS)
    for k in plain:
        if k not in six:
            assert torch.equal(adj[k], plain[k]), k


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_colour_vector_all_four_channels(arch):
    adj = ADJ.for_key(F, ADJ.OUT2_B, arch, 4)
    assert adj.scale == 1.0
    torch.testing.assert_close(torch.tensor(adj.shift), _expected_shift(F, arch == "sdxl"), rtol=0, atol=1e-12)
    one = ADJ.for_key([0, 0, 0, 0, 0, 0, 0, 1], ADJ.OUT2_B, arch, 4)  # yellow_blue alone: 0.02 * its vector
    assert one.shift == ((0.0, -0.02, 0.02, 0.0) if arch == "sdxl" else (0.0, 0.02, 0.0, 0.02))
    assert ADJ.for_key(F, U + "out.2.weight", arch, 4) == ADJ.Adjustment(1 - 0.03)
    assert ADJ.for_key(F, U + "middle_block.0.in_layers.0.weight", arch, 4) is None


def test_all_zeros_is_byte_identical_to_no_adjust(models, tmp_path):
    for name, a in (("none", None), ("zeros", [0] * 8), ("text", "0,0,0,0,0,0,0,0"), ("blank", " ")):
        (tmp_path / name).mkdir()  # same file name: the metadata records it
        merge_to_file(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], adjust=a),
                      tmp_path / name / "m.safetensors")
    ref = (tmp_path / "none" / "m.safetensors").read_bytes()
    for name in ("zeros", "text", "blank"):
        assert (tmp_path / name / "m.safetensors").read_bytes() == ref
    assert "adjust" not in Recipe(adjust=[0] * 8).to_dict()


def test_one_model_mode_and_alpha_zero_are_adjusted(models, tmp_path):
    a = {k: v.float() for k, v in load(models["sd15_a"]).items()}
    out = _merge(models, tmp_path / "one.safetensors", models=[str(models["sd15_a"])], mode="no_interpolation",
                 adjust=[2, 0, 0, 0, 0, 0, 0, 0])
    assert torch.equal(out[ADJ.IN_W], a[ADJ.IN_W] * (1 - 0.02))
    assert torch.equal(out[ADJ.IN_B], a[ADJ.IN_B] * (1 + 0.04))
    assert torch.equal(out[ADJ.OUT2_W], a[ADJ.OUT2_W])
    zero = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.0, dtype="fp32", adjust=[0, 0, 3, 0, 0, 0, 0, 0])
    merge_to_file(zero, tmp_path / "z.safetensors")
    assert torch.equal(load(tmp_path / "z.safetensors")[ADJ.OUT2_W], a[ADJ.OUT2_W] * (1 - 0.03))


def test_excluded_key_is_not_adjusted(models, tmp_path):
    a = load(models["sd15_a"])
    out = _merge(models, tmp_path / "ex.safetensors", adjust=F, exclude="OUT11", dtype="keep")
    assert torch.equal(out[ADJ.OUT2_W], a[ADJ.OUT2_W])  # out.* is block OUT11: excluded keys stay A's


@pytest.mark.parametrize("value, part", [
    ([1, 2, 3], "got 3"), ("1,2,3,4,5,6,7,x", "'x'"), ([1, 2, 3, 4, 5, 6, 7, float("nan")], "finite"),
    ([1, 2, 3, 4, 5, 6, 7, True], "True"), ({"a": 1}, "8 numbers")])
def test_bad_adjust_names_field_and_value(value, part):
    with pytest.raises(MergeError, match="adjust") as e:
        Recipe.from_dict({"adjust": value}, "params")
    assert part in str(e.value) and str(e.value).endswith(", params")


def test_recipe_round_trip_normalised_list():
    r = Recipe.from_dict({"models": ["a"], "mode": "no_interpolation", "adjust": "1, 2,3,0,0,0,0,-1.5"})
    assert r.adjust == [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, -1.5]
    d = json.loads(json.dumps(r.to_dict()))
    assert d["adjust"] == r.adjust and Recipe.from_dict(d) == r
    assert as_recipe(r).adjust == r.adjust


def test_cli_adjust_and_error(models, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    code = main(["-q", "merge", str(models["sd15_a"]), str(models["sd15_b"]), "-o", str(out), "--dtype", "fp32",
                 "--adjust", ",".join(map(str, F))])
    assert code == 0
    meta_recipe = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["blockmerge_recipe"])
    assert meta_recipe["adjust"] == F
    code = main(["-q", "merge", str(models["sd15_a"]), str(models["sd15_b"]), "-o", str(tmp_path / "x.safetensors"),
                 "--adjust", "1,2,3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "adjust needs 8 numbers" in err and err.strip().endswith("--adjust")


def test_reproduce_with_adjust(models, tmp_path):
    out = tmp_path / "m.safetensors"
    merge_to_file(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], adjust=F), out)
    ok, _path, _msg = reproduce(str(out), str(tmp_path / "again.safetensors"))
    assert ok


def test_live_equals_file_and_remerge_recomputes_six_keys(models, sd15_listing, tmp_path):
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    session = LiveSession(ModuleTarget(module), models["sd15_a"], cache=CachePolicy.CPU)
    try:
        ab = [str(models["sd15_a"]), str(models["sd15_b"])]
        r = Recipe(models=ab, alpha=0.3, dtype="fp32", adjust=F)
        session.apply(r)
        merge_to_file(r, tmp_path / "f.safetensors")
        file = load(tmp_path / "f.safetensors")
        params = dict(module.named_parameters())
        for k in session.keys:
            assert torch.equal(params[k].detach(), file[k]), k
        rep = session.apply(Recipe(models=ab, alpha=0.3, dtype="fp32", adjust=[0, 0, 0, 0, 1, 0, 0, 0]))
        assert rep.written == 6
        rep = session.apply(Recipe(models=ab, alpha=0.3, dtype="fp32"))
        assert rep.written == 1  # only out.2.bias was still adjusted
        merge_to_file(Recipe(models=ab, alpha=0.3, dtype="fp32"), tmp_path / "p.safetensors")
        plain = load(tmp_path / "p.safetensors")
        for k in ADJ.KEYS:
            assert torch.equal(params[k].detach(), plain[k]), k
    finally:
        session.close()


def test_live_adjust_at_alpha_zero_and_with_one_model(models, sd15_listing):
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    a = {k: v.float() for k, v in load(models["sd15_a"]).items()}
    session = LiveSession(ModuleTarget(module), models["sd15_a"], cache=CachePolicy.CPU)
    try:
        params = dict(module.named_parameters())
        rep = session.apply(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.0,
                                   adjust=[2, 0, 0, 0, 0, 0, 0, 0]))
        assert rep.written == 2 and torch.equal(params[ADJ.IN_W].detach(), a[ADJ.IN_W] * (1 - 0.02))
        rep = session.apply(Recipe(models=[str(models["sd15_a"])], mode="no_interpolation",
                                   adjust=[0, 3, 0, 0, 0, 0, 0, 0]))
        assert rep.written == 4  # IN back to A, OUT's weight and bias adjusted
        assert torch.equal(params[ADJ.IN_W].detach(), a[ADJ.IN_W])
        assert torch.equal(params[ADJ.OUT0_B].detach(), a[ADJ.OUT0_B] * (1 + 0.06))
    finally:
        session.close()
