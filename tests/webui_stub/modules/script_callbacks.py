callback_map = {k: [] for k in ("ui_tabs", "ui_settings", "model_loaded", "app_started", "script_unloaded",
                                "before_ui", "infotext_pasted")}


def _add(kind, cb):
    callback_map[kind].append(cb)


def on_ui_tabs(cb, *, name=None): _add("ui_tabs", cb)
def on_ui_settings(cb, *, name=None): _add("ui_settings", cb)
def on_model_loaded(cb, *, name=None): _add("model_loaded", cb)
def on_app_started(cb, *, name=None): _add("app_started", cb)
def on_script_unloaded(cb, *, name=None): _add("script_unloaded", cb)
def on_before_ui(cb, *, name=None): _add("before_ui", cb)


def clear_callbacks():
    for v in callback_map.values():
        v.clear()


def model_loaded_callback(sd_model):
    for cb in callback_map["model_loaded"]:
        cb(sd_model)
