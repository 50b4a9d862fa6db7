"""reproduce: inputs found by sha256 from any folder (hash cache, --search, the output's folder, the current
folder), "changed" vs "not found" naming the file, one-line errors for damaged metadata, older files still work."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_merge import synthetic as S
from lib_merge.errors import MergeError
from lib_merge.merge import merge_to_file, normalize_recipe
from lib_merge.recipe import Recipe
from lib_merge.reproduce import reproduce
from lib_merge.io.sources import open_source

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lib_merge", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


@pytest.fixture
def setup(tmp_path, sd15_listing, monkeypatch):
    """Inputs in src/, a merge of them (made from inside src/ with relative paths) in out/, cwd elsewhere/."""
    src, out_dir, elsewhere = tmp_path / "src", tmp_path / "out", tmp_path / "elsewhere"
    for d in (src, out_dir, elsewhere):
        d.mkdir()
    S.write_checkpoint(src / "a.safetensors", sd15_listing, 1)
    S.write_checkpoint(src / "b.safetensors", sd15_listing, 2)
    monkeypatch.chdir(src)
    out = out_dir / "o.safetensors"
    merge_to_file(Recipe(models=["a.safetensors", Path("b.safetensors")], preset="GRAD_V", dtype="fp32"), out)
    monkeypatch.chdir(elsewhere)
    return src, out, elsewhere


def fresh_cache(tmp_path, monkeypatch):
    """A machine that never hashed the inputs (or a deleted cache)."""
    monkeypatch.setenv("BLOCKMERGE_CACHE", str(tmp_path / "fresh_cache"))


def test_python_api_merge_reproduces_from_another_cwd_via_hash_cache(setup, tmp_path, monkeypatch):
    src, out, elsewhere = setup
    ok, new, detail = reproduce(str(out))
    assert ok, detail
    assert new == out.with_name("o.reproduced.safetensors") and new.read_bytes() == out.read_bytes()
    # the hash cache was the only way: without it nothing is found from here
    fresh_cache(tmp_path, monkeypatch)
    with pytest.raises(MergeError, match=r"^input A not found by sha256 [0-9a-f]{10} \(the hash cache, .*\), "
                                         r"a\.safetensors$"):
        reproduce(str(out), output=str(tmp_path / "x.safetensors"))


def test_cli_merge_reproduces_from_another_cwd(tmp_path, sd15_listing):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    S.write_checkpoint(src / "a.safetensors", sd15_listing, 1)
    S.write_checkpoint(src / "b.safetensors", sd15_listing, 2)
    r = cli("merge", "a.safetensors", "b.safetensors", "-o", "o.safetensors", "--alpha", "0.3", cwd=src)
    assert r.returncode == 0, r.stderr
    r = cli("reproduce", src / "o.safetensors", "-o", elsewhere / "r.safetensors", cwd=elsewhere)
    assert r.returncode == 0 and r.stdout.startswith("identical:"), r.stdout + r.stderr


def test_finds_inputs_in_search_folders_by_sha256(setup, tmp_path, monkeypatch):
    src, out, _ = setup
    fresh_cache(tmp_path, monkeypatch)
    store = tmp_path / "store" / "deep"
    store.mkdir(parents=True)
    shutil.move(src / "a.safetensors", store / "renamed_a.safetensors")
    shutil.move(src / "b.safetensors", store / "b.safetensors")
    ok, _, detail = reproduce(str(out), search=[str(tmp_path / "store")])
    assert ok, detail


def test_finds_inputs_in_the_outputs_folder(setup, tmp_path, monkeypatch):
    src, out, _ = setup
    fresh_cache(tmp_path, monkeypatch)
    shutil.move(src / "a.safetensors", out.parent / "a.safetensors")  # by name
    shutil.move(src / "b.safetensors", out.parent / "other name.safetensors")  # by sha256
    ok, _, detail = reproduce(str(out))
    assert ok, detail


def test_finds_inputs_in_the_current_folder(setup, tmp_path, monkeypatch):
    src, out, elsewhere = setup
    fresh_cache(tmp_path, monkeypatch)
    shutil.move(src / "a.safetensors", elsewhere / "a.safetensors")
    shutil.move(src / "b.safetensors", elsewhere / "b.safetensors")
    r = cli("reproduce", out, cwd=elsewhere)
    assert r.returncode == 0 and "identical" in r.stdout, r.stderr


def test_changed_file_at_the_recorded_name_says_changed(setup, tmp_path, monkeypatch, sd15_listing):
    src, out, _ = setup
    fresh_cache(tmp_path, monkeypatch)
    shutil.copy(src / "a.safetensors", out.parent / "a.safetensors")
    S.write_checkpoint(out.parent / "b.safetensors", sd15_listing, 99)  # same name, other weights
    with pytest.raises(MergeError, match=r"^input B b\.safetensors changed since the merge \(sha256 [0-9a-f]{10}, "
                                         r"recorded [0-9a-f]{10}\), .*out/b\.safetensors$"):
        reproduce(str(out))
    r = cli("reproduce", out)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: input B b.safetensors changed since the merge (sha256 ")


def test_file_changed_in_place_says_changed(setup, sd15_listing):
    """The hash cache knows where B was; B was rewritten there since: "changed", naming that file."""
    src, out, _ = setup
    S.write_checkpoint(src / "b.safetensors", sd15_listing, 99)
    with pytest.raises(MergeError, match=r"^input B b\.safetensors changed since the merge .*src/b\.safetensors$"):
        reproduce(str(out))


def test_not_found_names_the_file(setup, tmp_path, monkeypatch):
    src, out, _ = setup
    fresh_cache(tmp_path, monkeypatch)
    (src / "b.safetensors").unlink()
    shutil.move(src / "a.safetensors", out.parent / "a.safetensors")
    with pytest.raises(MergeError, match=r"^input B not found by sha256 .*, b\.safetensors$"):
        reproduce(str(out))


def with_metadata(path: Path, meta: dict) -> Path:
    save_file({"x": torch.zeros(2)}, str(path), metadata=meta)
    return path


GOOD_SD = json.dumps({"custom_name": "o"})
SHA = "ab" * 32


@pytest.mark.parametrize("meta,message", [
    ({}, "no blockmerge_recipe in the metadata (not made by BlockMerge?)"),
    ({"blockmerge_recipe": "{not json", "sd_merge_recipe": GOOD_SD}, "blockmerge_recipe in the metadata is not valid JSON"),
    ({"blockmerge_recipe": "[1, 2]", "sd_merge_recipe": GOOD_SD}, "blockmerge_recipe in the metadata is not a JSON object"),
    ({"blockmerge_recipe": json.dumps({"models": ["a.safetensors"], "mode": "no_interpolation"}),
      "sd_merge_recipe": "garbage"}, "sd_merge_recipe in the metadata is not valid JSON"),
    ({"blockmerge_recipe": json.dumps({"models": ["a.safetensors"], "mode": "no_interpolation"}),
      "sd_merge_recipe": json.dumps({"custom_name": 5})}, "sd_merge_recipe custom_name is not a string: 5"),
    ({"blockmerge_recipe": json.dumps({"models": ["a.safetensors"], "mode": "no_interpolation", "inputs": "x"}),
      "sd_merge_recipe": GOOD_SD}, "blockmerge_recipe inputs is not a list: 'x'"),
    ({"blockmerge_recipe": json.dumps({"models": ["a.safetensors"], "mode": "no_interpolation", "inputs": [5]}),
      "sd_merge_recipe": GOOD_SD}, "blockmerge_recipe has a malformed inputs entry 5"),
    ({"blockmerge_recipe": json.dumps({"models": ["a.safetensors"], "mode": "no_interpolation",
                                       "inputs": [{"role": "a", "name": "a.safetensors", "sha256": "zz"}]}),
      "sd_merge_recipe": GOOD_SD}, "blockmerge_recipe has a malformed inputs entry {'role': 'a'"),
    ({"blockmerge_recipe": json.dumps({"models": 5}), "sd_merge_recipe": GOOD_SD},
     "models must be a list of file paths (got int 5)"),
    ({"blockmerge_recipe": json.dumps({"models": [None]}), "sd_merge_recipe": GOOD_SD},
     "models[0] must be a file path (got null)"),
    ({"blockmerge_recipe": json.dumps({"models": ["a.safetensors", "b.safetensors"],
                                       "inputs": [{"role": "a", "name": "a.safetensors", "sha256": SHA},
                                                  {"role": "b", "name": "b.safetensors"}]}),
      "sd_merge_recipe": GOOD_SD}, "blockmerge_recipe has a malformed inputs entry"),
    ({"blockmerge_recipe": json.dumps({"models": ["a.safetensors", "b.safetensors"],
                                       "inputs": [{"role": "a", "name": "a.safetensors", "sha256": SHA},
                                                  {"role": "b", "name": "b.safetensors", "sha256": SHA}]}),
      "sd_merge_recipe": GOOD_SD}, "input A not found by sha256 ababababab"),
])
def test_damaged_recipe_metadata_is_one_line_error(tmp_path, meta, message):
    f = with_metadata(tmp_path / "bad.safetensors", meta)
    with pytest.raises(MergeError) as e:
        reproduce(str(f))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_damaged_recipe_metadata_cli_exit_2(tmp_path):
    for i, meta in enumerate([{"blockmerge_recipe": "{not json", "sd_merge_recipe": GOOD_SD},
                              {"blockmerge_recipe": json.dumps({"models": ["a.safetensors"], "inputs": [[1]]}),
                               "sd_merge_recipe": GOOD_SD}]):
        r = cli("reproduce", with_metadata(tmp_path / f"bad{i}.safetensors", meta))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: blockmerge_recipe "), r.stderr


def test_missing_sha256_for_an_input_is_one_line_error(tmp_path):
    rec = {"models": ["a.safetensors", "b.safetensors"], "inputs": [{"role": "a", "name": "a.safetensors", "sha256": SHA}]}
    f = with_metadata(tmp_path / "bad.safetensors", {"blockmerge_recipe": json.dumps(rec), "sd_merge_recipe": GOOD_SD})
    with pytest.raises(MergeError, match=r"^blockmerge_recipe records no sha256 for input B, .*bad\.safetensors$"):
        reproduce(str(f))


def legacy_metadata(res, recipe: Recipe) -> dict:
    """The layout written before inputs were recorded by name (commit 880d2c0): absolute paths in ``models``,
    file stems in ``inputs``, the mode name as ``interp_method``."""
    meta = dict(res.metadata)
    ours = json.loads(meta["blockmerge_recipe"])
    ours["models"] = list(recipe.models)
    for i in ours["inputs"]:
        i["name"] = i["name"].rsplit(".", 1)[0]
    meta["blockmerge_recipe"] = json.dumps(ours, sort_keys=True, separators=(",", ":"))
    sd = json.loads(meta["sd_merge_recipe"])
    sd["interp_method"] = recipe.mode
    meta["sd_merge_recipe"] = json.dumps(sd, sort_keys=True, separators=(",", ":"))
    return meta


def test_version1_file_with_absolute_paths_still_reproduces(tmp_path, sd15_listing, monkeypatch):
    a = S.write_checkpoint(tmp_path / "a.safetensors", sd15_listing, 1)
    b = S.write_checkpoint(tmp_path / "b.safetensors", sd15_listing, 2)
    recipe = normalize_recipe(Recipe(models=[a, b], alpha=0.3))
    res = merge_to_file(recipe, tmp_path / "tmp.safetensors")
    old = tmp_path / "old.safetensors"
    merge_to_file(recipe, old, metadata=legacy_metadata(res, recipe))
    with open_source(old) as s:
        assert json.loads(s.metadata["blockmerge_recipe"])["models"] == [str(a), str(b)]
    monkeypatch.chdir(tmp_path.parent)
    ok, new, detail = reproduce(str(old))
    assert ok and new.read_bytes() == old.read_bytes(), detail
    assert "metadata of an older BlockMerge layout kept as it was" in detail
    # found at the recorded absolute path even without a hash cache
    fresh_cache(tmp_path, monkeypatch)
    ok, _, detail = reproduce(str(old), overwrite=True)
    assert ok, detail
