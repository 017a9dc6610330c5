"""Real training runs on CPU: plain process, torchrun x2 (ZeRO-1/3), SIGTERM + resume, kill -9 mid-save.

Each test starts real processes (DeepSpeed, gloo) on the bundled radiographs with
a handful of tiny steps, so the whole file stays within about two minutes on 2 cores.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cxr_ddpm.train import preempt, state
from cxr_ddpm.train.checkpoint import load_checkpoint

from builders import BIN, TINY, env, fit_cmd, losses, run_ok  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------

def test_fit_world_size_1(tmp_path, cxr_mini, tiny_cfg):
    out = tmp_path / "run"
    p = run_ok(fit_cmd(cxr_mini, out, "train.steps=4", "train.sample_every=4", "train.sample_steps=3",
                       "train.num_samples=4", "train.tensorboard=true", "train.channels_last=true"))
    assert "fit: done: step 4/4" in p.stderr and "images/s" in p.stderr and "peak memory" in p.stderr
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]
    assert all(float(v) > 0 for _, v in losses(out))
    ck = load_checkpoint(out / "checkpoints" / "step_00000004.safetensors", config=tiny_cfg)
    assert ck.step == 4 and ck.class_names == ["COVID-19", "Normal"] and ck.ema and ck.online
    assert ck.meta["provenance"]["data_fingerprint"]
    assert not all(torch.equal(ck.ema[k], ck.online[k]) for k in ck.ema)     # EMA lags the online weights
    unet = ck.build_unet(ema=True).state_dict()
    assert all(torch.equal(unet[k], ck.ema[k]) for k in ck.ema)
    with open(out / "log.csv", newline="") as f:              # where a step's time goes
        assert all(0 <= float(r["data_wait_pct"]) <= 100 for r in csv.DictReader(f))
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1     # train.tensorboard
    from PIL import Image
    grid = Image.open(out / "samples" / "step_00000004.png")
    assert grid.mode == "L" and grid.size == (2 + 2 * 34, 2 + 2 * 34)   # 4 samples of 32 px, 2 x 2
    assert (out / "config.yaml").is_file() and json.loads((out / "summary.json").read_text())["step"] == 4


# Run in the training process: count what each save would otherwise redo (stat every data file, run git).
_COUNT_PROVENANCE = """
import atexit, json, subprocess, sys
from cxr_ddpm.train.cli import main
from cxr_ddpm.train.data import ImageList
calls = {"fingerprint": 0, "git": 0}
fingerprint, run = ImageList.fingerprint, subprocess.run
def counted_fingerprint(self):
    calls["fingerprint"] += 1
    return fingerprint(self)
def counted_run(cmd, *a, **k):
    calls["git"] += cmd[:1] == ["git"]
    return run(cmd, *a, **k)
ImageList.fingerprint, subprocess.run = counted_fingerprint, counted_run
atexit.register(lambda: print("calls=" + json.dumps(calls), file=sys.stderr))
sys.argv = ["cxr-train", *sys.argv[1:]]
main()
"""


def test_provenance_is_computed_once_per_run_not_per_save(tmp_path, cxr_mini):
    """Every save records the data fingerprint and the git commit; computing them at each save
    stats every data file (a whole shared filesystem at cluster scale) and runs git each time."""
    out = tmp_path / "run"
    p = run_ok([sys.executable, "-c", _COUNT_PROVENANCE,
                *fit_cmd(cxr_mini, out, "train.steps=4", "train.save_every=1", "train.keep_last=4")[1:]])
    calls = json.loads(p.stderr.rsplit("calls=", 1)[1])
    saved = sorted((out / "checkpoints").glob("step_*.safetensors"))
    assert len(saved) == 4 and calls["fingerprint"] == 1 and calls["git"] <= 1, calls
    recorded = {(m["data_fingerprint"], m.get("git_commit"))
                for m in (load_checkpoint(f).meta["provenance"] for f in saved)}
    assert len(recorded) == 1 and next(iter(recorded))[0], recorded   # every save records the same


@pytest.mark.parametrize("stage", [1, 3])
def test_torchrun_two_ranks(tmp_path, cxr_mini, tiny_cfg, stage):
    out = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "cxr_ddpm.train.cli",
           *fit_cmd(cxr_mini, out, "train.steps=3", f"train.zero_stage={stage}")[1:]]
    p = run_ok(cmd)
    assert "2 rank(s)" in p.stderr and f"ZeRO-{stage}" in p.stderr
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    marker = json.loads((out / "deepspeed" / "step_00000003" / state.MARKER).read_text())
    assert marker["world_size"] == 2 and len(set(marker["param_digests"])) == 1   # ranks agree
    assert (out / "deepspeed" / "step_00000003" / "rng_rank1.pt").is_file()
    ck = load_checkpoint(out, config=tiny_cfg)
    assert ck.step == 3
    unet = ck.build_unet(ema=False).state_dict()
    assert all(torch.equal(unet[k], ck.online[k]) for k in ck.online)


def test_fit_from_prepared_folder(tmp_path, cxr_mini, tiny_cfg):
    """`cxr-train prepare` then `fit --data` on it: trains like the raw folders, same provenance."""
    from cxr_ddpm.train.data import list_images
    from cxr_ddpm.train.prepared import prepare

    prepare(cxr_mini, 32, tmp_path / "p32", progress=False)
    sets = ["train.steps=3", "data.num_workers=1", "data.hflip=true", "train.ema_every=2"]
    run_ok(fit_cmd(tmp_path / "p32", tmp_path / "prep", *sets))   # workers read the memory map
    run_ok(fit_cmd(cxr_mini, tmp_path / "raw", *sets))
    prep, raw = losses(tmp_path / "prep"), losses(tmp_path / "raw")
    assert [s for s, _ in prep] == [1, 2, 3]
    # same images, flips and noise; pixels differ by at most 0.5/255, so the losses barely do
    assert all(abs(float(a) - float(b)) <= 1e-2 * float(b) for (_, a), (_, b) in zip(prep, raw)), (prep, raw)
    ck = load_checkpoint(tmp_path / "prep", config=tiny_cfg)
    assert ck.meta["provenance"]["data_fingerprint"] == list_images(cxr_mini).fingerprint()


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(tmp_path, cxr_mini):
    steps = ["train.steps=16"]
    ref = tmp_path / "ref"
    run_ok(fit_cmd(cxr_mini, ref, *steps))
    run = tmp_path / "run"
    proc = subprocess.Popen(fit_cmd(cxr_mini, run, *steps), env=env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:   # wait for the loop to be running
        if (run / "log.csv").is_file() and len(losses(run)) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == preempt.EXIT_REQUEUE, err[-2000:]
    stopped = state.find_resume(run, "auto")
    stop_step = int(stopped.name.split("_")[1])
    assert 2 <= stop_step < 16 and "stopped by signal" in err
    p = run_ok(fit_cmd(cxr_mini, run, *steps, resume="auto"))
    assert f"resuming from {stopped.name}" in p.stderr
    assert losses(run) == losses(ref)            # bit-identical loss sequence, steps 1..16


def _wait_for_steps(proc: subprocess.Popen, run: Path, n: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.csv").is_file() and len(losses(run)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {n} (exit code {proc.poll()})")


@pytest.mark.parametrize("launcher", ["plain", "torchrun"])
def test_sigterm_to_process_group_with_workers(tmp_path, cxr_mini, launcher):
    """Slurm signals every process of the step, DataLoader workers included (`kill -- -PGID`).
    Plain python (as under srun): save, exit 75. torchrun: its agent is signalled too, forwards
    SIGTERM to the rank and exits non-zero; the rank's checkpoint must still be complete."""
    run = tmp_path / "run"
    cmd = fit_cmd(cxr_mini, run, "train.steps=400", "data.num_workers=2", "train.log_every=1")
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=1", "-m", "cxr_ddpm.train.cli", *cmd[1:]]
    proc = subprocess.Popen(cmd, env=env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_steps(proc, run, 2)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGTERM)               # the group: trainer, workers (and agent)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "DataLoader worker" not in err and "stopped by signal 15" in err, err[-3000:]
    if launcher == "plain":
        assert proc.returncode == preempt.EXIT_REQUEUE, err[-3000:]
        assert time.time() - t0 < 10                      # acted on (and saved) within 10 s
    else:
        assert proc.returncode != 0
    stopped = state.find_resume(run, "auto")
    stop_step = int(stopped.name.split("_")[1])
    assert stop_step >= 2 and (run / "checkpoints" / f"step_{stop_step:08d}.safetensors").is_file()
    p = run_ok(fit_cmd(cxr_mini, run, f"train.steps={stop_step + 2}", "data.num_workers=2", resume="auto"))
    assert f"resuming from {stopped.name}" in p.stderr
    assert [s for s, _ in losses(run)] == list(range(1, stop_step + 3))


@pytest.mark.slow
def test_kill9_mid_save_resume_auto_uses_previous(tmp_path, cxr_mini):
    run = tmp_path / "run"
    run_ok(fit_cmd(cxr_mini, run, "train.steps=2"))
    # second leg: its save at step 4 sleeps after writing the DeepSpeed files, before the marker
    proc = subprocess.Popen(fit_cmd(cxr_mini, run, "train.steps=4", resume="auto"),
                            env=env(CXR_DEBUG_SAVE_SLEEP="60"), stderr=subprocess.DEVNULL)
    half = run / "deepspeed" / "step_00000004"
    deadline = time.time() + 120
    while time.time() < deadline and not (half / "ema.pt").is_file():
        assert proc.poll() is None, "training ended before its save"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert any(half.iterdir()) and not (half / state.MARKER).exists()
    assert state.find_resume(run, "auto").name == "step_00000002"
    p = run_ok(fit_cmd(cxr_mini, run, "train.steps=4", resume="auto"))
    assert "resuming from step_00000002" in p.stderr
    assert (half / state.MARKER).is_file() and load_checkpoint(run).step == 4
