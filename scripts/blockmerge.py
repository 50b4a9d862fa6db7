"""BlockMerge entry point for the AUTOMATIC1111 WebUI: registers the tab, settings and callbacks.

All logic lives in ``lib_merge`` (importable here because the WebUI puts the extension root on sys.path while
it imports this file); this file only wires it up.
"""
from modules import script_callbacks, scripts

from lib_merge.webui import callbacks

callbacks.use_extension_presets()
script_callbacks.on_ui_tabs(callbacks.on_ui_tabs)
script_callbacks.on_ui_settings(callbacks.on_ui_settings)
script_callbacks.on_model_loaded(callbacks.on_model_loaded)
script_callbacks.on_app_started(callbacks.on_app_started)


class BlockMergeInfotext(scripts.Script):
    """Records the live merge's recipe in each image's infotext."""

    def title(self):
        return "BlockMerge"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        fields = callbacks.infotext_fields()
        if fields:
            p.extra_generation_params = {**(p.extra_generation_params or {}), **fields}
