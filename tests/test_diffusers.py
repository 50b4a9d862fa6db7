"""Diffusers folders as inputs and outputs (issue 14 §2): the key tables, folder input (safetensors, fp16
variant, .bin through the safe loader), round trips, mixed merges, strict loads by the diffusers package."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_merge import synthetic as S
from lib_merge.errors import MergeError
from lib_merge.folder_output import convert_to_folder, merge_to_folder
from lib_merge.io.diffusers.keymap import COMPONENTS, component_map, diffusers_shape, to_diffusers
from lib_merge.io.sources import open_source
from lib_merge.merge import merge_to_file

CONFIGS = Path(__file__).resolve().parents[1] / "lib_merge" / "io" / "diffusers" / "configs"


def sd2_listing(sd15: S.Listing, sdxl: S.Listing) -> S.Listing:
    """SD2's real layout in tiny shapes: SD1's UNet with a 1024-wide context and a 24-block OpenCLIP encoder
    (SDXL's second encoder renamed, its blocks 24..31 left out)."""
    out = {k: v for k, v in S.as_sd2(sd15).items() if not k.startswith("cond_stage_model.")}
    src = "conditioner.embedders.1.model."
    for k, v in sdxl.items():
        if k.startswith(src):
            rest = k[len(src):]
            if rest.startswith("transformer.resblocks.") and int(rest.split(".")[2]) >= 24:
                continue
            out["cond_stage_model.model." + rest] = v
    return out


def joined_qkv(listing: S.Listing) -> S.Listing:
    """OpenCLIP's ``in_proj`` with 3 × width rows, as in real files (``tiny`` shrinks it to the width)."""
    out = dict(listing)
    for k, (shape, dt) in listing.items():
        if k.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            width = listing[k.rsplit(".attn.", 1)[0] + ".ln_1.weight"][0][0]
            out[k] = ((3 * width, *shape[1:]), dt)
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, sd15_listing, sdxl_listing):
    d = tmp_path_factory.mktemp("layouts")
    return {name: S.write_checkpoint(d / f"{name}.safetensors", joined_qkv(listing), seed=7)
            for name, listing in [("sd1", sd15_listing), ("sd2", sd2_listing(sd15_listing, sdxl_listing)),
                                  ("sdxl", sdxl_listing)]}


def write_component(folder: Path, arch: str, comp: str, ldm: Path, name: str = "model.safetensors") -> Path:
    """A component file under its diffusers names, made from a single file through the tables."""
    cmap = component_map(arch, comp)
    tensors = {}
    with open_source(ldm) as src:
        for key, rows in cmap.by_ldm.items():
            if key in src.infos:
                for r in rows:
                    tensors[r.diffusers] = to_diffusers(r, src.read(key)).contiguous()
    (folder / comp).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / comp / name))
    return folder / comp / name


def folder_from(ldm: Path, folder: Path, arch: str) -> Path:
    names = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}
    for comp in COMPONENTS[arch]:
        write_component(folder, arch, comp, ldm, names.get(comp, "model.safetensors"))
    (folder / "model_index.json").write_text("{}")
    return folder


def tensors_equal(a: Path, b: Path, keys=None) -> list[str]:
    """Keys whose dtype, shape or bytes differ (bit-exact comparison)."""
    bad = []
    with open_source(a) as sa, open_source(b) as sb:
        for k in keys if keys is not None else sa.infos:
            ia, ib = sa.infos[k], sb.infos[k]
            if (ia.dtype, ia.shape) != (ib.dtype, ib.shape) or not torch.equal(
                    sa.read(k).reshape(-1).view(torch.uint8), sb.read(k).reshape(-1).view(torch.uint8)):
                bad.append(k)
    return bad


# -- the tables ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,listing", [("sd1", "sd15"), ("sd2", "sd15"), ("sdxl", "sdxl")])
@pytest.mark.parametrize("comp", ["unet", "vae"])
def test_tables_name_every_parameter_of_full_size_diffusers_models(arch, listing, comp):
    """The shipped full-size configs, built by diffusers on the meta device: the table's diffusers names are
    exactly the model's state-dict keys, and each real single-file shape transforms into the model's shape."""
    diffusers = pytest.importorskip("diffusers")
    cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL}[comp]
    with torch.device("meta"):
        model = cls.from_config(json.loads((CONFIGS / arch / comp / "config.json").read_text()))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ldm = S.load_listing(listing)
    got = {}
    for key, rows in component_map(arch, comp).by_ldm.items():
        shape = ldm[key][0]
        if arch == "sd2" and comp == "unet":  # SD2: linear proj_in/proj_out, 1024-wide context
            shape = shape[:2] if key.endswith(("proj_in.weight", "proj_out.weight")) else shape
            shape = (shape[0], 1024) if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else shape
        for r in rows:
            got[r.diffusers] = diffusers_shape(r, tuple(shape), key)
    assert got == want


def test_tables_cover_the_real_single_file_layouts():
    """Every key of the real SD1.5 / SDXL listings has a diffusers home except OpenCLIP's logit_scale."""
    for arch, listing in [("sd1", "sd15"), ("sdxl", "sdxl")]:
        homes = {k for c in COMPONENTS[arch] for k in component_map(arch, c).by_ldm}
        assert sorted(set(S.load_listing(listing)) - homes) == (
            [] if arch == "sd1" else ["conditioner.embedders.1.model.logit_scale"])
    te = component_map("sdxl", "text_encoder_2").by_ldm
    qkv = te["conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight"]
    assert [r.diffusers for r in qkv] == [f"text_model.encoder.layers.5.self_attn.{p}_proj.weight" for p in "qkv"]
    assert te["conditioner.embedders.1.model.text_projection"][0].transform == "T"
    sd2 = component_map("sd2", "text_encoder").by_ldm
    assert "cond_stage_model.model.transformer.resblocks.22.ln_1.weight" in sd2
    assert "cond_stage_model.model.transformer.resblocks.23.ln_1.weight" not in sd2  # diffusers keeps 23 blocks
    assert "cond_stage_model.model.text_projection" not in sd2


def test_tables_are_what_the_generator_writes(tmp_path, monkeypatch):
    from lib_merge.io.diffusers import gen_maps
    monkeypatch.setattr(gen_maps, "MAPS", tmp_path)
    gen_maps.main()
    for p in sorted(tmp_path.rglob("*.tsv")):
        assert p.read_text() == (gen_maps.Path(gen_maps.__file__).parent / "maps" / p.relative_to(tmp_path)).read_text()


# -- folder input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_folder_reads_as_its_single_file(layouts, tmp_path, arch):
    """A diffusers folder opens like a checkpoint with LDM names; every tensor equals the single file's
    (q/k/v joined back, the text projection transposed back, the VAE attention back to 1×1 convs)."""
    ldm = layouts[arch]
    folder = folder_from(ldm, tmp_path / "f", arch)
    with open_source(folder) as src, open_source(ldm) as ref:
        assert src.arch == arch
        homes = {k for c in COMPONENTS[arch] for k in component_map(arch, c).by_ldm}
        assert set(src.infos) == set(ref.infos) & homes
        for k in src.infos:
            assert (src.infos[k].dtype, src.infos[k].shape) == (ref.infos[k].dtype, ref.infos[k].shape), k
            assert torch.equal(src.read(k), ref.read(k)), k
        k = next(k for k in src.infos if k.endswith("in_proj_weight")) if arch != "sd1" else None
        if k:  # chunked reads across the q/k/v boundary
            buf = torch.empty(src.infos[k].nbytes, dtype=torch.uint8)
            n = src.infos[k].numel
            part = src.read_bytes_into(k, buf, 1, n - 2)
            assert torch.equal(part, ref.read(k).reshape(-1)[1:n - 1])


def test_fp16_variant_and_preference(layouts, tmp_path):
    """``*.fp16.safetensors`` is read when it is the only weight file; the full-precision file wins otherwise."""
    folder = folder_from(layouts["sd1"], tmp_path / "f", "sd1")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(unet)).items()}
    marker = "conv_in.bias"
    half[marker] = torch.full_like(half[marker], 7.0)
    save_file(half, str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    key = "model.diffusion_model.input_blocks.0.0.bias"
    with open_source(folder) as src:
        assert not torch.all(src.read(key) == 7)
    unet.unlink()
    with open_source(folder) as src:
        assert src.infos[key].dtype == "F16" and torch.all(src.read(key) == 7)


def test_sharded_weights_and_old_vae_attention_names(layouts, tmp_path):
    """A sharded UNet (``*.safetensors.index.json``) and a VAE saved with diffusers' pre-0.14 attention names
    (query/key/value/proj_attn) read as the single file."""
    folder = folder_from(layouts["sd1"], tmp_path / "f", "sd1")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(unet))
    keys = sorted(t)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:300],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[300:]}
    for name, ks in shards.items():
        save_file({k: t[k] for k in ks}, str(folder / "unet" / name))
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    unet.unlink()
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    renamed = {}
    for k, v in load_file(str(vae)).items():
        for new, legacy in old.items():
            k = k.replace(f"attentions.0.{new}", f"attentions.0.{legacy}")
        renamed[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    save_file(renamed, str(vae))
    with open_source(folder) as got, open_source(layouts["sd1"]) as ref:
        assert set(got.infos) == set(ref.infos) and not got.notes
        assert all(torch.equal(got.read(k), ref.read(k)) for k in got.infos)


def test_bin_weights_through_the_safe_loader(layouts, tmp_path):
    folder = folder_from(layouts["sd1"], tmp_path / "f", "sd1")
    for comp, stem in [("unet", "diffusion_pytorch_model"), ("text_encoder", "pytorch_model")]:
        src = next((folder / comp).glob("*.safetensors"))
        torch.save(load_file(str(src)), folder / comp / f"{stem}.bin")
        src.unlink()
    with open_source(folder) as got, open_source(layouts["sd1"]) as ref:
        assert len(got.infos) == len(ref.infos)
        assert all(torch.equal(got.read(k), ref.read(k)) for k in got.infos)


def test_malicious_bin_is_refused(layouts, tmp_path):
    folder = folder_from(layouts["sd1"], tmp_path / "f", "sd1")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    payload = f"cos\nsystem\n(Vtouch {marker}\ntR0".encode()
    raw = pickle.dumps({"x": 1}, protocol=2)
    evil = raw[:2] + payload + raw[2:]  # runs os.system before building the dict, under stock pickle
    bin_path = folder / "vae" / "diffusion_pytorch_model.bin"
    bin_path.write_bytes(evil)
    with pytest.raises(MergeError) as e:
        open_source(folder)
    msg = str(e.value)
    assert "\n" not in msg and "os.system" in msg and msg.endswith(str(bin_path))
    assert not marker.exists()


def test_folder_errors(tmp_path, layouts):
    (tmp_path / "plain").mkdir()
    with pytest.raises(MergeError, match=r"not a diffusers model .*plain$"):
        open_source(tmp_path / "plain")
    folder = folder_from(layouts["sdxl"], tmp_path / "f", "sdxl")
    te = folder / "text_encoder_2" / "model.safetensors"
    t = load_file(str(te))
    del t["text_model.encoder.layers.3.self_attn.k_proj.weight"]
    save_file(t, str(te))
    with pytest.raises(MergeError, match=r"k_proj.weight is missing, .*text_encoder_2$"):
        open_source(folder)


def test_unknown_diffusers_tensors_are_reported(layouts, tmp_path, sd15_listing):
    folder = folder_from(layouts["sd1"], tmp_path / "f", "sd1")
    te = folder / "text_encoder" / "model.safetensors"
    t = load_file(str(te))
    t["text_model.extra.weight"] = torch.zeros(2)
    save_file(t, str(te))
    b = S.write_checkpoint(tmp_path / "b.safetensors", sd15_listing, seed=3)
    res = merge_to_file({"models": [str(folder), str(b)]}, tmp_path / "o.safetensors")
    assert any("1 text_encoder tensor(s) with no single-file name left out (first: text_model.extra.weight)" in n
               for n in res.plan.report.notes)


def test_folder_hash_is_stable_and_content_based(layouts, tmp_path):
    from lib_merge import hashing
    folder = folder_from(layouts["sd1"], tmp_path / "f", "sd1")
    h1 = hashing.sha256_file(folder)
    (folder / "model_index.json").write_text('{"changed": true}')  # not weights: same hash
    assert hashing.sha256_file(folder) == h1
    assert hashing.paths_with(h1)[0] == [str(folder.resolve())]
    copy = folder_from(layouts["sd1"], tmp_path / "g", "sd1")
    assert hashing.sha256_file(copy) == h1
    w = copy / "vae" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(w))
    t["encoder.conv_in.bias"] = t["encoder.conv_in.bias"] + 1
    save_file(t, str(w))
    assert hashing.sha256_file(copy) != h1
    assert hashing.legacy_hash(folder) == h1[:8]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_mixed_merge_equals_merge_of_single_files(layouts, tmp_path, sd15_listing, sdxl_listing, arch):
    """folder A + file B gives the same tensors as file A + file B, bit for bit; also B as the folder."""
    listing = joined_qkv(sd15_listing if arch == "sd1" else sdxl_listing)
    a = layouts[arch]
    b = S.write_checkpoint(tmp_path / "b.safetensors", listing, seed=99)
    fa = folder_from(a, tmp_path / "fa", arch)
    fb = folder_from(b, tmp_path / "fb", arch)
    recipe = {"mode": "weighted_sum", "alpha": 0.3, "weights": "GRAD_V"}
    ref = merge_to_file({**recipe, "models": [str(a), str(b)]}, tmp_path / "ref.safetensors")
    for n, models in enumerate([[fa, b], [a, fb], [fa, fb]]):
        got = merge_to_file({**recipe, "models": [str(m) for m in models]}, tmp_path / f"got{n}.safetensors")
        with open_source(got.output) as g:
            keys = sorted(g.infos)
        homes = {k for c in COMPONENTS[arch] for k in component_map(arch, c).by_ldm}
        with open_source(ref.output) as r:  # A's keys without a home (logit_scale) are kept only from a file A
            assert set(keys) == (set(r.infos) & homes if models[0] != a else set(r.infos))
        assert tensors_equal(got.output, ref.output, sorted(set(keys) & homes)) == []


# -- folder output -------------------------------------------------------------------------------------------------
def to_single(folder: Path, out: Path) -> Path:
    return merge_to_file({"models": [str(folder)], "mode": "no_interpolation"}, out).output


@pytest.mark.parametrize("arch,dropped", [("sd1", []), ("sdxl", ["conditioner.embedders.1.model.logit_scale"]),
                                          ("sd2", [*(f"cond_stage_model.model.transformer.resblocks.23.{n}" for n in (
                                              "attn.in_proj_bias", "attn.in_proj_weight", "attn.out_proj.bias",
                                              "attn.out_proj.weight", "ln_1.bias", "ln_1.weight", "ln_2.bias",
                                              "ln_2.weight", "mlp.c_fc.bias", "mlp.c_fc.weight", "mlp.c_proj.bias",
                                              "mlp.c_proj.weight")),
                                               "cond_stage_model.model.logit_scale",
                                               "cond_stage_model.model.text_projection"])])
def test_round_trip_single_diffusers_single_is_bit_identical(layouts, tmp_path, arch, dropped):
    """single file -> diffusers folder -> single file: every tensor with a diffusers home comes back with the
    same dtype, shape and bytes; the ones without are named in a note."""
    res = convert_to_folder(layouts[arch], tmp_path / "model")
    assert res.output == tmp_path / "model" and res.output.is_dir()
    back = to_single(res.output, tmp_path / "back.safetensors")
    with open_source(layouts[arch]) as ref, open_source(back) as got:
        assert sorted(set(ref.infos) - set(got.infos)) == sorted(dropped)
        assert set(got.infos) <= set(ref.infos)
        keys = sorted(got.infos)
    assert tensors_equal(layouts[arch], back, keys) == []
    if dropped:
        assert any(f"{len(dropped)} tensor(s) with no diffusers name not written" in n for n in res.notes)
    files = sorted(p.relative_to(res.output).as_posix() for p in res.output.rglob("*") if p.is_file())
    comps = COMPONENTS[arch]
    assert files == sorted(["model_index.json", "scheduler/scheduler_config.json"]
                           + [f"{c}/config.json" for c in comps]
                           + [f"{c}/{'model' if c.startswith('text') else 'diffusion_pytorch_model'}.safetensors"
                              for c in comps])
    tok = "tokenizer/, tokenizer_2/" if arch == "sdxl" else "tokenizer/"
    assert any(n.startswith(f"diffusers folder: add {tok} (vocab.json") for n in res.notes)
    from lib_merge import hashing
    assert res.sha256 == hashing.sha256_file(res.output)


def test_written_configs_take_sizes_from_the_weights(layouts, tmp_path, models):
    inpaint = convert_to_folder(models["inpaint"], tmp_path / "inpaint")
    assert json.loads((inpaint.output / "unet" / "config.json").read_text())["in_channels"] == 9
    res = convert_to_folder(layouts["sdxl"], tmp_path / "m")
    unet = json.loads((res.output / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [3, 3, 3] and unet["cross_attention_dim"] == 2048
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["addition_embed_type"] == "text_time"
    te2 = json.loads((res.output / "text_encoder_2" / "config.json").read_text())
    assert (te2["num_hidden_layers"], te2["hidden_size"], te2["projection_dim"]) == (32, 3, 3)
    index = json.loads((res.output / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


def test_merge_to_folder_copies_a_diffusers_inputs_support_files(layouts, tmp_path, sd15_listing):
    fa = folder_from(layouts["sd1"], tmp_path / "fa", "sd1")
    (fa / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                     "safety_checker": ["x", "y"], "unet": ["diffusers", "U"]}))
    (fa / "tokenizer").mkdir()
    (fa / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    (fa / "scheduler").mkdir()
    (fa / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    (fa / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "mine": 1}')
    (fa / "safety_checker").mkdir()
    (fa / "safety_checker" / "model.safetensors").write_bytes(b"x")
    b = S.write_checkpoint(tmp_path / "b.safetensors", sd15_listing, seed=5)
    res = merge_to_folder({"models": [str(fa), str(b)], "alpha": 0.25}, tmp_path / "out")
    out = res.output
    assert (out / "tokenizer" / "vocab.json").read_text() == '{"a": 1}'
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == {"_class_name": "DDIMScheduler"}
    assert json.loads((out / "unet" / "config.json").read_text())["mine"] == 1
    assert json.loads((out / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"  # shipped
    assert not (out / "safety_checker").exists()
    assert json.loads((out / "model_index.json").read_text())["safety_checker"] == [None, None]
    assert any("safety_checker/ not copied" in n for n in res.plan.report.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "fa", "out"]  # no temp file or folder left
    # the folder holds the merge: the same tensors as the single-file merge, and its recipe in the UNet header
    ref = merge_to_file({"models": [str(fa), str(b)], "alpha": 0.25}, tmp_path / "ref.safetensors")
    back = to_single(out, tmp_path / "back.safetensors")
    with open_source(back) as s:
        assert tensors_equal(ref.output, back, sorted(s.infos)) == []
    with open_source(out / "unet" / "diffusion_pytorch_model.safetensors") as u:
        assert json.loads(u.metadata["blockmerge_recipe"])["alpha"] == 0.25
        assert u.metadata["format"] == "pt"


def test_broken_configs_of_a_diffusers_input_are_one_line_errors(layouts, tmp_path):
    fa = folder_from(layouts["sd1"], tmp_path / "fa", "sd1")
    for path in (fa / "model_index.json", fa / "unet" / "config.json"):
        path.write_text("{not json")
        with pytest.raises(MergeError) as e:
            convert_to_folder(fa, tmp_path / "out")
        assert str(e.value) == f"cannot read {path.name} (JSONDecodeError), {path}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fa"]
        path.write_text("{}")


def test_folder_output_refusals(layouts, tmp_path):
    a = layouts["sd1"]
    fa = folder_from(a, tmp_path / "fa", "sd1")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    cases = [
        (tmp_path / "taken", "output exists (use --overwrite to replace it), "),
        (fa, "output would write into or replace an input model, "),
        (fa / "unet" / "sub", "output would write into or replace an input model, "),
        (tmp_path / "x.safetensors", "--format diffusers writes a folder; the output looks like a file name, "),
        (tmp_path / "nope" / "out", "output folder's parent does not exist, "),
    ]
    for out, msg in cases:
        for call in (lambda: merge_to_folder({"models": [str(fa), str(a)]}, out, overwrite=out == fa),
                     lambda: convert_to_folder(fa, out)):
            with pytest.raises(MergeError) as e:
                call()
            want = msg + str(out.parent if "parent" in msg else out)
            assert str(e.value) == want
    with pytest.raises(MergeError, match="output would write into or replace an input model"):
        merge_to_folder({"models": [str(fa), str(a)]}, tmp_path, overwrite=True)  # the output holds an input
    assert (tmp_path / "taken" / "keep.txt").exists()
    res = convert_to_folder(a, tmp_path / "taken", overwrite=True)
    assert not (res.output / "keep.txt").exists() and (res.output / "unet" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fa", "taken"]


def test_interrupted_write_leaves_nothing(layouts, tmp_path):
    from lib_merge.errors import MergeInterrupted
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 5

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("x")
    for out, overwrite in [(tmp_path / "new", False), (tmp_path / "old", True)]:
        calls.clear()
        with pytest.raises(MergeInterrupted):
            convert_to_folder(layouts["sd1"], out, overwrite=overwrite, cancel=cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old" / "keep.txt").read_text() == "x"


# -- command line --------------------------------------------------------------------------------------------------
def cli(*args):
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-m", "lib_merge", *map(str, args)], capture_output=True, text=True, env=env)


def test_cli_merge_format_diffusers_inspect_and_lora(layouts, tmp_path, sd15_listing):
    a = layouts["sd1"]
    fa = folder_from(a, tmp_path / "fa", "sd1")
    b = S.write_checkpoint(tmp_path / "b.safetensors", sd15_listing, seed=4)
    out = tmp_path / "merged"
    r = cli("merge", fa, b, "--format", "diffusers", "-o", out, "--alpha", "0.4")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} (" in r.stdout and "sha256" in r.stdout
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    r = cli("merge", fa, b, "--format", "diffusers", "-o", out)
    assert (r.returncode, r.stderr.strip()) == (2, f"error: output exists (use --overwrite to replace it), {out}")
    r = cli("merge", fa, b, "--format", "diffusers", "-o", fa / "unet", "--overwrite")
    assert (r.returncode, r.stderr.strip()) == (2, f"error: output would write into or replace an input model, "
                                                   f"{fa / 'unet'}")
    r = cli("inspect", out, "--json")
    info = json.loads(r.stdout)
    assert info["architecture"] == "sd1" and info["keys"] == 1131
    assert json.loads(info["metadata"]["blockmerge_recipe"])["alpha"] == 0.4
    r = cli("merge", fa, b, "-o", tmp_path / "m.safetensors", "--alpha", "0.4")  # folder in, file out
    assert r.returncode == 0, r.stderr
    back = to_single(out, tmp_path / "back.safetensors")
    assert tensors_equal(tmp_path / "m.safetensors", back) == []
    r = cli("lora", "extract", fa, b, "-o", tmp_path / "l.safetensors", "--rank", "2")
    assert r.returncode == 0, r.stderr
    r = cli("lora", "bake", fa, f"{tmp_path / 'l.safetensors'}:0.5", "-o", tmp_path / "baked.safetensors")
    assert r.returncode == 0, r.stderr
    (tmp_path / "plain").mkdir()
    r = cli("merge", tmp_path / "plain", b, "-o", tmp_path / "x.safetensors")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: model path is a folder but not a diffusers model (no model_index.json or unet/config.json), "
        f"{tmp_path / 'plain'}")


# -- independent check: the diffusers package loads what we write, strict=True ---------------------------------
SMALL_VAE = {"block_out_channels": [32, 32, 64, 64], "sample_size": 32}
SMALL_UNET = {
    "sd1": {"block_out_channels": [32, 32, 64, 64], "sample_size": 8},
    "sd2": {"block_out_channels": [32, 32, 64, 64], "attention_head_dim": [2, 2, 4, 4], "sample_size": 8},
    "sdxl": {"block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4], "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 16 + 6 * 8, "sample_size": 8},
}


def diffusers_models(arch: str, seed: int):
    """A small UNet2DConditionModel and AutoencoderKL of the real structure (the shipped config with small
    channel counts), random weights, built by diffusers itself."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    cfg = {**json.loads((CONFIGS / arch / "unet" / "config.json").read_text()), **SMALL_UNET[arch]}
    unet = diffusers.UNet2DConditionModel.from_config(cfg)
    vae = diffusers.AutoencoderKL.from_config({**json.loads((CONFIGS / arch / "vae" / "config.json").read_text()),
                                               **SMALL_VAE})
    with torch.no_grad():  # zero-initialised layers (conv_out, proj_out) get values too, so every tensor counts
        for p in [*unet.parameters(), *vae.parameters()]:
            p.add_(torch.randn_like(p) * 0.02)
    return unet.eval(), vae.eval()


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_diffusers_loads_our_folder_strict_and_computes_the_same(tmp_path, arch):
    """diffusers saves a small model; we read its folder, write a single file, write that back as a folder with
    our configs (sizes from the weights, head counts of the small model as overrides), and diffusers builds
    the models from our config.json files and loads our weights with strict=True: every tensor and a forward
    pass equal the original's."""
    unet, vae = diffusers_models(arch, seed=3)
    src = tmp_path / "src"
    unet.save_pretrained(src / "unet")
    vae.save_pretrained(src / "vae")
    single = to_single(src, tmp_path / "single.safetensors")
    with open_source(single) as s:
        assert sum(k.startswith("model.diffusion_model.") for k in s.infos) == len(unet.state_dict())
        assert sum(k.startswith("first_stage_model.") for k in s.infos) == len(vae.state_dict())
    keep = {k: v for k, v in SMALL_UNET[arch].items() if k in ("attention_head_dim", "addition_time_embed_dim")}
    out = convert_to_folder(single, tmp_path / "out", overrides={"unet": keep}).output
    import diffusers
    for comp, model, cls in [("unet", unet, diffusers.UNet2DConditionModel), ("vae", vae, diffusers.AutoencoderKL)]:
        cfg = json.loads((out / comp / "config.json").read_text())
        mine = cls.from_config(cfg).eval()
        weights = load_file(str(out / comp / "diffusion_pytorch_model.safetensors"))
        mine.load_state_dict(weights, strict=True)
        ref = model.state_dict()
        assert all(torch.equal(weights[k], ref[k]) for k in ref)
    ctx = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[arch]
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, ctx)
    kw = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 16), "time_ids": torch.randn(1, 6)}} if arch == "sdxl" else {}
    # from_pretrained loads the folder as a user would; its parameters are views of the mapped file, whose
    # alignment picks a different CPU conv kernel (summation order: 2e-6 apart on an AVX-512 machine), so the
    # forward pass runs on copies in freshly allocated (aligned) parameters: equal bits to the original's.
    mine_unet = aligned(diffusers.UNet2DConditionModel.from_pretrained(out / "unet").eval())
    mine_vae = aligned(diffusers.AutoencoderKL.from_pretrained(out / "vae").eval())
    with torch.no_grad():
        assert torch.equal(mine_unet(x, t, c, **kw).sample, unet(x, t, c, **kw).sample)
        img = torch.randn(1, 3, 16, 16)
        assert torch.equal(mine_vae.decode(mine_vae.encode(img).latent_dist.mean).sample,
                           vae.decode(vae.encode(img).latent_dist.mean).sample)


def aligned(model):
    """``model`` with every parameter and buffer copied into memory torch allocates."""
    with torch.no_grad():
        for p in [*model.parameters(), *model.buffers()]:
            p.data = p.data.clone()
    return model


def test_reproduce_finds_a_folder_input_by_hash_and_by_name(layouts, tmp_path, sd15_listing):
    """A merge of a folder records the folder's name and content hash; reproduce finds it through the hash
    cache, and after a move by its name in a --search folder."""
    import os
    from lib_merge import hashing
    from lib_merge.reproduce import reproduce
    fa = folder_from(layouts["sd1"], tmp_path / "fa", "sd1")
    b = S.write_checkpoint(tmp_path / "b.safetensors", sd15_listing, seed=8)
    res = merge_to_file({"models": [str(fa), str(b)], "alpha": 0.6}, tmp_path / "m.safetensors")
    models = json.loads(res.metadata["sd_merge_models"])
    assert models[hashing.sha256_file(fa)]["name"] == "fa"
    ok, new, msg = reproduce(str(res.output))
    assert ok, msg
    os.unlink(new)
    (tmp_path / "moved").mkdir()
    os.rename(fa, tmp_path / "moved" / "fa")
    ok, new, msg = reproduce(str(res.output), search=[str(tmp_path / "moved")])
    assert ok, msg


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_written_weights_equal_diffusers_own_single_file_conversion(layouts, tmp_path, arch):
    """Independent of our tables: diffusers' own single-file converters (``diffusers.loaders.single_file_utils``)
    turn the same single file into the same diffusers tensors, name for name and bit for bit."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from types import SimpleNamespace
    ldm = load_file(str(layouts[arch]))
    out = convert_to_folder(layouts[arch], tmp_path / "out").output
    unet_cfg = json.loads((CONFIGS / arch / "unet" / "config.json").read_text())
    vae_cfg = json.loads((CONFIGS / arch / "vae" / "config.json").read_text())
    theirs = {"unet": sfu.convert_ldm_unet_checkpoint(ldm, unet_cfg), "vae": sfu.convert_ldm_vae_checkpoint(ldm, vae_cfg)}
    hidden = SimpleNamespace(config=SimpleNamespace(hidden_size=3))
    if arch == "sd1":
        theirs["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ldm)
    elif arch == "sd2":
        theirs["text_encoder"] = sfu.convert_open_clip_checkpoint(hidden, ldm, prefix="cond_stage_model.model.")
    else:
        theirs["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ldm)
        theirs["text_encoder_2"] = sfu.convert_open_clip_checkpoint(hidden, ldm, prefix="conditioner.embedders.1.model.")
    if arch == "sd2":  # diffusers' list of keys to skip names only SD2's 24th block; the tiny layout has no more
        theirs["text_encoder"] = {k: v for k, v in theirs["text_encoder"].items() if ".layers.23." not in k}
    for comp, want in theirs.items():
        name = "model.safetensors" if comp.startswith("text") else "diffusion_pytorch_model.safetensors"
        got = load_file(str(out / comp / name))
        assert sorted(got) == sorted(want), comp
        assert [k for k in want if not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k].contiguous()))] == []


def test_folder_in_a_merge_chain_and_a_chain_written_as_a_folder(layouts, tmp_path, sd15_listing):
    """A diffusers folder as a model of a nested step, and a chain merged into a diffusers folder: the same
    tensors as the chain over the single files."""
    a = layouts["sd1"]
    fa = folder_from(a, tmp_path / "fa", "sd1")
    b = S.write_checkpoint(tmp_path / "b.safetensors", sd15_listing, seed=11)
    c = S.write_checkpoint(tmp_path / "c.safetensors", sd15_listing, seed=12)

    def chain(first):
        return {"models": [{"recipe": {"models": [str(first), str(b)], "alpha": 0.3}}, str(c)], "alpha": 0.5}
    ref = merge_to_file(chain(a), tmp_path / "ref.safetensors")
    out = merge_to_folder(chain(fa), tmp_path / "out").output
    back = to_single(out, tmp_path / "back.safetensors")
    assert tensors_equal(ref.output, back) == []
    with pytest.raises(MergeError, match="output would write into or replace an input model"):
        merge_to_folder(chain(fa), fa / "x")


def test_reproduce_of_a_merged_folder_writes_a_folder_with_the_same_content(layouts, tmp_path, sd15_listing, capsys):
    """A folder written by a merge (its recipe in the UNet header) reproduces as a folder beside it whose weight
    files have the same content hash; a changed weight file is reported, not accepted."""
    from lib_merge.cli import main
    from lib_merge.reproduce import reproduce
    fa = folder_from(layouts["sd1"], tmp_path / "fa", "sd1")
    b = S.write_checkpoint(tmp_path / "b.safetensors", sd15_listing, seed=8)
    out = tmp_path / "merged"
    res = merge_to_folder({"models": [str(fa), str(b)], "alpha": 0.35, "weights": "GRAD_V"}, out)
    ok, new, msg = reproduce(str(out))
    assert ok, msg
    assert new == tmp_path / "merged.reproduced" and (new / "model_index.json").is_file()
    assert msg.startswith(f"identical: {new} has sha256 {res.sha256}")
    assert tensors_equal(out / "unet" / "diffusion_pytorch_model.safetensors",
                         new / "unet" / "diffusion_pytorch_model.safetensors") == []
    assert main(["reproduce", str(out), "-o", str(tmp_path / "again"), "-q"]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["reproduce", str(out), "-o", str(tmp_path / "again"), "-q"]) == 2  # exists: not overwritten
    assert "exists" in capsys.readouterr().err
    vae = out / "vae" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(vae))
    first = sorted(t)[0]
    t[first] = t[first] + 1
    save_file(t, str(vae))
    ok, _, msg = reproduce(str(out), str(tmp_path / "third"))
    assert not ok and msg.startswith("DIFFERENT: ")
