"""The run plan: what a run is, checked before any process group starts.

`plan_run` reads the launcher's environment, decides CPU or CUDA once, opens the data,
takes the run folder (rank 0 locks it) and picks the checkpoint to resume from. Every
later step of `loop.fit` reads those decisions from the plan instead of asking again.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .config import Config, load_config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import ensure_writable_dir, exclusive_lock, remove_dead_temps

from . import state
from .checkpoint import CKPT_DIR, check_same_model
from .data import ImageList, check_readable
from .dist import World, check_gpus_per_node, device_of, local_world_size, resolve_world, use_cuda
from .ds_config import build_ds_config
from .model import attention_summary, device_capability
from .prepared import PreparedImages, open_data


@dataclass(frozen=True)
class RunPlan:
    """The checked inputs of a run: nothing here has started a process or written a file
    (rank 0 holds the run folder's lock and has removed its dead temp files)."""
    cfg: Config
    world: World
    cuda: bool                      # the one CPU/CUDA decision of the run (CXR_DEVICE, torch)
    device: torch.device
    ds_config: dict[str, Any]
    images: ImageList | PreparedImages
    provenance: dict[str, Any]      # rank 0: what every consolidated checkpoint records of the run
    run: Path
    resume_from: Path | None
    lock: contextlib.ExitStack      # rank 0: the run folder's lock until closed (or the process ends)
    refused: str | None = None      # rank 0 of a multi-rank run: why the lock was refused (check_run_lock)

    @property
    def images_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch * t.grad_accum * self.world.world_size

    def start_line(self, backend: str) -> str:
        t = self.cfg.train
        return (f"fit: {self.world.world_size} rank(s) [{self.world.launcher}, {backend}], ZeRO-{t.zero_stage}, "
                f"{t.precision}, global batch {self.images_per_step}, {len(self.images.files)} images in "
                f"{len(self.images.class_names)} classes, {attention_summary(self.cfg.model, device_capability(self.device))}, "
                f"run {self.run}" + (f", resuming from {self.resume_from.name}" if self.resume_from else ""))


def plan_run(cfg: Config, data_dir: str | Path | None, out_dir: str | Path | None, resume: str | None,
             run_name: str) -> RunPlan:
    """Everything that can be wrong with the input, before any process group starts."""
    world = resolve_world()
    cuda = use_cuda()                              # CXR_DEVICE=cpu forces CPU on a GPU machine
    if cuda:
        check_gpus_per_node(local_world_size(dict(os.environ), world), torch.cuda.device_count())
    ds_config = build_ds_config(cfg, world.world_size, cuda)
    images = open_data(data_dir or cfg.data.root, cfg.model.image_size)  # raw class folders or prepared
    if isinstance(images, ImageList):
        check_readable(images)                     # a folder of undecodable files: one line, nothing made
    cfg = cfg.replace(data=replace(cfg.data, root=str(images.root)))
    if cfg.model.num_classes and cfg.model.num_classes != len(images.class_names):
        raise CxrError(f"model.num_classes={cfg.model.num_classes} but {images.root} has "
                       f"{len(images.class_names)} class folders")
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise CxrError("train.tensorboard=true needs the tensorboard package: pip install 'cxr-ddpm[tensorboard]'")
    # once per run, on the rank that writes checkpoints: the fingerprint stats every data file
    provenance = ({"data_fingerprint": images.fingerprint(), "zero_stage": cfg.train.zero_stage,
                   "world_size": world.world_size} if world.is_main else {})
    run = Path(out_dir) if out_dir else Path("runs") / run_name
    ensure_writable_dir(run, "run folder")
    lock, refused = _lock_run(run, world)
    try:
        def warn(msg: str) -> None:
            if world.is_main and refused is None:
                print(msg, file=sys.stderr)
        resume_from = state.find_resume(run, resume, warn)
        _check_same_run(run, cfg, resume_from)
        if resume_from is not None and state.tag_step(resume_from) > cfg.train.steps:
            raise CxrError(f"--resume {resume}: {resume_from} is at step {state.tag_step(resume_from)}, past "
                           f"train.steps={cfg.train.steps}; raise train.steps to train on")
        if world.is_main and refused is None:
            _remove_dead_temp_files(run)
    except BaseException:
        lock.close()
        raise
    return RunPlan(cfg, world, cuda, device_of(world, cuda), ds_config, images, provenance, run,
                   resume_from, lock, refused)


def _lock_run(run: Path, world: World) -> tuple[contextlib.ExitStack, str | None]:
    """Rank 0 locks the run folder for the whole run: two runs writing one folder would each
    print "done" over the other's files. A refusal raises at once in a world of one; with more
    ranks it is kept for check_run_lock, which tells every rank once the group is up, so no
    rank waits in init_process_group for a rank 0 that has left."""
    stack = contextlib.ExitStack()
    if world.is_main:
        try:
            stack.enter_context(exclusive_lock(run, "cxr-train fit"))
        except CxrError as e:
            if world.world_size == 1:
                raise
            return stack, str(e)
    return stack, None


def check_run_lock(plan: RunPlan) -> None:
    """Collective, right after init_process_group: if rank 0 was refused the run folder, every
    rank ends with its one line (exit 2) instead of waiting for it."""
    if plan.world.world_size == 1:
        return
    import torch.distributed as dist
    refused = [plan.refused]
    dist.broadcast_object_list(refused, src=0)
    if refused[0]:
        dist.destroy_process_group()
        raise CxrError(refused[0])


def _remove_dead_temp_files(run: Path) -> None:
    """Temp files of a trainer killed mid-write. With the lock held nobody else trains here, so
    every one of them is dead. Only the trainer's own names: an export writing beside a
    checkpoint meanwhile keeps its temp file."""
    tags = [d / "*" for d in (run / state.DS_DIR).glob("step_*")]
    for path in (run / "config.yaml", run / "log.csv", run / "summary.json", *tags,
                 run / CKPT_DIR / "step_*.safetensors", run / "samples" / "step_*.png"):
        remove_dead_temps(path)


def _check_same_run(run: Path, cfg: Config, resume_from: Path | None) -> None:
    """Resuming with another model or schedule would fail deep inside DeepSpeed; say it plainly,
    comparing with the checkpoint's own record (RUN/config.yaml only for checkpoints without one:
    `--config RUN/config.yaml` after editing it would always agree with itself).
    A fresh start into a folder that holds checkpoints would mix two runs; refuse that too."""
    saved = run / "config.yaml"
    if resume_from is None and state.complete_checkpoints(run / state.DS_DIR):
        raise CxrError(f"{run}: run folder already holds checkpoints; pass --resume auto to continue "
                       "it or choose another --out")
    trained = state.trained_config(resume_from) if resume_from is not None else None
    if trained is not None:
        check_same_model(trained[0], cfg.to_dict(), str(resume_from),
                         "; resume it with the config it was trained with, or use another --out")
    elif resume_from is not None and saved.is_file():
        old = load_config(saved)
        if old.digest() != cfg.digest():
            raise CxrError(f"{saved}: this run was trained with a different model/diffusion config; "
                           "resume it with the same config or use another --out")
