"""BlockMerge on Forge, against a stand-in (tests/forge_stub) of Forge's model objects: its attribute paths, its
parameter names (text encoders in transformers' layout, OpenCLIP's in_proj split into q/k/v, text_projection
transposed), inference tensors, lazy loading, and its LoRA loader that replaces Parameter objects. The service
code is the real one; the A1111 stand-in (tests/webui_stub) provides the rest of ``modules``."""
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FORGE_STUB = Path(__file__).resolve().parent / "forge_stub"
UNET = "model.diffusion_model."


@pytest.fixture
def forge(webui_stub, models, monkeypatch):
    """Forge: ``modules_forge`` importable, Forge's model data and loader; synthA/B/C of ``kind`` listed and
    selected (not loaded: Forge loads at the first generation)."""
    monkeypatch.syspath_prepend(str(FORGE_STUB))
    for name in [n for n in sys.modules if n in ("backend", "modules_forge", "forge_sim")
                 or n.startswith(("backend.", "modules_forge."))]:
        monkeypatch.delitem(sys.modules, name)
    import forge_sim
    from modules import script_callbacks, shared, processing
    from lib_merge.webui import service as service_mod
    sdm = webui_stub
    data = forge_sim.install(sdm, monkeypatch)

    def use(kind: str):
        ckdir = Path(sdm.model_path)
        for f in ckdir.iterdir():
            f.unlink()
        for src, dst in ((f"{kind}_a", "synthA"), (f"{kind}_b", "synthB"), (f"{kind}_c", "synthC")):
            if src in models:
                shutil.copy(models[src], ckdir / f"{dst}.safetensors")
        sdm.list_models()
        forge_sim.select(sdm, "synthA")

    svc = service_mod.Service()
    monkeypatch.setattr(service_mod, "SERVICE", svc)
    script_callbacks.on_model_loaded(lambda m: service_mod.SERVICE.on_model_loaded(m))
    use("sd15")
    yield {"svc": svc, "sd_models": sdm, "data": data, "sim": forge_sim, "use": use, "shared": shared,
           "processing": processing,
           "generate": lambda lora=None: forge_sim.generate(sdm, lora, before_batch=lambda: svc.ensure_applied(None))}
    script_callbacks.clear_callbacks()
    processing.StableDiffusionProcessing.cached_c[:] = [None, None]


def target(f):
    from lib_merge.webui import host
    return host.make_target(f["data"].sd_model)


def fp(f) -> str:
    return f["svc"].fingerprint()["fingerprint"]


def file_floats(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if v.is_floating_point()}


# -- the target ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,te", [("sd15", "cond_stage_model.transformer."), ("sd2", "cond_stage_model.model."),
                                     ("sdxl", "conditioner.embedders.")])
def test_target_shows_each_live_parameter_under_its_file_key_with_the_file_values(forge, kind, te):
    from lib_merge.webui.forge_target import ForgeTarget
    f = forge
    f["use"](kind)
    f["sim"].generate(f["sd_models"])  # Forge loads at the first generation
    t = target(f)
    assert isinstance(t, ForgeTarget)
    a = file_floats(Path(f["sd_models"].model_path) / "synthA.safetensors")
    want = {k for k in a if k.startswith((UNET, te))}
    params = t.params()
    assert set(params) == want  # every UNet + text-encoder key of the file, the VAE never
    for k, v in params.items():
        assert v.shape == a[k].shape and v.is_contiguous(), k
        assert torch.equal(v, a[k].float()), k  # Forge's split / transposed tensors read back as the file's
    if kind == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in params
        assert "conditioner.embedders.1.model.text_projection" in params


def test_writes_through_file_keys_land_in_forges_split_and_transposed_parameters(forge):
    f = forge
    f["use"]("sdxl")
    f["sim"].generate(f["sd_models"])
    t = target(f)
    k_in = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    k_tp = "conditioner.embedders.1.model.text_projection"
    with t.write_context():
        p = t.params()
        p[k_in].copy_(torch.arange(p[k_in].numel(), dtype=torch.float32).reshape(p[k_in].shape))
        p[k_tp].copy_(torch.arange(p[k_tp].numel(), dtype=torch.float32).reshape(p[k_tp].shape))
    te = f["data"].sd_model.forge_objects.clip.cond_stage_model.clip_g.transformer
    layer = getattr(te.text_model.encoder.layers, "0").self_attn
    qkv = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
    assert torch.equal(qkv, torch.arange(qkv.numel(), dtype=torch.float32).reshape(qkv.shape))
    n = te.text_projection.weight.shape[0]
    assert torch.equal(te.text_projection.weight, torch.arange(n * n, dtype=torch.float32).reshape(n, n).t())
    assert t.params()[k_in].data_ptr() == t.params()[k_in].data_ptr()  # stable once joined


def test_forge_parameters_are_inference_tensors_like_forges(forge):
    f = forge
    f["sim"].generate(f["sd_models"])
    p = next(iter(target(f).params().values()))
    assert p.is_inference()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        with torch.no_grad():
            p.add_(1)


# -- the service on Forge ----------------------------------------------------------------------------------------
def test_first_test_merge_loads_forges_lazy_model(forge):
    f = forge
    assert f["data"].loads == 0 and not hasattr(f["data"].sd_model, "forge_objects")
    st = f["svc"].status()
    assert st["loaded"] is None and st["host"] == "forge" and st["selected"].startswith("synthA")
    res = f["svc"].test_merge({"model_b": "synthB", "preset": "GRAD_V"})
    assert res["live"] and f["data"].loads == 1
    assert f["svc"].status()["loaded"].startswith("synthA")


@pytest.mark.parametrize("kind,n_blocks", [("sd15", 26), ("sd2", 26), ("sdxl", 20)])
def test_merge_remerge_one_block_restore_bit_exact(forge, kind, n_blocks):
    from lib_merge.arch import ARCHS, block_of
    f = forge
    f["use"](kind)
    svc = f["svc"]
    before = fp(f)
    img0 = f["generate"]()
    vec = ["0.5"] * n_blocks
    res = svc.test_merge({"model_b": "synthB", "weights": ",".join(vec)})
    assert res["live"] and res["written"] > 0
    merged = fp(f)
    assert merged != before
    img1 = f["generate"]()
    assert any(not torch.equal(img0[k], img1[k]) for k in img0)  # the image changes
    reads = svc.status()["bytes_read"]
    arch = ARCHS["sdxl" if kind == "sdxl" else "sd1"]
    blk = "OUT05"
    vec[arch.blocks.index(blk)] = "1"
    res = svc.test_merge({"model_b": "synthB", "weights": ",".join(vec)})
    assert res["written"] == sum(1 for k in svc.session.keys if block_of(k, arch) == blk)
    assert svc.status()["bytes_read"] == reads
    out = svc.restore()
    assert out["restored"] > 0 and fp(f) == before and not svc.status()["live"]
    img2 = f["generate"]()
    assert all(torch.equal(img0[k], img2[k]) for k in img0)  # identical render after restore


def test_live_values_are_the_file_merge_and_save_equals_the_preview(forge):
    f = forge
    f["use"]("sdxl")
    svc = f["svc"]
    svc.test_merge({"model_b": "synthB", "preset": "GRAD_A", "elemental": "OUT03:attn2:0.1"})
    live = {k: v.detach().clone() for k, v in target(f).params().items()}
    res = svc.save("merged_fp32", dtype="fp32")
    saved = load_file(res["path"])
    assert all(torch.equal(saved[k], v) for k, v in live.items())
    assert "merged_fp32.safetensors" in f["sd_models"].checkpoint_aliases
    # the loaded checkpoint stays selected, spelt as Forge's dropdown lists it (its name, no hash)
    assert f["shared"].opts.data["sd_model_checkpoint"] == f["sd_models"].checkpoint_aliases["synthA"].name


def test_interrupt_midway_leaves_previous_state(forge, monkeypatch):
    from lib_merge.errors import MergeInterrupted
    from lib_merge.webui import host
    f = forge
    f["use"]("sdxl")
    svc = f["svc"]
    svc.test_merge({"model_b": "synthB", "alpha": 0.3})
    merged = fp(f)
    calls = []
    monkeypatch.setattr(host, "interrupted", lambda: calls.append(1) or len(calls) > 200)
    with pytest.raises(MergeInterrupted):
        svc.test_merge({"model_b": "synthB", "alpha": 0.7})
    assert fp(f) == merged and svc.status()["live"]
    monkeypatch.setattr(host, "interrupted", lambda: False)
    svc.restore()
    before_any = fp(f)
    calls.clear()
    monkeypatch.setattr(host, "interrupted", lambda: calls.append(1) or len(calls) > 200)
    with pytest.raises(MergeInterrupted):
        svc.test_merge({"model_b": "synthB", "alpha": 0.7})
    assert fp(f) == before_any and not svc.status()["live"]


def lora_for(f, scale=0.05):
    """A LoRA in Forge's patch form: deltas for UNet attention and text-encoder q/v projections (clip_g's q/k/v
    rows of a split in_proj included on SDXL)."""
    model = f["data"].sd_model
    g = torch.Generator().manual_seed(5)
    unet = {k: torch.randn(v.shape, generator=g) * scale
            for k, v in model.forge_objects.unet.model.named_parameters() if ".attn2.to_" in k}
    clip = {k: torch.randn(v.shape, generator=g) * scale
            for k, v in model.forge_objects.clip.cond_stage_model.named_parameters()
            if k.endswith(("q_proj.weight", "v_proj.weight"))}
    return ("lora_x", unet, clip)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_forge_lora_stays_on_top_of_the_live_merge(forge, kind):
    f = forge
    f["use"](kind)
    svc = f["svc"]
    gen = f["generate"]
    plain0 = gen()
    lora = lora_for(f)
    with_lora0 = gen(lora)  # LoRA baked into the weights: Parameters replaced, originals in the loader's backup
    assert any(not torch.equal(plain0[k], with_lora0[k]) for k in plain0)
    fp_orig = fp(f)  # folds the LoRA back: the fingerprint of A
    assert fp_orig == fp(f)
    svc.test_merge({"model_b": "synthB", "alpha": 0.4})  # reads A (LoRA folded back), no "differs from its file"
    merged_plain_fp = fp(f)
    with_lora1 = gen(lora)  # the same LoRA again: applied on top of the merge
    plain1 = gen()
    for k, v in with_lora1.items():
        short = k.split(".", 1)[1]
        delta = lora[1].get(short) if k.startswith("unet.") else lora[2].get(short)
        want = plain1[k] + delta if delta is not None else plain1[k]
        assert torch.allclose(v, want, atol=1e-6), k
    assert any(not torch.equal(plain0[k], plain1[k]) for k in plain0)  # the merge is there
    assert fp(f) == merged_plain_fp  # the LoRA's own restore did not undo the merge
    gen(lora)
    assert svc.test_merge({"model_b": "synthB", "alpha": 0.6})["live"]  # re-merge while the LoRA is baked
    svc.restore()
    assert fp(f) == fp_orig
    with_lora2 = gen(lora)
    plain2 = gen()
    assert all(torch.equal(with_lora0[k], with_lora2[k]) for k in with_lora0)
    assert all(torch.equal(plain0[k], plain2[k]) for k in plain0)


def test_forge_reload_drops_then_generation_reapplies(forge):
    """Forge builds a new model object when the loading parameters change; a generation that started with the
    merge re-applies it (sentinels checked before the batch)."""
    f = forge
    svc = f["svc"]
    svc.test_merge({"model_b": "synthB", "alpha": 0.5})
    merged = fp(f)
    svc.begin_generation()
    f["sim"].select(f["sd_models"], "synthB")  # e.g. a checkpoint axis cell, then back to A
    f["sim"].generate(f["sd_models"])
    assert not svc.status()["live"] and svc.last_message == "merge discarded by checkpoint load"
    f["sim"].select(f["sd_models"], "synthA")
    f["generate"]()  # before_process_batch: our merge is gone, apply it again
    assert svc.status()["live"] and fp(f) == merged


def test_text_encoder_write_clears_conditioning_caches(forge):
    f = forge
    proc = f["processing"]
    proc.StableDiffusionProcessing.cached_c[:] = ["cond", "x"]
    f["svc"].test_merge({"model_b": "synthB", "alpha": 0.5})
    assert proc.StableDiffusionProcessing.cached_c == [None, None]


def test_test_merge_applies_to_the_selected_checkpoint(forge):
    """Forge loads whatever is selected at the next use: a test merge after choosing another checkpoint merges
    into that one (loaded now), not into the model that was loaded before."""
    f = forge
    svc = f["svc"]
    svc.test_merge({"model_b": "synthB", "alpha": 0.5})
    f["sim"].select(f["sd_models"], "synthC")
    res = svc.test_merge({"model_b": "synthB", "alpha": 0.5})
    assert res["live"] and svc.status()["loaded"].startswith("synthC") and f["data"].loads == 2
