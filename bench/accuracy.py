"""Section 3: sampler accuracy vs cost on trained tiny models.

Models (committed, rebuilt by `make pretrained`): the demo model (tiny, T = 100) and the same
architecture trained with T = 1000 (as cxr128 uses). A model trained for a few hundred steps
hides the grid's effect, so `trained_tiny` is only the fallback when neither file is there.
Reference: deterministic DDIM over all T levels (the finest grid the model has) from the same
x_T. RMSE in [0, 1] image space: per cell the RMSE over all pixels of n images and the spread
(standard deviation) of the n per-image RMSEs. dpmpp-2m runs on its default grid
(timesteps.default_time_grid) and, for the record, on every grid of TIME_GRIDS. "diffusers
default" is diffusers' DPMSolverMultistepScheduler with its defaults (linspace spacing, final
sigma 0, lower_order_final, 2nd order), run live when diffusers imports; otherwise dpmpp-2m on
diffusers' grid ("linspace"), which tests/test_samplers.py pins to diffusers within 1e-6.
"""
from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .common import CACHE, ROOT, config_key, figure, md_table, save_png, write_section
from .train import run_fit

GOAL = ("dpmpp-2m", 20, 0.02)
MODELS = {"demo T=100": ROOT / "models" / "tiny-demo" / "tiny-demo.onnx",
          "T=1000": ROOT / "models" / "tiny-t1000" / "tiny-t1000.onnx"}
STEPS = (5, 10, 20, 50)


def trained_tiny(steps: int = 300, cache: Path = CACHE) -> Path:
    """Cached tiny checkpoint trained `steps` steps on data/cxr-sample (trains if missing)."""
    from cxr_ddpm.train.config import load_config
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


def per_image_rmse01(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (np.clip(a, -1, 1) - np.clip(b, -1, 1)) / 2
    return np.sqrt(np.mean(d.reshape(len(d), -1) ** 2, axis=1))


def diffusers_dpmpp_2m(denoise: Callable[..., np.ndarray], x_T: np.ndarray, schedule: Any, steps: int, *,
                       clip_x0: bool) -> np.ndarray:
    """diffusers' DPMSolverMultistepScheduler, defaults, on the schedule's own betas. clip_x0 hands
    it the model output whose x0 is the clipped one (what the project's samplers clip), since
    diffusers has no such switch; ImportError without diffusers."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from cxr_ddpm.runtime.sampling.samplers import predict
    ac = schedule.alphas_cumprod
    kind = {"pred_v": "v_prediction", "pred_noise": "epsilon", "pred_x0": "sample"}[schedule.objective]
    dpm = DPMSolverMultistepScheduler(num_train_timesteps=schedule.timesteps, prediction_type=kind,
                                      trained_betas=(1 - ac / np.concatenate([[1.0], ac[:-1]])).tolist())
    dpm.set_timesteps(steps)
    x = torch.from_numpy(x_T.copy())
    for t in dpm.timesteps:
        xn, a = x.numpy(), float(ac[int(t)])
        out = denoise(xn, np.full((len(xn),), int(t), np.int64))
        if clip_x0:
            _, x0 = predict(xn, out, a, schedule.objective, clip_x0=True)
            out = {"v_prediction": (math.sqrt(a) * xn - x0) / math.sqrt(1 - a),
                   "epsilon": (xn - math.sqrt(a) * x0) / math.sqrt(1 - a), "sample": x0}[kind]
        x = dpm.step(torch.from_numpy(np.ascontiguousarray(out, np.float32)), t, x).prev_sample
    return x.numpy()


def _engines(engines: dict[str, Path] | None, ckpt: Path | None, train_steps: int) -> dict[str, Path]:
    """Name -> ONNX file: given, else the committed models, else a briefly trained tiny (exported)."""
    from cxr_ddpm.export.onnx_export import export_onnx
    if engines:
        return {k: Path(v) for k, v in engines.items()}
    if ckpt is None:
        found = {k: v for k, v in MODELS.items() if v.is_file()}
        if found:
            return found
        ckpt = trained_tiny(train_steps)
    onnx_path = Path(ckpt).with_suffix(".bench.onnx")
    if not onnx_path.is_file() or onnx_path.stat().st_mtime < Path(ckpt).stat().st_mtime:
        export_onnx(ckpt, onnx_path, verify=False, log=lambda m: None)
    return {f"{Path(ckpt).name}": onnx_path}


def measure(name: str, onnx: Path, *, n: int, seed: int, steps: Sequence[int], clips: Sequence[bool],
            grids: Sequence[str]) -> list[dict[str, Any]]:
    """Rows for one model: ddim, dpmpp-2m per grid (default marked) and diffusers default per steps."""
    from cxr_ddpm.runtime.backends.onnx import OrtDenoiser
    from cxr_ddpm.runtime.sampling.samplers import sample_ddim, sample_dpmpp_2m
    from cxr_ddpm.runtime.sampling.timesteps import default_time_grid
    den = OrtDenoiser(onnx)
    sched, size, T = den.schedule, den.config.model.image_size, den.schedule.timesteps
    x_T = np.random.default_rng(seed).standard_normal((n, 1, size, size), dtype=np.float32)
    rows: list[dict[str, Any]] = []
    for clip in clips:
        t0 = time.perf_counter()
        ref = sample_ddim(den, x_T.copy(), sched, steps=T, clip_x0=clip)
        print(f"  {name}: reference DDIM x{T} (clip {clip}) in {time.perf_counter() - t0:.0f} s", flush=True)
        for s in (s for s in steps if s <= T):
            runs: list[tuple[str, str | None, Callable[[], np.ndarray]]] = [
                ("ddim", None, partial(sample_ddim, den, x_T, sched, steps=s, clip_x0=clip))]
            runs += [("dpmpp-2m", g, partial(sample_dpmpp_2m, den, x_T, sched, steps=s, clip_x0=clip, time_grid=g))
                     for g in grids]
            runs.append(("diffusers default", "linspace",
                         partial(diffusers_dpmpp_2m, den, x_T, sched, s, clip_x0=clip)))
            for sampler, grid, fn in runs:
                how = "live" if sampler == "diffusers default" else None
                t0 = time.perf_counter()
                try:
                    x = fn()
                except ImportError:              # no diffusers: its grid in the project's (pinned) 2M code
                    how = "dpmpp-2m on diffusers' grid (diffusers not installed; pinned to it within 1e-6)"
                    x = sample_dpmpp_2m(den, x_T.copy(), sched, steps=s, clip_x0=clip, time_grid="linspace")
                e = per_image_rmse01(x, ref)
                rows.append({"model": name, "T": T, "clip_x0": clip, "sampler": sampler, "grid": grid,
                             "default_grid": sampler == "dpmpp-2m" and grid == default_time_grid(T, s),
                             "steps": s, "calls": s, "rmse": round(float(np.sqrt(np.mean(e ** 2))), 5),
                             "sd": round(float(e.std()), 5), "per_image": [round(float(v), 5) for v in e],
                             "seconds": round(time.perf_counter() - t0, 2), **({"how": how} if how else {})})
            cell = {(r["sampler"], r["default_grid"]): r["rmse"] for r in rows[-len(runs):]}
            print(f"  {name} clip {clip} x{s}: ddim {cell[('ddim', False)]:.4f}  dpmpp-2m "
                  f"{cell[('dpmpp-2m', True)]:.4f}  diffusers {cell[('diffusers default', False)]:.4f}", flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (model, clip, steps): ddim, dpmpp-2m on its default grid, diffusers default."""
    out: list[dict[str, Any]] = []
    keys = sorted({(r["model"], r["clip_x0"], r["steps"]) for r in rows}, key=lambda k: (k[0], not k[1], k[2]))
    for model, clip, s in keys:
        cell = [r for r in rows if (r["model"], r["clip_x0"], r["steps"]) == (model, clip, s)]
        mine = next(r for r in cell if r["default_grid"])
        ref = next(r for r in cell if r["sampler"] == "diffusers default")
        ddim = next(r for r in cell if r["sampler"] == "ddim")
        wins = np.mean(np.asarray(mine["per_image"]) <= np.asarray(ref["per_image"]))
        out.append({"model": model, "clip_x0": clip, "steps": s,
                    "ddim": f"{ddim['rmse']:.4f} ± {ddim['sd']:.4f}", "grid": mine["grid"],
                    "dpmpp": f"{mine['rmse']:.4f} ± {mine['sd']:.4f}",
                    "diffusers": f"{ref['rmse']:.4f} ± {ref['sd']:.4f}",
                    "images_at_least_as_close": f"{wins:.0%}", "ok": mine["rmse"] <= ref["rmse"]})
    return out


def plot(rows: list[dict], path: Path) -> Path:
    models = sorted({r["model"] for r in rows})
    fig, axes = figure(5 * len(models), 4, ncols=len(models))
    for ax, model in zip(np.atleast_1d(axes), models):
        mine = [r for r in rows if r["model"] == model and r["clip_x0"] == rows[0]["clip_x0"]]
        for label, pick, style in (("ddim", lambda r: r["sampler"] == "ddim", "o-"),
                                   ("dpmpp-2m (default grid)", lambda r: r["default_grid"], "s-"),
                                   ("dpmpp-2m time-quadratic (0.2.0)",
                                    lambda r: r["sampler"] == "dpmpp-2m" and r["grid"] == "time-quadratic", "x:"),
                                   ("diffusers default", lambda r: r["sampler"] == "diffusers default", "^--")):
            pts = sorted((r["calls"], r["rmse"]) for r in mine if pick(r) and r["rmse"] > 0)
            if pts:
                ax.loglog(*zip(*pts), style, label=label)
        ax.axhline(GOAL[2], color="grey", ls="--", lw=0.8)
        ax.set_xlabel("denoiser calls per image")
        ax.set_ylabel("RMSE vs DDIM-T reference ([0,1] pixels)")
        ax.set_title(f"tiny {model}", fontsize=10)
        ax.legend(fontsize=7)
    return save_png(fig, path)


def run(out: Path, *, engines: dict[str, Path] | None = None, ckpt: Path | None = None, train_steps: int = 300,
        n: int = 16, seed: int = 0, steps: Sequence[int] = STEPS, clips: Sequence[bool] = (True, False),
        grids: Sequence[str] | None = None) -> Path:
    from cxr_ddpm.runtime.sampling.timesteps import TIME_GRIDS
    given = engines or ckpt
    models = _engines(engines, ckpt, train_steps)
    rows: list[dict[str, Any]] = []
    for name, path in models.items():
        rows += measure(name, path, n=n, seed=seed, steps=steps, clips=clips, grids=grids or TIME_GRIDS)
    summ = summary(rows)
    goal = next((r for r in rows if r["default_grid"] and r["steps"] == GOAL[1] and r["clip_x0"]), None)
    verdict = {"sampler": GOAL[0], "steps": GOAL[1], "threshold": GOAL[2],
               "rmse": goal["rmse"] if goal else None, "met": bool(goal and goal["rmse"] <= GOAL[2]),
               "vs_diffusers_met": all(r["ok"] for r in summ)}
    doc = {"models": {k: str(v) for k, v in models.items()}, "given": bool(given),
           "reference": "DDIM eta=0 over all T levels (T-step DDIM), same x_T", "images": n,
           "rmse_space": "[0,1] pixels; rmse over all pixels of all images, sd = spread of per-image RMSEs",
           "diffusers": "DPMSolverMultistepScheduler defaults: timestep_spacing=linspace, final_sigmas_type=zero, "
                        "lower_order_final=True, solver_order=2, dpmsolver++ midpoint",
           "goal": verdict, "summary": summ, "rows": rows}
    plot(rows, out / "accuracy.png")
    cols = [("model", "model"), ("clip_x0", "clip x0"), ("steps", "steps"), ("ddim", "ddim"), ("grid", "2M grid"),
            ("dpmpp", "dpmpp-2m"), ("diffusers", "diffusers default"),
            ("images_at_least_as_close", "images where 2M <= diffusers")]
    full = [{**r, "grid": r["grid"] or "lucidrains", "rmse_sd": f"{r['rmse']:.4f} ± {r['sd']:.4f}"} for r in rows]
    md = (f"## Sampler accuracy vs cost (trained tiny models, {n} images)\n\nReference: {doc['reference']}. "
          f"RMSE in [0, 1] pixels ± the spread of per-image RMSEs. diffusers default: {doc['diffusers']}.\n\n"
          f"dpmpp-2m on its default grid at least as accurate as diffusers' default at every cell: "
          f"{'yes' if verdict['vs_diffusers_met'] else 'NO'}. Goal dpmpp-2m @ {GOAL[1]} steps within RMSE "
          f"{GOAL[2]}: {verdict['rmse']}, {'met' if verdict['met'] else 'NOT met'}.\n\n" + md_table(summ, cols)
          + "\n### Every grid\n\n" + md_table(full, [("model", "model"), ("clip_x0", "clip x0"),
                                                     ("sampler", "sampler"), ("grid", "grid"), ("steps", "steps"),
                                                     ("rmse_sd", "RMSE ± sd"), ("seconds", "s (ORT, batch)")])
          + "\n![](accuracy.png)\n")
    return write_section(out, "accuracy", doc, md)
