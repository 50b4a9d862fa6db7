"""``--swap-ab``: A and B swap and each ratio r becomes 1 - r, so the result is the formula with the roles the
user gave, while the model with the extra input channels (inpainting / pix2pix) given as B becomes the base."""
import json

import pytest
import torch

from conftest import f32, load
from lib_merge.errors import MergeError
from lib_merge.merge import merge_to_file, normalize_recipe
from lib_merge.methods.modes import inv_sigmoid_ratio, sigmoid_ratio
from lib_merge.plan import is_never_merged
from lib_merge.recipe import Recipe
from lib_merge.reproduce import reproduce

FIRST = "model.diffusion_model.input_blocks.0.0.weight"
POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
T_OF = {"weighted_sum": lambda t: t, "sigmoid": sigmoid_ratio, "inv_sigmoid": inv_sigmoid_ratio}


def run(models, names, out, **kw):
    recipe = normalize_recipe(Recipe(models=[str(models[n]) for n in names], **kw))
    return merge_to_file(recipe, out)


def close(got, want, key):
    torch.testing.assert_close(f32(got), f32(want), rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("extra,channels", [("inpaint", 9), ("pix2pix", 8)])
@pytest.mark.parametrize("mode", ["weighted_sum", "sigmoid", "inv_sigmoid"])
def test_extra_channel_model_as_b_with_swap(models, out_dir, extra, channels, mode):
    out = out_dir / "o.safetensors"
    res = run(models, ["sd15_a", extra], out, mode=mode, alpha=0.3, dtype="fp32", swap_ab=True)
    A, B, O = load(models["sd15_a"]), load(models[extra]), load(out)
    t = T_OF[mode](0.3)
    # the formula with the user's roles: A + (B - A)·t, on the 4 shared channels of the first conv ...
    assert O[FIRST].shape == B[FIRST].shape and B[FIRST].shape[1] == channels
    close(O[FIRST][:, :4], f32(A[FIRST]) + (f32(B[FIRST][:, :4]) - f32(A[FIRST])) * t, FIRST)
    # ... and the extra channels are the inpainting/pix2pix model's, bit-exact
    assert torch.equal(O[FIRST][:, 4:], f32(B[FIRST][:, 4:]))
    merged = 0
    for k, o in O.items():
        if k == FIRST:
            continue
        if is_never_merged(k) or not A[k].is_floating_point():
            assert torch.equal(o, B[k]), k  # kept keys come from the new A: the model given as B
            continue
        close(o, f32(A[k]) + (f32(B[k]) - f32(A[k])) * t, k)
        merged += 1
    assert merged > 1000
    meta = json.loads(res.metadata["sd_merge_recipe"])
    assert meta["is_inpainting" if extra == "inpaint" else "is_instruct_pix2pix"] is True
    ours = json.loads(res.metadata["blockmerge_recipe"])
    assert ours["swap_ab"] is True and [i["name"] for i in ours["inputs"]] == ["sd15_a.safetensors", f"{extra}.safetensors"]
    assert any(n.startswith(f"--swap-ab: A and B swapped (A is now {extra}.safetensors), every ratio r became 1 - r")
               for n in res.plan.report.lines())


@pytest.mark.parametrize("extra,variant,channels", [("inpaint", "inpainting", 9), ("pix2pix", "pix2pix", 8)])
def test_extra_channel_model_as_b_without_swap_is_an_error(models, out_dir, extra, variant, channels):
    out = out_dir / "o.safetensors"
    with pytest.raises(MergeError, match=rf"model B is the {variant} model \({channels}-channel first conv\) and A "
                                         rf"is not: put it first \(or use --swap-ab\), .*{extra}.safetensors"):
        run(models, ["sd15_a", extra], out)
    assert not out.exists()


def test_swap_when_a_is_already_the_inpainting_model_is_an_error(models, out_dir):
    with pytest.raises(MergeError, match=r"--swap-ab would make the inpainting model B \(9-channel first conv\); "
                                         r"it is A already: drop --swap-ab, .*inpaint.safetensors"):
        run(models, ["inpaint", "sd15_a"], out_dir / "o.safetensors", swap_ab=True)


def test_swap_of_two_normal_models_swaps_the_base(models, out_dir):
    """Whenever given, --swap-ab swaps: merged values follow the formula with the user's roles; the keys that are
    never merged (position ids, …) come from the model given as B."""
    out = out_dir / "o.safetensors"
    run(models, ["sd15_a", "sd15_b"], out, alpha=0.25, dtype="fp32", swap_ab=True)
    A, B, O = load(models["sd15_a"]), load(models["sd15_b"]), load(out)
    assert torch.equal(O[POS], B[POS])
    for k in (FIRST, "model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_in.weight"):
        close(O[k], 0.75 * f32(A[k]) + 0.25 * f32(B[k]), k)


def test_swap_only_for_two_model_modes(models, out_dir):
    with pytest.raises(MergeError, match="--swap-ab works with weighted_sum, sigmoid and inv_sigmoid only, "
                                         "not add_difference"):
        run(models, ["sd15_a", "inpaint", "sd15_c"], out_dir / "o.safetensors", mode="add_difference", swap_ab=True)


def test_swapped_merge_reproduces(models, out_dir):
    out = out_dir / "o.safetensors"
    run(models, ["sd15_a", "inpaint"], out, alpha=0.3, preset="GRAD_V", swap_ab=True)
    ok, new, detail = reproduce(str(out))
    assert ok, detail


def test_live_test_merge_refuses_swap(models, sd15_listing):
    """A test merge writes only merged keys into the loaded checkpoint (A): a swapped base cannot be shown."""
    from lib_merge import synthetic as S
    from lib_merge.live import LiveSession
    from test_live import ModuleTarget
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    session = LiveSession(ModuleTarget(module), models["sd15_a"])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(MergeError, match="swap_ab is for file merges: a test merge's A is the loaded checkpoint"):
        session.apply(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.3, swap_ab=True))
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
