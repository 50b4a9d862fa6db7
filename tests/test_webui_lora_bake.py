"""LoRAs baked into the live test merge (issue 13, WebUI): the request's ``lora`` field on ``POST test`` / ``merge``
/ ``save``, the tab's "Bake into the test merge" part and the ``BlockMerge: LoRA strength`` X/Y/Z axis, against
the WebUI stand-in (real torch model with the SD1.5 key names, tiny shapes; LoRA files built by hand)."""
from __future__ import annotations

import html
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_merge import hashing
from lib_merge.errors import MergeError
from lib_merge.merge import merge_to_file
from lib_merge.recipe import LoraEntry, Recipe
from test_merge_lora import LIN, LORA_KEYS, OUT_V, delta, make_lora

from conftest import install_xyz_stub  # noqa: E402

STUB = Path(__file__).resolve().parent / "webui_stub"
ROOT = Path(__file__).resolve().parent.parent
OUT17 = [1.0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # BASE, M00 and OUT03-OUT11 (17-value layout)


@pytest.fixture
def env(webui_stub, tmp_path, monkeypatch):
    """Stand-in WebUI with synthA loaded, the LoRA folder holding l1 (5 modules) and sub/l2 (LIN, OUT_V), the
    Lora extension's ``networks``, the X/Y/Z script with our axes, one fresh Service everywhere, an API client."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules import processing, script_callbacks, sd_models, shared
    lora_dir = tmp_path / "models" / "Lora"
    (lora_dir / "sub").mkdir(parents=True)
    monkeypatch.setattr(shared.cmd_opts, "lora_dir", str(lora_dir), raising=False)
    l1 = make_lora(lora_dir / "l1.safetensors", LORA_KEYS, seed=1)
    l2 = make_lora(lora_dir / "sub" / "l2.safetensors", [LIN, OUT_V], seed=2, rank=1, alpha=None)
    spec = importlib.util.spec_from_file_location("networks", STUB / "extra" / "networks.py")
    networks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(networks)
    monkeypatch.setitem(sys.modules, "networks", networks)
    xyz_mod = install_xyz_stub(monkeypatch)
    from lib_merge.webui import api, callbacks, lora_ui, service as service_mod, ui, xyz
    svc = service_mod.Service()
    for mod in (service_mod, api, callbacks, xyz, ui, lora_ui):
        monkeypatch.setattr(mod, "SERVICE", svc)
    entry_spec = importlib.util.spec_from_file_location("blockmerge.py", ROOT / "scripts" / "blockmerge.py")
    entry = importlib.util.module_from_spec(entry_spec)
    entry_spec.loader.exec_module(entry)
    model = sd_models.load_model(sd_models.checkpoint_aliases["synthA"])
    xyz_script = xyz_mod.Script()
    xyz_script.ui(False)
    app = FastAPI()
    api.add_routes(app)

    class Runner:  # p.scripts: the AlwaysOn scripts that process_images runs (exceptions swallowed, as the WebUI)
        def process(self, p):
            try:
                entry.BlockMergeInfotext().process(p)
            except Exception as e:
                print("swallowed:", e)

    yield {"svc": svc, "sd_models": sd_models, "shared": shared, "model": model, "xyz": xyz_mod,
           "script": xyz_script, "runner": Runner(), "client": TestClient(app), "l1": l1, "l2": l2,
           "lora_dir": lora_dir, "tmp": tmp_path, "models_dir": Path(sd_models.model_path)}
    script_callbacks.clear_callbacks()
    processing.StableDiffusionProcessing.cached_c[:] = [None, None]
    getattr(xyz_mod.Script.run, "_blockmerge_wrapped", None) and setattr(
        xyz_mod.Script, "run", xyz_mod.Script.run._blockmerge_wrapped)


def live(model) -> dict[str, torch.Tensor]:
    from lib_merge.webui.target import WebUITarget
    return {k: v.detach().clone() for k, v in WebUITarget(model).params().items()}


def fp(model) -> str:
    from lib_merge.live import fingerprint
    from lib_merge.webui.target import WebUITarget
    return fingerprint(WebUITarget(model).params())


def ckpt(env, name):
    return env["sd_models"].checkpoint_aliases[name].filename


BASE = {"model_b": "synthB", "alpha": 0.3}


# -- the live merge ------------------------------------------------------------------------------------------------
def test_baked_lora_changes_exactly_the_patched_keys_by_strength_times_delta(env):
    svc, model = env["svc"], env["model"]
    svc.test_merge(BASE)
    plain = live(model)
    res = svc.test_merge({**BASE, "lora": [{"name": "l1", "strength": 0.7}, {"name": "sub/l2.safetensors",
                                                                              "strength": -0.4}]})
    assert res["written"] == len(LORA_KEYS)  # the plain merge stays everywhere else
    baked = live(model)
    assert {k for k in plain if not torch.equal(plain[k], baked[k])} == set(LORA_KEYS)
    for key in LORA_KEYS:
        want = plain[key] + 0.7 * delta(env["l1"], key) - (0.4 * delta(env["l2"], key) if key in (LIN, OUT_V) else 0)
        torch.testing.assert_close(baked[key], want, rtol=1e-5, atol=1e-5, msg=key)
    assert "LoRAs baked: l1.safetensors 0.7, sub/l2.safetensors -0.4" in res["message"]
    assert svc.status()["params"]["lora"] == [{"name": "l1.safetensors", "strength": 0.7},
                                              {"name": "sub/l2.safetensors", "strength": -0.4}]


def test_strength_change_re_merges_only_patched_keys_and_restore_is_bit_exact(env):
    svc, model = env["svc"], env["model"]
    original = fp(model)

    def body(s1, s2=1.0, name1="l1"):
        return {**BASE, "lora": [{"name": name1, "strength": s1}, {"name": "sub/l2", "strength": s2}]}
    first = svc.test_merge(body(0.7))
    assert first["written"] + first["unchanged"] == 882
    assert svc.test_merge(body(0.7, name1="l1.safetensors"))["written"] == 0  # same LoRA by another name: no work
    reads = svc.status()["bytes_read"]
    res = svc.test_merge(body(0.2))  # l1 patches 5 keys
    assert (res["written"], res["unchanged"]) == (5, 882 - 5)
    assert svc.test_merge(body(0.2, 0.5))["written"] == 2  # l2 patches LIN and OUT_V
    assert svc.status()["bytes_read"] == reads  # checkpoints are not read again
    assert svc.test_merge({**BASE, "lora": []})["written"] == 5  # dropping the LoRAs puts exactly their keys back
    svc.test_merge(body(0.2, 0.5))
    assert svc.restore()["restored"] == first["written"]
    assert fp(model) == original


def test_builtin_lora_in_the_prompt_still_works_on_top(env):
    """A ``<lora:…>`` the WebUI baked into a weight (its backup kept) is folded back before our write and its
    backup cleared, so it re-applies on the next generation over the baked merge."""
    svc, model = env["svc"], env["model"]
    svc.test_merge({**BASE, "lora": [{"name": "l1", "strength": 0.7}]})
    want = live(model)
    module = model.get_submodule("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    with torch.no_grad():
        module.network_weights_backup = module.weight.detach().clone()
        module.network_current_names = (("l2", 1.0),)
        module.network_bias_backup = None
        module.weight.add_(0.25)
    res = svc.test_merge({**BASE, "lora": [{"name": "l1", "strength": 0.5}]})
    assert res["written"] == 5 and module.network_weights_backup is None and module.network_current_names == ()
    svc.test_merge({**BASE, "lora": [{"name": "l1", "strength": 0.7}]})
    assert all(torch.equal(v, want[k]) for k, v in live(model).items())


def test_save_of_a_baked_live_merge_equals_the_engines_file_merge(env):
    model, client = env["model"], env["client"]
    lora = [{"name": "l1", "strength": 0.7, "blocks": "OUTALL"}, {"name": "sub/l2", "strength": -0.5, "blocks": OUT17}]
    r = client.post("/blockmerge/v1/test", json={**BASE, "lora": lora})
    assert r.status_code == 200, r.json()
    previewed = live(model)
    r = client.post("/blockmerge/v1/save", json={"output": "baked", "dtype": "fp32"})
    assert r.status_code == 200, r.json()
    saved = Path(r.json()["path"])
    recipe = Recipe(models=[ckpt(env, "synthA"), ckpt(env, "synthB")], alpha=0.3, dtype="fp32", vae="a",
                    lora=[LoraEntry(str(env["l1"]), 0.7, "OUTALL"), LoraEntry(str(env["l2"]), -0.5, OUT17)])
    (env["tmp"] / "ref").mkdir()
    ref = merge_to_file(recipe, env["tmp"] / "ref" / "baked.safetensors")
    assert saved.read_bytes() == ref.output.read_bytes()  # same tensors, same metadata
    tensors = load_file(str(saved))
    assert all(torch.equal(tensors[k], v) for k, v in previewed.items())  # what was previewed
    with safe_open(str(saved), "pt") as f:
        ours = json.loads(f.metadata()["blockmerge_recipe"])
    assert ours["lora"] == [{"path": "l1.safetensors", "strength": 0.7, "blocks": "OUTALL"},
                            {"path": "l2.safetensors", "strength": -0.5, "blocks": OUT17}]
    assert ours["inputs"][2:] == [{"role": "lora1", "name": "l1.safetensors", "sha256": hashing.sha256_file(env["l1"])},
                                  {"role": "lora2", "name": "l2.safetensors", "sha256": hashing.sha256_file(env["l2"])}]
    assert str(env["tmp"]) not in json.dumps(ours)
    # POST merge takes the field too: a file merge of the same recipe, same bytes
    r2 = client.post("/blockmerge/v1/merge", json={**BASE, "model_a": "synthA", "lora": lora, "vae": "a",
                                                   "dtype": "fp32", "output": "baked2"})
    assert r2.status_code == 200, r2.json()
    again = load_file(r2.json()["path"])
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], v) for k, v in tensors.items())


def test_infotext_names_the_baked_loras_never_their_paths(env):
    svc = env["svc"]
    svc.test_merge({**BASE, "lora": [{"name": "sub/l2", "strength": 0.5, "blocks": "ALL0.5"}]})
    fields = svc.infotext_fields()
    recipe = json.loads(fields["BlockMerge"])
    assert recipe["lora"] == [{"path": "sub/l2.safetensors", "strength": 0.5, "blocks": "ALL0.5"}]
    assert str(env["tmp"]) not in fields["BlockMerge"]


# -- API checks ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora,detail", [
    ([{"name": "l1", "weight": 1}], "unknown field, lora[0].weight"),
    ([{"name": "l1"}, {"name": "nope"}], "unknown LoRA 'nope' (use a name from the LoRA folder's list), lora[1].name"),
    ([{"name": "../Lora/l1"}], "unknown LoRA '../Lora/l1' (use a name from the LoRA folder's list), lora[0].name"),
    ([{"strength": 1}], "a LoRA name is required, lora[0].name"),
    ([{"name": "l1", "strength": "0.5"}], "lora[0].strength must be a finite number, lora[0].strength: '0.5'"),
    ([{"name": "l1", "strength": True}], "lora[0].strength must be a finite number, lora[0].strength: True"),
    ([{"name": "l1", "blocks": "NOPE"}], "unknown LoRA block-weight preset 'NOPE' (presets: NONE, ALL, INS, IND, "
                                         "INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5), lora[0].blocks"),
    ([{"name": "l1", "blocks": [1, 0, 1]}], "LoRA block weights have 3 values; accepted lengths are 12, 17, 20, 26, "
                                            "lora[0].blocks"),
    ([{"name": "l1", "blocks": {"IN01": 1}}], "lora[0].blocks must be null, a preset name or a list of numbers, "
                                              "lora[0].blocks: {'IN01': 1}"),
    (["l1"], "lora[0] must be a JSON object with name, strength and blocks, lora[0]"),
    ("l1", "lora must be a list of {name, strength, blocks}, lora: 'l1'"),
])
def test_api_lora_field_errors_name_the_item_and_field(env, lora, detail):
    before = fp(env["model"])
    for route, extra in (("test", {}), ("merge", {"model_a": "synthA", "output": "never"})):
        r = env["client"].post(f"/blockmerge/v1/{route}", json={**BASE, **extra, "lora": lora})
        assert r.status_code == 422 and r.json()["detail"] == detail, (route, r.json())
    assert fp(env["model"]) == before and not (env["models_dir"] / "never.safetensors").exists()


def test_api_lora_names_are_looked_up_never_joined(env):
    """A real LoRA file outside the folder, by path or relative name, is unknown: names come from the listing."""
    outside = env["tmp"] / "outside.safetensors"
    outside.write_bytes(env["l1"].read_bytes())
    for name in (str(outside), str(env["l1"]), "../outside", "sub/../l1"):
        r = env["client"].post("/blockmerge/v1/test", json={**BASE, "lora": [{"name": name}]})
        assert r.status_code == 422 and r.json()["detail"] == \
            f"unknown LoRA {name!r} (use a name from the LoRA folder's list), lora[0].name"
    assert not env["svc"].status()["live"]


# -- the tab ---------------------------------------------------------------------------------------------------------
class Recording:
    def __init__(self):
        self.sent = []

    def test_merge(self, params):
        self.sent.append(params)
        return {"written": 1, "notes": [], "message": "ok", "recipe": {}}

    def merge_file(self, params):
        self.sent.append(params)
        return {"name": "x.safetensors", "short_hash": "0", "seconds": 0.1, "recipe": {}}

    def status(self):  # the tab reads these at build time (chain button) and in Test merge / Merge to file
        return {"live": False}

    def chain_text(self):
        return ""

    def chained(self, params):
        return params


def _button(t, label):
    return next(b for b in t.c["buttons"] if b.value == label)


def test_bake_controls_produce_the_requests_lora_field(env, monkeypatch):
    from lib_merge.webui import lora_ui, ui
    from test_webui_ui import UI
    rec = Recording()
    monkeypatch.setattr(ui, "SERVICE", rec)
    t = UI(ui.create_tab())
    bk = t.c["lora"]["bake"]
    assert bk["loras"].multiselect and list(bk["loras"].choices) in (
        ["l1.safetensors", "sub/l2.safetensors"], [("l1.safetensors",) * 2, ("sub/l2.safetensors",) * 2])
    t[t.c["model_b"]] = "synthB"
    t.fire(_button(t, "Test merge"), "click")
    assert "lora" not in rec.sent[-1]  # nothing selected: no field
    t[bk["loras"]] = ["l1.safetensors", "sub/l2.safetensors"]
    t.fire(_button(t, "Test merge"), "click")
    assert rec.sent[-1]["lora"] == [{"name": "l1.safetensors", "strength": 1.0},
                                    {"name": "sub/l2.safetensors", "strength": 1.0}]
    t[bk["strengths"]], t[bk["blocks"]] = "0.8, -0.5", "OUTALL; " + ",".join(map(str, OUT17))
    t.fire(_button(t, "Test merge"), "click")
    assert rec.sent[-1]["lora"] == [{"name": "l1.safetensors", "strength": 0.8, "blocks": "OUTALL"},
                                    {"name": "sub/l2.safetensors", "strength": -0.5,
                                     "blocks": ",".join(map(str, OUT17))}]
    t[t.c["output"]] = "f"
    t.fire(_button(t, "Merge to file (A B C)"), "click")  # the same field goes to a file merge
    assert rec.sent[-1]["lora"] == rec.sent[-2]["lora"] and rec.sent[-1]["output"] == "f"
    t[bk["blocks"]] = ";OUTS"  # an empty item: every block for that LoRA
    t.fire(_button(t, "Test merge"), "click")
    assert rec.sent[-1]["lora"][0] == {"name": "l1.safetensors", "strength": 0.8}
    n = len(rec.sent)
    for strengths, blocks, said in (("0.8", "", "1 strengths for 2 selected LoRAs"),
                                    ("0.8, x", "", "strengths must be numbers separated by commas"),
                                    ("1,1", "OUTALL", "1 block weights for 2 selected LoRAs")):
        t[bk["strengths"]], t[bk["blocks"]] = strengths, blocks
        t.fire(_button(t, "Test merge"), "click")
        assert len(rec.sent) == n and said in t[t.c["status"]], t[t.c["status"]]
    assert lora_ui.bake_request([], "junk", "junk") == []


def test_bake_part_runs_test_merge_and_save_with_the_loras(env):
    from lib_merge.webui import ui
    from test_webui_ui import UI
    svc, model = env["svc"], env["model"]
    t = UI(ui.create_tab())
    bk = t.c["lora"]["bake"]
    t[t.c["model_b"]], t[t.c["alpha"]] = "synthB", 0.3
    t[bk["loras"]], t[bk["strengths"]] = ["sub/l2.safetensors"], "0.6"
    t.fire(_button(t, "Test merge"), "click")
    status = t[t.c["status"]]
    assert "test merge live" in status and "LoRAs baked: sub/l2.safetensors 0.6" in status, status
    assert [(e.path, e.strength) for e in svc.session.recipe.lora] == [(str(env["l2"]), 0.6)]
    t[bk["strengths"]] = "0.9"
    t.fire(_button(t, "Test merge"), "click")
    assert "test merge live: 2 tensors written" in t[t.c["status"]]  # only l2's keys
    previewed = live(model)
    t[t.c["output"]], t[t.c["dtype"]] = "tab-baked", "fp32"
    t.fire(_button(t, "Save"), "click")
    assert "saved tab-baked.safetensors" in t[t.c["status"]], t[t.c["status"]]
    saved = load_file(str(env["models_dir"] / "tab-baked.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in previewed.items())
    t[bk["blocks"]] = "BOGUS"
    t.fire(_button(t, "Test merge"), "click")
    said = html.unescape(t[t.c["status"]])
    assert "unknown LoRA block-weight preset 'BOGUS'" in said and said.split("<")[1].endswith(", lora[0].blocks")


def test_new_lora_files_show_in_the_bake_list(env):
    from lib_merge.webui import ui
    from test_webui_ui import UI
    t = UI(ui.create_tab())
    bk, mg = t.c["lora"]["bake"], t.c["lora"]["merge"]
    t[bk["loras"]] = ["l1.safetensors"]
    t[mg["loras"]], t[mg["output"]] = ["l1.safetensors"], "copy"
    t.fire(mg["button"], "click")
    assert "wrote copy.safetensors" in t[mg["status"]], t[mg["status"]]
    assert "copy.safetensors" in t.prop(bk["loras"], "choices") and t[bk["loras"]] == ["l1.safetensors"]
    (env["lora_dir"] / "late.safetensors").write_bytes(env["l1"].read_bytes())
    t.fire(bk["refresh"], "click")
    assert "late.safetensors" in t.prop(bk["loras"], "choices") and "late.safetensors" in t.prop(mg["loras"], "choices")


# -- X/Y/Z -----------------------------------------------------------------------------------------------------------
def grid(env, x_label, x_values, y_label="Nothing", y_values="", x_drop=(), y_drop=()):
    from modules import processing
    p = processing.StableDiffusionProcessingTxt2Img(prompt="cat", seed=1, steps=2, width=8, height=8)
    p.scripts = env["runner"]
    s = env["script"]
    labels = [o.label for o in s.current_axis_options]
    return s.run(p, labels.index(x_label), x_values, list(x_drop), labels.index(y_label), y_values, list(y_drop),
                 0, "", [], True, True, False, False, False, False, False, 0, False)


AXIS = "BlockMerge: LoRA strength"


def test_lora_strength_axis_cells_differ_and_the_pre_grid_merge_comes_back(env):
    svc, model = env["svc"], env["model"]
    svc.test_merge({**BASE, "lora": [{"name": "l1", "strength": 0.7}, {"name": "sub/l2", "strength": 1.0}]})
    pre_grid = fp(model)
    cells = grid(env, AXIS, "0, 0.5, 1")
    assert len(cells) == 3
    infos = [json.loads(c.infotexts[0].split("BlockMerge: ")[1].split(", BlockMerge hash")[0])["lora"]
             for c in cells]
    assert [[e["strength"] for e in lo] for lo in infos] == [[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]
    assert [c["written"] for c in svc.xyz_cells][1:] == [5, 5]  # only the patched keys between cells
    assert len({c.images[0].tobytes() for c in cells}) == 3
    assert fp(model) == pre_grid and svc.base_params["lora"][0]["strength"] == 0.7
    cells = grid(env, AXIS, "l1:0 l2:1, l1:1 sub/l2.safetensors:0")  # per-LoRA pairs (stem or list name)
    assert [c["axes"] for c in svc.xyz_cells] == [{"lora_strength": "l1:0 l2:1"},
                                                  {"lora_strength": "l1:1 sub/l2.safetensors:0"}]
    assert svc.xyz_cells[1]["written"] == 5 and len({c.images[0].tobytes() for c in cells}) == 2
    assert fp(model) == pre_grid


def test_lora_strength_axis_bad_values_name_the_value(env):
    from lib_merge.webui.xyz import cell_params
    svc = env["svc"]
    svc.test_merge(BASE)
    with pytest.raises(MergeError, match=r"^BlockMerge: LoRA strength needs LoRAs in the base recipe"):
        grid(env, AXIS, "0,1")
    svc.test_merge({**BASE, "lora": [{"name": "l1", "strength": 0.7}]})
    for value, message in (
            ("x", "LoRA strength must be a number or NAME:STRENGTH pairs separated by spaces, "
                  "BlockMerge: LoRA strength 'x'"),
            ("l1:x", "not a number: 'x', BlockMerge: LoRA strength 'l1:x'"),
            ("l1:1 junk", "LoRA strength must be a number or NAME:STRENGTH pairs separated by spaces, "
                          "BlockMerge: LoRA strength 'l1:1 junk'"),
            ("l2:1", "LoRA 'l2' is not baked in the base recipe (baked: l1.safetensors), "
                     "BlockMerge: LoRA strength 'l2:1'")):
        with pytest.raises(MergeError) as e:
            grid(env, AXIS, f"0.5,{value}")
        assert str(e.value) == message
        assert svc.xyz_cells == []  # refused before the first cell
    assert cell_params({"model_b": "b", "lora": [{"name": "a.safetensors", "strength": 1.0}]},
                       {"lora_strength": "0.25"}, "sd1")["lora"] == [{"name": "a.safetensors", "strength": 0.25}]
