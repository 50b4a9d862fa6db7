"""The loaded Forge (``backend/``) model as a :class:`lib_merge.live.LiveTarget`, by checkpoint file key.

Forge keeps the weights in ``sd_model.forge_objects``: the UNet at ``unet.model.diffusion_model`` (LDM names
without ``model.diffusion_model.``) and the text encoders in ``clip.cond_stage_model`` (``clip_l`` / ``clip_g``
/ ``clip_h``, transformers ``CLIPTextModel`` names). Forge converts OpenCLIP text encoders (SD2, SDXL's second)
to the transformers layout when it loads them: ``attn.in_proj_*`` becomes three ``q/k/v_proj`` parameters and
``text_projection`` is stored transposed. This target shows each of them under its file key, with the file's
shape: the three parameters become row slices of one tensor, the projection a transposed view of a tensor in the
file's layout (values unchanged), so a write through the file key's tensor is a write into the live model.

Parameters are looked up at every call: Forge's LoRA replaces ``Parameter`` objects, and on a GPU Forge moves
them. Forge's LoRA backups are folded back before reads (the parameters then hold A's values) and LoRA is made
to apply again at the next generation, on top of what was written. The VAE is never written live (as in A1111).
Forge loads its models under ``torch.inference_mode()``: writes go through :meth:`write_context`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import MergeError
from . import host

UNET = "model.diffusion_model."

# (file prefix, live prefix under clip.cond_stage_model, OpenCLIP layout) per model kind; first match wins
TEXT_ENCODERS: dict[str, list[tuple[str, str, bool]]] = {
    "sd1": [("cond_stage_model.transformer.text_model.", "clip_l.transformer.text_model.", False),
            ("cond_stage_model.transformer.", "clip_l.transformer.text_model.", False)],
    "sd2": [("cond_stage_model.model.", "clip_h.", True), ("conditioner.embedders.0.model.", "clip_h.", True)],
    "sdxl": [("conditioner.embedders.0.transformer.text_model.", "clip_l.transformer.text_model.", False),
             ("conditioner.embedders.1.model.", "clip_g.", True)],
}

_OPENCLIP_FIXED = {
    "positional_embedding": "transformer.text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "transformer.text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "transformer.text_model.final_layer_norm.weight",
    "ln_final.bias": "transformer.text_model.final_layer_norm.bias",
    "text_projection.weight": "transformer.text_projection.weight",
    "logit_scale": "logit_scale",
}
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


@dataclass(frozen=True)
class Slot:
    """Where one file key lives: ``root`` ("unet" / "clip"), its live parameter name(s) under the root (three
    for a split ``in_proj``, stacked along dim 0), and whether the live parameter is the file tensor transposed."""
    root: str
    names: tuple[str, ...]
    transposed: bool = False


def openclip_names(rest: str) -> tuple[tuple[str, ...], bool] | None:
    """An OpenCLIP key (after its prefix) -> (transformers names under the encoder, transposed), as Forge's loader
    (huggingface_guess ``clip_text_transformers_convert``) converts it; None for a key it does not load."""
    if rest in _OPENCLIP_FIXED:
        return (_OPENCLIP_FIXED[rest],), False
    if rest == "text_projection":
        return ("transformer.text_projection.weight",), True
    m = _IN_PROJ.match(rest)
    if m:
        i, what = m.groups()
        return tuple(f"transformer.text_model.encoder.layers.{i}.self_attn.{p}_proj.{what}" for p in "qkv"), False
    m = _RESBLOCK.match(rest)
    if m and m.group(2) in _OPENCLIP_BLOCK:
        i, part, what = m.groups()
        return (f"transformer.text_model.encoder.layers.{i}.{_OPENCLIP_BLOCK[part]}.{what}",), False
    return None


def slot_for(key: str, kind: str) -> Slot | None:
    """The live place of file key ``key`` in a Forge model of ``kind`` (sd1 / sd2 / sdxl), None when Forge
    keeps it nowhere we write (VAE, buffers, keys its loader drops)."""
    if key.startswith(UNET):
        return Slot("unet", (key[len(UNET):],))
    for file_prefix, live_prefix, openclip in TEXT_ENCODERS[kind]:
        if not key.startswith(file_prefix):
            continue
        rest = key[len(file_prefix):]
        if not openclip:
            return Slot("clip", (live_prefix + rest,))
        found = openclip_names(rest)
        if found is None:
            return None
        names, transposed = found
        return Slot("clip", tuple(live_prefix + n for n in names), transposed)
    return None


def file_float_keys(path: str) -> list[str]:
    from ..io.sources import open_source
    with open_source(path) as src:
        return [k for k, i in src.infos.items() if i.dtype.startswith(("F", "BF"))]


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


class ForgeTarget:
    def __init__(self, model, file_keys: Iterable[str] | None = None):
        kind = host.forge_kind(model)
        if kind is None:
            raise MergeError(f"the loaded Forge model ({type(model).__name__}) is not SD1, SD2 or SDXL")
        self.model = model
        self.kind = kind
        if file_keys is None:
            file_keys = file_float_keys(model.sd_checkpoint_info.filename)
        owners = {"unet": self._owners(self._root("unet")), "clip": self._owners(self._root("clip"))}
        self._slots: dict[str, Slot] = {}
        self._where: dict[str, list[tuple[torch.nn.Module, str]]] = {}
        claimed: dict[tuple[str, str], str] = {}
        for key in file_keys:
            slot = slot_for(key, kind)
            if slot is None or not all(n in owners[slot.root] for n in slot.names):
                continue  # a key Forge does not hold as a parameter (VAE, position_ids, …): never written live
            for n in slot.names:
                if (slot.root, n) in claimed:
                    raise MergeError(f"the loaded model's parameters do not map one-to-one onto file keys, {key} "
                                     f"and {claimed[(slot.root, n)]}")
                claimed[(slot.root, n)] = key
            self._slots[key] = slot
            self._where[key] = [owners[slot.root][n] for n in slot.names]
        if not self._slots:
            raise MergeError("the loaded model has no UNet/text-encoder parameters named as in its file")

    # -- where things are (looked up at use) ---------------------------------------------------------------
    def _objects(self):
        return getattr(self.model, "forge_objects_original", None) or self.model.forge_objects

    def _root(self, root: str) -> torch.nn.Module:
        fo = self._objects()
        return fo.unet.model.diffusion_model if root == "unet" else fo.clip.cond_stage_model

    def _loaders(self) -> list[tuple[torch.nn.Module, object]]:
        """(module the LoRA keys are relative to, its LoraLoader) for the UNet and the text encoders."""
        fo = self._objects()
        out = []
        for owner in (fo.unet.model, fo.clip.cond_stage_model):
            loader = getattr(owner, "lora_loader", None)
            if loader is not None:
                out.append((owner, loader))
        return out

    @staticmethod
    def _owners(root: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
        out = {}
        for mod_name, module in root.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                out[f"{mod_name}.{pname}" if mod_name else pname] = (module, pname)
        return out

    # -- LiveTarget ---------------------------------------------------------------------------------------
    def write_context(self):
        """Forge's parameters are inference tensors: they can be written only inside inference mode."""
        return torch.inference_mode()

    def params(self) -> dict[str, torch.Tensor]:
        return {k: self._tensor(k) for k in self._slots}

    def _tensor(self, key: str) -> torch.Tensor:
        where = self._where[key]
        slot = self._slots[key]
        if len(where) == 1:
            m, a = where[0]
            t = getattr(m, a)
            if not slot.transposed:
                return t
            if t.dim() == 2 and t.t().is_contiguous():
                return t.t()
            base = t.detach().t().contiguous()  # the file's layout; the live parameter becomes its transpose
            setattr(m, a, torch.nn.Parameter(base.t(), requires_grad=False))
            return base
        parts = [getattr(m, a) for m, a in where]
        joined = _joined(parts)
        if joined is not None:
            return joined
        base = torch.cat([p.detach() for p in parts])  # one tensor in the file's layout; the parameters its rows
        at = 0
        for (m, a), p in zip(where, parts):
            n = p.shape[0]
            setattr(m, a, torch.nn.Parameter(base[at:at + n], requires_grad=False))
            at += n
        return base

    def prepare(self, keys: Iterable[str]) -> None:
        """Fold Forge's LoRA backups back (every parameter holds A's values, or the live merge's), forget them,
        and make the LoRAs still wanted apply again at the next generation."""
        with torch.inference_mode():
            for owner, loader in self._loaders():
                backup = getattr(loader, "backup", None) or {}
                for name, saved in list(backup.items()):
                    parent, attr = _parent(owner, name)
                    cur = getattr(parent, attr)
                    if cur.shape == saved.shape and cur.dtype == saved.dtype:
                        cur.copy_(saved)  # in place: the live parameter stays where Forge put it (device)
                    else:
                        w = saved.to(cur.device)
                        setattr(parent, attr, w if isinstance(w, torch.nn.Parameter)
                                else torch.nn.Parameter(w, requires_grad=False))
                if backup:
                    loader.backup = {}
        self._lora_again()

    def _lora_again(self) -> None:
        """LoRA patches are merged when a patcher is loaded for sampling and the set of LoRAs changed; say that
        none is merged, and have the built-in LoRA build its patchers anew (a new patcher is loaded again)."""
        for _, loader in self._loaders():
            if not getattr(loader, "backup", None):
                loader.loaded_hash = str([])
        if hasattr(self.model, "current_lora_hash"):
            self.model.current_lora_hash = str([])

    def written(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._lora_again()
        if any(self._slots.get(k, Slot("unet", ())).root == "clip" for k in keys):
            host.clear_cond_caches(self.model)


def _parent(owner: torch.nn.Module, name: str) -> tuple[object, str]:
    parts = name.split(".")
    obj = owner
    for p in parts[:-1]:
        obj = getattr(obj, p)
    return obj, parts[-1]


def _joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over ``parts`` when they are consecutive rows of one storage (as this target leaves them)."""
    first = parts[0]
    at = first.storage_offset()
    for p in parts:
        if not p.is_contiguous() or p.dtype != first.dtype or p.device != first.device or p.dim() != first.dim() \
                or p.shape[1:] != first.shape[1:] or p.storage_offset() != at \
                or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        at += p.numel()
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    return torch.as_strided(first, shape, _contiguous_strides(shape), first.storage_offset())
