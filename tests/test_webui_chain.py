"""Merge chains in the WebUI (issue 14 §1): nested bodies in the HTTP API, the tab's "Merge again from the
preview", the infotext, X/Y/Z cells on a nested base. Against the WebUI stand-in."""
import json

import pytest
import torch
from safetensors.torch import load_file

import test_webui_xyz_api as xyz_api
from test_webui_xyz_api import fp, grid

webui, client = xyz_api.webui, xyz_api.client  # the stand-in WebUI with X/Y/Z and the API routes (fixtures)

VEC = ["0.5"] * 26
OUT05 = 19  # BASE, IN00-IN11, M00, OUT00-OUT11: OUT05's index in the 26 values
STEP = {"model_b": "synthB", "alpha": 0.3, "preset": "GRAD_V"}


def weights() -> str:
    return ",".join(VEC)


def live_params(model):
    from lib_merge.webui.target import WebUITarget
    return {k: v.detach().clone() for k, v in WebUITarget(model).params().items()}


def chain_body(**outer):
    return {"model_a": {"recipe": dict(STEP)}, "model_b": "synthC", "weights": weights(), **outer}


def test_api_chain_live_equals_file_merge_remerge_one_block_restore_save(client, webui):
    from lib_merge.arch import ARCHS, block_of
    svc, model = webui["svc"], webui["model"]
    original = fp(model)
    r = client.post("/blockmerge/v1/test", json=chain_body())
    assert r.status_code == 200, r.json()
    assert svc.session.recipe.is_chain() and r.json()["written"] > 0
    # the live values are the file merge of the nested recipe (A named: a file merge has no loaded default)
    file_body = {**chain_body(), "model_a": {"recipe": {**STEP, "model_a": "synthA"}}, "vae": "a", "dtype": "fp32"}
    f = client.post("/blockmerge/v1/merge", json={**file_body, "output": "chain-file"})
    assert f.status_code == 200, f.json()
    merged = load_file(f.json()["path"])
    live = live_params(model)
    assert all(torch.equal(merged[k], v) for k, v in live.items())
    assert f.json()["recipe"]["models"][0]["recipe"]["preset"] == "GRAD_V"
    # one block of the outer step: only that block's tensors are written
    vec = list(VEC)
    vec[OUT05] = "0.9"
    r = client.post("/blockmerge/v1/test", json=chain_body(weights=",".join(vec)))
    out05 = [k for k in svc.session.keys if block_of(k, ARCHS["sd1"]) == "OUT05"]
    assert r.json()["written"] == len(out05) and r.json()["unchanged"] == len(svc.session.keys) - len(out05)
    # GET recipe, status and the infotext name the chain, by checkpoint names, never paths
    rec = client.get("/blockmerge/v1/recipe").json()["recipe"]
    assert rec["models"][0]["recipe"]["models"] == [str(svc.session.recipe.leaves()[0][1]),
                                                    str(svc.session.recipe.leaves()[1][1])]
    st = client.get("/blockmerge/v1/status").json()
    assert st["params"]["model_a"] == {"recipe": {**STEP, "model_b": "synthB.safetensors"}}
    info = json.loads(svc.infotext_fields()["BlockMerge"])
    assert info["models"] == [{"recipe": info["models"][0]["recipe"]}, "synthC.safetensors"]
    assert info["models"][0]["recipe"]["models"] == ["synthA.safetensors", "synthB.safetensors"]
    assert info["models"][0]["recipe"]["preset"] == "GRAD_V" and "/" not in svc.infotext_fields()["BlockMerge"]
    # save: the chain's result, the same file as a file merge of the same nested body (same name: the metadata
    # records the output's name)
    saved = client.post("/blockmerge/v1/save", json={"output": "chain-live", "dtype": "fp32"})
    assert saved.status_code == 200, saved.json()
    x = load_file(saved.json()["path"])
    live = live_params(model)
    assert all(torch.equal(x[k], v) for k, v in live.items())
    again = client.post("/blockmerge/v1/merge", json={**file_body, "weights": ",".join(vec), "output": "chain-live",
                                                      "overwrite": True})
    assert again.status_code == 200 and again.json()["sha256"] == saved.json()["sha256"], again.json()
    # every leaf is an input: a leaf that only the nested step reads is protected too
    r = client.post("/blockmerge/v1/save", json={"output": "synthB", "overwrite": True})
    assert r.status_code == 422 and "will not overwrite the loaded checkpoint or an input" in r.json()["detail"]
    r = client.post("/blockmerge/v1/restore", json={})
    assert r.status_code == 200 and fp(model) == original


@pytest.mark.parametrize("body,code,detail", [
    ({"model_a": {"recipe": {"model_b": "nope"}}, "model_b": "synthC"}, 422,
     "unknown checkpoint 'nope' (use a name from the checkpoint list), model_a.recipe.model_b"),
    ({"model_a": {"recipe": {"model_b": "synthB", "bogus": 1}}, "model_b": "synthC"}, 422,
     "unknown field, model_a.recipe.bogus"),
    ({"model_a": {"recipe": {"model_b": "synthB", "output": "x"}}, "model_b": "synthC"}, 422,
     "unknown field, model_a.recipe.output"),
    ({"model_a": {"recipe": {"model_b": "synthB", "alpha": True}}, "model_b": "synthC"}, 422,
     "alpha must be a number, model_a.recipe.alpha: True"),
    ({"model_b": {"recipe": {"model_a": "synthB", "model_b": {"recipe": {"model_a": "synthC", "model_b": "x"}}}}},
     422, "unknown checkpoint 'x' (use a name from the checkpoint list), model_b.recipe.model_b.recipe.model_b"),
    ({"model_a": {"recipe": {"model_b": "synthB"}, "x": 1}, "model_b": "synthC"}, 422,
     'a nested step is {"recipe": {…}} only, model_a.x'),
    ({"model_a": {"recipe": "step.yaml"}, "model_b": "synthC"}, 422,
     "recipe must be a JSON object of merge settings, model_a.recipe"),
    ({"model_a": {"recipe": {"model_b": "synthB", "mode": "ties", "params": {"density": 2}}}, "model_b": "synthC"},
     422, "parameter density must lie in [0, 1] (got 2.0), mode ties, model_a.recipe"),
    ({"model_b": "synthB", "mode": "ties", "more_models": [{"recipe": {"model_b": "nope"}}]}, 422,
     "unknown checkpoint 'nope' (use a name from the checkpoint list), more_models[0].recipe.model_b"),
    ({"model_a": {"recipe": {"model_a": "synthC", "model_b": "synthB"}}, "model_b": "synthB"}, 409,
     "model_a.recipe.model_a is not the loaded checkpoint; load it first, model_a.recipe.model_a: 'synthC'"),
])
def test_api_nested_errors_name_the_field_path(client, body, code, detail):
    r = client.post("/blockmerge/v1/test", json=body)
    assert r.status_code == code and r.json()["detail"] == detail


def test_api_nesting_depth_is_limited_and_file_merges_name_every_a(client):
    from lib_merge.recipe import MAX_CHAIN_DEPTH
    body = {"model_b": "synthB"}
    for _ in range(MAX_CHAIN_DEPTH + 1):
        body = {"model_a": {"recipe": body}, "model_b": "synthB"}
    r = client.post("/blockmerge/v1/test", json=body)
    assert r.status_code == 422 and r.json()["detail"].startswith(f"recipes are nested more than {MAX_CHAIN_DEPTH} deep")
    r = client.post("/blockmerge/v1/merge", json={"model_a": {"recipe": {"model_b": "synthB"}}, "model_b": "synthC",
                                                   "output": "x"})
    assert r.status_code == 422 and r.json()["detail"] == "model_a is required for a file merge, model_a.recipe.model_a"


def test_api_chain_whose_leaves_differ_in_architecture_names_the_leaf(client, webui, models):
    import shutil
    from pathlib import Path
    sdm = webui["sd_models"]
    shutil.copy(models["sdxl_b"], Path(sdm.model_path) / "synthXL.safetensors")
    sdm.list_models()
    r = client.post("/blockmerge/v1/test", json={"model_a": {"recipe": {"model_b": "synthXL"}}, "model_b": "synthC"})
    assert r.status_code == 422 and "synthXL" in r.json()["detail"], r.json()
    assert "model A" in r.json()["detail"], r.json()  # the step holding the leaf


@pytest.mark.parametrize("inner,outer", [
    ({"mode": "add_difference", "model_c": "synthC", "alpha": 0.4}, {"method": "slerp", "alpha": 0.6}),
    ({"mode": "ties", "model_c": "synthC", "alpha": 0.9, "params": {"density": 0.5}},
     {"mode": "triple_sum", "model_c": "synthB", "alpha": 0.2, "beta": 0.3}),
])
def test_api_modes_and_methods_inside_a_chain_save_what_was_previewed(client, webui, inner, outer):
    svc, model = webui["svc"], webui["model"]
    body = {"model_a": {"recipe": {"model_b": "synthB", **inner}}, "model_b": "synthC", **outer}
    r = client.post("/blockmerge/v1/test", json=body)
    assert r.status_code == 200, r.json()
    live = live_params(model)
    saved = client.post("/blockmerge/v1/save", json={"output": "chain-modes", "dtype": "fp32"})
    assert saved.status_code == 200, saved.json()
    x = load_file(saved.json()["path"])
    assert all(torch.equal(x[k], v) for k, v in live.items())
    svc.restore()


# -- X/Y/Z -------------------------------------------------------------------------------------------------
def test_xyz_cells_merge_on_top_of_a_nested_base(webui):
    from lib_merge.webui.xyz import cell_params
    svc, model = webui["svc"], webui["model"]
    original = fp(model)
    base = {"model_a": {"recipe": dict(STEP)}, "model_b": "synthC", "alpha": 0.3}
    svc.test_merge(base)
    pre_grid = fp(model)
    assert cell_params(svc.base_params, {"alpha": 0.7}, "sd1")["model_a"] == {"recipe": {**STEP, "model_b":
                                                                                          "synthB.safetensors"}}
    cells = grid(webui, "BlockMerge: alpha", "0,0.5,1")
    assert len(cells) == 3 and len({c.images[0].tobytes() for c in cells}) == 3
    for c, alpha in zip(cells, ("0.0", "0.5", "1.0")):
        info = json.loads(c.infotexts[0].split("BlockMerge: ", 1)[1].rsplit(", BlockMerge hash", 1)[0])
        assert str(info["alpha"]) == alpha and info["models"][1] == "synthC.safetensors"
        assert info["models"][0]["recipe"]["models"] == ["synthA.safetensors", "synthB.safetensors"]
        assert info["models"][0]["recipe"]["preset"] == "GRAD_V" and info["models"][0]["recipe"]["alpha"] == 0.3
    assert fp(model) == pre_grid  # the pre-grid chain is back, bit-exact
    # a cell at outer alpha 0 holds the nested step's values: those of the step's own file (A's dtype, "keep")
    svc.test_merge(cell_params(svc.base_params, {"alpha": 0.0}, "sd1"), keep_base=True)
    step_file = load_file(svc.merge_file({**STEP, "model_a": "synthA", "dtype": "keep", "output": "step"})["path"])
    assert all(torch.equal(step_file[k].float(), v) for k, v in live_params(model).items())
    svc.restore()
    assert fp(model) == original



def test_a_reload_during_a_generation_re_applies_the_chain_from_its_pinned_first_leaf(webui):
    """A generation pins the chain's first leaf (never the outer model_a, which is the nested step) and re-applies
    the whole chain after a reload wiped it."""
    svc, sdm, model = webui["svc"], webui["sd_models"], webui["model"]
    svc.test_merge(chain_body())
    merged = fp(model)
    fields = svc.begin_generation()
    assert json.loads(fields["BlockMerge"])["models"][0]["recipe"]["preset"] == "GRAD_V"
    assert svc.generation_params["model_a"]["recipe"]["model_a"] == "synthA.safetensors"
    sdm.reload_model_weights(info=sdm.checkpoint_aliases["synthA"], forced_reload=True)  # same file, weights wiped
    assert fp(model) != merged
    from modules import processing
    svc.ensure_applied(processing.StableDiffusionProcessingTxt2Img(prompt="cat"))
    assert fp(model) == merged and svc.status()["live"] and svc.session.recipe.is_chain()
