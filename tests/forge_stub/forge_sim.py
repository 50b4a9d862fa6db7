"""Forge's model management around the stand-in ``backend``: ``sd_models.model_data`` with a FakeInitialModel until
the first generation, ``forge_model_reload`` (a new model object whenever the loading parameters change), and a
generation the way ``processing.process_images`` + the built-in ``sd_forge_lora`` run one (objects reset to the
original set, the LoRA set rebuilt when it changed, the patchers loaded for sampling, which merges their LoRAs)."""
import torch

from backend import memory_management
from backend.diffusion_engine import ForgeObjects
from backend.loader import forge_loader


class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None


class ForgeModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ""
        self.loads = 0


def install(sd_models, monkeypatch):
    """Turn the A1111 stand-in's ``sd_models`` into Forge's: lazy model data and ``forge_model_reload``."""
    data = ForgeModelData()
    monkeypatch.setattr(sd_models, "model_data", data)
    monkeypatch.setattr(sd_models, "forge_model_reload", lambda: forge_model_reload(sd_models), raising=False)
    memory_management.unload_all_models()
    return data


def select(sd_models, name):
    """What ``main_entry.checkpoint_change`` does: new loading parameters; the model loads at the next use."""
    info = sd_models.checkpoint_aliases[name]
    sd_models.model_data.forge_loading_parameters = {"checkpoint_info": info, "additional_modules": [],
                                                     "unet_storage_dtype": None}
    from modules import shared
    shared.opts.data["sd_model_checkpoint"] = info.title


def forge_model_reload(sd_models):
    from modules import script_callbacks
    data = sd_models.model_data
    current = str(data.forge_loading_parameters)
    if data.forge_hash == current:
        return data.sd_model, False
    data.sd_model = None
    memory_management.unload_all_models()
    info = data.forge_loading_parameters["checkpoint_info"]
    model = forge_loader(info.filename)
    model.sd_checkpoint_info = info
    model.filename = info.filename
    model.sd_model_hash = None
    data.sd_model = model
    data.loads += 1
    script_callbacks.model_loaded_callback(model)
    data.forge_hash = current
    return model, True


def generate(sd_models, lora=None, before_batch=None):
    """One generation; ``lora``: (name, {unet key: delta}, {clip key: delta}) or None. Returns the weights the
    sampler used (live names under the UNet patcher's model and the text encoders), copied."""
    model, _ = sd_models.forge_model_reload()
    model.forge_objects = model.forge_objects_original.shallow_copy()
    if before_batch is not None:
        before_batch()  # the scripts' before_process_batch (BlockMerge re-checks its sentinels there)
    model = sd_models.model_data.sd_model
    want = str([lora[0]]) if lora else str([])
    if model.current_lora_hash != want:
        model.current_lora_hash = want
        unet = model.forge_objects_original.unet.clone()
        clip = model.forge_objects_original.clip.clone()
        if lora:
            unet.add_patches(filename=lora[0], patches=lora[1])
            clip.patcher.add_patches(filename=lora[0], patches=lora[2])
        model.forge_objects_after_applying_lora = ForgeObjects(unet, clip, model.forge_objects_original.vae)
    model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
    memory_management.load_model_gpu(model.forge_objects.clip.patcher)  # prompt encoding
    memory_management.load_model_gpu(model.forge_objects.unet)  # sampling
    with torch.inference_mode():
        used = {f"unet.{k}": v.clone() for k, v in model.forge_objects.unet.model.named_parameters()}
        used.update({f"clip.{k}": v.clone() for k, v in model.forge_objects.clip.cond_stage_model.named_parameters()})
    return used
