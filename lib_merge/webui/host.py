"""Access to the WebUI: the loaded model, the checkpoint list, settings, locks. Imports ``modules`` lazily."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MergeError

OPT_CACHE_DEVICE = "blockmerge_cache_device"
OPT_DEFAULT_DTYPE = "blockmerge_default_dtype"


def _m(name: str):
    import importlib
    return importlib.import_module(f"modules.{name}")


def opts():
    return _m("shared").opts


def opt(key: str, default):
    return opts().data.get(key, default)


def state():
    return _m("shared").state


def interrupted() -> bool:
    st = state()
    return bool(getattr(st, "interrupted", False) or getattr(st, "stopping_generation", False))


def queue_lock():
    return _m("call_queue").queue_lock


def loaded_model():
    """The loaded model, or None; never loads one."""
    return _m("sd_models").model_data.sd_model


def is_forge() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


def is_forge_model(model) -> bool:
    """A Forge (``backend/``) model object: its weights live in ``forge_objects``, not ``model.model``."""
    return model is not None and hasattr(model, "forge_objects")


# Forge engines (``backend/diffusion_engine``) the live merge maps, by class name, with the kind of each
FORGE_ENGINES = {"StableDiffusion": "sd1", "StableDiffusion2": "sd2", "StableDiffusionXL": "sdxl"}
FORGE_CONFIGS = {"SD15", "SD20", "SDXL"}  # huggingface_guess model configs (SSD-1B, unCLIP, refiners: not these)
FORGE_NAMES = {"Flux": "Flux", "Chroma": "Chroma", "StableDiffusion3": "SD3", "StableDiffusionXLRefiner": "SDXL refiner"}


@dataclass(frozen=True)
class Capabilities:
    """What this host and its loaded model support, with the reason when something is refused."""
    host: str  # "a1111" or "forge"
    live: bool  # Test merge, Restore, X/Y/Z axes, fingerprint
    reason: str | None  # why there is no live merge (None when there is)
    save: bool  # Save writes the live merge, so it needs one
    file_merge: bool = True  # Merge to file needs no loaded model, on every host
    kind: str | None = None  # sd1 / sd2 / sdxl when live


def capabilities(model) -> Capabilities:
    name = "forge" if is_forge() else "a1111"
    reason = _forge_reason(model) if name == "forge" else _a1111_reason(model)
    kind = None
    if reason is None:
        kind = forge_kind(model) if name == "forge" else (
            "sdxl" if getattr(model, "is_sdxl", False) else "sd2" if getattr(model, "is_sd2", False) else "sd1")
    return Capabilities(host=name, live=reason is None, reason=reason, save=reason is None, kind=kind)


def unsupported_reason(model) -> str | None:
    """Why a live merge cannot run on this host/model, as a message for the user (None when it can)."""
    return capabilities(model).reason


def forge_kind(model) -> str | None:
    return FORGE_ENGINES.get(type(model).__name__)


def _forge_reason(model) -> str | None:
    if not is_forge_model(model):
        if model is not None and hasattr(model, "model") and getattr(model, "sd_checkpoint_info", None) is not None:
            return ("the live test merge is not supported on reForge / Forge Classic (A1111-style models on the "
                    "ldm_patched backend), so neither is Save (it saves the live test merge); Merge to file works")
        return ("no model is loaded yet; Forge loads the selected checkpoint at the first generation, Test merge or "
                "Preview")
    engine = type(model).__name__
    config = type(getattr(model, "model_config", None)).__name__
    if engine not in FORGE_ENGINES or getattr(model, "is_sd3", False) or (
            getattr(model, "model_config", None) is not None and config not in FORGE_CONFIGS):
        what = FORGE_NAMES.get(engine) or (config if config != "NoneType" else engine)
        return (f"{what} models are not supported by the live test merge (no block map yet: SD1, SD2 and SDXL "
                f"are), so neither is Save; Merge to file works for SD1/SD2/SDXL files")
    params = getattr(_m("sd_models").model_data, "forge_loading_parameters", None) or {}
    if params.get("unet_storage_dtype") is not None:
        return ("the loaded model stores its UNet in a reduced dtype (Diffusion in Low Bits); set it to "
                "Automatic to test merges live")
    if getattr(model, "sd_checkpoint_info", None) is None:
        return "the loaded model has no checkpoint file"
    return None


def _a1111_reason(model) -> str | None:
    if model is None:
        return "no model is loaded; load a checkpoint first"
    if getattr(_m("devices"), "fp8", False):
        return "the loaded model uses FP8 weight storage; turn off 'FP8 weight' in Settings to test merges live"
    try:
        if getattr(_m("sd_unet"), "current_unet", None) is not None:
            return "a custom UNet (e.g. TensorRT) is active; set 'SD Unet' to None to test merges live"
    except ImportError:
        pass
    for flag, what in (("is_sd3", "SD3"), ("is_ssd", "SSD-1B")):
        if getattr(model, flag, False):
            return f"{what} models are not supported by the live test merge"
    if getattr(model, "sd_checkpoint_info", None) is None:
        return "the loaded model has no checkpoint file"
    return None


def make_target(model):
    """The live target of ``model``: Forge's (``forge_objects``) or A1111's (``model.model``)."""
    if is_forge_model(model):
        from .forge_target import ForgeTarget
        return ForgeTarget(model)
    from .target import WebUITarget
    return WebUITarget(model)


def ensure_model_loaded():
    """The loaded model. Forge loads lazily, at the next generation, whatever checkpoint is selected: load it now
    (nothing happens when it is loaded already), so a test merge applies to the checkpoint the user sees selected.
    The caller holds ``queue_lock`` (Forge's loader must not run beside a generation)."""
    model = loaded_model()
    if not is_forge():
        return model
    sdm = _m("sd_models")
    if not getattr(sdm.model_data, "forge_loading_parameters", None) or not hasattr(sdm, "forge_model_reload"):
        return model
    try:
        sdm.forge_model_reload()
    except Exception as e:  # no checkpoint, unreadable file…: say so instead of a traceback
        raise MergeError(f"could not load the selected checkpoint: {e}") from None
    return loaded_model()


def selected_checkpoint() -> str | None:
    """Forge: the checkpoint the next generation loads (the title), while none is loaded yet."""
    params = getattr(_m("sd_models").model_data, "forge_loading_parameters", None) or {}
    info = params.get("checkpoint_info")
    return getattr(info, "title", None)


def models_dir() -> Path:
    sdm = _m("sd_models")
    ckpt_dir = getattr(_m("shared").cmd_opts, "ckpt_dir", None)
    return Path(ckpt_dir or sdm.model_path)


def checkpoint_by_name(name: str, field: str = "model"):
    """Exact checkpoint alias (title, name, model name, hash…) -> CheckpointInfo. Never a path."""
    if not isinstance(name, str) or not name.strip():
        raise MergeError(f"missing checkpoint name, {field}")
    info = _m("sd_models").checkpoint_aliases.get(name)
    if info is None:
        raise MergeError(f"unknown checkpoint {name!r} (use a name from the checkpoint list), {field}")
    return info


def checkpoint_titles() -> list[str]:
    return sorted(_m("sd_models").checkpoints_list)


def refresh_checkpoints() -> None:
    _m("sd_models").list_models()


def clear_cond_caches(model) -> None:
    """After a text-encoder write: stale conditioning must not be reused (lists cleared in place)."""
    proc = _m("processing")
    for cls_name, attrs in (("StableDiffusionProcessing", ("cached_c", "cached_uc")),
                            ("StableDiffusionProcessingTxt2Img", ("cached_hr_c", "cached_hr_uc"))):
        cls = getattr(proc, cls_name, None)
        for a in attrs:
            lst = getattr(cls, a, None) if cls is not None else None
            if isinstance(lst, list):
                lst[:] = [None] * len(lst)
    sdm = _m("sd_models")
    if hasattr(sdm, "get_empty_cond") and model is not None and hasattr(model, "cond_stage_model_empty_prompt"):
        model.cond_stage_model_empty_prompt = sdm.get_empty_cond(model)


def lora_dir() -> Path:
    """The WebUI's LoRA folder: ``--lora-dir`` (added by the built-in Lora extension), else ``models/Lora``."""
    d = getattr(_m("shared").cmd_opts, "lora_dir", None)
    if d:
        return Path(d)
    return Path(_m("sd_models").model_path).parent / "Lora"


def refresh_loras() -> bool:
    """Re-read the LoRA folder into the built-in Lora extension's list (its ``networks`` module, imported by the
    extension's scripts under that top-level name), so a new file shows in the Lora tab and in ``<lora:…>`` without
    a restart. False when the extension is not loaded (disabled, or a host without it)."""
    import sys
    networks = sys.modules.get("networks")
    fn = getattr(networks, "list_available_networks", None)
    if fn is None:
        return False
    fn()
    return True


def seed_hash_cache(path: Path, name: str, sha256: str) -> None:
    """Tell the WebUI the new file's sha256 so it does not hash it again."""
    try:
        cache = _m("cache").cache("hashes")
        cache[f"checkpoint/{name}"] = {"mtime": os.path.getmtime(path), "sha256": sha256}
    except Exception:  # the cache is an optimisation only
        pass
