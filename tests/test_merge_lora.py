"""LoRAs baked into a merge (issue 13): ``merge … --lora`` and the recipe's ``lora`` field, in both sinks.

Value = merge formula (fp32) + Σ strength · block weight · up @ down · alpha/rank, then Adjust, then one cast:
the numbers ``lora bake`` gives on the fp32 merge. Tiny SD1.5 checkpoints (conftest) and hand-built LoRA files.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import load
from lib_merge import hashing
from lib_merge import synthetic as S
from lib_merge.cli import main
from lib_merge.errors import MergeError
from lib_merge.live import CachePolicy, LiveSession, fingerprint
from lib_merge.lora.apply import bake_recipe
from lib_merge.lora.bake import LoraInput, bake_loras
from lib_merge.lora.names import module_name
from lib_merge.merge import merge_to_file
from lib_merge.recipe import Recipe
from lib_merge.reproduce import reproduce
from test_live import ModuleTarget

UNET = "model.diffusion_model."
LIN = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"  # IN01, (3, 3)
OUT_V = UNET + "output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight"  # OUT05, (3, 768)
MID_CONV = UNET + "middle_block.1.proj_out.weight"  # M00, (3, 3, 1, 1)
CONV3 = UNET + "input_blocks.1.0.in_layers.2.weight"  # IN01, (3, 3, 3, 3)
TE_LIN = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"  # BASE, (3, 3)
OUT2 = UNET + "out.2.weight"  # OUT11, (3, 3, 3, 3): Adjust's OUT2 scales it
SHAPES = {LIN: (3, 3), OUT_V: (3, 768), MID_CONV: (3, 3, 1, 1), CONV3: (3, 3, 3, 3), TE_LIN: (3, 3)}
LORA_KEYS = list(SHAPES)  # what the fixture's first LoRA patches
SHAPES[OUT2] = (3, 3, 3, 3)


def make_lora(path, keys, seed: int, rank: int = 2, alpha: float | None = 1.0, shapes=SHAPES):
    """A plain LoRA file with one module per key (random factors, fp16 like real files)."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for key in keys:
        shape = shapes[key]
        name = module_name(key)
        tail = (1, 1) if len(shape) == 4 else ()
        t[name + ".lora_up.weight"] = torch.randn(shape[0], rank, *tail, generator=g).half()
        t[name + ".lora_down.weight"] = torch.randn(rank, *shape[1:], generator=g).half()
        if alpha is not None:
            t[name + ".alpha"] = torch.tensor(alpha)
    save_file(t, str(path))
    return path


def delta(lora_path, key, shapes=SHAPES) -> torch.Tensor:
    """up @ down · alpha/rank of ``key``'s module, by hand, in fp32."""
    t = load(lora_path)
    name = module_name(key)
    up, down = t[name + ".lora_up.weight"].float(), t[name + ".lora_down.weight"].float()
    rank = down.shape[0]
    alpha = float(t[name + ".alpha"]) if name + ".alpha" in t else rank
    return (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(shapes[key]) * (alpha / rank)


@pytest.fixture
def loras(tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    return (make_lora(d / "l1.safetensors", LORA_KEYS, seed=1),
            make_lora(d / "l2.safetensors", [LIN, OUT_V], seed=2, rank=1, alpha=None))


def lerp(models, key, alpha):
    return torch.lerp(load(models["sd15_a"])[key].float(), load(models["sd15_b"])[key].float(), alpha)


def entry(path, strength=1.0, blocks=None):
    return {"path": str(path), "strength": strength, "blocks": blocks}


# -- the value ---------------------------------------------------------------------------------------------
def test_file_merge_with_loras_is_the_merge_plus_strength_times_delta(models, loras, tmp_path):
    l1, l2 = loras
    r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.3, dtype="fp32",
               lora=[entry(l1, 0.7), entry(l2, -0.4)])
    got = load(merge_to_file(r, tmp_path / "m.safetensors").output)
    plain = load(merge_to_file(Recipe(models=r.models, alpha=0.3, dtype="fp32"), tmp_path / "p.safetensors").output)
    for key in LORA_KEYS:
        want = lerp(models, key, 0.3) + 0.7 * delta(l1, key)
        if key in (LIN, OUT_V):
            want = want - 0.4 * delta(l2, key)
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-5, msg=key)
        assert not torch.equal(got[key], plain[key])
    for key in plain:
        if key not in LORA_KEYS:
            assert torch.equal(got[key], plain[key]), key


def test_merge_with_lora_equals_lora_bake_on_the_fp32_merge_bit_for_bit(models, loras, tmp_path):
    """The defined semantics: bake into the merged model computed in fp32; with --dtype fp16 one cast of that."""
    l1, l2 = loras
    base = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.6, dtype="fp32")
    merged = merge_to_file(base, tmp_path / "m32.safetensors").output
    baked = load(bake_loras(merged, [LoraInput(l1, 0.7, "OUTALL"), LoraInput(l2, 1.5)], tmp_path / "b.safetensors").output)
    lo = [entry(l1, 0.7, "OUTALL"), entry(l2, 1.5)]
    for dtype, cast in (("fp32", torch.float32), ("fp16", torch.float16)):
        r = Recipe(models=base.models, alpha=0.6, dtype=dtype, lora=lo)
        got = load(merge_to_file(r, tmp_path / f"w_{dtype}.safetensors").output)
        for key, t in got.items():
            want = baked[key].to(cast) if baked[key].is_floating_point() else baked[key]
            assert torch.equal(t, want), key


def test_lora_bake_as_a_merge_writes_the_same_bytes(models, loras, tmp_path):
    """``lora bake`` through the merge engine (no_interpolation + lora, with bake's metadata): the same file."""
    l1, l2 = loras
    inputs = [LoraInput(l1, 0.8, "MIDD"), LoraInput(l2, -0.5)]
    for arch in ("sd15_a", "leftovers"):  # fp16 weights; fp32 EMA, schedule buffers, int position ids
        baked = bake_loras(models[arch], inputs, tmp_path / f"b_{arch}.safetensors").output
        raw = baked.read_bytes()
        meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]  # in the file's order
        res = merge_to_file(bake_recipe(models[arch], inputs), tmp_path / f"m_{arch}.safetensors", metadata=meta)
        assert res.output.read_bytes() == baked.read_bytes(), arch


def test_block_weights_scale_exactly_the_modules_of_their_blocks(models, loras, tmp_path):
    l1, _ = loras
    vec = [0.0] * 26  # BASE, IN00..IN11, M00, OUT00..OUT11
    vec[0], vec[2], vec[13], vec[14 + 5] = 0.25, 0.5, 0.0, 2.0  # BASE, IN01, M00, OUT05
    r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.5, dtype="fp32",
               lora=[entry(l1, 0.8, vec)])
    got = load(merge_to_file(r, tmp_path / "v.safetensors").output)
    factor = {TE_LIN: 0.25, LIN: 0.5, CONV3: 0.5, MID_CONV: 0.0, OUT_V: 2.0}
    for key, f in factor.items():
        want = lerp(models, key, 0.5) + 0.8 * f * delta(l1, key)
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-5, msg=key)
    assert torch.equal(got[MID_CONV], lerp(models, MID_CONV, 0.5))  # block at 0: not patched at all
    # a preset: OUTALL keeps BASE and OUT03-OUT11, drops IN and M00
    got = load(merge_to_file(Recipe(models=r.models, alpha=0.5, dtype="fp32", lora=[entry(l1, 1.0, "OUTALL")]),
                             tmp_path / "o.safetensors").output)
    for key in (LIN, CONV3, MID_CONV):
        assert torch.equal(got[key], lerp(models, key, 0.5)), key
    for key in (TE_LIN, OUT_V):
        torch.testing.assert_close(got[key], lerp(models, key, 0.5) + delta(l1, key), rtol=1e-5, atol=1e-5)


def test_keys_the_merge_leaves_at_a_are_still_patched(models, loras, tmp_path):
    """alpha 0 (identity merge) and --exclude te (copied from A): the LoRA still applies on A's values."""
    l1, _ = loras
    a = load(models["sd15_a"])
    for kw in ({"alpha": 0.0}, {"alpha": 0.5, "exclude": "te"}):
        r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], dtype="fp32", lora=[entry(l1, 0.5)], **kw)
        got = load(merge_to_file(r, tmp_path / "z.safetensors", overwrite=True).output)
        torch.testing.assert_close(got[TE_LIN], a[TE_LIN].float() + 0.5 * delta(l1, TE_LIN), rtol=1e-5, atol=1e-5)
        if kw["alpha"] == 0.0:
            torch.testing.assert_close(got[LIN], a[LIN].float() + 0.5 * delta(l1, LIN), rtol=1e-5, atol=1e-5)


def test_lora_comes_after_the_merge_and_before_adjust(models, tmp_path):
    """Adjust's OUT2 scales out.2.weight by 1 - 0.01·OUT2: the whole patched value, ΔW included."""
    lo = make_lora(tmp_path / "out2.safetensors", [OUT2], seed=3)
    adj = [0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.5, dtype="fp32",
               lora=[entry(lo, 0.6)], adjust=adj)
    got = load(merge_to_file(r, tmp_path / "a.safetensors").output)
    want = (lerp(models, OUT2, 0.5) + 0.6 * delta(lo, OUT2)) * 0.9
    torch.testing.assert_close(got[OUT2], want, rtol=1e-5, atol=1e-5)


# -- errors and the recipe ---------------------------------------------------------------------------------
def test_unmatched_module_is_an_error_naming_file_and_module(models, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_input_blocks_99_1_proj_in.lora_up.weight": torch.ones(3, 1),
               "lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.ones(1, 3)}, str(bad))
    r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], lora=[entry(bad)])
    out = tmp_path / "o.safetensors"
    with pytest.raises(MergeError, match=r"no matching weight.*bad\.safetensors module lora_unet_input_blocks_99_1_proj_in"):
        merge_to_file(r, out)
    assert not out.exists()


@pytest.mark.parametrize("lora,message", [
    ("x.safetensors", r"^lora must be a list of LoRA entries \(got str 'x.safetensors'\), r.json$"),
    ([{"strength": 1}], r"^lora\[0\] needs a path, r.json$"),
    ([{"path": "a"}, {"path": "b", "strength": "0.5"}], r"^lora\[1\]\.strength must be a number \(got str '0.5'\), r.json$"),
    ([{"path": "a", "strength": float("inf")}], r"^lora\[0\]\.strength must be a finite number"),
    ([{"path": "a", "weight": 1}], r"^lora\[0\] has an unknown field 'weight' \(fields: path, strength, blocks\), r.json$"),
    ([{"path": "a", "blocks": "FOO"}], r"^unknown LoRA block-weight preset 'FOO' .*, lora\[0\]\.blocks, r.json$"),
    ([{"path": "a", "blocks": [1, 0]}], r"^LoRA block weights have 2 values; .*, lora\[0\]\.blocks, r.json$"),
    ([{"path": "a", "blocks": [1, True]}], r"^lora\[0\]\.blocks list items must be numbers \(got true\), r.json$"),
    (["a"], r"^lora\[0\] must be an object with path, strength and blocks \(got str 'a'\), r.json$"),
])
def test_recipe_lora_validation_names_entry_and_field(lora, message):
    with pytest.raises(MergeError, match=message):
        Recipe.from_dict({"models": ["a", "b"], "lora": lora}, "r.json")


def test_recipe_lora_forms_and_older_recipes_unchanged():
    r = Recipe.from_dict({"models": ["a", "b"], "lora": [{"path": "x.safetensors"},
                                                        {"path": "y.safetensors", "strength": 2, "blocks": "1," * 11 + "1"}]})
    assert r.to_dict()["lora"] == [{"path": "x.safetensors", "strength": 1.0, "blocks": None},
                                   {"path": "y.safetensors", "strength": 2.0, "blocks": [1.0] * 12}]
    assert "lora" not in Recipe(models=["a", "b"]).to_dict()  # a recipe without LoRAs reads as before
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()


def test_metadata_records_loras_by_name_and_sha256_and_reproduce_finds_them(models, loras, tmp_path, monkeypatch):
    l1, l2 = loras
    r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.4, dtype="fp16",
               lora=[entry(l1, 0.7, "OUTALL"), entry(l2, -0.5)])
    res = merge_to_file(r, tmp_path / "m.safetensors")
    ours = json.loads(res.metadata["blockmerge_recipe"])
    assert ours["lora"] == [{"path": "l1.safetensors", "strength": 0.7, "blocks": "OUTALL"},
                            {"path": "l2.safetensors", "strength": -0.5, "blocks": None}]
    assert ours["inputs"][2:] == [{"role": "lora1", "name": "l1.safetensors", "sha256": hashing.sha256_file(l1)},
                                  {"role": "lora2", "name": "l2.safetensors", "sha256": hashing.sha256_file(l2)}]
    assert json.loads(res.metadata["sd_merge_recipe"])["tertiary_model_hash"] is None  # LoRAs are not models
    assert str(tmp_path) not in json.dumps(res.metadata)
    ok, new, detail = reproduce(res.output, tmp_path / "again.safetensors")
    assert ok and new.read_bytes() == res.output.read_bytes(), detail
    # moved elsewhere: found by sha256 in a --search folder
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(l1), moved / "renamed.safetensors")
    monkeypatch.setenv("BLOCKMERGE_CACHE", str(tmp_path / "cold"))  # a cold hash cache: found by searching
    search = [str(moved), str(models["sd15_a"].parent), str(l2.parent)]
    ok, new, detail = reproduce(res.output, tmp_path / "again2.safetensors", search=search)
    assert ok and new.read_bytes() == res.output.read_bytes(), detail


def test_reproduce_says_which_lora_is_missing(models, loras, tmp_path):
    l1, _ = loras
    res = merge_to_file(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], lora=[entry(l1)]),
                        tmp_path / "m.safetensors")
    save_file({"x": torch.ones(1)}, str(l1))  # same name, other contents
    with pytest.raises(MergeError, match=r"input LoRA 1 l1.safetensors changed since the merge"):
        reproduce(res.output, tmp_path / "again.safetensors", search=[str(l1.parent)])


def test_cli_merge_with_lora(models, loras, tmp_path, capsys):
    l1, l2 = loras
    out = tmp_path / "c.safetensors"
    assert main(["merge", str(models["sd15_a"]), str(models["sd15_b"]), "-o", str(out), "--alpha", "0.3",
                 "--dtype", "fp32", "--lora", f"{l1}:0.7:OUTALL", "--lora", str(l2), "-q"]) == 0
    text = capsys.readouterr().out
    assert "2 LoRAs baked in: 4 modules into 3 weights" in text
    r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.3, dtype="fp32",
               lora=[entry(l1, 0.7, "OUTALL"), entry(l2)])
    same = merge_to_file(r, tmp_path / "r.safetensors")
    got, want = load(out), load(same.output)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert main(["merge", str(models["sd15_a"]), str(models["sd15_b"]), "-o", str(tmp_path / "e.safetensors"),
                 "--lora", f"{l1}:0.7:NOPE"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown LoRA block-weight preset 'NOPE'") and "lora[0].blocks" in err


# -- live --------------------------------------------------------------------------------------------------
def _session(models, sd15_listing):
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    return LiveSession(ModuleTarget(module), models["sd15_a"], cache=CachePolicy.CPU), module


@pytest.mark.parametrize("kw", [{"alpha": 0.3}, {"alpha": 0.0}, {"alpha": 0.5, "exclude": "te", "preset": "GRAD_V"}],
                         ids=["merge", "identity", "excluded"])
def test_live_merge_with_lora_equals_file_merge_bits(models, loras, sd15_listing, tmp_path, kw):
    l1, l2 = loras
    r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], dtype="fp32", vae="a",
               lora=[entry(l1, 0.7, "OUTALL"), entry(l2, -1.2)], **{k: v for k, v in kw.items() if k != "preset"},
               preset=kw.get("preset"))
    saved = load(merge_to_file(r, tmp_path / "f.safetensors").output)
    session, module = _session(models, sd15_listing)
    try:
        session.apply(r)
        for k, p in module.named_parameters():
            assert torch.equal(p.detach(), saved[k]), k
    finally:
        session.close()


def test_strength_change_re_merges_only_patched_keys_and_restore_is_exact(models, loras, sd15_listing):
    l1, l2 = loras
    session, module = _session(models, sd15_listing)
    params = dict(module.named_parameters())
    before = fingerprint(params)
    try:
        def r(s1, s2=0.5, alpha=0.4):
            return Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=alpha, vae="a",
                          lora=[entry(l1, s1), entry(l2, s2)])
        first = session.apply(r(0.7))
        assert first.written == len(session.keys)
        assert session.apply(r(0.7)).written == 0
        rep = session.apply(r(0.2))  # l1 patches 5 keys
        assert (rep.written, rep.unchanged) == (5, len(session.keys) - 5)
        rep = session.apply(r(0.2, 0.9))  # l2 patches LIN and OUT_V
        assert rep.written == 2
        fresh, fresh_module = _session(models, sd15_listing)
        try:
            fresh.apply(r(0.2, 0.9))
            assert fingerprint(params) == fingerprint(dict(fresh_module.named_parameters()))
        finally:
            fresh.close()
        # a LoRA on keys the merge leaves at A: alpha 0 writes only the patched keys, restore is bit-exact
        session.restore()
        assert fingerprint(params) == before
        rep = session.apply(r(1.0, 1.0, alpha=0.0))
        assert rep.written == 5
        a = load(models["sd15_a"])
        torch.testing.assert_close(params[TE_LIN].detach(), a[TE_LIN].float() + delta(l1, TE_LIN), rtol=1e-5, atol=1e-5)
        assert torch.equal(params[UNET + "out.0.weight"].detach(), a[UNET + "out.0.weight"].float())
        # dropping the LoRAs puts exactly the patched keys back
        assert session.apply(Recipe(models=r(0).models, alpha=0.0, vae="a")).written == 5
        assert fingerprint(params) == before
        session.apply(r(0.3))
        assert session.restore() == len(session.keys)
        assert fingerprint(params) == before
    finally:
        session.close()


def test_inspect_shows_the_loras(models, loras, tmp_path, capsys):
    l1, l2 = loras
    out = tmp_path / "i.safetensors"
    merge_to_file(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])],
                         lora=[entry(l1, 0.7, "OUTALL"), entry(l2, 1.0, [1.0] * 12)]), out)
    assert main(["inspect", str(out)]) == 0
    assert "LoRAs:        l1.safetensors:0.7:OUTALL, l2.safetensors:1.0:" + ",".join(["1"] * 12) in capsys.readouterr().out


def test_missing_lora_file_is_named_and_nothing_is_written(models, tmp_path):
    out = tmp_path / "o.safetensors"
    r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], lora=[entry(tmp_path / "gone.safetensors")])
    with pytest.raises(MergeError, match=r"^LoRA file not found, .*gone\.safetensors$"):
        merge_to_file(r, out)
    assert not out.exists()


def test_recipe_file_lora_paths_are_relative_to_the_recipe(models, loras, tmp_path):
    l1, _ = loras
    rec = l1.parent / "r.json"
    rec.write_text(json.dumps({"models": [str(models["sd15_a"]), str(models["sd15_b"])], "alpha": 0.3,
                               "dtype": "fp32", "lora": [{"path": "l1.safetensors", "strength": 0.5}]}))
    out = tmp_path / "f.safetensors"
    assert main(["merge", "--recipe", str(rec), "-o", str(out), "-q"]) == 0
    torch.testing.assert_close(load(out)[LIN], lerp(models, LIN, 0.3) + 0.5 * delta(l1, LIN), rtol=1e-5, atol=1e-5)
    over = tmp_path / "g.safetensors"  # --lora replaces the recipe's list
    assert main(["merge", "--recipe", str(rec), "-o", str(over), "--lora", f"{l1}:0", "-q"]) == 0
    plain = merge_to_file(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.3, dtype="fp32"),
                          tmp_path / "p.safetensors").output
    assert torch.equal(load(over)[LIN], load(plain)[LIN])


def test_sdxl_merge_with_a_text_encoder_and_unet_lora(models, tmp_path):
    te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    unet = UNET + "output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight"  # OUT02 on SDXL
    a, b = load(models["sdxl_a"]), load(models["sdxl_b"])
    shapes = {te1: tuple(a[te1].shape), unet: tuple(a[unet].shape)}
    lo = make_lora(tmp_path / "xl.safetensors", [te1, unet], seed=4, shapes=shapes)
    r = Recipe(models=[str(models["sdxl_a"]), str(models["sdxl_b"])], alpha=0.25, dtype="fp32",
               lora=[entry(lo, 0.5, [1.0] * 12)])
    got = load(merge_to_file(r, tmp_path / "x.safetensors").output)
    for key in (te1, unet):
        want = torch.lerp(a[key].float(), b[key].float(), 0.25) + 0.5 * delta(lo, key, shapes)
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-5, msg=key)


# -- other LoRA kinds and names (lora.kinds, lora.names): the same patch plan, so the same numbers -----------------
def _kinds_lora(path):
    """LoHa on LIN and CONV3, LoKr on TE_LIN (3×3 = kron of 3×1 and 1×3), a plain module on OUT_V."""
    g = torch.Generator().manual_seed(8)
    r = 2
    t = {}
    for key, cols in ((LIN, 3), (CONV3, 27)):
        name = module_name(key)
        t.update({f"{name}.hada_w1_a": torch.randn(3, r, generator=g), f"{name}.hada_w1_b": torch.randn(r, cols, generator=g),
                  f"{name}.hada_w2_a": torch.randn(3, r, generator=g), f"{name}.hada_w2_b": torch.randn(r, cols, generator=g),
                  f"{name}.alpha": torch.tensor(1.0)})
    te = module_name(TE_LIN)
    t.update({f"{te}.lokr_w1": torch.randn(3, 1, generator=g), f"{te}.lokr_w2": torch.randn(1, 3, generator=g)})
    out_v = module_name(OUT_V)
    t.update({f"{out_v}.lora_up.weight": torch.randn(3, 1, generator=g),
              f"{out_v}.lora_down.weight": torch.randn(1, 768, generator=g)})
    save_file({k: v.contiguous() for k, v in t.items()}, str(path))
    return path


def test_loha_lokr_in_a_merge_are_lora_bake_on_the_fp32_merge_and_live_equals_file(models, sd15_listing, tmp_path):
    kinds = _kinds_lora(tmp_path / "kinds.safetensors")
    base = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.35, dtype="fp32", vae="a")
    merged = merge_to_file(base, tmp_path / "m32.safetensors").output
    baked = load(bake_loras(merged, [LoraInput(kinds, 0.6)], tmp_path / "b.safetensors").output)
    r = Recipe(**{**base.__dict__, "lora": [entry(kinds, 0.6)]})
    got = load(merge_to_file(r, tmp_path / "w.safetensors").output)
    assert got.keys() == baked.keys() and all(torch.equal(got[k], baked[k]) for k in got)
    plain = load(merged)
    assert sum(not torch.equal(got[k], plain[k]) for k in got) == 4
    session, module = _session(models, sd15_listing)
    try:
        session.apply(r)
        assert all(torch.equal(p.detach(), got[k]) for k, p in module.named_parameters())
        assert session.apply(Recipe(**{**base.__dict__, "lora": [entry(kinds, 0.1)]})).written == 4
    finally:
        session.close()


def test_sd2_openclip_qkv_thirds_in_a_merge(models, tmp_path):
    """q and v modules land in their thirds of the joined in_proj_weight, on the merged value."""
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    a = load(models["sd2_a"])
    d = a[key].shape[1]
    g = torch.Generator().manual_seed(9)
    t = {}
    for which in ("q", "v"):
        name = f"lora_te_text_model_encoder_layers_0_self_attn_{which}_proj"
        t[f"{name}.lora_up.weight"] = torch.randn(d, 1, generator=g)
        t[f"{name}.lora_down.weight"] = torch.randn(1, d, generator=g)
    lo = tmp_path / "qv.safetensors"
    save_file(t, str(lo))
    base = Recipe(models=[str(models["sd2_a"]), str(models["sd2_b"])], alpha=0.5, dtype="fp32")
    merged = load(merge_to_file(base, tmp_path / "m.safetensors").output)
    got = load(merge_to_file(Recipe(**{**base.__dict__, "lora": [entry(lo, 2.0)]}), tmp_path / "q.safetensors").output)
    for i, which in enumerate("qkv"):
        rows = slice(i * d, (i + 1) * d)
        if which == "k":
            assert torch.equal(got[key][rows], merged[key][rows])
            continue
        name = f"lora_te_text_model_encoder_layers_0_self_attn_{which}_proj"
        want = merged[key][rows] + 2.0 * (t[f"{name}.lora_up.weight"] @ t[f"{name}.lora_down.weight"])
        torch.testing.assert_close(got[key][rows], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,kw", [("ties", {"params": {"density": 0.5}}), ("add_difference", {})])
def test_streamed_and_three_model_modes_with_lora_live_equals_file(models, loras, sd15_listing, tmp_path, mode, kw):
    """TIES reads its inputs as mapped file views (streamed): the LoRA on top must not write through them."""
    l1, _ = loras
    names = [str(models[n]) for n in ("sd15_a", "sd15_b", "sd15_c")]
    r = Recipe(models=names, mode=mode, alpha=0.8, dtype="fp32", vae="a", lora=[entry(l1, 0.9)], **kw)
    plain = load(merge_to_file(Recipe(**{**r.__dict__, "lora": []}), tmp_path / "p.safetensors").output)
    got = load(merge_to_file(r, tmp_path / "f.safetensors").output)
    for key in LORA_KEYS:
        torch.testing.assert_close(got[key], plain[key] + 0.9 * delta(l1, key), rtol=1e-5, atol=1e-5, msg=key)
    session, module = _session(models, sd15_listing)
    try:
        session.apply(r)
        assert all(torch.equal(p.detach(), got[k]) for k, p in module.named_parameters())
    finally:
        session.close()
    again = load(merge_to_file(r, tmp_path / "again.safetensors").output)  # inputs untouched: the same again
    assert all(torch.equal(again[k], got[k]) for k in got)


def test_interrupted_strength_change_rolls_back_to_the_previous_lora_merge(models, loras, sd15_listing):
    from lib_merge.errors import MergeInterrupted
    l1, _ = loras
    session, module = _session(models, sd15_listing)
    params = dict(module.named_parameters())
    try:
        def r(s):
            return Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])], alpha=0.4, vae="a", lora=[entry(l1, s)])
        session.apply(r(0.7))
        merged = fingerprint(params)
        calls = []
        with pytest.raises(MergeInterrupted):
            session.apply(r(-0.3), cancel=lambda: calls.append(1) or len(calls) > 3)  # 5 keys to re-merge
        assert fingerprint(params) == merged and session.recipe.to_dict()["lora"][0]["strength"] == 0.7
        assert session.apply(r(0.7)).written == 0
    finally:
        session.close()


def test_file_sink_patches_plain_lora_by_blocks_of_rows_with_the_whole_tensor_numbers(models, loras, sd15_listing,
                                                                                      tmp_path, monkeypatch):
    """Plain-LoRA keys stream through the file sink block of rows by block (no whole fp32 copy): with one-row
    blocks every patched key is cut into several chunks, and the file still equals the live (whole-tensor)
    result bit for bit, in both the merge and the copy-from-A (lora bake) paths."""
    import lib_merge.lora.bake as B
    from lib_merge.io import filesink
    monkeypatch.setattr(B, "CHUNK_ELEMS", 4)  # row_step(cols) = 1 row for every patched key here
    l1, l2 = loras
    seen = []
    real = filesink.FileSink._patched_rows
    monkeypatch.setattr(filesink.FileSink, "_patched_rows",
                        lambda self, task, scratch, out: seen.append((task.kp.key, task.elem_start))
                        or real(self, task, scratch, out))
    for mode_kw in ({"alpha": 0.3}, {"mode": "no_interpolation", "models": [str(models["sd15_a"])]}):
        r = Recipe(**{"models": [str(models["sd15_a"]), str(models["sd15_b"])], "dtype": "fp32", "vae": "a",
                      "lora": [entry(l1, 0.7), entry(l2, -1.2)], **mode_kw})
        seen.clear()
        out = tmp_path / f"rows_{mode_kw.get('mode', 'ws')}.safetensors"
        saved = load(merge_to_file(r, out).output)
        assert {(OUT_V, 768), (OUT_V, 2 * 768), (CONV3, 27)} <= set(seen)  # several row blocks per key
        session, module = _session(models, sd15_listing)
        try:
            session.apply(r)
            for k, p in module.named_parameters():
                assert torch.equal(p.detach(), saved[k]), k
        finally:
            session.close()
        a = load(models["sd15_a"])[OUT_V].float() if "mode" in mode_kw else lerp(models, OUT_V, 0.3)
        torch.testing.assert_close(saved[OUT_V], a + 0.7 * delta(l1, OUT_V) - 1.2 * delta(l2, OUT_V),
                                   rtol=1e-5, atol=1e-5)
