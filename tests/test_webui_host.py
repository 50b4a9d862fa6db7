"""The host seam: what the host and its loaded model support (``host.capabilities``) and which live target a
model gets (``host.make_target``), against the A1111 stand-in (tests/webui_stub) with Forge faked where needed."""
import types

import pytest


@pytest.fixture
def a1111(webui_stub, monkeypatch):
    from modules import sd_models
    from lib_merge.webui import service as service_mod
    svc = service_mod.Service()
    monkeypatch.setattr(service_mod, "SERVICE", svc)
    model = sd_models.load_model(sd_models.checkpoint_aliases["synthA"])
    return {"svc": svc, "model": model, "sd_models": sd_models}


def test_a1111_model_is_live_with_the_a1111_target(a1111):
    from lib_merge.webui import host
    from lib_merge.webui.target import WebUITarget
    caps = host.capabilities(a1111["model"])
    assert caps == host.Capabilities(host="a1111", live=True, reason=None, save=True, kind="sd1")
    assert type(host.make_target(a1111["model"])) is WebUITarget
    assert host.unsupported_reason(a1111["model"]) is None


def test_a1111_refusals_keep_their_messages(a1111, monkeypatch):
    from lib_merge.webui import host
    from modules import devices
    assert host.capabilities(None).reason == "no model is loaded; load a checkpoint first"
    monkeypatch.setattr(devices, "fp8", True, raising=False)
    caps = host.capabilities(a1111["model"])
    assert not caps.live and not caps.save and caps.file_merge and "FP8 weight" in caps.reason


def test_reforge_style_model_is_refused_and_save_too(a1111, monkeypatch):
    """A Forge-family host whose model is A1111's object (reForge, Classic): a true message, Save refused."""
    from lib_merge.webui import host
    from lib_merge.webui.service import Conflict, Unsupported
    monkeypatch.setattr(host, "is_forge", lambda: True)
    caps = host.capabilities(a1111["model"])
    assert caps.host == "forge" and not caps.live and not caps.save and caps.file_merge
    assert caps.reason.startswith("the live test merge is not supported on reForge / Forge Classic")
    assert "so neither is Save" in caps.reason and caps.reason.endswith("Merge to file works")
    with pytest.raises(Unsupported, match="not supported on reForge / Forge Classic"):
        a1111["svc"].test_merge({"model_b": "synthB"})
    with pytest.raises(Conflict, match="no test merge is live: run Test merge first"):
        a1111["svc"].save("out")


def _engine(name: str, config: str | None = None, **flags):
    """A Forge-like model object of engine class ``name`` (the checks read class names and flags only)."""
    cls = type(name, (), {})
    m = cls()
    m.forge_objects = types.SimpleNamespace()
    m.sd_checkpoint_info = types.SimpleNamespace(filename="x.safetensors", title="x")
    if config:
        m.model_config = type(config, (), {})()
    for k, v in flags.items():
        setattr(m, k, v)
    return m


@pytest.mark.parametrize("engine,config,what", [
    ("Flux", "Flux", "Flux"), ("StableDiffusion3", "SD3", "SD3"), ("Chroma", "Chroma", "Chroma"),
    ("StableDiffusionXLRefiner", "SDXLRefiner", "SDXL refiner"), ("StableDiffusionXL", "SSD1B", "SSD1B"),
    ("StableDiffusion2", "SD21UnclipH", "SD21UnclipH")])
def test_forge_engines_without_block_maps_are_refused_by_name(a1111, monkeypatch, engine, config, what):
    from lib_merge.webui import host
    monkeypatch.setattr(host, "is_forge", lambda: True)
    caps = host.capabilities(_engine(engine, config, is_sd3=engine == "StableDiffusion3"))
    assert not caps.live and not caps.save and caps.file_merge
    assert caps.reason.startswith(f"{what} models are not supported by the live test merge")
    assert "Merge to file works" in caps.reason


@pytest.mark.parametrize("engine,config,kind", [("StableDiffusion", "SD15", "sd1"), ("StableDiffusion2", "SD20", "sd2"),
                                                ("StableDiffusionXL", "SDXL", "sdxl")])
def test_forge_sd_engines_are_live(a1111, monkeypatch, engine, config, kind):
    from lib_merge.webui import host
    monkeypatch.setattr(host, "is_forge", lambda: True)
    caps = host.capabilities(_engine(engine, config))
    assert caps == host.Capabilities(host="forge", live=True, reason=None, save=True, kind=kind)


def test_forge_low_bits_unet_is_refused(a1111, monkeypatch):
    import torch
    from lib_merge.webui import host
    monkeypatch.setattr(host, "is_forge", lambda: True)
    monkeypatch.setattr(a1111["sd_models"].model_data, "forge_loading_parameters",
                        {"checkpoint_info": None, "unet_storage_dtype": torch.float8_e4m3fn}, raising=False)
    caps = host.capabilities(_engine("StableDiffusion", "SD15"))
    assert not caps.live and "Diffusion in Low Bits" in caps.reason


def test_forge_without_a_loaded_model(a1111, monkeypatch):
    from lib_merge.webui import host
    monkeypatch.setattr(host, "is_forge", lambda: True)
    fake_initial = type("FakeInitialModel", (), {})()
    assert host.capabilities(fake_initial).reason.startswith("no model is loaded")
