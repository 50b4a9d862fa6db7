"""Faults a user can cause end as one line ``error: <what>, <which>`` and exit 2, found before the first output
byte where they can be; the output folder is left without a partial file. Internal errors are a separate type."""
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_merge import hashing, merge_to_file
from lib_merge.cli import main
from lib_merge.errors import InternalError, MergeError
from lib_merge.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *args):
    rc = main([str(a) for a in args], prog="blockmerge")
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(rc, err, code=2) -> str:
    """The whole of stderr: exactly one line, starting ``error:``, no traceback; returns it."""
    assert rc == code
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def no_hashing(monkeypatch):
    """Fail the test if an input is hashed: the checks under test must come before that (slow) step."""
    def boom(*a, **k):
        raise AssertionError("inputs were hashed before the output was checked")
    monkeypatch.setattr(hashing, "sha256_file", boom)


def ab(models):
    return [models["sd15_a"], models["sd15_b"]]


def test_read_only_output_folder_is_found_before_hashing(capsys, models, tmp_path, monkeypatch, no_hashing):
    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(".partial"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, "open", read_only)
    out = tmp_path / "o.safetensors"
    rc, _, err = run(capsys, "merge", *ab(models), "-o", out)
    assert one_error(rc, err) == f"error: cannot write to the output folder (Read-only file system), {tmp_path}"
    assert leftovers(tmp_path) == []


def test_permission_denied_output_folder(capsys, models, tmp_path, monkeypatch):
    real_open = os.open

    def denied(path, *a, **k):
        if str(path).endswith(".partial"):
            raise OSError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(MergeError, match=re.escape(f"cannot write to the output folder (Permission denied), {tmp_path}")):
        merge_to_file(Recipe(models=[str(m) for m in ab(models)]), tmp_path / "o.safetensors")


def test_disk_full_while_writing_removes_the_partial_file(capsys, models, tmp_path, monkeypatch):
    calls, real_pwrite = [], os.pwrite

    def full(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:  # the header and a few tensors fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "o.safetensors"
    rc, out_text, err = run(capsys, "merge", *ab(models), "-o", out)
    assert one_error(rc, err) == f"error: disk full while writing the output (the partial file was removed), {out}"
    assert out_text == ""
    assert leftovers(tmp_path) == []


def test_not_enough_free_space_is_found_before_hashing(capsys, models, tmp_path, monkeypatch, no_hashing):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 999, 999))
    out = tmp_path / "o.safetensors"
    rc, _, err = run(capsys, "merge", *ab(models), "-o", out)
    line = one_error(rc, err)
    # the tiny SD1.5 checkpoint holds 1131 tensors in a few hundred kB
    assert re.fullmatch(r"error: not enough free space: the output needs \d{3}\.\d\d kB, 999 bytes free, "
                        + re.escape(str(out)), line), line
    assert leftovers(tmp_path) == []


def test_output_that_is_a_folder_is_refused_before_merging(capsys, models, tmp_path, no_hashing):
    out = tmp_path / "o.safetensors"
    out.mkdir()
    rc, _, err = run(capsys, "merge", *ab(models), "-o", out, "--overwrite")
    assert one_error(rc, err) == f"error: output is a folder, {out}"
    assert leftovers(tmp_path) == ["o.safetensors"] and out.is_dir()


def test_cuda_without_cuda_and_bogus_devices(capsys, models, tmp_path, monkeypatch, no_hashing):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o.safetensors"
    rc, _, err = run(capsys, "merge", *ab(models), "-o", out, "--device", "cuda")
    assert one_error(rc, err) == "error: CUDA is not available, --device cuda"
    rc, _, err = run(capsys, "merge", *ab(models), "-o", out, "--device", "xyz")
    assert one_error(rc, err) == "error: unknown device 'xyz' (cpu, cuda, cuda:N, mps or xpu), --device"
    rc, _, err = run(capsys, "merge", *ab(models), "-o", out, "--device", "meta")
    assert one_error(rc, err) == "error: unknown device 'meta' (cpu, cuda, cuda:N, mps or xpu), --device"
    assert leftovers(tmp_path) == []


def test_cuda_index_beyond_the_devices(monkeypatch, models, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MergeError) as e:
        merge_to_file(Recipe(models=[str(m) for m in ab(models)]), tmp_path / "o.safetensors", device="cuda:3")
    assert str(e.value) == "CUDA device 3 does not exist (1 found), --device cuda:3"


def test_non_utf8_file_names(capsys, models, tmp_path):
    odd = tmp_path / os.fsdecode(b"x\xff.safetensors")
    shutil.copy(models["sd15_a"], odd)
    rc, _, err = run(capsys, "merge", odd, models["sd15_b"], "-o", tmp_path / "o.safetensors")
    assert one_error(rc, err) == f"error: file name is not valid UTF-8 (rename the file), models[0] {str(odd)!r}"
    out = tmp_path / os.fsdecode(b"o\xfe.safetensors")
    rc, _, err = run(capsys, "merge", *ab(models), "-o", out)
    assert one_error(rc, err) == f"error: file name is not valid UTF-8 (rename the file), output {str(out)!r}"
    assert leftovers(tmp_path) == [odd.name]


def test_empty_weights_flag_is_an_error(capsys, models, tmp_path):
    rc, _, err = run(capsys, "merge", *ab(models), "-o", tmp_path / "o.safetensors", "--weights", "")
    assert one_error(rc, err) == "error: empty weights, --weights"
    rc, _, err = run(capsys, "merge", *ab(models), "-o", tmp_path / "o.safetensors", "--preset-beta", " ")
    assert one_error(rc, err) == "error: empty preset beta, --preset-beta"
    assert leftovers(tmp_path) == []


# -- the Python API ----------------------------------------------------------------------------------------
def test_api_takes_path_objects_and_dicts(models, tmp_path):
    a, b = ab(models)
    for sub in "spd":
        (tmp_path / sub).mkdir()
    by_str = merge_to_file(Recipe(models=[str(a), str(b)], preset="GRAD_V"), str(tmp_path / "s" / "o.safetensors"))
    by_path = merge_to_file(Recipe(models=[Path(a), Path(b)], preset="GRAD_V"), tmp_path / "p" / "o.safetensors")
    by_dict = merge_to_file({"models": [str(a), Path(b)], "preset": "GRAD_V"}, tmp_path / "d" / "o.safetensors")
    assert by_str.sha256 == by_path.sha256 == by_dict.sha256


@pytest.mark.parametrize("recipe, message", [
    (None, "recipe must be a Recipe or a dict, got None, recipe"),
    ("a.safetensors", "recipe must be a Recipe or a dict, got str, recipe"),
    ({"models": ["a", "b"], "alpha": "0.3"}, "alpha must be a number (got str '0.3'), recipe"),
    ({"models": "ab"}, "models must be a list of file paths (got str 'ab'), recipe"),
])
def test_api_refuses_what_is_not_a_recipe(recipe, message, tmp_path):
    with pytest.raises(MergeError) as e:
        merge_to_file(recipe, tmp_path / "o.safetensors")
    assert str(e.value) == message


@pytest.mark.parametrize("threads", ["4", 2.0, -1, True])
def test_api_threads_must_be_a_whole_number(threads, models, tmp_path):
    with pytest.raises(MergeError) as e:
        merge_to_file(Recipe(models=[str(m) for m in ab(models)]), tmp_path / "o.safetensors", threads=threads)
    assert str(e.value) == f"threads must be a whole number (0 or None: one per core, at most 4), threads={threads!r}"
    assert leftovers(tmp_path) == []


def test_api_output_must_be_a_path(models):
    with pytest.raises(MergeError) as e:
        merge_to_file(Recipe(models=[str(m) for m in ab(models)]), None)
    assert str(e.value) == "output must be a file path, got NoneType"


# -- interrupts and partial files ----------------------------------------------------------------------------
def test_interrupt_during_the_write_leaves_nothing(models, tmp_path):
    def progress(stage, done, total):
        if stage == "merging" and done > total // 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        merge_to_file(Recipe(models=[str(m) for m in ab(models)]), tmp_path / "o.safetensors", progress=progress)
    assert leftovers(tmp_path) == []


SIGTERM_SELF = """
import os, signal, sys
from lib_merge.io import filesink
from lib_merge.cli import main
drain = filesink.FileSink._drain_one
def drain_then_term(*a):
    os.kill(os.getpid(), signal.SIGTERM)
    return drain(*a)
filesink.FileSink._drain_one = staticmethod(drain_then_term)
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_is_handled_like_ctrl_c(models, tmp_path):
    out = tmp_path / "o.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SIGTERM_SELF, "merge", *map(str, ab(models)), "-o", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 143
    assert r.stderr.strip().splitlines() == ["error: terminated by SIGTERM"]
    assert leftovers(tmp_path) == []


def test_sigterm_handler_is_restored_after_main(capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert run(capsys, "presets", "list")[0] == 0
    assert signal.getsignal(signal.SIGTERM) is before


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partial_file_of_a_killed_run_is_removed_and_reported(capsys, models, tmp_path):
    out = tmp_path / "o.safetensors"
    pid = dead_pid()
    stale = tmp_path / f".o.safetensors.{pid}.partial"
    stale.write_bytes(b"half a merge")
    live = tmp_path / f".o.safetensors.{os.getppid()}.partial"  # a running process's: not ours to remove
    live.write_bytes(b"still writing")
    other = tmp_path / f".other.safetensors.{pid}.partial"  # another output's: not this run's business
    other.write_bytes(b"x")
    rc, stdout, err = run(capsys, "merge", *ab(models), "-o", out)
    assert rc == 0, err
    assert f"note: removed a partial file left by an interrupted run (process {pid} has ended), {stale}" in \
        stdout.splitlines()
    assert leftovers(tmp_path) == sorted([live.name, other.name, "o.safetensors"])


# -- internal errors ---------------------------------------------------------------------------------------
def test_broken_invariant_is_an_internal_error_not_a_merge_error(models, tmp_path, monkeypatch):
    from lib_merge.io import filesink
    tasks = filesink._tasks
    monkeypatch.setattr(filesink, "_tasks", lambda *a, **k: tasks(*a, **k)[1:])  # a chunk goes missing
    assert not issubclass(InternalError, MergeError)
    with pytest.raises(InternalError, match="out-of-order write at "):
        merge_to_file(Recipe(models=[str(m) for m in ab(models)]), tmp_path / "o.safetensors")
    assert leftovers(tmp_path) == []
    with pytest.raises(InternalError):  # the CLI does not dress a bug up as the user's error
        main(["merge", *map(str, ab(models)), "-o", str(tmp_path / "o.safetensors")])


def test_output_piped_into_a_closed_reader_ends_quietly():
    """`blockmerge presets list | head -1`: the reader goes away; no traceback, exit 141 like Unix tools."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "lib_merge", "presets", "list"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # before the child has written anything
    err = p.stderr.read().decode()
    assert p.wait() == 141
    assert "Traceback" not in err and "Error" not in err


def test_error_after_a_half_drawn_progress_bar_starts_its_own_line(capsys, models, tmp_path, monkeypatch):
    calls, real_pwrite = [], os.pwrite

    def full(fd, data, offset):
        calls.append(offset)
        if len(calls) > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # draw the bar as on a terminal
    monkeypatch.setattr("lib_merge.io.filesink.CHUNK_ELEMS", 64)  # many small writes: the bar is drawn mid-file
    monkeypatch.setattr("lib_merge.io.filesink.BUF_BYTES", 256)
    out = tmp_path / "o.safetensors"
    assert main(["merge", *map(str, ab(models)), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "%" in err and "Traceback" not in err
    assert err.endswith(f"%\nerror: disk full while writing the output (the partial file was removed), {out}\n")
    assert leftovers(tmp_path) == []
