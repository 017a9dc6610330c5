"""Faults a new user hit with sample sets (issue 19): two writers on one folder, a killed
writer, hand-edited records, files changed behind the record, folders where files belong,
absurd counts. Real processes (kill -9, SIGSTOP), real file edits, a real full tmpfs."""
from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import assert_user_error, small_tmpfs
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import file_sha256
from builders import run, sample

CLI = [sys.executable, "-m", "cxr_ddpm.runtime.cli"]


def _start(engine: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "sample", "--engine", str(engine), "--out", str(out), "--threads", "1",
                             "--steps", "3", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> SimpleNamespace:
    """A finished process as assert_user_error reads a CliRunner result."""
    out, err = p.communicate(timeout=600)
    return SimpleNamespace(exit_code=p.returncode, output=out + err, stdout=out, stderr=err)


def _holder(lock: Path, procs: list[subprocess.Popen]) -> subprocess.Popen | None:
    """The process that holds `lock` (its pid is the file's first word), once it does; None if
    every process ended first (no lock was ever taken: the behaviour before the fix)."""
    by_pid = {p.pid: p for p in procs}
    deadline = time.monotonic() + 600                      # a hang guard only, never a measurement
    while time.monotonic() < deadline:
        try:
            words = lock.read_text().split()
        except FileNotFoundError:
            words = []
        if words and int(words[0]) in by_pid and by_pid[int(words[0])].poll() is None:
            return by_pid[int(words[0])]
        if all(p.poll() is not None for p in procs):
            return None
        time.sleep(0.002)
    raise AssertionError(f"{lock}: never held")


def _consistent(out: Path, n: int) -> dict:
    """samples.json is complete and every listed file, and only those, is on disk as recorded."""
    rec = json.loads((out / "samples.json").read_text())
    assert rec["complete"] is True and len(rec["images"]) == n
    assert all(file_sha256(out / e["file"]) == e["sha256"] for e in rec["images"])
    assert sorted(p.name for p in out.glob("sample_*")) == sorted(rec["files"])
    return rec


# ----------------------------------------------------------------------------- one writer per set
def test_two_writers_started_together_one_is_refused(onnx_path: Path, tmp_path: Path) -> None:
    """The issue's command: both used to exit 0 while the record listed hashes not on disk."""
    out = tmp_path / "s"
    a = _start(onnx_path, out, "-n", "40", "--batch-size", "20", "--seed", "1")
    b = _start(onnx_path, out, "-n", "40", "--batch-size", "1", "--seed", "2")
    holder = _holder(out / ".samples.json.lock", [a, b])
    assert holder is not None, [_finish(a).output, _finish(b).output]
    other = b if holder is a else a
    os.kill(holder.pid, signal.SIGSTOP)                    # keep it holding while the other tries
    try:
        refused = _finish(other)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    ok = _finish(holder)
    assert ok.exit_code == 0 and "wrote 40 images" in ok.stdout, ok.output
    assert_user_error(refused, f"{out}: in use by cxr-runtime sample pid {holder.pid} on {socket.gethostname()}",
                      "wait for it or use another folder")        # one line, before any progress bar
    rec = _consistent(out, 40)
    assert rec["seed"] == (1 if holder is a else 2)
    assert run("manifest", out).exit_code == 0
    assert not (out / ".samples.json.lock").exists()              # released and removed


def test_killed_writer_does_not_block_the_next(onnx_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    a = _start(onnx_path, out, "-n", "40", "--batch-size", "2")
    assert _holder(out / ".samples.json.lock", [a]) is a
    a.kill()                                               # SIGKILL: no cleanup runs
    assert _finish(a).exit_code == -signal.SIGKILL
    assert (out / ".samples.json.lock").exists()           # left behind: harmless
    res = sample(onnx_path, out, "-n", "40", "--batch-size", "2", "--steps", "3")
    assert res.exit_code == 0 and "wrote" in res.output, res.output
    _consistent(out, 40)
    assert not (out / ".samples.json.lock").exists()


def test_shards_write_side_by_side_but_one_shard_has_one_writer(onnx_path: Path, tmp_path: Path) -> None:
    out, common = tmp_path / "arr", ("-n", "40", "--batch-size", "2", "--request-time", "2026-11-26T17:00:00Z")
    a = _start(onnx_path, out, *common, "--shard", "0/2")
    assert _holder(out / ".samples.shard-00000-of-00002.json.lock", [a]) is a
    os.kill(a.pid, signal.SIGSTOP)
    try:
        res = sample(onnx_path, out, *common, "--steps", "3", "--shard", "1/2")      # the other shard: runs
        assert res.exit_code == 0, res.output
        busy = f"in use by cxr-runtime sample --shard 0/2 pid {a.pid} on {socket.gethostname()}"
        assert_user_error(sample(onnx_path, out, *common, "--steps", "3", "--shard", "0/2"), busy)
        assert_user_error(run("manifest", out), busy)            # the merge waits for every writer
        assert not (out / "manifest.csv").exists()
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert _finish(a).exit_code == 0
    res = run("manifest", out)
    assert res.exit_code == 0 and "40 images from 2 shards" in res.output, res.output
    _consistent(out, 40)


def test_exclusive_lock_names_the_holder_and_dies_with_it(tmp_path: Path) -> None:
    """The helper itself (run folders use it too): a second process is refused in one line."""
    from cxr_ddpm.runtime.fsutil import exclusive_lock
    code = ("import sys; from cxr_ddpm.runtime.fsutil import exclusive_lock\n"
            f"with exclusive_lock({str(tmp_path)!r}, 'cxr-train fit'):\n"
            "    print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(CxrError) as e:
            with exclusive_lock(tmp_path, "cxr-train fit"):
                pass
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path}: in use by cxr-train fit pid {holder.pid} on {socket.gethostname()} "
                              "(started ") and msg.endswith("; wait for it or use another folder")
        assert "\n" not in msg
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(tmp_path, "next") as lock:          # the kernel dropped the killed holder's lock
        assert lock.read_text().split()[0] == str(os.getpid())
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- records vs the disk
def _shards(engine: Path, out: Path, n: int = 4) -> None:
    for k in range(2):
        res = sample(engine, out, "-n", str(n), "--steps", "2", "--shard", f"{k}/2",
                     "--request-time", "2026-11-26T17:00:00Z")
        assert res.exit_code == 0, res.output


def _edit(path: Path, change) -> None:
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))


SHARD0, SHARD1 = "samples.shard-00000-of-00002.json", "samples.shard-00001-of-00002.json"


@pytest.mark.parametrize("case, needle", [
    ("deleted", f"sample_00003.png missing (in {SHARD1})"),
    ("sha256", f"sample_00002.png sha256 "),
    ("size", f"sample_00001.png 1 bytes, "),
])
def test_manifest_checks_every_listed_file(onnx_path: Path, tmp_path: Path, case: str, needle: str) -> None:
    out = tmp_path / "arr"
    _shards(onnx_path, out)
    if case == "deleted":
        (out / "sample_00003.png").unlink()
    elif case == "sha256":
        _edit(out / SHARD1, lambda r: r["images"][0].update(sha256="0" * 64))
    else:
        (out / "sample_00001.png").write_bytes(b"x")       # replaced behind the record's back
    res = run("manifest", out)
    assert_user_error(res, "1 of 4 listed images are not on disk as recorded", needle,
                      "rerun the sample command that made them")
    assert not (out / "manifest.csv").exists() and not (out / "samples.json").exists()
    # the rerun of the shards remakes what is wrong; then the merge goes through
    _shards(onnx_path, out)
    assert run("manifest", out).exit_code == 0


def test_manifest_of_one_process_set_checks_files_too(onnx_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert sample(onnx_path, out, "-n", "3", "--steps", "2").exit_code == 0
    (out / "sample_00001.png").unlink()
    assert_user_error(run("manifest", out), "sample_00001.png missing (in samples.json)")


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r.pop("n"), f"{SHARD0}: field 'n' is missing"),
    (lambda r: r.update(n="eight"), f"{SHARD0}: field 'n' is 'eight', expected a whole number"),
    (lambda r: r["images"][1].pop("index"), f"{SHARD0}: images[1] field 'index' is missing"),
    (lambda r: r["images"][0].update(index=99), f"{SHARD0}: images[0] field 'index' is 99, expected"),
])
def test_manifest_names_the_bad_field_of_a_hand_edited_record(onnx_path: Path, tmp_path: Path,
                                                              edit, needle: str) -> None:
    out = tmp_path / "arr"
    _shards(onnx_path, out)
    _edit(out / SHARD0, edit)
    assert_user_error(run("manifest", out), needle)


def test_rerun_names_an_entry_without_its_file(onnx_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert sample(onnx_path, out, "-n", "3", "--steps", "2").exit_code == 0
    _edit(out / "samples.json", lambda r: r["images"][1].pop("file"))
    assert_user_error(sample(onnx_path, out, "-n", "3", "--steps", "2"),
                      f"{out / 'samples.json'}: images[1] (index 1) field 'file' is missing")


@pytest.mark.parametrize("name", ["samples.json", "manifest.csv"])
def test_a_folder_where_the_record_goes_is_refused_first(onnx_path: Path, tmp_path: Path, name: str) -> None:
    """It used to fail after every image was made, naming an image, and remove them all."""
    out = tmp_path / "s"
    (out / name).mkdir(parents=True)
    res = sample(onnx_path, out, "-n", "3", "--steps", "2")
    assert_user_error(res, f"{out / name}: is a folder")
    assert not list(out.glob("sample_*")) and sorted(p.name for p in out.iterdir()) == [name]


# ----------------------------------------------------------------------------- the grid
def test_grid_that_is_a_folder_is_refused_before_sampling(onnx_path: Path, tmp_path: Path) -> None:
    (tmp_path / "g").mkdir()
    res = sample(onnx_path, tmp_path / "s", "-n", "3", "--steps", "2", "--grid", tmp_path / "g")
    assert_user_error(res, f"--grid {tmp_path / 'g'}: is a folder")
    assert not (tmp_path / "s").exists()


def test_grid_failing_at_the_end_leaves_the_set_complete(onnx_path: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "full", "16k") as disk:
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)   # fill it: the grid cannot be written
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        res = sample(onnx_path, tmp_path / "s", "-n", "3", "--steps", "2", "--grid", disk / "grid.png")
        assert_user_error(res, f"--grid {disk / 'grid.png'}: cannot write (No space left on device)",
                          "the set itself is complete", progress=True)
        rec = _consistent(tmp_path / "s", 3)
        assert rec["grid"] is None and (tmp_path / "s" / "manifest.csv").is_file()


def test_rerun_with_nothing_to_make_claims_no_grid(onnx_path: Path, tmp_path: Path) -> None:
    out, grid = tmp_path / "s", tmp_path / "grid.png"
    assert sample(onnx_path, out, "-n", "2", "--steps", "2").exit_code == 0
    res = sample(onnx_path, out, "-n", "2", "--steps", "2", "--grid", grid)
    assert res.exit_code == 0, res.output
    assert "grid" not in res.stdout and not grid.exists()
    assert f"warning: --grid {grid}: not written, no image was made in this run" in res.stderr
    assert json.loads((out / "samples.json").read_text())["grid"] is None


# ----------------------------------------------------------------------------- numbers
def _limited(*args: str) -> subprocess.CompletedProcess:
    """A CLI run under a 4 GiB address-space limit: a command that builds an index list of
    1e20 entries dies of MemoryError instead of taking the machine down."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, preexec_fn=limit)


@pytest.mark.parametrize("flag", ["-n", "--per-class"])
def test_huge_counts_are_refused_before_anything(onnx_path: Path, tmp_path: Path, flag: str) -> None:
    p = _limited("sample", "--engine", str(onnx_path), "--out", str(tmp_path / "s"), "--steps", "2",
                 flag, "99999999999999999999")
    assert p.returncode == 2 and p.stderr.splitlines() == [
        f"error: {flag} 99999999999999999999: at most 10000000 images per sample set"
        + (" (split a bigger one over several --out folders)" if flag == "-n" else "")], p.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", ["sample", "bench"])
def test_threads_must_be_positive(onnx_path: Path, tmp_path: Path, command: str) -> None:
    extra = ("--out", tmp_path / "s") if command == "sample" else ()
    res = run(command, "--engine", onnx_path, *extra, "--threads", "-3")
    assert_user_error(res, "'--threads': -3 is not in the range x>=1")
    assert not (tmp_path / "s").exists()
