"""Shared fixtures: tiny checkpoints with the exact real key names of SD1.5 / SD2 / SDXL."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib_merge import synthetic as S


@pytest.fixture(autouse=True)
def _isolate(tmp_path_factory, monkeypatch):
    """Hash cache and user presets in a temp dir, never the developer's home."""
    base = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("BLOCKMERGE_CACHE", str(base / "cache"))
    monkeypatch.setenv("BLOCKMERGE_PRESETS", str(base / "user.tsv"))


@pytest.fixture(scope="session")
def sd15_listing():
    return S.tiny(S.load_listing("sd15"))


@pytest.fixture(scope="session")
def sdxl_listing():
    return S.tiny(S.load_listing("sdxl"))


@pytest.fixture(scope="session")
def models(tmp_path_factory, sd15_listing, sdxl_listing):
    """Paths of tiny checkpoints: sd15 a/b/c, sdxl a/b/c, sd2 a/b, inpainting, pix2pix."""
    d = tmp_path_factory.mktemp("models")
    out = {}
    for i, name in enumerate("abc"):
        out[f"sd15_{name}"] = S.write_checkpoint(d / f"sd15_{name}.safetensors", sd15_listing, seed=10 + i)
        out[f"sdxl_{name}"] = S.write_checkpoint(d / f"sdxl_{name}.safetensors", sdxl_listing, seed=20 + i)
    sd2 = S.as_sd2(sd15_listing)
    out["sd2_a"] = S.write_checkpoint(d / "sd2_a.safetensors", sd2, seed=30)
    out["sd2_b"] = S.write_checkpoint(d / "sd2_b.safetensors", sd2, seed=31)
    out["inpaint"] = S.write_checkpoint(d / "inpaint.safetensors", S.with_channels(sd15_listing, 9), seed=40)
    out["pix2pix"] = S.write_checkpoint(d / "pix2pix.safetensors", S.with_channels(sd15_listing, 8), seed=41)
    out["leftovers"] = S.write_checkpoint(d / "leftovers.safetensors", S.with_training_leftovers(sd15_listing), seed=42)
    out["leftovers_b"] = S.write_checkpoint(d / "leftovers_b.safetensors", S.with_training_leftovers(sd15_listing), seed=43)
    return out


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path


def load(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


STUB = Path(__file__).resolve().parent / "webui_stub"


@pytest.fixture
def webui_stub(tmp_path, models, monkeypatch):
    """The WebUI stand-in on sys.path (fresh ``modules``), with synthA/B/C checkpoints listed. Returns sd_models."""
    import shutil
    import sys
    monkeypatch.syspath_prepend(str(STUB))
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        monkeypatch.delitem(sys.modules, name)
    from modules import script_callbacks, sd_models
    ckdir = tmp_path / "models" / "Stable-diffusion"
    ckdir.mkdir(parents=True)
    for src, dst in (("sd15_a", "synthA"), ("sd15_b", "synthB"), ("sd15_c", "synthC")):
        shutil.copy(models[src], ckdir / f"{dst}.safetensors")
    monkeypatch.setattr(sd_models, "model_path", str(ckdir))
    sd_models.list_models()
    yield sd_models
    script_callbacks.clear_callbacks()


def install_xyz_stub(monkeypatch):
    """The stand-in's X/Y/Z script, loaded as the WebUI loads it (before extension scripts); returns its module."""
    import importlib.util
    from modules import scripts
    spec = importlib.util.spec_from_file_location("xyz_grid.py", STUB / "extra" / "xyz_grid.py")
    xyz_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(xyz_mod)
    xyz_mod.Script.__module__ = "xyz_grid.py"
    monkeypatch.setattr(scripts, "scripts_data", [scripts.ScriptClassData(xyz_mod.Script, "", "", xyz_mod)])
    return xyz_mod
