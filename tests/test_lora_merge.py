"""LoRA merge (Σ r_i·ΔW_i by concatenation, or SVD to a rank) and block weights on bake (issue 13)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_merge.cli import main
from lib_merge.errors import MergeError
from lib_merge.lora.bake import LoraInput, bake_loras, parse_lora_arg
from lib_merge.lora.merge import MergeInput, merge_loras, parse_merge_arg
from tests.conftest import load

LIN = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TE1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
CONV1 = "lora_unet_input_blocks_1_1_proj_in"
CONV3 = "lora_unet_input_blocks_3_0_op"


def write_lora(path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]],
               metadata: dict[str, str] | None = None) -> Path:
    t = {}
    for name, (up, down, alpha) in modules.items():
        t[name + ".lora_up.weight"] = up.contiguous()
        t[name + ".lora_down.weight"] = down.contiguous()
        if alpha is not None:
            t[name + ".alpha"] = torch.tensor(alpha)
    save_file(t, str(path), metadata=metadata)
    return path


def rnd(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """ΔW = up @ down · alpha/rank as a matrix (out, in·k·k), by hand, in float64."""
    r = down.shape[0]
    scale = (alpha if alpha is not None else r) / r
    return (up.double().reshape(up.shape[0], r) @ down.double().reshape(r, -1)) * scale


def file_delta(lora: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    up, down = lora[name + ".lora_up.weight"], lora[name + ".lora_down.weight"]
    alpha = float(lora[name + ".alpha"])
    return delta(up, down, alpha)


# -- merge without --rank: concatenation ------------------------------------------------------------------------
def test_same_rank_merge_equals_the_sum_of_delta_at_strength_1(tmp_path):
    g = torch.Generator().manual_seed(1)
    s1 = {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0), TE: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)}
    s2 = {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0), TE: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)}
    l1, l2 = write_lora(tmp_path / "a.safetensors", s1), write_lora(tmp_path / "b.safetensors", s2)
    out = tmp_path / "m.safetensors"
    res = merge_loras([MergeInput(l1), MergeInput(l2)], out, dtype="fp32")
    got = load(out)
    for name in (LIN, TE):
        want = delta(*s1[name]) + delta(*s2[name])
        torch.testing.assert_close(file_delta(got, name), want, rtol=1e-5, atol=1e-6)
        assert got[name + ".lora_down.weight"].shape == (4, 3)  # concatenated: rank 2 + 2
        assert float(got[name + ".alpha"]) == pytest.approx(2.0)  # shared alpha/rank 1/2 kept: 0.5 · 4
    assert {m.method for m in res.modules} == {"concat"} and res.arch == "sd1"
    # kohya's factor-wise sum (u1 + u2)(d1 + d2) is not the ΔW sum: the concatenation is needed
    u = s1[LIN][0] + s2[LIN][0]
    d = s1[LIN][1] + s2[LIN][1]
    assert not torch.allclose((u @ d).double() * 0.5, delta(*s1[LIN]) + delta(*s2[LIN]), atol=1e-3)


def test_ratios_with_a_negative_one_and_different_alphas(tmp_path):
    g = torch.Generator().manual_seed(2)
    s1 = {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)}
    s2 = {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), None)}  # alpha missing = rank: another alpha/rank than s1
    s3 = {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 4.0)}
    paths = [write_lora(tmp_path / f"{n}.safetensors", s) for n, s in (("a", s1), ("b", s2), ("c", s3))]
    out = tmp_path / "m.safetensors"
    merge_loras([MergeInput(paths[0], 0.7), MergeInput(paths[1], -0.3), MergeInput(paths[2], 1.5)], out,
                dtype="fp32")
    got = load(out)
    want = 0.7 * delta(*s1[LIN]) - 0.3 * delta(*s2[LIN]) + 1.5 * delta(*s3[LIN])
    torch.testing.assert_close(file_delta(got, LIN), want, rtol=1e-5, atol=1e-6)
    assert float(got[LIN + ".alpha"]) == 6.0  # alphas differ: folded into the factors, alpha = rank


def test_merged_lora_bakes_like_its_inputs(models, tmp_path):
    g = torch.Generator().manual_seed(3)
    l1 = write_lora(tmp_path / "a.safetensors", {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)})
    l2 = write_lora(tmp_path / "b.safetensors", {LIN: (rnd(g, 3, 1), rnd(g, 1, 3), 0.5)})
    merged = tmp_path / "m.safetensors"
    merge_loras([MergeInput(l1, 0.8), MergeInput(l2, -1.2)], merged, dtype="fp32")
    bake_loras(models["sd15_a"], [LoraInput(merged)], tmp_path / "x.safetensors")
    bake_loras(models["sd15_a"], [LoraInput(l1, 0.8), LoraInput(l2, -1.2)], tmp_path / "y.safetensors")
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    x, y = load(tmp_path / "x.safetensors")[key].float(), load(tmp_path / "y.safetensors")[key].float()
    torch.testing.assert_close(x, y, rtol=0, atol=2e-3)


def test_module_in_only_some_inputs_is_kept_scaled(tmp_path):
    g = torch.Generator().manual_seed(4)
    s1 = {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)}
    s2 = {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0), TE: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)}
    l1, l2 = write_lora(tmp_path / "a.safetensors", s1), write_lora(tmp_path / "b.safetensors", s2)
    for rank in (None, "auto"):
        out = tmp_path / f"m{rank}.safetensors"
        merge_loras([MergeInput(l1, 0.5), MergeInput(l2, -2.0)], out, dtype="fp32", rank=rank)
        got = load(out)
        torch.testing.assert_close(file_delta(got, TE), -2.0 * delta(*s2[TE]), rtol=1e-5, atol=1e-6)
        assert got[TE + ".lora_down.weight"].shape[0] == 2


def test_ratio_zero_adds_nothing_and_an_all_zero_module_is_left_out(tmp_path):
    g = torch.Generator().manual_seed(5)
    s1 = {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0), TE: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)}
    s2 = {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)}
    l1, l2 = write_lora(tmp_path / "a.safetensors", s1), write_lora(tmp_path / "b.safetensors", s2)
    res = merge_loras([MergeInput(l2, 1.0), MergeInput(l1, 0.0)], tmp_path / "m.safetensors", dtype="fp32")
    got = load(tmp_path / "m.safetensors")
    assert res.left_out == [TE] and TE + ".alpha" not in got
    torch.testing.assert_close(file_delta(got, LIN), delta(*s2[LIN]), rtol=1e-5, atol=1e-6)


def test_conv_1x1_and_3x3_modules(tmp_path):
    g = torch.Generator().manual_seed(6)
    s1 = {CONV1: (rnd(g, 3, 2, 1, 1), rnd(g, 2, 3, 1, 1), 1.0), CONV3: (rnd(g, 3, 2, 1, 1), rnd(g, 2, 3, 3, 3), 2.0)}
    s2 = {CONV1: (rnd(g, 3, 1, 1, 1), rnd(g, 1, 3, 1, 1), None), CONV3: (rnd(g, 3, 2, 1, 1), rnd(g, 2, 3, 3, 3), 2.0)}
    l1, l2 = write_lora(tmp_path / "a.safetensors", s1), write_lora(tmp_path / "b.safetensors", s2)
    out = tmp_path / "m.safetensors"
    merge_loras([MergeInput(l1, 0.6), MergeInput(l2, -0.4)], out, dtype="fp32")
    got = load(out)
    assert got[CONV1 + ".lora_up.weight"].shape == (3, 3, 1, 1)
    assert got[CONV1 + ".lora_down.weight"].shape == (3, 3, 1, 1)
    assert got[CONV3 + ".lora_up.weight"].shape == (3, 4, 1, 1)
    assert got[CONV3 + ".lora_down.weight"].shape == (4, 3, 3, 3)
    for name in (CONV1, CONV3):
        want = 0.6 * delta(*s1[name]) - 0.4 * delta(*s2[name])
        torch.testing.assert_close(file_delta(got, name), want, rtol=1e-5, atol=1e-6)
    svd = tmp_path / "s.safetensors"
    merge_loras([MergeInput(l1, 0.6), MergeInput(l2, -0.4)], svd, dtype="fp32", rank=1, exact=True)
    got = load(svd)
    assert got[CONV3 + ".lora_up.weight"].shape == (3, 1, 1, 1)
    assert got[CONV3 + ".lora_down.weight"].shape == (1, 3, 3, 3)
    want = 0.6 * delta(*s1[CONV3]) - 0.4 * delta(*s2[CONV3])
    s = torch.linalg.svdvals(want)
    best = float((s[1:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    err = float((want - file_delta(got, CONV3)).norm() / want.norm())
    assert err == pytest.approx(best, rel=1e-4)


def test_default_dtype_fp16_and_metadata(tmp_path):
    g = torch.Generator().manual_seed(7)
    l1 = write_lora(tmp_path / "a.safetensors", {TE1: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)})
    l2 = write_lora(tmp_path / "b.safetensors", {TE1: (rnd(g, 3, 4), rnd(g, 4, 3), 1.0)})
    out = tmp_path / "m.safetensors"
    merge_loras([MergeInput(l1), MergeInput(l2, 0.5)], out)
    got = load(out)
    assert got[TE1 + ".lora_up.weight"].dtype == torch.float16
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "6"
    recipe = json.loads(meta["blockmerge_recipe"])
    assert recipe["lora"] == "merge" and recipe["loras"] == [{"name": "a.safetensors", "ratio": 1.0},
                                                             {"name": "b.safetensors", "ratio": 0.5}]
    assert recipe["rank"] is None and [i["role"] for i in recipe["inputs"]] == ["lora1", "lora2"]


# -- merge with --rank: SVD ----------------------------------------------------------------------------------
@pytest.mark.parametrize("exact", [False, True])
def test_rank_n_error_is_the_svd_truncation_error(tmp_path, exact):
    g = torch.Generator().manual_seed(8)
    s1 = {LIN: (rnd(g, 100, 16), rnd(g, 16, 120), 8.0)}
    s2 = {LIN: (rnd(g, 100, 16), rnd(g, 16, 120), 16.0)}
    l1, l2 = write_lora(tmp_path / "a.safetensors", s1), write_lora(tmp_path / "b.safetensors", s2)
    out = tmp_path / "m.safetensors"
    res = merge_loras([MergeInput(l1, 1.0), MergeInput(l2, -0.5)], out, rank=5, dtype="fp32", exact=exact)
    full = delta(*s1[LIN]) - 0.5 * delta(*s2[LIN])
    s = torch.linalg.svdvals(full)
    best = float((s[5:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    got = load(out)
    err = float((full - file_delta(got, LIN)).norm() / full.norm())
    assert best <= err * (1 + 1e-5) and err <= best * 1.01
    (m,) = res.modules
    assert m.method == ("exact" if exact else "lowrank") and m.rank == 5
    assert m.rel_error == pytest.approx(err, rel=1e-3)
    assert float(got[LIN + ".alpha"]) == 5.0


def test_rank_auto_is_the_largest_input_rank_per_module(tmp_path):
    g = torch.Generator().manual_seed(9)
    s1 = {LIN: (rnd(g, 8, 4), rnd(g, 4, 8), 4.0), TE: (rnd(g, 6, 1), rnd(g, 1, 6), 1.0)}
    s2 = {LIN: (rnd(g, 8, 2), rnd(g, 2, 8), 1.0)}
    l1, l2 = write_lora(tmp_path / "a.safetensors", s1), write_lora(tmp_path / "b.safetensors", s2)
    out = tmp_path / "m.safetensors"
    res = merge_loras([MergeInput(l1), MergeInput(l2)], out, rank="auto", dtype="fp32")
    assert {m.name: m.rank for m in res.modules} == {LIN: 4, TE: 1}
    got = load(out)
    full = delta(*s1[LIN]) + delta(*s2[LIN])
    s = torch.linalg.svdvals(full)
    best = float((s[4:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    assert best > 0.01  # rank 6 summed, really truncated
    assert float((full - file_delta(got, LIN)).norm() / full.norm()) == pytest.approx(best, rel=1e-2)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4"


# -- merge errors --------------------------------------------------------------------------------------------
def test_mismatched_base_models_are_an_error_naming_both_files(tmp_path):
    g = torch.Generator().manual_seed(10)
    sd1 = write_lora(tmp_path / "sd1.safetensors", {TE: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)})
    xl = write_lora(tmp_path / "xl.safetensors", {TE1: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)})
    with pytest.raises(MergeError, match=r"different base models \(SD1/SD2 and SDXL\), .*sd1\.safetensors and "
                                         r".*xl\.safetensors"):
        merge_loras([MergeInput(sd1), MergeInput(xl)], tmp_path / "m.safetensors")
    k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # cross-attention width tells SD1 from SD2
    a = write_lora(tmp_path / "w768.safetensors", {k: (rnd(g, 3, 1), rnd(g, 1, 768), 1.0)})
    b = write_lora(tmp_path / "w1024.safetensors", {k: (rnd(g, 3, 1), rnd(g, 1, 1024), 1.0)})
    with pytest.raises(MergeError, match=r"different base models \(SD1 and SD2\), .*w768.* and .*w1024"):
        merge_loras([MergeInput(a), MergeInput(b)], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_lora_family_from_names_and_cross_attention_width():
    from lib_merge.lora.names import lora_family
    lin = ((3, 1), (1, 3))
    assert lora_family({LIN: lin}) == "sd"  # attention in input_blocks.1: SD1/SD2 only
    assert lora_family({"lora_unet_output_blocks_2_1_transformer_blocks_3_attn1_to_q": lin}) == "sdxl"
    assert lora_family({"lora_unet_label_emb_0_0": lin}) == "sdxl"
    assert lora_family({"lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k": ((3, 1), (1, 2048))}) == "sdxl"
    assert lora_family({"lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v": ((3, 1), (1, 768))}) == "sd1"
    assert lora_family({"lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q": lin}) is None  # both have it


def test_modules_that_do_not_fit_and_lycoris_modules_are_errors(tmp_path):
    g = torch.Generator().manual_seed(11)
    a = write_lora(tmp_path / "a.safetensors", {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)})
    b = write_lora(tmp_path / "b.safetensors", {LIN: (rnd(g, 4, 2), rnd(g, 2, 3), 1.0)})
    with pytest.raises(MergeError, match=rf"do not fit each other \(ΔW 3×3 in .*a\.safetensors, 4×3\), "
                                         rf".*b\.safetensors module {LIN}"):
        merge_loras([MergeInput(a), MergeInput(b)], tmp_path / "m.safetensors")
    loha = tmp_path / "loha.safetensors"
    save_file({CONV1 + ".hada_w1_a": torch.ones(3, 2), CONV1 + ".hada_w1_b": torch.ones(2, 3)}, str(loha))
    with pytest.raises(MergeError, match=rf"loha\.safetensors module {CONV1}"):
        merge_loras([MergeInput(a), MergeInput(loha)], tmp_path / "m.safetensors")
    with pytest.raises(MergeError, match="rank must be a whole number or auto, got 'big', --rank"):
        merge_loras([MergeInput(a)], tmp_path / "m.safetensors", rank="big")
    with pytest.raises(MergeError, match="not block weights"):
        parse_merge_arg(f"{a}:0.5:ALL")
    assert parse_merge_arg(f"{a}:-0.5") == MergeInput(a, -0.5)


def test_merge_output_is_never_overwritten(tmp_path):
    g = torch.Generator().manual_seed(12)
    a = write_lora(tmp_path / "a.safetensors", {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)})
    before = a.read_bytes()
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(MergeError, match="output exists"):
        merge_loras([MergeInput(a)], out)
    assert out.read_bytes() == b"keep"
    with pytest.raises(MergeError, match="overwrite an input"):
        merge_loras([MergeInput(a)], a, overwrite=True)
    assert a.read_bytes() == before
    merge_loras([MergeInput(a)], out, overwrite=True)
    assert load(out)[LIN + ".lora_up.weight"].shape == (3, 2)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_cli_lora_merge(tmp_path, capsys):
    g = torch.Generator().manual_seed(13)
    a = write_lora(tmp_path / "a.safetensors", {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)})
    b = write_lora(tmp_path / "b.safetensors", {LIN: (rnd(g, 3, 2), rnd(g, 2, 3), 1.0)})
    out = tmp_path / "m.safetensors"
    assert main(["lora", "merge", f"{a}:0.5", f"{b}:-1", "-o", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "1 modules written (sd1, concatenated (exact sum))" in text and "sha256" in text
    assert main(["lora", "merge", str(a), str(b), "-o", str(tmp_path / "j.safetensors"), "--rank", "auto",
                 "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rank"] == "auto" and data["modules"][0]["rank"] == 2
    for bad, message in ((["--rank", "x"], "error: rank must be a whole number or auto, got 'x', --rank"),
                         (["--rank", "0"], "error: rank must be at least 1, got 0, --rank")):
        assert main(["lora", "merge", str(a), "-o", str(tmp_path / "z.safetensors"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.strip().splitlines()) == 1
    assert main(["lora", "merge", str(a), "-o", str(out)]) == 2
    assert "output exists" in capsys.readouterr().err


# -- block weights on bake -----------------------------------------------------------------------------------
U = "model.diffusion_model."
# one patchable weight per SD1 block, by hand: block ID -> checkpoint key
SD1_KEYS = {
    "BASE": "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "IN00": U + "input_blocks.0.0.weight",
    **{f"IN{i:02d}": U + f"input_blocks.{i}.1.transformer_blocks.0.attn1.to_q.weight" for i in (1, 2, 4, 5, 7, 8)},
    **{f"IN{i:02d}": U + f"input_blocks.{i}.0.op.weight" for i in (3, 6, 9)},
    **{f"IN{i:02d}": U + f"input_blocks.{i}.0.in_layers.2.weight" for i in (10, 11)},
    "M00": U + "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    **{f"OUT{i:02d}": U + f"output_blocks.{i}.0.in_layers.2.weight" for i in (0, 1, 2)},
    **{f"OUT{i:02d}": U + f"output_blocks.{i}.1.transformer_blocks.0.attn1.to_q.weight" for i in range(3, 12)},
}
ALL26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
# the LoRA Block Weight layouts, written out (merge-conventions §1.8)
LAYOUT = {
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"],
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
         "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"],
    20: ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))],
    26: ALL26,
}


def _module(key: str) -> str:
    prefix = ("lora_te_text_model_", "cond_stage_model.transformer.text_model.")
    if key.startswith(prefix[1]):
        return prefix[0] + key[len(prefix[1]):-len(".weight")].replace(".", "_")
    return "lora_unet_" + key[len(U):-len(".weight")].replace(".", "_")


def _block_lora(path: Path, model: dict[str, torch.Tensor], keys: dict[str, str], seed: int):
    g = torch.Generator().manual_seed(seed)
    spec = {}
    for key in keys.values():
        shape = model[key].shape
        up = rnd(g, shape[0], 2, *((1, 1) if len(shape) == 4 else ()))
        down = rnd(g, 2, *shape[1:])
        spec[_module(key)] = (up, down, 1.0)
    write_lora(path, spec)
    return spec


def _check_bake(model: dict, got: dict, spec: dict, keys: dict[str, str], strength: float,
                values: dict[str, float]) -> None:
    for block, key in keys.items():
        up, down, alpha = spec[_module(key)]
        s = strength * values[block]
        if s == 0:
            assert torch.equal(got[key], model[key]), block  # bit-exact: not touched
        else:
            want = model[key].double() + s * delta(up, down, alpha).reshape(model[key].shape)
            torch.testing.assert_close(got[key].double(), want.half().double(), rtol=1e-3, atol=2e-3, msg=block)
            assert not torch.equal(got[key], model[key]), block


@pytest.mark.parametrize("length", [12, 17, 20, 26])
def test_block_vector_scales_exactly_the_modules_of_its_blocks_sd1(models, tmp_path, length):
    model = load(models["sd15_a"])
    lora = tmp_path / "l.safetensors"
    spec = _block_lora(lora, model, SD1_KEYS, seed=length)
    vec = [round(0.1 * (i + 1) * (-1) ** i, 2) for i in range(length)]
    vec[2] = 0.0  # one named block at 0
    values = dict.fromkeys(ALL26, 0.0)  # blocks the layout does not name: 0
    values.update(zip(LAYOUT[length], vec))
    out = tmp_path / "o.safetensors"
    bake_loras(models["sd15_a"], [LoraInput(lora, 0.8, ",".join(map(str, vec)))], out)
    got = load(out)
    _check_bake(model, got, spec, SD1_KEYS, 0.8, values)
    assert sum(v == 0 for v in values.values()) >= 1
    for k in model:
        if k not in SD1_KEYS.values():
            assert torch.equal(got[k], model[k]), k


def test_block_weights_on_sdxl_and_a_block_at_zero(models, tmp_path):
    model = load(models["sdxl_a"])
    keys = {
        "BASE": "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        **{f"IN{i:02d}": U + f"input_blocks.{i}.1.transformer_blocks.1.attn1.to_q.weight" for i in (4, 5, 7, 8)},
        "IN03": U + "input_blocks.3.0.op.weight",
        "M00": U + "middle_block.1.transformer_blocks.2.attn1.to_q.weight",
        **{f"OUT{i:02d}": U + f"output_blocks.{i}.1.transformer_blocks.0.attn1.to_q.weight" for i in range(6)},
        "OUT07": U + "output_blocks.7.0.in_layers.2.weight",
    }
    g = torch.Generator().manual_seed(21)
    spec = {}
    for key in keys.values():
        shape = model[key].shape
        up = rnd(g, shape[0], 1, *((1, 1) if len(shape) == 4 else ()))
        name = ("lora_te1_text_model_" + key.split("text_model.")[1] if "text_model" in key
                else "lora_unet_" + key[len(U):])[:-len(".weight")].replace(".", "_")
        spec[name] = (up, rnd(g, 1, *shape[1:]), None)
    lora = write_lora(tmp_path / "xl.safetensors", spec)
    spec_by_key = {keys[b]: spec[n] for b, n in zip(keys, spec)}
    values = {b: 0.25 * (i % 5) + 0.5 for i, b in enumerate(LAYOUT[20])}
    values.update(IN03=2.0, IN05=0.0, M00=0.0, OUT03=0.0, OUT04=-1.0)
    vec20 = [values[b] for b in LAYOUT[20]]
    out = tmp_path / "o.safetensors"
    bake_loras(models["sdxl_a"], [LoraInput(lora, -0.5, ",".join(map(str, vec20)))], out)
    got = load(out)
    for block, key in keys.items():
        up, down, alpha = spec_by_key[key]
        s = -0.5 * values[block]
        if s == 0:
            assert torch.equal(got[key], model[key]), block
        else:
            want = model[key].double() + s * delta(up, down, alpha).reshape(model[key].shape)
            torch.testing.assert_close(got[key].double(), want.half().double(), rtol=1e-3, atol=2e-3, msg=block)
    assert values["IN05"] == 0 and values["M00"] == 0 and values["OUT03"] == 0  # tested at 0 above


def test_lbw_preset_names(models, tmp_path):
    model = load(models["sd15_a"])
    lora = tmp_path / "l.safetensors"
    spec = _block_lora(lora, model, SD1_KEYS, seed=30)
    # OUTALL = 1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1: BASE and OUT03-OUT11
    values = {b: 1.0 if b == "BASE" or b in LAYOUT[17][8:] else 0.0 for b in ALL26}
    out = tmp_path / "o.safetensors"
    bake_loras(models["sd15_a"], [LoraInput(lora, 1.0, "OUTALL")], out)
    _check_bake(model, load(out), spec, SD1_KEYS, 1.0, values)
    half = tmp_path / "h.safetensors"
    bake_loras(models["sd15_a"], [LoraInput(lora, 1.0, "ALL0.5")], half)
    values = {b: 0.5 if b in LAYOUT[17] else 0.0 for b in ALL26}
    _check_bake(model, load(half), spec, SD1_KEYS, 1.0, values)


def test_bad_block_vectors_and_preset_names(models, tmp_path):
    model = load(models["sd15_a"])
    lora = tmp_path / "l.safetensors"
    _block_lora(lora, model, {"BASE": SD1_KEYS["BASE"]}, seed=31)
    out = tmp_path / "o.safetensors"
    with pytest.raises(MergeError, match=r"LoRA block weights have 5 values; accepted lengths are 12, 17, 20, 26, "
                                         r"LoRA .*l\.safetensors"):
        bake_loras(models["sd15_a"], [LoraInput(lora, 1.0, "1,0,1,0,1")], out)
    with pytest.raises(MergeError, match=r"unknown LoRA block-weight preset 'OUTZ' \(presets: NONE, ALL, INS, IND, "
                                         r"INALL, MIDD, OUTD, OUTS, OUTALL, ALL0\.5\), LoRA .*l\.safetensors"):
        bake_loras(models["sd15_a"], [LoraInput(lora, 1.0, "OUTZ")], out)
    with pytest.raises(MergeError, match=r"not a number: 'x'"):
        bake_loras(models["sd15_a"], [LoraInput(lora, 1.0, ",".join(["1"] * 16 + ["x"]))], out)
    assert not out.exists()


def test_parse_lora_arg_with_blocks():
    assert parse_lora_arg("x.safetensors:0.8:OUTALL") == LoraInput(Path("x.safetensors"), 0.8, "OUTALL")
    vec = ",".join(["1"] * 12)
    assert parse_lora_arg(rf"C:\l\x.safetensors:-1:{vec}") == LoraInput(Path(r"C:\l\x.safetensors"), -1.0, vec)
    assert parse_lora_arg(r"C:\l\x.safetensors:0.5") == LoraInput(Path(r"C:\l\x.safetensors"), 0.5)
    assert parse_lora_arg("x.safetensors").blocks is None


def test_cli_bake_with_blocks(models, tmp_path, capsys):
    model = load(models["sd15_a"])
    lora = tmp_path / "l.safetensors"
    keys = {b: SD1_KEYS[b] for b in ("BASE", "OUT05", "OUT07")}
    _block_lora(lora, model, keys, seed=32)
    out = tmp_path / "o.safetensors"
    assert main(["lora", "bake", str(models["sd15_a"]), f"{lora}:1:OUTS", "-o", str(out), "-q"]) == 0
    assert "baked 2 LoRA modules into 2 weights" in capsys.readouterr().out  # OUTS: OUT05 at 0
    got = load(out)
    assert torch.equal(got[keys["OUT05"]], model[keys["OUT05"]])
    assert not torch.equal(got[keys["OUT07"]], model[keys["OUT07"]])
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["blockmerge_recipe"])
    assert recipe["loras"] == [{"name": "l.safetensors", "strength": 1.0, "blocks": "OUTS"}]
    assert main(["lora", "bake", str(models["sd15_a"]), f"{lora}:1:1,2", "-o", str(tmp_path / "p.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LoRA block weights have 2 values") and len(err.strip().splitlines()) == 1
