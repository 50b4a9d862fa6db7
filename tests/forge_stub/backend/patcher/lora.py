"""Forge's LoRA loader as it behaves (``backend/patcher/lora.py``): when the set of LoRAs changes it puts the
backed-up ``Parameter`` objects back, then for each patched key backs up the current ``Parameter`` and installs a
new one holding weight + delta (computed in fp32). So parameters are replaced, never written in place."""
import torch

from backend import utils


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return
        for k, w in self.backup.items():
            utils.set_attr_raw(self.model, k, w)
        self.backup = {}
        merged = {}
        for patches in lora_patches.values():
            for key, delta in patches.items():
                merged.setdefault(key, []).append(delta)
        for key, deltas in merged.items():
            weight = utils.get_attr(self.model, key)
            assert isinstance(weight, torch.nn.Parameter), key
            self.backup.setdefault(key, weight)
            w = weight.to(torch.float32)
            for d in deltas:
                w = w + d.to(torch.float32)
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(w.to(weight.dtype), requires_grad=False))
        self.loaded_hash = hashes


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.lora_patches = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = type(self).__new__(type(self))
        n.__dict__.update(self.__dict__)
        n.lora_patches = dict(self.lora_patches)
        return n

    def add_patches(self, *, filename, patches, strength=1.0):
        names = {k for k, _ in self.model.named_parameters()}
        self.lora_patches[(filename, strength)] = {k: v * strength for k, v in patches.items() if k in names}

    def refresh_loras(self):
        self.lora_loader.refresh(self.lora_patches)
