"""Exact-resume checkpoints on disk, and the preemption signal.

Layout of a run folder:

    RUN/deepspeed/step_00000100/         DeepSpeed tag dir (model, optimizer, scheduler shards)
        ema.pt                           EMA shadow weights (rank 0 writes, every rank reads)
        rng_rank{R}.pt                   torch / numpy / python RNG state of rank R
        COMPLETE                         written last, atomically: this checkpoint is whole
    RUN/checkpoints/step_00000100.safetensors   consolidated weights (train.checkpoint format)

A tag dir without COMPLETE is a save that crashed (kill -9, node failure): it is
never resumed from and is deleted at the next successful save. DeepSpeed's own
`latest` file is not used because it is written before all ranks are done.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_ddpm.runtime.config import Config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_write

from .checkpoint import CKPT_DIR, CKPT_NAME, save_checkpoint
from .dist import use_cuda
from .ema import full_state_dict

DS_DIR = "deepspeed"
MARKER = "COMPLETE"
_TAG_RE = re.compile(r"^step_(\d{8})$")
EXIT_REQUEUE = 75        # EX_TEMPFAIL: "stopped on a signal, checkpoint saved, run me again"


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ds_root: Path) -> list[tuple[int, Path]]:
    """(step, tag dir) of every complete checkpoint, oldest first."""
    found = []
    if ds_root.is_dir():
        for d in ds_root.iterdir():
            m = _TAG_RE.match(d.name)
            if m and d.is_dir() and (d / MARKER).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The tag dir to resume from: None = fresh start.

    `auto`: the newest complete checkpoint of this run, or a fresh start when there
    is none. A path: a tag dir (must be complete) or a run folder (its newest).
    """
    if resume is None:
        return None
    if resume == "auto":
        done = complete_checkpoints(run_dir / DS_DIR)
        return done[-1][1] if done else None
    path = Path(resume)
    if not path.exists():
        raise CxrError(f"--resume {resume}: not found")
    if _TAG_RE.match(path.name):
        if not (path / MARKER).is_file():
            raise CxrError(f"--resume {resume}: checkpoint is incomplete (no {MARKER} marker: "
                           "its save was interrupted); pick an older one")
        return path
    for root in (path / DS_DIR, path):
        done = complete_checkpoints(root)
        if done:
            return done[-1][1]
    raise CxrError(f"--resume {resume}: holds no complete DeepSpeed checkpoint")


def mark_complete(tag_dir: Path, info: dict[str, Any]) -> None:
    with atomic_write(tag_dir / MARKER, "w") as f:
        json.dump({**info, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop crashed (incomplete) saves.

    Consolidated .safetensors files are pruned to the same steps (plus any newer).
    Call on rank 0 only, after the newest checkpoint is marked complete.
    """
    ds_root = run_dir / DS_DIR
    done = complete_checkpoints(ds_root)
    keep = {step for step, _ in done[-keep_last:]}
    for d in ds_root.iterdir() if ds_root.is_dir() else ():
        m = _TAG_RE.match(d.name)
        if m and int(m.group(1)) not in keep:
            shutil.rmtree(d, ignore_errors=True)
    oldest_kept = min(keep) if keep else 0
    for f in (run_dir / CKPT_DIR).glob("step_*.safetensors"):
        m = re.match(r"step_(\d+)\.safetensors$", f.name)
        if m and int(m.group(1)) < oldest_kept:
            f.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# saving: every rank's shards, then the marker, then the consolidated file

def save_all(engine: Any, ema: Any, cfg: Config, images: Any, run: Path, world: Any, step: int) -> None:
    """DeepSpeed checkpoint + EMA + RNG, marked complete last; then the consolidated file."""
    import torch.distributed as dist
    ds_root = run / DS_DIR
    tag = tag_name(step)
    engine.save_checkpoint(str(ds_root), tag=tag, client_state={"step": step}, save_latest=False)
    tag_dir = ds_root / tag
    save_rank_state(tag_dir, world.rank)
    if world.is_main:
        with atomic_write(tag_dir / "ema.pt") as f:
            torch.save(ema.state_dict(), f)
    debug_sleep = float(os.environ.get("CXR_DEBUG_SAVE_SLEEP", "0"))  # tests: a window to kill -9 mid-save
    if debug_sleep:
        time.sleep(debug_sleep)
    dist.barrier()                                     # every rank's shards are on disk
    online = full_state_dict(engine.module.unet, cfg.train.zero_stage)  # collective under ZeRO-3
    # Every rank must hold the same weights; a skipped gradient all-reduce (seen with some
    # DeepSpeed CPU configs) shows up here as differing digests, recorded in the marker.
    digests: list[str] = [""] * world.world_size
    dist.all_gather_object(digests, param_digest(online))
    if world.is_main:
        if len(set(digests)) > 1:
            print(f"warning: ranks hold different weights at step {step}: {digests}", file=sys.stderr)
        mark_complete(tag_dir, {"step": step, "world_size": world.world_size,
                                "zero_stage": cfg.train.zero_stage, "param_digests": digests})
        save_checkpoint(run / CKPT_DIR / CKPT_NAME.format(step=step), cfg=cfg, step=step,
                        class_names=list(images.class_names), ema=ema.cpu_shadow(), online=online,
                        data_fingerprint=images.fingerprint(), zero_stage=cfg.train.zero_stage,
                        world_size=world.world_size)
        prune(run, cfg.train.keep_last)
    dist.barrier()


def param_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# RNG state: per rank, so every rank's noise stream continues where it stopped

def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if use_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and use_cuda():
        torch.cuda.set_rng_state(state["cuda"])


def save_rank_state(tag_dir: Path, rank: int) -> None:
    with atomic_write(tag_dir / f"rng_rank{rank}.pt") as f:
        torch.save(rng_state(), f)


def load_rank_state(tag_dir: Path, rank: int) -> None:
    path = tag_dir / f"rng_rank{rank}.pt"
    if not path.is_file():
        raise CxrError(f"{tag_dir}: no RNG state for rank {rank} (was it saved with a different "
                       "number of ranks?)")
    set_rng_state(torch.load(path, weights_only=False))  # our own file: numpy state needs pickle


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# preemption: Slurm sends SIGUSR1 (--signal=USR1@120) before the time limit and
# SIGTERM on preemption/scancel. The handler only sets a flag; the loop finishes
# its step, agrees with the other ranks, saves and exits with EXIT_REQUEUE.

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signum: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: Slurm (and `kill -- -PGID`) signal every process of the
    job, workers included; torch's workers die on SIGTERM and take the trainer down with a
    traceback before it can save. The main process owns the stop; its workers ignore it
    (they exit with the main process, which torch's worker watchdog notices).
    Also called by the CLI once a stopped run has saved, right before it exits 75."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
