"""The loaded WebUI model as a :class:`lib_merge.live.LiveTarget`.

Written live: only parameters (never buffers) of ``model.diffusion_model`` and the text encoder(s); never the
VAE. Names come from ``named_parameters()`` with the hijack's ``wrapped`` segments dropped; on SDXL the
``conditioner.*`` names (not the ``cond_stage_model.*`` alias). The built-in LoRA's backups are folded back
before any read and cleared after every write, so it cannot silently undo a merge.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from ..errors import MergeError
from . import host

LORA_ATTRS = ("network_current_names", "network_weights_backup", "network_bias_backup")


def file_key(name: str) -> str:
    return ".".join(s for s in name.split(".") if s != "wrapped")


def te_prefix(model) -> str:
    return "conditioner." if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner") else "cond_stage_model."


class WebUITarget:
    def __init__(self, model):
        self.model = model
        self.prefixes = ("model.diffusion_model.", te_prefix(model))
        self._owners: dict[str, tuple[torch.nn.Module, str, list[torch.nn.Module]]] = {}
        roots = [("model.diffusion_model", model.model.diffusion_model)]
        te_name = self.prefixes[1].rstrip(".")
        roots.append((te_name, getattr(model, te_name)))
        for root_name, root in roots:
            for mod_name, module in root.named_modules(prefix=root_name):
                for pname, _ in module.named_parameters(recurse=False):
                    key = file_key(f"{mod_name}.{pname}")
                    if key in self._owners:
                        if self._owners[key][0] is module:
                            continue
                        raise MergeError(f"the loaded model's parameters do not map one-to-one onto file keys, {key}")
                    self._owners[key] = (module, pname, self._parents(model, mod_name))
        if not self._owners:
            raise MergeError("the loaded model has no UNet/text-encoder parameters")

    @staticmethod
    def _parents(model, mod_name: str) -> list[torch.nn.Module]:
        out = []
        parts = mod_name.split(".") if mod_name else []
        for i in range(len(parts) - 1, 0, -1):
            try:
                out.append(model.get_submodule(".".join(parts[:i])))
            except AttributeError:
                break
            if len(out) == 1:
                break  # the direct parent (MultiheadAttention owns out_proj's backup)
        return out

    def write_context(self):
        """A1111's parameters are ordinary tensors: writes need no context (they run under ``no_grad``)."""
        return contextlib.nullcontext()

    def params(self) -> dict[str, torch.Tensor]:
        # looked up at call time: under --lowvram/--medvram the .data moves between devices
        return {k: getattr(m, p) for k, (m, p, _) in self._owners.items()}

    def _modules(self, keys: Iterable[str]) -> list[torch.nn.Module]:
        out, seen = [], set()
        for k in keys:
            ent = self._owners.get(k)
            if ent is None:
                continue
            for m in (ent[0], *ent[2]):
                if id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
        return out

    def prepare(self, keys: Iterable[str]) -> None:
        """Fold LoRA backups back into the weights (so params hold A's values), then forget them."""
        with torch.no_grad():
            for m in self._modules(keys):
                wb = getattr(m, "network_weights_backup", None)
                bb = getattr(m, "network_bias_backup", None)
                if wb is None and bb is None:
                    continue
                if isinstance(m, torch.nn.MultiheadAttention):
                    if wb is not None:
                        m.in_proj_weight.copy_(wb[0])
                        m.out_proj.weight.copy_(wb[1])
                    if bb is not None and m.out_proj.bias is not None:
                        m.out_proj.bias.copy_(bb)
                else:
                    if wb is not None and getattr(m, "weight", None) is not None:
                        m.weight.copy_(wb)
                    if bb is not None and getattr(m, "bias", None) is not None:
                        m.bias.copy_(bb)
                self._clear(m)

    @staticmethod
    def _clear(m: torch.nn.Module) -> None:
        if hasattr(m, "network_current_names"):
            m.network_current_names = ()
        if hasattr(m, "network_weights_backup"):
            m.network_weights_backup = None
        if hasattr(m, "network_bias_backup"):
            m.network_bias_backup = None

    def written(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for m in self._modules(keys):
            self._clear(m)
        if any(not k.startswith("model.diffusion_model.") for k in keys):
            host.clear_cond_caches(self.model)
