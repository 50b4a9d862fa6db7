"""Run by the WebUI's extension installer: torch, safetensors and numpy come with the WebUI; add what is missing."""
import importlib.util

try:
    import launch  # the WebUI's installer helpers
except ImportError:  # pragma: no cover - outside the WebUI
    launch = None

for module, package in (("yaml", "pyyaml"),):
    if importlib.util.find_spec(module) is None and launch is not None:
        launch.run_pip(f"install {package}", f"{package} for BlockMerge")
