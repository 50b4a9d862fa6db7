"""The command line as a user runs it (subprocess): exit codes, one-line errors, outputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lib_merge", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def test_help_lists_commands_and_defaults():
    r = cli("--help")
    assert r.returncode == 0
    for word in ("merge", "inspect", "presets", "reproduce", "demo"):
        assert word in r.stdout
    r = cli("merge", "--help")
    assert r.returncode == 0
    assert "default weighted_sum" in r.stdout and "default 0.5" in r.stdout and "default 0.25" in r.stdout
    assert "--weights-beta" in r.stdout and "--bake-vae" in r.stdout


def test_merge_inspect_and_errors(tmp_path, models):
    out = tmp_path / "o.safetensors"
    r = cli("merge", models["sd15_a"], models["sd15_b"], "-o", out, "--preset", "GRAD_V", "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    assert "sha256" in r.stdout and "alpha has no effect" not in r.stdout  # no --alpha given: nothing to say
    r = cli("inspect", out, "--json")
    info = json.loads(r.stdout)
    assert info["architecture"] == "sd1" and info["variant"] == "normal" and info["keys"] == 1131
    assert json.loads(info["metadata"]["blockmerge_recipe"])["preset"] == "GRAD_V"
    # existing output: one line, exit 2
    r = cli("merge", models["sd15_a"], models["sd15_b"], "-o", out)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: output exists (use --overwrite to replace it), {out}"]
    # wrong model count
    r = cli("merge", models["sd15_a"], models["sd15_b"], "-o", tmp_path / "x.safetensors", "--mode", "add_difference")
    assert r.returncode == 2 and "mode add_difference takes 3 models (A B C), got 2" in r.stderr
    # malformed weights
    r = cli("merge", models["sd15_a"], models["sd15_b"], "-o", tmp_path / "x.safetensors", "--weights", "1,2,x")
    assert r.returncode == 2 and "error: not a number: 'x', --weights value 3" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("merge", models["sd15_a"], models["sd15_b"], "-o", tmp_path / "x.safetensors", "--preset", "NOPE")
    assert r.returncode == 2 and "unknown preset, 'NOPE'" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_recipe_file_yaml(tmp_path, models):
    rec = tmp_path / "r.yaml"
    rec.write_text(f"models: ['{models['sd15_a']}', '{models['sd15_b']}']\nmode: sigmoid\nalpha: 0.3\n")
    out = tmp_path / "o.safetensors"
    r = cli("merge", "--recipe", rec, "-o", out, "--alpha", "0.4")
    assert r.returncode == 0, r.stderr
    info = json.loads(cli("inspect", out, "--json").stdout)
    ours = json.loads(info["metadata"]["blockmerge_recipe"])
    assert ours["mode"] == "sigmoid" and ours["alpha"] == 0.4


def test_presets_commands():
    r = cli("presets", "list")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 38
    r = cli("presets", "list", "--arch", "sdxl")
    assert "TRUE_CUBIC_HERMITE\tshipped (converted from SD1)" in r.stdout
    r = cli("presets", "show", "GRAD_V")
    assert r.stdout.startswith("GRAD_V\t0,1,0.9166666667")


def test_reproduce_cli(tmp_path, models):
    out = tmp_path / "o.safetensors"
    assert cli("merge", models["sd15_a"], models["sd15_b"], "-o", out, "--weights", "0.1," * 24 + "0.9").returncode == 0
    r = cli("reproduce", out)
    assert r.returncode == 0 and "identical" in r.stdout


def test_demo_runs_twice(tmp_path):
    for _ in range(2):
        r = cli("demo", tmp_path)
        assert r.returncode == 0, r.stderr
        assert "architecture: SD1.x (normal)" in r.stdout and "GRAD_V" in r.stdout
    assert len(list(tmp_path.iterdir())) == 2


def test_console_script_usage_says_blockmerge(monkeypatch, capsys):
    from lib_merge.cli import build_parser
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/blockmerge"])
    assert build_parser().format_usage().startswith("usage: blockmerge [-h] [--debug] [-q] COMMAND")
    assert "  blockmerge merge A.safetensors B.safetensors" in build_parser().format_help()
    monkeypatch.setattr(sys, "argv", [str(ROOT / "lib_merge" / "__main__.py")])
    assert build_parser().format_usage().startswith("usage: python -m lib_merge ")
    assert cli("merge", "--help").stdout.startswith("usage: python -m lib_merge merge ")
    assert "blockmerge = \"lib_merge.cli:main\"" in (ROOT / "pyproject.toml").read_text()


def test_quiet_and_debug_after_the_subcommand(tmp_path, models, capsys):
    from lib_merge.cli import main
    from lib_merge.errors import MergeError
    assert main(["presets", "list", "-q"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 38
    assert main(["merge", str(models["sd15_a"]), str(models["sd15_b"]), "-o", str(tmp_path / "o.safetensors"),
                 "-q"]) == 0
    # --debug after the subcommand shows the traceback, like --debug before it
    args = ["merge", str(models["sd15_a"]), "-o", str(tmp_path / "x.safetensors")]
    for argv in (["--debug", *args], [*args, "--debug"]):
        with pytest.raises(MergeError, match="mode weighted_sum takes 2 models"):
            main(argv)
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err == "error: mode weighted_sum takes 2 models (A B), got 1\n"
