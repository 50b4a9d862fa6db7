"""Checkpoint list and a loaded 'model': a torch module tree with the real file keys, hijack-renamed text encoder."""
import os

import torch

from modules import shared

model_path = os.path.join(os.getcwd(), "models", "Stable-diffusion")
checkpoints_list = {}
checkpoint_aliases = {}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = os.path.abspath(filename)
        abspath = os.path.abspath(filename)
        base = shared.cmd_opts.ckpt_dir or model_path
        self.name = os.path.relpath(abspath, base) if abspath.startswith(os.path.abspath(base)) else os.path.basename(filename)
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = self.name
        self.short_title = self.name_for_extra
        self.ids = [self.model_name, self.name, self.name_for_extra, self.title]
        self.metadata = {}

    def register(self):
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self

    def calculate_shorthash(self):
        from modules import cache
        ent = cache.cache("hashes").get(f"checkpoint/{self.name}")
        if ent is None:
            return None
        self.sha256 = ent["sha256"]
        self.shorthash = self.sha256[:10]
        self.title = f"{self.name} [{self.shorthash}]"
        self.ids += [self.shorthash, self.sha256, self.title]
        self.register()
        return self.shorthash


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    base = shared.cmd_opts.ckpt_dir or model_path
    for root, _, files in os.walk(base):
        for f in sorted(files):
            if f.endswith((".safetensors", ".ckpt")):
                CheckpointInfo(os.path.join(root, f)).register()


class SdModelData:
    def __init__(self):
        self.sd_model = None


model_data = SdModelData()


def hijacked_name(key):
    """The WebUI's sd_hijack wraps the text encoder and its token embedding: names gain 'wrapped.' segments."""
    if key.startswith("cond_stage_model."):
        key = "cond_stage_model.wrapped." + key[len("cond_stage_model."):]
        key = key.replace("token_embedding.weight", "token_embedding.wrapped.weight")
    return key


def get_empty_cond(sd_model):
    te = sd_model.cond_stage_model
    return sum(p.detach().double().sum() for p in te.parameters())


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    from lib_merge import synthetic
    from lib_merge.io.sources import open_source
    from modules import script_callbacks
    with open_source(checkpoint_info.filename) as src:
        listing = {k: (v.shape, v.dtype) for k, v in src.infos.items()}
    keys = [k for k, (_, dt) in listing.items() if dt.startswith(("F", "BF")) and k.startswith(
        ("model.diffusion_model.", "cond_stage_model.", "first_stage_model."))]
    model = synthetic.build_module(listing, keys=keys, dtype=torch.float32, rename=hijacked_name)
    synthetic.load_into(model, checkpoint_info.filename, rename=hijacked_name)
    model.sd_checkpoint_info = checkpoint_info
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_model_hash = checkpoint_info.shorthash
    model.is_sdxl = False
    model.is_sd2 = False
    model.lowvram = False
    model.cond_stage_model_empty_prompt = get_empty_cond(model)
    model_data.sd_model = model
    shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    script_callbacks.model_loaded_callback(model)
    return model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """Load another checkpoint's weights into the same model object (as the WebUI does for the same config)."""
    from lib_merge import synthetic
    from modules import script_callbacks
    sd_model = sd_model or model_data.sd_model
    if sd_model.sd_model_checkpoint == info.filename and not forced_reload:
        return sd_model
    synthetic.load_into(sd_model, info.filename, rename=hijacked_name)
    sd_model.sd_checkpoint_info = info
    sd_model.sd_model_checkpoint = info.filename
    sd_model.cond_stage_model_empty_prompt = get_empty_cond(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model
