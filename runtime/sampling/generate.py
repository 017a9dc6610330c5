"""Generating images with a denoiser: the library behind `cxr-runtime sample`.

Image i depends only on (request, i): its initial noise and every per-step noise draw
come from its own generator, np.random.default_rng([seed, i]), so the batch size
(and which other images share its batch, or which process of a job array makes it)
never changes it.

    den = load_denoiser("model.onnx")
    req = resolve_request(den, 16, sampler="dpmpp-2m", steps=20, seed=0)
    images = generate(den, req, batch_size=8)               # (16, C, H, W) in [-1, 1]
    sample_to_dir(den, req, out="samples/", batch_size=8)   # PNGs + samples.json

A request is resolved and validated once (`resolve_request`); everything below trusts it.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..backends.denoiser import Denoiser
from ..errors import CxrError
from .guidance import guided
from .samplers import SAMPLERS, USES_ETA, get_sampler, resolve_steps
from ..outputs.shards import check_count
from .timesteps import LEGACY_GRID, TIME_GRIDS, default_time_grid

StepFn = Callable[[int], object]              # called after each step with the batch size; result ignored
NOISE = "image i: numpy default_rng([seed, i]), standard_normal float32"


@dataclass(frozen=True)
class Request:
    """What determines the images (with the denoiser): resolved once, trusted below."""
    n: int
    sampler: str
    steps: int
    eta: float | None
    seed: int
    labels: tuple[int, ...] | None = None     # class id per image (conditional models)
    guidance: float | None = None             # CFG weight; None when sampling unconditionally
    clip_x0: bool = True
    time_grid: str | None = None              # dpmpp-2m's time grid (timesteps.TIME_GRIDS); None for the others


def resolve_request(denoiser: Denoiser, n: int, *, sampler: str = "dpmpp-2m", steps: int | None = None,
                    eta: float | None = None, seed: int = 0, labels: Sequence[int] | None = None,
                    guidance: float | None = None, clip_x0: bool = True,
                    time_grid: str | None = None) -> Request:
    """Check every setting against the model; CxrError naming the flag otherwise.
    time_grid: dpmpp-2m only; None = timesteps.default_time_grid for the steps."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise CxrError(f"-n {n}: the number of images must be >= 1")
    check_count(n)
    if sampler not in SAMPLERS:
        raise CxrError(f"--sampler {sampler!r} is unknown (valid: {', '.join(SAMPLERS)})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CxrError(f"--seed {seed}: must be an integer >= 0 (image i uses default_rng([seed, i]))")
    steps = resolve_steps(sampler, steps, denoiser.schedule.timesteps, what="--steps")
    if sampler == "dpmpp-2m":
        time_grid = time_grid or default_time_grid(denoiser.schedule.timesteps, steps)
        if time_grid not in TIME_GRIDS:
            raise CxrError(f"time grid {time_grid!r} is unknown (valid: {', '.join(TIME_GRIDS)})")
    elif time_grid is not None:
        raise CxrError(f"a time grid is for sampler dpmpp-2m; {sampler} runs on lucidrains' grid")
    if eta is not None:
        if not math.isfinite(eta) or not 0.0 <= eta <= 1.0:
            raise CxrError(f"--eta {eta}: must be a finite number in [0, 1] (0 deterministic, 1 ancestral)")
        if sampler not in USES_ETA:
            warnings.warn(f"--eta is ignored by --sampler {sampler} (only {', '.join(sorted(USES_ETA))} "
                          "uses it)", stacklevel=2)
            eta = None
    conditional = denoiser.config.model.num_classes > 0
    if guidance is not None:
        if not math.isfinite(guidance) or guidance < 0:
            raise CxrError(f"--guidance {guidance}: must be a finite number >= 0")
        if not conditional:
            raise CxrError("--guidance: the model is unconditional (guidance needs a class-conditional model)")
    if guidance is not None and labels is None:
        raise CxrError("--guidance needs --class or --per-class (which classes to guide towards)")
    if labels is not None:
        if not conditional or len(labels) != n:
            raise CxrError("class labels need a class-conditional model and one label per image")
        labels = tuple(int(k) for k in labels)
    return Request(n, sampler, steps, eta, seed, labels, (1.0 if guidance is None else float(guidance))
                   if labels is not None else None, clip_x0, time_grid)


def image_rngs(seed: int, indices: Sequence[int]) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, i]) for i in indices]


def iter_batches(denoiser: Denoiser, req: Request, *, batch_size: int, indices: Sequence[int] | None = None,
                 on_step: StepFn | None = None, xp: Any = np) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (image indices, samples (b, C, H, W) float32 in [-1, 1]) batch by batch.

    indices: which images of the request to make (default all n, in order). A model output
    that is not finite stops the run with CxrError naming the step: no image of that batch
    is returned, so none is written. batch_size >= 1 (sample_set.plan_set checks the CLI's).
    """
    sample = get_sampler(req.sampler)
    cfg = denoiser.config.model
    shape = (cfg.channels, cfg.image_size, cfg.image_size)            # (C, H, W)
    todo = list(range(req.n) if indices is None else indices)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        rngs = image_rngs(req.seed, idx)
        b = len(rngs)

        def draw() -> Any:
            return xp.asarray(np.stack([g.standard_normal(shape, dtype=np.float32) for g in rngs]))

        if cfg.num_classes:
            cls = None if req.labels is None else xp.asarray(np.asarray([req.labels[i] for i in idx], np.int64))
            model = guided(denoiser, cls, 1.0 if req.guidance is None else req.guidance,
                           null_class=cfg.num_classes)
        else:
            def model(x: Any, t: Any, x_self_cond: Any = None) -> Any:
                return denoiser(x, t, x_self_cond=x_self_cond)
        calls = [0]

        def denoise(x: Any, t: Any, *self_cond: Any) -> Any:
            out = model(x, t, *self_cond)
            calls[0] += 1
            if not bool(xp.isfinite(out).all()):
                raise CxrError(f"step {calls[0]}/{req.steps} (t={int(t[0])}): the model returned non-finite "
                               f"values (NaN/inf) for images {idx[0]}..{idx[-1]}; nothing of this batch "
                               "was written")
            return out

        x_T = draw()                                                  # (b, C, H, W)
        out = sample(denoise, x_T, denoiser.schedule, steps=req.steps, eta=req.eta,
                     noise=lambda k: draw(), clip_x0=req.clip_x0,
                     self_condition=denoiser.self_condition,
                     callback=(lambda info: on_step(b)) if on_step else None,
                     **({"time_grid": req.time_grid} if req.time_grid else {}))
        yield idx, (out if isinstance(out, np.ndarray) else out.get()).astype(np.float32, copy=False)


def generate(denoiser: Denoiser, req: Request, *, batch_size: int = 8, **kwargs: Any) -> np.ndarray:
    """All images of the request as one (n, C, H, W) float32 array in [-1, 1]."""
    return np.concatenate([batch for _, batch in iter_batches(denoiser, req, batch_size=batch_size, **kwargs)])


def request_settings(denoiser: Denoiser, req: Request, fmt: str, xp: Any = np) -> dict[str, Any]:
    """Everything that determines the written files, as recorded in samples.json."""
    names = list(denoiser.artifact.class_names)
    return {
        "engine_sha256": denoiser.sha256,            # the ONNX/engine file, or the checkpoint for torch
        "metadata_sha256": hashlib.sha256(json.dumps(denoiser.meta, sort_keys=True).encode()).hexdigest(),
        "backend": denoiser.backend, "provider": denoiser.provider,
        "precision": denoiser.meta.get("precision"), "arrays": xp.__name__,
        "sampler": req.sampler, "steps": req.steps, "eta": req.eta, "seed": req.seed, "n": req.n,
        "format": fmt, "clip_x0": req.clip_x0, "guidance": req.guidance,
        "classes": sorted({names[k] for k in req.labels}) if req.labels else None,
        "labels_sha256": (hashlib.sha256(np.asarray(req.labels, np.int64).tobytes()).hexdigest()
                          if req.labels else None),
        "image_size": denoiser.config.model.image_size, "objective": denoiser.config.diffusion.objective,
        "schedule_sha256": denoiser.schedule.digest(), "noise": NOISE,
        # 0.2.0 records name no grid (dpmpp-2m ran on LEGACY_GRID only): that grid adds no key, so
        # their hashes still match and sample_set.plan_set finishes such a set on its own grid
        **({"time_grid": req.time_grid} if req.time_grid not in (None, LEGACY_GRID) else {}),
        # TF32 exists on the GPU providers only, where it changes pixels: recorded and hashed there
        # (a 0.2.0 CUDA set ran in TF32 silently and is rightly not resumed); CPU records keep 0.2.0's hash
        **({"tf32": denoiser.tf32} if denoiser.provider != "cpu" else {}),
    }


def request_sha256(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
