"""Metadata of merged files: the WebUI's fields in its own spelling, inputs by file name and sha256 only
(no local folders), the same record from the CLI and the Python API, and the hash cache that feeds it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib_merge import hashing
from lib_merge import synthetic as S
from lib_merge.merge import merge_to_file, normalize_recipe
from lib_merge.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lib_merge", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def sha(p) -> str:
    import hashlib
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def sd_recipe(res) -> dict:
    return json.loads(res.metadata["sd_merge_recipe"])


@pytest.mark.parametrize("mode,names,alpha,dtype,interp,half", [
    ("weighted_sum", ["sd15_a", "sd15_b"], 0.3, "fp16", "Weighted sum", True),
    ("add_difference", ["sd15_a", "sd15_b", "sd15_c"], 1, "fp32", "Add difference", False),
    ("no_interpolation", ["sd15_a"], 0.5, "keep", "No interpolation", True),  # fp16 inputs kept: all fp16
    ("sigmoid", ["sd15_a", "sd15_b"], 0.25, "bf16", "sigmoid", False),  # no WebUI spelling: our mode name
])
def test_sd_merge_recipe_fields_exact(models, tmp_path, mode, names, alpha, dtype, interp, half):
    out = tmp_path / "My Merge.safetensors"
    res = merge_to_file(Recipe(models=[models[n] for n in names], mode=mode, alpha=alpha, dtype=dtype), out)
    hashes = [sha(models[n]) for n in names] + [None] * (3 - len(names))
    assert sd_recipe(res) == {
        "type": "blockmerge", "primary_model_hash": hashes[0], "secondary_model_hash": hashes[1],
        "tertiary_model_hash": hashes[2], "interp_method": interp, "multiplier": float(alpha),
        "save_as_half": half, "custom_name": "My Merge", "config_source": None, "bake_in_vae": None,
        "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    assert isinstance(sd_recipe(res)["multiplier"], float)  # the WebUI's slider value is a float, 1 -> 1.0
    assert json.loads(res.metadata["blockmerge_recipe"])["alpha"] == float(alpha)


def test_save_as_half_follows_the_written_dtypes(tmp_path, sd15_listing):
    """keep with fp32 A writes fp32: not half; fp16 from fp32 inputs: half."""
    fp32 = {k: (shape, "F32" if dt == "F16" else dt) for k, (shape, dt) in sd15_listing.items()}
    a = S.write_checkpoint(tmp_path / "a32.safetensors", fp32, 1)
    b = S.write_checkpoint(tmp_path / "b32.safetensors", fp32, 2)
    keep = merge_to_file(Recipe(models=[a, b]), tmp_path / "keep.safetensors")
    half = merge_to_file(Recipe(models=[a, b], dtype="fp16"), tmp_path / "half.safetensors")
    assert sd_recipe(keep)["save_as_half"] is False and sd_recipe(half)["save_as_half"] is True


def all_text(meta: dict) -> str:
    return "\n".join(f"{k}={v}" for k, v in meta.items())


def test_no_local_folder_in_metadata(models, tmp_path):
    """A shared model must not reveal its author's folders: only file names and sha256."""
    from safetensors.torch import save_file
    import torch
    vae = {k[len("first_stage_model."):]: torch.zeros(shape, dtype=torch.float16)
           for k, (shape, dt) in S.tiny(S.load_listing("sd15")).items() if k.startswith("first_stage_model.")}
    save_file(vae, str(tmp_path / "my.vae.safetensors"))
    first = tmp_path / "first.safetensors"
    r = cli("merge", models["sd15_a"], models["sd15_b"], "-o", first, "--alpha", "0.4")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "second.safetensors"
    r = cli("merge", first, models["sd15_b"], models["sd15_c"], "-o", out, "--mode", "add_difference",
            "--bake-vae", tmp_path / "my.vae.safetensors")
    assert r.returncode == 0, r.stderr
    from lib_merge.io.sources import open_source
    with open_source(out) as s:
        meta = dict(s.metadata)
    text = all_text(meta)
    for folder in (tmp_path, models["sd15_a"].parent):
        assert str(folder) not in text and folder.name not in text
    assert "/" not in text and "\\" not in text  # no path separator at all
    ours = json.loads(meta["blockmerge_recipe"])
    assert ours["models"] == ["first.safetensors", "sd15_b.safetensors", "sd15_c.safetensors"]
    assert ours["bake_vae"] == "my.vae.safetensors"
    assert ours["inputs"] == [
        {"role": "a", "name": "first.safetensors", "sha256": sha(first)},
        {"role": "b", "name": "sd15_b.safetensors", "sha256": sha(models["sd15_b"])},
        {"role": "c", "name": "sd15_c.safetensors", "sha256": sha(models["sd15_c"])},
        {"role": "vae", "name": "my.vae.safetensors", "sha256": sha(tmp_path / "my.vae.safetensors")}]
    lineage = json.loads(meta["sd_merge_models"])
    assert lineage[sha(first)]["name"] == "first.safetensors"  # the WebUI's checkpoint name: file name
    assert lineage[sha(models["sd15_a"])]["name"] == "sd15_a.safetensors"  # chained from first's lineage
    assert json.loads(meta["sd_merge_recipe"])["bake_in_vae"] == "my.vae.safetensors"


def test_python_api_records_what_the_cli_records(models, tmp_path, monkeypatch):
    """Path objects and relative paths through merge_to_file give the CLI's metadata and bytes."""
    cli_dir, api_dir = tmp_path / "cli", tmp_path / "api"
    cli_dir.mkdir()
    api_dir.mkdir()
    r = cli("merge", models["sd15_a"], models["sd15_b"], "-o", cli_dir / "o.safetensors", "--alpha", "1",
            "--preset", "GRAD_V")
    assert r.returncode == 0, r.stderr
    monkeypatch.chdir(models["sd15_a"].parent)
    res = merge_to_file(Recipe(models=[Path("sd15_a.safetensors"), Path("sd15_b.safetensors")], alpha=1,
                               preset="GRAD_V"), api_dir / "o.safetensors")
    from lib_merge.io.sources import open_source
    with open_source(cli_dir / "o.safetensors") as s:
        assert dict(s.metadata) == res.metadata
    assert sha(cli_dir / "o.safetensors") == res.sha256
    # normalize_recipe (the CLI's step) takes Path objects too and changes nothing in the record
    again = merge_to_file(normalize_recipe(Recipe(models=[Path("sd15_a.safetensors"), "sd15_b.safetensors"],
                                                  alpha=1.0, preset="GRAD_V")), api_dir / "o.safetensors",
                          overwrite=True)
    assert again.sha256 == res.sha256


def test_hashing_reports_progress_in_bytes(models, tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "BLOCK", 4096)  # 64 KiB reads: many updates for a tiny checkpoint
    calls = []
    res = merge_to_file(Recipe(models=[models["sd15_a"], models["sd15_b"]]), tmp_path / "p.safetensors",
                        progress=lambda stage, done, total: calls.append((stage, done, total)))
    size = models["sd15_a"].stat().st_size
    a = [(d, t) for s, d, t in calls if s == "hashing sd15_a.safetensors"]
    assert len(a) > 3 and all(t == size for d, t in a)
    assert [d for d, t in a] == sorted(d for d, t in a) and a[-1] == (size, size)
    assert any(s == "hashing sd15_b.safetensors" for s, d, t in calls)
    stages = [s for s, d, t in calls]
    assert stages.index("merging") > max(i for i, s in enumerate(stages) if s.startswith("hashing"))
    # a second merge finds both hashes in the cache: one finished update each, no reading
    calls.clear()
    merge_to_file(Recipe(models=[models["sd15_a"], models["sd15_b"]]), res.output, overwrite=True,
                  progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert [c for c in calls if c[0] == "hashing sd15_a.safetensors"] == [("hashing sd15_a.safetensors", size, size)]


@pytest.mark.parametrize("content,why", [
    ("[1, 2]", "is a JSON list, not an object"),
    ('{"x": 5}', "has 1 malformed entries"),
    ('{"/a": {"sha256": 7, "size": 1, "mtime_ns": 2}, "/b": null, "/c": {"sha256": "zz", "size": 1, "mtime_ns": 1}}',
     "has 3 malformed entries"),
    ('"text"', "is a JSON str, not an object"),
    ("{not json", "is not valid JSON"),
])
def test_corrupt_hash_cache_is_set_aside_and_rebuilt(models, tmp_path, capsys, content, why):
    cache = hashing.cache_path()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(content)
    res = merge_to_file(Recipe(models=[models["sd15_a"], models["sd15_b"]]), tmp_path / "o.safetensors")
    err = capsys.readouterr().err
    assert f"note: hash cache {why} (set aside as hashes.json.bad-" in err and str(cache) in err
    assert err.count("note: hash cache") == 1
    aside = [p for p in cache.parent.iterdir() if p.name.startswith("hashes.json.bad-")]
    assert len(aside) == 1 and aside[0].read_text() == content
    rebuilt = json.loads(cache.read_text())
    assert rebuilt[os.path.realpath(models["sd15_a"])]["sha256"] == sha(models["sd15_a"])
    assert rebuilt[os.path.realpath(res.output)]["sha256"] == res.sha256
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]


def test_hash_cache_keeps_valid_entries_of_a_damaged_file(models, capsys):
    real = os.path.realpath(models["sd15_a"])
    digest = hashing.sha256_file(real)
    data = json.loads(hashing.cache_path().read_text())
    data["/gone"] = ["garbage"]
    hashing.cache_path().write_text(json.dumps(data))
    assert hashing.cached(real) == digest
    assert "has 1 malformed entries" in capsys.readouterr().err
    assert json.loads(hashing.cache_path().read_text()) == {real: data[real]}


def test_hash_cache_survives_concurrent_writers(models, tmp_path):
    """Two processes hashing and remembering at once: the cache stays valid JSON (temp file + rename)."""
    code = ("import sys; from lib_merge import hashing\n"
            "for i in range(40): hashing.remember(sys.argv[1], '%064x' % i, 1, i)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"f{n}")], env=env, stderr=subprocess.PIPE,
                              text=True) for n in range(3)]
    errs = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs) and not any("hash cache" in e for e in errs), errs
    data = json.loads(hashing.cache_path().read_text())
    assert isinstance(data, dict) and all(hashing._valid_entry(v) for v in data.values())
