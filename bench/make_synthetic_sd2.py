"""Write a random-weight SD2.x checkpoint in the exact layout of a real one, from a synthetic SD1.5 file.

    python bench/make_synthetic_sd2.py --from synthA.safetensors --out synthSD2A.safetensors --seed 1

The SD1.5 file (the harness's ``make_synthetic_sd15.py``) gives the UNet and the VAE: SD2's UNet has the same
tensors but its transformers' ``proj_in`` / ``proj_out`` are linear (the 1x1 convolutions squeezed) and its
cross-attention reads a 1024-wide context (``attn2.to_k`` / ``to_v`` get new random 1024-wide weights). The text
encoder is a new random OpenCLIP ViT-H/14 text tower (``cond_stage_model.model.*``: 24 layers, width 1024, the
fused ``attn.in_proj_*``, ``text_projection``), scaled like a default PyTorch init, norms near 1. fp16, one
tensor at a time into a safetensors file. Enough for WebUIs to detect it as SD2 and render (noise) with it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WIDTH, LAYERS, VOCAB, CONTEXT, MLP = 1024, 24, 49408, 77, 4096


def openclip_text(gen: torch.Generator) -> dict[str, torch.Tensor]:
    p = "cond_stage_model.model."

    def lin(o, i):
        return (torch.rand(o, i, generator=gen) * 2 - 1) / i ** 0.5

    def vec(n, scale=0.02):
        return torch.randn(n, generator=gen) * scale

    def norm(n):
        return 1 + 0.1 * torch.randn(n, generator=gen)

    out = {p + "positional_embedding": torch.randn(CONTEXT, WIDTH, generator=gen) * 0.01,
           p + "token_embedding.weight": torch.randn(VOCAB, WIDTH, generator=gen) * 0.02,
           p + "ln_final.weight": norm(WIDTH), p + "ln_final.bias": vec(WIDTH, 0.1),
           p + "text_projection": lin(WIDTH, WIDTH), p + "logit_scale": torch.tensor(4.6052)}
    for i in range(LAYERS):
        r = f"{p}transformer.resblocks.{i}."
        out.update({r + "ln_1.weight": norm(WIDTH), r + "ln_1.bias": vec(WIDTH, 0.1),
                    r + "attn.in_proj_weight": lin(3 * WIDTH, WIDTH), r + "attn.in_proj_bias": vec(3 * WIDTH),
                    r + "attn.out_proj.weight": lin(WIDTH, WIDTH), r + "attn.out_proj.bias": vec(WIDTH),
                    r + "ln_2.weight": norm(WIDTH), r + "ln_2.bias": vec(WIDTH, 0.1),
                    r + "mlp.c_fc.weight": lin(MLP, WIDTH), r + "mlp.c_fc.bias": vec(MLP),
                    r + "mlp.c_proj.weight": lin(WIDTH, MLP), r + "mlp.c_proj.bias": vec(WIDTH)})
    return out


def convert(src: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in src.items():
        if k.startswith("cond_stage_model."):
            continue  # SD1's CLIP-L: replaced by OpenCLIP-H below
        if k.startswith("model.diffusion_model.") and k.endswith(("proj_in.weight", "proj_out.weight")) \
                and v.dim() == 4:
            v = v[:, :, 0, 0].contiguous()  # SD2: linear projections in the transformers
        elif k.startswith("model.diffusion_model.") and k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            v = (torch.rand(v.shape[0], WIDTH, generator=gen) * 2 - 1) / WIDTH ** 0.5
        out[k] = v
    out.update(openclip_text(gen))
    return {k: (t.half() if t.is_floating_point() else t).contiguous() for k, t in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="src", required=True, help="a synthetic SD1.5 checkpoint (.safetensors)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from safetensors.torch import load_file, save_file
    gen = torch.Generator().manual_seed(args.seed)
    tensors = convert(load_file(args.src), gen)
    save_file(tensors, args.out, metadata={"format": "pt"})
    n = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.out}: {len(tensors)} tensors, {n / 1e6:.0f} M elements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
