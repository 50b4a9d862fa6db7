"""Generate the key tables in ``maps/`` (run ``python -m lib_merge.io.diffusers.gen_maps``; the runtime only reads
the tables). One table per architecture and component: ``LDM key<TAB>diffusers key<TAB>transform``.

The naming rules below are the single-file (LDM) ↔ diffusers correspondence, applied to the key listings of real
checkpoints in ``lib_merge/fixtures`` (SD1.5, SDXL); SD2 is SD1's UNet and VAE with an OpenCLIP ViT-H text
encoder (24 blocks, of which diffusers keeps the first 23: SD2 conditions on the penultimate layer).

Transforms (single file → diffusers; each has an exact inverse):
  ``=``        same tensor
  ``conv1x1``  VAE mid-block attention: a [C, C, 1, 1] 1×1 conv becomes a [C, C] linear (reshape only)
  ``T``        transpose (OpenCLIP ``text_projection`` [in, out] ↔ ``text_projection.weight`` [out, in])
  ``q k v``    first / second / third row block of OpenCLIP's joined ``in_proj_weight``/``in_proj_bias``
"""
from __future__ import annotations

import re
from pathlib import Path

from ...synthetic import load_listing

MAPS = Path(__file__).resolve().parent / "maps"
UNET = "model.diffusion_model."
VAE = "first_stage_model."

RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
          ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut."))
UNET_FIXED = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
              "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
              "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}
PER_LEVEL = 3  # layers_per_block (2) + the down/upsampler slot, in SD1, SD2 and SDXL alike


def _resnet(rest: str) -> str:
    for old, new in RESNET:
        if rest.startswith(old):
            return new + rest[len(old):]
    raise ValueError(rest)


def unet_name(key: str) -> str:
    k = key[len(UNET):]
    for old, new in UNET_FIXED.items():
        if k.startswith(old):
            return new + k[len(old):]
    m = re.match(r"input_blocks\.(\d+)\.(\d)\.(.*)", k)
    if m:
        i, slot, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, layer = (i - 1) // PER_LEVEL, (i - 1) % PER_LEVEL
        if rest.startswith("op."):
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
        if slot == 0:
            return f"down_blocks.{level}.resnets.{layer}.{_resnet(rest)}"
        return f"down_blocks.{level}.attentions.{layer}.{rest}"
    m = re.match(r"middle_block\.(\d)\.(.*)", k)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        return f"mid_block.attentions.0.{rest}" if i == 1 else f"mid_block.resnets.{i // 2}.{_resnet(rest)}"
    m = re.match(r"output_blocks\.(\d+)\.(\d)\.(.*)", k)
    if m:
        i, slot, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, layer = i // PER_LEVEL, i % PER_LEVEL
        if rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.conv.{rest[5:]}"
        if slot == 0:
            return f"up_blocks.{level}.resnets.{layer}.{_resnet(rest)}"
        return f"up_blocks.{level}.attentions.{layer}.{rest}"
    raise ValueError(key)


VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
VAE_LEVELS = 4


def vae_name(key: str) -> tuple[str, str]:
    k = key[len(VAE):]
    m = re.match(r"(encoder|decoder)\.(.*)", k)
    if not m:
        return k, "="  # quant_conv, post_quant_conv
    side, rest = m.groups()
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest[9:]}", "="
    if rest.startswith(("conv_in.", "conv_out.")):
        return f"{side}.{rest}", "="
    m = re.match(r"mid\.block_(\d)\.(.*)", rest)
    if m:
        return f"{side}.mid_block.resnets.{int(m.group(1)) - 1}.{m.group(2).replace('nin_shortcut', 'conv_shortcut')}", "="
    m = re.match(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest)
    if m:
        name = VAE_ATTN[m.group(1) + "."] + m.group(2)
        return f"{side}.mid_block.attentions.0.{name}", ("conv1x1" if m.group(1) != "norm" and m.group(2) == "weight" else "=")
    m = re.match(r"(down|up)\.(\d)\.(block\.(\d)|downsample|upsample)\.(.*)", rest)
    if m:
        kind, level, what, j, tail = m.groups()
        level = int(level) if kind == "down" else VAE_LEVELS - 1 - int(level)
        if what.startswith("block"):
            return f"{side}.{kind}_blocks.{level}.resnets.{j}.{tail.replace('nin_shortcut', 'conv_shortcut')}", "="
        return f"{side}.{kind}_blocks.{level}.{kind}samplers.0.{tail}", "="
    raise ValueError(key)


OPENCLIP_PARTS = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                  ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))


def openclip_rows(prefix: str, layers: int, projection: bool) -> list[tuple[str, str, str]]:
    rows = [(prefix + "token_embedding.weight", "text_model.embeddings.token_embedding.weight", "="),
            (prefix + "positional_embedding", "text_model.embeddings.position_embedding.weight", "="),
            (prefix + "ln_final.weight", "text_model.final_layer_norm.weight", "="),
            (prefix + "ln_final.bias", "text_model.final_layer_norm.bias", "=")]
    if projection:
        rows.append((prefix + "text_projection", "text_projection.weight", "T"))
    for i in range(layers):
        src = f"{prefix}transformer.resblocks.{i}."
        dst = f"text_model.encoder.layers.{i}."
        for what in ("weight", "bias"):
            for old, new in OPENCLIP_PARTS:
                rows.append((f"{src}{old}{what}", f"{dst}{new}{what}", "="))
            for part in "qkv":
                rows.append((f"{src}attn.in_proj_{what}", f"{dst}self_attn.{part}_proj.{what}", part))
    return rows


def clip_rows(keys: list[str], prefix: str) -> list[tuple[str, str, str]]:
    return [(k, k[len(prefix):], "=") for k in keys if k.startswith(prefix)]


def tables() -> dict[str, dict[str, list[tuple[str, str, str]]]]:
    sd15 = sorted(load_listing("sd15"))
    sdxl = sorted(load_listing("sdxl"))

    def unet(keys):
        return [(k, unet_name(k), "=") for k in keys if k.startswith(UNET)]

    def vae(keys):
        return [(k, *vae_name(k)) for k in keys if k.startswith(VAE)]

    return {
        "sd1": {"unet": unet(sd15), "vae": vae(sd15),
                "text_encoder": clip_rows(sd15, "cond_stage_model.transformer.")},
        "sd2": {"unet": unet(sd15), "vae": vae(sd15),
                "text_encoder": openclip_rows("cond_stage_model.model.", 23, projection=False)},
        "sdxl": {"unet": unet(sdxl), "vae": vae(sdxl),
                 "text_encoder": clip_rows(sdxl, "conditioner.embedders.0.transformer."),
                 "text_encoder_2": openclip_rows("conditioner.embedders.1.model.", 32, projection=True)},
    }


def main() -> None:
    for arch, comps in tables().items():
        for comp, rows in comps.items():
            p = MAPS / arch / f"{comp}.tsv"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(f"{a}\t{b}\t{t}\n" for a, b, t in sorted(rows)))
            print(p, len(rows))


if __name__ == "__main__":
    main()
