"""LoRA in the WebUI (issue 13): ``POST lora/extract`` and ``lora/merge`` and the tab's LoRA accordion, against the
WebUI stand-in: files land in the LoRA folder only, equal what the engine writes, and show in the Lora list."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from lib_merge.lora.extract import extract_lora
from lib_merge.lora.merge import MergeInput, merge_loras
from tests.conftest import STUB

gr = pytest.importorskip("gradio")


@pytest.fixture
def lora_env(webui_stub, tmp_path, monkeypatch):
    """The stand-in with the Lora extension's ``--lora-dir`` and its ``networks`` module; a fresh service."""
    from modules import shared
    lora_dir = tmp_path / "models" / "Lora"
    monkeypatch.setattr(shared.cmd_opts, "lora_dir", str(lora_dir), raising=False)
    spec = importlib.util.spec_from_file_location("networks", STUB / "extra" / "networks.py")
    networks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(networks)
    monkeypatch.setitem(sys.modules, "networks", networks)
    from lib_merge.webui import api, lora_ui, service as service_mod
    svc = service_mod.Service()
    for mod in (service_mod, api, lora_ui):
        monkeypatch.setattr(mod, "SERVICE", svc)
    return {"dir": lora_dir, "networks": networks, "sd_models": webui_stub, "svc": svc, "tmp": tmp_path}


@pytest.fixture
def client(lora_env):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from lib_merge.webui.api import add_routes
    app = FastAPI()
    add_routes(app)
    return TestClient(app)


def ckpt(env, name: str) -> str:
    return env["sd_models"].checkpoint_aliases[name].filename


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def two_loras(env) -> tuple[Path, Path]:
    """Two LoRAs in the LoRA folder (one in a subfolder), extracted by the engine from the stand-in's checkpoints."""
    d = env["dir"]
    (d / "sub").mkdir(parents=True)
    a = extract_lora(ckpt(env, "synthB"), ckpt(env, "synthA"), d / "b_minus_a.safetensors", rank=2,
                     text_encoder=True, dtype="fp32").output
    b = extract_lora(ckpt(env, "synthC"), ckpt(env, "synthA"), d / "sub" / "c_minus_a.safetensors", rank=3,
                     text_encoder=True, dtype="fp32").output
    return a, b


# -- extract ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", [{"rank": 2}, {"energy": 0.9, "conv_rank": 1}])
def test_extract_route_writes_the_engines_lora_into_the_lora_folder(client, lora_env, rule):
    body = {"tuned": "synthB", "base": "synthA.safetensors", "output": "b-diff", "text_encoder": True, **rule}
    r = client.post("/blockmerge/v1/lora/extract", json=body)
    assert r.status_code == 200, r.text
    res = r.json()
    out = lora_env["dir"] / "b-diff.safetensors"
    assert res["output"] == "b-diff.safetensors" and Path(res["path"]) == out
    assert res["tuned"] == "synthB.safetensors" and res["base"] == "synthA.safetensors"  # canonical names
    ref = extract_lora(ckpt(lora_env, "synthB"), ckpt(lora_env, "synthA"), lora_env["tmp"] / "ref.safetensors",
                       text_encoder=True, **rule)
    assert out.read_bytes() == ref.output.read_bytes()  # same tensors, same metadata (inputs by file name)
    assert res["sha256"] == sha(out) == ref.sha256
    ranks = [m.rank for m in ref.modules]
    assert res["ranks"] == {"min": min(ranks), "median": statistics.median(ranks), "max": max(ranks)}
    assert len(res["modules"]) == len(ref.modules) and res["rel_error"]["max"] == max(m.rel_error for m in ref.modules)
    # the WebUI's LoRA list was refreshed: the file is in the Lora tab without a restart
    assert res["lora_list_refreshed"] is True
    assert lora_env["networks"].available_networks["b-diff"] == str(out)


def test_extract_validation_names_the_field(client, lora_env):
    cases = [
        ({"tuned": "synthB", "base": "synthA", "output": "x", "rank": 2, "bogus": 1}, "unknown field, bogus"),
        ({"tuned": "nope", "base": "synthA", "output": "x", "rank": 2},
         "unknown checkpoint 'nope' (use a name from the checkpoint list), tuned"),
        ({"tuned": "synthB", "base": ckpt(lora_env, "synthA"), "output": "x", "rank": 2}, "base"),  # a path: refused
        ({"tuned": "synthB", "base": "synthA", "output": "x"}, "give exactly one of rank or energy, rank/energy"),
        ({"tuned": "synthB", "base": "synthA", "output": "x", "rank": 2, "energy": 0.9}, "rank/energy"),
        ({"tuned": "synthB", "base": "synthA", "output": "x", "rank": True}, "rank must be a whole number, rank: True"),
        ({"tuned": "synthB", "base": "synthA", "output": "x", "energy": 1.5}, "energy must be in (0, 1], energy: 1.5"),
        ({"tuned": "synthB", "base": "synthA", "output": "x", "rank": 2, "dtype": "keep"},
         "dtype must be fp16, bf16 or fp32, dtype: 'keep'"),
        ({"tuned": "synthB", "base": "synthA", "output": "x", "rank": 2, "text_encoder": "yes"},
         "text_encoder must be true or false, text_encoder: 'yes'"),
        ({"tuned": "synthB", "base": "synthA", "rank": 2}, "an output name is required, output"),
        ({"tuned": "synthB", "base": "synthA", "output": "x", "rank": 2, "device": "tpu9"},
         "unknown device 'tpu9' (cpu, cuda, cuda:N, mps or xpu), device"),
        ({"tuned": "synthB", "base": "synthA", "output": "x", "rank": 2, "device": 0},
         "device must be a device name like cpu or cuda, device: 0"),
    ]
    for body, detail in cases:
        r = client.post("/blockmerge/v1/lora/extract", json=body)
        assert r.status_code == 422 and detail in r.json()["detail"], (body, r.json())
    assert not lora_env["dir"].exists() or not any(lora_env["dir"].iterdir())


# -- merge --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank,dtype", [(None, "fp16"), ("auto", "fp32"), (2, "fp32")])
def test_merge_route_equals_the_engines_merge(client, lora_env, rank, dtype):
    a, b = two_loras(lora_env)
    body = {"loras": [{"name": "b_minus_a", "ratio": 0.5}, {"name": "sub/c_minus_a.safetensors", "ratio": -0.25}],
            "output": "mix.safetensors", "rank": rank, "dtype": dtype}
    r = client.post("/blockmerge/v1/lora/merge", json=body)
    assert r.status_code == 200, r.text
    res = r.json()
    out = lora_env["dir"] / "mix.safetensors"
    ref = merge_loras([MergeInput(a, 0.5), MergeInput(b, -0.25)], lora_env["tmp"] / "ref.safetensors", rank=rank,
                      dtype=dtype)
    assert out.read_bytes() == ref.output.read_bytes() and res["sha256"] == ref.sha256 == sha(out)
    assert res["loras"] == [{"name": "b_minus_a.safetensors", "ratio": 0.5},
                            {"name": "sub/c_minus_a.safetensors", "ratio": -0.25}]
    assert res["rank"] == rank and res["modules"] == len(ref.modules)
    assert res["ranks"]["max"] == max(m.rank for m in ref.modules)
    if rank is None:
        assert res["ranks"]["min"] == 5 and "rel_error" not in res  # concatenated: 2 + 3, exact
    else:
        assert res["rel_error"]["max"] == max(m.rel_error for m in ref.modules)
    assert lora_env["networks"].available_networks["mix"] == str(out)


def test_merge_ratio_defaults_to_one_and_validation_names_the_field(client, lora_env):
    a, _ = two_loras(lora_env)
    r = client.post("/blockmerge/v1/lora/merge", json={"loras": [{"name": "b_minus_a"}], "output": "one"})
    assert r.status_code == 200 and r.json()["loras"] == [{"name": "b_minus_a.safetensors", "ratio": 1.0}]
    before = listing(lora_env["dir"])
    cases = [
        ({"loras": [{"name": "b_minus_a"}], "output": "y", "bogus": 1}, "unknown field, bogus"),
        ({"loras": [{"name": "b_minus_a", "weight": 1}], "output": "y"}, "unknown field, loras[0].weight"),
        ({"loras": [], "output": "y"}, "give at least one LoRA as a list of {name, ratio}, loras"),
        ({"loras": ["b_minus_a"], "output": "y"}, "must be a JSON object, loras[0]"),
        ({"loras": [{"name": "b_minus_a"}, {"name": "nope"}], "output": "y"},
         "unknown LoRA 'nope' (use a name from the LoRA folder's list), loras[1].name"),
        ({"loras": [{"name": "b_minus_a", "ratio": "0.5"}], "output": "y"},
         "loras[0].ratio must be a finite number, loras[0].ratio: '0.5'"),
        ({"loras": [{"name": "b_minus_a"}], "output": "y", "rank": 0}, "rank: 0"),
        ({"loras": [{"name": "b_minus_a"}], "output": "y", "rank": "max"}, "rank: 'max'"),
        ({"loras": [{"name": "b_minus_a"}], "output": "b_minus_a", "overwrite": True},
         "output would overwrite an input model"),
    ]
    for body, detail in cases:
        r = client.post("/blockmerge/v1/lora/merge", json=body)
        assert r.status_code == 422 and detail in r.json()["detail"], (body, r.json())
    assert listing(lora_env["dir"]) == before


# -- names never leave the LoRA folder ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "/abs/x", "a/b", "..\\x", "sub/../../x", ".hidden"])
def test_output_names_that_leave_the_folder_are_refused_and_nothing_is_written(client, lora_env, bad):
    two_loras(lora_env)
    root = lora_env["tmp"]
    before = listing(root)
    for route, body in (("extract", {"tuned": "synthB", "base": "synthA", "rank": 1}),
                        ("merge", {"loras": [{"name": "b_minus_a"}]})):
        r = client.post(f"/blockmerge/v1/lora/{route}", json={**body, "output": bad})
        assert r.status_code == 422 and r.json()["detail"].endswith(repr(bad)) and "output" in r.json()["detail"]
    assert listing(root) == before
    assert not Path("/abs/x.safetensors").exists()


def test_lora_input_names_are_looked_up_in_the_folder_never_joined(client, lora_env):
    a, _ = two_loras(lora_env)
    outside = lora_env["tmp"] / "outside.safetensors"
    outside.write_bytes(a.read_bytes())  # a real LoRA file, but outside the LoRA folder
    for name in ("../outside", "../outside.safetensors", str(outside), str(a), "sub/../b_minus_a"):
        r = client.post("/blockmerge/v1/lora/merge", json={"loras": [{"name": name}], "output": "z"})
        assert r.status_code == 422 and r.json()["detail"] == \
            f"unknown LoRA {name!r} (use a name from the LoRA folder's list), loras[0].name"
    assert not (lora_env["dir"] / "z.safetensors").exists()


def test_existing_output_is_409_until_overwrite(client, lora_env):
    two_loras(lora_env)
    first = client.post("/blockmerge/v1/lora/merge", json={"loras": [{"name": "b_minus_a"}], "output": "keep"})
    assert first.status_code == 200
    out = lora_env["dir"] / "keep.safetensors"
    stamp = (out.read_bytes(), os.stat(out).st_mtime_ns)
    for route, body in (("merge", {"loras": [{"name": "b_minus_a", "ratio": 0.3}]}),
                        ("extract", {"tuned": "synthB", "base": "synthA", "rank": 1})):
        r = client.post(f"/blockmerge/v1/lora/{route}", json={**body, "output": "keep"})
        assert r.status_code == 409 and r.json()["detail"] == \
            "output exists in the LoRA folder (set overwrite to replace it), output: 'keep.safetensors'"
        assert (out.read_bytes(), os.stat(out).st_mtime_ns) == stamp
    r = client.post("/blockmerge/v1/lora/merge", json={"loras": [{"name": "b_minus_a", "ratio": 0.3}],
                                                       "output": "keep", "overwrite": True})
    assert r.status_code == 200 and out.read_bytes() != stamp[0] and r.json()["sha256"] == sha(out)


def test_lora_routes_take_the_queue_lock(client, lora_env):
    from modules import call_queue
    two_loras(lora_env)
    done = []
    call_queue.queue_lock.acquire()
    t = threading.Thread(target=lambda: done.append(client.post(
        "/blockmerge/v1/lora/merge", json={"loras": [{"name": "b_minus_a"}], "output": "locked"})))
    t.start()
    time.sleep(0.5)
    assert not done and not (lora_env["dir"] / "locked.safetensors").exists()  # waits behind a "generation"
    call_queue.queue_lock.release()
    t.join(60)
    assert done and done[0].status_code == 200 and "queue_wait" in done[0].json()


def test_without_the_lora_extension_files_are_still_written(client, lora_env, monkeypatch):
    monkeypatch.delitem(sys.modules, "networks")
    two_loras(lora_env)
    r = client.post("/blockmerge/v1/lora/merge", json={"loras": [{"name": "b_minus_a"}], "output": "no-ext"})
    assert r.status_code == 200 and r.json()["lora_list_refreshed"] is False
    assert (lora_env["dir"] / "no-ext.safetensors").exists()


def test_lora_folder_defaults_to_models_lora(webui_stub, monkeypatch):
    from modules import shared
    from lib_merge.webui import host
    monkeypatch.delattr(shared.cmd_opts, "lora_dir", raising=False)
    assert host.lora_dir() == Path(webui_stub.model_path).parent / "Lora"


# -- the tab ------------------------------------------------------------------------------------------------------
@pytest.fixture
def tab(lora_env):
    from lib_merge.webui.ui import create_tab
    from tests.test_webui_ui import UI
    two_loras(lora_env)
    return UI(create_tab())


def choices(comp) -> list[str]:
    return [x[0] if isinstance(x, (tuple, list)) else x for x in comp.choices]


def test_tab_has_a_lora_accordion_with_extract_and_merge(tab):
    lora = tab.c["lora"]
    ex, mg = lora["extract"], lora["merge"]
    acc = tab.by_id("blockmerge_lora_acc")
    assert isinstance(acc, gr.Accordion) and acc.label == "LoRA"
    assert choices(ex["tuned"]) == choices(tab.c["model_a"]) and "synthB.safetensors" in choices(ex["tuned"])
    assert choices(ex["base"]) == choices(tab.c["model_a"])
    assert choices(mg["loras"]) == ["b_minus_a.safetensors", "sub/c_minus_a.safetensors"]
    assert mg["loras"].multiselect and mg["rank"].value == "none" and ex["dtype"].value == "fp16"
    assert ex["button"].value == "Extract LoRA" and mg["button"].value == "Merge LoRAs"
    tab[ex["keep"]] = "energy"
    tab.fire(ex["keep"], "change")
    assert tab.prop(ex["rank"], "interactive") is False and tab.prop(ex["energy"], "interactive") is True


class Recording:
    """Stands in for the service: records what the buttons send."""

    def __init__(self):
        self.sent = []

    def lora_extract(self, body):
        self.sent.append(("extract", body))
        return {"output": "x.safetensors", "seconds": 0.1, "ranks": {"min": 1, "max": 2}, "sha256": "0" * 64}

    def lora_merge(self, body):
        self.sent.append(("merge", body))
        return {"output": "y.safetensors", "seconds": 0.1, "ranks": {"min": 5, "max": 5}, "sha256": "1" * 64,
                "rel_error": None}


def test_buttons_send_the_route_bodies_to_the_service(tab, monkeypatch):
    from lib_merge.webui import lora_ui
    rec = Recording()
    monkeypatch.setattr(lora_ui, "SERVICE", rec)
    ex, mg = tab.c["lora"]["extract"], tab.c["lora"]["merge"]
    tab[ex["tuned"]], tab[ex["base"]], tab[ex["output"]] = "synthB.safetensors", "synthA.safetensors", "t"
    tab[ex["rank"]], tab[ex["conv_rank"]], tab[ex["text_encoder"]] = 16.0, 4, True
    tab.fire(ex["button"], "click")
    assert rec.sent[-1] == ("extract", {"tuned": "synthB.safetensors", "base": "synthA.safetensors", "output": "t",
                                        "text_encoder": True, "dtype": "fp16", "overwrite": False, "rank": 16,
                                        "conv_rank": 4})
    tab[ex["keep"]], tab[ex["energy"]], tab[ex["conv_rank"]] = "energy", 0.9, 0
    tab.fire(ex["button"], "click")
    body = rec.sent[-1][1]
    assert body["energy"] == 0.9 and "rank" not in body and "conv_rank" not in body
    tab[mg["loras"]] = ["b_minus_a.safetensors", "sub/c_minus_a.safetensors"]
    tab[mg["ratios"]], tab[mg["rank"]], tab[mg["output"]] = "0.5, -0.25", "auto", "m"
    tab.fire(mg["button"], "click")
    assert rec.sent[-1] == ("merge", {"loras": [{"name": "b_minus_a.safetensors", "ratio": 0.5},
                                                {"name": "sub/c_minus_a.safetensors", "ratio": -0.25}],
                                      "rank": "auto", "dtype": "fp16", "output": "m", "overwrite": False})
    tab[mg["rank"]] = "32"
    tab.fire(mg["button"], "click")
    assert rec.sent[-1][1]["rank"] == 32
    n = len(rec.sent)
    tab[mg["ratios"]] = "0.5"  # one ratio for two LoRAs: said in the status, nothing sent
    tab.fire(mg["button"], "click")
    assert len(rec.sent) == n and "1 ratios for 2 selected LoRAs" in tab[mg["status"]]


def test_buttons_write_through_the_service_and_list_the_new_file(tab, lora_env):
    ex, mg = tab.c["lora"]["extract"], tab.c["lora"]["merge"]
    tab[ex["tuned"]], tab[ex["base"]], tab[ex["output"]], tab[ex["rank"]] = \
        "synthB.safetensors", "synthA.safetensors", "from-tab", 2
    tab.fire(ex["button"], "click")
    out = lora_env["dir"] / "from-tab.safetensors"
    assert out.exists() and "wrote from-tab.safetensors in the LoRA folder" in tab[ex["status"]], tab[ex["status"]]
    assert "from-tab.safetensors" in tab.prop(mg["loras"], "choices")
    assert "from-tab" in lora_env["networks"].available_networks
    tab.fire(ex["button"], "click")  # again: the service's 409 message, file untouched
    assert "output exists in the LoRA folder" in tab[ex["status"]]
    tab[mg["loras"]] = ["from-tab.safetensors", "b_minus_a.safetensors"]
    tab[mg["ratios"]], tab[mg["output"]] = "1,1", "../escape"
    tab.fire(mg["button"], "click")
    assert "output name must be a bare file name" in tab[mg["status"]]
    assert not (lora_env["tmp"] / "models" / "escape.safetensors").exists()
    tab[mg["output"]] = "tab-mix"
    tab.fire(mg["button"], "click")
    assert "wrote tab-mix.safetensors" in tab[mg["status"]], tab[mg["status"]]
    with safe_open(str(lora_env["dir"] / "tab-mix.safetensors"), "pt") as f:
        assert '"lora":"merge"' in f.metadata()["blockmerge_recipe"]
    assert tab[mg["loras"]] == ["from-tab.safetensors", "b_minus_a.safetensors"]  # selection kept
    assert "tab-mix.safetensors" in tab.prop(mg["loras"], "choices")
    tab.fire(mg["refresh"], "click")
    assert tab.prop(mg["loras"], "choices") == ["b_minus_a.safetensors", "from-tab.safetensors",
                                                "sub/c_minus_a.safetensors", "tab-mix.safetensors"]


def test_lora_list_follows_linked_folders_once_and_only_safetensors(lora_env, tmp_path):
    from lib_merge.webui.lora import lora_files
    a, _ = two_loras(lora_env)
    shared_dir = tmp_path / "shared-loras"
    shared_dir.mkdir()
    (shared_dir / "s.safetensors").write_bytes(a.read_bytes())
    (shared_dir / "old.pt").write_bytes(b"not read")
    os.symlink(shared_dir, lora_env["dir"] / "linked")
    os.symlink(lora_env["dir"], lora_env["dir"] / "sub" / "loop")  # a loop: listed once, no hang
    assert list(lora_files()) == ["b_minus_a.safetensors", "linked/s.safetensors", "sub/c_minus_a.safetensors"]
