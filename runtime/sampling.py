"""Generating images with a denoiser: the library behind `cxr-runtime sample`.

Image i depends only on (seed, i): its initial noise and every per-step noise draw
come from its own generator, np.random.default_rng([seed, i]), so the batch size
(and which other images share its batch) never changes it.

    den = load_denoiser("model.onnx")
    images = generate(den, 16, batch_size=8, sampler="dpmpp-2m", steps=20, seed=0)
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import __version__
from .errors import CxrError
from .fsutil import atomic_write, ensure_writable_dir, file_sha256
from .metadata import dumps as meta_dumps
from .outputs import FORMATS, SUFFIX, grid_png, write_image
from .guidance import guided
from .backends.ort_cuda import GpuFallbackWarning
from .samplers import USES_ETA, get_sampler, resolve_steps

StepFn = Callable[[int], None]                # called after each step with the batch size


def check_request(denoiser: Any, n: int, *, batch_size: int, sampler: str, steps: int | None,
                  eta: float | None) -> int:
    """Validate a sampling request before any work or file; returns the resolved steps."""
    if n <= 0:
        raise CxrError(f"-n {n}: the number of images must be >= 1")
    if batch_size <= 0:
        raise CxrError(f"--batch-size {batch_size}: must be >= 1")
    get_sampler(sampler)
    steps = resolve_steps(sampler, steps, denoiser.schedule.timesteps)
    if eta is not None and sampler not in USES_ETA:
        warnings.warn(f"--eta is ignored by --sampler {sampler} (only {', '.join(sorted(USES_ETA))} "
                      f"uses it)", stacklevel=2)
    if eta is not None and eta < 0:
        raise CxrError(f"--eta {eta}: must be >= 0")
    return steps


def image_rngs(seed: int, indices: range) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, i]) for i in indices]


def iter_batches(denoiser: Any, n: int, *, batch_size: int, sampler: str = "dpmpp-2m",
                 steps: int | None = None, eta: float | None = None, seed: int = 0,
                 clip_x0: bool = True, labels: Sequence[int] | None = None, guidance: float = 1.0,
                 on_step: StepFn | None = None, xp: Any = np) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first index, samples (b, C, H, W) float32 in [-1, 1]) batch by batch.

    labels: class id of each image (length n) for class-conditional models, guided with
    weight `guidance` (see runtime.guidance); None samples them unconditionally.
    """
    steps = check_request(denoiser, n, batch_size=batch_size, sampler=sampler, steps=steps, eta=eta)
    sample = get_sampler(sampler)
    cfg = denoiser.config.model
    if labels is not None and (cfg.num_classes == 0 or len(labels) != n):
        raise CxrError("class labels need a class-conditional model and one label per image")
    shape = (cfg.channels, cfg.image_size, cfg.image_size)           # (C, H, W)
    for start in range(0, n, batch_size):
        rngs = image_rngs(seed, range(start, min(start + batch_size, n)))
        b = len(rngs)

        def draw() -> Any:
            return xp.asarray(np.stack([g.standard_normal(shape, dtype=np.float32) for g in rngs]))

        if cfg.num_classes:
            cls = None if labels is None else xp.asarray(np.asarray(labels[start:start + b], np.int64))
            denoise = guided(denoiser, cls, guidance, null_class=cfg.num_classes)
        else:
            def denoise(x: Any, t: Any, x_self_cond: Any = None) -> Any:
                return denoiser(x, t, x_self_cond=x_self_cond)

        x_T = draw()                                                  # (b, C, H, W)
        out = sample(denoise, x_T, denoiser.schedule, steps=steps, eta=eta,
                     noise=lambda k: draw(), clip_x0=clip_x0,
                     self_condition=bool(getattr(denoiser, "self_condition", False)),
                     callback=(lambda info: on_step(b)) if on_step else None)
        yield start, (out if isinstance(out, np.ndarray) else out.get()).astype(np.float32, copy=False)


def generate(denoiser: Any, n: int, **kwargs: Any) -> np.ndarray:
    """All n samples as one (n, C, H, W) float32 array in [-1, 1]; kwargs as iter_batches."""
    return np.concatenate([batch for _, batch in iter_batches(denoiser, n, **kwargs)])


def sample_to_dir(denoiser: Any, engine: Path, n: int, *, out: Path, batch_size: int,
                  sampler: str, steps: int | None, eta: float | None, seed: int,
                  fmt: str = "png", grid: Path | None = None, clip_x0: bool = True,
                  labels: Sequence[int] | None = None, guidance: float = 1.0,
                  on_step: StepFn | None = None, xp: Any = np) -> dict[str, Any]:
    """Write n images (and a grid) under `out` plus samples.json; returns that record.
    xp: the sampler math's array module (numpy, or cupy to keep x on the GPU).

    With class labels, image i goes to out/<class name>/ and the grid has a row per class.
    """
    if fmt not in FORMATS:
        raise CxrError(f"--format {fmt!r} is unknown (valid: {', '.join(FORMATS)})")
    steps = check_request(denoiser, n, batch_size=batch_size, sampler=sampler, steps=steps, eta=eta)
    out = ensure_writable_dir(out)
    names = list(denoiser.meta.get("class_names") or [])
    folders = {k: ensure_writable_dir(out / names[k]) for k in sorted(set(labels))} if labels else {}
    if grid is not None:
        ensure_writable_dir(Path(grid).parent or Path("."), "grid folder")
    width = max(5, len(str(n - 1)))
    files, t0 = [], time.perf_counter()
    rows: dict[int, list[np.ndarray]] = {}                            # grid row (class) -> images
    with warnings.catch_warnings():                                   # check_request warned once
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", GpuFallbackWarning)           # a GPU fallback still shows
        batches = iter_batches(denoiser, n, batch_size=batch_size, sampler=sampler, steps=steps,
                               eta=eta, seed=seed, clip_x0=clip_x0, labels=labels,
                               guidance=guidance, on_step=on_step, xp=xp)
        first = next(batches)
    for start, batch in itertools.chain([first], batches):
        for j, x in enumerate(batch):
            i = start + j
            row = labels[i] if labels else -1
            path = folders.get(row, out) / f"sample_{i:0{width}d}{SUFFIX[fmt]}"
            write_image(path, x, fmt, meta=denoiser.meta, index=i, seed=seed)
            files.append(str(path.relative_to(out)))
            if grid is not None and len(rows.setdefault(row, [])) < (8 if labels else 64):
                rows[row].append(x)
    seconds = time.perf_counter() - t0
    if grid is not None and labels:                                   # a row of <= 8 per class
        picked = [rows[r] for r in sorted(rows)][:16]
        cols = max(map(len, picked))
        grid_png(Path(grid), [r[j] if j < len(r) else None for r in picked for j in range(cols)],
                 cols=cols)
    elif grid is not None:                                            # square, at most 8 x 8
        grid_png(Path(grid), rows[-1])
    record = {
        "engine": str(engine), "engine_sha256": file_sha256(engine) if Path(engine).is_file() else None,
        "metadata_sha256": hashlib.sha256(meta_dumps(denoiser.meta).encode()).hexdigest(),
        "backend": denoiser.backend, "provider": denoiser.provider,
        "precision": denoiser.meta.get("precision"), "arrays": xp.__name__,
        "cuda_graph": getattr(denoiser, "cuda_graph", None),          # after any fallback
        "sampler": sampler, "steps": steps, "eta": eta, "seed": seed, "n": n,
        "batch_size": batch_size, "format": fmt, "clip_x0": clip_x0,
        "guidance": guidance if labels else None,
        "classes": sorted({names[k] for k in labels}) if labels else None,
        "image_size": denoiser.config.model.image_size, "objective": denoiser.config.diffusion.objective,
        "schedule_sha256": denoiser.schedule.digest(), "grid": str(grid) if grid else None,
        "noise": "image i: numpy default_rng([seed, i]), standard_normal float32",
        "package_version": __version__, "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 3) if seconds > 0 else None, "files": files,
    }
    with atomic_write(out / "samples.json", "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return record


# -----------------------------------------------------------------------------
# benchmark: per-step latency of a full sampling run, in a fresh process per backend

def bench_run(denoiser: Any, *, batch_size: int, steps: int, sampler: str = "dpmpp-2m",
              repeats: int = 1, guidance: float | None = None, xp: Any = np) -> dict[str, Any]:
    """Time `repeats` runs of `steps` steps after one warm-up step; latencies per step.
    guidance: time classifier-free guided sampling (class 0, weight W) instead.
    xp: the sampler math's array module (numpy or cupy)."""
    guide: dict[str, Any] = {"xp": xp}
    if guidance is not None:
        guide.update(labels=[0] * batch_size, guidance=guidance)
    first = time.time()
    # warm-up: 3 calls, past ORT's regular runs and the CUDA graph capture of this batch size
    next(iter_batches(denoiser, batch_size, batch_size=batch_size, sampler="ddim", steps=3, **guide))
    first_step_at = time.time()
    lat: list[float] = []
    totals = []
    for r in range(repeats):
        stamps = [time.perf_counter()]
        next(iter_batches(denoiser, batch_size, batch_size=batch_size, sampler=sampler, steps=steps,
                          seed=r, on_step=lambda b: stamps.append(time.perf_counter()), **guide))
        lat += list(np.diff(stamps))
        totals.append(stamps[-1] - stamps[0])
    lat_ms = np.array(lat) * 1e3
    return {"backend": denoiser.backend, "provider": denoiser.provider, "batch_size": batch_size,
            "guidance": guidance, "arrays": xp.__name__, "cuda_graph": getattr(denoiser, "cuda_graph", None),
            "steps": steps, "sampler": sampler, "step_ms_median": float(np.median(lat_ms)),
            "step_ms_p90": float(np.percentile(lat_ms, 90)),
            "images_per_s": float(batch_size / np.median(totals)),
            "warmup_step_s": first_step_at - first, "first_step_at": first_step_at,
            "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident set. VmHWM, not getrusage: Linux carries ru_maxrss over
    fork + exec, so a child started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
