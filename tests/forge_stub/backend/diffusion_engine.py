"""Forge's model objects (``backend/diffusion_engine/*.py``): no ``.model``, ``cond_stage_model`` None, the weights
in ``forge_objects`` (and two shallow copies that share the same modules)."""
import torch

from backend.patcher.lora import ModelPatcher


class KModel(torch.nn.Module):
    """``backend/modules/k_model.py``: holds the UNet as ``diffusion_model`` (LoRA keys start with it)."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


class UnetPatcher(ModelPatcher):
    pass


class JointTextEncoder(torch.nn.ModuleDict):
    """``backend/patcher/clip.py``: clip_l / clip_g / clip_h by name."""


class CLIP:
    def __init__(self, encoders):
        self.cond_stage_model = JointTextEncoder(encoders)
        self.patcher = ModelPatcher(self.cond_stage_model)

    def clone(self):
        n = CLIP.__new__(CLIP)
        n.cond_stage_model = self.cond_stage_model
        n.patcher = self.patcher.clone()
        return n


class VAE:
    def __init__(self, module):
        self.first_stage_model = module


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    def __init__(self, config, unet, encoders, vae):
        self.model_config = config
        self.forge_objects = ForgeObjects(UnetPatcher(KModel(unet)), CLIP(encoders), VAE(vae))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.first_stage_model = None
        self.cond_stage_model = None
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False


class SD15:
    pass


class SD20:
    pass


class SDXL:
    pass


class StableDiffusion(ForgeDiffusionEngine):
    def __init__(self, *a):
        super().__init__(SD15(), *a)
        self.is_sd1 = True


class StableDiffusion2(ForgeDiffusionEngine):
    def __init__(self, *a):
        super().__init__(SD20(), *a)
        self.is_sd2 = True


class StableDiffusionXL(ForgeDiffusionEngine):
    def __init__(self, *a):
        super().__init__(SDXL(), *a)
        self.is_sdxl = True
