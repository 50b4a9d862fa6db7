"""Recipes are parsed by type, YAML aliases are refused, relative paths follow the recipe file, and flags given
with ``--recipe`` override the file's fields."""
import json
import shutil
import time
from pathlib import Path

import pytest

from lib_merge.cli import main
from lib_merge.errors import MergeError
from lib_merge.inspection import summarize
from lib_merge.recipe import Recipe, as_recipe, load_recipe_file, with_overrides


def one_error(rc, err) -> str:
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def recorded_recipe(path) -> dict:
    return json.loads(summarize(path)["metadata"]["blockmerge_recipe"])


@pytest.mark.parametrize("field, value, message", [
    ("alpha", "abc", "alpha must be a number (got str 'abc')"),
    ("alpha", None, "alpha must be a number (got null)"),
    ("alpha", [1], "alpha must be a number (got list [1])"),
    ("alpha", True, "alpha must be a number (got true)"),
    ("beta", float("nan"), "beta must be a finite number (got nan)"),
    ("mode", ["weighted_sum"], "mode must be a string (got list ['weighted_sum'])"),
    ("dtype", None, "dtype must be a string (got null)"),
    ("weights", {"IN00": 1}, "weights must be a string or a list of numbers or R/U/X (got dict {'IN00': 1})"),
    ("weights", [0.5, "x"], "weights list items must be numbers or R/U/X (got str 'x')"),
    ("include", [["unet"]], "include list items must be strings (got list ['unet'])"),
    ("elemental", 5, "elemental must be a string or a list of strings (got int 5)"),
    ("prune", "no", "prune must be true or false (got str 'no')"),
    ("force", 1, "force must be true or false (got int 1)"),
    ("preset", 3, "preset must be a string (got int 3)"),
    ("models", "ab", "models must be a list of file paths (got str 'ab')"),
    ("models", [{"name": "a"}], "models[0] entry needs a 'path' (got keys name)"),
    ("models", ["a", 7], "models[1] must be a file path (got int 7)"),
    ("models", ["a", ""], "models[1] is an empty path"),
    ("bake_vae", 1.5, "bake_vae must be a file path (got float 1.5)"),
])
def test_wrong_types_are_one_line_errors(field, value, message):
    with pytest.raises(MergeError) as e:
        Recipe.from_dict({"models": ["a", "b"], field: value}, "r.yaml")
    assert str(e.value) == f"{message}, r.yaml"


def test_lists_are_taken_where_a_list_means_one_thing():
    r = Recipe.from_dict({"weights": [0, 1, 0.25], "include": ["unet", "IN00-IN05"],
                          "elemental": ["IN00:attn2:0.5", "OUT03:ff:0"], "models": [{"path": "a"}, "b"]})
    assert (r.weights, r.include, r.elemental, r.models) == ("0,1,0.25", "unet,IN00-IN05",
                                                             "IN00:attn2:0.5\nOUT03:ff:0", ["a", "b"])


def test_whole_numbers_are_numbers_and_blank_text_is_unset():
    r = Recipe.from_dict({"alpha": 1, "beta": 0, "preset": "  ", "weights": ""})
    assert (r.alpha, r.beta, r.preset, r.weights) == (1.0, 0.0, None, None)
    assert type(r.alpha) is float


def test_recipe_version_must_be_the_integer_1():
    with pytest.raises(MergeError, match=r"^unsupported recipe version True, r.json$"):
        Recipe.from_dict({"version": True}, "r.json")


def test_as_recipe_copies_and_validates():
    src = Recipe(models=[Path("a.safetensors"), "b.safetensors"], alpha=1)
    r = as_recipe(src)
    assert r.models == ["a.safetensors", "b.safetensors"] and r.alpha == 1.0 and r is not src
    with pytest.raises(MergeError, match=r"^mode weighted_sum takes 2 models \(A B\), got 1$"):
        as_recipe({"models": ["a"]})


def test_with_overrides_replaces_the_other_vector_form():
    base = Recipe(models=["a", "b"], preset="GRAD_V", weights_beta="1," * 25 + "1")
    r = with_overrides(base, {"weights": "0," * 25 + "1"})
    assert (r.weights, r.preset, r.weights_beta) == ("0," * 25 + "1", None, base.weights_beta)
    r = with_overrides(base, {"preset_beta": "GRAD_A"})
    assert (r.preset, r.weights_beta, r.preset_beta) == ("GRAD_V", None, "GRAD_A")
    with pytest.raises(MergeError, match="give weights or preset, not both, weights/preset"):
        as_recipe(with_overrides(base, {"weights": "0.5", "preset": "GRAD_A"}))


# -- files ---------------------------------------------------------------------------------------------------
def test_yaml_aliases_are_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("models: &m [a.safetensors, b.safetensors]\nother: *m\n")
    with pytest.raises(MergeError) as e:
        load_recipe_file(p)
    assert str(e.value) == f"YAML aliases are not allowed in a recipe (*m at line 2), {p}"


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\nmodels: *i\n")
    t0 = time.perf_counter()
    with pytest.raises(MergeError, match=r"^YAML aliases are not allowed in a recipe \(\*a at line 2\)"):
        load_recipe_file(p)
    assert time.perf_counter() - t0 < 1.0


def test_recipe_file_that_is_not_utf8_or_not_an_object(tmp_path):
    p = tmp_path / "r.json"
    p.write_bytes(b'{"mode": "\xff"}')
    with pytest.raises(MergeError) as e:
        load_recipe_file(p)
    assert str(e.value) == f"recipe is not UTF-8 text (byte 0xff at offset 10), {p}"
    p.write_text("[1, 2]")
    with pytest.raises(MergeError) as e:
        load_recipe_file(p)
    assert str(e.value) == f"recipe must be an object (a mapping of field names), got list, {p}"


def test_relative_model_paths_follow_the_recipe_file(capsys, models, tmp_path, monkeypatch):
    folder = tmp_path / "shared"
    folder.mkdir()
    for name in ("sd15_a", "sd15_b"):
        shutil.copy(models[name], folder)
    rec = folder / "r.yaml"  # the recipe sits beside its models and names them by bare file name
    rec.write_text("models: [sd15_a.safetensors, sd15_b.safetensors]\nalpha: 0.3\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_recipe_file("../shared/r.yaml").models == ["../shared/sd15_a.safetensors",
                                                           "../shared/sd15_b.safetensors"]
    out = tmp_path / "o.safetensors"
    assert main(["merge", "--recipe", "../shared/r.yaml", "-o", str(out)]) == 0, capsys.readouterr().err
    assert recorded_recipe(out)["alpha"] == 0.3


def test_flags_override_the_recipe_file(capsys, models, tmp_path):
    rec = tmp_path / "r.json"
    rec.write_text(json.dumps({"models": [str(models["sd15_a"]), str(models["sd15_b"])], "preset": "GRAD_V",
                               "prune": True, "alpha": 0.2}))
    out = tmp_path / "o.safetensors"
    weights = "0.1," * 25 + "0.9"
    rc = main(["merge", "--recipe", str(rec), "-o", str(out), "--weights", weights, "--no-prune", "--alpha", "0.4"])
    assert rc == 0, capsys.readouterr().err
    ours = recorded_recipe(out)
    assert (ours["weights"], ours["preset"], ours["prune"], ours["alpha"]) == (weights, None, False, 0.4)
    out2 = tmp_path / "o2.safetensors"
    rec.write_text(json.dumps({"models": [str(models["sd15_a"]), str(models["sd15_b"])], "weights": weights}))
    assert main(["merge", "--recipe", str(rec), "-o", str(out2), "--preset", "GRAD_A"]) == 0
    ours = recorded_recipe(out2)
    assert (ours["weights"], ours["preset"]) == (None, "GRAD_A")


def test_bad_recipe_file_through_the_cli(capsys, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("models: [a.safetensors, b.safetensors]\nalpha: true\n")
    rc = main(["merge", "--recipe", str(rec), "-o", str(tmp_path / "o.safetensors")])
    assert one_error(rc, capsys.readouterr().err) == f"error: alpha must be a number (got true), {rec}"
