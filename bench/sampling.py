"""Section 2: end-to-end sampling, seconds per image and images/s per sampler and backend.

The samplers are runtime/sampling/samplers.py's own functions over an OrtDenoiser (fp32, runtime
session settings) or the PyTorch reference TorchDenoiser, batch 16, fresh weights (cost does
not depend on them). tiny (32 px, T = 100): every row measured. cxr128 (128 px, T = 1000):
a full ddpm run is ~2.5 h on 2 cores, so one short dpmpp-2m run per backend is measured and
every row is derived from its per-step cost (sampler arithmetic is negligible next to a
U-Net call), labelled "extrapolated".
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import figure, fresh_artifacts, md_table, save_png, write_section

PLAN = (("ddpm", None), ("ddim", 250), ("ddim", 50), ("dpmpp-2m", 20), ("dpmpp-2m", 10))


def denoisers(arts: dict[str, Path]) -> dict[str, Any]:
    from cxr_ddpm.runtime.backends.onnx import OrtDenoiser
    from cxr_ddpm.train.torch_backend import TorchDenoiser
    return {"ort": OrtDenoiser(arts["fp32"]), "torch": TorchDenoiser(arts["ckpt"])}


def timed_run(den: Any, sampler: str, steps: int | None, batch: int, seed: int = 0) -> float:
    from cxr_ddpm.runtime.sampling.samplers import get_sampler
    size = den.config.model.image_size
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, size, size), dtype=np.float32)
    t0 = time.perf_counter()
    get_sampler(sampler)(den, x, den.schedule, steps=steps,
                         noise=lambda k: rng.standard_normal(x.shape, dtype=np.float32))
    return time.perf_counter() - t0


def row(model: str, backend: str, sampler: str, calls: int, batch: int, seconds: float, how: str) -> dict:
    return {"model": model, "backend": backend, "sampler": sampler, "steps": calls, "batch": batch,
            "seconds": float(f"{seconds:.3g}"), "s_per_image": round(seconds / batch, 3),
            "images_per_s": round(batch / seconds, 3), "how": how}


def run_model(model: str, size: int, batch: int, measure_all: bool, measure_steps: int) -> tuple[list, list]:
    arts = fresh_artifacts(model, [f"model.image_size={size}"], ("fp32",))
    dens = denoisers(arts)
    T = next(iter(dens.values())).schedule.timesteps
    rows, skipped = [], []
    for backend, den in dens.items():
        timed_run(den, "ddim", 1, batch)                        # warm-up: allocator, ORT arenas
        if measure_all:
            for sampler, steps in PLAN:
                if steps is not None and steps > T:
                    skipped.append(f"{model}: {sampler} {steps} steps > T={T}")
                    continue
                s = timed_run(den, sampler, steps, batch)
                rows.append(row(model, backend, sampler, steps or T, batch, s, "measured"))
                print(f"  {model} {backend} {sampler} {steps or T}: {s:.1f} s", flush=True)
            continue
        s = timed_run(den, "dpmpp-2m", measure_steps, batch)
        per_step = s / measure_steps
        rows.append(row(model, backend, "dpmpp-2m", measure_steps, batch, s, "measured"))
        print(f"  {model} {backend} dpmpp-2m {measure_steps}: {s:.1f} s ({per_step:.2f} s/step)", flush=True)
        for sampler, steps in PLAN:
            calls = steps or T
            if calls > T:
                skipped.append(f"{model} {backend}: {sampler} {calls} steps > T={T}")
                continue
            rows.append(row(model, backend, sampler, calls, batch, per_step * calls,
                            f"extrapolated from the measured {measure_steps}-step run"))
    return rows, skipped


def plot(rows: list[dict], path: Path) -> Path:
    fig, ax = figure(8, 4)
    labels = [f"{r['model']} {r['backend']}\n{r['sampler']} {r['steps']}" + ("*" if r["how"] != "measured" else "")
              for r in rows]
    ax.barh(range(len(rows)), [r["images_per_s"] for r in rows],
            color=["tab:green" if r["backend"] == "ort" else "tab:gray" for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("images/s (log; * = extrapolated from per-step cost)")
    ax.set_title("End-to-end sampling, batch 16, CPU (green ORT, grey PyTorch)")
    return save_png(fig, path)


def run(out: Path, *, models: tuple[tuple[str, int, bool], ...] = (("tiny", 32, True), ("cxr128", 128, False)),
        batch: int = 16, measure_steps: int = 3) -> Path:
    import torch

    from cxr_ddpm.runtime.system import cpu_allowance
    torch.set_num_threads(cpu_allowance())
    rows, skipped = [], []
    for model, size, measure_all in models:
        r, s = run_model(model, size, batch, measure_all, measure_steps)
        rows += r
        skipped += s
    for r in rows:             # ORT's speed-up over the PyTorch reference, same model/sampler/how
        twin = next((t for t in rows if t["backend"] == "torch" and
                     (t["model"], t["sampler"], t["steps"], t["how"]) == (r["model"], r["sampler"], r["steps"], r["how"])), None)
        if twin is not None:
            r["speedup_vs_torch"] = round(twin["seconds"] / r["seconds"], 3)
    doc = {"batch": batch, "plan": [f"{s} {n or 'T'}" for s, n in PLAN], "skipped": skipped,
           "note": "single timed run per row after a 1-step warm-up; fresh weights", "rows": rows}
    plot(rows, out / "sampling.png")
    md = (f"## End-to-end sampling (batch {batch}, CPU)\n\n" + md_table(rows, [
        ("model", "model"), ("backend", "backend"), ("sampler", "sampler"), ("steps", "steps"),
        ("s_per_image", "s/image"), ("images_per_s", "images/s"), ("speedup_vs_torch", "vs PyTorch"),
        ("how", "how")]) + "".join(f"\nskipped: {s}" for s in skipped) + "\n")
    return write_section(out, "sampling", doc, md)
