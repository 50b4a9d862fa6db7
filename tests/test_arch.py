import json

import pytest
import torch

from lib_merge.arch import ARCHS, block_of, detect, elements_of, legacy_keeps_a, part_of
from lib_merge.errors import MergeError
from lib_merge import synthetic as S

SD1 = ARCHS["sd1"]
XL = ARCHS["sdxl"]


@pytest.mark.parametrize("key,block", [
    ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "BASE"),
    ("first_stage_model.decoder.conv_in.weight", "BASE"),
    ("model.diffusion_model.time_embed.0.weight", "IN00"),
    ("model.diffusion_model.input_blocks.0.0.weight", "IN00"),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "IN01"),
    ("model.diffusion_model.input_blocks.11.0.out_layers.3.weight", "IN11"),
    ("model.diffusion_model.middle_block.0.in_layers.0.weight", "M00"),
    ("model.diffusion_model.middle_block.2.out_layers.3.bias", "M00"),
    ("model.diffusion_model.output_blocks.0.0.skip_connection.weight", "OUT00"),
    ("model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", "OUT05"),
    ("model.diffusion_model.output_blocks.11.1.proj_out.weight", "OUT11"),
    ("model.diffusion_model.out.0.weight", "OUT11"),
    ("model.diffusion_model.out.2.bias", "OUT11"),
])
def test_sd1_blocks(key, block):
    assert key in S.load_listing("sd15")
    assert block_of(key, SD1) == block


@pytest.mark.parametrize("key,block", [
    ("conditioner.embedders.0.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight", "BASE"),
    ("conditioner.embedders.1.model.logit_scale", "BASE"),
    ("model.diffusion_model.label_emb.0.0.weight", "IN00"),
    ("model.diffusion_model.time_embed.2.bias", "IN00"),
    ("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", "IN04"),
    ("model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight", "IN08"),
    ("model.diffusion_model.middle_block.1.transformer_blocks.5.attn1.to_v.weight", "M00"),
    ("model.diffusion_model.output_blocks.8.0.skip_connection.weight", "OUT08"),
    ("model.diffusion_model.out.2.weight", "OUT08"),
])
def test_sdxl_blocks(key, block):
    assert key in S.load_listing("sdxl")
    assert block_of(key, XL) == block


def test_every_key_has_a_known_block():
    for name, arch in (("sd15", SD1), ("sdxl", XL)):
        listing = S.load_listing(name)
        blocks = {block_of(k, arch) for k in listing}
        assert blocks == set(arch.blocks)


def test_elements_and_parts():
    k = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.ff.net.0.proj.weight"
    assert elements_of(k) == ["ff"]
    assert elements_of("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight") == ["attn1"]
    assert "resnet" in elements_of("model.diffusion_model.input_blocks.1.0.in_layers.2.weight")
    assert "proj" in elements_of("model.diffusion_model.input_blocks.1.1.proj_in.weight")
    assert part_of(k) == "unet"
    assert part_of("conditioner.embedders.1.model.ln_final.weight") == "te"
    assert part_of("first_stage_model.encoder.conv_in.bias") == "vae"


def test_detect_each_architecture(sd15_listing, sdxl_listing):
    shapes = lambda L: {k: v[0] for k, v in L.items()}
    assert detect(shapes(sd15_listing)).arch.name == "sd1"
    assert detect(shapes(sdxl_listing)).arch.name == "sdxl"
    assert detect(shapes(S.as_sd2(sd15_listing))).arch.name == "sd2"
    assert detect(shapes(S.with_channels(sd15_listing, 9))).variant == "inpainting"
    assert detect(shapes(S.with_channels(sd15_listing, 8))).variant == "pix2pix"
    assert detect(shapes(sd15_listing)).variant == "normal"


def test_detect_unknown_names_evidence(sd15_listing):
    shapes = {k: v[0] for k, v in sd15_listing.items()}
    with pytest.raises(MergeError, match="no model.diffusion_model"):
        detect({"foo.weight": (3, 3)}, "x.safetensors")
    bad = dict(shapes)
    for k in bad:
        if k.endswith("attn2.to_k.weight"):
            bad[k] = (bad[k][0], 1280)
    with pytest.raises(MergeError, match="cross-attention width 1280 at model.diffusion_model"):
        detect(bad, "x.safetensors")


# -- --supermerger-time-embed-out11: supermerger 2023-07 (0182d3b) .. 2025-11 (before 2cbd062) ----------------

TIME_EMBED = [f"model.diffusion_model.time_embed.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]


@pytest.mark.parametrize("key", TIME_EMBED)
def test_legacy_time_embed_block_sd1(key):
    assert block_of(key, SD1) == "IN00"
    assert block_of(key, SD1, legacy_time_embed=True) == "OUT11"
    assert block_of(key, ARCHS["sd2"], legacy_time_embed=True) == "OUT11"
    assert not legacy_keeps_a(key, SD1)


def test_legacy_switch_moves_only_time_embed():
    moved = [k for k in S.load_listing("sd15") if block_of(k, SD1, True) != block_of(k, SD1)]
    assert sorted(moved) == sorted(TIME_EMBED)


def test_legacy_switch_on_sdxl_keeps_embeddings_from_a():
    listing = S.load_listing("sdxl")
    kept = sorted(k for k in listing if legacy_keeps_a(k, XL))
    assert kept == sorted(k for k in listing if ".time_embed." in k or ".label_emb." in k) and len(kept) == 8
    assert all(block_of(k, XL, legacy_time_embed=True) == "IN00" for k in kept)


def _merge(models, names, out, **kw):
    from lib_merge.merge import merge_to_file, normalize_recipe
    from lib_merge.recipe import Recipe
    return merge_to_file(normalize_recipe(Recipe(models=[str(models[n]) for n in names], **kw)), out)


def test_legacy_switch_gives_time_embed_the_out11_ratio(models, tmp_path):
    from safetensors.torch import load_file
    weights = ",".join(["0.5"] + ["0.1"] * 12 + ["0.5"] + ["0.5"] * 11 + ["0.9"])  # IN00 0.1, OUT11 0.9
    on = _merge(models, ["sd15_a", "sd15_b"], tmp_path / "on.safetensors", weights=weights, dtype="fp32",
                supermerger_time_embed_out11=True)
    _merge(models, ["sd15_a", "sd15_b"], tmp_path / "off.safetensors", weights=weights, dtype="fp32")
    A, B = load_file(str(models["sd15_a"])), load_file(str(models["sd15_b"]))
    O_on, O_off = load_file(str(tmp_path / "on.safetensors")), load_file(str(tmp_path / "off.safetensors"))
    for k in TIME_EMBED:
        a, b = A[k].float(), B[k].float()
        torch.testing.assert_close(O_on[k], 0.1 * a + 0.9 * b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(O_off[k], 0.9 * a + 0.1 * b, rtol=1e-6, atol=1e-7)
    first = "model.diffusion_model.input_blocks.0.0.weight"  # the rest of IN00 keeps IN00's ratio
    assert torch.equal(O_on[first], O_off[first])
    recipe = json.loads(on.metadata["blockmerge_recipe"])
    assert recipe["supermerger_time_embed_out11"] is True
    assert "--supermerger-time-embed-out11: time_embed takes the OUT11 ratio (as supermerger 2023-07 to 2025-11 did)" \
        in on.plan.report.lines()


def test_legacy_switch_on_sdxl_merge(models, tmp_path):
    from safetensors.torch import load_file
    res = _merge(models, ["sdxl_a", "sdxl_b"], tmp_path / "o.safetensors", alpha=0.5,
                 supermerger_time_embed_out11=True)
    A, B, O = (load_file(str(p)) for p in (models["sdxl_a"], models["sdxl_b"], tmp_path / "o.safetensors"))
    for k in O:
        if legacy_keeps_a(k, XL):
            assert torch.equal(O[k], A[k]), k
    k = "model.diffusion_model.out.2.weight"
    torch.testing.assert_close(O[k].float(), (0.5 * A[k].float() + 0.5 * B[k].float()).to(O[k].dtype).float())
    assert ("--supermerger-time-embed-out11: time_embed and label_emb kept from A (as supermerger 2023-07 to "
            "2025-11 did on SDXL)") in res.plan.report.lines()
