"""`cxr-runtime bench`: per-step latency of full sampling runs, each backend in a fresh process
(so the ORT numbers never include torch).

    runs = compare(Path("model.onnx"), ckpt=Path("run/checkpoints/step_00001000.safetensors"), batch_size=4)
    print(table(runs, batch_size=4, steps=10, repeats=3))
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.denoiser import Denoiser
from ..errors import CxrError
from .generate import Request, iter_batches, resolve_request
from ..system import peak_rss_mib


def compare(engine: Path, *, ckpt: Path | None = None, guidance: float | None = None, backend: str | None = None,
            provider: str | None = None, threads: int | None = None, batch_size: int = 1, steps: int = 10,
            repeats: int = 3, cuda_graph: str | None = None, arrays: str | None = None) -> list[dict[str, Any]]:
    """The engine's numbers; with ckpt, the PyTorch reference's beside them; with guidance, the
    engine's guided sampling too. Each in a fresh process (bench_in_subprocess)."""
    if batch_size <= 0 or steps <= 0 or repeats <= 0:
        raise CxrError("--batch-size, --steps and --repeats must be >= 1")
    if ckpt is not None and not ckpt.exists():
        raise CxrError(f"--ckpt {ckpt}: checkpoint not found")
    common: dict[str, Any] = {"threads": threads, "batch_size": batch_size, "steps": steps, "repeats": repeats}
    runs = [bench_in_subprocess(engine, backend=backend, provider=provider, cuda_graph=cuda_graph, arrays=arrays,
                                **common)]
    if ckpt is not None:
        runs.append(bench_in_subprocess(ckpt, backend="torch", provider=provider if provider == "cuda" else None,
                                        **common))
    if guidance is not None:
        runs.append(bench_in_subprocess(engine, backend=backend, provider=provider, guidance=guidance,
                                        cuda_graph=cuda_graph, arrays=arrays, **common))
    return runs


def table(runs: list[dict[str, Any]], *, batch_size: int, steps: int, repeats: int) -> str:
    """The runs side by side, each against the first."""
    keys = [("step_ms_median", "step ms (median)"), ("step_ms_p90", "step ms (p90)"),
            ("images_per_s", f"images/s ({steps} steps)"), ("peak_rss_mib", "peak RSS MiB"),
            ("start_to_first_step_s", "start to first step s")]
    names = [f"{r['backend']}/{r['provider']}" + (f" W={r['guidance']:g}" if r.get("guidance") else "")
             for r in runs]
    head = ["", *names, *(f"{n} / first" for n in names[1:])]
    lines = [f"batch {batch_size}, {steps} dpmpp-2m steps x {repeats} runs", "  ".join(f"{h:>24}" for h in head)]
    for key, label in keys:
        vals = [r[key] for r in runs]
        cells = [label, *(f"{v:.3f}" for v in vals),
                 *((f"{v / vals[0]:.2f}x" if vals[0] else "-") for v in vals[1:])]
        lines.append("  ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def bench_in_subprocess(engine: Path, *, backend: str | None, provider: str | None, threads: int | None,
                        batch_size: int, steps: int, repeats: int,
                        guidance: float | None = None, cuda_graph: str | None = None,
                        arrays: str | None = None) -> dict[str, Any]:
    args = [sys.executable, "-m", "cxr_ddpm.runtime.cli", "bench-worker", str(engine),
            "--batch-size", str(batch_size), "--steps", str(steps), "--repeats", str(repeats)]
    for flag, value in (("--backend", backend), ("--provider", provider), ("--threads", threads),
                        ("--guidance", guidance), ("--cuda-graph", cuda_graph), ("--arrays", arrays)):
        if value is not None:
            args += [flag, str(value)]
    started = time.time()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CxrError(f"{engine}: benchmark run failed ({last})")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["start_to_first_step_s"] = rec["first_step_at"] - started
    return rec


def bench_run(denoiser: Denoiser, *, batch_size: int, steps: int, sampler: str = "dpmpp-2m",
              repeats: int = 1, guidance: float | None = None, xp: Any = np) -> dict[str, Any]:
    """Time `repeats` runs of `steps` steps after a 3-step warm-up; latencies per step.
    guidance: time classifier-free guided sampling (class 0, weight W) instead.
    xp: the sampler math's array module (numpy or cupy)."""
    labels = None if guidance is None else [0] * batch_size

    def req(sampler: str, steps: int, seed: int) -> Request:
        return resolve_request(denoiser, batch_size, sampler=sampler, steps=steps, seed=seed, labels=labels,
                               guidance=guidance)
    first = time.time()
    # warm-up: 3 calls, past ORT's regular runs and the CUDA graph capture of this batch size
    next(iter_batches(denoiser, req("ddim", 3, 0), batch_size=batch_size, xp=xp))
    first_step_at = time.time()
    lat: list[float] = []
    totals = []
    for r in range(repeats):
        stamps = [time.perf_counter()]
        next(iter_batches(denoiser, req(sampler, steps, r), batch_size=batch_size, xp=xp,
                          on_step=lambda b: stamps.append(time.perf_counter())))
        lat += list(np.diff(stamps))
        totals.append(stamps[-1] - stamps[0])
    lat_ms = np.array(lat) * 1e3
    return {"backend": denoiser.backend, "provider": denoiser.provider, "batch_size": batch_size,
            "guidance": guidance, "arrays": xp.__name__, "cuda_graph": denoiser.cuda_graph,
            "tf32": denoiser.tf32,
            "steps": steps, "sampler": sampler, "step_ms_median": float(np.median(lat_ms)),
            "step_ms_p90": float(np.percentile(lat_ms, 90)),
            "images_per_s": float(batch_size / np.median(totals)),
            "warmup_step_s": first_step_at - first, "first_step_at": first_step_at,
            "peak_rss_mib": peak_rss_mib()}
