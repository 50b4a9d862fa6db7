"""End-to-end file merges on tiny checkpoints with the real key names, checked against the formulas."""
import json

import pytest
import torch

from lib_merge.methods import bind
from lib_merge.methods.modes import MODES

from conftest import f32, load
from lib_merge import presets
from lib_merge.arch import ARCHS, block_of
from lib_merge.elemental import apply_rules, parse_rules
from lib_merge.errors import MergeError
from lib_merge.merge import merge_to_file, normalize_recipe
from lib_merge.methods.modes import inv_sigmoid_ratio, sigmoid_ratio
from lib_merge.plan import is_never_merged
from lib_merge.recipe import RECIPE_VERSION, Recipe

SD1, XL = ARCHS["sd1"], ARCHS["sdxl"]
POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"

FORMULAS = {
    "weighted_sum": lambda a, b, c, x, y: (1 - x) * a + x * b,
    "add_difference": lambda a, b, c, x, y: a + x * (b - c),
    "triple_sum": lambda a, b, c, x, y: (1 - x - y) * a + x * b + y * c,
    "sum_twice": lambda a, b, c, x, y: (1 - y) * ((1 - x) * a + x * b) + y * c,
    "sigmoid": lambda a, b, c, x, y: a + (b - a) * sigmoid_ratio(x),
    "inv_sigmoid": lambda a, b, c, x, y: a + (b - a) * inv_sigmoid_ratio(x),
}


def run(models, names, out, **kw):
    recipe = normalize_recipe(Recipe(models=[str(models[n]) for n in names], **kw))
    return merge_to_file(recipe, out)


def check_against(result_path, paths, mode, ratio_of, arch=SD1, out_dtype=None, beta_of=None):
    """Every merged key equals the formula (fp32), every never-merged key equals A bit-exact."""
    A, *rest = [load(p) for p in paths]
    B = rest[0] if rest else None
    C = rest[1] if len(rest) > 1 else None
    O = load(result_path)
    assert set(O) == set(A)
    n = 0
    for k, o in O.items():
        if is_never_merged(k) or not A[k].is_floating_point():
            assert torch.equal(o, A[k]), k
            continue
        block = block_of(k, arch)
        x = ratio_of(k, block)
        y = beta_of(k, block) if beta_of else 0.25
        want = FORMULAS[mode](f32(A[k]), f32(B[k]), f32(C[k]) if C is not None else None, x, y)
        want = want.to(out_dtype or A[k].dtype)
        assert o.dtype == want.dtype, k
        torch.testing.assert_close(f32(o), f32(want), rtol=2e-3 if o.dtype == torch.float16 else 1e-6,
                                   atol=1e-3 if o.dtype == torch.float16 else 1e-7, msg=k)
        n += 1
    assert n > 500


@pytest.mark.parametrize("mode,names", [
    ("weighted_sum", "ab"), ("add_difference", "abc"), ("triple_sum", "abc"), ("sum_twice", "abc"),
    ("sigmoid", "ab"), ("inv_sigmoid", "ab"),
])
def test_each_mode_matches_formula(models, out_dir, mode, names):
    paths = [models[f"sd15_{n}"] for n in names]
    out = out_dir / "o.safetensors"
    run(models, [f"sd15_{n}" for n in names], out, mode=mode, alpha=0.3, beta=0.2, dtype="fp32")
    check_against(out, paths, mode, lambda k, b: 0.3, out_dtype=torch.float32, beta_of=lambda k, b: 0.2)


def test_no_interpolation_copies_a_bit_exact(models, out_dir):
    out = out_dir / "o.safetensors"
    run(models, ["sd15_a"], out, mode="no_interpolation")
    A, O = load(models["sd15_a"]), load(out)
    assert set(A) == set(O) and all(torch.equal(A[k], O[k]) for k in A)


@pytest.mark.parametrize("name", sorted(MODES))
def test_identity_ratios_give_a_bit_exact(name):
    """The live sink skips keys where ``is_identity``: the formula must yield A itself there (ratio 0 for every
    mode), and must not where a ratio moves the weights."""
    m = MODES[name]
    n = 3 if m.variadic else m.models
    f = bind(name, "linear", {}, seed=1, models=n)
    g = torch.Generator().manual_seed(0)
    assert f.is_identity(0.0, 0.0) == m.per_key_ratio  # linear_combination reads no ratio
    for alpha in (0.0, 0.3, 1.0):
        for beta in (0.0, 0.2):
            ins = [torch.randn(64, generator=g) for _ in range(n)]
            a0 = ins[0].clone()
            out = f.compute_all(ins, alpha, beta, "k.weight")
            assert f.is_identity(alpha, beta) == torch.equal(out, a0), (name, alpha, beta)


def test_mode_wrong_model_count(models, out_dir):
    with pytest.raises(MergeError, match=r"mode add_difference takes 3 models \(A B C\), got 2"):
        run(models, ["sd15_a", "sd15_b"], out_dir / "o.safetensors", mode="add_difference")
    assert not (out_dir / "o.safetensors").exists()


def test_fp16_output_within_one_ulp_of_fp32_formula(models, out_dir):
    out = out_dir / "o.safetensors"
    run(models, ["sd15_a", "sd15_b"], out, alpha=0.3)  # dtype keep: fp16 like A
    A, B, O = load(models["sd15_a"]), load(models["sd15_b"]), load(out)
    for k in O:
        if O[k].dtype == torch.float16:
            want = ((1 - 0.3) * f32(A[k]) + 0.3 * f32(B[k])).half()
            assert (f32(O[k]) - f32(want)).abs().max() <= 2 * torch.finfo(torch.float16).eps * max(1, f32(want).abs().max()), k


def test_preset_per_block(models, out_dir):
    out = out_dir / "o.safetensors"
    run(models, ["sd15_a", "sd15_b"], out, preset="GRAD_V", dtype="fp32", alpha=0.9)
    vec = presets.resolve("GRAD_V", SD1)
    check_against(out, [models["sd15_a"], models["sd15_b"]], "weighted_sum",
                  lambda k, b: vec[SD1.blocks.index(b)], out_dtype=torch.float32)


def test_25_value_string_uses_alpha_for_base(models, out_dir):
    vals = [round(0.04 * i, 2) for i in range(1, 26)]
    out = out_dir / "o.safetensors"
    res = run(models, ["sd15_a", "sd15_b"], out, weights=",".join(map(str, vals)), alpha=0.7, dtype="fp32")
    vec = [0.7] + vals
    check_against(out, [models["sd15_a"], models["sd15_b"]], "weighted_sum",
                  lambda k, b: vec[SD1.blocks.index(b)], out_dtype=torch.float32)
    recorded = json.loads(res.metadata["blockmerge_recipe"])
    assert recorded["resolved"]["weights_alpha"] == vec


def test_sdxl_26_and_20_value_strings(models, out_dir):
    v26 = [round(i / 25, 4) for i in range(26)]
    out = out_dir / "o.safetensors"
    run(models, ["sdxl_a", "sdxl_b"], out, weights=",".join(map(str, v26)), dtype="fp32")
    xl = [v26[i] for i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
    check_against(out, [models["sdxl_a"], models["sdxl_b"]], "weighted_sum",
                  lambda k, b: xl[XL.blocks.index(b)], arch=XL, out_dtype=torch.float32)
    v20 = [round(1 - i / 19, 4) for i in range(20)]
    out2 = out_dir / "o2.safetensors"
    run(models, ["sdxl_a", "sdxl_b"], out2, weights=",".join(map(str, v20)), dtype="fp32")
    check_against(out2, [models["sdxl_a"], models["sdxl_b"]], "weighted_sum",
                  lambda k, b: v20[XL.blocks.index(b)], arch=XL, out_dtype=torch.float32)
    O = load(out2)
    assert O["conditioner.embedders.1.model.logit_scale"].shape == ()  # 0-dim merges like the others


def test_elemental_rules_with_block_weights(models, out_dir):
    rules_text = "OUT03-OUT05:attn2:0.2\nNOT OUT00-OUT11:ff.net:1\nOUT04:attn2.to_k:0.9"
    out = out_dir / "o.safetensors"
    run(models, ["sd15_a", "sd15_b"], out, preset="GRAD_A", elemental=rules_text, dtype="fp32")
    vec = presets.resolve("GRAD_A", SD1)
    rules = parse_rules(rules_text, SD1)
    ratio = lambda k, b: apply_rules(rules, k, b, vec[SD1.blocks.index(b)])
    assert ratio("model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "OUT04") == 0.9
    assert ratio("model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_q.weight", "OUT04") == 0.2
    assert ratio("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.2.weight", "IN04") == 1
    check_against(out, [models["sd15_a"], models["sd15_b"]], "weighted_sum", ratio, out_dtype=torch.float32)


def test_inv_sigmoid_ratio_outside_unit_names_block(models, out_dir):
    with pytest.raises(MergeError, match=r"inv_sigmoid: ratio 1.5 is outside \[0, 1\], block OUT05"):
        run(models, ["sd15_a", "sd15_b"], out_dir / "o.safetensors", mode="inv_sigmoid",
            elemental="OUT05::1.5")


def test_position_ids_and_ints_untouched(models, out_dir):
    out = out_dir / "o.safetensors"
    run(models, ["sd15_a", "sd15_b"], out, alpha=1.0, dtype="fp16")
    A, B, O = load(models["sd15_a"]), load(models["sd15_b"]), load(out)
    assert O[POS].dtype == torch.int64 and torch.equal(O[POS], A[POS])
    k = "model.diffusion_model.out.2.weight"
    assert torch.equal(O[k], B[k])  # alpha 1 gives B exactly


def test_dtype_options(models, out_dir):
    for dt, want in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("fp16", torch.float16)):
        out = out_dir / f"o_{dt}.safetensors"
        run(models, ["sd15_a", "sd15_b"], out, dtype=dt)
        O = load(out)
        assert {t.dtype for k, t in O.items() if k != POS} == {want}


def test_inpainting_first_conv(models, out_dir):
    out = out_dir / "o.safetensors"
    res = run(models, ["inpaint", "sd15_b"], out, alpha=0.4, dtype="fp32")
    A, B, O = load(models["inpaint"]), load(models["sd15_b"]), load(out)
    k = "model.diffusion_model.input_blocks.0.0.weight"
    assert O[k].shape == A[k].shape and A[k].shape[1] == 9
    torch.testing.assert_close(O[k][:, :4], 0.6 * f32(A[k][:, :4]) + 0.4 * f32(B[k]), rtol=1e-6, atol=1e-7)
    assert torch.equal(O[k][:, 4:], f32(A[k][:, 4:]))
    assert json.loads(res.metadata["sd_merge_recipe"])["is_inpainting"] is True


def test_inpainting_as_b_is_an_error_unless_swap(models, out_dir):
    out = out_dir / "o.safetensors"
    with pytest.raises(MergeError, match="model B is the inpainting model .* put it first"):
        run(models, ["sd15_a", "inpaint"], out)
    assert not out.exists()
    # with consent: swap, ratios become 1 - r; the result equals merging (inpaint, a) at 1 - alpha
    run(models, ["sd15_a", "inpaint"], out, alpha=0.3, dtype="fp32", swap_ab=True)
    ref = out_dir / "ref.safetensors"
    run(models, ["inpaint", "sd15_a"], ref, alpha=0.7, dtype="fp32")
    O, R = load(out), load(ref)
    assert all(torch.equal(O[k], R[k]) for k in O)


def test_pix2pix_first_conv(models, out_dir):
    out = out_dir / "o.safetensors"
    run(models, ["pix2pix", "sd15_b"], out, alpha=1.0)
    A, B, O = load(models["pix2pix"]), load(models["sd15_b"]), load(out)
    k = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(O[k][:, :4], B[k]) and torch.equal(O[k][:, 4:], A[k][:, 4:])


def test_sd2_merges(models, out_dir):
    out = out_dir / "o.safetensors"
    run(models, ["sd2_a", "sd2_b"], out, preset="GRAD_V", dtype="fp32")
    vec = presets.resolve("GRAD_V", SD1)
    check_against(out, [models["sd2_a"], models["sd2_b"]], "weighted_sum", lambda k, b: vec[SD1.blocks.index(b)],
                  arch=ARCHS["sd2"], out_dtype=torch.float32)


def test_mismatched_architectures(models, out_dir):
    out = out_dir / "o.safetensors"
    with pytest.raises(MergeError, match="architectures differ: A is SD1.x, .*sdxl_b.safetensors is SDXL"):
        run(models, ["sd15_a", "sdxl_b"], out)
    assert not out.exists()
    res = run(models, ["sd15_a", "sd2_b"], out, force=True, alpha=1.0)
    A, B, O = load(models["sd15_a"]), load(models["sd2_b"]), load(out)
    k_same = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"
    k_diff = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(O[k_same], B[k_same]) and torch.equal(O[k_diff], A[k_diff])
    assert any("--force" in line for line in res.plan.report.lines())
    assert k_diff in res.plan.report.forced


def test_vae_options(models, out_dir):
    vk = "first_stage_model.decoder.conv_in.weight"
    A, B = load(models["sd15_a"]), load(models["sd15_b"])
    for choice, want in (("a", A[vk]), ("b", B[vk])):
        out = out_dir / f"vae_{choice}.safetensors"
        run(models, ["sd15_a", "sd15_b"], out, vae=choice)
        assert torch.equal(load(out)[vk], want)
    out = out_dir / "vae_merge.safetensors"
    run(models, ["sd15_a", "sd15_b"], out, preset="ALL_A", weights=None, vae="merge")
    assert torch.equal(load(out)[vk], A[vk])  # BASE ratio 0
    out_b = out_dir / "vae_merge_b.safetensors"
    run(models, ["sd15_a", "sd15_b"], out_b, preset="ALL_B", vae="merge")
    assert torch.equal(load(out_b)[vk], B[vk])  # BASE ratio 1


def test_include_exclude(models, out_dir):
    out = out_dir / "o.safetensors"
    run(models, ["sd15_a", "sd15_b"], out, alpha=1.0, include="te,IN00-IN02", exclude="IN01")
    A, B, O = load(models["sd15_a"]), load(models["sd15_b"]), load(out)
    for k in O:
        if is_never_merged(k):
            continue
        block = block_of(k, SD1)
        te = k.startswith("cond_stage_model.")
        merged = te or (k.startswith("model.diffusion_model.") and block in ("IN00", "IN02"))
        assert torch.equal(O[k], B[k] if merged else A[k]), k
    with pytest.raises(MergeError, match="unknown part 'IN99'"):
        run(models, ["sd15_a", "sd15_b"], out_dir / "x.safetensors", include="IN99")


def test_keys_only_in_a_or_b_reported(models, out_dir, tmp_path, sd15_listing):
    from lib_merge import synthetic as S
    smaller = dict(sd15_listing)
    gone = "model.diffusion_model.output_blocks.3.1.proj_out.bias"
    del smaller[gone]
    extra = dict(sd15_listing)
    extra["model.diffusion_model.extra.weight"] = ((3,), "F16")
    b = S.write_checkpoint(tmp_path / "b_small.safetensors", smaller, 7)
    b2 = S.write_checkpoint(tmp_path / "b_extra.safetensors", extra, 8)
    res = merge_to_file(Recipe(models=[str(models["sd15_a"]), str(b)]), out_dir / "o.safetensors")
    assert res.plan.report.only_a == [gone]
    assert torch.equal(load(out_dir / "o.safetensors")[gone], load(models["sd15_a"])[gone])
    res = merge_to_file(Recipe(models=[str(models["sd15_a"]), str(b2)]), out_dir / "o2.safetensors")
    assert res.plan.report.only_b == ["model.diffusion_model.extra.weight"]
    assert "model.diffusion_model.extra.weight" not in load(out_dir / "o2.safetensors")
    merge_to_file(Recipe(models=[str(models["sd15_a"]), str(b2)], copy_b_only=True), out_dir / "o3.safetensors")
    assert torch.equal(load(out_dir / "o3.safetensors")["model.diffusion_model.extra.weight"],
                       load(b2)["model.diffusion_model.extra.weight"])


def test_prune_drops_ema_and_schedule(models, out_dir):
    out = out_dir / "o.safetensors"
    run(models, ["leftovers", "leftovers_b"], out)
    O = load(out)
    assert "alphas_cumprod" in O and any(k.startswith("model_ema.") for k in O)
    assert torch.equal(O["alphas_cumprod"], load(models["leftovers"])["alphas_cumprod"])  # never merged
    run(models, ["leftovers", "leftovers_b"], out_dir / "p.safetensors", prune=True)
    P = load(out_dir / "p.safetensors")
    assert "alphas_cumprod" not in P and not any(k.startswith("model_ema.") for k in P)
    assert len(P) == len(O) - 12 - sum(1 for k in O if k.startswith("model_ema."))


def test_bake_vae(models, out_dir, tmp_path):
    from safetensors.torch import save_file
    A = load(models["sd15_a"])
    vae = {k[len("first_stage_model."):]: torch.full_like(v, 0.125) for k, v in A.items() if k.startswith("first_stage_model.")}
    vae["loss.logvar"] = torch.zeros(1)
    save_file(vae, str(tmp_path / "vae.safetensors"))
    out = out_dir / "o.safetensors"
    res = run(models, ["sd15_a", "sd15_b"], out, bake_vae=str(tmp_path / "vae.safetensors"))
    O = load(out)
    assert all(torch.equal(O[k], torch.full_like(A[k], 0.125)) for k in A if k.startswith("first_stage_model."))
    assert "loss.logvar" not in O
    assert json.loads(res.metadata["sd_merge_recipe"])["bake_in_vae"] == "vae.safetensors"  # the WebUI names VAEs by file name
    bad = dict(vae)
    bad["decoder.conv_in.weight"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad_vae.safetensors"))
    with pytest.raises(MergeError, match="--bake-vae: shape .* differs .*decoder.conv_in.weight"):
        run(models, ["sd15_a", "sd15_b"], out_dir / "x.safetensors", bake_vae=str(tmp_path / "bad_vae.safetensors"))


def test_metadata_and_lineage(models, out_dir):
    from lib_merge import hashing
    first = out_dir / "first.safetensors"
    run(models, ["sd15_a", "sd15_b"], first, alpha=0.25)
    second = out_dir / "second.safetensors"
    res = merge_to_file(normalize_recipe(Recipe(models=[str(first), str(models["sd15_c"])], preset="GRAD_V")), second)
    raw = open(second, "rb").read(9)
    assert raw[8:9] == b"{" and open(second, "rb").read(10)[8:10] == b'{"'
    hlen = int.from_bytes(raw[:8], "little")
    assert hlen % 8 == 0
    meta = res.metadata
    assert meta["format"] == "pt"
    sd = json.loads(meta["sd_merge_recipe"])
    assert sd["type"] == "blockmerge" and sd["interp_method"] == "Weighted sum"
    assert sd["primary_model_hash"] == hashing.sha256_file(first)
    assert sd["secondary_model_hash"] == hashing.sha256_file(models["sd15_c"])
    assert sd["tertiary_model_hash"] is None
    lineage = json.loads(meta["sd_merge_models"])
    # the first merge's own inputs are chained in
    assert hashing.sha256_file(models["sd15_a"]) in lineage and hashing.sha256_file(first) in lineage
    assert lineage[hashing.sha256_file(first)]["sd_merge_recipe"]["multiplier"] == 0.25
    ours = json.loads(meta["blockmerge_recipe"])
    assert ours["version"] == RECIPE_VERSION and ours["preset"] == "GRAD_V"
    assert ours["resolved"]["weights_alpha"] == presets.resolve("GRAD_V", SD1)
    import hashlib
    assert res.sha256 == hashlib.sha256(open(second, "rb").read()).hexdigest()


def test_same_recipe_same_bytes(models, out_dir):
    a, b = out_dir / "1.safetensors", out_dir / "2.safetensors"
    run(models, ["sd15_a", "sd15_b"], a, preset="COSINE")
    r1 = run(models, ["sd15_a", "sd15_b"], b, preset="COSINE")
    assert r1.sha256 != "" and open(a, "rb").read()[200:] == open(b, "rb").read()[200:]


def test_reproduce_identical(models, out_dir, tmp_path):
    from lib_merge.reproduce import reproduce
    out = out_dir / "m.safetensors"
    run(models, ["sd15_a", "sd15_b", "sd15_c"], out, mode="add_difference", alpha=0.7, elemental="IN01::0.1")
    ok, new, detail = reproduce(str(out))
    assert ok, detail
    assert new.name == "m.reproduced.safetensors" and open(new, "rb").read() == open(out, "rb").read()
    rec = json.loads(load_meta(out)["blockmerge_recipe"])
    assert rec["models"] == ["sd15_a.safetensors", "sd15_b.safetensors", "sd15_c.safetensors"]  # names, no folders
    with pytest.raises(MergeError, match="output exists"):
        reproduce(str(out))


def load_meta(path):
    from lib_merge.io.sources import open_source
    with open_source(path) as s:
        return s.metadata


def test_reproduce_finds_moved_inputs(tmp_path, sd15_listing):
    import shutil
    from lib_merge import synthetic as S
    from lib_merge.reproduce import reproduce
    src = tmp_path / "src"
    src.mkdir()
    a = S.write_checkpoint(src / "a.safetensors", sd15_listing, 1)
    b = S.write_checkpoint(src / "b.safetensors", sd15_listing, 2)
    out = tmp_path / "out.safetensors"
    merge_to_file(normalize_recipe(Recipe(models=[str(a), str(b)], preset="GRAD_A")), out)
    store = tmp_path / "store" / "sub"
    store.mkdir(parents=True)
    shutil.move(str(a), store / "renamed_a.safetensors")
    shutil.move(str(b), store / "renamed_b.safetensors")
    with pytest.raises(MergeError, match="input A not found"):
        reproduce(str(out))
    ok, new, detail = reproduce(str(out), search=[str(tmp_path / "store")])
    assert ok, detail


def test_fp8_and_bf16_inputs_compute_in_fp32(tmp_path, sd15_listing):
    from lib_merge import synthetic as S
    fp8 = {k: (shape, "F8_E4M3" if dt == "F16" else dt) for k, (shape, dt) in sd15_listing.items()}
    bf16 = {k: (shape, "BF16" if dt == "F16" else dt) for k, (shape, dt) in sd15_listing.items()}
    a = S.write_checkpoint(tmp_path / "a8.safetensors", fp8, 1)
    b = S.write_checkpoint(tmp_path / "b16.safetensors", bf16, 2)
    out = tmp_path / "o.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b)], alpha=0.25, dtype="fp32"), out)
    A, B, O = load(a), load(b), load(out)
    k = "model.diffusion_model.output_blocks.2.1.conv.weight"
    assert A[k].dtype == torch.float8_e4m3fn and B[k].dtype == torch.bfloat16
    torch.testing.assert_close(O[k], 0.75 * f32(A[k]) + 0.25 * f32(B[k]), rtol=1e-6, atol=1e-7)
    keep = tmp_path / "keep.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b)], alpha=0.25), keep)
    assert load(keep)[k].dtype == torch.float8_e4m3fn  # keep: A's dtype per key
