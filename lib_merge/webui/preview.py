"""Quick txt2img preview from the tab (runs under the caller's queue_lock)."""
from __future__ import annotations

import contextlib


def run_preview(prompt: str, negative: str, seed: int, steps: int, width: int, height: int, sampler: str,
                cfg: float, fields: dict[str, str]):
    from modules import processing, shared
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, negative_prompt=negative, seed=int(seed), steps=int(steps), width=int(width),
        height=int(height), sampler_name=sampler or None, cfg_scale=float(cfg), do_not_save_samples=True,
        do_not_save_grid=True, outpath_samples=getattr(shared.opts, "outdir_txt2img_samples", None) or None,
        override_settings={})
    p.extra_generation_params = {**(p.extra_generation_params or {}), **fields}
    with contextlib.closing(p):
        processed = processing.process_images(p)
    image = processed.images[0] if processed.images else None
    info = processed.infotexts[0] if getattr(processed, "infotexts", None) else processed.info
    return image, info
