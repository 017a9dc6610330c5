"""A run's exact-resume state in and out of the model engine: `save_state` writes every rank's
shards, the EMA and the RNG streams, marks the step complete and writes its consolidated file;
`restore` loads them back. Where they live and which one is resumed: state.py."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_write

from .checkpoint import CKPT_DIR, CKPT_NAME, save_checkpoint
from .ema import full_state_dict
from .engine import ModelEngine
from .plan import RunPlan
from .state import (DS_DIR, MARKER, complete_checkpoints, mark_complete, prune, rng_file, rng_state, set_rng_state,
                    tag_name)


def save_state(m: ModelEngine, plan: RunPlan, step: int) -> None:
    """DeepSpeed checkpoint + EMA + RNG, marked complete last; then the consolidated file.

    A failed write (full disk, quota) raises CxrError naming the folder and the OS's reason;
    the previous complete checkpoint is untouched (nothing is pruned before a save completes)."""
    import torch.distributed as dist
    cfg, run, world = plan.cfg, plan.run, plan.world
    ds_root = run / DS_DIR
    tag = tag_name(step)
    tag_dir = ds_root / tag
    if world.is_main:       # re-saving a step (resumed from an older one): incomplete until re-marked
        (tag_dir / MARKER).unlink(missing_ok=True)
    dist.barrier()
    with _save_errors(tag_dir, run, step):
        m.engine.save_checkpoint(str(ds_root), tag=tag, client_state={"step": step}, save_latest=False)
        _torch_save(rng_file(tag_dir, world.rank), rng_state(plan.cuda))
        if world.is_main:
            _torch_save(tag_dir / "ema.pt", m.ema.state_dict())
    debug_sleep = float(os.environ.get("CXR_DEBUG_SAVE_SLEEP", "0"))  # tests: a window to kill -9 mid-save
    if debug_sleep:
        time.sleep(debug_sleep)
    dist.barrier()                                     # every rank's shards are on disk
    online = full_state_dict(m.unet, cfg.train.zero_stage)  # collective under ZeRO-3
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
        write_consolidated(plan, step, m.ema.cpu_shadow(), online)
        prune(run, cfg.train.keep_last)
    dist.barrier()


def write_consolidated(plan: RunPlan, step: int, ema: dict[str, torch.Tensor],
                       online: dict[str, torch.Tensor]) -> Path:
    """RUN/checkpoints/step_N.safetensors (rank 0)."""
    with _save_errors(plan.run / CKPT_DIR, plan.run, step):
        return save_checkpoint(plan.run / CKPT_DIR / CKPT_NAME.format(step=step), cfg=plan.cfg, step=step,
                               class_names=list(plan.images.class_names), ema=ema, online=online,
                               **plan.provenance)


def restore(m: ModelEngine, plan: RunPlan) -> int:
    """Load an exact-resume checkpoint (weights, optimizer, EMA, this rank's RNG); returns its step.
    Writes the step's consolidated file if the run that saved it died before it (collective)."""
    tag = plan.resume_from
    if tag is None:
        return 0
    try:
        found, client = m.engine.load_checkpoint(str(tag.parent), tag=tag.name)
        if found is None or client is None:
            raise FileNotFoundError("DeepSpeed found no model states in it")
        m.ema.load_state_dict(torch.load(tag / "ema.pt", weights_only=True))
        _load_rank_state(tag, plan)
    except CxrError:
        raise
    except Exception as e:   # torch/DeepSpeed readers raise anything (RuntimeError, EOFError, KeyError, ...)
        raise CxrError(f"{tag}: cannot load this checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                       f"resume from an older one (--resume {tag.parent}/step_NNNNNNNN)") from None
    step = int(client["step"])
    if tag.parent.parent.resolve() != plan.run.resolve():   # another run's checkpoint: not ours to repair
        return step
    wrote = _repair_consolidated(m, plan, step)
    if wrote and plan.world.is_main:
        print(f"fit: wrote {wrote}, which the run that saved {tag.name} did not live to write", file=sys.stderr)
    return step


def _repair_consolidated(m: ModelEngine, plan: RunPlan, step: int) -> Path | None:
    """After resuming from step `step`: write its consolidated file if the run that saved it was
    killed between COMPLETE and that file (else export would silently take an older step).
    Every rank calls it (the gather is collective under ZeRO-3); rank 0 decides and writes."""
    import torch.distributed as dist
    path = plan.run / CKPT_DIR / CKPT_NAME.format(step=step)
    missing = [plan.world.is_main and not path.is_file()]
    dist.broadcast_object_list(missing, src=0)         # one decision: a late rank must not see rank 0's file
    if not missing[0]:
        return None
    online = full_state_dict(m.unet, plan.cfg.train.zero_stage)
    if plan.world.is_main:
        write_consolidated(plan, step, m.ema.cpu_shadow(), online)
    dist.barrier()
    return path


def _load_rank_state(tag_dir: Path, plan: RunPlan) -> None:
    path = rng_file(tag_dir, plan.world.rank)
    if not path.is_file():
        raise CxrError(f"{tag_dir}: no RNG state for rank {plan.world.rank} (was it saved with a different "
                       "number of ranks?)")
    set_rng_state(torch.load(path, weights_only=False), plan.cuda)  # our own file: numpy state needs pickle


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
