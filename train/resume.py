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
COMPLETE records the config the checkpoint was trained with; resuming compares it.
A complete tag dir whose files were damaged later (truncated by a full disk or a
cut-short copy) is skipped by `--resume auto` with a warning. A run killed between
COMPLETE and its consolidated file gets that file written when it is resumed.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .config import Config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_write

from .checkpoint import CKPT_DIR, CKPT_NAME, checkpoint_config, save_checkpoint
from .dist import use_cuda
from .ema import full_state_dict

DS_DIR = "deepspeed"
MARKER = "COMPLETE"
_TAG_RE = re.compile(r"^step_(\d{8})$")
EXIT_REQUEUE = 75        # EX_TEMPFAIL: "stopped on a signal, checkpoint saved, run me again"


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag_dir: Path) -> int:
    m = _TAG_RE.match(tag_dir.name)
    if not m:
        raise ValueError(f"{tag_dir}: not a checkpoint tag dir")
    return int(m.group(1))


def complete_checkpoints(ds_root: Path) -> list[tuple[int, Path]]:
    """(step, tag dir) of every complete checkpoint, oldest first."""
    found = []
    if ds_root.is_dir():
        for d in ds_root.iterdir():
            m = _TAG_RE.match(d.name)
            if m and d.is_dir() and (d / MARKER).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def find_resume(run_dir: Path, resume: str | None,
                warn: Callable[[str], None] = lambda msg: None) -> Path | None:
    """The tag dir to resume from: None = fresh start.

    `auto`: the newest complete checkpoint of this run that is not damaged, or a fresh
    start when there is none. A path: a tag dir (must be complete and whole) or a run
    folder (its newest whole one). Damaged checkpoints passed over are reported to `warn`.
    """
    if resume is None:
        return None
    if resume == "auto":
        return _newest_whole(run_dir / DS_DIR, warn)
    path = Path(resume)
    if not path.exists():
        raise CxrError(f"--resume {resume}: not found")
    if _TAG_RE.match(path.name):
        if not (path / MARKER).is_file():
            raise CxrError(f"--resume {resume}: checkpoint is incomplete (no {MARKER} marker: "
                           "its save was interrupted); pick an older one")
        why = damage(path)
        if why:
            raise CxrError(f"--resume {resume}: checkpoint is damaged ({why}); pick an older one")
        return path
    for root in (path / DS_DIR, path):
        if complete_checkpoints(root):
            return _newest_whole(root, warn)
    raise CxrError(f"--resume {resume}: holds no complete DeepSpeed checkpoint")


def _newest_whole(ds_root: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint under ds_root that is not damaged; None if there is no
    complete one; CxrError if every complete one is damaged (a fresh start would discard the run)."""
    done = complete_checkpoints(ds_root)
    skipped: list[tuple[Path, str]] = []
    for _, tag in reversed(done):
        why = damage(tag)
        if why is None:
            for bad, bad_why in skipped:
                warn(f"warning: {bad}: checkpoint is damaged ({bad_why}); resuming from the older {tag.name}")
            return tag
        skipped.append((tag, why))
    if skipped:
        raise CxrError(f"{ds_root}: every complete checkpoint is damaged (newest {skipped[0][0].name}: "
                       f"{skipped[0][1]}); nothing to resume from")
    return None


def damage(tag_dir: Path) -> str | None:
    """Why a checkpoint marked complete cannot load, told from its files without loading them
    (cheap: every rank asks before the process group starts), or None. torch.save writes zip
    archives whose central directory comes last: a truncated or zero-byte .pt lacks it. A
    file damaged otherwise fails when loaded, and `run.restore` names it then."""
    for f in sorted(tag_dir.glob("*.pt")):
        try:
            with open(f, "rb") as fh:
                if fh.read(4) not in (b"PK\x03\x04", b""):
                    continue                       # not a zip archive: torch's legacy format, not judged
            with zipfile.ZipFile(f):
                pass
        except (OSError, zipfile.BadZipFile):
            size = f.stat().st_size if f.exists() else 0
            return f"{f.name} is truncated or corrupt ({size} bytes)"
    return None


def mark_complete(tag_dir: Path, info: dict[str, Any]) -> None:
    with atomic_write(tag_dir / MARKER, "w") as f:
        json.dump({**info, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)


def trained_config(tag_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """(config as Config.to_dict(), the file that says so) a checkpoint was trained with: its
    marker, else (saves older than that record) the consolidated file of its step; or None.
    Not RUN/config.yaml: a user may have edited that one."""
    with contextlib.suppress(OSError, ValueError, CxrError):
        info = json.loads((tag_dir / MARKER).read_text())
        if isinstance(info, dict) and isinstance(info.get("config"), dict):
            # through the schema: a key added since the save compares as its default
            return Config.from_dict(info["config"], str(tag_dir / MARKER)).to_dict(), tag_dir / MARKER
    path = tag_dir.parent.parent / CKPT_DIR / CKPT_NAME.format(step=tag_step(tag_dir))
    if path.is_file():
        with contextlib.suppress(CxrError):
            return checkpoint_config(path).to_dict(), path
    return None


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
    """DeepSpeed checkpoint + EMA + RNG, marked complete last; then the consolidated file.

    A failed write (full disk, quota) raises CxrError naming the folder and the OS's reason;
    the previous complete checkpoint is untouched (nothing is pruned before a save completes)."""
    import torch.distributed as dist
    ds_root = run / DS_DIR
    tag = tag_name(step)
    tag_dir = ds_root / tag
    if world.is_main:       # re-saving a step (resumed from an older one): incomplete until re-marked
        (tag_dir / MARKER).unlink(missing_ok=True)
    dist.barrier()
    with _save_errors(tag_dir, run, step):
        engine.save_checkpoint(str(ds_root), tag=tag, client_state={"step": step}, save_latest=False)
        save_rank_state(tag_dir, world.rank)
        if world.is_main:
            _torch_save(tag_dir / "ema.pt", ema.state_dict())
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
        with _save_errors(tag_dir, run, step):
            mark_complete(tag_dir, {"step": step, "world_size": world.world_size,
                                    "zero_stage": cfg.train.zero_stage, "param_digests": digests,
                                    "config": cfg.to_dict()})
        _test_pause(tag_dir)
        write_consolidated(run, cfg, images, step, ema.cpu_shadow(), online, world.world_size)
        prune(run, cfg.train.keep_last)
    dist.barrier()


def write_consolidated(run: Path, cfg: Config, images: Any, step: int, ema: dict[str, torch.Tensor],
                       online: dict[str, torch.Tensor], world_size: int) -> Path:
    """RUN/checkpoints/step_N.safetensors (rank 0)."""
    with _save_errors(run / CKPT_DIR, run, step):
        return save_checkpoint(run / CKPT_DIR / CKPT_NAME.format(step=step), cfg=cfg, step=step,
                               class_names=list(images.class_names), ema=ema, online=online,
                               data_fingerprint=images.fingerprint(), zero_stage=cfg.train.zero_stage,
                               world_size=world_size)


def repair_consolidated(engine: Any, ema: Any, cfg: Config, images: Any, run: Path, world: Any,
                        step: int) -> Path | None:
    """After resuming from step `step`: write its consolidated file if the run that saved it was
    killed between COMPLETE and that file (else export would silently take an older step).
    Every rank calls it (the gather is collective under ZeRO-3); rank 0 decides and writes."""
    import torch.distributed as dist
    path = run / CKPT_DIR / CKPT_NAME.format(step=step)
    missing = [world.is_main and not path.is_file()]
    dist.broadcast_object_list(missing, src=0)         # one decision: a late rank must not see rank 0's file
    if not missing[0]:
        return None
    online = full_state_dict(engine.module.unet, cfg.train.zero_stage)
    if world.is_main:
        write_consolidated(run, cfg, images, step, ema.cpu_shadow(), online, world.world_size)
    dist.barrier()
    return path


@contextlib.contextmanager
def _save_errors(folder: Path, run: Path, step: int) -> Iterator[None]:
    """A failed checkpoint write -> one CxrError line naming `folder` and the OS's reason."""
    from safetensors import SafetensorError
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        older = [t.name for s, t in complete_checkpoints(run / DS_DIR) if s < step]
        kept = f"the newest complete checkpoint is still {older[-1]}" if older else "no checkpoint is complete yet"
        raise CxrError(f"{folder}: cannot save the step {step} checkpoint: {write_error(folder, e)}; "
                       f"{kept}") from None


def write_error(folder: Path, e: BaseException) -> str:
    """A failed write in words, with the OS's reason and the free space. torch's C++ writer
    reports a full disk as "unexpected pos" without errno; a small write of our own then asks."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else _probe_write(folder)
    reason = reason or " ".join(str(e).split())[:200]
    with contextlib.suppress(OSError):
        reason += f" ({shutil.disk_usage(_existing(folder)).free / 2**20:.1f} MiB free)"
    return reason


def _probe_write(folder: Path) -> str | None:
    """The OS's reason why 1 MiB cannot be written to `folder` now (None: it can)."""
    try:
        with tempfile.TemporaryFile(dir=_existing(folder)) as f:   # O_TMPFILE: nothing left behind
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or str(e)
    return None


def _existing(folder: Path) -> Path:
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


def _torch_save(path: Path, obj: Any) -> None:
    """torch.save to `path` atomically, serialized in memory first: written from Python, a full
    disk raises OSError(ENOSPC) instead of torch's errno-less "unexpected pos"."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_write(path) as f:
        f.write(buf.getbuffer())


def _test_pause(tag_dir: Path) -> None:
    """Test hook: with CXR_TEST_PAUSE_AFTER_COMPLETE=FILE set, wait after writing COMPLETE until
    FILE exists, so a test can kill -9 the trainer exactly between the marker and the
    consolidated file (tests/test_train_faults.py). Unset in production: a no-op."""
    flag = os.environ.get("CXR_TEST_PAUSE_AFTER_COMPLETE")
    while flag and not os.path.exists(flag):
        time.sleep(0.05)


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
    _torch_save(tag_dir / f"rng_rank{rank}.pt", rng_state())


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
