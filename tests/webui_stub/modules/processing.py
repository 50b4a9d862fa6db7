import torch


class StableDiffusionProcessing:
    cached_uc = [None, None]
    cached_c = [None, None]

    def __init__(self, prompt="", negative_prompt="", seed=-1, steps=20, width=512, height=512, sampler_name=None,
                 cfg_scale=7.0, do_not_save_samples=False, do_not_save_grid=False, outpath_samples=None,
                 override_settings=None, **kwargs):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.steps = steps
        self.width = width
        self.height = height
        self.sampler_name = sampler_name
        self.cfg_scale = cfg_scale
        self.extra_generation_params = {}
        self.override_settings = override_settings or {}
        self.scripts = None
        self.script_args = []
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c
        for k, v in kwargs.items():
            setattr(self, k, v)

    def close(self):
        pass


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]


class Processed:
    def __init__(self, p, images, infotexts):
        self.images = images
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""
        self.seed = p.seed


def _weights_digest(model):
    """A deterministic 'render' of the current weights (stands for sampling)."""
    total = torch.zeros((), dtype=torch.float64)
    for _, p in sorted(model.named_parameters()):
        total += p.detach().double().sum()
    return float(total)


def process_images(p):
    from PIL import Image
    from modules import sd_models
    model = sd_models.model_data.sd_model
    if p.scripts is not None:
        p.scripts.process(p)
    value = _weights_digest(model)
    shade = int(abs(value * 1e3)) % 256
    img = Image.new("RGB", (p.width, p.height), (shade, 255 - shade, (shade * 7) % 256))
    params = ", ".join(f"{k}: {v}" for k, v in p.extra_generation_params.items())
    info = f"{p.prompt}\nSteps: {p.steps}, Seed: {p.seed}, Model: {model.sd_checkpoint_info.model_name}" + (f", {params}" if params else "")
    return Processed(p, [img], [info])
