"""The data stream of one rank: an endless, resumable share of the training images."""
from __future__ import annotations

import atexit
import math
import weakref
from typing import Any, Iterator

import numpy as np
import torch

from .config import Config

from .data import ImageList, default_num_workers
from .dist import World
from .preempt import ignore_stop_signals
from .prepared import PreparedImages, make_dataset


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
                pin_memory: bool) -> Iterator:
    """Batches of (images, labels) for this rank, starting where optimizer step `step` left off."""
    t = cfg.train
    dataset = make_dataset(images, cfg.model.image_size, hflip=cfg.data.hflip)
    sampler = StepSampler(len(dataset), world.rank, world.world_size, t.seed,
                          start=step * t.micro_batch * t.grad_accum,
                          weights=_class_weights(images) if cfg.data.class_balanced else None)
    workers = default_num_workers(cfg.data.num_workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=t.micro_batch, sampler=sampler, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=pin_memory, worker_init_fn=ignore_stop_signals,
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
