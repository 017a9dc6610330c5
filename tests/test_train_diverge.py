"""A diverged run (#19.13): the first non-finite loss or gradient norm stops training with one
line and exit 3; nothing is written from weights past it. The real tiny CPU fit at lr=1e6, and
the on-device watch (diverge.py) step by step."""
from __future__ import annotations

import json
import math
import re
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from cxr_ddpm.train.config import load_config
from cxr_ddpm.train import state
from cxr_ddpm.train.diverge import (EXIT_DIVERGED, MAX_SKIPPED_STEPS, Divergence, NonFiniteWatch,
                                    earliest)
from cxr_ddpm.train.loop import Clock
from builders import TINY, env, fit_cmd, losses

INF, NAN = float("inf"), float("nan")


def test_diverged_fit_stops_at_the_first_nan_and_keeps_the_last_finite_checkpoint(tmp_path, cxr_mini):
    out = tmp_path / "run"
    # log_every=10: between syncs the steps run unchecked by the host (syncs follow the step
    # time, i.e. this machine's speed); the watch on the device still names the exact step.
    cmd = fit_cmd(cxr_mini, out, "train.lr=1e6", "train.warmup_steps=0", "train.steps=30",
                  "train.log_every=10", "train.save_every=2", "train.sample_every=2", "train.sample_steps=2",
                  "train.num_samples=1")
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == EXIT_DIVERGED == 3, p.stderr[-3000:]
    assert "fit: done" not in p.stderr and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"error: training diverged at step (\d+): loss is NaN \(grad_norm (inf|NaN)\); lower "
                     r"train\.lr \(now 1e6\) or raise train\.warmup_steps \(now 0\); the last finite "
                     r"checkpoint is step (\d+)", last)
    assert m, last
    bad, kept = int(m[1]), int(m[3])
    assert 2 <= kept < bad < 30 and kept == 2 * ((bad - 1) // 2)       # every save before it, none after
    assert [s for s, _ in state.complete_checkpoints(out / state.DS_DIR)] == list(range(2, kept + 1, 2))
    saved = sorted(out.glob("checkpoints/step_*.safetensors"))
    assert [int(f.stem[5:]) for f in saved] == list(range(2, kept + 1, 2))
    for f in saved:                                                    # EMA and online weights
        assert all(np.isfinite(v).all() for v in load_file(str(f)).values()), f
    assert [int(f.stem[5:]) for f in sorted(out.glob("samples/step_*.png"))] == list(range(2, kept + 1, 2))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] == last.removeprefix("error: ") and summary["preempted"] is False
    assert all(math.isfinite(float(v)) for s, v in losses(out) if s < bad)
    assert math.isnan(float(losses(out)[-1][1]))                       # the sync that saw it is logged


def test_a_finite_run_is_done_and_deepspeed_keeps_off_stdout(tmp_path, cxr_mini):
    """Every fit printed DeepSpeed [WARNING] lines on stdout (#19.19); they go to stderr, ERROR up."""
    out = tmp_path / "run"
    p = subprocess.run(fit_cmd(cxr_mini, out, "train.steps=3"), env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "fit: done: step 3/3" in p.stderr, p.stderr[-2000:]
    assert p.stdout == "" and "[WARNING]" not in p.stderr
    assert json.loads((out / "summary.json").read_text())["diverged"] is None
    shown = subprocess.run(fit_cmd(cxr_mini, tmp_path / "run2", "train.steps=1"), capture_output=True,
                           text=True, timeout=300, env=env(CXR_DEEPSPEED_LOG="warning"))
    assert shown.returncode == 0 and shown.stdout == "" and "deepspeed: warning: " in shown.stderr


# ---------------------------------------------------------------- the watch, step by step

def feed(watch: NonFiniteWatch, steps: list[tuple[float, object]]) -> Divergence | None:
    for step, (loss, grad) in enumerate(steps, start=1):
        watch.update(step, torch.tensor(loss), grad)
    return watch.verdict() if watch.flag().item() else None


def test_fp32_stops_at_the_first_non_finite_loss_or_gradient_norm() -> None:
    cpu = torch.device("cpu")
    assert MAX_SKIPPED_STEPS["fp32"] == MAX_SKIPPED_STEPS["bf16"] == 0
    assert feed(NonFiniteWatch(cpu, 0), [(0.5, 1.0), (0.4, 2.0)]) is None
    v = feed(NonFiniteWatch(cpu, 0), [(0.5, 1.0), (0.4, INF), (NAN, INF), (0.3, 1.0)])
    assert v == Divergence(step=2, loss=pytest.approx(0.4), grad_norm=INF, skipped=1)
    v = feed(NonFiniteWatch(cpu, 0), [(0.5, 1.0), (INF, torch.tensor(3.0)), (NAN, NAN)])
    assert (v.step, v.loss, v.grad_norm) == (2, INF, 3.0)             # a tensor norm, as bf16 gives
    v = feed(NonFiniteWatch(cpu, 0), [(0.5, None), (NAN, None)])      # ZeRO-0 without clipping: no norm
    assert (v.step, v.grad_norm) == (2, None)


def test_fp16_excuses_the_loss_scalers_skipped_steps_only() -> None:
    cpu, n = torch.device("cpu"), MAX_SKIPPED_STEPS["fp16"]
    assert n == 17                                                    # hysteresis 2, then 2**16 -> 1
    assert feed(NonFiniteWatch(cpu, n), [(0.5, INF)] * n + [(0.5, 1.0)] + [(0.5, INF)] * n) is None
    v = feed(NonFiniteWatch(cpu, n), [(0.5, 1.0)] + [(0.5, INF)] * (n + 1))
    assert (v.step, v.skipped) == (n + 2, n + 1)
    assert feed(NonFiniteWatch(cpu, n), [(0.5, INF), (NAN, INF)]).step == 2   # the loss is never excused


def test_the_earliest_rank_and_the_message() -> None:
    a, b = Divergence(7, NAN, INF, 1), Divergence(5, 0.25, INF, 18)
    assert earliest([None, a, b]) == b
    assert a.message(1e6, 0, 4) == ("training diverged at step 7: loss is NaN (grad_norm inf); lower train.lr "
                                    "(now 1e6) or raise train.warmup_steps (now 0); the last finite checkpoint "
                                    "is step 4")
    assert b.message(2e-4, 10, None).startswith("training diverged at step 5: grad_norm is inf for 18 step(s) "
                                                "in a row (loss 0.25); lower train.lr (now 0.0002)")
    assert b.message(2e-4, 10, None).endswith("; no checkpoint was written")


def test_saves_and_grids_fall_on_sync_steps() -> None:
    """A write must follow a check of every step before it: save and sample steps are syncs."""
    t = load_config(TINY, ["train.log_every=1000", "train.save_every=7", "train.sample_every=5",
                           "train.steps=100"]).train
    clock = Clock(8)
    clock.next_sync = 10 ** 6
    assert [s for s in range(1, 30) if clock.due(s, t)] == [5, 7, 10, 14, 15, 20, 21, 25, 28]


@pytest.mark.gpu
def test_the_watch_never_makes_the_host_wait_for_the_gpu() -> None:
    dev = torch.device("cuda")
    watch = NonFiniteWatch(dev, 0)
    loss = torch.ones((), device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")          # any host-device sync raises
    try:
        for step, grad in enumerate((1.5, torch.tensor(2.0, device=dev), None), start=1):
            watch.update(step, loss * step, grad)
        flag = watch.flag()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flag.item() == 0.0
