"""install.py (run by the WebUI's installer): adds what is missing, never moves the WebUI's numpy, and a failed
numba install leaves the extension working."""
import importlib.util
import runpy
import sys
import types
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parent.parent


def _run(monkeypatch, missing, fail=False):
    calls = []

    def run_pip(args, desc):
        calls.append(args)
        if fail and "numba" in args:
            raise RuntimeError("Couldn't install numba.\nCommand: ...")
    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(run_pip=run_pip))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    runpy.run_path(str(ROOT / "install.py"))
    return calls


def test_nothing_to_install(monkeypatch):
    assert _run(monkeypatch, missing=()) == []


def test_numba_is_installed_with_the_webui_numpy_pinned(monkeypatch):
    monkeypatch.delenv("BLOCKMERGE_NO_NUMBA", raising=False)
    calls = _run(monkeypatch, missing=("numba", "yaml"))
    assert calls == ["install pyyaml", f"install numba numpy=={numpy.__version__}"]


def test_a_failed_numba_install_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.delenv("BLOCKMERGE_NO_NUMBA", raising=False)
    _run(monkeypatch, missing=("numba",), fail=True)
    out = capsys.readouterr().out
    assert "numba was not installed (Couldn't install numba.)" in out and "use numpy" in out


def test_numba_can_be_skipped(monkeypatch):
    monkeypatch.setenv("BLOCKMERGE_NO_NUMBA", "1")
    assert _run(monkeypatch, missing=("numba",)) == []
