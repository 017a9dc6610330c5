"""Training faults as production delivers them: a second writer on a run folder, kill -9 between
COMPLETE and the consolidated file, a full disk mid-save, damaged checkpoints, an edited config,
a crash with DataLoader workers alive. Real processes (DeepSpeed, gloo), real files, real signals.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from conftest import assert_user_error, small_tmpfs
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.train import state
from cxr_ddpm.train.checkpoint import load_checkpoint
from cxr_ddpm.train.cli import main
from builders import BIN, TINY, env, fit_cmd, losses, run_ok

TIMEOUT = 180        # generous: only there to turn a hang into a failure


def run(cmd: list[str], **env_extra: str) -> SimpleNamespace:
    """Run to the end (killing the whole process group on a hang); a result assert_user_error reads."""
    proc = subprocess.Popen(cmd, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return SimpleNamespace(exit_code=proc.returncode, stdout=out, stderr=err, output=out + err)


def start(cmd: list[str], log: Path, **env_extra: str) -> subprocess.Popen:
    """A trainer in its own process group (so it can be killed whole), stderr to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env(**env_extra), stderr=f, start_new_session=True)


def kill9(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(what: str, cond, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + TIMEOUT
    while not cond():
        assert proc.poll() is None, f"trainer exited ({proc.returncode}) before {what}: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} within {TIMEOUT} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cxr_mini: Path) -> Path:
    """A run resumed once: complete checkpoints at steps 2, 4 (first leg) and 6 (second leg)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run_ok(fit_cmd(cxr_mini, out, "train.steps=4", "train.save_every=2"))
    run_ok(fit_cmd(cxr_mini, out, "train.steps=6", "train.save_every=2", resume="auto"))
    assert [s for s, _ in state.complete_checkpoints(out / state.DS_DIR)] == [2, 4, 6]
    return out


def copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# -----------------------------------------------------------------------------
# item 1: one writer per run folder

@pytest.mark.slow
def test_second_writer_refused_and_a_killed_one_never_blocks(tmp_path, cxr_mini):
    out = tmp_path / "run"
    log = tmp_path / "holder.log"
    holder = start(fit_cmd(cxr_mini, out, "train.steps=400"), log)
    try:
        wait_for("a logged step", lambda: (out / "log.csv").is_file() and len(losses(out)) >= 1, holder, log)
        who = f"{out}: in use by cxr-train fit pid {holder.pid} on {socket.gethostname()}"
        res = run(fit_cmd(cxr_mini, out, "train.steps=2"))
        assert_user_error(res, who, progress=True)
        # two ranks: rank 0 alone locks; both learn of the refusal and leave (no wait for a rank 0
        # that left before the process group, which only the launcher's kill would end)
        res = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "cxr_ddpm.train.cli",
                   *fit_cmd(cxr_mini, out, "train.steps=2")[1:]])
        assert res.exit_code != 0
        assert res.stderr.count(f"error: {who}") == 2, res.stderr[-3000:]
        assert holder.poll() is None                      # the holder trains on, undisturbed
    finally:
        kill9(holder)                                     # dies holding the lock
    p = run_ok(fit_cmd(cxr_mini, out, "train.steps=2"))   # the kernel dropped the lock with it
    assert "fit: done: step 2/2" in p.stderr and not (out / ".lock").exists()


# -----------------------------------------------------------------------------
# item 2: kill -9 between COMPLETE and the consolidated file

@pytest.mark.slow
def test_kill9_after_complete_resume_writes_the_consolidated_file(tmp_path, cxr_mini):
    out = tmp_path / "run"
    run_ok(fit_cmd(cxr_mini, out, "train.steps=2"))
    tag = out / state.DS_DIR / "step_00000004"
    # the trainer waits after writing COMPLETE (test hook, see resume._test_pause): killed right there
    log = tmp_path / "leg2.log"
    proc = start(fit_cmd(cxr_mini, out, "train.steps=4", resume="auto"), log,
                 CXR_TEST_PAUSE_AFTER_COMPLETE=str(tmp_path / "never"))
    try:
        wait_for("COMPLETE of step 4", lambda: (tag / state.MARKER).is_file(), proc, log)
    finally:
        kill9(proc)
    consolidated = out / "checkpoints" / "step_00000004.safetensors"
    assert not consolidated.exists() and load_checkpoint(out).step == 2   # what export would take
    p = run_ok(fit_cmd(cxr_mini, out, "train.steps=4", resume="auto"))
    assert "resuming from step_00000004" in p.stderr and "fit: done: step 4/4" in p.stderr
    assert f"wrote {consolidated}" in p.stderr
    ck = load_checkpoint(out)
    assert ck.path == consolidated and ck.step == 4
    ema = torch.load(tag / "ema.pt", weights_only=True)["shadow"]
    module = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(ck.ema[k], ema[k].float()) for k in ck.ema)           # the saved EMA
    assert all(torch.equal(ck.online[k], module[f"unet.{k}"].float()) for k in ck.online)   # and weights


# -----------------------------------------------------------------------------
# item 5: a full disk mid-save

def test_full_disk_during_save_one_line_no_hang(tmp_path, cxr_mini):
    # one checkpoint of the tiny model takes ~5.6 MB: the step-2 save fits, the step-4 save does not
    with small_tmpfs(tmp_path / "disk", "8m") as disk:
        out = disk / "run"
        # workers > 0: they ignore SIGTERM, which made the failed run hang at exit for good
        res = run(fit_cmd(cxr_mini, out, "train.steps=4", "train.save_every=2", "data.num_workers=1"))
        assert_user_error(res, f"{out / state.DS_DIR / 'step_00000004'}: cannot save the step 4 checkpoint",
                          "No space left on device", "the newest complete checkpoint is still step_00000002",
                          progress=True)
        assert state.find_resume(out, "auto").name == "step_00000002"
        assert load_checkpoint(out).step == 2


def test_crash_with_loader_workers_alive_exits(tmp_path, cxr_mini):
    """Any error out of fit leaves its loader alive in the traceback; multiprocessing's exit
    handler then SIGTERMs the workers (which ignore it) and joins them: it must not wait forever."""
    script = textwrap.dedent(f"""
        from cxr_ddpm.train.config import load_config
        from cxr_ddpm.train.data import list_images
        from cxr_ddpm.train.dist import resolve_world
        from cxr_ddpm.train.batches import make_loader
        cfg = load_config({TINY!r}, ["data.num_workers=1", "train.micro_batch=2"])
        batches = make_loader(cfg, list_images({str(cxr_mini)!r}), resolve_world(), 0, False)
        next(batches)
        raise RuntimeError("a bug inside the loop")
    """)
    res = run([sys.executable, "-c", script])
    assert res.exit_code == 1 and "RuntimeError: a bug inside the loop" in res.stderr


# -----------------------------------------------------------------------------
# items 6, 15, 19: damaged checkpoints; log.csv across a resume

def test_elapsed_continues_across_resume(trained):
    with open(trained / "log.csv", newline="") as f:
        rows = [(int(r["step"]), float(r["elapsed_s"])) for r in csv.DictReader(f)]
    assert [s for s, _ in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[3][1] > 0 and all(a[1] <= b[1] for a, b in zip(rows, rows[1:])), rows


def test_resume_auto_skips_damaged_checkpoints(trained, tmp_path, cxr_mini):
    out = copy_run(trained, tmp_path)
    ds = out / state.DS_DIR
    shard = ds / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:                         # cut short, as a full disk or a copy leaves it
        f.truncate(shard.stat().st_size // 2)
    (ds / "step_00000006" / "ema.pt").write_bytes(b"")    # zero bytes (was: "interrupted", exit 130)
    dead = out / ".log.csv.k1ll3d.tmp"                    # what kill -9 mid-write leaves
    dead.write_text("half")
    with pytest.raises(CxrError, match=r"step_00000004: checkpoint is damaged \(zero_pp_rank_0"):
        state.find_resume(out, str(ds / "step_00000004"))
    p = run_ok(fit_cmd(cxr_mini, out, "train.steps=6", "train.save_every=2", resume="auto"))
    assert (f"warning: {ds / 'step_00000006'}: checkpoint is damaged (ema.pt is truncated or corrupt "
            "(0 bytes))") in p.stderr
    assert f"warning: {ds / 'step_00000004'}: checkpoint is damaged ({shard.name} is truncated" in p.stderr
    assert "resuming from step_00000002" in p.stderr and "Traceback" not in p.stderr
    assert losses(out) == losses(trained)                 # exact resume from step 2, re-saved 4 and 6
    assert all(state.damage(d) is None for _, d in state.complete_checkpoints(ds)) and not dead.exists()
    for _, d in state.complete_checkpoints(ds):
        (d / "ema.pt").write_bytes(b"")
    with pytest.raises(CxrError, match="every complete checkpoint is damaged"):
        state.find_resume(out, "auto")


def test_checkpoint_that_fails_to_load_one_line(trained, tmp_path, cxr_mini):
    """Damage the file check cannot see (a whole archive of the wrong content): one line too."""
    out = copy_run(trained, tmp_path)
    tag = out / state.DS_DIR / "step_00000002"
    torch.save({"not": "an EMA"}, tag / "ema.pt")
    res = run(fit_cmd(cxr_mini, out, "train.steps=6", resume=str(tag)))
    assert_user_error(res, f"{tag}: cannot load this checkpoint (KeyError", progress=True)


# -----------------------------------------------------------------------------
# items 7, 19: resuming with another model, or past train.steps

def fit_in_process(*args: str):
    """`cxr-train fit ARGS` in this process (checks that fail before any process group starts)."""
    return CliRunner().invoke(main, ["fit", *map(str, args)],
                              env={"RANK": None, "WORLD_SIZE": None, "SLURM_STEP_NUM_TASKS": None,
                                   "CXR_DEVICE": "cpu"})


def test_resume_with_edited_config_refused(trained, tmp_path, cxr_mini):
    out = copy_run(trained, tmp_path)
    saved = out / "config.yaml"
    text = saved.read_text()
    assert "  dim: 16\n" in text
    saved.write_text(text.replace("  dim: 16\n", "  dim: 32\n"))      # "another model size"
    res = fit_in_process("--config", saved, "--data", cxr_mini, "--out", out, "--resume", "auto")
    assert_user_error(res, f"{out / state.DS_DIR / 'step_00000006'}: checkpoint's model.dim=16 does not "
                           "match the requested model.dim=32")


def test_resume_past_train_steps_refused(trained, tmp_path, cxr_mini):
    out = copy_run(trained, tmp_path)
    res = fit_in_process("--config", TINY, "--data", cxr_mini, "--out", out, "--set", "train.steps=3",
                         "--resume", "auto")
    assert_user_error(res, "step_00000006 is at step 6, past train.steps=3")


# -----------------------------------------------------------------------------
# item 19: temp files of a killed `cxr-train prepare`

def test_prepare_removes_a_killed_prepares_temp_folder(tmp_path, cxr_mini):
    from cxr_ddpm.train.prepared import prepare
    dead = tmp_path / ".p32.k1ll3d.tmp"                  # kill -9 runs no cleanup: this is what stays
    dead.mkdir()
    (dead / "images.npy").write_bytes(b"half")
    prepare(cxr_mini, 32, tmp_path / "p32", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p32"]
