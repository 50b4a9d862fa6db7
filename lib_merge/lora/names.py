"""Checkpoint key <-> kohya / A1111 LoRA module name (compvis style), for SD1, SD2 and SDXL.

The WebUI's built-in Lora extension names every torch module of the loaded model by its compvis path with
``.`` -> ``_`` and looks a LoRA module up there: ``lora_unet_X`` is tried as ``diffusion_model_X``, SD1's
``lora_te_text_model_…`` as ``transformer_text_model_…`` and SDXL's ``lora_te1_text_model_…`` as
``0_transformer_text_model_…``. Writing those names keeps our files loadable unchanged.

Not covered in this slice (no name is given, so extract leaves them out and bake reports them as unmatched):
the OpenCLIP text encoders (SD2's ``cond_stage_model.model.*`` and SDXL's ``conditioner.embedders.1.*``), whose
attention is one fused ``in_proj_weight`` the WebUI splits into q/k/v modules; and diffusers-style module names.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

UNET = "model.diffusion_model."
# checkpoint prefix -> LoRA prefix (the part after the prefix keeps its path with '.' -> '_')
PREFIXES: tuple[tuple[str, str], ...] = (
    (UNET, "lora_unet_"),
    ("cond_stage_model.transformer.text_model.", "lora_te_text_model_"),
    ("conditioner.embedders.0.transformer.text_model.", "lora_te1_text_model_"),
)
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def is_lora_target(key: str, shape: Sequence[int]) -> bool:
    """A weight a LoRA can patch: a Linear (2-D) or Conv2d (4-D) ``.weight``; embeddings are lookup tables."""
    return key.endswith(".weight") and len(shape) in (2, 4) and "embedding" not in key


def module_name(key: str) -> str | None:
    """``model.diffusion_model.input_blocks.1.1.proj_in.weight`` -> ``lora_unet_input_blocks_1_1_proj_in``;
    None for keys outside the covered parts."""
    if not key.endswith(".weight"):
        return None
    for ckpt, lora in PREFIXES:
        if key.startswith(ckpt):
            return lora + key[len(ckpt):-len(".weight")].replace(".", "_")
    return None


def part_of_module(name: str) -> str:
    """``unet`` or ``te`` for a LoRA module name."""
    return "unet" if name.startswith("lora_unet_") else "te"


def module_map(shapes: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """LoRA module name -> checkpoint key, for every patchable weight of a checkpoint."""
    out = {}
    for k, s in shapes.items():
        if is_lora_target(k, s):
            name = module_name(k)
            if name is not None:
                out[name] = k
    return out


def targets(shapes: Mapping[str, Sequence[int]], text_encoder: bool) -> list[str]:
    """Checkpoint keys extract covers: every patchable UNet weight, and the CLIP-L text encoder's if asked."""
    keys: Iterable[str] = module_map(shapes).values()
    return sorted(k for k in keys if text_encoder or k.startswith(UNET))


def uncovered_text_encoder(shapes: Mapping[str, Sequence[int]]) -> int:
    """How many patchable text-encoder weights have no module name here (OpenCLIP), to say so."""
    return sum(1 for k, s in shapes.items()
               if k.startswith(("cond_stage_model.", "conditioner.")) and is_lora_target(k, s)
               and module_name(k) is None)


_XL_ONLY = re.compile(r"^lora_te[12]_|^lora_unet_label_emb_|_transformer_blocks_[1-9]")
_SD_ONLY = re.compile(r"^lora_te_|^lora_unet_input_blocks_[12]_1_|^lora_unet_(?:input|output)_blocks_(?:9|1[01])_")
CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def lora_family(modules: Mapping[str, tuple[Sequence[int], Sequence[int]]]) -> str | None:
    """The base-model family of a LoRA from its module names (and down shapes): ``sdxl``, ``sd1``/``sd2`` when
    the cross-attention width tells, ``sd`` (SD1 or SD2) when only the names do, None when nothing tells.

    ``modules``: name -> (up shape, down shape). SDXL-only names: ``lora_te1_``/``lora_te2_``, ``label_emb``,
    a second transformer block; SD1/SD2-only: ``lora_te_``, attention in ``input_blocks.1``/``.2``, blocks 9–11.
    """
    family = None
    for name, (_, down) in modules.items():
        if name.endswith(("attn2_to_k", "attn2_to_v")) and len(down) == 2 and down[1] in CONTEXT_FAMILY:
            return CONTEXT_FAMILY[down[1]]
        if family is None and _XL_ONLY.search(name):
            family = "sdxl"
        elif family is None and _SD_ONLY.search(name):
            family = "sd"
    return family


def same_family(a: str | None, b: str | None) -> bool:
    """Unknown (None) fits anything; ``sd`` fits ``sd1`` and ``sd2``."""
    if a is None or b is None or a == b:
        return True
    return {a, b} in ({"sd", "sd1"}, {"sd", "sd2"})
