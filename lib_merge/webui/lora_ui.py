"""The tab's "LoRA" accordion: bake LoRAs into the test merge, extract a LoRA from two checkpoints, merge LoRAs
(issue 13).

Extract and Merge LoRAs turn their controls into the request dict of their API route and send it to the same
service method the route calls (``SERVICE.lora_extract`` / ``SERVICE.lora_merge``), through
``wrap_gradio_gpu_call`` (queue lock, job state); checks and messages are the service's. The bake part has no
button of its own: its controls are inputs of Test merge, Save and Merge to file, whose request gets the
``lora`` field from :func:`bake_request` (the API's field: one code path). The accordion is built from one
function per part, each returning its components under its own key.
gradio 3.41 and 4.x: ``gr.update`` only, no ``.style()``.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from ..errors import MergeError
from ..lora.extract import OUT_DTYPES
from . import host
from .lora import DEFAULT_DTYPE, lora_names
from .service import SERVICE
from .ui import _gpu_wrap, status_html

KEEP_CHOICES = ("rank", "energy")
RANK_CHOICES = ("none", "auto", "4", "8", "16", "32", "64", "128")


# -- controls -> request (pure, tested without gradio events) ---------------------------------------------------
def extract_request(tuned: str | None, base: str | None, keep: str, rank: float, energy: float,
                    conv_rank: float | None, text_encoder: bool, dtype: str, output: str,
                    overwrite: bool) -> dict[str, Any]:
    """The Extract controls -> the body of ``POST lora/extract``: rank or energy as ``keep`` says; a conv rank of
    0 (or empty) means conv layers take the same rule as the others."""
    body: dict[str, Any] = {"tuned": tuned, "base": base, "output": output, "text_encoder": bool(text_encoder),
                            "dtype": dtype or DEFAULT_DTYPE, "overwrite": bool(overwrite)}
    if keep == "energy":
        body["energy"] = float(energy)
    else:
        body["rank"] = int(round(float(rank)))
    if conv_rank is not None and int(round(float(conv_rank))) > 0:
        body["conv_rank"] = int(round(float(conv_rank)))
    return body


def parse_ratios(text: str | None, count: int, what: str = "ratios") -> list[float]:
    """"0.5, 0.5" -> one number per selected LoRA; empty means 1 for each. ``what`` names the text box."""
    if not text or not text.strip():
        return [1.0] * count
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise MergeError(f"{what} must be numbers separated by commas, {what}: {text!r}") from None
    if len(values) != count:
        raise MergeError(f"{len(values)} {what} for {count} selected LoRAs (one per LoRA, in the list's order), "
                         f"{what}: {text!r}")
    return values


def parse_bake_blocks(text: str | None, count: int) -> list[str | None]:
    """"OUTALL; ; 1,0,…" -> one block-weight preset or vector per selected LoRA (``;`` between LoRAs, since a
    vector holds commas); empty means every block for each, an empty item every block for that LoRA. The
    presets and vectors themselves are checked by the service, naming ``lora[i].blocks``."""
    if not text or not text.strip():
        return [None] * count
    items = [b.strip() or None for b in text.split(";")]
    if len(items) != count:
        raise MergeError(f"{len(items)} block weights for {count} selected LoRAs (one preset or vector per LoRA, "
                         f"separated by ';'), blocks: {text!r}")
    return items


def bake_request(names: list[str] | None, strengths: str | None, blocks: str | None) -> list[dict[str, Any]]:
    """The bake controls -> the request's ``lora`` field (``[]`` when no LoRA is selected)."""
    names = [n for n in (names or []) if n]
    if not names:
        return []
    values = parse_ratios(strengths, len(names), "strengths")
    out: list[dict[str, Any]] = []
    for n, v, b in zip(names, values, parse_bake_blocks(blocks, len(names))):
        item: dict[str, Any] = {"name": n, "strength": v}
        if b:
            item["blocks"] = b
        out.append(item)
    return out


def parse_rank_choice(choice: str | None) -> int | str | None:
    """The rank dropdown: none (concatenate: the exact sum), auto (the largest input rank), or a whole number."""
    c = (choice or "none").strip().lower()
    if c in ("none", ""):
        return None
    if c == "auto":
        return "auto"
    try:
        return int(c)
    except ValueError:
        raise MergeError(f"rank must be none, auto or a whole number, rank: {choice!r}") from None


def merge_request(names: list[str] | None, ratios: str | None, rank: str | None, dtype: str, output: str,
                  overwrite: bool) -> dict[str, Any]:
    """The Merge LoRAs controls -> the body of ``POST lora/merge``."""
    names = [n for n in (names or []) if n]
    if not names:
        raise MergeError("select at least one LoRA, loras")
    values = parse_ratios(ratios, len(names))
    return {"loras": [{"name": n, "ratio": r} for n, r in zip(names, values)], "rank": parse_rank_choice(rank),
            "dtype": dtype or DEFAULT_DTYPE, "output": output, "overwrite": bool(overwrite)}


def result_line(res: dict) -> str:
    ranks = res.get("ranks") or {}
    err = res.get("rel_error")
    text = f"wrote {res['output']} in the LoRA folder in {res['seconds']:.1f} s; rank {ranks.get('min')}–{ranks.get('max')}"
    if err:
        text += f", relative error median {err['median']:.3g}, max {err['max']:.3g}"
    return text + f"; sha256 {res['sha256']}"


def _lora_list(value: list[str] | None = None) -> dict:
    return gr.update(choices=lora_names(), value=value) if value is not None else gr.update(choices=lora_names())


# -- layout and wiring -------------------------------------------------------------------------------------------
def lora_picker(label: str, prefix: str) -> tuple[Any, Any]:
    """A row with a multiselect of the LoRA folder's files (``{prefix}_loras``) and its 🔄 (``{prefix}_refresh``)."""
    with gr.Row():
        loras = gr.Dropdown(label=label, choices=lora_names(), multiselect=True, elem_id=f"{prefix}_loras")
        refresh = gr.Button(value="\U0001f504", elem_id=f"{prefix}_refresh", elem_classes=["tool"])
    return loras, refresh


def bake_part() -> dict[str, Any]:
    gr.Markdown("**Bake into the test merge**: the selected LoRAs are added to the merged weights by Test merge, "
                "Save and Merge to file (W + strength · ΔW, per-LoRA block weights); a strength change re-merges "
                "only the weights they patch. `<lora:…>` in the prompt still works on top",
                elem_id="blockmerge_bake_title")
    loras, refresh = lora_picker("LoRAs to bake (LoRA folder)", "blockmerge_bake")
    with gr.Row():
        strengths = gr.Textbox(label="Strengths, one per selected LoRA (empty: 1 each)", placeholder="0.8,0.5",
                               elem_id="blockmerge_bake_strengths")
        blocks = gr.Textbox(label="Block weights, one preset or 12/17/20/26-value vector per selected LoRA, "
                                  "separated by ; (empty: all blocks)", placeholder="OUTALL; 1,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1,1",
                            elem_id="blockmerge_bake_blocks")
    return {"loras": loras, "refresh": refresh, "strengths": strengths, "blocks": blocks}


def extract_part() -> dict[str, Any]:
    gr.Markdown("**Extract** a LoRA from a fine-tune and its base: ΔW = tuned − base per layer, truncated by SVD; "
                "written to the LoRA folder", elem_id="blockmerge_lora_extract_title")
    with gr.Row():
        tuned = gr.Dropdown(label="Tuned model", choices=host.checkpoint_titles(), elem_id="blockmerge_lora_tuned")
        base = gr.Dropdown(label="Base model", choices=host.checkpoint_titles(), elem_id="blockmerge_lora_base")
    with gr.Row():
        keep = gr.Radio(label="Keep", choices=list(KEEP_CHOICES), value="rank", elem_id="blockmerge_lora_keep")
        rank = gr.Slider(minimum=1, maximum=256, step=1, value=32, label="Rank", elem_id="blockmerge_lora_rank")
        energy = gr.Slider(minimum=0.5, maximum=1.0, step=0.005, value=0.95,
                           label="Energy (fraction of ΔW's squared norm kept, per layer)",
                           interactive=False, elem_id="blockmerge_lora_energy")
        conv_rank = gr.Number(label="Conv 3×3 rank (0: as the other layers)", value=0, precision=0,
                              elem_id="blockmerge_lora_conv_rank")
        text_encoder = gr.Checkbox(label="Text encoder too", value=False, elem_id="blockmerge_lora_text_encoder")
    with gr.Row():
        dtype = gr.Dropdown(label="LoRA dtype", choices=list(OUT_DTYPES), value=DEFAULT_DTYPE,
                            elem_id="blockmerge_lora_extract_dtype")
        output = gr.Textbox(label="Output name (saved in the LoRA folder)", placeholder="my-lora",
                            elem_id="blockmerge_lora_extract_output")
        overwrite = gr.Checkbox(label="Overwrite", value=False, elem_id="blockmerge_lora_extract_overwrite")
        button = gr.Button("Extract LoRA", elem_id="blockmerge_lora_extract")
    status = gr.HTML(status_html("extract: pick the tuned and the base checkpoint"),
                     elem_id="blockmerge_lora_extract_status")
    return {"tuned": tuned, "base": base, "keep": keep, "rank": rank, "energy": energy, "conv_rank": conv_rank,
            "text_encoder": text_encoder, "dtype": dtype, "output": output, "overwrite": overwrite,
            "button": button, "status": status}


def merge_part() -> dict[str, Any]:
    gr.Markdown("**Merge LoRAs** into one: rank none = the exact sum of the ratio-weighted ΔW (ranks add up); "
                "a rank = that sum re-compressed by SVD (auto: the largest input rank)",
                elem_id="blockmerge_lora_merge_title")
    loras, refresh = lora_picker("LoRAs (LoRA folder)", "blockmerge_lora")
    with gr.Row():
        ratios = gr.Textbox(label="Ratios, one per selected LoRA (empty: 1 each)", placeholder="0.5,0.5",
                            elem_id="blockmerge_lora_ratios")
        rank = gr.Dropdown(label="Rank", choices=list(RANK_CHOICES), value="none", allow_custom_value=True,
                           elem_id="blockmerge_lora_merge_rank")
        dtype = gr.Dropdown(label="LoRA dtype", choices=list(OUT_DTYPES), value=DEFAULT_DTYPE,
                            elem_id="blockmerge_lora_merge_dtype")
    with gr.Row():
        output = gr.Textbox(label="Output name (saved in the LoRA folder)", placeholder="merged-lora",
                            elem_id="blockmerge_lora_merge_output")
        overwrite = gr.Checkbox(label="Overwrite", value=False, elem_id="blockmerge_lora_merge_overwrite")
        button = gr.Button("Merge LoRAs", elem_id="blockmerge_lora_merge")
    status = gr.HTML(status_html("merge: select LoRAs"), elem_id="blockmerge_lora_merge_status")
    return {"loras": loras, "refresh": refresh, "ratios": ratios, "rank": rank, "dtype": dtype, "output": output,
            "overwrite": overwrite, "button": button, "status": status}


def wire(ex: dict[str, Any], mg: dict[str, Any], bk: dict[str, Any]) -> None:
    """A new LoRA file (extract, merge, refresh) shows in both LoRA lists, each keeping its selection."""
    def do_extract(*args):
        try:
            res = SERVICE.lora_extract(extract_request(*args))
        except MergeError as e:
            return [gr.update(), gr.update(), status_html(str(e), True)]
        return [_lora_list(), _lora_list(), status_html(result_line(res))]  # the new file is selectable right away

    def do_merge(names, *args):
        try:
            res = SERVICE.lora_merge(merge_request(names, *args))
        except MergeError as e:
            return [gr.update(), gr.update(), status_html(str(e), True)]
        return [_lora_list(names), _lora_list(), status_html(result_line(res))]

    ex["button"].click(fn=_gpu_wrap(do_extract, [mg["loras"], bk["loras"], ex["status"]]),
                       inputs=[ex[k] for k in ("tuned", "base", "keep", "rank", "energy", "conv_rank", "text_encoder",
                                               "dtype", "output", "overwrite")],
                       outputs=[mg["loras"], bk["loras"], ex["status"]])
    mg["button"].click(fn=_gpu_wrap(do_merge, [mg["loras"], bk["loras"], mg["status"]]),
                       inputs=[mg[k] for k in ("loras", "ratios", "rank", "dtype", "output", "overwrite")],
                       outputs=[mg["loras"], bk["loras"], mg["status"]])
    for button in (mg["refresh"], bk["refresh"]):
        button.click(fn=lambda: [_lora_list(), _lora_list()], inputs=[], outputs=[mg["loras"], bk["loras"]])

    def on_keep(keep):
        return [gr.update(interactive=keep == "rank"), gr.update(interactive=keep == "energy")]

    ex["keep"].change(fn=on_keep, inputs=[ex["keep"]], outputs=[ex["rank"], ex["energy"]])


def lora_accordion() -> dict[str, dict[str, Any]]:
    """Builds the accordion where it is called (inside the tab's Blocks); returns its parts' components."""
    with gr.Accordion("LoRA", open=False, elem_id="blockmerge_lora_acc"):
        bk = bake_part()
        ex = extract_part()
        mg = merge_part()
    wire(ex, mg, bk)
    return {"bake": bk, "extract": ex, "merge": mg}
