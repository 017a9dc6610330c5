"""Train the DDPM with DeepSpeed ZeRO: one readable loop, top to bottom.

One process per GPU (or per CPU rank). Launch it any of these ways:

    $ cxr-train fit --config configs/tiny.yaml --set train.steps=100          # world size 1
    $ torchrun --standalone --nproc_per_node=2 -m cxr_ddpm.train.cli fit --config configs/tiny.yaml
    $ deepspeed --no_local_rank --num_gpus 2 --module cxr_ddpm.train.cli fit --config configs/tiny.yaml
    $ srun --ntasks-per-node=4 cxr-train fit --config configs/cxr128.yaml --resume auto
    $ sbatch slurm/train.sh configs/cxr128.yaml --set train.steps=20000        # the cluster way

(the `deepspeed` launcher needs --no_local_rank: the env already carries LOCAL_RANK.)

On CPU set OMP_NUM_THREADS to the cores per rank. The run folder (--out, default
runs/<config name>) collects config.yaml, log.csv, samples/*.png,
checkpoints/*.safetensors and deepspeed/step_*/ (exact-resume state).

Design: DeepSpeed wraps only the U-Net. lucidrains' GaussianDiffusion (the
schedule buffers, q_sample, the loss) stays fp32 outside the engine, because
DeepSpeed's bf16/fp16 modes cast every parameter and buffer of the module they
get. With bf16 the U-Net's forward runs under autocast *inside* the engine
(`AutocastUnet`) and returns fp32 to the loss.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cxr_ddpm.runtime.config import Config, load_config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_write, ensure_writable_dir

from . import resume as ckpt
from .checkpoint import CKPT_DIR, CKPT_NAME, save_checkpoint
from .data import ImageList, default_num_workers
from .dist import World, backend, device, init_process_group, resolve_world
from .ds_config import build_ds_config
from .ema import EMA, full_state_dict
from .prepared import make_dataset, open_data
from .model import build_diffusion, build_unet

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s"]


@dataclass
class FitResult:
    run_dir: Path
    step: int                   # last completed optimizer step
    preempted: bool             # stopped on a signal; a checkpoint of `step` exists
    images_per_s: float
    peak_mem_mib: float


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


# -----------------------------------------------------------------------------

def fit(cfg: Config, data_dir: str | Path | None = None, out_dir: str | Path | None = None,
        resume: str | None = None, run_name: str = "run") -> FitResult:
    """Train per `cfg`; returns when cfg.train.steps are done or a stop signal was handled."""
    t = cfg.train
    # -- 1. everything that can be wrong with the input, before any process group starts
    world = resolve_world()
    cuda = torch.cuda.is_available()
    ds_config = build_ds_config(cfg, world.world_size, cuda)
    images = open_data(data_dir or cfg.data.root, cfg.model.image_size)  # raw class folders or prepared
    cfg = cfg.replace(data=replace(cfg.data, root=str(images.root)))
    if cfg.model.num_classes and cfg.model.num_classes != len(images.class_names):
        raise CxrError(f"model.num_classes={cfg.model.num_classes} but {images.root} has "
                       f"{len(images.class_names)} class folders")
    run = Path(out_dir) if out_dir else Path("runs") / run_name
    ensure_writable_dir(run, "run folder")
    resume_from = ckpt.find_resume(run, resume)
    _check_same_run(run, cfg, resume_from)

    # -- 2. processes, seeds, model. The signal flag goes up first: a SIGTERM during the
    # slow start-up then costs one step and a save instead of the whole allocation.
    stop = ckpt.StopFlag()
    init_process_group(world)
    import deepspeed
    import torch.distributed as dist

    dev = device()
    ckpt.seed_everything(t.seed)                   # same initial weights on every rank
    unet = build_unet(cfg.model)
    diffusion = build_diffusion(cfg, unet).to(dev)  # fp32 schedule buffers, never seen by DeepSpeed
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    net = AutocastUnet(unet, amp)
    engine, _, _, scheduler = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                                   config=ds_config)
    diffusion.model = engine                       # lucidrains' p_losses now calls the engine
    ema = EMA(engine.module.unet, t.ema_decay, t.zero_stage, t.ema_every)
    ckpt.seed_everything(t.seed * 1000 + world.rank)  # different noise and timesteps per rank

    step = 0
    if resume_from is not None:
        _, client = engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name)
        step = int(client["step"])
        ema.load_state_dict(torch.load(resume_from / "ema.pt", weights_only=True))
        ckpt.load_rank_state(resume_from, world.rank)

    # -- 3. data: this rank's share, starting where the checkpoint stopped
    per_step = t.micro_batch * t.grad_accum
    dataset = make_dataset(images, cfg.model.image_size, hflip=cfg.data.hflip)
    sampler = StepSampler(len(dataset), world.rank, world.world_size, t.seed, start=step * per_step,
                          weights=_class_weights(images) if cfg.data.class_balanced else None)
    workers = default_num_workers(cfg.data.num_workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=t.micro_batch, sampler=sampler, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=cuda,
        generator=torch.Generator().manual_seed(t.seed))  # its own generator: the global RNG stays untouched
    batches = iter(loader)

    if world.is_main:
        _write_config(run, cfg)
        log_file, log = _open_log(run, step)
        print(f"fit: {world.world_size} rank(s) [{world.launcher}, {backend()}], ZeRO-{t.zero_stage}, "
              f"{t.precision}, global batch {per_step * world.world_size}, "
              f"{len(images.files)} images in {len(images.class_names)} classes, run {run}"
              + (f", resuming from {resume_from.name}" if resume_from else ""), file=sys.stderr)
    bar = _progress(world, step, t.steps)
    train_time, timed_images = 0.0, 0

    # -- 4. the loop
    while step < t.steps:
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dev)
        for _ in range(t.grad_accum):
            x, y = next(batches)
            x = x.to(dev, non_blocking=True)
            if cfg.model.num_classes:
                loss = diffusion(x, classes=y.to(dev))
            else:
                loss = diffusion(x)                # lucidrains: normalize, q_sample, U-Net, weighted MSE
            engine.backward(loss)
            engine.step()                          # DeepSpeed steps the optimizer at the accumulation boundary
            loss_sum += loss.detach().float()
        step += 1
        ema.after_step(engine.module.unet, step)
        # one collective per step: mean loss over ranks, and whether any rank got a stop signal
        sync = torch.stack([loss_sum / t.grad_accum, torch.tensor(float(stop.raised), device=dev)])
        dist.all_reduce(sync)
        loss_mean, stop_now = sync[0].item() / world.world_size, sync[1].item() > 0
        dt = time.perf_counter() - t0
        if step > 1 or t.steps == 1:               # the first step pays for warm-up; keep it out
            train_time += dt
            timed_images += per_step * world.world_size
        ips = timed_images / train_time if train_time else per_step * world.world_size / dt
        if world.is_main:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_mean:.4f}", img_s=f"{ips:.1f}")
            if step % t.log_every == 0 or step == t.steps or stop_now:
                gn = engine.get_global_grad_norm()
                log.writerow([step, f"{loss_mean:.9g}", f"{scheduler.get_last_lr()[0]:.6g}",
                              "" if gn is None else f"{float(gn):.6g}", f"{ips:.2f}", f"{train_time:.2f}"])
                log_file.flush()
        if t.sample_every and step % t.sample_every == 0 and world.is_main:
            sample_grid(cfg, ema.cpu_shadow(), run / "samples" / f"step_{step:08d}.png")
        if stop_now or (t.save_every and step % t.save_every == 0) or step == t.steps:
            _save(engine, ema, cfg, images, run, world, step, t.zero_stage, t.keep_last)
        if stop_now:
            break

    # -- 5. summary
    peak = torch.tensor(_peak_mem_mib(), device=dev)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    stop.close()
    ips = timed_images / train_time if train_time else 0.0
    result = FitResult(run, step, step < t.steps, ips, float(peak))
    if world.is_main:
        bar.close()
        log_file.close()
        with atomic_write(run / "summary.json", "w") as f:
            json.dump({"step": step, "preempted": result.preempted, "images_per_s": ips,
                       "peak_mem_mib": result.peak_mem_mib, "world_size": world.world_size,
                       "zero_stage": t.zero_stage, "precision": t.precision,
                       "global_batch": per_step * world.world_size}, f)
        why = f"stopped by signal {stop.signum} at" if result.preempted else "done:"
        print(f"fit: {why} step {step}/{t.steps}, {ips:.1f} images/s, peak memory "
              f"{result.peak_mem_mib:.0f} MiB/rank ({'GPU' if cuda else 'RSS'})", file=sys.stderr)
    dist.barrier()
    dist.destroy_process_group()
    return result


# -----------------------------------------------------------------------------
# helpers the loop calls once per save / sample / run

def _save(engine, ema: EMA, cfg: Config, images: ImageList, run: Path, world: World,
          step: int, zero_stage: int, keep_last: int) -> None:
    """DeepSpeed checkpoint + EMA + RNG, marked complete last; then the consolidated file."""
    import torch.distributed as dist
    ds_root = run / ckpt.DS_DIR
    tag = ckpt.tag_name(step)
    engine.save_checkpoint(str(ds_root), tag=tag, client_state={"step": step}, save_latest=False)
    tag_dir = ds_root / tag
    ckpt.save_rank_state(tag_dir, world.rank)
    if world.is_main:
        with atomic_write(tag_dir / "ema.pt") as f:
            torch.save(ema.state_dict(), f)
    debug_sleep = float(os.environ.get("CXR_DEBUG_SAVE_SLEEP", "0"))  # tests: a window to kill -9 mid-save
    if debug_sleep:
        time.sleep(debug_sleep)
    dist.barrier()                                     # every rank's shards are on disk
    online = full_state_dict(engine.module.unet, zero_stage)  # collective under ZeRO-3
    # Every rank must hold the same weights; a skipped gradient all-reduce (seen with some
    # DeepSpeed CPU configs) shows up here as differing digests, recorded in the marker.
    digests: list[str] = [""] * world.world_size
    dist.all_gather_object(digests, _digest(online))
    if world.is_main:
        if len(set(digests)) > 1:
            print(f"warning: ranks hold different weights at step {step}: {digests}", file=sys.stderr)
        ckpt.mark_complete(tag_dir, {"step": step, "world_size": world.world_size,
                                     "zero_stage": zero_stage, "param_digests": digests})
        save_checkpoint(run / CKPT_DIR / CKPT_NAME.format(step=step), cfg=cfg, step=step,
                        class_names=list(images.class_names), ema=ema.cpu_shadow(), online=online,
                        data_fingerprint=images.fingerprint(), zero_stage=zero_stage,
                        world_size=world.world_size)
        ckpt.prune(run, keep_last)
    dist.barrier()


def _class_weights(images: ImageList) -> np.ndarray:
    """Per-image weight 1 / (its class's count): every class is drawn equally often."""
    counts = np.asarray(images.class_counts(), dtype=np.float64)
    return 1.0 / counts[np.asarray(images.labels)]


def _digest(state: dict[str, torch.Tensor]) -> str:
    import hashlib
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()[:16]


def sample_grid(cfg: Config, ema_weights: dict[str, torch.Tensor], path: Path) -> Path:
    """DDIM samples (cfg.train.sample_steps steps, eta 0) from the EMA weights, tiled into one PNG.

    The sampler is the runtime's torch-free `sample_ddim` (the same code `cxr-runtime`
    samples with) over a `denoise` callable that runs a fresh fp32 copy of the EMA U-Net.
    Noise comes from its own numpy generator: the training RNG streams are not touched.
    """
    from cxr_ddpm.runtime.outputs import grid_png
    from cxr_ddpm.runtime.samplers import sample_ddim
    from cxr_ddpm.runtime.schedule import Schedule

    t, m = cfg.train, cfg.model
    unet = build_unet(m)
    unet.load_state_dict(ema_weights)
    unet = unet.to(device()).eval()
    # conditional models: one row per class (class k fills row k), no label dropout
    cols = math.ceil(t.num_samples / m.num_classes) if m.num_classes else math.ceil(math.sqrt(t.num_samples))
    n = cols * m.num_classes if m.num_classes else t.num_samples
    classes = torch.arange(n, device=device()) // cols

    @torch.no_grad()
    def denoise(x: np.ndarray, tt: np.ndarray, self_cond: np.ndarray | None = None) -> np.ndarray:
        xt, tt = torch.from_numpy(x).to(device()), torch.from_numpy(tt).to(device())
        if m.num_classes:
            return unet(xt, tt, classes, cond_drop_prob=0.0).float().cpu().numpy()
        sc = None if self_cond is None else torch.from_numpy(self_cond).to(device())
        return (unet(xt, tt, sc) if m.self_condition else unet(xt, tt)).float().cpu().numpy()

    x_T = np.random.default_rng(t.seed).standard_normal(            # the same noise every grid
        (n, m.channels, m.image_size, m.image_size)).astype(np.float32)
    x0 = sample_ddim(denoise, x_T, Schedule.from_config(cfg.diffusion),
                     steps=min(t.sample_steps, cfg.diffusion.timesteps),
                     self_condition=m.self_condition and not m.num_classes)
    return grid_png(path, list(x0), cols=cols)


def _check_same_run(run: Path, cfg: Config, resume_from: Path | None) -> None:
    """Resuming with another model or schedule would fail deep inside DeepSpeed; say it plainly.
    A fresh start into a folder that holds checkpoints would mix two runs; refuse that too."""
    saved = run / "config.yaml"
    if resume_from is None and ckpt.complete_checkpoints(run / ckpt.DS_DIR):
        raise CxrError(f"{run}: run folder already holds checkpoints; pass --resume auto to continue "
                       "it or choose another --out")
    if resume_from is not None and saved.is_file():
        old = load_config(saved)
        if old.digest() != cfg.digest():
            raise CxrError(f"{saved}: this run was trained with a different model/diffusion config; "
                           "resume it with the same config or use another --out")


def _write_config(run: Path, cfg: Config) -> None:
    import yaml
    with atomic_write(run / "config.yaml", "w") as f:
        f.write("# resolved config of this run (defaults + file + --set overrides)\n")
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def _open_log(run: Path, step: int) -> tuple:
    """CSV loss log; on resume, rows after the checkpoint's step are dropped (they will be redone)."""
    path = run / "log.csv"
    rows = []
    if step and path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f)][1:]
        rows = [r for r in rows if r and int(r[0]) <= step]
    with atomic_write(path, "w") as f:
        w = csv.writer(f)
        w.writerow(LOG_FIELDS)
        w.writerows(rows)
    f = open(path, "a", newline="")
    return f, csv.writer(f)


def _progress(world: World, step: int, total: int):
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=step, desc="train", unit="step", disable=not world.is_main,
                mininterval=0.5 if tty else 30.0, dynamic_ncols=True)


def _peak_mem_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    from cxr_ddpm.runtime.sampling import peak_rss_mib   # VmHWM: not inherited from the launcher
    return peak_rss_mib()
