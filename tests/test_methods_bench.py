"""bench/methods_bench.py: its fine-tune builder, its PASS/FAIL checks, and a smoke run of the script."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lib_merge import synthetic as S

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("methods_bench", ROOT / "bench" / "methods_bench.py")
mb = importlib.util.module_from_spec(spec)
sys.modules["methods_bench"] = mb  # dataclasses look their module up
spec.loader.exec_module(mb)


def _header(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little"))


def test_finetune_is_base_plus_small_noise_with_the_same_layout(tmp_path, sd15_listing):
    base = S.write_checkpoint(tmp_path / "a.safetensors", sd15_listing, seed=1)
    mb.write_finetune(base, tmp_path / "f.safetensors", seed=7)
    assert _header(tmp_path / "f.safetensors") == _header(base)
    a, f = load_file(str(base)), load_file(str(tmp_path / "f.safetensors"))
    deltas = []
    for k, t in a.items():
        assert f[k].dtype == t.dtype and f[k].shape == t.shape
        if t.is_floating_point():
            deltas.append((f[k].float() - t.float()).reshape(-1))
        else:
            assert torch.equal(f[k], t)  # position_ids and other integers are untouched
    d = torch.cat(deltas)
    assert abs(d.std().item() - mb.NOISE) < 0.1 * mb.NOISE  # fp16 rounding of 0.05-sized values is ~3e-5
    assert abs(d.mean().item()) < 0.05 * mb.NOISE
    mb.write_finetune(base, tmp_path / "g.safetensors", seed=8)
    g = load_file(str(tmp_path / "g.safetensors"))
    k = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(f[k], g[k])  # each fine-tune has its own noise


def test_checks_compare_against_idle_and_weighted_sum():
    mib = mb.MB
    res = {"idle": {"peak_anon": 300 * mib, "inproc": 0.0}, "weighted_sum": {"peak_anon": 0, "inproc": 10.0},
           "ties": {"peak_anon": (300 + 1536) * mib, "inproc": 30.0}, "dare": {"peak_anon": 0, "inproc": 30.5}}
    lines = mb.checks(res)
    assert lines[0].startswith("PASS streaming") and "1536 MB over idle" in lines[0]
    assert lines[1].startswith("PASS speed: 4-model ties") and "3.00x" in lines[1]
    assert lines[2].startswith("FAIL speed: 4-model dare") and "3.05x" in lines[2]
    res["ties"]["peak_anon"] += mib
    assert mb.checks(res)[0].startswith("FAIL streaming")
    del res["dare"]
    assert mb.checks(res)[2] == "SKIP speed: needs the weighted_sum and dare cases"


def test_optional_cases_follow_the_registry(monkeypatch):
    from lib_merge.methods import METHODS
    assert [c.name for c in mb.optional_cases()] == [n for n in mb.OPTIONAL_METHODS if n in METHODS]
    monkeypatch.setitem(METHODS, "cosine_a", METHODS["slerp"])
    case = next(c for c in mb.optional_cases() if c.name == "cosine_a")
    assert (case.models, case.recipe["mode"], case.recipe["method"]) == (2, "weighted_sum", "cosine_a")


def test_quick_run_prints_the_table_and_checks(tmp_path):
    """The script end to end on the tiny layout (three subprocesses: idle, weighted_sum, ties)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "methods_bench.py"), "--quick", "--cases", "ties",
                        "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line[:1].isalpha()}
    assert rows["weighted_sum"][1] == "2" and rows["ties"][1] == "4" and rows["idle"][1] == "0"
    assert rows["weighted_sum"][4] == "1.00"  # the time baseline
    assert "slerp" not in rows  # --cases selects
    assert any(line.startswith(("PASS streaming", "FAIL streaming")) for line in r.stdout.splitlines())
    assert not (tmp_path / "mb_out.safetensors").exists()
    built = sorted(p.name for p in tmp_path.glob("mb_tiny_*.safetensors"))
    assert built == ["mb_tiny_A.safetensors", "mb_tiny_F1.safetensors", "mb_tiny_F2.safetensors",
                     "mb_tiny_F3.safetensors"]
