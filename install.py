"""Run by the WebUI's extension installer: torch, safetensors and numpy come with the WebUI; add what is missing.

numba is optional (TIES and DARE run about 2x faster with it, same numbers): it is installed with the WebUI's numpy
pinned, so pip either finds a numba for that numpy or changes nothing; a failure only leaves the numpy path.
``BLOCKMERGE_NO_NUMBA=1`` skips it."""
import importlib.util
import os

try:
    import launch  # the WebUI's installer helpers
except ImportError:  # pragma: no cover - outside the WebUI
    launch = None


def install(launch) -> None:
    for module, package in (("yaml", "pyyaml"),):
        if importlib.util.find_spec(module) is None:
            launch.run_pip(f"install {package}", f"{package} for BlockMerge")
    if importlib.util.find_spec("numba") is None and not os.environ.get("BLOCKMERGE_NO_NUMBA"):
        import numpy
        try:
            launch.run_pip(f"install numba numpy=={numpy.__version__}", "numba for BlockMerge (faster TIES and DARE)")
        except Exception as e:  # the WebUI's run_pip raises RuntimeError with pip's output
            print(f"BlockMerge: numba was not installed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                  "TIES and DARE use numpy (same results, slower)")


if launch is not None:
    install(launch)
