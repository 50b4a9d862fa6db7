"""LoRA second slice (issue 13): LoHa / LoKr / LoCon-mid bake, diffusers-style names, OpenCLIP text encoders
(SD2, SDXL te2: q/k/v into thirds of the joined in_proj_weight), unsupported kinds."""
from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import save_file

from lib_merge import synthetic as S
from lib_merge.errors import MergeError
from lib_merge.lora.bake import LoraInput, bake_loras
from lib_merge.lora.extract import extract_lora
from lib_merge.lora.files import read_lora
from lib_merge.lora.names import diffusers_to_compvis, module_map
from tests.conftest import load

UNET = "model.diffusion_model."
LIN = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV3 = UNET + "input_blocks.1.0.in_layers.2.weight"
LIN_NAME = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
CONV3_NAME = "lora_unet_input_blocks_1_0_in_layers_2"
SD2_TE = "cond_stage_model.model.transformer.resblocks."
XL_TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers."
XL_TE2 = "conditioner.embedders.1.model.transformer.resblocks."


@pytest.fixture(scope="module")
def wide(tmp_path_factory, sd15_listing):
    """Tiny SD1.5 with LIN widened to (4, 6) and CONV3 to (4, 6, 3, 3), so Kronecker factors are not trivial."""
    listing = dict(sd15_listing)
    listing[LIN] = ((4, 6), listing[LIN][1])
    listing[CONV3] = ((4, 6, 3, 3), listing[CONV3][1])
    return S.write_checkpoint(tmp_path_factory.mktemp("wide") / "wide.safetensors", listing, seed=50)


@pytest.fixture(scope="module")
def sd2_full(tmp_path_factory, sd15_listing):
    """Tiny SD2 whose OpenCLIP resblocks also carry out_proj and mlp c_fc / c_proj, as real SD2 files do."""
    listing = S.as_sd2(sd15_listing)
    d = listing[SD2_TE + "0.ln_1.weight"][0][0]
    for i in range(2):
        p = f"{SD2_TE}{i}."
        listing[p + "attn.out_proj.weight"] = ((d, d), "F16")
        listing[p + "mlp.c_fc.weight"] = ((4 * d, d), "F16")
        listing[p + "mlp.c_proj.weight"] = ((d, 4 * d), "F16")
    base = tmp_path_factory.mktemp("sd2")
    return (S.write_checkpoint(base / "sd2_a.safetensors", listing, seed=60),
            S.write_checkpoint(base / "sd2_b.safetensors", listing, seed=61))


def rnd(g, *shape):
    return torch.randn(*shape, generator=g)


def save(path, tensors: dict[str, torch.Tensor]):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


def bake_one(model, lora, tmp_path, strength=1.0, tag="o"):
    out = tmp_path / f"baked_{tag}.safetensors"
    bake_loras(model, [LoraInput(lora, strength)], out)
    return load(out)


def assert_only_changed(base, got, changed: set[str]):
    for k in base:
        if k not in changed:
            assert torch.equal(got[k], base[k]), k


# -- LoHa ----------------------------------------------------------------------------------------------------
def test_loha_linear_and_conv3x3_equal_the_hadamard_formula(wide, tmp_path):
    g = torch.Generator().manual_seed(1)
    r = 2
    lin = {"hada_w1_a": rnd(g, 4, r), "hada_w1_b": rnd(g, r, 6), "hada_w2_a": rnd(g, 4, r),
           "hada_w2_b": rnd(g, r, 6), "alpha": torch.tensor(1.0)}
    conv = {"hada_w1_a": rnd(g, 4, r), "hada_w1_b": rnd(g, r, 54), "hada_w2_a": rnd(g, 4, r),
            "hada_w2_b": rnd(g, r, 54)}  # LyCORIS stores a conv's w*_b flattened; no alpha: scale 1
    lora = save(tmp_path / "loha.safetensors", {**{f"{LIN_NAME}.{k}": v for k, v in lin.items()},
                                               **{f"{CONV3_NAME}.{k}": v for k, v in conv.items()}})
    base, got = load(wide), bake_one(wide, lora, tmp_path, 0.8)
    d_lin = (lin["hada_w1_a"] @ lin["hada_w1_b"]) * (lin["hada_w2_a"] @ lin["hada_w2_b"]) * (1.0 / r)
    d_conv = ((conv["hada_w1_a"] @ conv["hada_w1_b"]) * (conv["hada_w2_a"] @ conv["hada_w2_b"])).reshape(4, 6, 3, 3)
    for key, d in ((LIN, d_lin), (CONV3, d_conv)):
        want = (base[key].float() + 0.8 * d).half()
        torch.testing.assert_close(got[key], want, rtol=0, atol=2e-3, msg=key)
    assert_only_changed(base, got, {LIN, CONV3})


def test_loha_cp_conv_equals_the_tucker_sum(wide, tmp_path):
    g = torch.Generator().manual_seed(2)
    r = 2
    t = {"hada_t1": rnd(g, r, r, 3, 3), "hada_w1_a": rnd(g, r, 4), "hada_w1_b": rnd(g, r, 6),
         "hada_t2": rnd(g, r, r, 3, 3), "hada_w2_a": rnd(g, r, 4), "hada_w2_b": rnd(g, r, 6),
         "alpha": torch.tensor(3.0)}
    lora = save(tmp_path / "cp.safetensors", {f"{CONV3_NAME}.{k}": v for k, v in t.items()})
    base, got = load(wide), bake_one(wide, lora, tmp_path)

    def half(tc, wa, wb):  # Σ_ij t[i,j,h,w] · wa[i,o] · wb[j,c], written out
        out = torch.zeros(4, 6, 3, 3)
        for o, c, i, j in itertools.product(range(4), range(6), range(r), range(r)):
            out[o, c] += tc[i, j] * wa[i, o] * wb[j, c]
        return out

    d = half(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * half(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    want = (base[CONV3].float() + d * 3.0 / r).half()
    torch.testing.assert_close(got[CONV3], want, rtol=0, atol=1e-2)
    assert_only_changed(base, got, {CONV3})


# -- LoKr ----------------------------------------------------------------------------------------------------
def kron_by_hand(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """ΔW[i·c + p, j·d + q, …] = w1[i, j] · w2[p, q, …]."""
    a, b = w1.shape
    c, d = w2.shape[:2]
    out = torch.zeros(a * c, b * d, *w2.shape[2:])
    for i, j, p, q in itertools.product(range(a), range(b), range(c), range(d)):
        out[i * c + p, j * d + q] = w1[i, j] * w2[p, q]
    return out


def test_lokr_full_matrices_ignore_alpha(wide, tmp_path):
    g = torch.Generator().manual_seed(3)
    w1, w2, w2c = rnd(g, 2, 3), rnd(g, 2, 2), rnd(g, 2, 2, 3, 3)
    lora = save(tmp_path / "lokr.safetensors", {
        f"{LIN_NAME}.lokr_w1": w1, f"{LIN_NAME}.lokr_w2": w2, f"{LIN_NAME}.alpha": torch.tensor(7.0),
        f"{CONV3_NAME}.lokr_w1": w1, f"{CONV3_NAME}.lokr_w2": w2c})
    base, got = load(wide), bake_one(wide, lora, tmp_path, -0.5)
    for key, d in ((LIN, kron_by_hand(w1, w2)), (CONV3, kron_by_hand(w1, w2c))):
        want = (base[key].float() - 0.5 * d).half()  # neither side factored: scale 1 whatever alpha says
        torch.testing.assert_close(got[key], want, rtol=0, atol=2e-3, msg=key)
    assert_only_changed(base, got, {LIN, CONV3})


def test_lokr_factored_scale_is_alpha_over_the_factored_rank(wide, tmp_path):
    g = torch.Generator().manual_seed(4)
    w1, w2a, w2b = rnd(g, 2, 3), rnd(g, 2, 1), rnd(g, 1, 2)  # w2 factored, rank 1
    w1a, w1b, w2a_c, w2b_c = rnd(g, 2, 2), rnd(g, 2, 3), rnd(g, 2, 3), rnd(g, 3, 18)  # both factored: w2's rank 3
    lora = save(tmp_path / "lokr.safetensors", {
        f"{LIN_NAME}.lokr_w1": w1, f"{LIN_NAME}.lokr_w2_a": w2a, f"{LIN_NAME}.lokr_w2_b": w2b,
        f"{LIN_NAME}.alpha": torch.tensor(0.5),
        f"{CONV3_NAME}.lokr_w1_a": w1a, f"{CONV3_NAME}.lokr_w1_b": w1b, f"{CONV3_NAME}.lokr_w2_a": w2a_c,
        f"{CONV3_NAME}.lokr_w2_b": w2b_c, f"{CONV3_NAME}.alpha": torch.tensor(1.5)})
    base, got = load(wide), bake_one(wide, lora, tmp_path)
    d_lin = kron_by_hand(w1, w2a @ w2b) * 0.5 / 1
    d_conv = kron_by_hand(w1a @ w1b, (w2a_c @ w2b_c).reshape(2, 2, 3, 3)) * 1.5 / 3
    for key, d in ((LIN, d_lin), (CONV3, d_conv)):
        torch.testing.assert_close(got[key], (base[key].float() + d).half(), rtol=0, atol=2e-3, msg=key)


def test_lokr_cp_w2_is_the_tucker_product(wide, tmp_path):
    g = torch.Generator().manual_seed(10)
    r = 2
    w1, t2, w2a, w2b = rnd(g, 2, 3), rnd(g, r, r, 3, 3), rnd(g, r, 2), rnd(g, r, 2)
    lora = save(tmp_path / "lokr_cp.safetensors", {
        f"{CONV3_NAME}.lokr_w1": w1, f"{CONV3_NAME}.lokr_t2": t2, f"{CONV3_NAME}.lokr_w2_a": w2a,
        f"{CONV3_NAME}.lokr_w2_b": w2b, f"{CONV3_NAME}.alpha": torch.tensor(1.0)})
    base, got = load(wide), bake_one(wide, lora, tmp_path)
    w2 = torch.zeros(2, 2, 3, 3)
    for o, c, i, j in itertools.product(range(2), range(2), range(r), range(r)):
        w2[o, c] += t2[i, j] * w2a[i, o] * w2b[j, c]
    d = kron_by_hand(w1, w2) * 1.0 / r
    torch.testing.assert_close(got[CONV3], (base[CONV3].float() + d).half(), rtol=0, atol=2e-3)


def test_locon_mid_equals_the_cp_formula(wide, tmp_path):
    g = torch.Generator().manual_seed(5)
    up, mid, down = rnd(g, 4, 2, 1, 1), rnd(g, 2, 2, 3, 3), rnd(g, 2, 6, 1, 1)
    lora = save(tmp_path / "locon.safetensors", {f"{CONV3_NAME}.lora_up.weight": up,
                                                f"{CONV3_NAME}.lora_mid.weight": mid,
                                                f"{CONV3_NAME}.lora_down.weight": down,
                                                f"{CONV3_NAME}.alpha": torch.tensor(1.0)})
    base, got = load(wide), bake_one(wide, lora, tmp_path)
    d = torch.zeros(4, 6, 3, 3)
    for o, c, i, j in itertools.product(range(4), range(6), range(2), range(2)):
        d[o, c] += up[o, i, 0, 0] * mid[i, j] * down[j, c, 0, 0]
    torch.testing.assert_close(got[CONV3], (base[CONV3].float() + d / 2).half(), rtol=0, atol=1e-2)


# -- diffusers-style names -----------------------------------------------------------------------------------
DIFFUSERS = {  # diffusers-style -> compvis-style (the WebUI's conversion, SD1/SD2 UNet)
    "lora_unet_down_blocks_0_attentions_0_proj_in": "lora_unet_input_blocks_1_1_proj_in",
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k":
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_0_resnets_1_conv1": "lora_unet_input_blocks_2_0_in_layers_2",
    "lora_unet_down_blocks_2_resnets_0_conv_shortcut": "lora_unet_input_blocks_7_0_skip_connection",
    "lora_unet_down_blocks_1_downsamplers_0_conv": "lora_unet_input_blocks_6_0_op",
    "lora_unet_mid_block_attentions_0_proj_out": "lora_unet_middle_block_1_proj_out",
    "lora_unet_mid_block_resnets_1_time_emb_proj": "lora_unet_middle_block_2_emb_layers_1",
    "lora_unet_up_blocks_0_resnets_2_conv2": "lora_unet_output_blocks_2_0_out_layers_3",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2":
        "lora_unet_output_blocks_5_1_transformer_blocks_0_ff_net_2",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "lora_unet_output_blocks_2_1_conv",
    "lora_unet_up_blocks_2_upsamplers_0_conv": "lora_unet_output_blocks_8_2_conv",
    "lora_unet_conv_in": "lora_unet_input_blocks_0_0",
    "lora_unet_conv_out": "lora_unet_out_2",
    "lora_unet_time_embedding_linear_2": "lora_unet_time_embed_2",
}


def test_diffusers_names_convert_to_existing_compvis_modules(sd15_listing):
    table = module_map({k: s for k, (s, _) in sd15_listing.items()})
    for diffusers, compvis in DIFFUSERS.items():
        assert diffusers_to_compvis(diffusers) == compvis
        assert compvis in table, compvis
    assert diffusers_to_compvis("lora_unet_input_blocks_1_1_proj_in") is None
    assert diffusers_to_compvis("lora_te_text_model_encoder_layers_0_mlp_fc1") is None


def test_diffusers_style_names_bake_like_compvis_names(models, sd15_listing, tmp_path):
    table = module_map({k: s for k, (s, _) in sd15_listing.items()})
    g = torch.Generator().manual_seed(6)
    diff, comp = {}, {}
    for dname, cname in DIFFUSERS.items():
        shape = sd15_listing[table[cname].key][0]
        up = rnd(g, shape[0], 2, *([1, 1] if len(shape) == 4 else []))
        down = rnd(g, 2, *shape[1:])
        for tensors, name in ((diff, dname), (comp, cname)):
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.alpha"] = torch.tensor(1.0)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # the same in both styles on SD1
    diff[f"{te}.lora_up.weight"] = comp[f"{te}.lora_up.weight"] = rnd(g, 3, 1)
    diff[f"{te}.lora_down.weight"] = comp[f"{te}.lora_down.weight"] = rnd(g, 1, 3)
    got_d = bake_one(models["sd15_a"], save(tmp_path / "d.safetensors", diff), tmp_path, 0.7, "d")
    got_c = bake_one(models["sd15_a"], save(tmp_path / "c.safetensors", comp), tmp_path, 0.7, "c")
    base = load(models["sd15_a"])
    changed = {table[c].key for c in DIFFUSERS.values()} | {table[te].key}
    assert len(changed) == len(DIFFUSERS) + 1
    for k in base:
        assert torch.equal(got_d[k], got_c[k]), k
        assert torch.equal(got_d[k], base[k]) != (k in changed), k


def test_sd1_accepts_te1_names_for_its_text_encoder(models, tmp_path):
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc2.weight"
    base = load(models["sd15_a"])
    name = "lora_te1_text_model_encoder_layers_0_mlp_fc2"
    t = _linear_lora(torch.Generator().manual_seed(11), name, *base[key].shape)
    got = bake_one(models["sd15_a"], save(tmp_path / "te1.safetensors", t), tmp_path)
    torch.testing.assert_close(got[key], (base[key].float() + _delta(t, name)).half(), rtol=0, atol=2e-3)
    assert_only_changed(base, got, {key})


def test_sdxl_diffusers_upsampler_and_add_embedding_find_their_weights(sdxl_listing):
    from lib_merge.lora.names import resolve
    table = module_map({k: s for k, (s, _) in sdxl_listing.items()})
    expect = {"lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.2.conv",
              "lora_unet_up_blocks_1_upsamplers_0_conv": "output_blocks.5.2.conv",
              "lora_unet_add_embedding_linear_1": "label_emb.0.0",
              "lora_unet_add_embedding_linear_2": "label_emb.0.2",
              "lora_unet_down_blocks_1_attentions_0_proj_in": "input_blocks.4.1.proj_in",
              "lora_unet_up_blocks_2_resnets_2_conv2": "output_blocks.8.0.out_layers.3"}
    for name, body in expect.items():
        assert resolve(name, table).key == f"{UNET}{body}.weight", name


# -- OpenCLIP text encoders ----------------------------------------------------------------------------------
def _linear_lora(g, name, rows, cols, alpha=None):
    t = {f"{name}.lora_up.weight": rnd(g, rows, 1), f"{name}.lora_down.weight": rnd(g, 1, cols)}
    if alpha is not None:
        t[f"{name}.alpha"] = torch.tensor(alpha)
    return t


def _delta(t, name, scale=1.0):
    return t[f"{name}.lora_up.weight"] @ t[f"{name}.lora_down.weight"] * scale


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_sd2_single_qkv_module_lands_in_its_third_only(sd2_full, tmp_path, which):
    a, _ = sd2_full
    key = SD2_TE + "1.attn.in_proj_weight"
    base = load(a)
    d = base[key].shape[1]
    g = torch.Generator().manual_seed(7)
    name = f"lora_te_text_model_encoder_layers_1_self_attn_{which}_proj"
    t = _linear_lora(g, name, d, d, alpha=0.5)
    got = bake_one(a, save(tmp_path / "q.safetensors", t), tmp_path, 2.0)
    i = "qkv".index(which)
    rows = slice(i * d, (i + 1) * d)
    want = (base[key][rows].float() + 2.0 * _delta(t, name, 0.5)).half()
    torch.testing.assert_close(got[key][rows], want, rtol=0, atol=2e-3)
    assert not torch.equal(got[key][rows], base[key][rows])
    for j in {0, 1, 2} - {i}:
        assert torch.equal(got[key][j * d:(j + 1) * d], base[key][j * d:(j + 1) * d])  # bit-exact
    assert_only_changed(base, got, {key})


def test_sd2_qkv_out_and_mlp_map_to_openclip_weights(sd2_full, tmp_path):
    a, _ = sd2_full
    base = load(a)
    d = base[SD2_TE + "0.ln_1.weight"].shape[0]
    g = torch.Generator().manual_seed(8)
    p = "lora_te_text_model_encoder_layers_0_"
    spec = {"self_attn_q_proj": (d, d), "self_attn_k_proj": (d, d), "self_attn_v_proj": (d, d),
            "self_attn_out_proj": (d, d), "mlp_fc1": (4 * d, d), "mlp_fc2": (d, 4 * d)}
    t = {}
    for n, (r, c) in spec.items():
        t.update(_linear_lora(g, p + n, r, c))
    got = bake_one(a, save(tmp_path / "te.safetensors", t), tmp_path)
    qkv = torch.cat([_delta(t, p + f"self_attn_{x}_proj") for x in "qkv"])
    expect = {SD2_TE + "0.attn.in_proj_weight": qkv,
              SD2_TE + "0.attn.out_proj.weight": _delta(t, p + "self_attn_out_proj"),
              SD2_TE + "0.mlp.c_fc.weight": _delta(t, p + "mlp_fc1"),
              SD2_TE + "0.mlp.c_proj.weight": _delta(t, p + "mlp_fc2")}
    for key, dw in expect.items():
        torch.testing.assert_close(got[key], (base[key].float() + dw).half(), rtol=0, atol=2e-3, msg=key)
    assert_only_changed(base, got, set(expect))


def test_sdxl_te1_and_te2(models, tmp_path):
    base = load(models["sdxl_a"])
    g = torch.Generator().manual_seed(9)
    in_proj = XL_TE2 + "0.attn.in_proj_weight"
    d = base[in_proj].shape[1]
    third = base[in_proj].shape[0] // 3
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    te2_v = "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"
    te2_fc2 = "lora_te2_text_model_encoder_layers_0_mlp_fc2"
    fc2_shape = base[XL_TE2 + "0.mlp.c_proj.weight"].shape
    q_shape = base[XL_TE1 + "0.self_attn.q_proj.weight"].shape
    t = {**_linear_lora(g, te1, *q_shape), **_linear_lora(g, te2_v, third, d, alpha=2.0),
         **_linear_lora(g, te2_fc2, *fc2_shape)}
    got = bake_one(models["sdxl_a"], save(tmp_path / "xl.safetensors", t), tmp_path)
    k1 = XL_TE1 + "0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[k1], (base[k1].float() + _delta(t, te1)).half(), rtol=0, atol=2e-3)
    torch.testing.assert_close(got[in_proj][2 * third:], (base[in_proj][2 * third:].float()
                                                          + _delta(t, te2_v, 2.0)).half(), rtol=0, atol=2e-3)
    assert torch.equal(got[in_proj][:2 * third], base[in_proj][:2 * third])
    k3 = XL_TE2 + "0.mlp.c_proj.weight"
    torch.testing.assert_close(got[k3], (base[k3].float() + _delta(t, te2_fc2)).half(), rtol=0, atol=2e-3)
    assert_only_changed(base, got, {k1, in_proj, k3})


def test_sd2_text_encoder_extract_splits_qkv_and_bakes_back(sd2_full, tmp_path):
    a, b = sd2_full
    lora = tmp_path / "full.safetensors"
    res = extract_lora(b, a, lora, rank=10_000, dtype="fp32", text_encoder=True)
    names = {m.name for m in res.modules}
    for x in ("q", "k", "v", "out"):
        assert f"lora_te_text_model_encoder_layers_1_self_attn_{x}_proj" in names
    assert "lora_te_text_model_encoder_layers_0_mlp_fc2" in names and res.uncovered_te == 0
    mods = read_lora(lora)
    assert mods["lora_te_text_model_encoder_layers_0_self_attn_k_proj"].dims() == (3, 3)
    baked = tmp_path / "baked.safetensors"
    bake_loras(a, [LoraInput(lora)], baked)
    got, tuned, orig = load(baked), load(b), load(a)
    covered = {m.key for m in res.modules}
    assert SD2_TE + "0.attn.in_proj_weight" in covered
    for k in orig:
        if k in covered:
            torch.testing.assert_close(got[k].float(), tuned[k].float(), rtol=0, atol=2e-4, msg=k)
        else:
            assert torch.equal(got[k], orig[k]), k


# -- errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parts,kind", [
    ({"lora_up.weight": (3, 1), "lora_down.weight": (1, 3), "dora_scale": (3, 1)}, "DoRA"),
    ({"a1.weight": (3, 1), "a2.weight": (1, 3), "b1.weight": (3, 1), "b2.weight": (1, 3)}, "GLoRA"),
    ({"weight": (3,), "on_input": ()}, "IA3"),
    ({"oft_blocks": (1, 3, 3)}, "OFT"),
    ({"diff": (3, 3)}, "full"),
    ({"w_norm": (3,), "b_norm": (3,)}, "norm"),
    ({"mystery": (3,)}, "unknown"),
])
def test_unsupported_kinds_are_errors_naming_file_module_and_kind(models, tmp_path, parts, kind):
    lora = save(tmp_path / "odd.safetensors", {f"{LIN_NAME}.{p}": torch.ones(s) for p, s in parts.items()})
    out = tmp_path / "o.safetensors"
    with pytest.raises(MergeError, match=rf"unsupported LoRA module kind {kind}.*odd\.safetensors module {LIN_NAME}$"):
        bake_loras(models["sd15_a"], [LoraInput(lora)], out)
    assert not out.exists()


def test_broken_lyco_modules_are_errors(wide, tmp_path):
    out = tmp_path / "o.safetensors"
    cases = [
        ({"hada_w1_a": (4, 2), "hada_w1_b": (2, 6), "hada_w2_a": (4, 2)}, r"LoHa module has no hada_w2_b"),
        ({"lokr_w1": (2, 3), "lokr_w2_a": (2, 1)}, r"LoKr module has no lokr_w2_b"),
        ({"hada_w1_a": (4, 2), "hada_w1_b": (3, 6), "hada_w2_a": (4, 2), "hada_w2_b": (2, 6)},
         r"LoHa module factors do not fit \(hada_w1_a \(4, 2\), hada_w1_b \(3, 6\)"),
        ({"hada_w1_a": (4, 2), "hada_w1_b": (2, 6), "lokr_w1": (2, 3)}, r"mixes tensors of different kinds"),
        ({"lokr_w1": (2, 3), "lokr_w2": (2, 3)}, r"does not fit the model weight .*\(4, 6\) \(ΔW 4×9, needs 4×6\)"),
    ]
    for parts, message in cases:
        lora = save(tmp_path / "b.safetensors", {f"{LIN_NAME}.{p}": torch.ones(s) for p, s in parts.items()})
        with pytest.raises(MergeError, match=f"{message}.*b\\.safetensors module {LIN_NAME}"):
            bake_loras(wide, [LoraInput(lora)], out)
    assert not out.exists()


def test_qkv_that_does_not_fit_its_third_names_it(sd2_full, tmp_path):
    a, _ = sd2_full
    name = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
    lora = save(tmp_path / "v.safetensors", _linear_lora(torch.Generator().manual_seed(1), name, 9, 3))
    with pytest.raises(MergeError, match=rf"in_proj_weight \(9, 3\) \(v third of the joined in_proj\) "
                                         rf"\(ΔW 9×3, needs 3×3\).*module {name}"):
        bake_loras(a, [LoraInput(lora)], tmp_path / "o.safetensors")


def test_plain_lora_dims_are_read_off_the_factors():
    from lib_merge.lora.kinds import LoraModule
    lin = LoraModule("lora_unet_x", torch.randn(6, 2), torch.randn(2, 5), 2.0)
    conv = LoraModule("lora_unet_y", torch.randn(6, 2, 1, 1), torch.randn(2, 4, 3, 3), 1.0)
    for mod in (lin, conv):
        assert mod.dims() == tuple(mod.delta().shape)
    assert conv.dims() == (6, 36)
