"""Merge chains in the live sink: a nested recipe as model A (or B, C) of a test merge. The preview equals the file
merge of the nested recipe, a change re-merges exactly the keys it changes, restore is bit-exact."""
import pytest
import torch

from conftest import load
from lib_merge import synthetic as S
from lib_merge.arch import ARCHS, block_of
from lib_merge.errors import MergeError, MergeInterrupted
from lib_merge.live import CachePolicy, LiveSession, fingerprint
from lib_merge.merge import merge_to_file, normalize_recipe
from lib_merge.recipe import Recipe

from test_live import ModuleTarget

SD1 = ARCHS["sd1"]
IDX = {b: i for i, b in enumerate(SD1.blocks)}


@pytest.fixture(params=[CachePolicy.CPU, CachePolicy.MMAP], ids=lambda p: p.value)
def live(request, models, sd15_listing):
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    session = LiveSession(ModuleTarget(module), models["sd15_a"], cache=request.param)
    yield session, module
    session.close()


def params(module):
    return dict(module.named_parameters())


def m(models, *names):
    return [str(models[n]) for n in names]


def assert_equals_file(module, recipe, tmp_path, name="saved"):
    """Every live parameter equals the file merge of ``recipe`` (fp32 output: the live model is fp32)."""
    out = tmp_path / f"{name}.safetensors"
    merge_to_file(normalize_recipe(Recipe(**{**vars(recipe), "dtype": "fp32", "vae": "a"})), out)
    saved = load(out)
    for k, p in module.named_parameters():
        assert torch.equal(saved[k], p.detach()), k


def test_merge_again_from_the_preview(live, models, tmp_path):
    """Step 1 is live; the next test merge takes it as model A (nested) and merges C on top."""
    session, module = live
    before = fingerprint(params(module))
    step1 = Recipe(models=m(models, "sd15_a", "sd15_b"), alpha=0.3, preset="GRAD_V")
    session.apply(step1)
    chain = Recipe(models=[step1, str(models["sd15_c"])], alpha=0.5)
    session.apply(chain)
    assert_equals_file(module, chain, tmp_path)
    assert session.restore() > 0
    assert fingerprint(params(module)) == before


def test_one_block_of_the_outer_step_re_merges_only_that_block(live, models, tmp_path):
    session, module = live
    step1 = Recipe(models=m(models, "sd15_a", "sd15_b"), alpha=0.3)
    vec = ["0.5"] * 26
    session.apply(Recipe(models=[step1, str(models["sd15_c"])], weights=",".join(vec)))
    vec[IDX["OUT05"]] = "0.9"
    chain = Recipe(models=[step1, str(models["sd15_c"])], weights=",".join(vec))
    rep = session.apply(chain)
    out05 = [k for k in session.keys if block_of(k, SD1) == "OUT05"]
    assert rep.written == len(out05) and rep.unchanged == len(session.keys) - len(out05)
    assert_equals_file(module, chain, tmp_path)


def test_a_change_inside_the_step_re_merges_the_keys_it_changes(live, models, tmp_path):
    session, module = live
    inner = ["0.3"] * 26
    step = Recipe(models=m(models, "sd15_a", "sd15_b"), weights=",".join(inner))
    session.apply(Recipe(models=[step, str(models["sd15_c"])], alpha=0.5))
    inner[IDX["IN04"]] = "0.8"
    step2 = Recipe(models=m(models, "sd15_a", "sd15_b"), weights=",".join(inner))
    chain = Recipe(models=[step2, str(models["sd15_c"])], alpha=0.5)
    rep = session.apply(chain)
    in04 = [k for k in session.keys if block_of(k, SD1) == "IN04"]
    assert rep.written == len(in04)
    assert_equals_file(module, chain, tmp_path)


def test_outer_ratio_zero_keeps_the_step_not_the_loaded_weights(live, models, tmp_path):
    """With a nested A, "keep A" means the step's value: keys at ratio 0 are written with it."""
    session, module = live
    step = Recipe(models=m(models, "sd15_a", "sd15_b"), alpha=0.5)
    chain = Recipe(models=[step, str(models["sd15_c"])], alpha=0.0)
    session.apply(chain)
    assert_equals_file(module, chain, tmp_path)
    out = tmp_path / "step.safetensors"  # the step's own file (its dtype: keep, as in the chain)
    merge_to_file(normalize_recipe(step), out)
    saved = load(out)
    for k, p in module.named_parameters():
        assert torch.equal(saved[k].float(), p.detach()), k


@pytest.mark.parametrize("outer", [
    dict(method="slerp", alpha=0.4),
    dict(mode="add_difference", alpha=0.7),
    dict(adjust=[0.2, 0, 0, 0.1, 0, 0, 0, 0], alpha=0.5),
])
def test_whole_tensor_steps_and_outer_methods(live, models, tmp_path, outer):
    session, module = live
    ties = Recipe(models=m(models, "sd15_a", "sd15_b", "sd15_c"), mode="ties", alpha=0.9, params={"density": 0.4})
    names = ["sd15_b", "sd15_c"] if outer.get("mode") == "add_difference" else ["sd15_b"]
    chain = Recipe(models=[ties, *m(models, *names)], **outer)
    session.apply(chain)
    assert_equals_file(module, chain, tmp_path)


def test_a_nested_recipe_as_model_b(live, models, tmp_path):
    session, module = live
    b = Recipe(models=m(models, "sd15_b", "sd15_c"), alpha=0.6, method="slerp")
    chain = Recipe(models=[str(models["sd15_a"]), b], preset="GRAD_A")
    session.apply(chain)
    assert_equals_file(module, chain, tmp_path)


def test_interrupted_chain_rolls_back_to_the_previous_merge(live, models):
    session, module = live
    step = Recipe(models=m(models, "sd15_a", "sd15_b"), alpha=0.3)
    session.apply(step)
    merged = fingerprint(params(module))
    calls = []
    with pytest.raises(MergeInterrupted):
        session.apply(Recipe(models=[step, str(models["sd15_c"])], alpha=0.7),
                      cancel=lambda: calls.append(1) or len(calls) > 30)
    assert fingerprint(params(module)) == merged and session.recipe == step


def test_the_chain_must_start_from_the_loaded_checkpoint(live, models):
    session, module = live
    step = Recipe(models=m(models, "sd15_b", "sd15_a"))
    with pytest.raises(MergeError, match="model A of a test merge must be the loaded checkpoint.*sd15_b"):
        session.apply(Recipe(models=[step, str(models["sd15_c"])]))
    bad = Recipe(models=[str(models["sd15_a"]), str(models["sdxl_b"])])
    with pytest.raises(MergeError, match="in the recipe of model B: architectures differ"):
        session.apply(Recipe(models=[str(models["sd15_a"]), bad]))


def test_seeds_drawn_inside_a_step_are_recorded_and_re_merges_stay_put(live, models, tmp_path):
    """Random ratios in a nested step without a seed: the seed drawn is recorded in the session's recipe, so the
    recorded chain re-applies with nothing to write and its file merge equals the preview."""
    session, module = live
    step = Recipe(models=m(models, "sd15_a", "sd15_b"), weights=",".join(["R"] * 26))
    session.apply(Recipe(models=[step, str(models["sd15_c"])], alpha=0.5))
    recorded = session.recipe
    assert recorded.seed is None and isinstance(recorded.models[0].seed, int)
    assert session.apply(recorded).written == 0
    assert_equals_file(module, recorded, tmp_path)
