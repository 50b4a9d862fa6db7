"""Checkpoint key <-> kohya / A1111 LoRA module name, for SD1, SD2 and SDXL, in the names the WebUI loads.

The WebUI's built-in Lora extension names every torch module of the loaded model by its compvis path with
``.`` -> ``_`` and looks a LoRA module up there:

- UNet: ``lora_unet_X`` is tried as ``diffusion_model_X`` (compvis style, ``lora_unet_input_blocks_1_1_proj_in``);
  diffusers-style names (``lora_unet_down_blocks_0_attentions_0_proj_in``) are first renamed to compvis ones by
  the rules in ``DIFFUSERS_UNET`` (the WebUI's own conversion, kept as data here).
- CLIP-L text encoder: SD1's ``lora_te_text_model_…`` (the WebUI also accepts ``lora_te1_text_model_…`` on SD1)
  and SDXL's ``lora_te1_text_model_…`` keep the transformers path of ``…transformer.text_model.``.
- OpenCLIP text encoders (SD2 ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``): LoRAs
  carry transformers names (``lora_te_`` on SD2, ``lora_te2_`` on SDXL, then ``text_model_encoder_layers_N_…``)
  which ``OPENCLIP_LAYERS`` maps to the resblock weights. q/k/v are separate modules but the checkpoint holds one
  joined ``attn.in_proj_weight`` (rows q, then k, then v): each such module patches its third (``Target.part``).

Every name a checkpoint can be patched by is listed by ``module_map``; ``resolve`` finds a LoRA module's target
through the aliases above.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

UNET = "model.diffusion_model."
# checkpoint prefix -> LoRA prefix (the part after the prefix keeps its path with '.' -> '_')
PREFIXES: tuple[tuple[str, str], ...] = (
    (UNET, "lora_unet_"),
    ("cond_stage_model.transformer.text_model.", "lora_te_text_model_"),
    ("conditioner.embedders.0.transformer.text_model.", "lora_te1_text_model_"),
)
# OpenCLIP resblocks prefix -> LoRA prefix of the same layers in transformers naming
OPENCLIP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("cond_stage_model.model.transformer.resblocks.", "lora_te_text_model_encoder_layers_"),
    ("conditioner.embedders.1.model.transformer.resblocks.", "lora_te2_text_model_encoder_layers_"),
)
# OpenCLIP weight (after "resblocks.N.") -> the transformers module names patching it, in row order
OPENCLIP_LAYERS: dict[str, tuple[str, ...]] = {
    "attn.in_proj_weight": ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"),
    "attn.out_proj.weight": ("self_attn_out_proj",),
    "mlp.c_fc.weight": ("mlp_fc1",),
    "mlp.c_proj.weight": ("mlp_fc2",),
}
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
TE_PREFIXES = ("cond_stage_model.", "conditioner.")


@dataclass(frozen=True)
class Target:
    """The checkpoint weight a LoRA module patches; ``part`` 0/1/2 = the q/k/v third of a joined in_proj."""
    key: str
    part: int | None = None

    def rows(self, shape: Sequence[int]) -> tuple[int, int]:
        """(first row, row count) of the weight that ΔW lands in."""
        if self.part is None:
            return 0, int(shape[0])
        third = int(shape[0]) // 3
        return self.part * third, third


def is_lora_target(key: str, shape: Sequence[int]) -> bool:
    """A weight a LoRA can patch: a Linear (2-D) or Conv2d (4-D) weight; embeddings are lookup tables."""
    return (key.endswith(".weight") or key.endswith(".in_proj_weight")) and len(shape) in (2, 4) \
        and "embedding" not in key


def module_names(key: str) -> list[tuple[str, Target]]:
    """Every LoRA module name that patches ``key`` (three for a joined q/k/v in_proj), [] if none."""
    for ckpt, lora in OPENCLIP_PREFIXES:
        if key.startswith(ckpt):
            layer, _, rest = key[len(ckpt):].partition(".")
            names = OPENCLIP_LAYERS.get(rest, ())
            if not layer.isdigit() or not names:
                return []
            if len(names) == 1:
                return [(f"{lora}{layer}_{names[0]}", Target(key))]
            return [(f"{lora}{layer}_{n}", Target(key, i)) for i, n in enumerate(names)]
    if not key.endswith(".weight"):
        return []
    for ckpt, lora in PREFIXES:
        if key.startswith(ckpt):
            return [(lora + key[len(ckpt):-len(".weight")].replace(".", "_"), Target(key))]
    return []


def module_name(key: str) -> str | None:
    """``model.diffusion_model.input_blocks.1.1.proj_in.weight`` -> ``lora_unet_input_blocks_1_1_proj_in``;
    None for keys no single module patches whole (outside the covered parts, or a joined q/k/v in_proj)."""
    names = module_names(key)
    return names[0][0] if len(names) == 1 else None


def part_of_module(name: str) -> str:
    """``unet`` or ``te`` for a LoRA module name."""
    return "unet" if name.startswith("lora_unet_") else "te"


def module_map(shapes: Mapping[str, Sequence[int]]) -> dict[str, Target]:
    """LoRA module name -> what it patches, for every patchable weight of a checkpoint."""
    out = {}
    for k, s in shapes.items():
        if is_lora_target(k, s):
            for name, target in module_names(k):
                out[name] = target
    return out


# -- diffusers-style UNet names -> compvis (the WebUI's conversion, as data) ----------------------------------
RESNET_PARTS = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _layer(kind: str, rest: str) -> tuple[int, str]:
    """(index inside the compvis block, suffix) of a diffusers attentions_/resnets_ sub-module."""
    if kind == "attentions":
        return 1, rest
    return 0, RESNET_PARTS.get(rest, rest)


def _down(m: re.Match) -> str:
    b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
    sub, suffix = _layer(kind, rest)
    return f"input_blocks_{1 + 3 * b + i}_{sub}_{suffix}"


def _mid(m: re.Match) -> str:
    kind, i, rest = m[1], int(m[2]), m[3]
    sub, suffix = _layer(kind, rest)
    return f"middle_block_{1 if kind == 'attentions' else 2 * i}_{suffix}"


def _up(m: re.Match) -> str:
    b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
    sub, suffix = _layer(kind, rest)
    return f"output_blocks_{3 * b + i}_{sub}_{suffix}"


# diffusers name after "lora_unet_" -> compvis name after "lora_unet_"
DIFFUSERS_UNET: tuple[tuple[re.Pattern, Callable[[re.Match], str]], ...] = (
    (re.compile(r"conv_in(.*)"), lambda m: f"input_blocks_0_0{m[1]}"),
    (re.compile(r"conv_out(.*)"), lambda m: f"out_2{m[1]}"),
    (re.compile(r"time_embedding_linear_(\d+)(.*)"), lambda m: f"time_embed_{2 * int(m[1]) - 2}{m[2]}"),
    # SDXL's class embedding (not in the WebUI's rules, which leave it unapplied)
    (re.compile(r"add_embedding_linear_(\d+)(.*)"), lambda m: f"label_emb_0_{2 * int(m[1]) - 2}{m[2]}"),
    (re.compile(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"), _down),
    (re.compile(r"mid_block_(attentions|resnets)_(\d+)_(.+)"), _mid),
    (re.compile(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"), _up),
    (re.compile(r"down_blocks_(\d+)_downsamplers_0_conv"), lambda m: f"input_blocks_{3 + 3 * int(m[1])}_0_op"),
    # the WebUI's rule (SD1/SD2 layout: the first up block has no attention)
    (re.compile(r"up_blocks_(\d+)_upsamplers_0_conv"),
     lambda m: f"output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"),
)


def diffusers_to_compvis(name: str) -> str | None:
    """``lora_unet_down_blocks_0_attentions_0_proj_in`` -> ``lora_unet_input_blocks_1_1_proj_in``; None when
    the name is not a diffusers-style UNet name."""
    if not name.startswith("lora_unet_"):
        return None
    rest = name[len("lora_unet_"):]
    for pattern, build in DIFFUSERS_UNET:
        m = pattern.fullmatch(rest)
        if m:
            return "lora_unet_" + build(m)
    return None


UPSAMPLER = re.compile(r"(lora_unet_output_blocks_\d+_)([12])(_conv)")


def aliases(name: str) -> list[str]:
    """The names a LoRA module is looked up as, in the WebUI's order (then ours)."""
    out = [name]
    compvis = diffusers_to_compvis(name)
    if compvis is not None:
        out.insert(0, compvis)
        m = UPSAMPLER.fullmatch(compvis)
        if m:  # SDXL's first up block has attention, so its upsampler is output_blocks.2.2 (the WebUI misses it)
            out.insert(1, f"{m[1]}{3 - int(m[2])}{m[3]}")
    if name.startswith("lora_te1_text_model_"):  # some SD1 LoRAs name the only text encoder te1
        out.append("lora_te_text_model_" + name[len("lora_te1_text_model_"):])
    return out


def resolve(name: str, table: Mapping[str, Target]) -> Target | None:
    """What a LoRA module patches in a checkpoint whose ``module_map`` is ``table``; None if nothing."""
    for alias in aliases(name):
        target = table.get(alias)
        if target is not None:
            return target
    return None


def extract_modules(shapes: Mapping[str, Sequence[int]], text_encoder: bool) -> list[tuple[str, Target]]:
    """(module name, target) extract writes, by key then part: every patchable UNet weight, and the text
    encoders' (CLIP-L and OpenCLIP, q/k/v split) if asked."""
    table = module_map(shapes)
    chosen = [(n, t) for n, t in table.items() if text_encoder or t.key.startswith(UNET)]
    return sorted(chosen, key=lambda nt: (nt[1].key, -1 if nt[1].part is None else nt[1].part))


def targets(shapes: Mapping[str, Sequence[int]], text_encoder: bool) -> list[str]:
    """Checkpoint keys extract covers."""
    return sorted({t.key for _, t in extract_modules(shapes, text_encoder)})


def uncovered_text_encoder(shapes: Mapping[str, Sequence[int]]) -> int:
    """How many patchable text-encoder weights have no module name here, to say so."""
    return sum(1 for k, s in shapes.items()
               if k.startswith(TE_PREFIXES) and is_lora_target(k, s) and not module_names(k))



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
