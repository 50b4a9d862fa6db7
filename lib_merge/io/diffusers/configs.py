"""Component configs for a written diffusers folder: copied from a diffusers input when there is one, else the
project's own SD1.5 / SD2.x / SDXL configs (``configs/<arch>/``) with the sizes read from the weights.

What the project cannot ship: the tokenizers' vocabularies (``tokenizer/``, ``tokenizer_2/``); see
:data:`NOT_SHIPPED`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

from ...errors import MergeError

CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_NAME = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".h5", ".index.json")
NOT_SHIPPED = {"sd1": ("tokenizer",), "sd2": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}
Shapes = Mapping[str, tuple[int, ...]]


def _count(shapes: Shapes, prefix: str) -> int:
    seen = {k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)}
    return len([s for s in seen if s.isdigit()])


def sizes_from_weights(component: str, shapes: Shapes) -> dict:
    """The config fields that the weights themselves decide (channel counts, widths, layer counts); a field
    whose tensor is absent keeps the shipped value."""
    def dim(key: str, i: int) -> int | None:
        shape = shapes.get(key)
        return shape[i] if shape is not None and len(shape) > i else None

    def levels(prefix: str) -> list[int | None]:
        return [dim(f"{prefix}{i}.resnets.0.conv1.weight", 0) for i in range(_count(shapes, prefix))]

    if component == "unet":
        ctx = [v[1] for k, v in sorted(shapes.items()) if k.endswith("attn2.to_k.weight")]
        out = {"in_channels": dim("conv_in.weight", 1), "out_channels": dim("conv_out.weight", 0),
               "block_out_channels": levels("down_blocks."), "cross_attention_dim": ctx[0] if ctx else None,
               "projection_class_embeddings_input_dim": dim("add_embedding.linear_1.weight", 1)}
    elif component == "vae":
        out = {"block_out_channels": levels("encoder.down_blocks."), "in_channels": dim("encoder.conv_in.weight", 1),
               "out_channels": dim("decoder.conv_out.weight", 0), "latent_channels": dim("decoder.conv_in.weight", 1)}
    else:
        layers = _count(shapes, "text_model.encoder.layers.")
        out = {"hidden_size": dim("text_model.final_layer_norm.weight", 0),
               "intermediate_size": dim("text_model.encoder.layers.0.mlp.fc1.weight", 0),
               "vocab_size": dim("text_model.embeddings.token_embedding.weight", 0),
               "max_position_embeddings": dim("text_model.embeddings.position_embedding.weight", 0),
               "num_hidden_layers": layers or None, "projection_dim": dim("text_projection.weight", 0)}
    return {k: v for k, v in out.items() if v is not None and v != [] and None not in (v if isinstance(v, list) else [])}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MergeError(f"cannot read {path.name} ({e.__class__.__name__}), {path}") from None
    if not isinstance(data, dict):
        raise MergeError(f"cannot read {path.name} (not a JSON object), {path}")
    return data


def component_config(arch: str, component: str, shapes: Shapes, template: Path | None,
                     override: Mapping | None = None) -> dict:
    """``template/component/config.json`` as it is (a diffusers input's own), else the shipped config with the
    sizes of the weights; ``override`` (tests: small configs) is applied last."""
    src = template / component / CONFIG_NAME if template is not None else None
    if src is not None and src.is_file():
        cfg = _read_json(src)
    else:
        cfg = json.loads((CONFIGS / arch / component / CONFIG_NAME).read_text())
        cfg.update(sizes_from_weights(component, shapes))
    cfg.update(override or {})
    return cfg


def _is_weight(p: Path) -> bool:
    return p.name.endswith(WEIGHT_SUFFIXES)


def copy_support_files(arch: str, folder: Path, written: tuple[str, ...], template: Path | None) -> list[str]:
    """Everything but weights and the written components' configs: from ``template`` (a diffusers input) when
    given, else the shipped ``model_index.json`` and scheduler. Returns notes for the user."""
    notes = []
    if template is None:
        shutil.copyfile(CONFIGS / arch / "model_index.json", folder / "model_index.json")
        (folder / "scheduler").mkdir()
        shutil.copyfile(CONFIGS / arch / "scheduler" / "scheduler_config.json",
                        folder / "scheduler" / "scheduler_config.json")
        missing = ", ".join(f"{t}/" for t in NOT_SHIPPED[arch])
        notes.append(f"diffusers folder: add {missing} (vocab.json, merges.txt, tokenizer_config.json, "
                     f"special_tokens_map.json) from the base model's diffusers release; BlockMerge does not ship them")
        if arch == "sd2":
            notes.append("diffusers folder: scheduler set for SD 2.x 768-v (prediction_type v_prediction); "
                         "for a 512-base model set it to epsilon in scheduler/scheduler_config.json")
        return notes
    index_path = template / "model_index.json"
    index = _read_json(index_path) if index_path.is_file() else None
    for entry in sorted(template.iterdir()):
        if entry.is_file() and not _is_weight(entry) and entry.name != "model_index.json":
            shutil.copyfile(entry, folder / entry.name)
        elif entry.is_dir() and entry.name not in written:
            files = [p for p in entry.rglob("*") if p.is_file()]
            if any(_is_weight(p) for p in files):  # e.g. safety_checker: weights BlockMerge does not merge
                notes.append(f"diffusers folder: {entry.name}/ not copied (weights that are not merged)")
                if index is not None and entry.name in index:
                    index[entry.name] = [None, None]
                continue
            shutil.copytree(entry, folder / entry.name, symlinks=False)
        elif entry.is_dir():
            for p in entry.iterdir():
                if p.is_file() and not _is_weight(p) and p.name != CONFIG_NAME:
                    shutil.copyfile(p, folder / entry.name / p.name)
    if index is not None:
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return notes
