"""bench/lora_bench.py: its low-rank fine-tune, case selection, PASS/FAIL checks, and a smoke run of the script."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("lora_bench", ROOT / "bench" / "lora_bench.py")
lb = importlib.util.module_from_spec(spec)
sys.modules["lora_bench"] = lb  # dataclasses look their module up
spec.loader.exec_module(lb)


def test_lowrank_change_has_rank_8_and_the_given_spread_on_attention_weights_only():
    gen = torch.Generator().manual_seed(0)
    t = torch.zeros(96, 64)
    lb.add_lowrank("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", t, gen)
    assert torch.linalg.matrix_rank(t).item() == lb.LOWRANK
    assert abs(t.std().item() - lb.LOWRANK_STD) < 0.25 * lb.LOWRANK_STD
    small = torch.zeros(3, 768)
    lb.add_lowrank("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight", small, gen)
    assert torch.linalg.matrix_rank(small).item() == 3  # capped by the smaller side
    for key, shape in (("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight", (8, 8)),
                       ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias", (8,)),
                       ("first_stage_model.decoder.mid.attn_1.q.weight", (8, 8, 1, 1))):
        z = torch.zeros(shape)
        lb.add_lowrank(key, z, gen)
        assert not torch.any(z), key


def test_tuned_is_base_plus_noise_plus_lowrank_on_attention(tmp_path):
    base, tuned = lb.build_lora_inputs(tmp_path, quick=True)
    assert (base.name, tuned.name) == ("mb_tiny_A.safetensors", "lb_tiny_T.safetensors")
    a, t = load_file(str(base)), load_file(str(tuned))
    attn, other = [], []
    for k, v in a.items():
        if not v.is_floating_point():
            assert torch.equal(t[k], v)
            continue
        d = (t[k].float() - v.float()).reshape(-1)
        (attn if v.dim() == 2 and "attn" in k and k.endswith(".weight") else other).append(d)
    attn_std, other_std = torch.cat(attn).std().item(), torch.cat(other).std().item()
    assert abs(other_std - lb.NOISE) < 0.1 * lb.NOISE
    want = (lb.NOISE ** 2 + lb.LOWRANK_STD ** 2) ** 0.5
    assert abs(attn_std - want) < 0.15 * want
    mtime = tuned.stat().st_mtime_ns
    assert lb.build_lora_inputs(tmp_path, quick=True)[1].stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_select_adds_baselines_and_the_extracts_a_case_reads():
    assert [c.name for c in lb.select({"bake"})] == ["idle", "weighted_sum", "extract_r32", "bake"]
    assert [c.name for c in lb.select({"lora_merge_r32"})] == ["idle", "weighted_sum", "extract_r32",
                                                                "extract_r32_exact", "lora_merge_r32"]


def _report(errs: dict[str, float], method: str) -> dict:
    return {"modules": [{"name": n, "rel_error": e, "method": method} for n, e in errs.items()]}


def test_checks_compare_randomized_with_exact_and_bake_with_weighted_sum():
    exact = {"m1": 0.6, "m2": 0.2}
    fast = {"m1": 0.603, "m2": 0.2018}  # m1 +0.5 %, m2 +0.9 %: mean 0.4024 = +0.6 %
    res = {"extract_r32": {"report": _report(fast, "lowrank"), "inproc": 5.0},
           "extract_r32_exact": {"report": _report(exact, "exact"), "inproc": 9.0},
           "weighted_sum": {"inproc": 10.0}, "bake": {"inproc": 15.0}}
    lines = lb.checks(res)
    assert lines[0].startswith("PASS extract error: randomized mean 0.40240 vs exact 0.40000, +0.600 %")
    assert lines[1].startswith("PASS extract error, worst module: m2 0.20180 vs exact 0.20000, +0.900 %")
    assert lines[2].startswith("PASS bake speed") and "1.50x" in lines[2]
    res["extract_r32"]["report"] = _report({"m1": 0.6, "m2": 0.2022}, "lowrank")  # mean +0.275 %, m2 +1.1 %
    lines = lb.checks(res)
    assert lines[0].startswith("PASS extract error") and lines[1].startswith("FAIL extract error, worst module: m2")
    res["extract_r32"]["report"] = _report({"m1": 0.606, "m2": 0.2022}, "lowrank")  # mean 0.4041 = +1.025 %
    assert lb.checks(res)[0].startswith("FAIL extract error") and "+1.025 %" in lb.checks(res)[0]
    res["bake"]["inproc"] = 15.1
    assert lb.checks(res)[2].startswith("FAIL bake speed") and "1.51x" in lb.checks(res)[2]
    res["extract_r32"]["report"] = _report({"m1": 0.6}, "lowrank")
    assert lb.checks(res)[1] == "FAIL extract modules: the two extracts cover different modules (1 randomized, 2 exact)"
    del res["extract_r32_exact"], res["bake"]
    assert lb.checks(res) == ["SKIP extract error: needs the extract_r32 and extract_r32_exact cases",
                              "SKIP bake speed: needs the weighted_sum and bake cases"]


def test_full_rank_extracts_are_exact_both_ways():
    res = {"extract_r32": {"report": _report({"m": 0.0}, "exact")},
           "extract_r32_exact": {"report": _report({"m": 0.0}, "exact")}}
    assert lb.checks(res)[0].startswith("PASS extract error") and "+0.000 %" in lb.checks(res)[0]


def test_quick_run_prints_the_table_and_checks(tmp_path):
    """The script end to end on the tiny layout (seven subprocesses)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_bench.py"), "--quick", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line[:1].isalpha()}
    for name in ("idle", "weighted_sum", "extract_r32", "extract_r32_exact", "bake", "lora_merge", "lora_merge_r32"):
        assert name in rows and "FAILED:" not in rows[name], name
    assert rows["weighted_sum"][3] == "1.00"  # the time baseline
    n_modules = rows["extract_r32"][6].split("/")[1]
    assert int(n_modules) > 200 and rows["extract_r32"][6] == "0/" + n_modules  # tiny: every module exact
    assert rows["bake"][6] == "-" and rows["lora_merge"][6] == "0/" + n_modules
    assert float(rows["extract_r32_exact"][-1]) < 1e-3  # max error: rank 32 covers every tiny module whole
    lines = r.stdout.splitlines()
    assert any(line.startswith("PASS extract error: randomized mean") for line in lines)
    assert any(line.startswith(("PASS bake speed", "FAIL bake speed")) for line in lines)
    left = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert left == ["lb_tiny_T.safetensors", "mb_tiny_A.safetensors"]  # outputs removed, inputs kept
