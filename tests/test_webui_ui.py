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


# -- the tab's real handlers, fired as the browser does ------------------------------------------------------
class UI:
    """Runs the built tab's event handlers: inputs from the components' current values; outputs (values or
    ``gr.update`` dicts) written back, other update keys (interactive, label) kept in ``props``."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.c = blocks.blockmerge_components
        self.values = {i: getattr(b, "value", None) for i, b in blocks.blocks.items()}
        self.props: dict[int, dict] = {i: {} for i in blocks.blocks}

    def __getitem__(self, comp):
        return self.values[comp._id]

    def __setitem__(self, comp, value):
        self.values[comp._id] = value

    def by_id(self, elem_id: str):
        return next(b for b in self.blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)

    def prop(self, comp, key, default=None):
        return self.props[comp._id].get(key, default)

    def fire(self, comp, trigger: str) -> list:
        deps = [(d, f) for d, f in zip(self.blocks.dependencies, self.blocks.fns)
                if comp._id in d["targets"] and d["trigger"] == trigger]
        assert len(deps) == 1, f"{len(deps)} handlers for {trigger}"
        dep, fn = deps[0]
        out = fn.fn(*[self.values[i] for i in dep["inputs"]])
        outs = list(out) if len(dep["outputs"]) > 1 else [out]
        assert len(outs) == len(dep["outputs"])
        for i, o in zip(dep["outputs"], outs):
            if isinstance(o, dict) and str(o.get("__type__", "")).endswith("update"):
                for k, v in o.items():
                    if k == "value":
                        self.values[i] = v
                    elif k != "__type__":
                        self.props[i][k] = v
            else:
                self.values[i] = o
        return outs


@pytest.fixture
def tab(stub):
    from lib_merge.webui.ui import create_tab
    return UI(create_tab())


def _svg_texts(svg: str):
    import xml.etree.ElementTree as ET
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    return root, list(root.iter(ns + "text"))


@pytest.mark.parametrize("arch_name", ["sd1", "sdxl"])
def test_curve_labels_all_present_and_inside_the_viewbox(arch_name):
    """Each block label, rotated about its anchor, lies inside the viewBox (the browser clips the rest)."""
    import math
    import re
    from lib_merge.arch import ARCHS
    from lib_merge.webui.curve import curve_svg
    blocks = ARCHS[arch_name].blocks
    svg = curve_svg([0.0, 2.0] * (len(blocks) // 2), blocks, beta=[-1.0] * len(blocks))
    root, texts = _svg_texts(svg)
    _, _, w, h = (float(v) for v in root.get("viewBox").split())
    labels = [t for t in texts if t.text in blocks]
    assert [t.text for t in labels] == list(blocks)  # 26 / 20, in order
    for t in labels:
        size = float(t.get("font-size"))
        assert size >= 8
        ax, ay = float(t.get("x")), float(t.get("y"))
        angle, cx, cy = (float(v) for v in re.fullmatch(r"rotate\((\S+) (\S+) (\S+)\)", t.get("transform")).groups())
        assert (cx, cy) == (ax, ay) and t.get("text-anchor") == "end"
        length = len(t.text) * 0.8 * size  # generous: capitals and digits are at most 0.78 em wide
        corners = [(-length, -size), (0.0, -size), (-length, 0.25 * size), (0.0, 0.25 * size)]  # ascent, descent
        rad = math.radians(angle)
        for dx, dy in corners:
            x = ax + dx * math.cos(rad) - dy * math.sin(rad)
            y = ay + dx * math.sin(rad) + dy * math.cos(rad)
            assert 0 <= x <= w and 0 <= y <= h, (t.text, round(x, 1), round(y, 1))
    for t in texts:  # axis values and legend too
        if t not in labels:
            assert 0 <= float(t.get("x")) <= w and 0 <= float(t.get("y")) <= h


def test_sliders_show_rounded_values_and_the_text_keeps_full_precision(tab):
    """GRAD_V's 0.9166666667 shows as 0.917 on its slider; releasing another slider changes that block only."""
    from lib_merge.arch import SD1_BLOCKS
    from lib_merge.presets import resolve
    from lib_merge.arch import ARCHS
    from lib_merge.weights import parse_weights
    c = tab.c
    exact = resolve("GRAD_V", ARCHS["sd1"])
    tab[c["preset"]] = "GRAD_V"
    tab.fire(c["preset"], "select")
    shown = [tab[s] for s in c["sliders"]]
    assert shown == [round(v, 3) for v in exact] and shown[2] == 0.917
    assert parse_weights(tab[c["weights_alpha"]], ARCHS["sd1"], 0.5) == exact
    i = SD1_BLOCKS.index("OUT05")
    tab[c["sliders"][i]] = 0.25
    tab.fire(c["sliders"][i], "release")
    after = parse_weights(tab[c["weights_alpha"]], ARCHS["sd1"], 0.5)
    assert after == [0.25 if j == i else v for j, v in enumerate(exact)]
    assert after[2] == 0.9166666667
    # the text typed by hand: sliders rounded, text untouched; a release without a move keeps it exact
    text = ",".join(["0.123456789"] * 26)
    tab[c["weights_alpha"]] = text
    tab.fire(c["weights_alpha"], "blur")
    assert [tab[s] for s in c["sliders"]] == [0.123] * 26
    tab.fire(c["sliders"][0], "release")
    assert parse_weights(tab[c["weights_alpha"]], ARCHS["sd1"], 0.5) == [0.123456789] * 26


def test_beta_controls_only_in_modes_that_use_beta(tab):
    from lib_merge.methods.modes import MODES
    c = tab.c
    assert c["beta"].interactive is False and c["weights_beta"].interactive is False  # weighted_sum at start
    assert {m for m, mode in MODES.items() if mode.uses_beta} == {"triple_sum", "sum_twice"}
    for name, mode in MODES.items():
        tab[c["mode"]] = name
        tab.fire(c["mode"], "change")
        for comp in (c["beta"], c["weights_beta"], c["editing"]):
            assert tab.prop(comp, "interactive") is mode.uses_beta, (name, comp.label)
    # leaving a beta mode while the sliders edit beta: they go back to alpha
    tab[c["mode"]] = "triple_sum"
    tab.fire(c["mode"], "change")
    tab[c["editing"]] = "beta"
    tab[c["mode"]] = "add_difference"
    tab.fire(c["mode"], "change")
    assert tab[c["editing"]] == "alpha"


def test_alpha_greyed_out_where_it_does_nothing(tab):
    """no_interpolation takes A only; block weights set every block unless a sub-target leaves keys to alpha."""
    c = tab.c
    for name, on, subs, want in (("no_interpolation", False, [], False), ("weighted_sum", False, [], True),
                                 ("weighted_sum", True, [], False), ("weighted_sum", True, ["attn2"], True),
                                 ("no_interpolation", True, ["attn2"], False)):
        tab[c["use_blocks"]] = on
        tab[c["subtargets"]] = subs
        tab[c["mode"]] = name
        tab.fire(c["mode"], "change")
        assert tab.prop(c["alpha"], "interactive") is want, (name, on, subs)
        tab.fire(c["use_blocks"], "change")
        assert tab.prop(c["alpha"], "interactive") is want, (name, on, subs)


@pytest.fixture
def live_tab(stub, monkeypatch):
    from lib_merge.webui import service as service_mod, ui
    svc = service_mod.Service()
    for mod in (service_mod, ui):
        monkeypatch.setattr(mod, "SERVICE", svc)
    stub.load_model(stub.checkpoint_aliases["synthA"])
    return UI(ui.create_tab())


def test_restore_marks_the_preview_as_the_previous_weights(live_tab):
    t = live_tab
    c = t.c
    image, info, status = t.by_id("blockmerge_image"), t.by_id("blockmerge_infotext"), c["status"]
    by_label = {b.value: b for b in c["buttons"]}
    restore, test, preview = by_label["Restore"], by_label["Test merge"], by_label["Preview"]
    t.fire(restore, "click")  # nothing live, no preview: nothing to mark
    assert t.prop(image, "label") is None and "nothing to restore" in t[status]
    t[c["model_b"]] = "synthB"
    t.fire(test, "click")
    assert "test merge live" in t[status] and t.prop(image, "label") is None  # no preview yet
    t.fire(preview, "click")
    merged_info = t[info]
    assert t[image] is not None and "BlockMerge" in merged_info and "test merge live" in t[status]
    assert t.prop(image, "label") == "Preview" and t.prop(info, "label") == "Infotext"
    t.fire(restore, "click")
    assert "original weights restored" in t[status]
    assert t.prop(image, "label") == "Preview (weights before the last Restore)"
    assert t.prop(info, "label") == "Infotext (weights before the last Restore)"
    assert t[info] == merged_info and t[image] is not None  # kept, to compare with a new preview
    t.fire(preview, "click")
    assert "BlockMerge" not in t[info] and t.prop(image, "label") == "Preview"
    t.fire(test, "click")  # a new merge: the preview of the original weights is marked too
    assert t.prop(info, "label") == "Infotext (weights before the last Test merge)"


def test_adjust_sliders_reach_the_merge_and_reset(live_tab):
    from lib_merge.webui.ui import build_params
    t = live_tab
    sliders = [t.by_id(f"blockmerge_adjust_{n}") for n in ("IN", "OUT", "OUT2", "contrast", "brightness", "cyan_red",
                                                           "magenta_green", "yellow_blue")]
    assert [t.prop(s, "maximum", s.maximum) for s in sliders] == [6, 6, 6, 10, 10, 10, 10, 10]
    t[t.c["model_b"]] = "synthB"
    t[sliders[2]] = 3
    t[sliders[7]] = -1.5
    by_label = {b.value: b for b in t.c["buttons"]}
    t.fire(by_label["Test merge"], "click")
    assert "test merge live" in t[t.c["status"]]
    from lib_merge.webui import ui
    assert ui.SERVICE.session.recipe.adjust == [0, 0, 3, 0, 0, 0, 0, -1.5]
    t.fire(t.by_id("blockmerge_adjust_reset"), "click")
    assert [t[s] for s in sliders] == [0.0] * 8
    args = (None, "synthB", None, "weighted_sum", 0.3, 0.2, False, "", "", "SD1/SD2 (26)", ["all"], "", "fp16", "a")
    assert "adjust" not in build_params(*args, *[0.0] * 8) and "adjust" not in build_params(*args)
    assert build_params(*args, 1, 0, 0, 0, 0, 0, 0, 0)["adjust"] == [1.0] + [0.0] * 7


def test_tab_lists_are_the_engine_lists(tab):
    from lib_merge import options

    def choices(comp):
        return [x[0] if isinstance(x, tuple) else x for x in comp.choices]
    assert choices(tab.c["dtype"]) == list(options.DTYPE_CHOICES)
    assert choices(tab.c["vae"]) == list(options.VAE_CHOICES)
    assert choices(tab.c["subtargets"]) == list(options.SUBTARGETS)
