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
(`engine.AutocastUnet`) and returns fp32 to the loss. The host never waits for the
GPU inside a step: the loss and the stop flag are read only at check steps (`Clock`).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import Config, TrainConfig

from .batches import make_loader
from .diverge import MAX_SKIPPED_STEPS, NonFiniteWatch, first_divergence
from .dist import backend, init_process_group
from .engine import ModelEngine, build_engine
from .grid import sample_grid
from .plan import check_run_lock, plan_run
from .preempt import StopFlag
from .runlog import RunLog, peak_mem_mib, progress_bar
from .state_io import restore, save_state

CHECK_S = 2.0        # seconds between rank syncs: a stop signal is acted on within about this


@dataclass
class FitResult:
    run_dir: Path
    step: int                   # last completed optimizer step
    preempted: bool             # stopped on a signal; a checkpoint of `step` exists
    images_per_s: float
    peak_mem_mib: float
    world_size: int = 1
    diverged: str | None = None  # why training stopped on a non-finite loss / gradient norm (diverge.py)

    def last_line(self, steps: int, signum: int | None, cuda: bool) -> str:
        if self.diverged:
            return f"error: {self.diverged}"
        why = f"stopped by signal {signum} at" if self.preempted else "done:"
        return (f"fit: {why} step {self.step}/{steps}, {self.images_per_s:.1f} images/s, peak memory "
                f"{self.peak_mem_mib:.0f} MiB/rank ({'GPU' if cuda else 'RSS'})")


def fit(cfg: Config, data_dir: str | Path | None = None, out_dir: str | Path | None = None,
        resume: str | None = None, run_name: str = "run") -> FitResult:
    """Train per `cfg`; returns when cfg.train.steps are done or a stop signal was handled."""
    # -- 1. everything that can be wrong with the input, before any process group starts
    plan = plan_run(cfg, data_dir, out_dir, resume, run_name)
    cfg, world, run, t, dev = plan.cfg, plan.world, plan.run, plan.cfg.train, plan.device

    # -- 2. processes, model, data. The signal flag goes up first: a SIGTERM during the
    # slow start-up then costs one step and a save instead of the whole allocation.
    stop = StopFlag()
    init_process_group(world, plan.cuda)
    check_run_lock(plan)                               # rank 0 refused the run folder: all ranks stop here
    import torch.distributed as dist

    m = build_engine(plan)
    step = restore(m, plan)
    batches = make_loader(cfg, plan.images, world, step, pin_memory=plan.cuda)
    log = RunLog(run, cfg, step) if world.is_main else None
    if world.is_main:
        print(plan.start_line(backend(plan.cuda)), file=sys.stderr)
    bar = progress_bar(world, step, t.steps)
    clock = Clock(plan.images_per_step)
    watch = NonFiniteWatch(dev, MAX_SKIPPED_STEPS[t.precision])
    last_ckpt, diverged = (step if plan.resume_from else None), None

    # -- 3. the loop
    while step < t.steps:
        loss = train_step(m, batches, cfg, dev, clock)
        step += 1
        watch.update(step, loss, m.engine.get_global_grad_norm())
        m.ema.after_step(m.unet, step, m.engine.optimizer)   # bf16: fed the fp32 masters
        stop_now = False
        if clock.due(step, t):                         # every rank checks at the same steps
            loss_mean, stop_now, bad = clock.sync(step, loss, stop.raised, dev, watch.flag())
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss_mean:.4f}", img_s=f"{clock.images_per_s:.1f}")
            if log and (step % t.log_every == 0 or step == t.steps or stop_now or bad):
                log.row(step, loss_mean, m.scheduler.get_last_lr()[0], m.engine.get_global_grad_norm(),
                        clock.images_per_s, clock.train_time, clock.data_wait_pct)
            if bad:                                    # no save, no grid: the last checkpoint stays the last finite one
                diverged = first_divergence(watch).message(t.lr, t.warmup_steps, last_ckpt)
                break
        with clock.paused():                           # sample grids and saves are not training time
            if t.sample_every and step % t.sample_every == 0 and world.is_main:
                grid = sample_grid(cfg, m.ema.cpu_shadow(), run / "samples" / f"step_{step:08d}.png", dev)
                if log:
                    log.image(step, grid)
            if stop_now or (t.save_every and step % t.save_every == 0) or step == t.steps:
                save_state(m, plan, step)
                last_ckpt = step
        if stop_now:
            break

    # -- 4. summary
    peak = torch.tensor(peak_mem_mib(plan.cuda), device=dev)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if step >= t.steps or diverged:  # stopped: the handler stays (the CLI ignores stop signals, then exits 75)
        stop.close()
    result = FitResult(run, step, step < t.steps and not diverged, clock.images_per_s, float(peak),
                       world.world_size, diverged)
    if log:
        bar.close()
        log.close({k: v for k, v in asdict(result).items() if k != "run_dir"}
                  | {"zero_stage": t.zero_stage, "precision": t.precision, "global_batch": plan.images_per_step})
        print(result.last_line(t.steps, stop.signum, plan.cuda), file=sys.stderr)
    dist.barrier()
    dist.destroy_process_group()
    plan.lock.close()                                  # rank 0: the run folder is free again
    return result


def train_step(m: ModelEngine, batches: Iterator, cfg: Config, dev: torch.device, clock: "Clock") -> torch.Tensor:
    """One optimizer step over train.grad_accum micro-batches; returns the mean loss, on the device."""
    t = cfg.train
    # channels_last: the input only; convolutions follow their input's layout. The weights stay
    # contiguous, which DeepSpeed's parameter broadcast and flattening require.
    fmt = torch.channels_last if t.channels_last else torch.preserve_format
    loss_sum = torch.zeros((), device=dev)
    for _ in range(t.grad_accum):
        t0 = time.perf_counter()
        x, y = next(batches)                           # blocks only when the loader is behind
        clock.data_wait += time.perf_counter() - t0
        x = x.to(dev, non_blocking=True, memory_format=fmt)
        if cfg.model.num_classes:
            loss = m.diffusion(x, classes=y.to(dev, non_blocking=True))
        else:
            loss = m.diffusion(x)                      # lucidrains: normalize, q_sample, U-Net, weighted MSE
        m.engine.backward(loss)
        m.engine.step()                                # DeepSpeed steps the optimizer at the accumulation boundary
        loss_sum += loss.detach().float()
    return loss_sum / t.grad_accum


def sync_every(seconds_per_step: float) -> int:
    """Steps between rank syncs so that one interval lasts about CHECK_S seconds."""
    return max(1, min(1000, int(CHECK_S / max(seconds_per_step, 1e-6))))


class Clock:
    """When ranks sync, and the speed figures read there.

    Reading the loss or the stop flag waits for the GPU and all-reduces across ranks;
    doing that every step leaves the GPU idle while the host waits. So ranks sync at log
    steps, save and sample steps (a write follows a check of every step since the last
    sync: diverge.py), the last step, and every `every` steps, with `every` re-derived at each sync
    from the measured step time so that a stop signal is acted on within ~CHECK_S
    seconds. `every` comes from an all-reduced time, so every rank picks the same steps.
    The interval up to the first sync (step 1: warm-up, allocator, autotuning) is not timed.
    """

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.next_sync = 1
        self.last_step: int | None = None
        self.last = time.perf_counter()
        self.data_wait = 0.0           # seconds this rank blocked on the loader since the last sync
        self.train_time = 0.0          # seconds of timed steps so far
        self.timed_images = 0
        self.images_per_s = 0.0
        self.data_wait_pct = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.last += time.perf_counter() - t0

    def due(self, step: int, t: TrainConfig) -> bool:
        return (step >= self.next_sync or step % t.log_every == 0 or step == t.steps
                or any(every and step % every == 0 for every in (t.save_every, t.sample_every)))

    def sync(self, step: int, loss: torch.Tensor, stop_raised: bool, dev: torch.device,
             diverged: torch.Tensor) -> tuple[float, bool, bool]:
        """All-reduce (loss, stop flag, elapsed, divergence flag); returns (mean loss over ranks,
        stop now, some rank diverged)."""
        import torch.distributed as dist
        now = time.perf_counter()
        elapsed = now - self.last
        vals = torch.stack([loss, torch.tensor(float(stop_raised), device=dev),
                            torch.tensor(elapsed, device=dev), diverged])
        dist.all_reduce(vals)
        loss_sum, stops, elapsed_sum, bad = vals.tolist()   # the one host sync of the interval
        world = dist.get_world_size()
        elapsed = elapsed_sum / world
        steps = step - (self.last_step or 0)
        if self.last_step is not None:
            self.train_time += elapsed
            self.timed_images += steps * self.images_per_step
        self.images_per_s = (self.timed_images / self.train_time if self.train_time
                             else steps * self.images_per_step / max(elapsed, 1e-9))
        self.data_wait_pct = 100.0 * self.data_wait / max(now - self.last, 1e-9)
        self.next_sync = step + sync_every(elapsed / steps)
        self.last, self.last_step, self.data_wait = now, step, 0.0
        return loss_sum / world, stops > 0, bad > 0

