"""Callbacks the entry script registers: the tab, settings, model loads, infotext."""
from __future__ import annotations

from pathlib import Path

from .. import presets
from ..live import CachePolicy
from ..options import DEFAULT_SAVE_DTYPE, DTYPE_CHOICES
from . import host
from .service import SERVICE

EXTENSION_ROOT = Path(__file__).resolve().parent.parent.parent


def use_extension_presets() -> None:
    """Inside the WebUI, user presets live in the extension's ``presets/user.tsv``."""
    presets.set_user_presets_path(EXTENSION_ROOT / "presets" / "user.tsv")


def on_ui_tabs():
    from .ui import create_tab
    return [(create_tab(), "BlockMerge", "blockmerge")]


def on_ui_settings():
    import gradio as gr
    from modules import shared
    section = ("blockmerge", "BlockMerge")
    shared.opts.add_option(host.OPT_CACHE_DEVICE, shared.OptionInfo(
        CachePolicy.CPU.value, "Test merge: where to cache source weights (A, B, C in their file dtype)", gr.Radio,
        {"choices": [p.value for p in CachePolicy]}, section=section).info(
        "cpu: RAM (no file reads after the first merge); gpu: VRAM when there is room; "
        "mmap: read through the page cache (least memory); applies from the next Test merge"))
    shared.opts.add_option(host.OPT_DEFAULT_DTYPE, shared.OptionInfo(
        DEFAULT_SAVE_DTYPE, "Default dtype of saved merges", gr.Radio, {"choices": list(DTYPE_CHOICES)},
        section=section))


def on_model_loaded(sd_model):
    SERVICE.on_model_loaded(sd_model)


def begin_generation() -> dict[str, str]:
    """A generation starts: remember the live merge it renders with; returns the infotext fields to add while
    merged weights are live ("Model" keeps naming A)."""
    return SERVICE.begin_generation()


def before_process_batch(p) -> None:
    SERVICE.ensure_applied(p)


def on_app_started(demo, app):
    """API routes only with --api or --nowebui, as the WebUI's own."""
    from modules import shared
    if getattr(shared.cmd_opts, "api", False) or getattr(shared.cmd_opts, "nowebui", False):
        from .api import add_routes
        add_routes(app)
