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
    assert labels == ["Test merge", "Preview", "Restore", "Free memory", "Save", "Merge to file (A B C)", "Stop"]
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


def test_free_memory_button_frees_the_caches_and_the_status_line_shows_their_size(live_tab):
    from lib_merge.webui import ui
    from lib_merge.webui.service import size_text
    t = live_tab
    c, status = t.c, t.c["status"]
    by_label = {b.value: b for b in c["buttons"]}
    t.fire(by_label["Free memory"], "click")  # no test merge yet: nothing cached
    assert ui.status_html("freed 0 MB; caches 0 MB") in t[status]
    t[c["model_b"]] = "synthB"
    t.fire(by_label["Test merge"], "click")
    assert "test merge live" in t[status] and "; caches " in t[status]
    session = ui.SERVICE.session
    assert session.wait_cached(60)
    held = session.cache_bytes()
    assert held > 0
    t.fire(by_label["Free memory"], "click")
    kept = session.cache_bytes()
    assert 0 < kept < held
    assert ui.status_html(f"freed {size_text(held - kept)}; caches {size_text(kept)} "
                          "(the live merge's restore source)") in t[status]
    t.fire(by_label["Restore"], "click")
    assert "original weights restored" in t[status] and f"caches {size_text(kept)}" in t[status]
    t.fire(by_label["Free memory"], "click")
    assert ui.status_html(f"freed {size_text(kept)}; caches 0 MB") in t[status] and session.cache_bytes() == 0


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


# -- methods, their declared parameters and the merge seed (issue 12) -----------------------------------------
def _choices(comp):
    return [x[0] if isinstance(x, tuple) else x for x in comp.choices]


def _fake_registry():
    """A copy of the registry plus a method declaring a whole-number slider, a bounded-below float and a flag."""
    from lib_merge.methods import METHODS, Method, Param
    fake = Method("fake_m", "A", ("weighted_sum",), None, params=(
        Param("steps", int, 4, "how many", 1, 8), Param("scale", float, 0.5, "how far", 0.0),
        Param("flip", bool, False, "whether")))
    return {**METHODS, "fake_m": fake}


def test_tab_builds_one_control_per_declared_parameter_of_every_method(tab):
    from lib_merge.methods import METHODS, MODES
    c = tab.c
    with_params = [n for n, m in MODES.items() if m.params]
    assert "ties" in with_params and "weighted_sum" not in with_params
    assert list(c["param_groups"]) == list(METHODS) + ["mode:" + n for n in with_params]
    ctls = c["param_controls"]
    declared = [(n, p) for n, m in METHODS.items() for p in m.params] + \
        [("mode:" + n, p) for n in with_params for p in MODES[n].params]
    assert len(ctls) == len(declared) >= 1
    assert [(o, p) for o, p, _ in ctls] == declared
    for owner, p, comp in ctls:
        assert comp.label == p.name and comp.info == p.meaning
        assert comp.value == ("" if p.type is tuple else p.default)  # a list box starts empty (its default)
    gamma = next(comp for o, p, comp in ctls if (o, p.name) == ("extract", "gamma"))
    assert isinstance(gamma, gr.Number) and gamma.minimum == 0.0 and gamma.maximum is None  # declared low only
    assert [n for n, g in c["param_groups"].items() if g.visible] == ["linear"]


def test_a_method_added_to_the_registry_gets_its_controls(stub, monkeypatch):
    from lib_merge.webui import ui
    reg = _fake_registry()
    owners = ui.param_owners(reg, {})
    assert owners[-1][0] == "fake_m" and len(owners) == len(reg)
    with gr.Blocks():
        groups, ctls = ui.method_controls(owners, "fake_m")
    assert [n for n, g in groups.items() if g.visible] == ["fake_m"]
    mine = {p.name: comp for o, p, comp in ctls if o == "fake_m"}
    assert isinstance(mine["steps"], gr.Slider) and (mine["steps"].minimum, mine["steps"].maximum) == (1, 8)
    assert mine["steps"].step == 1 and mine["steps"].value == 4
    assert isinstance(mine["scale"], gr.Number) and mine["scale"].minimum == 0.0
    assert isinstance(mine["flip"], gr.Checkbox) and mine["flip"].value is False and mine["flip"].info == "whether"
    monkeypatch.setattr(ui, "METHODS", reg)  # the whole tab: its groups follow the registry
    t = UI(ui.create_tab())
    assert [n for n in t.c["param_groups"] if not n.startswith("mode:")] == list(reg)
    assert len([1 for o, _, _ in t.c["param_controls"] if not o.startswith("mode:")]) == \
        sum(len(m.params) for m in reg.values())
    assert "fake_m" in _choices(t.c["method"])  # pairs with weighted_sum, the starting mode


def test_methods_listed_are_the_ones_that_pair_with_the_mode(tab):
    from lib_merge.methods import METHODS
    from lib_merge.methods.modes import MODES
    from lib_merge.webui.ui import methods_for
    c = tab.c
    assert _choices(c["method"]) == methods_for("weighted_sum")
    assert methods_for("add_difference") == ["linear", "train_difference", "extract", "smooth_add"]
    assert methods_for("sigmoid") == ["linear"]
    for name in MODES:
        tab[c["mode"]] = name
        tab.fire(c["mode"], "change")
        assert tab.prop(c["method"], "choices") == [n for n, m in METHODS.items() if m.modes is None or name in m.modes]
    # a method that does not pair with the new mode goes back to linear (its group hidden); one that does stays
    tab[c["mode"]] = "add_difference"
    tab[c["method"]] = "extract"
    tab.fire(c["mode"], "change")
    assert tab[c["method"]] == "extract"
    tab[c["mode"]] = "weighted_sum"
    tab.fire(c["mode"], "change")
    assert tab[c["method"]] == "linear"
    groups = c["param_groups"]
    assert [n for n, g in groups.items() if tab.prop(g, "visible")] == ["linear"]


def test_choosing_a_method_shows_its_parameters_only_and_beta_where_it_reads_beta(tab):
    c = tab.c
    groups = c["param_groups"]
    tab[c["mode"]] = "add_difference"
    tab.fire(c["mode"], "change")
    tab[c["method"]] = "extract"
    tab.fire(c["method"], "change")
    assert [n for n, g in groups.items() if tab.prop(g, "visible")] == ["extract"]
    assert tab.prop(c["beta"], "interactive") is True  # extract reads beta, add_difference does not
    tab[c["method"]] = "train_difference"
    tab.fire(c["method"], "change")
    assert [n for n, g in groups.items() if tab.prop(g, "visible")] == ["train_difference"]
    assert tab.prop(c["beta"], "interactive") is False and tab[c["editing"]] == "alpha"
    tab[c["mode"]] = "weighted_sum"
    tab.fire(c["mode"], "change")
    tab[c["method"]] = "tensor_swap"
    tab.fire(c["method"], "change")
    assert tab.prop(c["weights_beta"], "interactive") is True


class Recording:
    """Stands in for the service: records the request, answers with a recipe that carries ``seed``."""

    def __init__(self, seed):
        self.sent, self.seed = [], seed

    def test_merge(self, params):
        self.sent.append(params)
        return {"written": 1, "notes": [], "message": "ok", "recipe": {"seed": self.seed}}

    def status(self):  # the tab reads these at build time (chain button) and in Test merge
        return {"live": False}

    def chain_text(self):
        return ""

    def chained(self, params):
        return params


def test_test_merge_sends_the_method_and_its_typed_parameter_values(stub, monkeypatch):
    from lib_merge.webui import ui
    rec = Recording(None)
    monkeypatch.setattr(ui, "SERVICE", rec)
    monkeypatch.setattr(ui, "METHODS", _fake_registry())
    t = UI(ui.create_tab())
    c = t.c
    mine = {p.name: comp for o, p, comp in c["param_controls"] if o == "fake_m"}
    t[c["model_b"]] = "synthB"
    t[c["method"]] = "fake_m"
    t.fire(c["method"], "change")
    t[mine["steps"]], t[mine["scale"]], t[mine["flip"]] = 3.0, 2, True  # as a slider / number box send them
    test = next(b for b in c["buttons"] if b.value == "Test merge")
    t.fire(test, "click")
    sent = rec.sent[-1]
    assert sent["method"] == "fake_m" and sent["params"] == {"steps": 3, "scale": 2.0, "flip": True}
    assert type(sent["params"]["steps"]) is int and type(sent["params"]["scale"]) is float
    assert "seed" not in sent and t[c["merge_seed"]] == -1  # -1, no random draw: nothing sent, nothing shown
    t[c["method"]] = "linear"  # another method: only its parameters (none) go
    t.fire(test, "click")
    assert rec.sent[-1]["method"] == "linear" and "params" not in rec.sent[-1]
    t[c["merge_seed"]] = 42
    t.fire(test, "click")
    assert rec.sent[-1]["seed"] == 42


def test_seed_minus_one_draws_and_the_box_shows_the_recorded_seed(live_tab):
    """Real merges: random weights draw in the plan (None sent); add_noise needs its seed first (the tab draws)."""
    from lib_merge.webui import ui
    t = live_tab
    c = t.c
    test = next(b for b in c["buttons"] if b.value == "Test merge")
    t[c["model_b"]] = "synthB"
    t[c["elemental"]] = "OUT05::R"  # a random ratio (the weights text takes numbers only)
    assert ui.merge_seed(-1, "linear") is None and ui.merge_seed(None, "linear") is None
    t.fire(test, "click")
    assert "test merge live" in t[c["status"]], t[c["status"]]
    recorded = ui.SERVICE.recipe_json()["seed"]
    assert isinstance(recorded, int) and t[c["merge_seed"]] == recorded
    assert f"seed {recorded}" in t[c["status"]]
    t[c["elemental"]] = ""
    t[c["method"]] = "add_noise"
    t[c["merge_seed"]] = -1
    t.fire(test, "click")
    assert "test merge live" in t[c["status"]], t[c["status"]]
    drawn = ui.SERVICE.recipe_json()["seed"]
    assert ui.SERVICE.recipe_json()["method"] == "add_noise" and t[c["merge_seed"]] == drawn >= 0
    t[c["merge_seed"]] = 7  # a seed given is the seed used
    t.fire(test, "click")
    assert ui.SERVICE.recipe_json()["seed"] == 7 and t[c["merge_seed"]] == 7


def test_variadic_mode_shows_its_parameters_and_more_models_and_sends_them(stub, monkeypatch):
    from lib_merge.webui import ui
    rec = Recording(None)
    monkeypatch.setattr(ui, "SERVICE", rec)
    t = UI(ui.create_tab())
    c = t.c
    assert c["more_models"].visible is False
    t[c["model_b"]], t[c["model_c"]] = "synthB", "synthC"
    t[c["mode"]] = "ties"
    t.fire(c["mode"], "change")
    assert t.prop(c["more_models"], "visible") is True
    assert [n for n, g in c["param_groups"].items() if t.prop(g, "visible")] == ["linear", "mode:ties"]
    density = next(comp for o, p, comp in c["param_controls"] if (o, p.name) == ("mode:ties", "density"))
    t[density] = 0.35
    t[c["more_models"]] = ["synthB"]
    test = next(b for b in c["buttons"] if b.value == "Test merge")
    t.fire(test, "click")
    sent = rec.sent[-1]
    assert sent["mode"] == "ties" and sent["params"] == {"density": 0.35}
    assert sent["model_c"] == "synthC" and sent["more_models"] == ["synthB"]
    t[c["mode"]] = "dare"  # a seeded mode: the tab draws the seed the engine needs
    t.fire(c["mode"], "change")
    t.fire(test, "click")
    assert isinstance(rec.sent[-1]["seed"], int)
    t[c["mode"]] = "linear_combination"
    t.fire(c["mode"], "change")
    weights = next(comp for o, p, comp in c["param_controls"] if o == "mode:linear_combination")
    assert isinstance(weights, gr.Textbox)
    t[weights] = "0.5, 0.25, 0.25"
    t.fire(test, "click")
    assert rec.sent[-1]["params"] == {"model_weights": [0.5, 0.25, 0.25]}
    t[weights] = ""  # empty: the default (the mean), nothing sent
    t.fire(test, "click")
    assert "params" not in rec.sent[-1]
    t[c["mode"]] = "weighted_sum"
    t.fire(c["mode"], "change")
    t.fire(test, "click")
    assert "more_models" not in rec.sent[-1] and t.prop(c["more_models"], "visible") is False


# -- merge chains (issue 14 §1) ---------------------------------------------------------------------------------
def test_merge_again_from_the_preview_chains_the_live_merge(live_tab):
    """The button makes the live merge model A of the next Test merge (and Merge to file); Save writes the chain,
    Restore gives the loaded weights back bit-exactly, Clear chain starts from the loaded checkpoint again."""
    import torch
    from safetensors.torch import load_file
    from lib_merge.live import fingerprint
    from lib_merge.webui import host, ui
    from lib_merge.webui.target import WebUITarget
    t, c, svc = live_tab, live_tab.c, ui.SERVICE
    model = host.loaded_model()
    original = fingerprint(WebUITarget(model).params())
    by_label = {b.value: b for b in c["buttons"]}
    test, save, to_file, restore = (by_label[k] for k in ("Test merge", "Save", "Merge to file (A B C)", "Restore"))
    assert c["chain"].interactive is False and c["clear_chain"].visible is False  # nothing live yet
    t.fire(c["chain"], "click")
    assert "no test merge is live" in t[c["status"]] and "Base:" not in t[c["chain_info"]]
    t[c["model_b"]], t[c["alpha"]], t[c["use_blocks"]], t[c["preset"]] = "synthB", 0.3, True, "GRAD_V"
    t.fire(c["preset"], "select")  # the tab sends the preset as its vector; the chain line names it
    t.fire(test, "click")
    assert "test merge live" in t[c["status"]] and t.prop(c["chain"], "interactive") is True
    t.fire(c["chain"], "click")
    assert "Base: (synthA × synthB, GRAD_V) → this merge" in t[c["chain_info"]], t[c["chain_info"]]
    assert t.prop(c["clear_chain"], "visible") is True
    t[c["model_b"]], t[c["use_blocks"]] = "synthC", False
    t.fire(test, "click")
    assert "test merge live" in t[c["status"]], t[c["status"]]
    step = svc.live_params["model_a"]["recipe"]
    assert (step["model_a"], step["model_b"], step["alpha"]) == ("synthA.safetensors", "synthB.safetensors", 0.3)
    assert step["weights"] == t[c["weights_alpha"]] and "dtype" not in step  # the step stays in A's dtype
    assert svc.live_params["model_b"] == "synthC.safetensors" and svc.session.recipe.is_chain()
    assert "weights" not in svc.live_params and svc.live_params["alpha"] == 0.3
    t.fire(by_label["Preview"], "click")
    info = t[c["infotext"]]
    assert '"recipe":' in info and "synthB.safetensors" in info and "synthC.safetensors" in info
    live = {k: v.detach().clone() for k, v in WebUITarget(model).params().items()}
    t[c["output"]], t[c["dtype"]] = "tab-chain", "fp32"
    t.fire(save, "click")
    assert "saved tab-chain.safetensors" in t[c["status"]], t[c["status"]]
    saved = load_file(host.models_dir() / "tab-chain.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in live.items())
    t[c["output"]] = "tab-chain-file"  # Merge to file merges the tab's B and weights on top of the chain too
    t.fire(to_file, "click")
    assert "wrote tab-chain-file.safetensors" in t[c["status"]], t[c["status"]]
    file_merged = load_file(host.models_dir() / "tab-chain-file.safetensors")
    assert all(torch.equal(file_merged[k], saved[k]) for k in saved)
    t.fire(restore, "click")
    assert t.prop(c["chain"], "interactive") is False
    assert fingerprint(WebUITarget(model).params()) == original
    assert "Base:" in t[c["chain_info"]]  # the chain stays until cleared
    t.fire(c["clear_chain"], "click")
    assert "Base:" not in t[c["chain_info"]] and t.prop(c["clear_chain"], "visible") is False
    t.fire(test, "click")
    assert "model_a" not in svc.live_params and not svc.session.recipe.is_chain()
