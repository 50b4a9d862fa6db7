"""Nothing from a pickled checkpoint ever runs: every pickle in every format goes through one allow-list.

Each payload below creates a marker file when unpickled by stock pickle (checked by ``test_payloads_are_live``
through ``torch.load(weights_only=False)``). Through BlockMerge (``open_source``, ``inspect``, the CLI, the
WebUI API route) the marker must never appear, and the error must be one line naming the refused global.
"""
from __future__ import annotations

import collections
import io
import pickle
import pickletools
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lib_merge.cli import main as cli_main
from lib_merge.errors import MergeError
from lib_merge.inspection import summarize
from lib_merge.io.sources import open_source

LEGACY_PICKLES = ("magic", "protocol", "sys_info", "main", "keys")  # the legacy format's pickles, in file order


# -- payloads: protocol-0 opcodes that create `m` and leave the unpickler's stack as they found it ------------------
def side_effect(kind: str, m: Path) -> bytes:
    m = str(m)
    ops = {
        "open": f"cbuiltins\nopen\n(V{m}\nVw\ntR0",
        "os.system": f"cos\nsystem\n(Vtouch {m}\ntR0",
        "eval": f"cbuiltins\neval\n(Vopen({m!r}, 'w')\ntR0",
        "exec": f"cbuiltins\nexec\n(Vopen({m!r}, 'w').close()\ntR0",
        "getattr": f"cbuiltins\ngetattr\n(cbuiltins\nopen\nV__call__\ntR(V{m}\nVw\ntR0",
        "import_module": f"cimportlib\nimport_module\n(Vbuiltins\ntRp0\n0"
                         f"cbuiltins\ngetattr\n(g0\nVopen\ntR(V{m}\nVw\ntR0",
    }[kind]
    return ops.encode()


REFUSED = {"open": "builtins.open", "os.system": "os.system", "eval": "builtins.eval", "exec": "builtins.exec",
           "getattr": "builtins.getattr", "import_module": "importlib.import_module"}


def splice(pkl: bytes, ops: bytes) -> bytes:
    """``ops`` run first inside pickle ``pkl`` (right after its PROTO opcode); the result is unchanged."""
    assert pkl[:1] == b"\x80"
    return pkl[:2] + ops + pkl[2:]


def pickle_spans(data: bytes, count: int) -> list[tuple[int, int]]:
    """(start, end) of the first ``count`` pickles written back to back in ``data``."""
    spans, pos = [], 0
    for _ in range(count):
        end = pos
        for op, _arg, at in pickletools.genops(io.BytesIO(data[pos:])):
            end = pos + at + 1
        spans.append((pos, end))
        pos = end
    return spans


def rewrite_zip(raw: bytes, change: dict) -> bytes:
    """The zip ``raw`` with some records' bytes replaced (``change``: name suffix -> function of old bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, fn in change.items():
                if info.filename.endswith(suffix):
                    data = fn(data)
            zout.writestr(info.filename, data)
    return out.getvalue()


def storage_type_call(pkl: bytes, ops: bytes) -> bytes:
    """The first storage type named in ``pkl`` (a persistent id's second item) replaced by the payload's call."""
    spliced, n = re.subn(rb"ctorch\n[A-Za-z0-9]*Storage\n", ops[:-1].replace(b"\\", b"\\\\"), pkl, count=1)
    assert n == 1
    return spliced


def checkpoint_bytes(sd: dict, zip_format: bool) -> bytes:
    buf = io.BytesIO()
    obj = {"state_dict": sd, "global_step": 840000, "epoch": np.int64(6), "lr": 1e-4,
           "hyper": collections.OrderedDict(steps=[1, 2]), "arrays": [np.arange(3), np.array([None, "x"])]}
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def evil_bytes(case: str, kind: str, sd: dict, m: Path) -> bytes:
    ops = side_effect(kind, m)
    if case == "raw":  # the whole file is one pickle
        return splice(pickle.dumps({"state_dict": sd}, protocol=2), ops)
    if case == "zip_main":
        return rewrite_zip(checkpoint_bytes(sd, True), {"/data.pkl": lambda d: splice(d, ops)})
    if case == "zip_persistent":  # the storage type inside the persistent id is a call
        return rewrite_zip(checkpoint_bytes(sd, True), {"/data.pkl": lambda d: storage_type_call(d, ops)})
    raw = checkpoint_bytes(sd, False)
    if case == "legacy_persistent":
        return storage_type_call(raw, ops)
    which = LEGACY_PICKLES.index(case.removeprefix("legacy_"))
    s, e = pickle_spans(raw, len(LEGACY_PICKLES))[which]
    return raw[:s] + splice(raw[s:e], ops) + raw[e:]


CASES = ["zip_main", "zip_persistent", "raw", "legacy_persistent"] + [f"legacy_{n}" for n in LEGACY_PICKLES]
MATRIX = [(c, "open") for c in CASES] + [("legacy_magic", k) for k in REFUSED if k != "open"] + \
         [("zip_main", k) for k in REFUSED if k != "open"]


@pytest.fixture(scope="module")
def small_sd():
    g = torch.Generator().manual_seed(0)
    return collections.OrderedDict(w=torch.randn(4, 3, generator=g), b=torch.randn(3, generator=g).half(),
                                   t=torch.randn(3, 4, generator=g).t())


@pytest.fixture(scope="module")
def sd15(models):
    return load_file(str(models["sd15_a"]))


def _write(tmp_path: Path, case: str, kind: str, sd: dict, name: str | None = None) -> tuple[Path, Path]:
    marker = tmp_path / f"MARKER_{case}_{kind}"
    path = tmp_path / (name or f"evil_{case}_{kind.replace('.', '_')}.ckpt")
    path.write_bytes(evil_bytes(case, kind, sd, marker))
    return path, marker


def _assert_refused(msg: str, kind: str, path: Path) -> None:
    assert "\n" not in msg
    assert msg.startswith(f"refusing to load: the pickle needs {REFUSED[kind]}, which could run code, ")
    assert msg.endswith(str(path))


@pytest.mark.parametrize("case,kind", MATRIX)
def test_payloads_are_live(tmp_path, small_sd, case, kind):
    """Stock unpickling runs every payload (so the tests below would see an unrestricted path)."""
    path, marker = _write(tmp_path, case, kind, small_sd)
    try:
        torch.load(path, weights_only=False)
    except Exception:
        pass  # e.g. "Invalid magic number" after the payload ran
    assert marker.exists()


@pytest.mark.parametrize("case,kind", MATRIX)
def test_open_source_and_inspect_refuse(tmp_path, small_sd, case, kind):
    path, marker = _write(tmp_path, case, kind, small_sd)
    with pytest.raises(MergeError) as e:
        open_source(path)
    _assert_refused(str(e.value), kind, path)
    with pytest.raises(MergeError) as e:
        summarize(path)
    _assert_refused(str(e.value), kind, path)
    assert not marker.exists()


@pytest.mark.parametrize("case,kind", MATRIX)
def test_cli_refuses(tmp_path, sd15, models, capsys, case, kind):
    path, marker = _write(tmp_path, case, kind, sd15)
    out = tmp_path / "out.safetensors"
    for argv in (["inspect", str(path)], ["merge", str(models["sd15_b"]), str(path), "-o", str(out)]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        _assert_refused(err.removeprefix("error: "), kind, path)
    assert not marker.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp output left either


def api_client(monkeypatch):
    """The extension's routes on a bare FastAPI app, with a fresh service (the WebUI stand-in is on sys.path)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from lib_merge.webui import api, service
    svc = service.Service()
    for mod in (api, service):
        monkeypatch.setattr(mod, "SERVICE", svc)
    app = FastAPI()
    api.add_routes(app)
    return TestClient(app)


def test_api_merge_refuses_every_payload(webui_stub, tmp_path, sd15, monkeypatch):
    """``POST /blockmerge/v1/merge`` with a downloaded .ckpt in the WebUI's models folder: 422, nothing runs."""
    client = api_client(monkeypatch)
    ckdir = Path(webui_stub.model_path)
    written = []
    for i, (case, kind) in enumerate(MATRIX):
        path, marker = _write(tmp_path, case, kind, sd15, name=f"evil{i}.ckpt")
        written.append((f"evil{i}", kind, shutil.move(path, ckdir / path.name), marker))
    webui_stub.list_models()
    for name, kind, path, marker in written:
        r = client.post("/blockmerge/v1/merge", json={"model_a": "synthA", "model_b": name, "output": f"o_{name}"})
        assert r.status_code == 422
        _assert_refused(r.json()["detail"], kind, Path(path))
        assert not marker.exists()
    assert not [p for p in ckdir.iterdir() if p.name.startswith(("o_", "."))]


def test_api_merge_of_a_clean_ckpt_still_works(webui_stub, tmp_path, sd15, monkeypatch):
    """The same route merges a real-style .ckpt (legacy and zip) just like its safetensors twin."""
    client = api_client(monkeypatch)
    ckdir = Path(webui_stub.model_path)
    (ckdir / "clean_zip.ckpt").write_bytes(checkpoint_bytes(sd15, True))
    (ckdir / "clean_legacy.ckpt").write_bytes(checkpoint_bytes(sd15, False))
    webui_stub.list_models()
    for name in ("clean_zip", "clean_legacy"):
        r = client.post("/blockmerge/v1/merge", json={"model_a": name, "model_b": "synthB", "output": f"o_{name}",
                                                      "alpha": 0.0})
        assert r.status_code == 200, r.json()
        out = load_file(r.json()["path"])
        assert set(out) == set(sd15) and all(torch.equal(out[k], sd15[k]) for k in sd15)


# -- other globals and persistent ids --------------------------------------------------------------------------
def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "net": torch.nn.Linear(2, 2)}, path,
               _use_new_zipfile_serialization=False)
    with pytest.raises(MergeError, match=r"refusing to load: the pickle needs torch\.nn\.modules\.linear\.Linear, "):
        open_source(path)


def test_header_pickle_cannot_use_persistent_ids(tmp_path, small_sd):
    raw = checkpoint_bytes(small_sd, False)
    s, e = pickle_spans(raw, 1)[0]
    path = tmp_path / "pid.ckpt"
    path.write_bytes(splice(raw[s:e], b"(Vx\ntQ0") + raw[e:])
    with pytest.raises(MergeError, match=r"unexpected persistent id in a header pickle, .*pid\.ckpt$"):
        open_source(path)


def test_refused_name_is_shown_on_one_line(tmp_path):
    path = tmp_path / "name.ckpt"
    path.write_bytes(b"\x80\x04\x8c\x02os\x8c\x05sy\nst\x93.")  # STACK_GLOBAL may name anything
    with pytest.raises(MergeError) as e:
        open_source(path)
    assert str(e.value) == f"refusing to load: the pickle needs os.sy\\x0ast, which could run code, {path}"


def test_pickles_are_bounded_before_unpickling(tmp_path, small_sd):
    """A memo index of a billion (minutes and gigabytes in CPython's unpickler) or a length past the end of
    the file is refused by the pre-scan, at once."""
    import time
    raw = checkpoint_bytes(small_sd, False)
    s, e = pickle_spans(raw, 4)[3]
    memo = tmp_path / "memo.ckpt"
    memo.write_bytes(raw[:s] + splice(raw[s:e], b"N" + b"r\x71\x31\x47\x3f" + b"0") + raw[e:])
    long = tmp_path / "long.ckpt"
    long.write_bytes(b"\x80\x02X\xff\xff\xff\x7f" + raw[2:])
    t0 = time.perf_counter()
    with pytest.raises(MergeError, match=r"^corrupt checkpoint: pickle memo index 1061630321 at byte \d+, .*memo"):
        open_source(memo)
    with pytest.raises(MergeError, match=r"^corrupt checkpoint: bad pickle \(expected 2147483647 bytes in a "
                                         r"unicodestring4, but only \d+ remain\), .*long\.ckpt$"):
        open_source(long)
    assert time.perf_counter() - t0 < 2


def test_numpy_arrays_are_built_only_from_pickled_data(tmp_path, small_sd):
    raw = checkpoint_bytes(small_sd, False)
    s, e = pickle_spans(raw, 1)[0]
    path = tmp_path / "np.ckpt"  # _reconstruct(ndarray, (10**9,), "O"): a billion Nones, 8 GB
    path.write_bytes(splice(raw[s:e], b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(J\x00\xca\x9a\x3b"
                                      b"tVO\ntR0") + raw[e:])
    with pytest.raises(MergeError, match=r"^corrupt checkpoint: numpy array record that is not an empty ndarray, "):
        open_source(path)
    path.write_bytes(splice(raw[s:e], b"cnumpy\nndarray\n(J\x00\xca\x9a\x3bt\x810") + raw[e:])  # NEWOBJ
    with pytest.raises(MergeError, match=r"^cannot read checkpoint \(UnpicklingError: NEWOBJ class argument"):
        open_source(path)
    path.write_bytes(splice(raw[s:e], b"cbuiltins\nbytearray\n(J\x00\xca\x9a\x3btR0") + raw[e:])
    with pytest.raises(MergeError, match=r"^refusing to load: the pickle needs builtins\.bytearray, "):
        open_source(path)


def test_codecs_encode_is_latin1_only(tmp_path, small_sd):
    raw = checkpoint_bytes(small_sd, False)
    s, e = pickle_spans(raw, 1)[0]
    path = tmp_path / "codec.ckpt"
    path.write_bytes(splice(raw[s:e], b"c_codecs\nencode\n(Vx\nVrot13\ntR0") + raw[e:])
    with pytest.raises(MergeError, match=r"_codecs.encode with encoding 'rot13', .*codec\.ckpt$"):
        open_source(path)


def test_plain_pickle_without_payload_is_not_a_checkpoint(tmp_path, small_sd):
    path = tmp_path / "plain.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"a": 1}}, protocol=2))
    with pytest.raises(MergeError, match=r"not a PyTorch checkpoint .*no magic number\), .*plain\.ckpt$"):
        open_source(path)


# -- clean files load exactly --------------------------------------------------------------------------------
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_clean_checkpoint_loads_exactly(tmp_path, zip_format):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 4, generator=g)
    sd = collections.OrderedDict(
        f32=torch.randn(3, 5, generator=g), f16=torch.randn(4, generator=g).half(),
        bf16=torch.randn(2, 3, generator=g).bfloat16(), fp8=torch.randn(3, generator=g).to(torch.float8_e4m3fn),
        param=torch.nn.Parameter(torch.randn(2, generator=g)), rows=base[1:3], transposed=base.t(), base=base,
        i64=torch.arange(5), empty=torch.zeros(0), scalar=torch.tensor(3.0))
    path = tmp_path / "clean.ckpt"
    path.write_bytes(checkpoint_bytes(sd, zip_format))
    with open_source(path) as src:
        for k, t in sd.items():
            got = src.tensors[k]
            assert got.dtype == t.dtype and got.shape == t.shape and got.stride() == t.stride(), k
            assert torch.equal(got.float(), t.detach().float()), k
            assert type(got) is torch.Tensor


def test_legacy_storage_views_load(tmp_path):
    """Old legacy files name views of a storage, ``(view_key, offset, size)``, in the persistent id."""
    import torch.serialization as ts

    def tensor(view: bytes, offset: bytes, size: bytes, stride: bytes) -> bytes:
        return (b"ctorch._utils\n_rebuild_tensor_v2\n((Vstorage\nctorch\nFloatStorage\nVroot\nVcpu\nK\x0a" + view
                + b"tQ" + offset + b"(" + size + b"t(" + stride + b"t\x89ccollections\nOrderedDict\n)RtR")
    main = (b"\x80\x02}(Vstate_dict\n}(Vwhole\n" + tensor(b"N", b"K\x00", b"K\x0a", b"K\x01")
            + b"Vtail\n" + tensor(b"(Vv\nK\x06K\x04t", b"K\x00", b"K\x02K\x02", b"K\x01K\x02") + b"uu.")
    head = b"".join(pickle.dumps(x, protocol=2)
                    for x in (ts.MAGIC_NUMBER, ts.PROTOCOL_VERSION, {"little_endian": True}))
    data = torch.arange(10, dtype=torch.float32)
    body = pickle.dumps(["root"], protocol=2) + (10).to_bytes(8, "little") + data.numpy().tobytes()
    path = tmp_path / "views.ckpt"
    path.write_bytes(head + main + body)
    ref = torch.load(path, weights_only=False)["state_dict"]
    with open_source(path) as src:
        assert torch.equal(src.tensors["whole"], data) and torch.equal(ref["whole"], data)
        assert torch.equal(src.tensors["tail"], torch.tensor([[6.0, 8.0], [7.0, 9.0]]))
        assert torch.equal(ref["tail"], src.tensors["tail"])


# -- fuzz ---------------------------------------------------------------------------------------------------------
_OPCODES = [b"c", b"R", b"\x93", b"Q", b"b", b"i", b"o", b"\x81", b"\x82", b"(", b"t", b"0", b"h\x00", b"q\x00",
            b"\x8c\x08builtins", b"\x8c\x04open", b"J\xff\xff\xff\x7f", b"X\xff\xff\xff\x0f", b"B\xff\xff\x00\x00"]


def _mutate(rng: random.Random, data: bytes, ops: bytes) -> bytes:
    b = bytearray(data)
    how = rng.randrange(5)
    if how == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif how == 1:  # truncate
        del b[rng.randrange(len(b)):]
    elif how == 2:  # splice random opcodes
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(b) + 1)
            b[at:at] = rng.choice(_OPCODES)
    elif how == 3:  # splice a whole payload at a random place
        at = rng.randrange(len(b) + 1)
        b[at:at] = ops
    else:  # point a global at a dangerous callable
        spots = [i for i in range(len(b)) if b[i:i + 6] == b"ctorch"]
        if spots:
            at = rng.choice(spots)
            end = b.index(b"\n", b.index(b"\n", at) + 1) + 1
            b[at:end] = rng.choice([b"cbuiltins\nopen\n", b"cos\nsystem\n", b"cbuiltins\neval\n"])
    return bytes(b)


def test_fuzz_mutated_checkpoints_never_run_anything(tmp_path, small_sd):
    rng = random.Random(1234)
    marker = tmp_path / "FUZZ_MARKER"
    zip_raw, legacy_raw = checkpoint_bytes(small_sd, True), checkpoint_bytes(small_sd, False)
    outcomes = collections.Counter()
    path = tmp_path / "fuzz.ckpt"
    for i in range(400):
        kind = rng.choice(list(REFUSED))
        ops = side_effect(kind, marker)
        target = rng.randrange(3)
        if target == 0:  # the legacy file as bytes
            data = _mutate(rng, legacy_raw, ops)
        elif target == 1:  # the zip's data.pkl, re-zipped so the CRC still matches
            data = rewrite_zip(zip_raw, {"/data.pkl": lambda d: _mutate(rng, d, ops)})
        else:  # the zip file as bytes
            data = _mutate(rng, zip_raw, ops)
        path.write_bytes(data)
        try:
            with open_source(path) as src:
                assert all(isinstance(t, torch.Tensor) for t in src.tensors.values())
            outcomes["loaded"] += 1
        except MergeError as e:
            assert "\n" not in str(e) and str(e).endswith(str(path)), str(e)
            outcomes["refused" if "refusing to load" in str(e) else "error"] += 1
        assert not marker.exists(), (i, target)
    assert outcomes["loaded"] and outcomes["refused"] > 50 and outcomes["error"] > 50, outcomes
