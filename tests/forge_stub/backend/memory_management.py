"""Which patchers are loaded for sampling: loading one that is not loaded yet merges its LoRAs (``model_load`` ->
``refresh_loras``); one already loaded is used as it is (Forge's ``load_models_gpu``)."""
current_loaded_models = []


def load_model_gpu(patcher):
    if any(p is patcher for p in current_loaded_models):
        return
    current_loaded_models[:] = [p for p in current_loaded_models if p.model is not patcher.model]  # its clones
    current_loaded_models.insert(0, patcher)
    patcher.refresh_loras()


def unload_all_models():
    current_loaded_models.clear()
