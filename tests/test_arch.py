import pytest

from lib_merge.arch import ARCHS, block_of, detect, elements_of, part_of
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
