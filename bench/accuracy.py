"""Section 3: sampler accuracy vs cost on a briefly trained tiny model.

The tiny config (T = 100) is trained for a few hundred steps with `cxr-train fit` (one
rank) on the bundled radiographs; the checkpoint is cached under bench/cache/ keyed by
config hash and reused. Reference: deterministic DDIM over all T = 100 levels (the finest
grid this model has; a 1000-step reference needs a T = 1000 model, which the tiny
config is not) from the same x_T. RMSE is in [0, 1] image space, over all pixels.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .common import CACHE, ROOT, config_key, figure, md_table, save_png, write_section
from .train import run_fit

GOAL = ("dpmpp-2m", 20, 0.02)


def trained_tiny(steps: int = 300, cache: Path = CACHE) -> Path:
    """Cached tiny checkpoint trained `steps` steps on data/cxr-sample (trains if missing)."""
    from cxr_ddpm.runtime.config import load_config
    from cxr_ddpm.train.checkpoint import latest_checkpoint
    sets = [f"train.steps={steps}", f"train.save_every={steps}", "train.sample_every=0", "data.num_workers=0",
            "train.log_every=50"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets)
    run_dir = cache / f"trained-tiny-{config_key(cfg)}"
    found = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if found is not None:
        return found
    print(f"  training tiny for {steps} steps into {run_dir} (cached for later runs)", flush=True)
    s = run_fit(ROOT / "configs" / "tiny.yaml", ROOT / "data" / "cxr-sample", run_dir, ranks=1, threads=2,
                overrides=sets)
    if "error" in s:
        raise RuntimeError(f"training the tiny model failed: {s['error']}")
    found = latest_checkpoint(run_dir)
    if found is None:
        raise RuntimeError(f"{run_dir}: training finished without a checkpoint")
    return found


def rmse01(a: np.ndarray, b: np.ndarray) -> float:
    """RMSE in [0, 1] image space of two [-1, 1] model-space batches."""
    return float(np.sqrt(np.mean(((np.clip(a, -1, 1) - np.clip(b, -1, 1)) / 2) ** 2)))


def plot(rows: list[dict], path: Path) -> Path:
    fig, ax = figure(6, 4)
    for name in sorted({r["sampler"] for r in rows}):
        pts = sorted((r["calls"], r["rmse"]) for r in rows if r["sampler"] == name and r["rmse"] > 0)
        ax.loglog(*zip(*pts), "o-", label=name)
    ax.axhline(GOAL[2], color="grey", ls="--", lw=0.8, label=f"goal RMSE {GOAL[2]}")
    ax.set_xlabel("denoiser calls per image")
    ax.set_ylabel("RMSE vs DDIM-T reference ([0,1] pixels)")
    ax.set_title("Sampler accuracy vs cost (tiny model, same x_T)")
    ax.legend(fontsize=8)
    return save_png(fig, path)


def run(out: Path, *, ckpt: Path | None = None, train_steps: int = 300, n: int = 8, seed: int = 0,
        grid: Sequence[tuple[str, int | None]] = (("ddim", 5), ("ddim", 10), ("ddim", 20), ("ddim", 50),
                                                   ("dpmpp-2m", 5), ("dpmpp-2m", 10), ("dpmpp-2m", 20),
                                                   ("dpmpp-2m", 50), ("ddpm", None))) -> Path:
    from cxr_ddpm.export.onnx_export import export_onnx
    from cxr_ddpm.runtime.backends.onnx import OrtDenoiser
    from cxr_ddpm.runtime.samplers import get_sampler
    given = ckpt is not None
    ckpt = Path(ckpt) if given else trained_tiny(train_steps)
    onnx_path = ckpt.with_suffix(".bench.onnx")
    if not onnx_path.is_file() or onnx_path.stat().st_mtime < ckpt.stat().st_mtime:
        export_onnx(ckpt, onnx_path, verify=False, log=lambda m: None)
    den = OrtDenoiser(onnx_path)
    sched, size, T = den.schedule, den.config.model.image_size, den.schedule.timesteps
    rng = np.random.default_rng(seed)
    x_T = rng.standard_normal((n, 1, size, size), dtype=np.float32)
    noise_rng = np.random.default_rng(seed + 1)

    def sample(name: str, steps: int | None) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        x = get_sampler(name)(den, x_T.copy(), sched, steps=steps,
                              noise=lambda k: noise_rng.standard_normal(x_T.shape, dtype=np.float32))
        return x, time.perf_counter() - t0
    ref, ref_s = sample("ddim", T)
    rows: list[dict[str, Any]] = []
    for name, steps in grid:
        if steps is not None and steps > T:
            continue
        x, s = sample(name, steps)
        calls = T if steps is None else steps
        rows.append({"sampler": name, "steps": calls, "calls": calls, "rmse": round(rmse01(x, ref), 5),
                     "seconds": round(s, 2), "deterministic": name != "ddpm"})
        print(f"  {name:<9}{calls:>5} steps  RMSE {rows[-1]['rmse']:.4f}", flush=True)
    goal = next((r for r in rows if (r["sampler"], r["steps"]) == GOAL[:2]), None)
    verdict = (None if goal is None else
               {"sampler": GOAL[0], "steps": GOAL[1], "rmse": goal["rmse"], "threshold": GOAL[2],
                "met": goal["rmse"] <= GOAL[2]})
    doc = {"model": str(ckpt), "trained_steps": "given checkpoint" if given else train_steps,
           "timesteps": T, "reference": f"DDIM eta=0 over all T={T} levels (T-step DDIM; tiny has T={T})",
           "images": n, "px": size, "rmse_space": "[0,1] pixels, all pixels of all images",
           "ddpm_note": "ddpm is stochastic (its own noise), so its RMSE measures sample diversity, not error",
           "reference_seconds": round(ref_s, 2), "goal": verdict, "rows": rows}
    plot(rows, out / "accuracy.png")
    goal_line = ("" if verdict is None else
                 f"Goal dpmpp-2m @ {GOAL[1]} steps within RMSE {GOAL[2]}: RMSE {verdict['rmse']:.4f}, "
                 f"{'met' if verdict['met'] else 'NOT met'}.\n\n")
    md = (f"## Sampler accuracy vs cost (tiny, {size} px, {n} images)\n\nReference: {doc['reference']}. "
          f"RMSE in [0, 1] pixels.\n\n{goal_line}" + md_table(rows, [
              ("sampler", "sampler"), ("steps", "steps"), ("calls", "denoiser calls"), ("rmse", "RMSE"),
              ("seconds", "s (ORT, batch)"), ("deterministic", "deterministic")]) + "\n![](accuracy.png)\n")
    return write_section(out, "accuracy", doc, md)



