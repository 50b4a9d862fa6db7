"""Merge chains: a recipe where a model goes, computed in the same streamed pass; equal bit for bit to saving each
step and merging the saved files."""
import json
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load
from lib_merge.cli import main
from lib_merge.errors import MergeError
from lib_merge.merge import merge_to_file, normalize_recipe
from lib_merge.recipe import MAX_CHAIN_DEPTH, Recipe, load_recipe_file
from lib_merge.reproduce import reproduce
from lib_merge.io.sources import open_source


def same_tensors(p, q):
    """Every tensor of file ``p`` equals ``q``'s bit for bit (the metadata differs: it records the chain)."""
    x, y = load(p), load(q)
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        assert x[k].reshape(-1).view(torch.uint8).tolist() == y[k].reshape(-1).view(torch.uint8).tolist(), k


def stepwise(tmp_path, outer: Recipe, name="step"):
    """Save each nested recipe to a file first, then merge the saved files: what the chain must equal."""
    models = []
    for i, m in enumerate(outer.models):
        if isinstance(m, Recipe):
            saved = tmp_path / f"{name}{i}.safetensors"
            merge_to_file(normalize_recipe(stepwise(tmp_path, m, f"{name}{i}_")), saved)
            models.append(str(saved))
        else:
            models.append(m)
    return Recipe(**{**vars(outer), "models": models})


def chain_equals_steps(tmp_path, recipe: Recipe, **kw):
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))
    out = tmp_path / "chain.safetensors"
    res = merge_to_file(normalize_recipe(recipe), out, **kw)
    ref = tmp_path / "steps.safetensors"
    merge_to_file(normalize_recipe(stepwise(tmp_path, recipe)), ref)
    same_tensors(out, ref)
    return res


def m(models, *names):
    return [str(models[n]) for n in names]


@pytest.mark.parametrize("dtype", ["fp32", "keep", "fp16"])
def test_two_step_chain_equals_saving_the_step(tmp_path, models, dtype):
    step = Recipe(models=m(models, "sd15_a", "sd15_b"), alpha=0.3, preset="GRAD_V", dtype=dtype)
    chain_equals_steps(tmp_path, Recipe(models=[step, str(models["sd15_c"])], alpha=0.6, dtype=dtype))


def test_nested_recipe_as_b_and_c_of_add_difference(tmp_path, models):
    b = Recipe(models=m(models, "sd15_b", "sd15_c"), alpha=0.7, dtype="fp32")
    c = Recipe(models=m(models, "sd15_c", "sd15_a", "sd15_b"), mode="add_difference", alpha=0.5,
               weights="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1,0,0.1,0.2,0.3,0.4,0.5,0.6")
    chain_equals_steps(tmp_path, Recipe(models=[str(models["sd15_a"]), b, c], mode="add_difference", alpha=1.0))


def test_three_levels_deep(tmp_path, models):
    inner = Recipe(models=m(models, "sd15_a", "sd15_b"), alpha=0.25)
    middle = Recipe(models=[inner, str(models["sd15_c"])], alpha=0.5, method="slerp")
    chain_equals_steps(tmp_path, Recipe(models=[middle, str(models["sd15_b"])], alpha=0.4, elemental="OUT05:attn2:0.9"))


def test_whole_tensor_methods_and_adjust_inside_a_chain(tmp_path, models):
    """Non-elementwise steps (TIES over 4 models, SLERP, Adjust) are computed whole, then read in chunks."""
    ties = Recipe(models=m(models, "sd15_a", "sd15_b", "sd15_c", "leftovers"), mode="ties", alpha=0.8,
                  params={"density": 0.3}, adjust=[0.1, 0, 0, 0.2, 0, 0, 0, 0])
    chain_equals_steps(tmp_path, Recipe(models=[ties, str(models["sd15_b"])], method="slerp", alpha=0.5))
    dare = Recipe(models=m(models, "sd15_a", "sd15_b", "sd15_c"), mode="dare", alpha=1.0,
                  params={"density": 0.5}, seed=7)
    chain_equals_steps(tmp_path, Recipe(models=[str(models["sd15_c"]), dare], alpha=0.5))


def test_chain_over_4_model_ties_with_a_nested_model_inside(tmp_path, models):
    step = Recipe(models=m(models, "sd15_b", "sd15_c"), alpha=0.5)
    chain_equals_steps(tmp_path, Recipe(models=[*m(models, "sd15_a", "sd15_b"), step, str(models["sd15_c"])],
                                        mode="ties", alpha=1.0, params={"density": 0.2}))


def test_sdxl_chain_and_threads_do_not_change_bytes(tmp_path, models):
    step = Recipe(models=m(models, "sdxl_a", "sdxl_b"), alpha=0.3, preset="GRAD_V")
    r = Recipe(models=[step, str(models["sdxl_c"])], alpha=0.5)
    one = merge_to_file(normalize_recipe(r), tmp_path / "t1.safetensors", threads=1, output_name="t")
    four = merge_to_file(normalize_recipe(r), tmp_path / "t4.safetensors", threads=4, output_name="t")
    assert one.sha256 == four.sha256
    chain_equals_steps(tmp_path, r)


def test_random_weights_in_a_step_are_drawn_recorded_and_reproduced(tmp_path, models):
    step = Recipe(models=m(models, "sd15_a", "sd15_b"), weights=",".join(["R"] * 26))
    out = tmp_path / "rand.safetensors"
    merge_to_file(normalize_recipe(Recipe(models=[step, str(models["sd15_c"])])), out)
    with open_source(out) as src:
        ours = json.loads(src.metadata["blockmerge_recipe"])
    inner = ours["models"][0]["recipe"]
    assert isinstance(inner["seed"], int) and inner["resolved"]["random"]["seed"] == inner["seed"]
    ok, new, msg = reproduce(str(out))
    assert ok, msg


def test_metadata_records_the_tree_and_every_leaf(tmp_path, models):
    step = Recipe(models=m(models, "sd15_a", "sd15_b"), alpha=0.3)
    out = tmp_path / "tree.safetensors"
    merge_to_file(normalize_recipe(Recipe(models=[step, str(models["sd15_c"])], alpha=0.5)), out)
    with open_source(out) as src:
        meta = src.metadata
    ours = json.loads(meta["blockmerge_recipe"])
    assert ours["models"][1] == "sd15_c.safetensors"
    inner = ours["models"][0]["recipe"]
    assert inner["models"] == ["sd15_a.safetensors", "sd15_b.safetensors"] and inner["alpha"] == 0.3
    assert inner["resolved"]["arch"] == "sd1" and "version" not in inner
    assert [(i["role"], i["name"]) for i in ours["inputs"]] == [
        ("a.a", "sd15_a.safetensors"), ("a.b", "sd15_b.safetensors"), ("b", "sd15_c.safetensors")]
    lineage = json.loads(meta["sd_merge_models"])
    assert sorted(v["name"] for v in lineage.values()) == ["sd15_a.safetensors", "sd15_b.safetensors",
                                                            "sd15_c.safetensors"]
    webui = json.loads(meta["sd_merge_recipe"])
    assert webui["primary_model_hash"] is None and webui["secondary_model_hash"] == ours["inputs"][2]["sha256"]
    # the recorded recipe reads back as the same tree
    back = Recipe.from_dict(ours, "metadata")
    assert isinstance(back.models[0], Recipe) and back.models[0].alpha == 0.3


def test_reproduce_rebuilds_a_chain_bit_identically(tmp_path, models):
    step = Recipe(models=m(models, "sd15_a", "sd15_b"), alpha=0.3, lora=[])
    deep = Recipe(models=[step, str(models["sd15_c"])], mode="weighted_sum", method="slerp", alpha=0.4)
    out = tmp_path / "deep.safetensors"
    merge_to_file(normalize_recipe(Recipe(models=[str(models["sd15_b"]), deep], alpha=0.7, dtype="fp16")), out)
    ok, new, msg = reproduce(str(out))
    assert ok and new.exists(), msg


def test_the_same_file_in_several_steps_is_fine(tmp_path, models):
    step = Recipe(models=m(models, "sd15_a", "sd15_b"), alpha=0.5)
    chain_equals_steps(tmp_path, Recipe(models=[step, str(models["sd15_a"])], alpha=0.5))


def test_a_leaf_of_another_architecture_is_named(tmp_path, models):
    step = Recipe(models=m(models, "sdxl_a", "sdxl_b"))
    with pytest.raises(MergeError) as e:
        merge_to_file(normalize_recipe(Recipe(models=[str(models["sd15_a"]), step])), tmp_path / "x.safetensors")
    assert "architectures differ" in str(e.value) and "sdxl_a.safetensors" in str(e.value)
    inner = Recipe(models=m(models, "sd15_a", "sdxl_b"))
    with pytest.raises(MergeError) as e:
        merge_to_file(normalize_recipe(Recipe(models=[inner, str(models["sd15_c"])])), tmp_path / "y.safetensors")
    msg = str(e.value)
    assert msg.startswith("in the recipe of model A: architectures differ") and "sdxl_b.safetensors" in msg
    assert not list(tmp_path.glob("*.safetensors"))


def test_an_error_inside_a_step_names_the_step(models):
    bad = {"models": [{"recipe": {"models": [str(models["sd15_a"])], "mode": "weighted_sum"}}, str(models["sd15_b"])]}
    with pytest.raises(MergeError) as e:
        Recipe.from_dict(bad).validate()
    assert str(e.value).startswith("in the recipe of model A: mode weighted_sum takes 2 models")


def test_output_may_not_overwrite_a_leaf(tmp_path, models):
    step = Recipe(models=m(models, "sd15_a", "sd15_b"))
    with pytest.raises(MergeError, match="output would overwrite an input model"):
        merge_to_file(normalize_recipe(Recipe(models=[step, str(models["sd15_c"])])), models["sd15_b"],
                      overwrite=True)


def test_recipe_dict_forms_and_limits(models):
    r = Recipe.from_dict({"models": [{"recipe": {"models": m(models, "sd15_a", "sd15_b")}}, str(models["sd15_c"])]})
    assert isinstance(r.models[0], Recipe) and r.to_dict()["models"][0]["recipe"]["models"][1].endswith("sd15_b.safetensors")
    with pytest.raises(MergeError, match=r"models\[0\] has an unknown field 'path' beside 'recipe'"):
        Recipe.from_dict({"models": [{"recipe": {}, "path": "x"}, "y"]})
    with pytest.raises(MergeError, match=r"recipe must be an object .* got str, models\[0\]\.recipe"):
        Recipe.from_dict({"models": [{"recipe": "step.yaml"}, "y"]})  # a file name only in recipe files
    deep: dict = {"models": ["x", "y"]}
    for _ in range(MAX_CHAIN_DEPTH + 1):
        deep = {"models": [{"recipe": deep}, "y"]}
    with pytest.raises(MergeError, match=f"nested more than {MAX_CHAIN_DEPTH} deep"):
        Recipe.from_dict(deep)


def test_recipe_files_nest_by_name_relative_to_the_file(tmp_path, models):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "step1.yaml").write_text(yaml.safe_dump(
        {"models": [str(models["sd15_a"]), str(models["sd15_b"])], "alpha": 0.3}))
    (tmp_path / "top.json").write_text(json.dumps(
        {"models": [{"recipe": "sub/step1.yaml"}, str(models["sd15_c"])], "alpha": 0.5}))
    r = load_recipe_file(tmp_path / "top.json")
    assert isinstance(r.models[0], Recipe) and r.models[0].alpha == 0.3
    (tmp_path / "loop.json").write_text(json.dumps({"models": [{"recipe": "loop.json"}, "x"]}))
    with pytest.raises(MergeError, match="recipe includes itself"):
        load_recipe_file(tmp_path / "loop.json")


def test_cli_takes_a_recipe_file_where_a_model_goes(tmp_path, models, capsys):
    step = tmp_path / "step1.yaml"
    step.write_text(yaml.safe_dump({"models": [str(models["sd15_a"]), str(models["sd15_b"])], "alpha": 0.3}))
    out = tmp_path / "cli.safetensors"
    assert main(["merge", f"@{step}", str(models["sd15_c"]), "-o", str(out), "--alpha", "0.6"]) == 0
    ref = tmp_path / "ref.safetensors"
    merge_to_file(normalize_recipe(Recipe(models=[load_recipe_file(step), str(models["sd15_c"])], alpha=0.6)), ref)
    same_tensors(out, ref)
    capsys.readouterr()
    assert main(["merge", f"@{tmp_path / 'missing.yaml'}", str(models["sd15_c"]), "-o",
                 str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read recipe") and "missing.yaml" in err and err.count("\n") == 1


def test_inspect_shows_the_chain(tmp_path, models, capsys):
    step = Recipe(models=m(models, "sd15_a", "sd15_b"), preset="GRAD_V")
    out = tmp_path / "chain.safetensors"
    merge_to_file(normalize_recipe(Recipe(models=[step, str(models["sd15_c"])], alpha=0.5)), out)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "models:       [weighted_sum linear GRAD_V: sd15_a.safetensors, sd15_b.safetensors], sd15_c.safetensors" in text
