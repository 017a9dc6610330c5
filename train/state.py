"""The exact-resume state of a run on disk: where it lives, which one to resume from, and the
per-rank RNG streams it restores. Writing and loading it with the engine: state_io.py.

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
import json
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import Config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_write

from .checkpoint import CKPT_DIR, CKPT_NAME, checkpoint_config

DS_DIR = "deepspeed"
MARKER = "COMPLETE"
_TAG_RE = re.compile(r"^step_(\d{8})$")


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
    file damaged otherwise fails when loaded, and `state_io.restore` names it then."""
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
# RNG state: per rank, so every rank's noise stream continues where it stopped

def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank}.pt"


def rng_state(cuda: bool) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], cuda: bool) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and cuda:
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
