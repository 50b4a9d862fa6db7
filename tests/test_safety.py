"""Bad input: a clear error naming the file/key/token, and nothing left behind."""
import os
from pathlib import Path

import pytest
import torch

from lib_merge.errors import MergeError
from lib_merge.merge import merge_to_file
from lib_merge.recipe import Recipe
from lib_merge.io.sources import open_source


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, models):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(2)}, "payload": Evil(marker)}, ckpt)
    with pytest.raises(MergeError, match=r"refusing to load: the pickle needs (posix|os)\.system, which could run code, .*evil.ckpt"):
        open_source(ckpt)
    assert not marker.exists()
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeError, match="refusing to load"):
        merge_to_file(Recipe(models=[str(models["sd15_a"]), str(ckpt)]), out)
    assert not out.exists() and not marker.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class ModelCheckpoint:
    """Stands for PyTorch Lightning's callback, pickled into real SD1 .ckpt files."""


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_ckpt_with_lightning_callback_loads(tmp_path, models, zip_format):
    import sys
    import types
    name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(name)
    fake.ModelCheckpoint = ModelCheckpoint
    ModelCheckpoint.__module__ = name
    parents = {n: types.ModuleType(n) for n in ("pytorch_lightning", "pytorch_lightning.callbacks")}
    sys.modules.update(parents)
    sys.modules[name] = fake
    try:
        sd = load_safetensors(models["sd15_a"])
        ckpt = tmp_path / "real_style.ckpt"
        import numpy as np
        torch.save({"state_dict": sd, "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)},
                                                    "cb": ModelCheckpoint()},
                    "epoch": 3, "global_step": np.int64(470000), "lr": np.float32(1e-4), "hparams": {1, 2},
                    "pytorch-lightning_version": "1.4.2"}, ckpt, _use_new_zipfile_serialization=zip_format)
    finally:
        for n in (name, *parents):
            del sys.modules[n]
        ModelCheckpoint.__module__ = __name__
    src = open_source(ckpt)
    assert set(src.infos) == set(sd)
    out = tmp_path / "o.safetensors"
    merge_to_file(Recipe(models=[str(ckpt), str(models["sd15_b"])], alpha=0.0), out)
    O = load_safetensors(out)
    assert all(torch.equal(O[k], sd[k]) for k in sd)


def load_safetensors(p):
    from safetensors.torch import load_file
    return load_file(str(p))


def _copy_bytes(src, dst, data=None):
    raw = Path(src).read_bytes() if data is None else data
    Path(dst).write_bytes(raw)
    return dst


def test_truncated_safetensors(tmp_path, models):
    raw = Path(models["sd15_b"]).read_bytes()
    bad = _copy_bytes(None, tmp_path / "trunc.safetensors", raw[: len(raw) - 1000])
    with pytest.raises(MergeError, match=r"truncated safetensors file: .* ends at byte .*trunc.safetensors"):
        open_source(bad)
    tiny = _copy_bytes(None, tmp_path / "tiny.safetensors", b"\x01\x02")
    with pytest.raises(MergeError, match="truncated safetensors file .*only 2 bytes"):
        open_source(tiny)


def test_header_longer_than_file(tmp_path):
    bad = _copy_bytes(None, tmp_path / "long.safetensors", (10**9).to_bytes(8, "little") + b'{"a":1}')
    with pytest.raises(MergeError, match="header length 1000000000 is longer than the file .*long.safetensors"):
        open_source(bad)


def test_corrupted_header(tmp_path, models):
    raw = bytearray(Path(models["sd15_b"]).read_bytes())
    raw[8:20] = b"#" * 12
    bad = _copy_bytes(None, tmp_path / "corrupt.safetensors", bytes(raw))
    with pytest.raises(MergeError, match="corrupt safetensors header \\(not JSON.*corrupt.safetensors"):
        open_source(bad)
    out = tmp_path / "o.safetensors"
    with pytest.raises(MergeError, match="corrupt.safetensors"):
        merge_to_file(Recipe(models=[str(models["sd15_a"]), str(bad)]), out)
    assert list(tmp_path.glob("*o.safetensors*")) == []


def test_existing_output_is_refused_and_untouched(tmp_path, models):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(MergeError, match="output exists \\(use --overwrite"):
        merge_to_file(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])]), out)
    assert out.read_bytes() == b"precious"
    merge_to_file(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])]), out, overwrite=True)
    assert out.stat().st_size > 1000


def test_output_never_overwrites_a_source(tmp_path, models):
    import shutil
    a = shutil.copy(models["sd15_a"], tmp_path / "a.safetensors")
    before = Path(a).read_bytes()
    with pytest.raises(MergeError, match="output would overwrite an input model"):
        merge_to_file(Recipe(models=[str(a), str(models["sd15_b"])]), a, overwrite=True)
    assert Path(a).read_bytes() == before


def test_output_suffix_and_folder(tmp_path, models):
    r = Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])])
    with pytest.raises(MergeError, match="output must end in .safetensors"):
        merge_to_file(r, tmp_path / "o.ckpt")
    with pytest.raises(MergeError, match="output folder does not exist"):
        merge_to_file(r, tmp_path / "nope" / "o.safetensors")


def test_interrupted_merge_leaves_nothing(tmp_path, models):
    from lib_merge.errors import MergeInterrupted
    out = tmp_path / "o.safetensors"
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 5

    with pytest.raises(MergeInterrupted):
        merge_to_file(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])]), out, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_missing_model_and_unknown_suffix(tmp_path, models):
    with pytest.raises(MergeError, match="model file not found, .*nope.safetensors"):
        open_source(tmp_path / "nope.safetensors")
    p = tmp_path / "x.bin2"
    p.write_bytes(b"x")
    with pytest.raises(MergeError, match="unsupported model file type .bin2"):
        open_source(p)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_plain_pt_state_dict_loads(tmp_path, models, zip_format):
    sd = load_safetensors(models["sd15_b"])
    pt = tmp_path / "plain.pt"
    torch.save({"state_dict": sd}, pt, _use_new_zipfile_serialization=zip_format)
    src = open_source(pt)
    assert set(src.infos) == set(sd) and all(torch.equal(src.read(k), sd[k]) for k in sd)
