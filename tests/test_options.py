"""Each list of choices and each rule across fields is defined once (lib_merge.options) and gives one message,
whichever door the recipe came through: the CLI, a recipe file, the tab/API request dict, an X/Y/Z axis."""
import json

import pytest

from lib_merge import options
from lib_merge.cli import build_parser, main
from lib_merge.dtypes import OUTPUT_DTYPES
from lib_merge.elemental import subtarget_rule
from lib_merge.errors import MergeError
from lib_merge.recipe import Recipe
from lib_merge.webui.params import to_recipe

BOTH = "give weights or preset, not both, weights/preset"
BOTH_BETA = "give weights_beta or preset_beta, not both, weights_beta/preset_beta"


def test_lists():
    assert options.DTYPE_CHOICES == tuple(OUTPUT_DTYPES) == ("fp16", "bf16", "fp32", "keep")
    assert options.DEFAULT_SAVE_DTYPE in options.DTYPE_CHOICES
    assert options.VAE_CHOICES == ("merge", "a", "b")
    assert options.SUBTARGETS == ("all", "attn1", "attn2", "ff")
    assert options.choice_list(options.VAE_CHOICES) == "merge, a or b"
    assert options.choice_list(["x"]) == "x"


def test_cli_choices_are_the_engine_lists():
    merge = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("merge"))
    by_dest = {a.dest: a for a in merge._actions}
    assert tuple(by_dest["dtype"].choices) == options.DTYPE_CHOICES
    assert tuple(by_dest["vae"].choices) == options.VAE_CHOICES
    assert "fp16, bf16, fp32 or keep" in by_dest["dtype"].help


def test_check_choice_names_field_and_value():
    options.check_choice("dtype", "fp16", options.DTYPE_CHOICES)
    with pytest.raises(MergeError) as e:
        options.check_choice("dtype", "fp64", options.DTYPE_CHOICES)
    assert str(e.value) == "dtype must be fp16, bf16, fp32 or keep, dtype: 'fp64'"


@pytest.mark.parametrize("fields,message", [
    ({"weights": "0.5", "preset": "GRAD_V"}, BOTH),
    ({"weights_beta": "0.5", "preset_beta": "GRAD_V"}, BOTH_BETA),
])
def test_one_of_rule_in_recipe_validation(fields, message):
    with pytest.raises(MergeError) as e:
        Recipe(models=["a", "b", "c"], mode="triple_sum", **fields).validate()
    assert str(e.value) == message
    Recipe(models=["a", "b"], weights=fields.get("weights"), preset_beta=fields.get("preset_beta")).validate()
    with pytest.raises(MergeError) as e:
        options.check_exclusive(fields)
    assert str(e.value) == message


def test_one_of_rule_same_message_from_cli_recipe_file_and_request(tmp_path, models, capsys):
    out = tmp_path / "o.safetensors"
    code = main(["merge", str(models["sd15_a"]), str(models["sd15_b"]), "-o", str(out), "--weights", "0.5",
                 "--preset", "GRAD_V"])
    assert code == 2 and capsys.readouterr().err.strip() == f"error: {BOTH}" and not out.exists()
    # both in a recipe file (a flag would replace the file's other one: --weights over its preset)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"preset": "GRAD_V", "weights": "0.5"}))
    code = main(["merge", str(models["sd15_a"]), str(models["sd15_b"]), "-o", str(out), "--recipe", str(recipe)])
    assert code == 2 and capsys.readouterr().err.strip() == f"error: {BOTH}"
    with pytest.raises(MergeError) as e:
        to_recipe({"model_b": "b", "weights": "0.5", "preset": "GRAD_V"}, lambda n, f: n, "a")
    assert str(e.value) == BOTH


def test_choices_same_message_from_recipe_file_and_request(tmp_path, models, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"vae": "c"}))
    code = main(["merge", str(models["sd15_a"]), str(models["sd15_b"]), "-o", str(tmp_path / "o.safetensors"),
                 "--recipe", str(recipe)])
    assert code == 2 and capsys.readouterr().err.strip() == "error: vae must be merge, a or b, vae: 'c'"
    with pytest.raises(MergeError, match=r"^vae must be merge, a or b, vae: 'c'$"):
        to_recipe({"model_b": "b", "vae": "c"}, lambda n, f: n, "a")
    with pytest.raises(MergeError, match=r"^dtype must be fp16, bf16, fp32 or keep, dtype: 'fp64'$"):
        to_recipe({"model_b": "b", "dtype": "fp64"}, lambda n, f: n, "a")


def test_subtargets_one_check():
    message = "sub-target must be all, attn1, attn2 or ff, subtargets: 'attn3'"
    assert options.check_subtargets(["attn1", "ff"]) == ["attn1", "ff"]
    with pytest.raises(MergeError) as e:
        subtarget_rule(["attn1", "attn3"], 0.5)
    assert str(e.value) == message
    with pytest.raises(MergeError) as e:
        to_recipe({"model_b": "b", "weights": ",".join(["1"] * 26), "subtargets": ["attn3"]}, lambda n, f: n, "a")
    assert str(e.value) == message
    # without a weight vector sub-targets do nothing, but a wrong name is still an error
    with pytest.raises(MergeError) as e:
        to_recipe({"model_b": "b", "subtargets": "attn3"}, lambda n, f: n, "a")
    assert str(e.value) == message
    assert subtarget_rule(["attn2", "ff"], 0.25) == ":NOT attn2 ff.net:0.25"


def test_mode_one_check():
    from lib_merge.methods.modes import get_mode
    with pytest.raises(MergeError) as e:
        get_mode("blend")
    with pytest.raises(MergeError) as e2:
        to_recipe({"model_b": "b", "mode": "blend"}, lambda n, f: n, "a")
    assert str(e2.value) == str(e.value)
    assert str(e.value).startswith("unknown mode 'blend', choose one of no_interpolation, weighted_sum")
