"""Section 1: one denoiser call (= one sampling step) across backends, plus FLOPs per image.

Variants per (model, px, batch) cell, interleaved: PyTorch eager plain / channels_last x
no_grad / inference_mode, torch.compile (one shape per model, compile time-boxed), ORT fp32
with the runtime's own session settings (OrtDenoiser), ORT fp16. Headline: speed-up over
PyTorch eager (plain, inference_mode) in the same cell. Expensive cells drop the no_grad
twins and run fewer rounds; the JSON/markdown say which.
"""
from __future__ import annotations

import functools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import figure, fresh_artifacts, interleaved, md_table, run_child, save_png, write_section

BASELINE = "eager"                         # plain layout, inference_mode
VARIANTS = ("eager", "eager_no_grad", "eager_cl", "eager_cl_no_grad", "compile", "ort_fp32", "ort_fp16")


def load_unet(ckpt: Path, channels_last: bool = False) -> Any:
    import torch

    from cxr_ddpm.train.checkpoint import load_checkpoint
    unet = load_checkpoint(ckpt).build_unet(ema=True).eval()
    return unet.to(memory_format=torch.channels_last) if channels_last else unet


def flops_per_image(ckpt: Path, size: int) -> float:
    """FLOPs of one denoiser call per image (FlopCounterMode: matmuls, convs, attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    unet = load_unet(ckpt)
    x, t = torch.randn(1, 1, size, size), torch.full((1,), 10, dtype=torch.long)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        unet(x, t)
    return float(fc.get_total_flops())


def torch_calls(ckpt: Path, x: np.ndarray, t: np.ndarray, names: list[str]) -> dict[str, Callable[[], Any]]:
    import torch
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    xcl = xt.contiguous(memory_format=torch.channels_last)
    plain, cl = load_unet(ckpt), load_unet(ckpt, channels_last=True)

    def run(model: Any, inp: Any, ctx: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with ctx():
                return model(inp, tt)
        return call
    table = {"eager": run(plain, xt, torch.inference_mode), "eager_no_grad": run(plain, xt, torch.no_grad),
             "eager_cl": run(cl, xcl, torch.inference_mode), "eager_cl_no_grad": run(cl, xcl, torch.no_grad)}
    return {k: v for k, v in table.items() if k in names}


def compile_probe_cmd(ckpt: Path, x_shape: tuple[int, ...]) -> list[str]:
    """The child that compiles the U-Net and makes one call at x_shape (see compiled_call)."""
    return [sys.executable, "-m", "bench.denoiser", "compile-probe", str(ckpt), ",".join(map(str, x_shape))]


def compile_probe(ckpt: Path, x_shape: tuple[int, ...]) -> None:
    import torch
    unet = torch.compile(load_unet(ckpt))
    with torch.inference_mode():
        unet(torch.zeros(x_shape), torch.full((x_shape[0],), 10, dtype=torch.long))


def boxed_run(cmd: list[str], limit_s: float) -> str:
    """Run cmd with a wall-clock limit; "ok" or "failed: ...". A subprocess with a timeout, not a
    signal: SIGALRM raised inside torch.compile can land in a weakref callback, where Python
    ignores it and the compile runs on. The child's session (inductor's compile workers too) is
    killed on timeout (common.run_child)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "child.log"
        status, rc, _ = run_child(cmd, limit_s, log)
        text = log.read_text(errors="replace")
    if status == "timeout":
        return f"failed: TimeoutError: exceeded {limit_s:g} s"
    if status == "failed":
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), f"exit {rc}")
        return f"failed: {' '.join(last.split())[:200]}"
    return "ok"


def compiled_call(ckpt: Path, x: np.ndarray, t: np.ndarray, limit_s: float,
                  probe_cmd: list[str] | None = None) -> tuple[Callable | None, dict]:
    """torch.compile'd U-Net. The compile is first time-boxed in a child process (probe_cmd,
    default compile_probe_cmd); failure or timeout is recorded and no compile variant is timed.
    Once the child compiled within the limit, the in-process compile reuses inductor's on-disk
    cache, so it is not boxed again."""
    t0 = time.perf_counter()
    status = boxed_run(probe_cmd or compile_probe_cmd(ckpt, x.shape), limit_s)
    info = {"compile_status": status, "compile_s": round(time.perf_counter() - t0, 1)}
    if status != "ok":
        return None, info
    import torch
    unet = torch.compile(load_unet(ckpt))
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)

    def call() -> Any:
        with torch.inference_mode():
            return unet(xt, tt)
    try:
        call()
    except Exception as e:  # inductor raises many types; record, never abort the section
        return None, {"compile_status": f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}",
                      "compile_s": info["compile_s"]}
    return call, info


def run_cell(model: str, size: int, batch: int, arts: dict[str, Path], *, runs: int, budget_s: float,
             heavy_s: float, compile_here: bool, compile_limit_s: int,
             max_cell_s: float = 150.0) -> tuple[list[dict], dict]:
    from cxr_ddpm.runtime.backends.onnx import OrtDenoiser
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, size, size), dtype=np.float32)
    t = np.full((batch,), 10, dtype=np.int64)
    ort32, ort16 = OrtDenoiser(arts["fp32"]), OrtDenoiser(arts["fp16"])
    t0 = time.perf_counter()
    ort32(x, t)
    probe = time.perf_counter() - t0
    note: dict[str, Any] = {"model": model, "px": size, "batch": batch}
    if probe * 4 * 3 > max_cell_s:          # 4 variants x (warm-up + 2 runs) would not fit
        note["skipped"] = (f"whole cell: one ORT call took {probe:.1f} s, so warm-up + 2 rounds would "
                           f"exceed {max_cell_s:.0f} s on this machine")
        print(f"  {model:<7}{size:>4} px b{batch:<3}skipped ({probe:.1f} s per ORT call)", flush=True)
        return [], note
    heavy = probe * len(VARIANTS) > heavy_s
    names = ["eager", "eager_cl"] + ([] if heavy else ["eager_no_grad", "eager_cl_no_grad"])
    calls = torch_calls(arts["ckpt"], x, t, names)
    calls["ort_fp32"] = lambda: ort32(x, t)
    calls["ort_fp16"] = lambda: ort16(x, t)
    if heavy:
        note["skipped"] = "no_grad variants (cell too slow on this machine; inference_mode twins kept)"
    if compile_here:
        fn, info = compiled_call(arts["ckpt"], x, t, compile_limit_s)
        note.update(info)
        if fn is not None:
            calls["compile"] = fn
    res = interleaved(calls, runs=runs, budget_s=budget_s, min_runs=2 if heavy else 3)
    base = res[BASELINE]["median_ms"]
    rows = [{"model": model, "px": size, "batch": batch, "variant": k, **r,
             "ms_per_image": round(r["median_ms"] / batch, 3),
             "speedup_vs_eager": round(base / r["median_ms"], 3)} for k, r in res.items()]
    print(f"  {model:<7}{size:>4} px b{batch:<3}" + "  ".join(
        f"{r['variant']} {r['median_ms']:.0f}ms" for r in rows) + f"  (n={rows[0]['n']})", flush=True)
    return rows, note


def ort_settings(onnx_path: Path, size: int, batch: int, runs: int) -> list[dict]:
    """Which ORT session settings / graph tweaks matter (default = what the runtime uses)."""
    from cxr_ddpm.runtime.backends.onnx import OrtDenoiser
    v: dict[str, Any] = {"runtime default (opt=all, threads=allowance)": OrtDenoiser(onnx_path),
                         "opt=basic": OrtDenoiser(onnx_path, opt_level="basic"),
                         "opt=disable": OrtDenoiser(onnx_path, opt_level="disable"),
                         "mem_pattern off": OrtDenoiser(onnx_path, mem_pattern=False),
                         "threads=1": OrtDenoiser(onnx_path, threads=1)}
    try:
        import onnx
        import onnxslim
        slim = onnx_path.with_suffix(".slim.onnx")
        if not slim.is_file():
            model = onnxslim.slim(onnx.load(str(onnx_path)))
            del model.metadata_props[:]
            for p in onnx.load(str(onnx_path)).metadata_props:
                model.metadata_props.add(key=p.key, value=p.value)
            onnx.save(model, str(slim))
        v["onnxslim"] = OrtDenoiser(slim)
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((batch, 1, size, size), dtype=np.float32), np.full((batch,), 10, np.int64)
    res = interleaved({k: functools.partial(d, x, t) for k, d in v.items()}, runs=runs)
    base = next(iter(res.values()))["median_ms"]
    return [{"setting": k, **r, "vs_default": round(r["median_ms"] / base, 3)} for k, r in res.items()]


def startup(onnx_path: Path, ckpt: Path) -> list[dict]:
    """Fresh processes: ORT-only runtime vs the PyTorch reference, peak RSS and start-up."""
    try:
        from cxr_ddpm.runtime.sampling.bench import bench_in_subprocess
    except ImportError as e:
        return [{"error": f"runtime bench worker unavailable: {e}"}]
    rows = []
    for label, path, backend in (("ort", onnx_path, "onnx"), ("torch", ckpt, "torch")):
        try:
            rec = bench_in_subprocess(path, backend=backend, provider=None, threads=None,
                                      batch_size=1, steps=3, repeats=2)
            rows.append({"backend": label, "peak_rss_mib": round(rec["peak_rss_mib"], 1),
                         "start_to_first_step_s": round(rec["start_to_first_step_s"], 2),
                         "torch_imported": rec.get("torch_imported")})
        except Exception as e:  # a broken worker must not sink the whole section
            rows.append({"backend": label, "error": str(e)[:200]})
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    fig, ax = figure(9, 4)
    cells = sorted({(r["model"], r["px"], r["batch"]) for r in rows}, key=lambda c: (c[0] != "tiny", c[1], c[2]))
    variants = [v for v in VARIANTS if v != BASELINE and any(r["variant"] == v for r in rows)]
    w = 0.8 / max(len(variants), 1)
    for j, v in enumerate(variants):
        ys = [next((r["speedup_vs_eager"] for r in rows if (r["model"], r["px"], r["batch"]) == c
                    and r["variant"] == v), 0) for c in cells]
        ax.bar(np.arange(len(cells)) + (j - len(variants) / 2 + 0.5) * w, ys, w, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(cells)), [f"{m}\n{p}px b{b}" for m, p, b in cells], fontsize=7)
    ax.set_ylabel("speed-up vs PyTorch eager (x)")
    ax.set_title("Denoiser step latency, CPU: speed-up over PyTorch eager in the same run")
    ax.legend(fontsize=7, ncol=3)
    return save_png(fig, path)


def run(out: Path, *, models: tuple[str, ...] = ("tiny", "cxr128"), sizes: tuple[int, ...] = (64, 128),
        batches: tuple[int, ...] = (1, 4, 16), runs: int = 10, budget_s: float = 12.0, heavy_s: float = 8.0, max_cell_s: float = 120.0,
        compile_at: tuple[str, int, int] | None = ("tiny", 64, 1), compile_limit_s: int = 150, extras: bool = True) -> Path:
    import torch

    from cxr_ddpm.runtime.system import cpu_allowance
    torch.set_num_threads(cpu_allowance())
    rows, notes, flops = [], [], []
    for model in models:
        for size in sizes:
            arts = fresh_artifacts(model, [f"model.image_size={size}"], ("fp32", "fp16"))
            flops.append({"model": model, "px": size, "gflops_per_image": round(flops_per_image(arts["ckpt"], size) / 1e9, 3)})
            for b in batches:
                r, n = run_cell(model, size, b, arts, runs=runs, budget_s=budget_s, heavy_s=heavy_s,
                                compile_here=compile_at == (model, size, b), compile_limit_s=compile_limit_s,
                                max_cell_s=max_cell_s)
                rows += r
                notes.append(n)
    doc: dict[str, Any] = {
        "baseline": "PyTorch eager, plain layout, torch.inference_mode",
        "timing": f"interleaved rounds after 1 warm-up; up to {runs} runs per variant, fewer where a cell "
                  f"would exceed ~{budget_s:.0f} s (n per row); weights freshly initialised (latency is "
                  "weight-independent); t=10",
        "compile": f"torch.compile only at {compile_at} (model, px, batch), compile time-boxed to "
                   f"{compile_limit_s} s" if compile_at else "torch.compile skipped",
        "rows": rows, "cells": notes, "flops": flops}
    if extras and "cxr128" in models:
        arts = fresh_artifacts("cxr128", ["model.image_size=64"], ("fp32",))
        doc["ort_settings"] = ort_settings(arts["fp32"], 64, 1, runs)
        doc["startup"] = startup(arts["fp32"], arts["ckpt"])
    plot(rows, out / "denoiser.png")
    md = ["## Denoiser step latency (CPU)\n", f"Baseline: {doc['baseline']}. {doc['timing']}.\n",
          "Cells: median ms per call (speed-up vs eager).\n\n"]
    cols = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    pivot = []
    for n in notes:
        cell = {r["variant"]: r for r in rows if (r["model"], r["px"], r["batch"]) == (n["model"], n["px"], n["batch"])}
        if not cell:
            continue
        pivot.append({"model": n["model"], "px": n["px"], "batch": n["batch"], "n": cell[BASELINE]["n"],
                      **{v: f"{cell[v]['median_ms']:.0f} ({cell[v]['speedup_vs_eager']:.2f}x)"
                         for v in cols if v in cell}})
    md.append(md_table(pivot, [("model", "model"), ("px", "px"), ("batch", "batch"), ("n", "runs")]
                       + [(v, v) for v in cols]))
    md.append("\nFLOPs per image per denoiser call (FlopCounterMode):\n\n"
              + md_table(flops, [("model", "model"), ("px", "px"), ("gflops_per_image", "GFLOP")]))
    skipped = [n for n in notes if "skipped" in n or "compile_status" in n]
    if skipped:
        md.append("\nSkipped / torch.compile:\n\n" + "".join(
            f"- {n['model']} {n['px']} px b{n['batch']}: " + "; ".join(
                f"{k}={n[k]}" for k in ("skipped", "compile_status", "compile_s") if k in n) + "\n"
            for n in skipped))
    if doc.get("ort_settings"):
        md.append("\nORT session settings, cxr128 at 64 px, batch 1:\n\n" + md_table(
            doc["ort_settings"], [("setting", "setting"), ("median_ms", "median ms"), ("p90_ms", "p90 ms"),
                                  ("vs_default", "vs default")]))
    if doc.get("startup"):
        md.append("\nFresh process, cxr128 at 64 px (3 steps): \n\n" + md_table(
            doc["startup"], [("backend", "backend"), ("peak_rss_mib", "peak RSS MiB"),
                             ("start_to_first_step_s", "start to first step s"), ("error", "error")]))
    return write_section(out, "denoiser", doc, "".join(md))


if __name__ == "__main__":          # the compile probe child: python -m bench.denoiser compile-probe CKPT SHAPE
    if sys.argv[1:2] != ["compile-probe"] or len(sys.argv) != 4:
        sys.exit("usage: python -m bench.denoiser compile-probe CKPT N,C,H,W")
    try:
        compile_probe(Path(sys.argv[2]), tuple(int(n) for n in sys.argv[3].split(",")))
    except Exception as e:  # the parent records the last stderr line: make it the cause
        sys.exit(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
