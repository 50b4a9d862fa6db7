"""BlockMerge entry point for the AUTOMATIC1111 WebUI: registers the tab, settings and callbacks.

All logic lives in ``lib_merge`` (importable here because the WebUI puts the extension root on sys.path while
it imports this file); this file only wires it up.
"""
from modules import script_callbacks, scripts

from lib_merge.webui import callbacks, xyz

callbacks.use_extension_presets()
script_callbacks.on_ui_tabs(callbacks.on_ui_tabs)
script_callbacks.on_ui_settings(callbacks.on_ui_settings)
script_callbacks.on_model_loaded(callbacks.on_model_loaded)
script_callbacks.on_app_started(callbacks.on_app_started)
# X/Y/Z axes at import time (so they exist over the API and with --nowebui); again before the UI, deduplicated
xyz.register()
script_callbacks.on_before_ui(xyz.register)
script_callbacks.on_script_unloaded(xyz.unregister)


class BlockMergeInfotext(scripts.Script):
    """Records the live merge's recipe in each image's infotext."""

    def title(self):
        return "BlockMerge"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        xyz.process_cell(p)  # an X/Y/Z cell with BlockMerge axes: merge its settings in memory
        fields = callbacks.begin_generation()  # the recipe of what is live now, the cell's included
        if fields:
            p.extra_generation_params = {**(p.extra_generation_params or {}), **fields}

    def before_process_batch(self, p, *args, **kwargs):
        callbacks.before_process_batch(p)  # a reload wiped the merge since process(): apply it again
