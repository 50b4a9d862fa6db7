"""The plan's notes (printed as ``note: …``) say true things, and the errors that replace silent no-ops."""
from contextlib import ExitStack

import pytest
import torch
from safetensors.torch import save_file

from conftest import f32, load
from lib_merge import presets
from lib_merge.demo import run_demo
from lib_merge.errors import MergeError
from lib_merge.merge import merge_to_file, normalize_recipe
from lib_merge.plan import build_plan
from lib_merge.recipe import Recipe
from lib_merge.io.sources import open_source

V25 = ",".join(["0.5"] * 25)
V26 = ",".join(["0.5"] * 26)
KEY = "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


def notes(models, names, **kw) -> list[str]:
    """The plan's report lines for a recipe (no file written)."""
    recipe = Recipe(models=[str(models[n]) for n in names], **kw)
    with ExitStack() as stack:
        sources = [stack.enter_context(open_source(recipe_path)) for recipe_path in recipe.models]
        return build_plan(recipe, sources).report.lines()


def has(lines: list[str], text: str) -> bool:
    return any(text in line for line in lines)


# -- alpha / beta that do nothing ---------------------------------------------------------------------------

def test_alpha_with_a_full_vector_is_noted_only_when_given(models):
    line = "alpha has no effect: the block weights set every block, BASE included, --alpha 0.3"
    assert line in notes(models, ["sd15_a", "sd15_b"], preset="GRAD_V", alpha=0.3)
    assert line.replace("0.3", "0.7") in notes(models, ["sd15_a", "sd15_b"], weights=V26, alpha=0.7)
    assert not has(notes(models, ["sd15_a", "sd15_b"], preset="GRAD_V"), "alpha has no effect")


def test_alpha_with_25_values_is_used_for_base(models):
    assert not has(notes(models, ["sd15_a", "sd15_b"], weights=V25, alpha=0.3), "alpha has no effect")


def test_alpha_unused_for_other_reasons(models):
    assert "alpha has no effect: no_interpolation takes A only, --alpha 0.3" in \
        notes(models, ["sd15_a"], mode="no_interpolation", alpha=0.3)
    assert ("alpha has no effect: every merged key takes its ratio from the block weights or an elemental rule, "
            "--alpha 0.3") in notes(models, ["sd15_a", "sd15_b"], alpha=0.3, elemental="::0.2")


def test_demo_prints_no_alpha_note(tmp_path, capsys):
    run_demo(str(tmp_path))
    out = capsys.readouterr().out
    assert "merged with preset GRAD_V" in out and "alpha has no effect" not in out


def test_beta_ignored_by_the_mode(models):
    assert "--beta ignored: weighted_sum takes no beta (triple_sum and sum_twice do)" in \
        notes(models, ["sd15_a", "sd15_b"], beta=0.4)
    assert "--beta/--preset-beta ignored: sigmoid takes no beta (triple_sum and sum_twice do)" in \
        notes(models, ["sd15_a", "sd15_b"], mode="sigmoid", beta=0.4, preset_beta="GRAD_V")
    assert not has(notes(models, ["sd15_a", "sd15_b", "sd15_c"], mode="triple_sum", alpha=0.3, beta=0.4), "beta")
    assert "beta has no effect: the beta block weights set every block, BASE included, --beta 0.4" in \
        notes(models, ["sd15_a", "sd15_b", "sd15_c"], mode="sum_twice", beta=0.4, preset_beta="GRAD_V")


# -- elemental rules, parts ---------------------------------------------------------------------------------

def test_elemental_rule_that_matches_no_key(models):
    lines = notes(models, ["sd15_a", "sd15_b"], elemental="OUT03:attn3:0.2\nOUT04:attn2:0.1")
    assert "elemental rule matches no key, 'OUT03:attn3:0.2'" in lines
    assert not has(lines, "'OUT04:attn2:0.1'")


def test_reversed_ranges_are_errors(models):
    with pytest.raises(MergeError, match=r"reversed block range 'OUT05-IN02' \(write IN02-OUT05\), elemental rule"):
        notes(models, ["sd15_a", "sd15_b"], elemental="OUT05-IN02::0.2")
    with pytest.raises(MergeError, match=r"reversed block range 'OUT05-IN02' \(write IN02-OUT05\), --include"):
        notes(models, ["sd15_a", "sd15_b"], include="OUT05-IN02")


@pytest.mark.parametrize("kw,parts", [
    ({"exclude": "unet,te,vae"}, "--exclude 'unet,te,vae'"),
    ({"include": "IN03", "exclude": "IN00-IN05"}, "--include 'IN03' --exclude 'IN00-IN05'"),
    ({"include": "vae", "vae": "a"}, "--include 'vae'"),
])
def test_include_exclude_that_leave_nothing_to_merge(models, out_dir, kw, parts):
    out = out_dir / "o.safetensors"
    recipe = normalize_recipe(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], **kw))
    with pytest.raises(MergeError, match=f"--include/--exclude leave nothing to merge \\(every key would be A's\\), "
                                         f"{parts}"):
        merge_to_file(recipe, out)
    assert not out.exists()


# -- vectors on SDXL ----------------------------------------------------------------------------------------

def test_sd1_vectors_converted_for_sdxl_are_noted(models):
    assert "26 values converted to SDXL's 20 (IN09-IN11 and OUT09-OUT11 dropped), --weights" in \
        notes(models, ["sdxl_a", "sdxl_b"], weights=V26)
    assert "25 values converted to SDXL's 19 (IN09-IN11 and OUT09-OUT11 dropped), --weights-beta" in \
        notes(models, ["sdxl_a", "sdxl_b", "sdxl_c"], mode="triple_sum", weights_beta=V25)
    assert ("preset ALL_B has no SDXL version: its SD1 values were converted to SDXL's 20 "
            "(IN09-IN11 and OUT09-OUT11 dropped), --preset") in notes(models, ["sdxl_a", "sdxl_b"], preset="ALL_B")
    assert not has(notes(models, ["sdxl_a", "sdxl_b"], preset="GRAD_V"), "converted")
    assert not has(notes(models, ["sdxl_a", "sdxl_b"], weights=",".join(["0.5"] * 20)), "converted")


# -- presets ------------------------------------------------------------------------------------------------

def test_preset_in_another_case(models):
    assert "preset 'grad_v' is GRAD_V (names match in any case), --preset" in \
        notes(models, ["sd15_a", "sd15_b"], preset="grad_v")
    # a lone name in the weights box is a preset too
    assert "preset 'grad_v' is GRAD_V (names match in any case), --weights" in \
        notes(models, ["sd15_a", "sd15_b"], weights="grad_v")


def test_bad_user_preset_line_is_noted_when_presets_are_used(models):
    user = presets.user_presets_path()
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_text("BAD\t1,2,3\nMINE\t" + V26 + "\n")
    lines = notes(models, ["sd15_a", "sd15_b"], preset="MINE")
    assert any(line.startswith("preset BAD has 3 values, expected 26 or 20, ") and
               line.endswith("user.tsv line 1; line skipped") for line in lines)
    assert not has(notes(models, ["sd15_a", "sd15_b"], weights=V26), "line skipped")


def test_semicolons_in_weights_are_not_a_preset_name(models):
    with pytest.raises(MergeError, match="weights are separated by commas, not ';', --weights"):
        notes(models, ["sd15_a", "sd15_b"], weights=";".join(["0.5"] * 26))


# -- ratios outside the usual range: allowed, noted -------------------------------------------------------

def test_weighted_sum_extrapolation_is_noted_and_computed(models, out_dir):
    out = out_dir / "o.safetensors"
    recipe = normalize_recipe(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=1.5,
                                     dtype="fp32"))
    res = merge_to_file(recipe, out)
    line = next(n for n in res.plan.report.lines() if n.startswith("weighted_sum: alpha outside [0, 1]"))
    assert line.startswith("weighted_sum: alpha outside [0, 1] at 1130 keys (extrapolation), first: block ")
    assert line.endswith(", alpha 1.5")
    A, B, O = load(models["sd15_a"]), load(models["sd15_b"]), load(out)
    torch.testing.assert_close(O[KEY], -0.5 * f32(A[KEY]) + 1.5 * f32(B[KEY]), rtol=1e-6, atol=1e-6)
    assert not has(notes(models, ["sd15_a", "sd15_b"], alpha=1.0), "outside")


def test_triple_sum_over_one_is_noted(models):
    lines = notes(models, ["sd15_a", "sd15_b", "sd15_c"], mode="triple_sum", alpha=0.7, beta=0.5)
    line = next(n for n in lines if n.startswith("triple_sum:"))
    assert line.startswith("triple_sum: alpha + beta > 1 at 1130 keys (A gets a negative weight), first: block ")
    assert line.endswith("alpha 0.7 + beta 0.5")
    assert not has(notes(models, ["sd15_a", "sd15_b", "sd15_c"], mode="triple_sum", alpha=0.5, beta=0.5), "> 1")


# -- NaN / Inf ----------------------------------------------------------------------------------------------

def _with_values(src, dst, changes):
    t = load(src)
    for key, index, value in changes:
        flat = t[key].reshape(-1)
        flat[index] = value
    save_file(t, str(dst))
    return dst


def test_nan_and_inf_in_an_input_are_counted(models, tmp_path):
    k2 = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    bad = _with_values(models["sd15_b"], tmp_path / "badB.safetensors",
                       [(KEY, 0, float("nan")), (KEY, 2, float("inf")), (k2, 1, float("-inf"))])
    out = tmp_path / "o.safetensors"
    res = merge_to_file(normalize_recipe(Recipe(models=[str(models["sd15_a"]), str(bad)], alpha=0.5)), out)
    lines = res.plan.report.lines()
    assert f"model B (badB.safetensors) holds NaN/Inf: 3 values, first at {k2}" in lines
    assert f"the output holds NaN/Inf: 3 values, first at {k2}" in lines
    clean = merge_to_file(normalize_recipe(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])])),
                          tmp_path / "clean.safetensors")
    assert not has(clean.plan.report.lines(), "NaN")


def test_nan_in_a_copied_key_is_counted(models, tmp_path):
    vae = "first_stage_model.decoder.conv_in.weight"
    bad = _with_values(models["sd15_a"], tmp_path / "badA.safetensors", [(vae, 0, float("nan"))])
    res = merge_to_file(normalize_recipe(Recipe(models=[str(bad), str(models["sd15_b"])], vae="a")),
                        tmp_path / "o.safetensors")
    assert f"model A (badA.safetensors) holds NaN/Inf: 1 values, first at {vae}" in res.plan.report.lines()


def test_output_overflow_is_counted(models, tmp_path):
    a, b = load(models["sd15_a"]), load(models["sd15_b"])
    a32 = {k: (v.float() if v.is_floating_point() else v) for k, v in a.items()}
    b32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b.items()}
    a32[KEY].reshape(-1)[1] = 1e6
    b32[KEY].reshape(-1)[1] = 1e6
    save_file(a32, str(tmp_path / "a32.safetensors"))
    save_file(b32, str(tmp_path / "b32.safetensors"))
    res = merge_to_file(normalize_recipe(Recipe(models=[str(tmp_path / "a32.safetensors"),
                                                        str(tmp_path / "b32.safetensors")], dtype="fp16")),
                        tmp_path / "o.safetensors")
    assert (f"the output holds NaN/Inf: 1 values, first at {KEY} (the inputs are finite there: the values "
            "overflow the output dtype)") in res.plan.report.lines()


# -- the command line ---------------------------------------------------------------------------------------

def test_cli_notes_presets_and_switch(tmp_path, models, monkeypatch):
    from test_cli import cli
    out = tmp_path / "o.safetensors"
    r = cli("merge", models["sd15_a"], models["sd15_b"], "-o", out, "--preset", "grad_v", "--alpha", "0.3",
            "--supermerger-time-embed-out11")
    assert r.returncode == 0, r.stderr
    assert "note: alpha has no effect: the block weights set every block, BASE included, --alpha 0.3" in r.stdout
    assert "note: preset 'grad_v' is GRAD_V (names match in any case), --preset" in r.stdout
    assert "note: --supermerger-time-embed-out11: time_embed takes the OUT11 ratio" in r.stdout
    r = cli("merge", models["sd15_a"], models["sd15_b"], "-o", tmp_path / "x.safetensors", "--weights",
            ";".join(["0.5"] * 26))
    assert r.returncode == 2 and r.stderr.strip() == "error: weights are separated by commas, not ';', --weights"
    assert "--supermerger-time-embed-out11" in cli("merge", "--help").stdout
    user = tmp_path / "user.tsv"
    user.write_text("BAD\t1,2\nMINE\t" + ",".join(["0.25"] * 26) + "\n")
    monkeypatch.setenv("BLOCKMERGE_PRESETS", str(user))
    r = cli("presets", "list")
    assert r.returncode == 0
    assert f"note: preset BAD has 2 values, expected 26 or 20, {user} line 1; line skipped" in r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("GRAD_V\tshipped\t0,1,0.9166666667,") and lines[0].endswith(",0.9166666667,1")
    assert len(lines) == 39  # 38 shipped + MINE; the bad line is skipped
    assert "MINE\tuser\t" + ",".join(["0.25"] * 26) in lines
    r = cli("presets", "show", "grad_v")
    assert r.returncode == 0 and r.stdout.startswith("GRAD_V\t0,1,0.9166666667")
    r = cli("presets", "show", "GRAD_X")
    assert r.returncode == 2 and "unknown preset, 'GRAD_X' (did you mean GRAD_V?)" in r.stderr


def test_nan_check_reads_no_input_twice_when_all_is_finite(models, tmp_path):
    """The check runs on the chunks as they are written: a clean merge reads each input byte once."""
    from lib_merge.io.sources import open_source as op
    res = merge_to_file(normalize_recipe(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])])),
                        tmp_path / "o.safetensors")
    with op(models["sd15_a"]) as a:
        a_bytes = sum(i.nbytes for i in a.infos.values())
    assert res.bytes_read[str(models["sd15_a"].resolve())] == a_bytes
