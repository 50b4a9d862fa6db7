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


def beta_controls(mode: str) -> list[dict]:
    """beta slider, beta weights, "Sliders edit" radio: usable only in modes whose formula has beta (as alpha is
    greyed out while a full vector sets every block). The sliders go back to alpha when beta is not used."""
    uses = MODES[mode].uses_beta
    radio = gr.update(interactive=True) if uses else gr.update(value="alpha", interactive=False)
    return [gr.update(interactive=uses), gr.update(interactive=uses), radio]


def alpha_used(mode: str, use_blocks: bool, subtargets: list[str] | None) -> bool:
    """Whether the alpha slider does anything: not in a one-model mode (no_interpolation), not while the block
    sliders set every block, except with sub-targets (then the other keys get alpha)."""
    subs = subtargets or []
    partial = bool([s for s in subs if s != "all"]) and "all" not in subs
    return MODES[mode].models > 1 and (not use_blocks or partial)


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


def build_params(model_a, model_b, model_c, mode, alpha, beta, use_blocks, weights_alpha, weights_beta, layout,
                 subtargets, elemental, dtype, vae, *adjust) -> dict[str, Any]:
    """UI state -> the request dict (the CLI's names) that the service and the API take. ``adjust``: the 8
    Adjust sliders (none, or all zeros: no ``adjust`` field)."""
    m = MODES[mode]
    p: dict[str, Any] = {"mode": mode, "alpha": float(alpha), "beta": float(beta), "vae": vae, "dtype": dtype}
    if model_a:
        p["model_a"] = model_a
    if m.models >= 2:
        p["model_b"] = model_b
    if m.models >= 3:
        p["model_c"] = model_c
    if use_blocks:
        arch = _arch(layout)
        p["weights"] = format_vector(parse_weights(weights_alpha, arch, float(alpha), "alpha weights"))
        if m.uses_beta and weights_beta and weights_beta.strip():
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
            refresh = gr.Button(value="\U0001f504", elem_id="blockmerge_refresh", elem_classes=["tool"])
        with gr.Row():
            mode = gr.Radio(label="Merge mode", choices=list(MODES), value=default_mode, elem_id="blockmerge_mode")
        mode_info = gr.Markdown(f"`{MODES[default_mode].formula}`", elem_id="blockmerge_formula")
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
            save_btn = gr.Button("Save", elem_id="blockmerge_save")
            file_btn = gr.Button("Merge to file (A B C)", elem_id="blockmerge_merge_file")
            stop_btn = gr.Button("Stop", elem_id="blockmerge_stop")
        status = gr.HTML(status_html("ready"), elem_id="blockmerge_status")

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
        refresh.click(fn=lambda: [_checkpoint_update()] * 3, inputs=[], outputs=[model_a, model_b, model_c])

        def on_mode(m, on, subs):
            return [f"`{MODES[m].formula}`"] + beta_controls(m) + [gr.update(interactive=alpha_used(m, on, subs))]

        mode.change(fn=on_mode, inputs=[mode, use_blocks, subtargets],
                    outputs=[mode_info, beta, weights_beta, editing, alpha])

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

        common = [model_a, model_b, model_c, mode, alpha, beta, use_blocks, weights_alpha, weights_beta, layout,
                  subtargets, elemental, dtype, vae] + adjust

        def do_test(info, *args):
            try:
                params = build_params(None, *args[1:])
                res = SERVICE.test_merge(params)
            except MergeError as e:
                return [gr.update(), gr.update(), status_html(str(e), True)]
            notes = ("; " + "; ".join(res["notes"])) if res["notes"] else ""
            marks = stale_preview(info, "Test merge") if res.get("written") else [gr.update(), gr.update()]
            return marks + [status_html(res["message"] + notes)]

        def do_restore(info):
            try:
                res = SERVICE.restore()
            except MergeError as e:
                return [gr.update(), gr.update(), status_html(str(e), True)]
            marks = stale_preview(info, "Restore") if res.get("restored") else [gr.update(), gr.update()]
            return marks + [status_html(res["message"])]

        def do_save(name, over, *args):
            try:
                p = build_params(None, *args[1:])
                res = SERVICE.save(name, bool(over), dtype=p.get("dtype"), vae=p.get("vae"))
            except MergeError as e:
                return [gr.update(), gr.update(), gr.update(), status_html(str(e), True)]
            upd = _checkpoint_update()
            return [upd, upd, upd, status_html(f"saved {res['name']} [{res['short_hash']}] in {res['seconds']:.1f} s; "
                                               f"sha256 {res['sha256']}")]

        def do_file_merge(name, over, *args):
            try:
                p = build_params(*args)
                p["output"], p["overwrite"] = name, bool(over)
                res = SERVICE.merge_file(p)
            except MergeError as e:
                return [gr.update(), gr.update(), gr.update(), status_html(str(e), True)]
            upd = _checkpoint_update()
            return [upd, upd, upd, status_html(f"wrote {res['name']} [{res['short_hash']}] in {res['seconds']:.1f} s")]

        def do_preview(pr, neg, sd, st, w, h, smp, cf):
            try:
                reason = host.unsupported_reason(host.loaded_model())
                if reason and "Forge" not in reason:
                    raise MergeError(reason)
                img, info = _preview(pr, neg, sd, st, w, h, smp, cf)
            except MergeError as e:
                return [gr.update(), gr.update(), status_html(str(e), True)]
            return [gr.update(value=img, label=PREVIEW_LABEL), gr.update(value=info, label=INFOTEXT_LABEL),
                    status_html("preview rendered" + (" with the test merge live" if SERVICE.status()["live"]
                                                      else " with the original weights"))]

        gpu = _gpu_wrap
        test_btn.click(fn=gpu(do_test, [image, infotext, status]), inputs=[infotext] + common,
                       outputs=[image, infotext, status])
        restore_btn.click(fn=gpu(do_restore, [image, infotext, status]), inputs=[infotext],
                          outputs=[image, infotext, status])
        save_btn.click(fn=gpu(do_save, [model_a, model_b, model_c, status]), inputs=[output, overwrite] + common,
                       outputs=[model_a, model_b, model_c, status])
        file_btn.click(fn=gpu(do_file_merge, [model_a, model_b, model_c, status]), inputs=[output, overwrite] + common,
                       outputs=[model_a, model_b, model_c, status])
        preview_btn.click(fn=gpu(do_preview, [image, infotext, status]),
                          inputs=[prompt, negative, seed, steps, width, height, sampler, cfg],
                          outputs=[image, infotext, status])
        stop_btn.click(fn=lambda: host.state().interrupt(), inputs=[], outputs=[])
    tab.blockmerge_components = {"sliders": sliders, "model_a": model_a, "model_b": model_b, "model_c": model_c,
                                 "mode": mode, "alpha": alpha, "beta": beta, "use_blocks": use_blocks,
                                 "weights_alpha": weights_alpha, "weights_beta": weights_beta, "preset": preset,
                                 "subtargets": subtargets, "elemental": elemental, "dtype": dtype, "vae": vae,
                                 "output": output, "overwrite": overwrite, "status": status, "image": image,
                                 "infotext": infotext, "editing": editing, "layout": layout,
                                 "curve": curve, "buttons": [test_btn, preview_btn, restore_btn, save_btn, file_btn,
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
