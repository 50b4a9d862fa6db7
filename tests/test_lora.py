"""LoRA first slice (issue 13): extract (SVD of TUNED − BASE) and bake (W + s·up@down·alpha/rank)."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_merge import hashing
from lib_merge.cli import main
from lib_merge.errors import MergeError
from lib_merge.lora.bake import LoraInput, bake_loras, parse_lora_arg
from lib_merge.lora.extract import extract_lora
from lib_merge.lora.files import read_lora
from lib_merge.lora.names import module_name
from tests.conftest import load

UNET = "model.diffusion_model."
LIN = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"  # (3, 3) Linear
TE_LIN = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"  # (3, 3)
CONV1 = UNET + "input_blocks.1.1.proj_in.weight"  # (3, 3, 1, 1): SD1's proj_in is a 1×1 conv
CONV3 = UNET + "input_blocks.1.0.in_layers.2.weight"  # (3, 3, 3, 3)


@functools.lru_cache(maxsize=8)
def _cached(path) -> dict[str, torch.Tensor]:
    return load(path)


def delta_of(models, tuned, base, key):
    return _cached(models[tuned])[key].float() - _cached(models[base])[key].float()


def lora_delta(lora: dict, name: str, shape) -> torch.Tensor:
    up = lora[name + ".lora_up.weight"].float()
    down = lora[name + ".lora_down.weight"].float()
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


# -- names ---------------------------------------------------------------------------------------------------
def test_module_names_follow_the_compvis_convention():
    assert module_name(CONV1) == "lora_unet_input_blocks_1_1_proj_in"
    assert module_name(TE_LIN) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert (module_name("conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc1.weight")
            == "lora_te1_text_model_encoder_layers_3_mlp_fc1")
    assert module_name("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight") is None  # q/k/v
    assert (module_name("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight")
            == "lora_te2_text_model_encoder_layers_0_mlp_fc1")
    assert module_name(UNET + "out.2.bias") is None


def test_extracted_file_reads_back_with_compvis_names_and_metadata(models, tmp_path):
    out = tmp_path / "x.safetensors"
    res = extract_lora(models["sd15_b"], models["sd15_a"], out, rank=2, text_encoder=True)
    mods = read_lora(out)
    by_name = {m.name: m for m in res.modules}
    assert set(mods) == set(by_name) and "lora_unet_input_blocks_1_1_proj_in" in mods
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in mods
    for name, m in by_name.items():
        assert module_name(m.key) == name
        assert mods[name].alpha == m.rank and mods[name].up.dtype == torch.float16
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2"
    recipe = json.loads(meta["blockmerge_recipe"])
    assert recipe["lora"] == "extract" and recipe["rank"] == 2
    assert recipe["inputs"][0] == {"role": "tuned", "name": "sd15_b.safetensors",
                                   "sha256": hashing.sha256_file(models["sd15_b"])}


def test_unet_only_by_default_and_sdxl_te1_te2_names(models, tmp_path):
    res = extract_lora(models["sdxl_b"], models["sdxl_a"], tmp_path / "u.safetensors", rank=1)
    assert res.modules and all(m.name.startswith("lora_unet_") for m in res.modules)
    res = extract_lora(models["sdxl_b"], models["sdxl_a"], tmp_path / "t.safetensors", rank=1, text_encoder=True)
    te = [m.name for m in res.modules if not m.name.startswith("lora_unet_")]
    assert {n.split("_text_model_")[0] for n in te} == {"lora_te1", "lora_te2"}  # CLIP-L and OpenCLIP-bigG
    assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj" in te and res.uncovered_te == 0
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


# -- extract -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_full_rank_extract_then_bake_reproduces_tuned(models, tmp_path, arch):
    lora = tmp_path / "full.safetensors"
    res = extract_lora(models[f"{arch}_b"], models[f"{arch}_a"], lora, rank=10_000, dtype="fp32",
                       text_encoder=True)
    assert max(m.rel_error for m in res.modules) < 1e-6
    baked = tmp_path / "baked.safetensors"
    bake_loras(models[f"{arch}_a"], [LoraInput(lora)], baked)
    a, b, got = load(models[f"{arch}_a"]), load(models[f"{arch}_b"]), load(baked)
    covered = {m.key for m in res.modules}
    assert len(covered) > 100
    for k in a:
        if k in covered:
            torch.testing.assert_close(got[k].float(), b[k].float(), rtol=0, atol=2e-4, msg=k)
        else:
            assert torch.equal(got[k], a[k]), k


def test_rank_r_error_is_the_exact_truncation_error(models, tmp_path):
    out = tmp_path / "r2.safetensors"
    res = extract_lora(models["sd15_b"], models["sd15_a"], out, rank=2, dtype="fp32")
    lora = load(out)
    checked = 0
    for m in res.modules:
        d = delta_of(models, "sd15_b", "sd15_a", m.key)
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1).double())
        expected = float((s[2:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        actual = float((d - lora_delta(lora, m.name, d.shape)).norm() / d.norm())
        assert m.rank == min(2, len(s))
        assert actual == pytest.approx(expected, rel=1e-2, abs=1e-6), m.name
        assert m.rel_error == pytest.approx(expected, rel=1e-4, abs=1e-7), m.name
        checked += expected > 0.01
    assert checked > 50  # really truncated, not full rank everywhere


def test_energy_picks_the_smallest_rank_reaching_the_fraction(models, tmp_path):
    res = extract_lora(models["sd15_b"], models["sd15_a"], tmp_path / "e.safetensors", energy=0.9)
    ranks = set()
    for m in res.modules:
        d = delta_of(models, "sd15_b", "sd15_a", m.key)
        sq = torch.linalg.svdvals(d.reshape(d.shape[0], -1).double()) ** 2
        cum = torch.cumsum(sq, 0) / sq.sum()
        assert cum[m.rank - 1] >= 0.9 - 1e-9, m.name
        assert m.rank == 1 or cum[m.rank - 2] < 0.9, m.name
        ranks.add(m.rank)
    assert len(ranks) > 1  # the fraction really chose per module


def test_conv_rank_applies_to_kxk_convs_only(models, tmp_path):
    res = extract_lora(models["sd15_b"], models["sd15_a"], tmp_path / "c.safetensors", rank=1, conv_rank=3)
    by_key = {m.key: m for m in res.modules}
    assert by_key[CONV3].rank == 3 and by_key[CONV1].rank == 1 and by_key[LIN].rank == 1
    lora = load(tmp_path / "c.safetensors")
    name = module_name(CONV3)
    assert tuple(lora[name + ".lora_up.weight"].shape) == (3, 3, 1, 1)
    assert tuple(lora[name + ".lora_down.weight"].shape) == (3, 3, 3, 3)


def test_extract_argument_errors(models, tmp_path):
    a, b, out = models["sd15_a"], models["sd15_b"], tmp_path / "o.safetensors"
    with pytest.raises(MergeError, match="exactly one of --rank"):
        extract_lora(b, a, out, rank=2, energy=0.5)
    with pytest.raises(MergeError, match="energy must be in"):
        extract_lora(b, a, out, energy=1.5)
    with pytest.raises(MergeError, match=r"SDXL.*sd15_a"):
        extract_lora(models["sdxl_b"], a, out, rank=2)
    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="CUDA is not available, --device cuda"):
            extract_lora(b, a, out, rank=2, device="cuda")
    with pytest.raises(MergeError, match="nothing to extract"):
        extract_lora(a, a, out, rank=2)
    assert not out.exists()


# -- bake ----------------------------------------------------------------------------------------------------
def _hand_lora(path, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]):
    t = {}
    for name, (up, down, alpha) in modules.items():
        t[name + ".lora_up.weight"] = up
        t[name + ".lora_down.weight"] = down
        if alpha is not None:
            t[name + ".alpha"] = torch.tensor(alpha)
    save_file(t, str(path))
    return path


def test_bake_equals_the_formula_for_linear_conv1x1_conv3x3(models, tmp_path):
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    spec = {  # name -> (up, down, alpha); alpha None = rank
        module_name(LIN): (rnd(3, 2), rnd(2, 3), 1.0),
        module_name(TE_LIN): (rnd(3, 2), rnd(2, 3), None),
        module_name(CONV1): (rnd(3, 2, 1, 1), rnd(2, 3, 1, 1), 4.0),
        module_name(CONV3): (rnd(3, 2, 1, 1), rnd(2, 3, 3, 3), None),
    }
    l1 = _hand_lora(tmp_path / "l1.safetensors", spec)
    l2 = _hand_lora(tmp_path / "l2.safetensors", {module_name(CONV3): (rnd(3, 1, 1, 1), rnd(1, 3, 3, 3), 0.5)})
    out = tmp_path / "baked.safetensors"
    res = bake_loras(models["sd15_a"], [LoraInput(l1, 0.7), LoraInput(l2, -0.3)], out)
    assert (res.patched, res.modules) == (4, 5)
    a, got = load(models["sd15_a"]), load(out)
    keys = {module_name(k): k for k in (LIN, TE_LIN, CONV1, CONV3)}
    for name, (up, down, alpha) in spec.items():
        k = keys[name]
        rank = down.shape[0]
        scale = (alpha if alpha is not None else rank) / rank
        want = a[k].float() + 0.7 * scale * torch.einsum("or,ri->oi", up.reshape(3, rank),
                                                         down.reshape(rank, -1)).reshape(a[k].shape)
        if k == CONV3:
            l2t = load(l2)
            d2 = (l2t[name + ".lora_up.weight"].reshape(3, 1) @ l2t[name + ".lora_down.weight"].reshape(1, -1))
            want = want - 0.3 * 0.5 * d2.reshape(a[k].shape)
        assert got[k].dtype == a[k].dtype
        torch.testing.assert_close(got[k].float(), want.half().float(), rtol=1e-3, atol=1e-3, msg=k)
        assert not torch.equal(got[k], a[k])
    for k in a:
        if k not in keys.values():
            assert torch.equal(got[k], a[k]), k


def test_strength_scales_and_missing_alpha_is_rank(models, tmp_path):
    up, down = torch.full((3, 2), 0.5), torch.full((2, 3), 0.25)
    name = module_name(LIN)
    no_alpha = _hand_lora(tmp_path / "n.safetensors", {name: (up, down, None)})
    alpha_rank = _hand_lora(tmp_path / "r.safetensors", {name: (up, down, 2.0)})
    alpha_one = _hand_lora(tmp_path / "o.safetensors", {name: (up, down, 1.0)})
    outs = {}
    for tag, lora, s in (("n", no_alpha, 1.0), ("r", alpha_rank, 1.0), ("o", alpha_one, 1.0), ("n2", no_alpha, 2.0)):
        bake_loras(models["sd15_a"], [LoraInput(lora, s)], tmp_path / f"b_{tag}.safetensors")
        outs[tag] = load(tmp_path / f"b_{tag}.safetensors")[LIN].float()
    w = load(models["sd15_a"])[LIN].float()
    assert torch.equal(outs["n"], outs["r"])
    torch.testing.assert_close(outs["n"] - w, torch.full((3, 3), 0.25), atol=2e-3, rtol=0)  # 2·0.5·0.25
    torch.testing.assert_close(outs["o"] - w, torch.full((3, 3), 0.125), atol=2e-3, rtol=0)  # alpha/rank = 1/2
    torch.testing.assert_close(outs["n2"] - w, torch.full((3, 3), 0.5), atol=2e-3, rtol=0)


def test_parse_lora_arg():
    assert parse_lora_arg("x.safetensors:0.8") == LoraInput(__import__("pathlib").Path("x.safetensors"), 0.8)
    assert parse_lora_arg("x.safetensors").strength == 1.0
    assert str(parse_lora_arg(r"C:\l\x.safetensors").path) == r"C:\l\x.safetensors"


def test_unmatched_and_unsupported_modules_are_errors_naming_them(models, tmp_path):
    out = tmp_path / "o.safetensors"
    bad = _hand_lora(tmp_path / "bad.safetensors",
                     {"lora_unet_input_blocks_99_1_proj_in": (torch.ones(3, 1), torch.ones(1, 3), None)})
    with pytest.raises(MergeError, match="no matching weight.*lora_unet_input_blocks_99_1_proj_in"):
        bake_loras(models["sd15_a"], [LoraInput(bad)], out)
    dora = tmp_path / "dora.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(3, 1),
               "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(1, 3),
               "lora_unet_input_blocks_1_1_proj_in.dora_scale": torch.ones(3, 1)}, str(dora))
    with pytest.raises(MergeError, match=r"unsupported LoRA module kind DoRA \(dora_scale.*dora.safetensors module "
                                         r"lora_unet_input_blocks_1_1_proj_in"):
        bake_loras(models["sd15_a"], [LoraInput(dora)], out)
    wrong = _hand_lora(tmp_path / "wrong.safetensors",
                       {module_name(LIN): (torch.ones(4, 1), torch.ones(1, 3), None)})
    with pytest.raises(MergeError, match="does not fit.*lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"):
        bake_loras(models["sd15_a"], [LoraInput(wrong)], out)
    assert not out.exists()


def test_output_is_never_overwritten(models, tmp_path):
    lora = _hand_lora(tmp_path / "l.safetensors", {module_name(LIN): (torch.ones(3, 1), torch.ones(1, 3), None)})
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(MergeError, match="output exists"):
        bake_loras(models["sd15_a"], [LoraInput(lora)], out)
    with pytest.raises(MergeError, match="output exists"):
        extract_lora(models["sd15_b"], models["sd15_a"], out, rank=1)
    assert out.read_bytes() == b"keep"
    with pytest.raises(MergeError, match="overwrite an input"):
        bake_loras(models["sd15_a"], [LoraInput(lora)], lora, overwrite=True)
    bake_loras(models["sd15_a"], [LoraInput(lora)], out, overwrite=True)
    assert out.read_bytes() != b"keep"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_cli_lora_commands(models, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["lora", "extract", str(models["sd15_b"]), str(models["sd15_a"]), "-o", str(out), "--rank", "2",
                 "-q"]) == 0
    text = capsys.readouterr().out
    assert "modules written (sd1)" in text and "relative error: min" in text
    baked = tmp_path / "b.safetensors"
    assert main(["lora", "bake", str(models["sd15_a"]), f"{out}:0.5", "-o", str(baked), "-q"]) == 0
    assert "baked" in capsys.readouterr().out and baked.exists()
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.oft_blocks": torch.ones(3, 2)}, str(loha))
    assert main(["lora", "bake", str(models["sd15_a"]), str(loha), "-o", str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unsupported LoRA module kind OFT") and "lora_unet_x" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["lora", "extract", str(models["sd15_b"]), str(models["sd15_a"]), "-o", str(out), "--rank", "0"]) == 2
    assert "rank must be at least 1, got 0, --rank" in capsys.readouterr().err


def test_cli_extract_json_lists_every_module(models, tmp_path, capsys):
    out = tmp_path / "j.safetensors"
    assert main(["lora", "extract", str(models["sd15_b"]), str(models["sd15_a"]), "-o", str(out),
                 "--energy", "0.95", "--json", "--exact-svd", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["modules"]) == len(read_lora(out))
    assert all(0 <= m["rel_error"] <= (1 - 0.95) ** 0.5 + 1e-6 for m in data["modules"])
    assert {m["method"] for m in data["modules"]} == {"exact"}


# -- randomized SVD ------------------------------------------------------------------------------------------
def _decaying(rows, cols, gen):
    u, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=gen))
    s = torch.arange(1, min(rows, cols) + 1, dtype=torch.float32) ** -0.7
    return (u * s) @ v.T


@pytest.mark.parametrize("kind,shape,rank", [("gauss", (200, 600), 8), ("decay", (300, 300), 16),
                                             ("gauss", (128, 128, 3, 3), 8), ("decay", (96, 960), 4)])
def test_randomized_svd_stays_within_one_percent_of_exact(kind, shape, rank):
    from lib_merge.lora.svd import factorize
    gen = torch.Generator().manual_seed(3)
    mat = torch.randn(shape[0], math.prod(shape[1:]), generator=gen) if kind == "gauss" else _decaying(*shape, gen)
    delta = mat.reshape(shape)
    fast = factorize(delta, rank=rank)
    assert fast.method == "lowrank" and fast.rank == rank
    s = torch.linalg.svdvals(mat.double())
    exact_err = float((s[rank:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    approx = (fast.up.reshape(shape[0], rank) @ fast.down.reshape(rank, -1)).double()
    measured = float((mat.double() - approx).norm() / mat.double().norm())
    assert exact_err <= measured * (1 + 1e-5) and measured <= exact_err * 1.01
    assert fast.rel_error == pytest.approx(measured, rel=1e-4)
    again = factorize(delta, rank=rank)
    assert torch.equal(again.up, fast.up) and torch.equal(again.down, fast.down)  # seeded: reproducible files
    assert factorize(delta, rank=rank, exact=True).method == "exact"
    assert factorize(delta, energy=0.5).method == "exact"


@pytest.mark.parametrize("chunk", [45, 100, 1 << 18])  # one row, two rows (uneven last block), all rows
def test_patched_row_blocks_equal_the_formula(monkeypatch, chunk):
    from lib_merge.lora import bake
    from lib_merge.lora.files import LoraModule
    monkeypatch.setattr(bake, "CHUNK_ELEMS", chunk)
    g = torch.Generator().manual_seed(9)
    w = torch.randn(7, 5, 3, 3, generator=g)
    m1 = LoraModule("a", torch.randn(7, 2, 1, 1, generator=g), torch.randn(2, 5, 3, 3, generator=g), 1.0)
    m2 = LoraModule("b", torch.randn(7, 3, 1, 1, generator=g), torch.randn(3, 5, 3, 3, generator=g), 3.0)
    want = (w.reshape(7, -1) + 0.5 * 0.5 * (m1.up.reshape(7, 2) @ m1.down.reshape(2, -1))
            - 2.0 * 1.0 * (m2.up.reshape(7, 3) @ m2.down.reshape(3, -1))).reshape(w.shape)
    got = bake.patched(w, [(m1, 0.5, 0), (m2, -2.0, 0)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    half = bake.patched(w.half(), [(m1, 0.5, 0)])
    assert half.dtype == torch.float16
