"""The WebUI adapter against a stand-in of the WebUI modules (tests/webui_stub) with a real torch model that
holds the real SD1.5 key names (tiny shapes), the text encoder renamed by the hijack as in the real WebUI."""
from pathlib import Path

import pytest
import torch

STUB = Path(__file__).resolve().parent / "webui_stub"


@pytest.fixture
def webui(webui_stub, monkeypatch):
    from modules import sd_models, shared, script_callbacks, processing, devices
    ckdir = Path(sd_models.model_path)
    from lib_merge.webui import service as service_mod
    svc = service_mod.Service()
    monkeypatch.setattr(service_mod, "SERVICE", svc)
    script_callbacks.on_model_loaded(lambda m: service_mod.SERVICE.on_model_loaded(m))
    model = sd_models.load_model(sd_models.checkpoint_aliases["synthA"])
    yield {"svc": svc, "sd_models": sd_models, "shared": shared, "model": model, "dir": ckdir,
           "processing": processing, "devices": devices}
    script_callbacks.clear_callbacks()
    processing.StableDiffusionProcessing.cached_c[:] = [None, None]


def live_fp(svc_or_model):
    from lib_merge.live import fingerprint
    from lib_merge.webui.target import WebUITarget
    return fingerprint(WebUITarget(svc_or_model).params())


def test_target_maps_hijacked_names_to_file_keys(webui):
    from lib_merge.webui.target import WebUITarget
    from lib_merge.io.sources import open_source
    t = WebUITarget(webui["model"])
    keys = set(t.params())
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert not any("wrapped" in k for k in keys)
    assert not any(k.startswith("first_stage_model.") for k in keys)  # the VAE is never written live
    with open_source(webui["dir"] / "synthA.safetensors") as src:
        want = {k for k, i in src.infos.items() if k.startswith(("model.diffusion_model.", "cond_stage_model."))
                and i.dtype.startswith("F")}
    assert keys == want


def test_test_merge_then_restore_bit_exact(webui):
    svc, model = webui["svc"], webui["model"]
    before = live_fp(model)
    res = svc.test_merge({"model_b": "synthB", "preset": "GRAD_V"})
    # SD1.5 has 882 UNet + text-encoder parameters; GRAD_V leaves BASE and M00 at 0 (A's weights: not written)
    assert res["live"] and res["written"] + res["unchanged"] == 882 and 600 < res["written"] < 882
    assert live_fp(model) != before
    out = svc.restore()
    assert out["restored"] == res["written"]
    assert live_fp(model) == before
    assert svc.status()["live"] is False


def test_remerge_one_block_writes_only_that_block(webui):
    from lib_merge.arch import ARCHS, block_of
    svc = webui["svc"]
    vec = ["0.5"] * 26
    svc.test_merge({"model_b": "synthB", "weights": ",".join(vec)})
    reads = svc.status()["bytes_read"]
    vec[19] = "1"  # OUT05
    res = svc.test_merge({"model_b": "synthB", "weights": ",".join(vec)})
    n_out05 = sum(1 for k in svc.session.keys if block_of(k, ARCHS["sd1"]) == "OUT05")
    assert res["written"] == n_out05
    assert svc.status()["bytes_read"] == reads  # no file reads after the first merge


def test_interrupt_midway_leaves_previous_state(webui, monkeypatch):
    svc, model = webui["svc"], webui["model"]
    before = live_fp(model)
    from lib_merge.errors import MergeInterrupted
    from lib_merge.webui import host
    calls = []

    def interrupted():
        calls.append(1)
        return len(calls) > 300

    monkeypatch.setattr(host, "interrupted", interrupted)
    with pytest.raises(MergeInterrupted):
        svc.test_merge({"model_b": "synthB", "alpha": 0.7})
    assert live_fp(model) == before and not svc.status()["live"]


def test_save_after_test_merge_writes_what_was_previewed(webui):
    from lib_merge.webui.target import WebUITarget
    from safetensors.torch import load_file
    svc, model, sdm, shared = webui["svc"], webui["model"], webui["sd_models"], webui["shared"]
    svc.test_merge({"model_b": "synthB", "preset": "GRAD_A", "elemental": "OUT03:attn2:0.1"})
    live = {k: v.detach().clone() for k, v in WebUITarget(model).params().items()}
    title_before = shared.opts.data["sd_model_checkpoint"]
    for dtype, cast in (("fp32", torch.float32), ("fp16", torch.float16)):
        res = svc.save(f"merged_{dtype}", dtype=dtype)
        saved = load_file(res["path"])
        assert all(torch.equal(saved[k], v.to(cast)) for k, v in live.items())
        assert f"merged_{dtype}.safetensors" in sdm.checkpoint_aliases  # registered
    assert shared.opts.data["sd_model_checkpoint"] == sdm.checkpoint_aliases["synthA"].title  # still names A
    assert title_before.startswith("synthA")
    # VAE defaults to A's in saves from the tab (the preview shows the loaded VAE)
    a = load_file(str(webui["dir"] / "synthA.safetensors"))
    saved = load_file(str(webui["dir"] / "merged_fp32.safetensors"))
    vk = "first_stage_model.decoder.conv_in.weight"
    assert torch.equal(saved[vk], a[vk].float())


def test_save_of_random_weights_writes_the_previewed_draw(webui):
    """R/U/X drawn with no seed: the test merge draws one and Save uses it (never a second, different draw)."""
    from lib_merge.webui.target import WebUITarget
    from safetensors.torch import load_file
    svc, model = webui["svc"], webui["model"]
    res = svc.test_merge({"model_b": "synthB", "weights": ",".join(["R"] * 26)})
    seed = svc.session.recipe.seed
    assert seed is not None and res["recipe"]["seed"] == seed
    live = {k: v.detach().clone() for k, v in WebUITarget(model).params().items()}
    saved_res = svc.save("random_fp32", dtype="fp32")
    saved = load_file(saved_res["path"])
    assert saved_res["recipe"]["seed"] == seed
    assert all(torch.equal(saved[k], v) for k, v in live.items())
    # a seed given in the request is used as given
    svc.test_merge({"model_b": "synthB", "weights": ",".join(["R"] * 26), "seed": 1234})
    assert svc.session.recipe.seed == 1234
    with pytest.raises(Exception, match="seed must be a whole number, seed: 'x'"):
        svc.test_merge({"model_b": "synthB", "weights": ",".join(["R"] * 26), "seed": "x"})


def test_save_name_validation_and_protection(webui):
    from lib_merge.errors import MergeError
    svc = webui["svc"]
    svc.test_merge({"model_b": "synthB"})
    for bad, msg in (("../evil", "bare file name"), ("a/b", "bare file name"), ("/abs", "bare file name"),
                     ("..", "'..'"), ("", "output name is required"), ("x..y", "'..'")):
        with pytest.raises(MergeError, match=msg):
            svc.save(bad)
    with pytest.raises(MergeError, match="will not overwrite the loaded checkpoint"):
        svc.save("synthA", overwrite=True)
    with pytest.raises(MergeError, match="will not overwrite .* an input"):
        svc.save("synthB.safetensors", overwrite=True)
    assert sorted(p.name for p in webui["dir"].iterdir()) == ["synthA.safetensors", "synthB.safetensors",
                                                             "synthC.safetensors"]


def test_lora_backups_are_folded_and_cleared(webui):
    svc, model = webui["svc"], webui["model"]
    before = live_fp(model)
    module = model.get_submodule("model.diffusion_model.input_blocks.1.1.proj_in")
    with torch.no_grad():
        module.network_weights_backup = module.weight.detach().clone()
        module.network_current_names = (("lora", 1.0),)
        module.network_bias_backup = None
        module.weight.add_(0.5)  # the built-in LoRA baked its delta into the weight
    res = svc.test_merge({"model_b": "synthB", "alpha": 0.0})
    assert res["live"] and res["written"] == 0  # alpha 0 leaves every weight at A's value
    assert module.network_weights_backup is None and module.network_current_names == ()
    svc.restore()
    assert live_fp(model) == before  # A without the baked LoRA: LoRA re-applies on the next generation


def test_text_encoder_write_clears_cond_caches_in_place(webui):
    svc, model, proc = webui["svc"], webui["model"], webui["processing"]
    cached = proc.StableDiffusionProcessing.cached_c
    cached[:] = ["key", "stale cond"]
    held_by_running_job = cached
    empty_before = model.cond_stage_model_empty_prompt
    svc.test_merge({"model_b": "synthB", "alpha": 0.5})
    assert held_by_running_job == [None, None] and proc.StableDiffusionProcessing.cached_c is held_by_running_job
    assert model.cond_stage_model_empty_prompt != empty_before


def test_checkpoint_load_discards_live_state(webui):
    svc, sdm = webui["svc"], webui["sd_models"]
    svc.test_merge({"model_b": "synthB", "alpha": 0.5})
    sdm.reload_model_weights(info=sdm.checkpoint_aliases["synthC"])
    st = svc.status()
    assert st["live"] is False and st["message"] == "merge discarded by checkpoint load"


def test_model_a_other_than_loaded_is_refused(webui):
    from lib_merge.errors import MergeError
    with pytest.raises(MergeError, match="model_a is not the loaded checkpoint; load it first"):
        webui["svc"].test_merge({"model_a": "synthB", "model_b": "synthC"})


def test_unknown_model_and_paths_refused(webui):
    from lib_merge.errors import MergeError
    with pytest.raises(MergeError, match="unknown checkpoint '/etc/passwd'"):
        webui["svc"].test_merge({"model_b": "/etc/passwd"})
    with pytest.raises(MergeError, match="unknown field, evil"):
        webui["svc"].test_merge({"model_b": "synthB", "evil": 1})


def test_fp8_host_gives_clear_message(webui, monkeypatch):
    from lib_merge.errors import MergeError
    monkeypatch.setattr(webui["devices"], "fp8", True)
    with pytest.raises(MergeError, match="FP8 weight storage"):
        webui["svc"].test_merge({"model_b": "synthB"})


def test_recipe_and_status(webui):
    svc = webui["svc"]
    assert svc.recipe_json() is None
    svc.test_merge({"model_b": "synthB", "preset": "GRAD_V", "subtargets": ["attn2"]})
    r = svc.recipe_json()
    assert r["preset"] == "GRAD_V" and r["elemental"].startswith(":NOT attn2:")
    st = svc.status()
    assert st["live"] and st["loaded"].startswith("synthA") and st["merged_tensors"] > 0
    assert any(p.endswith("synthB.safetensors") and n > 0 for p, n in st["bytes_read"].items())


def test_infotext_names_models_without_paths(webui):
    """Infotexts travel inside shared images: the recipe names the models' files, never local paths."""
    import hashlib
    import json
    svc = webui["svc"]
    assert svc.infotext_fields() == {}
    svc.test_merge({"model_b": "synthB", "preset": "GRAD_V"})
    fields = svc.infotext_fields()
    recipe = json.loads(fields["BlockMerge"])
    assert recipe["models"] == ["synthA.safetensors", "synthB.safetensors"]
    assert str(webui["dir"]) not in fields["BlockMerge"] and recipe["preset"] == "GRAD_V"
    assert fields["BlockMerge hash"] == hashlib.sha256(fields["BlockMerge"].encode()).hexdigest()[:10]
    svc.restore()
    assert svc.infotext_fields() == {}


def _generation(svc):
    p = type("P", (), {"extra_generation_params": {"Steps": 2}})()
    p.extra_generation_params.update(svc.begin_generation())
    return p


def test_reload_during_a_generation_reapplies_the_merge(webui):
    """decisions: re-check before each batch and re-apply if a reload wiped the merge."""
    svc, sdm, model, shared = webui["svc"], webui["sd_models"], webui["model"], webui["shared"]
    svc.test_merge({"model_b": "synthB", "preset": "GRAD_V"})
    merged = live_fp(model)
    p = _generation(svc)
    assert "BlockMerge" in p.extra_generation_params
    sdm.reload_model_weights(info=sdm.checkpoint_aliases["synthA"], forced_reload=True)  # same file, weights wiped
    assert svc.status()["live"] is False and live_fp(model) != merged
    svc.ensure_applied(p)
    assert live_fp(model) == merged and svc.status()["live"]
    assert svc.last_message == "merge re-applied after a checkpoint reload"
    assert "BlockMerge" in p.extra_generation_params and not shared.state.interrupted
    svc.ensure_applied(p)  # intact now: nothing to do
    assert live_fp(model) == merged


def test_reload_of_another_model_during_a_generation_stops_it_without_a_false_label(webui):
    svc, sdm, shared = webui["svc"], webui["sd_models"], webui["shared"]
    svc.test_merge({"model_b": "synthB", "alpha": 0.5})
    p = _generation(svc)
    sdm.reload_model_weights(info=sdm.checkpoint_aliases["synthC"])
    svc.ensure_applied(p)  # never merges synthC + synthB under the synthA recipe's label
    assert svc.status()["live"] is False and shared.state.interrupted
    assert p.extra_generation_params == {"Steps": 2}
    assert svc.last_message.startswith("merge lost by a checkpoint reload and not re-applied: model_a is not")


def test_cache_setting_takes_effect_at_the_next_test_merge(webui):
    """The setting is read at every Test merge (it was read once per session): the merge stays live across the
    change and restores bit-exact; "gpu" without CUDA (or without room) falls back to RAM."""
    from lib_merge.errors import MergeError
    svc, model, shared = webui["svc"], webui["model"], webui["shared"]
    before = live_fp(model)
    svc.test_merge({"model_b": "synthB", "alpha": 0.3})
    merged = live_fp(model)
    assert svc.status()["cache_device"] == "cpu"
    shared.opts.data["blockmerge_cache_device"] = "mmap"
    assert svc.status()["cache_device"] == "cpu"  # until the next test merge
    res = svc.test_merge({"model_b": "synthB", "alpha": 0.6})
    assert res["live"] and svc.status()["cache_device"] == "mmap"
    svc.test_merge({"model_b": "synthB", "alpha": 0.3})
    assert live_fp(model) == merged
    if not torch.cuda.is_available():
        shared.opts.data["blockmerge_cache_device"] = "gpu"
        svc.test_merge({"model_b": "synthB", "alpha": 0.3})
        assert svc.status()["cache_device"] == "cpu"
    shared.opts.data["blockmerge_cache_device"] = "ram"
    with pytest.raises(MergeError, match=r"unknown cache policy 'ram' \(use cpu, mmap, gpu\), blockmerge_cache_device"):
        svc.test_merge({"model_b": "synthB", "alpha": 0.5})
    assert live_fp(model) == merged and svc.status()["live"]  # refused before anything changed
    svc.restore()
    assert live_fp(model) == before

