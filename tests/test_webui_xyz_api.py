"""X/Y/Z axes and the HTTP API against the WebUI stand-in (real torch model with the real SD1.5 key names)."""
import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import install_xyz_stub  # noqa: E402

STUB = Path(__file__).resolve().parent / "webui_stub"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def webui(webui_stub, monkeypatch):
    from modules import sd_models, shared, script_callbacks, processing
    # the X/Y/Z script is loaded before extension scripts
    xyz_mod = install_xyz_stub(monkeypatch)
    from lib_merge.webui import api, callbacks, service as service_mod, xyz  # noqa: F401
    svc = service_mod.Service()
    for mod in (service_mod, api, callbacks, xyz):
        monkeypatch.setattr(mod, "SERVICE", svc)
    entry_spec = importlib.util.spec_from_file_location("blockmerge.py", ROOT / "scripts" / "blockmerge.py")
    entry = importlib.util.module_from_spec(entry_spec)
    entry_spec.loader.exec_module(entry)
    model = sd_models.load_model(sd_models.checkpoint_aliases["synthA"])
    xyz_script = xyz_mod.Script()
    xyz_script.ui(False)

    class Runner:  # p.scripts: the AlwaysOn scripts that process_images runs
        def __init__(self):
            self.alwayson = [entry.BlockMergeInfotext()]

        def process(self, p):
            for s in self.alwayson:
                try:
                    s.process(p)
                except Exception as e:  # the WebUI swallows exceptions from process() and goes on
                    print("swallowed:", e)

    yield {"svc": svc, "sd_models": sd_models, "shared": shared, "model": model, "xyz": xyz_mod,
           "script": xyz_script, "processing": processing, "runner": Runner(), "entry": entry}
    script_callbacks.clear_callbacks()
    getattr(xyz_mod.Script.run, "_blockmerge_wrapped", None) and setattr(
        xyz_mod.Script, "run", xyz_mod.Script.run._blockmerge_wrapped)


def fp(model):
    from lib_merge.live import fingerprint
    from lib_merge.webui.target import WebUITarget
    return fingerprint(WebUITarget(model).params())


def axis(webui, label):
    return [o.label for o in webui["script"].current_axis_options].index(label)


def grid(webui, x_label, x_values, y_label="Nothing", y_values="", x_drop=(), y_drop=()):
    from modules import processing
    p = processing.StableDiffusionProcessingTxt2Img(prompt="cat", seed=1, steps=2, width=8, height=8)
    p.scripts = webui["runner"]
    s = webui["script"]
    return s.run(p, axis(webui, x_label), x_values, list(x_drop), axis(webui, y_label), y_values, list(y_drop),
                 0, "", [], True, True, False, False, False, False, False, 0, False)


def test_axes_registered_once_with_labels(webui):
    from lib_merge.webui import xyz
    xyz.register()
    xyz.register()
    labels = [o.label for o in webui["xyz"].axis_options if o.label.startswith("BlockMerge:")]
    assert labels == ["BlockMerge: alpha", "BlockMerge: beta", "BlockMerge: preset", "BlockMerge: weights",
                      "BlockMerge: block value", "BlockMerge: model B", "BlockMerge: model C",
                      "BlockMerge: merge mode", "BlockMerge: method", "BlockMerge: method parameter",
                      "BlockMerge: seed", "BlockMerge: adjust", "BlockMerge: elemental", "BlockMerge: sub-target",
                      "BlockMerge: LoRA strength"]


def test_alpha_grid_cells_differ_and_model_comes_back(webui):
    svc, model = webui["svc"], webui["model"]
    original = fp(model)
    svc.test_merge({"model_b": "synthB", "alpha": 0.3})
    pre_grid = fp(model)
    cells = grid(webui, "BlockMerge: alpha", "0,0.5,1")
    assert len(cells) == 3
    infos = [c.infotexts[0] for c in cells]
    assert len({c.images[0].tobytes() for c in cells}) == 3
    assert ['"alpha":0.0' in infos[0], '"alpha":0.5' in infos[1], '"alpha":1.0' in infos[2]] == [True] * 3
    assert fp(model) == pre_grid  # the pre-grid live merge is back, bit-exact
    assert svc.base_params["alpha"] == 0.3
    svc.restore()
    assert fp(model) == original


def test_preset_by_block_value_grid(webui):
    from lib_merge.arch import ARCHS, block_of
    svc, model = webui["svc"], webui["model"]
    original = fp(model)
    svc.test_merge({"model_b": "synthB", "alpha": 0.5})
    svc.restore()  # base recipe kept after Restore
    cells = grid(webui, "BlockMerge: block value", "OUT05=0 OUT05=0.5 OUT05=1".replace(" OUT", ",OUT"),
                 "BlockMerge: preset", "", y_drop=["GRAD_V", "GRAD_A"])
    assert len(cells) == 6 and len({c.images[0].tobytes() for c in cells}) == 6
    n_out05 = sum(1 for k in svc.session.keys if block_of(k, ARCHS["sd1"]) == "OUT05")
    written = [c["written"] for c in svc.xyz_cells]
    # block value (cost 0.5) is the inner loop: within a preset only OUT05's tensors are rewritten
    assert written[1] == n_out05 and written[2] == n_out05 and written[4] == n_out05
    assert fp(model) == original  # no merge was live before the grid: original back


def test_alpha_axis_with_preset_is_refused_before_first_cell(webui):
    from lib_merge.errors import MergeError
    svc = webui["svc"]
    svc.test_merge({"model_b": "synthB", "preset": "GRAD_V"})
    with pytest.raises(MergeError, match="alpha has no effect while preset GRAD_V is set; sweep BlockMerge: block value or preset"):
        grid(webui, "BlockMerge: alpha", "0,1")
    assert svc.xyz_cells == []


def test_beta_axis_in_a_mode_without_beta_is_refused_before_first_cell(webui):
    from lib_merge.errors import MergeError
    svc = webui["svc"]
    svc.test_merge({"model_b": "synthB", "alpha": 0.3})
    with pytest.raises(MergeError, match=r"^beta has no effect in mode weighted_sum \(its formula has no beta\), "
                                         r"BlockMerge: beta$"):
        grid(webui, "BlockMerge: beta", "0,1")
    assert svc.xyz_cells == []
    svc.test_merge({"model_b": "synthB", "model_c": "synthC", "mode": "triple_sum", "alpha": 0.3})
    cells = grid(webui, "BlockMerge: beta", "0,0.2")
    assert len({c.images[0].tobytes() for c in cells}) == 2


def test_grid_needs_a_base_or_model_b_axis(webui):
    from lib_merge.errors import MergeError
    with pytest.raises(MergeError, match="run Test merge first or add a BlockMerge: model B axis"):
        grid(webui, "BlockMerge: alpha", "0,1")
    cells = grid(webui, "BlockMerge: model B", "", x_drop=["synthB", "synthC"])
    assert len({c.images[0].tobytes() for c in cells}) == 2


def test_failing_cell_stops_grid_names_cell_and_restores(webui):
    from lib_merge.errors import MergeError
    svc, model = webui["svc"], webui["model"]
    original = fp(model)
    svc.test_merge({"model_b": "synthB", "alpha": 0.5})
    svc.restore()
    with pytest.raises(MergeError, match=r"X/Y/Z grid stopped: cell .*mode=inv_sigmoid.*outside \[0, 1\].*restored"):
        grid(webui, "BlockMerge: merge mode", "", "BlockMerge: alpha", "0.5,1.5", x_drop=["weighted_sum", "inv_sigmoid"])
    assert fp(model) == original
    webui["shared"].state.interrupted = False


def test_grid_without_blockmerge_axes_does_not_merge(webui):
    svc = webui["svc"]
    cells = grid(webui, "Seed", "1,2")
    assert len(cells) == 2 and svc.session is None


# -- HTTP API ---------------------------------------------------------------------------------------------
@pytest.fixture
def client(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from lib_merge.webui.api import add_routes
    app = FastAPI()
    add_routes(app)
    add_routes(app)  # Reload UI: no duplicates
    assert sum(1 for r in app.routes if getattr(r, "path", "") == "/blockmerge/v1/test") == 1
    return TestClient(app)


def test_api_test_restore_status_recipe(client, webui):
    model = webui["model"]
    before = fp(model)
    r = client.post("/blockmerge/v1/test", json={"model_b": "synthB", "mode": "weighted_sum", "alpha": 0.5,
                                                  "preset": "GRAD_V"})
    assert r.status_code == 200 and "seconds" in r.json()
    written = r.json()["written"]
    assert written + r.json()["unchanged"] == 882 and 600 < written < 882
    st = client.get("/blockmerge/v1/status").json()
    assert st["live"] and st["loaded"].startswith("synthA")
    assert client.get("/blockmerge/v1/recipe").json()["recipe"]["preset"] == "GRAD_V"
    r = client.post("/blockmerge/v1/restore")
    assert r.status_code == 200 and r.json()["restored"] == written
    assert fp(model) == before
    rec = client.get("/blockmerge/v1/recipe").json()
    assert rec["live"] is False and rec["recipe"] == {"model_b": "synthB.safetensors", "mode": "weighted_sum",
                                                      "alpha": 0.5, "preset": "GRAD_V"}
    presets = client.get("/blockmerge/v1/presets").json()["presets"]
    assert len(presets["sd1"]) == 38 and presets["sd1"]["GRAD_V"]["values"][1] == 1.0


@pytest.mark.parametrize("body,code,detail", [
    ({"model_b": "nope"}, 422, "unknown checkpoint 'nope' (use a name from the checkpoint list), model_b"),
    ({"model_b": "../synthB.safetensors"}, 422, "unknown checkpoint '../synthB.safetensors'"),
    ({"model_b": "synthB", "weights": "1,2,x"}, 422, "not a number: 'x'"),
    ({"model_b": "synthB", "weights": "1", "preset": "GRAD_V"}, 422, "give weights or preset, not both, weights/preset"),
    ({"model_b": "synthB", "model_c": "synthC", "mode": "triple_sum", "weights_beta": "1", "preset_beta": "GRAD_V"},
     422, "give weights_beta or preset_beta, not both, weights_beta/preset_beta"),
    ({"model_b": "synthB", "vae": "c"}, 422, "vae must be merge, a or b, vae: 'c'"),
    ({"model_b": "synthB", "dtype": "fp64"}, 422, "dtype must be fp16, bf16, fp32 or keep, dtype: 'fp64'"),
    ({"model_b": "synthB", "subtargets": ["attn3"]}, 422, "sub-target must be all, attn1, attn2 or ff, subtargets: 'attn3'"),
    ({"model_b": "synthB", "model_a": "synthC"}, 409, "model_a is not the loaded checkpoint; load it first"),
    ({"model_b": "synthB", "bogus": 1}, 422, "unknown field, bogus"),
    ({"model_b": "synthB", "alpha": True}, 422, "alpha must be a number, alpha: True"),
    ({"model_b": "synthB", "beta": [0.5]}, 422, "beta must be a number, beta: [0.5]"),
    ({"model_b": "synthB", "supermerger_time_embed_out11": "no"}, 422,
     "supermerger_time_embed_out11 must be true or false, supermerger_time_embed_out11: 'no'"),
])
def test_api_validation(client, body, code, detail):
    r = client.post("/blockmerge/v1/test", json=body)
    assert r.status_code == code and detail in r.json()["detail"] and isinstance(r.json()["detail"], str)


def test_api_save_and_merge_names(client, webui):
    r = client.post("/blockmerge/v1/save", json={"output": "x"})
    assert r.status_code == 409 and "no test merge is live" in r.json()["detail"]
    client.post("/blockmerge/v1/test", json={"model_b": "synthB"})
    for bad in ("../x", "/abs/x", "a/b"):
        r = client.post("/blockmerge/v1/save", json={"output": bad})
        assert r.status_code == 422 and "output" in r.json()["detail"]
    r = client.post("/blockmerge/v1/save", json={"output": "saved-live", "dtype": "fp16"})
    assert r.status_code == 200 and r.json()["name"] == "saved-live.safetensors" and len(r.json()["sha256"]) == 64
    r2 = client.post("/blockmerge/v1/merge", json={"model_a": "synthA", "model_b": "synthB", "output": "file-merge",
                                                   "vae": "a", "dtype": "fp16", "alpha": 0.5})
    assert r2.status_code == 200 and r2.json()["name"] == "file-merge.safetensors"
    from safetensors.torch import load_file
    live_saved, file_merged = load_file(r.json()["path"]), load_file(r2.json()["path"])
    assert all(torch.equal(live_saved[k], file_merged[k]) for k in live_saved)  # same recipe, same tensors
    r3 = client.post("/blockmerge/v1/merge", json={"model_a": "synthA", "model_b": "synthB", "output": "file-merge"})
    assert r3.status_code == 422 and "output exists" in r3.json()["detail"]
    for route in ("merge", "save"):  # "no" must not mean yes
        r = client.post(f"/blockmerge/v1/{route}", json={"model_a": "synthA", "model_b": "synthB", "output": "file-merge",
                                                       "overwrite": "no"} if route == "merge" else
                        {"output": "file-merge", "overwrite": "no"})
        assert r.status_code == 422 and r.json()["detail"] == "overwrite must be true or false, overwrite: 'no'"
    r = client.post("/blockmerge/v1/test", data="not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"] == "the request body must be a JSON object"


def test_api_takes_the_queue_lock(client, webui):
    from modules import call_queue
    done = []
    call_queue.queue_lock.acquire()
    t = threading.Thread(target=lambda: done.append(client.post("/blockmerge/v1/test", json={"model_b": "synthB"})))
    t.start()
    time.sleep(1.0)
    assert not done  # waits for the lock held by a "generation"
    assert client.get("/blockmerge/v1/status").status_code == 200  # status never waits
    call_queue.queue_lock.release()
    t.join(60)
    assert done and done[0].status_code == 200


def test_api_free_reports_the_bytes_and_status_shows_the_caches_size(client, webui):
    from lib_merge.webui.service import SERVICE
    r = client.post("/blockmerge/v1/free")  # nothing cached yet; no body needed
    assert r.status_code == 200 and r.json()["freed_bytes"] == 0 and r.json()["cache_bytes"] == 0
    assert "seconds" in r.json() and "queue_wait" in r.json()
    st = client.get("/blockmerge/v1/status").json()
    assert st["cache_bytes"] == 0 and st["cache_pending_bytes"] == 0
    before = fp(webui["model"])
    r = client.post("/blockmerge/v1/test", json={"model_b": "synthB", "alpha": 0.5})
    assert r.status_code == 200 and "; caches " in r.json()["message"]
    merged = fp(webui["model"])
    assert SERVICE.session.wait_cached(60)
    st = client.get("/blockmerge/v1/status").json()
    held = st["cache_bytes"]
    assert held == SERVICE.session.cache_bytes() > 0 and st["cache_pending_bytes"] == 0
    r = client.post("/blockmerge/v1/free", json={})
    kept = SERVICE.session.cache_bytes()
    assert r.status_code == 200 and r.json()["freed_bytes"] == held - kept > 0 and r.json()["cache_bytes"] == kept > 0
    assert client.get("/blockmerge/v1/status").json()["cache_bytes"] == kept
    assert client.post("/blockmerge/v1/test", json={"model_b": "synthB", "alpha": 0.5}).status_code == 200
    assert fp(webui["model"]) == merged  # a test merge after Free reads again and writes the same weights
    client.post("/blockmerge/v1/restore")
    assert fp(webui["model"]) == before
    held = client.get("/blockmerge/v1/status").json()["cache_bytes"]
    r = client.post("/blockmerge/v1/free")
    assert r.json()["freed_bytes"] == held > 0 and r.json()["cache_bytes"] == 0
    assert client.get("/blockmerge/v1/status").json()["cache_bytes"] == 0
    r = client.post("/blockmerge/v1/free", json=[1])
    assert r.status_code == 422 and r.json() == {"detail": "the request body must be a JSON object"}


def test_api_free_takes_the_queue_lock(client, webui):
    from modules import call_queue
    done = []
    call_queue.queue_lock.acquire()
    t = threading.Thread(target=lambda: done.append(client.post("/blockmerge/v1/free")))
    t.start()
    time.sleep(0.5)
    assert not done  # waits behind a "generation"
    call_queue.queue_lock.release()
    t.join(60)
    assert done and done[0].status_code == 200


def test_free_with_the_model_gone_drops_the_whole_session(client, webui, monkeypatch):
    from lib_merge.webui import host
    from lib_merge.webui.service import SERVICE
    assert client.post("/blockmerge/v1/test", json={"model_b": "synthB", "alpha": 0.5}).status_code == 200
    assert SERVICE.session.wait_cached(60)
    held = SERVICE.session.cache_bytes()
    monkeypatch.setattr(host, "loaded_model", lambda: None)  # unloaded (e.g. "Unload SD checkpoint to RAM")
    r = client.post("/blockmerge/v1/free")
    assert r.status_code == 200 and r.json()["freed_bytes"] == held and r.json()["cache_bytes"] == 0
    assert SERVICE.session is None


def test_api_answers_use_canonical_model_names(client, webui):
    """Any exact alias may name a model in a body; status and recipe answer with the checkpoint's name."""
    r = client.post("/blockmerge/v1/test", json={"model_b": "synthB", "alpha": 0.4})  # model_name alias
    assert r.status_code == 200
    st = client.get("/blockmerge/v1/status").json()
    assert st["params"]["model_b"] == "synthB.safetensors"
    client.post("/blockmerge/v1/restore", json={})
    rec = client.get("/blockmerge/v1/recipe").json()
    assert rec["live"] is False and rec["recipe"] == {"model_b": "synthB.safetensors", "alpha": 0.4}


def test_api_recipe_carries_the_engine_recipe_version(client, webui, monkeypatch):
    """GET recipe / infotexts say the version the engine writes (not a copy of the number)."""
    from lib_merge import recipe
    from lib_merge.recipe import Recipe
    monkeypatch.setattr(recipe, "RECIPE_VERSION", 7)
    assert client.post("/blockmerge/v1/test", json={"model_b": "synthB"}).status_code == 200
    rec = client.get("/blockmerge/v1/recipe").json()
    assert rec["live"] is True and rec["recipe"]["version"] == 7
    assert Recipe().to_dict()["version"] == 7


def test_subtarget_axis_uses_the_engine_list_and_check(webui):
    from lib_merge.errors import MergeError
    from lib_merge.options import SUBTARGETS
    opt = next(o for o in webui["xyz"].axis_options if o.label == "BlockMerge: sub-target")
    assert opt.choices() == list(SUBTARGETS)
    opt.confirm(None, ["attn1", "all"])
    with pytest.raises(MergeError) as e:
        opt.confirm(None, ["attn1", "attn3"])
    assert str(e.value) == "sub-target must be all, attn1, attn2 or ff, subtargets: 'attn3'"


def test_api_supermerger_time_embed_switch(client, webui):
    """The recipe switch reaches file merges through the API: time_embed takes OUT11's ratio, recorded."""
    import json
    from safetensors.torch import load_file
    from lib_merge.arch import ARCHS
    blocks = ARCHS["sd1"].blocks
    vec = {blk: 0.5 for blk in blocks} | {"IN00": 0.2, "OUT11": 0.9}
    body = {"model_a": "synthA", "model_b": "synthB", "weights": ",".join(str(vec[blk]) for blk in blocks),
            "dtype": "fp32", "vae": "a"}
    r1 = client.post("/blockmerge/v1/merge", json={**body, "output": "in00"})
    r2 = client.post("/blockmerge/v1/merge", json={**body, "output": "out11", "supermerger_time_embed_out11": True})
    assert r1.status_code == 200 and r2.status_code == 200, (r1.json(), r2.json())
    a = load_file(webui["sd_models"].checkpoint_aliases["synthA"].filename)
    b = load_file(webui["sd_models"].checkpoint_aliases["synthB"].filename)
    m1, m2 = load_file(r1.json()["path"]), load_file(r2.json()["path"])
    key = "model.diffusion_model.time_embed.0.weight"
    for merged, block in ((m1, "IN00"), (m2, "OUT11")):
        t = vec[block]
        want = (1 - t) * a[key].float() + t * b[key].float()
        assert torch.allclose(merged[key].float(), want, atol=1e-6), block
    assert vec["IN00"] != vec["OUT11"] and not torch.equal(m1[key], m2[key])
    from safetensors import safe_open
    with safe_open(r2.json()["path"], "pt") as f:
        assert json.loads(f.metadata()["blockmerge_recipe"])["supermerger_time_embed_out11"] is True


# -- methods and their parameters (issue 12) ------------------------------------------------------------------
def test_api_method_live_merge_equals_file_merge(client, webui):
    from safetensors.torch import load_file
    body = {"model_b": "synthB", "method": "slerp", "alpha": 0.3}
    r = client.post("/blockmerge/v1/test", json=body)
    assert r.status_code == 200, r.json()
    assert client.get("/blockmerge/v1/recipe").json()["recipe"]["method"] == "slerp"
    r = client.post("/blockmerge/v1/save", json={"output": "slerp-live", "dtype": "fp32"})
    r2 = client.post("/blockmerge/v1/merge", json={**body, "model_a": "synthA", "output": "slerp-file", "vae": "a",
                                                   "dtype": "fp32"})
    r3 = client.post("/blockmerge/v1/merge", json={**body, "method": "linear", "model_a": "synthA",
                                                   "output": "linear-file", "vae": "a", "dtype": "fp32"})
    assert r.status_code == 200 and r2.status_code == 200 and r3.status_code == 200, (r.json(), r2.json(), r3.json())
    live, file_merged, linear = (load_file(x.json()["path"]) for x in (r, r2, r3))
    assert all(torch.equal(live[k], file_merged[k]) for k in live)  # same recipe, same tensors
    assert any(not torch.equal(live[k], linear[k]) for k in live)  # and slerp is not the linear merge


def test_api_variadic_mode_takes_more_models_live_and_to_file(client, webui):
    """ties over A B C D through the API (more_models after model_c): the live merge equals the file merge."""
    from safetensors.torch import load_file
    body = {"model_b": "synthB", "model_c": "synthC", "more_models": ["synthB"], "mode": "ties", "alpha": 1.0,
            "params": {"density": 0.5}}
    r = client.post("/blockmerge/v1/test", json=body)
    assert r.status_code == 200, r.json()
    recipe = client.get("/blockmerge/v1/recipe").json()["recipe"]
    assert recipe["mode"] == "ties" and len(recipe["models"]) == 4 and recipe["params"] == {"density": 0.5}
    live = client.post("/blockmerge/v1/save", json={"output": "ties-live", "dtype": "fp32"})
    file = client.post("/blockmerge/v1/merge", json={**body, "model_a": "synthA", "output": "ties-file", "vae": "a",
                                                     "dtype": "fp32"})
    assert live.status_code == 200 and file.status_code == 200, (live.json(), file.json())
    x, y = load_file(live.json()["path"]), load_file(file.json()["path"])
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("body,detail", [
    ({"model_b": "synthB", "more_models": ["synthC"]}, "mode weighted_sum takes A B only, more_models"),
    ({"model_b": "synthB", "mode": "ties", "more_models": "synthC,nope"}, None),
    ({"model_b": "synthB", "mode": "ties", "more_models": [3]},
     "more_models must be a list of checkpoint names, more_models: [3]"),
    ({"model_b": "synthB", "mode": "model_stock"}, "mode model_stock needs model_c, model_c"),
    ({"model_b": "synthB", "mode": "ties", "params": {"density": 2}},
     "parameter density must lie in [0, 1] (got 2.0), mode ties"),
    ({"model_b": "synthB", "mode": "dare"}, "mode dare draws random numbers: give a seed, seed"),
])
def test_api_variadic_mode_errors_name_the_field(client, body, detail):
    r = client.post("/blockmerge/v1/test", json=body)
    assert r.status_code in (404, 422), r.json()
    if detail is None:
        assert "nope" in r.json()["detail"] and "more_models[1]" in r.json()["detail"]
    else:
        assert r.json()["detail"] == detail


@pytest.mark.parametrize("body,detail", [
    ({"model_b": "synthB", "method": "bogus"},
     "unknown method 'bogus', choose one of linear, slerp, train_difference, tensor_swap, tensor_swap_dim1, extract, "
     "self_scale, add_noise, smooth_add, cosine_a, cosine_b, method"),
    ({"model_b": "synthB", "method": 3}, "method must be a string, method: 3"),
    ({"model_b": "synthB", "model_c": "synthC", "mode": "add_difference", "method": "extract", "params": {"gama": 1}},
     "unknown parameter 'gama' for method extract (it takes gamma), params gama"),
    ({"model_b": "synthB", "model_c": "synthC", "mode": "add_difference", "method": "extract",
      "params": {"gamma": "x"}}, "params gamma must be a number, true/false or a list of numbers (got str 'x'), params"),
    ({"model_b": "synthB", "model_c": "synthC", "mode": "add_difference", "method": "extract",
      "params": {"gamma": -1}}, "parameter gamma must lie in [0, inf] (got -1.0), method extract"),
    ({"model_b": "synthB", "params": [1]}, "params must be an object of parameter names and values (got list [1]), "
                                           "params"),
    ({"model_b": "synthB", "method": "add_noise"}, "method add_noise draws random numbers: give a seed, seed"),
    ({"model_b": "synthB", "model_c": "synthC", "mode": "add_difference", "method": "slerp"},
     "method slerp works with mode weighted_sum only, not add_difference, method slerp"),
])
def test_api_method_and_params_are_checked_by_the_declarations(client, body, detail):
    r = client.post("/blockmerge/v1/test", json=body)
    assert r.status_code == 422 and r.json()["detail"] == detail


def test_method_grid_cells_differ_and_model_comes_back(webui):
    svc, model = webui["svc"], webui["model"]
    original = fp(model)
    svc.test_merge({"model_b": "synthB", "alpha": 0.3})
    pre_grid = fp(model)
    cells = grid(webui, "BlockMerge: method", "", x_drop=["linear", "slerp"])
    assert len(cells) == 2 and len({c.images[0].tobytes() for c in cells}) == 2
    assert [c["axes"] for c in svc.xyz_cells] == [{"method": "linear"}, {"method": "slerp"}]
    assert fp(model) == pre_grid and svc.base_params.get("method") is None
    svc.restore()
    assert fp(model) == original


def test_method_parameter_grid_cells_differ(webui):
    svc, model = webui["svc"], webui["model"]
    original = fp(model)
    svc.test_merge({"model_b": "synthB", "model_c": "synthC", "mode": "add_difference", "method": "extract",
                    "alpha": 0.3, "beta": 0.1})  # beta 0.5 would weigh d and 1 - d alike: gamma without effect
    svc.restore()
    cells = grid(webui, "BlockMerge: method parameter", "gamma=0.5|gamma=4")
    assert len(cells) == 2 and len({c.images[0].tobytes() for c in cells}) == 2
    assert [c["axes"] for c in svc.xyz_cells] == [{"method_params": "gamma=0.5"}, {"method_params": "gamma=4"}]
    assert fp(model) == original


def test_method_axes_are_checked_before_the_first_cell(webui):
    from lib_merge.errors import MergeError
    from lib_merge.webui.xyz import cell_params
    svc = webui["svc"]
    opt = {o.label: o for o in webui["xyz"].axis_options}
    opt["BlockMerge: method"].confirm(None, ["linear", "extract"])
    with pytest.raises(MergeError, match=r"^unknown method 'bogus'"):
        opt["BlockMerge: method"].confirm(None, ["linear", "bogus"])
    with pytest.raises(MergeError, match=r"^no mode or method takes parameter 'bogus' \(declared: gamma \(method "
                                         r"extract\), .*density \(mode ties\).*\), BlockMerge: method parameter "
                                         r"'bogus=0.1'$"):
        opt["BlockMerge: method parameter"].confirm(None, ["bogus=0.1"])
    opt["BlockMerge: method parameter"].confirm(None, ["density=0.1"])  # the ties family's (a mode's parameter)
    with pytest.raises(MergeError, match=r"^parameter gamma must be a number \(got 'x'\), method extract, "
                                         r"BlockMerge: method parameter 'gamma=x'$"):
        opt["BlockMerge: method parameter"].confirm(None, ["gamma=x"])
    with pytest.raises(MergeError, match=r"^seed must be 0 .. 2\*\*63-1"):
        opt["BlockMerge: seed"].confirm(None, [-1])
    svc.test_merge({"model_b": "synthB", "alpha": 0.3})
    with pytest.raises(MergeError, match=r"^unknown parameter 'gamma' for method linear \(it takes none\), "
                                         r"BlockMerge: method parameter 'gamma=1'$"):
        grid(webui, "BlockMerge: method parameter", "gamma=1")
    with pytest.raises(MergeError, match=r"^method add_noise draws random numbers: set a seed in the base recipe or "
                                         r"add a BlockMerge: seed axis, BlockMerge: method$"):
        grid(webui, "BlockMerge: method", "", x_drop=["linear", "add_noise"])
    assert svc.xyz_cells == []
    cells = grid(webui, "BlockMerge: method", "", "BlockMerge: seed", "1,2", x_drop=["add_noise"])
    assert len({c.images[0].tobytes() for c in cells}) == 2  # the seed axis reaches the cell
    assert cell_params({"model_b": "b", "method": "extract", "params": {"gamma": 2.0}}, {"method": "slerp"},
                       "sd1") == {"model_b": "b", "method": "slerp"}  # extract's gamma is not slerp's


@pytest.mark.parametrize("body,detail", [
    ({"model_b": "synthB", "adjust": [1, 2, 3]},
     "adjust needs 8 numbers (IN,OUT,OUT2,contrast,brightness,cyan_red,magenta_green,yellow_blue), got 3 in "
     "[1, 2, 3], adjust"),
    ({"model_b": "synthB", "adjust": "1,2,3,4,5,6,7,x"}, "adjust needs 8 numbers, 'x' is not one in "
                                                        "'1,2,3,4,5,6,7,x', adjust"),
    ({"model_b": "synthB", "adjust": 5}, "adjust needs 8 numbers (IN,OUT,OUT2,contrast,brightness,cyan_red,"
                                         "magenta_green,yellow_blue), got 5, adjust"),
])
def test_api_adjust_is_checked(client, body, detail):
    r = client.post("/blockmerge/v1/test", json=body)
    assert r.status_code == 422 and r.json()["detail"] == detail


def test_api_adjust_live_merge_equals_file_merge(client, webui):
    from safetensors.torch import load_file
    from lib_merge.adjust import OUT2_W
    body = {"model_b": "synthB", "alpha": 0.3, "adjust": "0,0,4,0,0,0,0,0"}
    r = client.post("/blockmerge/v1/test", json=body)
    assert r.status_code == 200, r.json()
    r = client.post("/blockmerge/v1/save", json={"output": "adj-live", "dtype": "fp32"})
    r2 = client.post("/blockmerge/v1/merge", json={**body, "model_a": "synthA", "output": "adj-file", "vae": "a",
                                                   "dtype": "fp32"})
    r3 = client.post("/blockmerge/v1/merge", json={**body, "adjust": [0] * 8, "model_a": "synthA",
                                                   "output": "plain-file", "vae": "a", "dtype": "fp32"})
    assert r.status_code == 200 and r2.status_code == 200 and r3.status_code == 200, (r.json(), r2.json(), r3.json())
    live, file_merged, plain = (load_file(x.json()["path"]) for x in (r, r2, r3))
    assert all(torch.equal(live[k], file_merged[k]) for k in live)  # same recipe, same tensors
    assert torch.equal(file_merged[OUT2_W], plain[OUT2_W] * (1 - 0.04))


def test_adjust_axis_cells_and_checks(webui):
    from lib_merge.errors import MergeError
    from lib_merge.webui.xyz import cell_params
    svc, model = webui["svc"], webui["model"]
    opt = {o.label: o for o in webui["xyz"].axis_options}
    with pytest.raises(MergeError, match=r"^adjust needs 8 numbers .*got 2 in '1,2', BlockMerge: adjust$"):
        opt["BlockMerge: adjust"].confirm(None, ["0,0,0,0,0,0,0,0", "1,2"])
    assert opt["BlockMerge: adjust"].prepare("0,0,0,0,0,0,0,0|2,0,0,0,0,0,0,0") == ["0,0,0,0,0,0,0,0",
                                                                                     "2,0,0,0,0,0,0,0"]
    assert cell_params({"model_b": "b"}, {"adjust": "2,0,0,0,0,0,0,0"}, "sd1")["adjust"] == "2,0,0,0,0,0,0,0"
    original = fp(model)
    svc.test_merge({"model_b": "synthB", "alpha": 0.3})
    svc.restore()
    cells = grid(webui, "BlockMerge: adjust", "0,0,0,0,0,0,0,0|0,0,0,5,0,0,0,0")
    assert len(cells) == 2 and len({c.images[0].tobytes() for c in cells}) == 2
    assert svc.xyz_cells[1]["written"] == 1  # only out.2.bias changes between the cells
    assert fp(model) == original
