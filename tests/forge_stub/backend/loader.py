"""Forge's loader (``backend/loader.py`` + huggingface_guess ``process_clip_state_dict``), as it treats a file:
the UNet without ``model.diffusion_model.``, text encoders renamed to transformers' CLIP layout (OpenCLIP's
``attn.in_proj_*`` split into q/k/v rows, ``text_projection`` transposed), everything cast to fp32 (as with
``--all-in-fp32 --clip-in-fp32``) and loaded under ``torch.inference_mode()``; transformers' CLIP also has a
``logit_scale`` no SD1 file holds."""
import torch

from backend import diffusion_engine as E

OPENCLIP_FIXED = {"positional_embedding": "embeddings.position_embedding.weight",
                  "token_embedding.weight": "embeddings.token_embedding.weight",
                  "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
OPENCLIP_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj"}


def openclip_to_transformers(sd, prefix):
    """OpenCLIP names (after the file prefix) -> ``<prefix>transformer.…`` names, the way Forge converts them."""
    out = {}
    for k, v in sd.items():
        if k in OPENCLIP_FIXED:
            out[f"{prefix}transformer.text_model.{OPENCLIP_FIXED[k]}"] = v
        elif k == "text_projection":
            out[f"{prefix}transformer.text_projection.weight"] = v.transpose(0, 1).contiguous()
        elif k == "logit_scale":
            out[f"{prefix}logit_scale"] = v
        elif k.startswith("transformer.resblocks."):
            i, rest = k[len("transformer.resblocks."):].split(".", 1)
            layer = f"{prefix}transformer.text_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                what = rest[len("attn.in_proj_"):]
                n = v.shape[0] // 3
                for j, p in enumerate("qkv"):
                    out[f"{layer}self_attn.{p}_proj.{what}"] = v[j * n:(j + 1) * n]
            else:
                part, what = rest.rsplit(".", 1)
                out[f"{layer}{OPENCLIP_PARTS[part]}.{what}"] = v
    return out


def split(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def tree(named):
    root = torch.nn.Module()
    for name, t in named.items():
        parts = name.split(".")
        mod = root
        for p in parts[:-1]:
            if p not in mod._modules:
                mod.add_module(p, torch.nn.Module())
            mod = mod._modules[p]
        mod.register_parameter(parts[-1], torch.nn.Parameter(t.to(torch.float32).clone(), requires_grad=False))
    return root


@torch.inference_mode()
def forge_loader(path):
    from safetensors.torch import load_file
    sd = {k: v for k, v in load_file(str(path)).items() if v.is_floating_point()}
    unet = tree(split(sd, "model.diffusion_model."))
    vae = tree(split(sd, "first_stage_model."))
    if any(k.startswith("conditioner.") for k in sd):
        engine = E.StableDiffusionXL
        te = {"clip_l": tree({"transformer.text_model." + k: v for k, v in
                              split(sd, "conditioner.embedders.0.transformer.text_model.").items()}),
              "clip_g": tree(split(openclip_to_transformers(split(sd, "conditioner.embedders.1.model."), "g."), "g."))}
    elif any(k.startswith("cond_stage_model.model.") for k in sd):
        engine = E.StableDiffusion2
        te = {"clip_h": tree(split(openclip_to_transformers(split(sd, "cond_stage_model.model."), "h."), "h."))}
    else:
        engine = E.StableDiffusion
        names = {"transformer.text_model." + k: v for k, v in split(sd, "cond_stage_model.transformer.text_model.").items()}
        names["logit_scale"] = torch.tensor(4.6055)
        te = {"clip_l": tree(names)}
    return engine(unet, te, vae)
