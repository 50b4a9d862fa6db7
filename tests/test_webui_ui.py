"""The tab builds with the real gradio 3.41.2 (the WebUI's pin) against the WebUI stand-in."""
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
STUB = Path(__file__).resolve().parent / "webui_stub"


@pytest.fixture
def stub(webui_stub):
    return webui_stub


def test_gradio_is_the_webui_pin():
    assert gr.__version__ == "3.41.2"


def test_entry_script_registers_tab_and_settings(stub):
    import importlib.util
    from modules import script_callbacks, shared
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("blockmerge.py", root / "scripts" / "blockmerge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert len(script_callbacks.callback_map["ui_tabs"]) == 1
    for cb in script_callbacks.callback_map["ui_settings"]:
        cb()
    assert shared.opts.blockmerge_cache_device == "cpu" and shared.opts.blockmerge_default_dtype == "fp16"
    tabs = script_callbacks.callback_map["ui_tabs"][0]()
    (blocks, title, elem_id), = tabs
    assert isinstance(blocks, gr.Blocks) and title == "BlockMerge" and elem_id == "blockmerge"
    c = blocks.blockmerge_components
    assert len(c["sliders"]) == 26
    assert [s.label for s in c["sliders"]][:3] == ["BASE (text encoder)", "IN00", "IN01"]
    assert set(c["model_b"].choices) >= {"synthA.safetensors", "synthB.safetensors"} or \
        set(x[0] if isinstance(x, tuple) else x for x in c["model_b"].choices) >= {"synthA.safetensors", "synthB.safetensors"}
    labels = [b.value for b in c["buttons"]]
    assert labels == ["Test merge", "Preview", "Restore", "Save", "Merge to file (A B C)", "Stop"]
    assert "GRAD_V" in [x[0] if isinstance(x, tuple) else x for x in c["preset"].choices]
    assert isinstance(c["curve"], gr.HTML) and "<svg" in c["curve"].value
    # the AlwaysOn script adds the recipe to infotexts only while a merge is live
    s = mod.BlockMergeInfotext()
    p = type("P", (), {"extra_generation_params": {"x": 1}})()
    s.process(p)
    assert p.extra_generation_params == {"x": 1}


def test_build_params_and_mirroring():
    from lib_merge.webui.ui import build_params, vector_to_sliders, visible_values
    from lib_merge.errors import MergeError
    vals = [i / 100 for i in range(26)]
    assert visible_values(vals, "SDXL (20)") == [vals[i] for i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
    back = vector_to_sliders([1.0] * 20, "SDXL (20)", vals)
    assert back[10:13] == vals[10:13] and back[1] == 1.0  # SD1-only sliders untouched
    p = build_params(None, "synthB", None, "weighted_sum", 0.3, 0.2, True, ",".join(["0.5"] * 26), "", "SD1/SD2 (26)",
                     ["attn1", "ff"], "OUT05::1", "fp16", "a")
    assert p == {"mode": "weighted_sum", "alpha": 0.3, "beta": 0.2, "vae": "a", "dtype": "fp16", "model_b": "synthB",
                 "weights": ",".join(["0.5"] * 26), "subtargets": ["attn1", "ff"], "elemental": "OUT05::1"}
    p = build_params(None, "synthB", "synthC", "add_difference", 0.3, 0.2, False, "junk", "", "SD1/SD2 (26)", ["all"], "",
                     "keep", "merge")
    assert "weights" not in p and p["model_c"] == "synthC"
    with pytest.raises(MergeError, match="alpha weights have 3 values"):
        build_params(None, "synthB", None, "weighted_sum", 0.3, 0.2, True, "1,2,3", "", "SD1/SD2 (26)", ["all"], "", "fp16", "a")


def test_curve_svg():
    from lib_merge.webui.curve import curve_svg
    from lib_merge.arch import SDXL_BLOCKS
    svg = curve_svg([0.0] * 10 + [1.0] * 10, SDXL_BLOCKS, beta=[0.5] * 20)
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and "OUT08" in svg
