"""Synthetic checkpoints with the exact key layout of real SD1.5 / SDXL files (for the demo, tests, benchmarks).

``lib_merge/fixtures/*_keys.json`` list every key of a real checkpoint with its shape and dtype. ``tiny``
shrinks each dimension to a few elements but keeps what detection reads (the first conv's input channels,
attn2.to_k/to_v in-features, 0-dim tensors).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

from .dtypes import ITEMSIZE, ST_TO_TORCH

FIXTURES = Path(__file__).resolve().parent / "fixtures"
Listing = dict[str, tuple[tuple[int, ...], str]]

SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
            "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


def load_listing(name: str) -> Listing:
    """``sd15`` or ``sdxl``: key -> (shape, safetensors dtype)."""
    data = json.loads((FIXTURES / f"{name}_ldm_keys.json").read_text())
    return {k: (tuple(v[0]), v[1]) for k, v in data.items()}


def tiny(listing: Listing, size: int = 3) -> Listing:
    out = {}
    for k, (shape, dt) in listing.items():
        keep = set()
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            keep.add(1)
        if k == "model.diffusion_model.input_blocks.0.0.weight":
            keep.add(1)
        if k.endswith("position_ids"):
            keep.update(range(len(shape)))
        out[k] = (tuple(d if i in keep else min(d, size) for i, d in enumerate(shape)), dt)
    return out


def as_sd2(listing: Listing) -> Listing:
    """SD1 UNet with a 1024-wide context and an OpenCLIP text encoder (cond_stage_model.model.*)."""
    out = {}
    for k, (shape, dt) in listing.items():
        if k.startswith("cond_stage_model."):
            continue
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            shape = (shape[0], 1024)
        out[k] = (shape, dt)
    small = min(listing["cond_stage_model.transformer.text_model.final_layer_norm.weight"][0][0], 1024)
    for i in range(2):
        p = f"cond_stage_model.model.transformer.resblocks.{i}."
        out[p + "attn.in_proj_weight"] = ((3 * small, small), "F16")
        out[p + "attn.in_proj_bias"] = ((3 * small,), "F16")
        out[p + "ln_1.weight"] = ((small,), "F16")
    out["cond_stage_model.model.token_embedding.weight"] = ((49408 if small == 1024 else 5, small), "F16")
    out["cond_stage_model.model.positional_embedding"] = ((77, small), "F16")
    return out


def with_channels(listing: Listing, channels: int) -> Listing:
    """Inpainting (9) / instruct-pix2pix (8) first conv."""
    out = dict(listing)
    k = "model.diffusion_model.input_blocks.0.0.weight"
    shape, dt = out[k]
    out[k] = ((shape[0], channels, *shape[2:]), dt)
    return out


def with_training_leftovers(listing: Listing) -> Listing:
    """Add ``model_ema.*`` copies of a few UNet keys and the DDPM schedule buffers (for prune tests)."""
    out = dict(listing)
    for k in [k for k in listing if k.startswith("model.diffusion_model.")][:4]:
        out["model_ema." + k[len("model."):].replace(".", "")] = listing[k]
    out["model_ema.num_updates"] = ((), "I32")
    for name in SCHEDULE:
        out[name] = ((1000,), "F32")
    return out


def _fill(key: str, shape: tuple[int, ...], dt: str, gen: torch.Generator) -> torch.Tensor:
    dtype = ST_TO_TORCH[dt]
    if key.endswith("position_ids"):
        return torch.arange(shape[-1] if shape else 1, dtype=dtype).reshape(shape)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.05).to(dtype)


def write_checkpoint(path: str | os.PathLike, listing: Listing, seed: int = 0,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file with random values, one tensor at a time (constant memory)."""
    gen = torch.Generator().manual_seed(seed)
    keys = sorted(listing)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    pos = 0
    for k in keys:
        shape, dt = listing[k]
        n = 1
        for d in shape:
            n *= d
        header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + n * ITEMSIZE[dt]]}
        pos += n * ITEMSIZE[dt]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    p = Path(path)
    with open(p, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in keys:
            shape, dt = listing[k]
            t = _fill(k, shape, dt, gen)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return p


def build_module(listing: Listing, keys: Iterable[str] | None = None, dtype: torch.dtype | None = torch.float32,
                 device: str = "cpu", rename: Callable[[str], str] | None = None) -> torch.nn.Module:
    """A torch module tree whose ``named_parameters()`` are ``keys`` (default: UNet + text encoder floats).

    ``rename`` maps a file key to the module path used (e.g. to insert the WebUI hijack's ``wrapped.`` segments).
    Values are uninitialised; load them with :func:`load_into`.
    """
    root = torch.nn.Module()
    chosen = list(keys) if keys is not None else [
        k for k, (_, dt) in listing.items()
        if k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner."))
        and ST_TO_TORCH[dt].is_floating_point]
    for k in chosen:
        shape, dt = listing[k]
        path = (rename(k) if rename else k).split(".")
        mod = root
        for part in path[:-1]:
            child = mod._modules.get(part)
            if child is None:
                child = torch.nn.Module()
                mod.add_module(part, child)
            mod = child
        t = torch.empty(shape, dtype=dtype or ST_TO_TORCH[dt], device=device)
        mod.register_parameter(path[-1], torch.nn.Parameter(t, requires_grad=False))
    return root


def load_into(module: torch.nn.Module, path: str | os.PathLike, rename: Callable[[str], str] | None = None) -> None:
    """Copy a checkpoint's tensors into the module's parameters (cast to their dtype), like a model load."""
    from .io.sources import open_source
    params = dict(module.named_parameters())
    with open_source(path) as src, torch.no_grad():
        for k in src.infos:
            name = rename(k) if rename else k
            if name in params:
                params[name].copy_(src.read(k))
