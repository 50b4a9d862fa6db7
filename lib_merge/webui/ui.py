"""The BlockMerge tab (gradio 3.41 and 4.x: ``gr.update`` only, no ``.style()``, no ``gr.Box``).

Handlers that touch the model run through ``call_queue.wrap_gradio_gpu_call`` (queue lock, job state, Interrupt);
everything else is plain UI logic. Sliders and the weight text mirror each other without loops: sliders listen on
``release``, the text on ``blur``/``submit``, never ``change`` on mirrored components.
"""
from __future__ import annotations

import html
from typing import Any

import gradio as gr

from .. import presets
from ..arch import ARCHS, SD1_BLOCKS
from ..errors import MergeError
from ..dice import draw_seed
from ..methods import METHODS, Param
from ..methods.modes import MODES
from ..options import DEFAULT_SAVE_DTYPE, DTYPE_CHOICES, SUBTARGETS, VAE_CHOICES
from ..weights import format_vector, parse_weights
from . import host
from .curve import curve_svg
from .service import SERVICE

LAYOUTS = {"SD1/SD2 (26)": "sd1", "SDXL (20)": "sdxl"}
SD1_ONLY = {"IN09", "IN10", "IN11", "OUT09", "OUT10", "OUT11"}
SLIDER_DIGITS = 3  # a slider shows its weight rounded; the weight text keeps the exact value
PREVIEW_LABEL = "Preview"
INFOTEXT_LABEL = "Infotext"


def _arch(layout: str):
    return ARCHS[LAYOUTS.get(layout, "sd1")]


def visible_values(slider_values: list[float], layout: str) -> list[float]:
    """26 slider values (SD1 order) -> the vector for the layout (20 on SDXL)."""
    arch = _arch(layout)
    by = dict(zip(SD1_BLOCKS, slider_values))
    return [float(by[b]) for b in arch.blocks]


def vector_to_sliders(vec: list[float], layout: str, current: list[float]) -> list[float]:
    """A vector (20 on SDXL) -> the 26 slider values, as the sliders show them (rounded to ``SLIDER_DIGITS``:
    gradio's number box would print 0.9166666666666666); SD1-only sliders keep their values on SDXL."""
    arch = _arch(layout)
    by = dict(zip(SD1_BLOCKS, current))
    by.update(zip(arch.blocks, vec))
    return [shown(by[b]) for b in SD1_BLOCKS]


def shown(value: float) -> float:
    """What a slider shows for an exact weight."""
    return round(float(value), SLIDER_DIGITS)


def sliders_to_vector(slider_values: list[float], layout: str, text: str | None, base: float) -> list[float]:
    """The slider values -> the vector, keeping the text's exact value for every block whose slider still shows
    it rounded: releasing one slider changes that block only, never the precision of the others."""
    vis = visible_values(slider_values, layout)
    try:
        exact = parse_weights(text, _arch(layout), base) if text and text.strip() else None
    except MergeError:
        exact = None
    if exact is None or len(exact) != len(vis):
        return vis
    return [e if shown(e) == v else v for e, v in zip(exact, vis)]


def beta_controls(mode: str, method: str = "linear") -> list[dict]:
    """beta slider, beta weights, "Sliders edit" radio: usable only where the formula has beta, the mode's or the
    method's (as alpha is greyed out while a full vector sets every block). The sliders go back to alpha when beta
    is not used."""
    uses = uses_beta(mode, method)
    radio = gr.update(interactive=True) if uses else gr.update(value="alpha", interactive=False)
    return [gr.update(interactive=uses), gr.update(interactive=uses), radio]


def uses_beta(mode: str, method: str = "linear") -> bool:
    """Whether beta does anything: the mode's formula or the method's (tensor_swap, extract) reads it."""
    meth = METHODS.get(method or "linear")
    return MODES[mode].uses_beta or bool(meth is not None and meth.uses_beta)


def alpha_used(mode: str, use_blocks: bool, subtargets: list[str] | None) -> bool:
    """Whether the alpha slider does anything: not in a one-model mode (no_interpolation), not while the block
    sliders set every block, except with sub-targets (then the other keys get alpha). Every method reads alpha
    (the block vector replaces it as it does for the mode), so the method only matters through its mode (which
    ``methods_for`` keeps paired): unlike beta, no method argument."""
    subs = subtargets or []
    partial = bool([s for s in subs if s != "all"]) and "all" not in subs
    return MODES[mode].models > 1 and (not use_blocks or partial)


# -- methods and their declared parameters ------------------------------------------------------------------
def methods_for(mode: str, registry: dict | None = None) -> list[str]:
    """The methods that pair with ``mode`` (``Method.modes``, None = every mode), in registry order."""
    reg = METHODS if registry is None else registry
    return [n for n, m in reg.items() if m.modes is None or mode in m.modes]


MODE_OWNER = "mode:"  # group names of modes' parameters (methods' groups are the method names)


def param_owners(registry: dict | None = None, modes: dict | None = None) -> list[tuple[str, tuple[Param, ...]]]:
    """(owner name, declared parameters) for every owner the tab builds controls for: every method, with or
    without parameters (an empty group keeps "show the selected method's group" uniform), and every mode that
    declares parameters (ties' density, …) as ``mode:NAME``."""
    reg = METHODS if registry is None else registry
    mods = MODES if modes is None else modes
    return [(n, tuple(m.params)) for n, m in reg.items()] + \
        [(MODE_OWNER + n, tuple(m.params)) for n, m in mods.items() if m.params]


def selected_owners(mode: str, method: str) -> set[str]:
    """The parameter groups shown for ``mode`` with ``method``: the method's and the mode's own."""
    return {method or "linear", MODE_OWNER + mode}


def param_control(owner: str, p: Param):
    """One control for a declared parameter, built from the declaration alone: a checkbox for true/false, a
    slider when both bounds are declared, else a number box (bounds kept where declared); whole numbers step
    by 1 and the number box rounds them (precision 0)."""
    eid = f"blockmerge_param_{owner}_{p.name}"
    if p.type is bool:
        return gr.Checkbox(value=bool(p.default), label=p.name, info=p.meaning, elem_id=eid)
    if p.type is tuple:
        return gr.Textbox(value=", ".join(f"{v:g}" for v in p.default or ()), label=p.name, info=p.meaning,
                          placeholder="numbers separated by commas", elem_id=eid)
    whole = p.type is int
    if p.low is not None and p.high is not None:
        step = 1 if whole else (p.high - p.low) / 100
        return gr.Slider(minimum=p.low, maximum=p.high, step=step, value=p.default, label=p.name, info=p.meaning,
                         elem_id=eid)
    return gr.Number(value=p.default, label=p.name, info=p.meaning, precision=0 if whole else None,
                     minimum=p.low, maximum=p.high, elem_id=eid)


def method_controls(owners: list[tuple[str, tuple[Param, ...]]], selected: str):
    """At build time (gradio cannot add components after launch): one group per owner holding one control per
    declared parameter; only ``selected``'s group is visible. Returns (groups by owner, [(owner, Param,
    control)] in declaration order): the flat list is what the handlers take as inputs."""
    groups: dict[str, Any] = {}
    controls: list[tuple[str, Param, Any]] = []
    for owner, params in owners:
        with gr.Column(visible=owner == selected, elem_id=f"blockmerge_params_{owner}") as col:
            for p in params:
                controls.append((owner, p, param_control(owner, p)))
        groups[owner] = col
    return groups, controls


def show_group(groups: dict[str, Any], selected: str | set[str]) -> list[dict]:
    """Visibility updates for ``groups`` (in their order): the ``selected`` group(s) only."""
    chosen = {selected} if isinstance(selected, str) else selected
    return [gr.update(visible=owner in chosen) for owner in groups]


def typed_value(p: Param, value: Any) -> Any:
    """A control's value as the parameter's type: a slider sends 2.0 for a whole number, the recipe wants 2;
    an emptied number box means the default."""
    if value is None:
        return p.default
    if p.type is tuple:  # a text box: "1, 0.5, 0.5"; empty means the default
        text = str(value).strip()
        if not text:
            return p.default
        try:
            return [float(x) for x in text.split(",")]
        except ValueError:
            raise MergeError(f"{p.name} must be numbers separated by commas, {p.name}: {text!r}") from None
    if p.type is bool:
        return bool(value)
    if p.type is int:
        return int(round(float(value)))
    return float(value)


def param_values(owner: str | set[str], controls: list[tuple[str, Param, Any]], values: list[Any]) -> dict[str, Any]:
    """The selected owners' parameters, by name, typed (``values`` in the order of ``controls``); a parameter
    left without a value (a list left empty) is left out, so its default applies."""
    chosen = {owner} if isinstance(owner, str) else owner
    typed = {p.name: typed_value(p, v) for (o, p, _), v in zip(controls, values) if o in chosen}
    return {k: v for k, v in typed.items() if v is not None}


def merge_seed(box: Any, method: str, mode: str = "weighted_sum") -> int | None:
    """The seed box -> the request's seed: -1 (or empty) draws one. Random ratios draw in the plan (None is
    sent, the live recipe records the seed drawn); a seeded method (add_noise) needs its seed before the
    recipe is checked, so the tab draws it here."""
    if box is None or int(box) < 0:
        meth, m = METHODS.get(method or "linear"), MODES.get(mode)
        seeded = (meth is not None and meth.seeded) or (m is not None and m.seeded)
        return draw_seed() if seeded else None
    return int(box)


def recorded_seed(result: dict) -> dict:
    """After a merge the seed box shows the seed the merge used (its recipe records it), else stays as is."""
    seed = (result.get("recipe") or {}).get("seed")
    return gr.update(value=seed) if seed is not None else gr.update()


def stale_preview(infotext: str | None, why: str) -> list[dict]:
    """After the live weights change (Restore, Test merge) the preview shows the previous ones: say so above the
    image and its infotext (kept, to compare); nothing to mark while no preview is shown."""
    if not infotext:
        return [gr.update(), gr.update()]
    note = f" (weights before the last {why})"
    return [gr.update(label=PREVIEW_LABEL + note), gr.update(label=INFOTEXT_LABEL + note)]


def status_html(text: str, error: bool = False) -> str:
    cls = "blockmerge-error" if error else "blockmerge-ok"
    return f'<div class="blockmerge-status {cls}">{html.escape(text)}</div>'


def chain_html(text: str) -> str:
    """The chain base above the buttons: what the next Test merge (and Merge to file) merges on top of."""
    if not text:
        return '<div class="blockmerge-chain"></div>'
    return (f'<div class="blockmerge-chain">Base: {html.escape(text)} → this merge '
            f'(Test merge and Merge to file use it as model A)</div>')


def build_params(model_a, model_b, model_c, mode, alpha, beta, use_blocks, weights_alpha, weights_beta, layout,
                 subtargets, elemental, dtype, vae, *adjust, method: str | None = None, params: dict | None = None,
                 seed: int | None = None, more_models: list[str] | None = None) -> dict[str, Any]:
    """UI state -> the request dict (the CLI's names) that the service and the API take. ``adjust``: the 8
    Adjust sliders (none, or all zeros: no ``adjust`` field)."""
    m = MODES[mode]
    p: dict[str, Any] = {"mode": mode, "alpha": float(alpha), "beta": float(beta), "vae": vae, "dtype": dtype}
    if method:
        p["method"] = method
    if params:
        p["params"] = dict(params)
    if seed is not None:
        p["seed"] = int(seed)
    if model_a:
        p["model_a"] = model_a
    if m.models >= 2:
        p["model_b"] = model_b
    if m.models >= 3 or (m.variadic and model_c):
        p["model_c"] = model_c
    if m.variadic and more_models:
        p["more_models"] = [x for x in more_models if x]
    if use_blocks:
        arch = _arch(layout)
        p["weights"] = format_vector(parse_weights(weights_alpha, arch, float(alpha), "alpha weights"))
        if uses_beta(mode, method or "linear") and weights_beta and weights_beta.strip():
            p["weights_beta"] = format_vector(parse_weights(weights_beta, arch, float(beta), "beta weights"))
        subs = [s for s in (subtargets or []) if s != "all"]
        if subs and "all" not in (subtargets or []):
            p["subtargets"] = subs
    if elemental and elemental.strip():
        p["elemental"] = elemental.strip()
    if any(float(v) for v in adjust):
        p["adjust"] = [float(v) for v in adjust]
    return p


ADJUST_SLIDERS = (("IN", 6), ("OUT", 6), ("OUT2", 6), ("contrast", 10), ("brightness", 10), ("cyan_red", 10),
                  ("magenta_green", 10), ("yellow_blue", 10))  # supermerger's ranges (§1.12)


def adjust_accordion() -> list:
    """The Adjust accordion (8 sliders, a reset button); returns the sliders, in the engine's order."""
    with gr.Accordion("Adjust (detail / colour, after the merge)", open=False, elem_id="blockmerge_adjust_acc"):
        with gr.Row():
            sliders = [gr.Slider(minimum=-lim, maximum=lim, step=0.1, value=0, label=name,
                                 elem_id=f"blockmerge_adjust_{name}") for name, lim in ADJUST_SLIDERS[:3]]
        with gr.Row():
            sliders += [gr.Slider(minimum=-lim, maximum=lim, step=0.1, value=0, label=name,
                                  elem_id=f"blockmerge_adjust_{name}") for name, lim in ADJUST_SLIDERS[3:]]
        reset = gr.Button("Reset adjust", elem_id="blockmerge_adjust_reset")
    reset.click(fn=lambda: [0.0] * len(sliders), inputs=[], outputs=sliders)
    return sliders


def _checkpoint_update():
    return gr.update(choices=host.checkpoint_titles())


def create_tab():
    sliders: list[gr.Slider] = []
    default_dtype = host.opt(host.OPT_DEFAULT_DTYPE, DEFAULT_SAVE_DTYPE)
    default_mode = "weighted_sum"
    beta_used = MODES[default_mode].uses_beta
    with gr.Blocks(analytics_enabled=False, elem_id="blockmerge_tab") as tab:
        with gr.Row():
            model_a = gr.Dropdown(label="Model A (file merges; Test merge uses the loaded checkpoint)",
                                  choices=host.checkpoint_titles(), elem_id="blockmerge_model_a")
            model_b = gr.Dropdown(label="Model B", choices=host.checkpoint_titles(), elem_id="blockmerge_model_b")
            model_c = gr.Dropdown(label="Model C", choices=host.checkpoint_titles(), elem_id="blockmerge_model_c")
            more_models = gr.Dropdown(label="More models (D, E, …: modes over any number of models)",
                                      choices=host.checkpoint_titles(), multiselect=True, visible=False,
                                      elem_id="blockmerge_more_models")
            refresh = gr.Button(value="\U0001f504", elem_id="blockmerge_refresh", elem_classes=["tool"])
        with gr.Row():
            mode = gr.Radio(label="Merge mode", choices=list(MODES), value=default_mode, elem_id="blockmerge_mode")
            method = gr.Dropdown(label="Method (how two tensors combine inside the mode)",
                                 choices=methods_for(default_mode), value="linear", elem_id="blockmerge_method")
            merge_seed_box = gr.Number(label="Merge seed (random weights, add_noise; -1 draws one)", value=-1,
                                       precision=0, elem_id="blockmerge_merge_seed")
        mode_info = gr.Markdown(f"`{MODES[default_mode].formula}`", elem_id="blockmerge_formula")
        param_groups, param_ctls = method_controls(param_owners(), "linear")
        with gr.Row():
            alpha = gr.Slider(minimum=-1, maximum=2, step=0.01, value=0.5, label="alpha", elem_id="blockmerge_alpha")
            beta = gr.Slider(minimum=-1, maximum=2, step=0.01, value=0.25, label="beta", elem_id="blockmerge_beta",
                             interactive=beta_used)

        with gr.Accordion("Block weights", open=True, elem_id="blockmerge_blocks_acc"):
            with gr.Row():
                use_blocks = gr.Checkbox(label="Block weights (on: the sliders set every block, BASE included)",
                                         value=False, elem_id="blockmerge_use_blocks")
                layout = gr.Radio(label="Layout", choices=list(LAYOUTS), value="SD1/SD2 (26)",
                                  elem_id="blockmerge_layout")
                editing = gr.Radio(label="Sliders edit", choices=["alpha", "beta"], value="alpha",
                                   elem_id="blockmerge_editing", interactive=beta_used)
            with gr.Row():
                preset = gr.Dropdown(label="Preset", choices=presets.names("sd1"), elem_id="blockmerge_preset")
                preset_name = gr.Textbox(label="Save sliders as user preset", placeholder="MY_PRESET",
                                         elem_id="blockmerge_preset_name")
                save_preset = gr.Button("Save preset", elem_id="blockmerge_save_preset")
                delete_preset = gr.Button("Delete user preset", elem_id="blockmerge_delete_preset")
            base = gr.Slider(minimum=-1, maximum=2, step=0.01, value=0.5, label="BASE (text encoder)",
                             elem_id="blockmerge_w_BASE", interactive=False)
            sliders.append(base)
            ins: dict[str, gr.Slider] = {}
            outs: dict[str, gr.Slider] = {}
            with gr.Row(elem_id="blockmerge_u"):
                with gr.Column():
                    for i in range(12):
                        b = f"IN{i:02d}"
                        ins[b] = gr.Slider(minimum=-1, maximum=2, step=0.01, value=0.5, label=b,
                                           elem_id=f"blockmerge_w_{b}", interactive=False)
                with gr.Column():
                    for i in reversed(range(12)):
                        b = f"OUT{i:02d}"
                        outs[b] = gr.Slider(minimum=-1, maximum=2, step=0.01, value=0.5, label=b,
                                            elem_id=f"blockmerge_w_{b}", interactive=False)
            m00 = gr.Slider(minimum=-1, maximum=2, step=0.01, value=0.5, label="M00", elem_id="blockmerge_w_M00",
                            interactive=False)
            by_block = {"BASE": base, **ins, "M00": m00, **outs}
            sliders = [by_block[b] for b in SD1_BLOCKS]
            with gr.Row():
                weights_alpha = gr.Textbox(label="alpha weights (paste a supermerger string; 26 / 25 / 20 / 19 values)",
                                           value=format_vector([0.5] * 26), elem_id="blockmerge_weights_alpha")
                beta_modes = " / ".join(n for n, m in MODES.items() if m.uses_beta)
                weights_beta = gr.Textbox(label=f"beta weights ({beta_modes})", value="",
                                          elem_id="blockmerge_weights_beta", interactive=beta_used)
            curve = gr.HTML(curve_svg([0.5] * 26, SD1_BLOCKS), elem_id="blockmerge_curve")

        with gr.Row():
            subtargets = gr.CheckboxGroup(label="Block weights act on", choices=list(SUBTARGETS), value=["all"],
                                          elem_id="blockmerge_subtargets")
        elemental = gr.Textbox(label="Elemental rules (Blocks:Elements:Ratio, one per line; NOT, ranges IN00-IN05; "
                                     "the last matching rule wins)", lines=3, elem_id="blockmerge_elemental")
        adjust = adjust_accordion()
        with gr.Row():
            dtype = gr.Dropdown(label="Save dtype", choices=list(DTYPE_CHOICES),
                                value=default_dtype if default_dtype in DTYPE_CHOICES else DEFAULT_SAVE_DTYPE,
                                elem_id="blockmerge_dtype")
            vae = gr.Radio(label="VAE in saved files (the preview always uses the WebUI's current VAE)",
                           choices=list(VAE_CHOICES), value="a", elem_id="blockmerge_vae")
            output = gr.Textbox(label="Output name (saved in the models folder)", placeholder="my-merge",
                                elem_id="blockmerge_output")
            overwrite = gr.Checkbox(label="Overwrite", value=False, elem_id="blockmerge_overwrite")
        with gr.Row():
            test_btn = gr.Button("Test merge", variant="primary", elem_id="blockmerge_test")
            preview_btn = gr.Button("Preview", elem_id="blockmerge_preview")
            restore_btn = gr.Button("Restore", elem_id="blockmerge_restore")
            free_btn = gr.Button("Free memory", elem_id="blockmerge_free")
            save_btn = gr.Button("Save", elem_id="blockmerge_save")
            file_btn = gr.Button("Merge to file (A B C)", elem_id="blockmerge_merge_file")
            stop_btn = gr.Button("Stop", elem_id="blockmerge_stop")
        with gr.Row():
            chain_btn = gr.Button("Merge again from the preview", elem_id="blockmerge_chain",
                                  interactive=bool(SERVICE.status()["live"]))
            clear_chain_btn = gr.Button("Clear chain", elem_id="blockmerge_clear_chain",
                                        visible=bool(SERVICE.chain_text()))
        chain_info = gr.HTML(chain_html(SERVICE.chain_text()), elem_id="blockmerge_chain_info")
        status = gr.HTML(status_html("ready"), elem_id="blockmerge_status")
        from .lora_ui import bake_request, lora_accordion  # imports this module: built here, not at import time
        lora = lora_accordion()

        with gr.Accordion("Preview settings", open=False, elem_id="blockmerge_preview_acc"):
            prompt = gr.Textbox(label="Prompt", value="a photo of a cat", lines=2, elem_id="blockmerge_prompt")
            negative = gr.Textbox(label="Negative prompt", value="", lines=1, elem_id="blockmerge_negative")
            with gr.Row():
                seed = gr.Number(label="Seed", value=1234, precision=0, elem_id="blockmerge_seed")
                steps = gr.Slider(minimum=1, maximum=50, step=1, value=20, label="Steps", elem_id="blockmerge_steps")
                cfg = gr.Slider(minimum=1, maximum=20, step=0.5, value=7, label="CFG", elem_id="blockmerge_cfg")
            with gr.Row():
                width = gr.Slider(minimum=64, maximum=2048, step=8, value=512, label="Width", elem_id="blockmerge_width")
                height = gr.Slider(minimum=64, maximum=2048, step=8, value=512, label="Height",
                                   elem_id="blockmerge_height")
                sampler = gr.Dropdown(label="Sampler", choices=_samplers(), value="Euler a" if "Euler a" in _samplers() else None,
                                      elem_id="blockmerge_sampler")
        with gr.Row():
            image = gr.Image(label=PREVIEW_LABEL, type="pil", interactive=False, elem_id="blockmerge_image")
            infotext = gr.Textbox(label=INFOTEXT_LABEL, lines=6, interactive=False, elem_id="blockmerge_infotext")

        # -- wiring ----------------------------------------------------------------------------------------
        refresh.click(fn=lambda: [_checkpoint_update()] * 6, inputs=[],
                      outputs=[model_a, model_b, model_c, more_models, lora["extract"]["tuned"], lora["extract"]["base"]])

        def on_mode(m, on, subs, meth):
            names = methods_for(m)
            meth = meth if meth in names else "linear"
            return ([f"`{MODES[m].formula}`"] + beta_controls(m, meth)
                    + [gr.update(interactive=alpha_used(m, on, subs)), gr.update(choices=names, value=meth),
                       gr.update(visible=MODES[m].variadic)]
                    + show_group(param_groups, selected_owners(m, meth)))

        mode.change(fn=on_mode, inputs=[mode, use_blocks, subtargets, method],
                    outputs=[mode_info, beta, weights_beta, editing, alpha, method, more_models]
                    + list(param_groups.values()))

        def on_method(m, meth):
            meth = meth or "linear"
            return beta_controls(m, meth) + show_group(param_groups, selected_owners(m, meth))

        method.change(fn=on_method, inputs=[mode, method],
                      outputs=[beta, weights_beta, editing] + list(param_groups.values()))

        def on_use_blocks(on, subs, m):
            return [gr.update(interactive=bool(on))] * 26 + [gr.update(interactive=alpha_used(m, on, subs))]

        use_blocks.change(fn=on_use_blocks, inputs=[use_blocks, subtargets, mode], outputs=sliders + [alpha])
        subtargets.change(fn=on_use_blocks, inputs=[use_blocks, subtargets, mode], outputs=sliders + [alpha])

        def on_layout(lay, wa, wb):
            arch = _arch(lay)
            vis = [gr.update(visible=(arch.name != "sdxl" or b not in SD1_ONLY)) for b in SD1_BLOCKS]
            return vis + [gr.update(choices=presets.names(arch)), _curve(wa, wb, lay)]

        layout.change(fn=on_layout, inputs=[layout, weights_alpha, weights_beta], outputs=sliders + [preset, curve])

        def sliders_to_text(lay, which, wa, wb, alpha_v, beta_v, *vals):
            old, base = (wa, alpha_v) if which == "alpha" else (wb, beta_v)
            text = format_vector(sliders_to_vector(list(vals), lay, old, float(base)))
            wa, wb = (text, wb) if which == "alpha" else (wa, text)
            return wa, wb, _curve(wa, wb, lay)

        for s in sliders:
            s.release(fn=sliders_to_text,
                      inputs=[layout, editing, weights_alpha, weights_beta, alpha, beta] + sliders,
                      outputs=[weights_alpha, weights_beta, curve])

        def text_to_sliders(lay, which, wa, wb, alpha_v, beta_v, *vals):
            text = wa if which == "alpha" else wb
            try:
                vec = parse_weights(text, _arch(lay), float(alpha_v if which == "alpha" else beta_v), f"{which} weights")
            except MergeError as e:
                return [gr.update()] * 26 + [gr.update(), status_html(str(e), error=True)]
            new = vector_to_sliders(vec, lay, list(vals))
            return [gr.update(value=v) for v in new] + [_curve(wa, wb, lay), status_html(f"{which} weights set")]

        for box, which in ((weights_alpha, "alpha"), (weights_beta, "beta")):
            for ev in (box.blur, box.submit):
                ev(fn=lambda lay, wa, wb, a, b, *vals, _w=which: text_to_sliders(lay, _w, wa, wb, a, b, *vals),
                   inputs=[layout, weights_alpha, weights_beta, alpha, beta] + sliders, outputs=sliders + [curve, status])

        def on_editing(lay, which, wa, wb, alpha_v, beta_v, *vals):
            text = wa if which == "alpha" else wb
            if not text or not text.strip():
                return [gr.update()] * 26 + [gr.update(), status_html(f"sliders now edit {which}")]
            return text_to_sliders(lay, which, wa, wb, alpha_v, beta_v, *vals)

        editing.change(fn=on_editing, inputs=[layout, editing, weights_alpha, weights_beta, alpha, beta] + sliders,
                       outputs=sliders + [curve, status])

        def on_preset(name, lay, which, wa, wb, *vals):
            if not name:
                return [gr.update()] * 26 + [gr.update(), gr.update(), gr.update(), gr.update()]
            try:
                vec = presets.resolve(name, _arch(lay))
            except MergeError as e:
                return [gr.update()] * 26 + [gr.update(), gr.update(), gr.update(), status_html(str(e), True)]
            text = format_vector(vec)
            wa, wb = (text, wb) if which == "alpha" else (wa, text)
            new = vector_to_sliders(vec, lay, list(vals))
            return [gr.update(value=v) for v in new] + [wa, wb, _curve(wa, wb, lay),
                                                        status_html(f"preset {name} set ({which})")]

        preset.select(fn=on_preset, inputs=[preset, layout, editing, weights_alpha, weights_beta] + sliders,
                      outputs=sliders + [weights_alpha, weights_beta, curve, status])

        def on_save_preset(name, lay, *vals):
            try:
                path = presets.save_user_preset(name, visible_values(list(vals), lay))
            except MergeError as e:
                return gr.update(), status_html(str(e), True)
            return gr.update(choices=presets.names(_arch(lay)), value=name.strip()), status_html(f"saved {name.strip()} in {path}")

        save_preset.click(fn=on_save_preset, inputs=[preset_name, layout] + sliders, outputs=[preset, status])

        def on_delete_preset(name, lay):
            try:
                presets.delete_user_preset((name or "").strip())
            except MergeError as e:
                return gr.update(), status_html(str(e), True)
            return gr.update(choices=presets.names(_arch(lay)), value=None), status_html(f"deleted {name}")

        delete_preset.click(fn=on_delete_preset, inputs=[preset_name, layout], outputs=[preset, status])

        bake = lora["bake"]
        common = [model_a, model_b, model_c, mode, alpha, beta, use_blocks, weights_alpha, weights_beta, layout,
                  subtargets, elemental, dtype, vae] + adjust + [method, merge_seed_box, more_models] + \
            [bake["loras"], bake["strengths"], bake["blocks"]] + [c for _, _, c in param_ctls]
        n_base = 14 + len(adjust)  # build_params' positional UI fields (Adjust's sliders last); then method, seed
        # box, more models, the 3 LoRA bake controls, the parameter controls

        def request(model_a_v, args) -> dict[str, Any]:
            """``common``'s values -> the request: build_params' fields, the method, its parameters, the seed, the
            LoRAs to bake (the API's ``lora`` field, left out when none is selected)."""
            meth, box, more = args[n_base] or "linear", args[n_base + 1], args[n_base + 2]
            m = args[3]
            vals = param_values(selected_owners(m, meth), param_ctls, list(args[n_base + 6:]))
            p = build_params(model_a_v, *args[1:n_base], method=meth, params=vals, seed=merge_seed(box, meth, m),
                             more_models=more)
            loras = bake_request(*args[n_base + 3:n_base + 6])
            if loras:
                p["lora"] = loras
            return p

        def do_test(info, *args):
            try:
                params = SERVICE.chained(request(None, args))  # a chain base is model A
                res = SERVICE.test_merge(params)
            except MergeError as e:
                return [gr.update(), gr.update(), gr.update(), gr.update(), status_html(str(e), True)]
            notes = ("; " + "; ".join(res["notes"])) if res["notes"] else ""
            marks = stale_preview(info, "Test merge") if res.get("written") else [gr.update(), gr.update()]
            return marks + [recorded_seed(res), gr.update(interactive=bool(res.get("live"))),
                            status_html(res["message"] + notes)]  # status last: _gpu_wrap

        def do_restore(info):
            try:
                res = SERVICE.restore()
            except MergeError as e:
                return [gr.update(), gr.update(), gr.update(), status_html(str(e), True)]
            marks = stale_preview(info, "Restore") if res.get("restored") else [gr.update(), gr.update()]
            return marks + [gr.update(interactive=False), status_html(res["message"])]

        def do_chain():
            try:
                SERVICE.chain_from_live()
            except MergeError as e:
                return [gr.update(), gr.update(), status_html(str(e), True)]
            text = SERVICE.chain_text()
            again = [n for n, f in (("LoRAs", "lora"), ("Adjust", "adjust")) if (SERVICE.chain_base or {}).get(f)]
            note = (f"; the chain already holds its {' and '.join(again)}: clear them in the tab unless you want them "
                    f"applied again" if again else "")
            return [chain_html(text), gr.update(visible=True),
                    status_html(f"the next Test merge merges on top of {text}: choose B, mode and weights{note}")]

        def do_clear_chain():
            SERVICE.clear_chain()
            return [chain_html(""), gr.update(visible=False),
                    status_html("chain cleared: Test merge starts from the loaded checkpoint again")]

        def do_free():
            """Outputs (infotext, status): ``wrap_gradio_gpu_call`` turns a result into a list, so a handler under
            it returns a list; the infotext is left as it is (the live weights do not change)."""
            try:
                res = SERVICE.free()
            except MergeError as e:
                return [gr.update(), status_html(str(e), True)]
            return [gr.update(), status_html(res["message"])]

        def do_save(name, over, *args):
            try:
                p = request(None, args)
                res = SERVICE.save(name, bool(over), dtype=p.get("dtype"), vae=p.get("vae"))
            except MergeError as e:
                return [gr.update(), gr.update(), gr.update(), status_html(str(e), True)]
            upd = _checkpoint_update()
            return [upd, upd, upd, status_html(f"saved {res['name']} [{res['short_hash']}] in {res['seconds']:.1f} s; "
                                               f"sha256 {res['sha256']}")]

        def do_file_merge(name, over, *args):
            try:
                p = SERVICE.chained(request(args[0], args))  # a chain base replaces the A dropdown
                p["output"], p["overwrite"] = name, bool(over)
                res = SERVICE.merge_file(p)
            except MergeError as e:
                return [gr.update(), gr.update(), gr.update(), gr.update(), status_html(str(e), True)]
            upd = _checkpoint_update()
            return [upd, upd, upd, recorded_seed(res),
                    status_html(f"wrote {res['name']} [{res['short_hash']}] in {res['seconds']:.1f} s")]

        def do_preview(pr, neg, sd, st, w, h, smp, cf):
            try:
                caps = host.capabilities(host.ensure_model_loaded())  # Forge loads lazily: load it now
                if not caps.live:
                    raise MergeError(caps.reason)
                img, info = _preview(pr, neg, sd, st, w, h, smp, cf)
            except MergeError as e:
                return [gr.update(), gr.update(), status_html(str(e), True)]
            return [gr.update(value=img, label=PREVIEW_LABEL), gr.update(value=info, label=INFOTEXT_LABEL),
                    status_html("preview rendered" + (" with the test merge live" if SERVICE.status()["live"]
                                                      else " with the original weights"))]

        gpu = _gpu_wrap
        test_btn.click(fn=gpu(do_test, [image, infotext, merge_seed_box, chain_btn, status]),
                       inputs=[infotext] + common, outputs=[image, infotext, merge_seed_box, chain_btn, status])
        restore_btn.click(fn=gpu(do_restore, [image, infotext, chain_btn, status]), inputs=[infotext],
                          outputs=[image, infotext, chain_btn, status])
        free_btn.click(fn=gpu(do_free, [infotext, status]), inputs=[], outputs=[infotext, status])
        chain_btn.click(fn=do_chain, inputs=[], outputs=[chain_info, clear_chain_btn, status])
        clear_chain_btn.click(fn=do_clear_chain, inputs=[], outputs=[chain_info, clear_chain_btn, status])
        save_btn.click(fn=gpu(do_save, [model_a, model_b, model_c, status]), inputs=[output, overwrite] + common,
                       outputs=[model_a, model_b, model_c, status])
        file_btn.click(fn=gpu(do_file_merge, [model_a, model_b, model_c, merge_seed_box, status]),
                       inputs=[output, overwrite] + common, outputs=[model_a, model_b, model_c, merge_seed_box, status])
        preview_btn.click(fn=gpu(do_preview, [image, infotext, status]),
                          inputs=[prompt, negative, seed, steps, width, height, sampler, cfg],
                          outputs=[image, infotext, status])
        stop_btn.click(fn=lambda: host.state().interrupt(), inputs=[], outputs=[])
    tab.blockmerge_components = {"sliders": sliders, "model_a": model_a, "model_b": model_b, "model_c": model_c,
                                 "more_models": more_models,
                                 "mode": mode, "alpha": alpha, "beta": beta, "use_blocks": use_blocks,
                                 "weights_alpha": weights_alpha, "weights_beta": weights_beta, "preset": preset,
                                 "subtargets": subtargets, "elemental": elemental, "dtype": dtype, "vae": vae,
                                 "output": output, "overwrite": overwrite, "status": status, "image": image,
                                 "infotext": infotext, "editing": editing, "layout": layout,
                                 "curve": curve, "method": method, "merge_seed": merge_seed_box,
                                 "param_groups": param_groups, "param_controls": param_ctls,
                                 "lora": lora, "chain": chain_btn, "clear_chain": clear_chain_btn,
                                 "chain_info": chain_info,
                                 "buttons": [test_btn, preview_btn, restore_btn, free_btn, save_btn, file_btn,
                                             stop_btn]}
    return tab


def _curve(wa: str, wb: str, layout: str) -> str:
    arch = _arch(layout)
    try:
        a = parse_weights(wa, arch, 0.5) if wa and wa.strip() else None
    except MergeError:
        a = None
    try:
        b = parse_weights(wb, arch, 0.25) if wb and wb.strip() else None
    except MergeError:
        b = None
    return curve_svg(a or [0.5] * len(arch.blocks), arch.blocks, b)


def _samplers() -> list[str]:
    try:
        from modules import sd_samplers
        return [s.name for s in sd_samplers.visible_samplers()]
    except Exception:
        return ["Euler a", "Euler", "DPM++ 2M"]


def _preview(prompt, negative, seed, steps, width, height, sampler, cfg):
    from .preview import run_preview
    return run_preview(prompt, negative, seed, steps, width, height, sampler, cfg, SERVICE.infotext_fields())


def _gpu_wrap(fn, extra_outputs):
    """``wrap_gradio_gpu_call`` (queue lock, job state, Interrupt) when running inside the WebUI."""
    try:
        from modules import call_queue
    except ImportError:
        return fn
    outputs_before_status = [gr.update() for _ in extra_outputs[:-1]]
    return call_queue.wrap_gradio_gpu_call(fn, extra_outputs=outputs_before_status)
