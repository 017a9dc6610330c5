"""Everything `loop.fit` does once, before and after its loop: input checks, the model under
DeepSpeed, resuming, the data loader, and the run folder's files (config, log, summary).

Split from loop.py so that the loop itself reads top to bottom on one screen.
"""
from __future__ import annotations

import atexit
import contextlib
import csv
import importlib.util
import json
import math
import os
import sys
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .config import Config, load_config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_write, ensure_writable_dir, exclusive_lock, remove_dead_temps

from . import resume as ckpt
from .checkpoint import CKPT_DIR, check_same_model
from .data import ImageList, check_readable, default_num_workers
from .dist import World, check_gpus_per_node, local_world_size, resolve_world, use_cuda
from .ds_config import build_ds_config
from .ema import EMA
from .model import build_diffusion, build_unet
from .prepared import PreparedImages, make_dataset, open_data

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s", "data_wait_pct"]


@dataclass(frozen=True)
class RunPlan:
    """The checked inputs of a run: nothing here has started a process or written a file
    (rank 0 holds the run folder's lock and has removed its dead temp files)."""
    cfg: Config
    world: World
    cuda: bool
    ds_config: dict[str, Any]
    images: ImageList | PreparedImages
    run: Path
    resume_from: Path | None
    lock: contextlib.ExitStack      # rank 0: the run folder's lock until closed (or the process ends)
    refused: str | None = None      # rank 0 of a multi-rank run: why the lock was refused (check_run_lock)


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
    run = Path(out_dir) if out_dir else Path("runs") / run_name
    ensure_writable_dir(run, "run folder")
    lock, refused = _lock_run(run, world)
    try:
        def warn(msg: str) -> None:
            if world.is_main and refused is None:
                print(msg, file=sys.stderr)
        resume_from = ckpt.find_resume(run, resume, warn)
        _check_same_run(run, cfg, resume_from)
        if resume_from is not None and ckpt.tag_step(resume_from) > cfg.train.steps:
            raise CxrError(f"--resume {resume}: {resume_from} is at step {ckpt.tag_step(resume_from)}, past "
                           f"train.steps={cfg.train.steps}; raise train.steps to train on")
        if world.is_main and refused is None:
            _remove_dead_temp_files(run)
    except BaseException:
        lock.close()
        raise
    return RunPlan(cfg, world, cuda, ds_config, images, run, resume_from, lock, refused)


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
    tags = [d / "*" for d in (run / ckpt.DS_DIR).glob("step_*")]
    for path in (run / "config.yaml", run / "log.csv", run / "summary.json", *tags,
                 run / CKPT_DIR / "step_*.safetensors", run / "samples" / "step_*.png"):
        remove_dead_temps(path)


# -----------------------------------------------------------------------------
# the model: DeepSpeed wraps only the U-Net; lucidrains' GaussianDiffusion stays fp32 outside

class AutocastUnet(torch.nn.Module):
    """The module DeepSpeed gets: the U-Net, its forward under autocast when training in bf16/fp16."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.unet = unet
        self.dtype = dtype

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.dtype is None:
            return self.unet(*args, **kwargs)
        x = args[0]
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.unet(*args, **kwargs)
        return out.float()  # the loss and the schedule math stay fp32


@dataclass
class Model:
    engine: Any                  # deepspeed.DeepSpeedEngine around AutocastUnet
    diffusion: torch.nn.Module   # lucidrains GaussianDiffusion; its .model is the engine
    ema: EMA
    scheduler: Any


def build_model(cfg: Config, dev: torch.device, ds_config: dict[str, Any], seed: int) -> Model:
    import deepspeed
    t = cfg.train
    ckpt.seed_everything(t.seed)                   # same initial weights on every rank
    unet = build_unet(cfg.model)
    diffusion = build_diffusion(cfg, unet).to(dev)  # fp32 schedule buffers, never seen by DeepSpeed
    if t.compile:
        import torch._dynamo as dynamo
        dynamo.config.suppress_errors = True  # a graph that fails to compile runs eager
        unet.compile()                              # in place: state_dict keys stay unprefixed
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    net = AutocastUnet(unet, amp)
    engine, _, _, scheduler = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                                   config=ds_config)
    diffusion.model = engine                       # lucidrains' p_losses now calls the engine
    ema = EMA(engine.module.unet, t.ema_decay, t.zero_stage, t.ema_every)
    ckpt.seed_everything(seed)                     # different noise and timesteps per rank
    return Model(engine, diffusion, ema, scheduler)


def restore(m: Model, plan: RunPlan, world: World) -> int:
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
        ckpt.load_rank_state(tag, world.rank)
    except CxrError:
        raise
    except Exception as e:   # torch/DeepSpeed readers raise anything (RuntimeError, EOFError, KeyError, ...)
        raise CxrError(f"{tag}: cannot load this checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                       f"resume from an older one (--resume {tag.parent}/step_NNNNNNNN)") from None
    step = int(client["step"])
    if tag.parent.parent.resolve() != plan.run.resolve():   # another run's checkpoint: not ours to repair
        return step
    wrote = ckpt.repair_consolidated(m.engine, m.ema, plan.cfg, plan.images, plan.run, world, step)
    if wrote and world.is_main:
        print(f"fit: wrote {wrote}, which the run that saved {tag.name} did not live to write", file=sys.stderr)
    return step


# -----------------------------------------------------------------------------
# data: this rank's share of an endless, resumable stream

class StepSampler(torch.utils.data.Sampler):
    """Endless, resumable index stream for one rank: a fresh permutation per epoch,
    dealt round-robin to ranks. Position = images this rank has consumed, so resuming
    at optimizer step s restarts at exactly the batch the interrupted run would have used."""

    def __init__(self, n: int, rank: int, world: int, seed: int, start: int = 0,
                 weights: np.ndarray | None = None):
        self.n, self.rank, self.world, self.seed, self.start = n, rank, world, seed, start
        self.per_epoch = math.ceil(n / world)   # short last share is padded by wrapping around
        self.p = None if weights is None else weights / weights.sum()

    def __iter__(self) -> Iterator[int]:
        epoch, pos = divmod(self.start, self.per_epoch)
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            # class-balanced: an epoch is n draws with replacement, each class equally likely
            perm = rng.permutation(self.n) if self.p is None else rng.choice(self.n, self.n, p=self.p)
            perm = np.resize(perm, self.per_epoch * self.world)      # wrap to a multiple of world
            for i in perm[self.rank::self.world][pos:]:
                yield int(i)
            epoch, pos = epoch + 1, 0


def make_loader(cfg: Config, images: ImageList | PreparedImages, world: World, step: int,
                cuda: bool) -> Iterator:
    """Batches of (images, labels) for this rank, starting where optimizer step `step` left off."""
    t = cfg.train
    dataset = make_dataset(images, cfg.model.image_size, hflip=cfg.data.hflip)
    sampler = StepSampler(len(dataset), world.rank, world.world_size, t.seed,
                          start=step * t.micro_batch * t.grad_accum,
                          weights=_class_weights(images) if cfg.data.class_balanced else None)
    workers = default_num_workers(cfg.data.num_workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=t.micro_batch, sampler=sampler, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=cuda, worker_init_fn=ckpt.ignore_stop_signals,
        generator=torch.Generator().manual_seed(t.seed))  # its own generator: the global RNG stays untouched
    batches = iter(loader)
    if workers:
        atexit.register(_kill_workers, weakref.ref(batches))
    return batches


def _kill_workers(batches: "weakref.ref[Any]") -> None:
    """atexit: SIGKILL the loader's workers if they still run, i.e. fit left by an exception with
    its loader alive (a traceback keeps fit's frame). They ignore SIGTERM (ignore_stop_signals),
    and multiprocessing's exit handler, which runs after this one, SIGTERMs daemonic children and
    then joins them: without this a failed run (a full disk mid-save) hung at exit for good."""
    it = batches()
    for w in getattr(it, "_workers", None) or []:
        if w.is_alive():
            w.kill()


def _class_weights(images: ImageList | PreparedImages) -> np.ndarray:
    """Per-image weight 1 / (its class's count): every class is drawn equally often."""
    counts = np.asarray(images.class_counts(), dtype=np.float64)
    return 1.0 / counts[np.asarray(images.labels)]


# -----------------------------------------------------------------------------
# the run folder: config.yaml, log.csv, summary.json (rank 0 only)

def _check_same_run(run: Path, cfg: Config, resume_from: Path | None) -> None:
    """Resuming with another model or schedule would fail deep inside DeepSpeed; say it plainly,
    comparing with the checkpoint's own record (RUN/config.yaml only for checkpoints without one:
    `--config RUN/config.yaml` after editing it would always agree with itself).
    A fresh start into a folder that holds checkpoints would mix two runs; refuse that too."""
    saved = run / "config.yaml"
    if resume_from is None and ckpt.complete_checkpoints(run / ckpt.DS_DIR):
        raise CxrError(f"{run}: run folder already holds checkpoints; pass --resume auto to continue "
                       "it or choose another --out")
    trained = ckpt.trained_config(resume_from) if resume_from is not None else None
    if trained is not None:
        check_same_model(trained[0], cfg.to_dict(), str(resume_from),
                         "; resume it with the config it was trained with, or use another --out")
    elif resume_from is not None and saved.is_file():
        old = load_config(saved)
        if old.digest() != cfg.digest():
            raise CxrError(f"{saved}: this run was trained with a different model/diffusion config; "
                           "resume it with the same config or use another --out")


class RunLog:
    """config.yaml (resolved), log.csv (one row per logged step) and summary.json of a run;
    with train.tensorboard also TensorBoard scalars and sample grids under RUN/tb.
    On resume, elapsed_s continues from the last kept row (training time of the whole run)."""

    def __init__(self, run: Path, cfg: Config, step: int):
        import yaml
        self.run = run
        self._tb = None
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter   # checked in plan_run
            self._tb = SummaryWriter(str(run / "tb"), purge_step=step + 1 if step else None)
        with _writing(run / "config.yaml"), atomic_write(run / "config.yaml", "w") as f:
            f.write("# resolved config of this run (defaults + file + --set overrides)\n")
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        path = run / "log.csv"
        rows = []
        if step and path.is_file():     # on resume, rows after the checkpoint's step are redone: drop them
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if r and int(r[0]) <= step]
        self._elapsed0 = 0.0
        with contextlib.suppress(IndexError, ValueError):
            self._elapsed0 = float(rows[-1][LOG_FIELDS.index("elapsed_s")])
        with _writing(path), atomic_write(path, "w") as f:
            w = csv.writer(f)
            w.writerow(LOG_FIELDS)
            w.writerows(rows)
        self._path = path
        self._file = open(path, "a", newline="")
        self._csv = csv.writer(self._file)

    def row(self, step: int, loss: float, lr: float, grad_norm: Any, images_per_s: float,
            elapsed_s: float, data_wait_pct: float) -> None:
        with _writing(self._path):
            self._csv.writerow([step, f"{loss:.9g}", f"{lr:.6g}",
                                "" if grad_norm is None else f"{float(grad_norm):.6g}", f"{images_per_s:.2f}",
                                f"{self._elapsed0 + elapsed_s:.2f}", f"{data_wait_pct:.1f}"])
            self._file.flush()
        if self._tb is not None:
            for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm),
                                ("images_per_s", images_per_s), ("data_wait_pct", data_wait_pct)):
                if value is not None:
                    self._tb.add_scalar(f"train/{name}", float(value), step)

    def image(self, step: int, png: Path) -> None:
        """A sample grid PNG as a TensorBoard image (nothing without train.tensorboard)."""
        if self._tb is not None:
            from PIL import Image
            self._tb.add_image("samples/ema", np.asarray(Image.open(png)), step, dataformats="HW")

    def close(self, summary: dict[str, Any]) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        with _writing(self.run / "summary.json"), atomic_write(self.run / "summary.json", "w") as f:
            json.dump(summary, f)


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A failed write of a run file (full disk) -> one CxrError line naming it and the reason."""
    try:
        yield
    except OSError as e:
        raise CxrError(f"{path}: cannot write: {ckpt.write_error(path.parent, e)}") from None


def progress_bar(world: World, step: int, total: int):
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=step, desc="train", unit="step", disable=not world.is_main,
                mininterval=0.5 if tty else 30.0, dynamic_ncols=True)


def peak_mem_mib() -> float:
    if use_cuda():
        return torch.cuda.max_memory_allocated() / 2**20
    from cxr_ddpm.runtime.system import peak_rss_mib     # VmHWM: not inherited from the launcher
    return peak_rss_mib()
