"""Adjust (supermerger's detail / colour tweak, merge-conventions §1.12): after merging, scale the UNet's first
conv and its last GroupNorm / conv, and shift the 4 latent-channel biases of the last conv.

The recipe holds the 8 numbers F = (IN, OUT, OUT2, contrast, brightness, cyan_red, magenta_green, yellow_blue)
as a list of 8 floats, or ``None`` when off (blank text and all zeros normalise to ``None``, so a recipe with a
zero adjust serialises exactly like one without it). ``for_key`` turns them into an ``Adjustment`` per key,
carried by the key plan: the live re-merge signature reads it, and ``merge_tensors`` applies it last, so the
file sink and the live sink compute the same fp32 values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .errors import MergeError

NAMES = ("IN", "OUT", "OUT2", "contrast", "brightness", "cyan_red", "magenta_green", "yellow_blue")
UNET = "model.diffusion_model."
IN_W, IN_B = UNET + "input_blocks.0.0.weight", UNET + "input_blocks.0.0.bias"
OUT0_W, OUT0_B = UNET + "out.0.weight", UNET + "out.0.bias"
OUT2_W, OUT2_B = UNET + "out.2.weight", UNET + "out.2.bias"
KEYS = (IN_W, IN_B, OUT0_W, OUT0_B, OUT2_W, OUT2_B)

# colour directions of (brightness, cyan_red, magenta_green, yellow_blue) in latent channels 1..3
COLOURS_SD1 = ((-1.0, 1.0 / 3.0, 2.0 / 3.0), (1.0, 1.0, 0.0), (0.0, -1.0, -1.0), (1.0, 0.0, 1.0))
COLOURS_SDXL = ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (-1.0, -1.0, 0.0), (-1.0, 1.0, 0.0))


@dataclass(frozen=True)
class Adjustment:
    """``result * scale + shift`` (shift per output channel, on out.2.bias only)."""
    scale: float = 1.0
    shift: tuple[float, ...] | None = None


def parse_adjust(value: Any, where: str) -> list[float] | None:
    """8 numbers from a list/tuple or ``"a,b,c,..."`` text; ``None`` for None, blank text or all zeros."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        items: Sequence[Any] = [t.strip() for t in value.replace(";", ",").split(",")]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise MergeError(f"adjust needs 8 numbers ({','.join(NAMES)}), got {value!r}, {where}")
    if len(items) != len(NAMES):
        raise MergeError(f"adjust needs 8 numbers ({','.join(NAMES)}), got {len(items)} in {value!r}, {where}")
    out = []
    for x in items:
        if isinstance(x, str):
            try:
                x = float(x)
            except ValueError:
                raise MergeError(f"adjust needs 8 numbers, {x!r} is not one in {value!r}, {where}") from None
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise MergeError(f"adjust needs 8 numbers, {x!r} is not one in {value!r}, {where}")
        if not math.isfinite(x):
            raise MergeError(f"adjust needs 8 finite numbers, got {x!r} in {value!r}, {where}")
        out.append(float(x))
    return out if any(out) else None


def for_key(adjust: Sequence[float] | None, key: str, arch: str, channels: int) -> Adjustment | None:
    """The adjustment of ``key`` (``None`` when the key is not one of the 6 or it would change nothing).
    ``arch``: "sdxl" takes the SDXL colour vectors, every other architecture SD1's; ``channels``: the length
    of out.2.bias (4 latent channels; the colour shift fills the first 4)."""
    if not adjust:
        return None
    f1, f2, f3, contrast, *colour = adjust
    scale = {IN_W: 1.0 - 0.01 * f1, IN_B: 1.0 + 0.02 * f1, OUT0_W: 1.0 - 0.01 * f2, OUT0_B: 1.0 + 0.02 * f2,
             OUT2_W: 1.0 - 0.01 * f3}.get(key)
    if scale is not None:
        return Adjustment(scale) if scale != 1.0 else None
    if key != OUT2_B:
        return None
    vectors = COLOURS_SDXL if arch == "sdxl" else COLOURS_SD1
    c = [0.02 * sum(w * v[j] for w, v in zip(colour, vectors)) for j in range(3)]
    shift = (0.02 * contrast, *c)[:channels] + (0.0,) * max(0, channels - 4)
    return Adjustment(1.0, tuple(shift)) if any(shift) else None


def apply(adj: Adjustment | None, result: Tensor) -> Tensor:
    """``result`` (fp32, the key's whole merged tensor) adjusted in place."""
    if adj is None:
        return result
    if adj.scale != 1.0:
        result.mul_(adj.scale)
    if adj.shift is not None:
        result.add_(torch.tensor(adj.shift, dtype=result.dtype, device=result.device).reshape(-1, *[1] * (result.dim() - 1)))
    return result
