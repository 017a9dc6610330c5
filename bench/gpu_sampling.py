"""Section 5, sampling part: the torch-free runtime on CUDA, every variant side by side in one run.

- Step: one U-Net call at the denoiser batch (ORT CUDA fp32 / fp16, without and with CUDA graphs,
  NumPy in/out = host copies every step vs CuPy in/out = x stays on the GPU), ratio to ORT CUDA fp32
  with NumPy (today's path) and to PyTorch eager fp32 measured in the same run.
- End to end: `iter_batches` at batch 64, dpmpp-2m 20 steps, s/image in steady state (median of
  repeats); start-up (session creation, then the first batch with warm-up and graph capture)
  reported separately, never folded into s/image.
A variant whose CUDA graphs fall back (ORT refused or capture failed) is recorded as such, not
timed under the graph name. `provider="cpu"` runs the same rows on ORT's CPU provider with NumPy
(the CuPy and graph variants then say why not): how this code is executed on a CPU machine.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .common import stats

STEP_PLAN = (("fp32", "off", "numpy"), ("fp32", "off", "cupy"), ("fp32", "on", "cupy"),
             ("fp16", "off", "cupy"), ("fp16", "on", "cupy"), ("fp32", "on", "numpy"))
E2E_PLAN = (("fp32", "off", "numpy"), ("fp32", "off", "cupy"), ("fp32", "on", "numpy"),
            ("fp32", "on", "cupy"), ("fp16", "off", "cupy"), ("fp16", "on", "cupy"))
BASELINE = "fp32 plain numpy"


def variant_name(precision: str, graph: str, arrays: str) -> str:
    return f"{precision} {'graph' if graph == 'on' else 'plain'} {arrays}"


def planned() -> list[str]:
    """What a GPU run measures (listed in the pending JSON so the table's rows are known)."""
    return ([f"step: ORT CUDA {variant_name(*v)}" for v in STEP_PLAN]
            + [f"end to end b64 dpmpp-2m 20: ORT CUDA {variant_name(*v)}" for v in E2E_PLAN])


def missing() -> str | None:
    """Why the ORT-on-CUDA rows cannot run here, or None."""
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)"
    return None


def _sync(xp: Any) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


def open_variant(path: Path, graph: str, arrays: str, provider: str = "cuda") -> tuple[Any, Any, str | None]:
    """(denoiser, array module, why not) for one variant; graphs that fell back say so.
    provider cpu runs the same rows on ORT's CPU provider (the CPU test of this code)."""
    from cxr_ddpm.runtime.backends import load_denoiser
    from cxr_ddpm.runtime.backends.onnx import OrtDenoiser
    from cxr_ddpm.runtime.backends.ort_cuda import resolve_cuda_graph, sampler_arrays
    from cxr_ddpm.runtime.errors import CxrError
    try:
        resolve_cuda_graph(graph, provider)         # refused before a session is opened
        xp = sampler_arrays(arrays, provider)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            den = load_denoiser(path, provider=provider, cuda_graph=graph)
    except CxrError as e:                           # no CuPy, graphs off CUDA, a provider that fell back
        return None, None, str(e)
    if graph == "on" and not (isinstance(den, OrtDenoiser) and den.cuda_graph):   # path is an ONNX model
        return None, None, f"CUDA graphs refused: {caught[-1].message if caught else '?'}"
    return den, xp, None


Plan = Sequence[tuple[str, str, str]]          # (precision, graph on/off, arrays numpy/cupy)


def step_rows(arts: dict[str, Path], model: str, size: int, batch: int, runs: int,
              eager_ms: float | None, *, provider: str = "cuda", plan: Plan = STEP_PLAN) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, size, size), dtype=np.float32)
    t = np.full((batch,), 10, np.int64)
    rows: list[dict[str, Any]] = []
    for prec, graph, arrays in plan:
        name = variant_name(prec, graph, arrays)
        row: dict[str, Any] = {"model": model, "px": size, "batch": batch, "variant": name, "provider": provider}
        den, xp, why = open_variant(arts[prec], graph, arrays, provider)
        if den is None:
            rows.append({**row, "skipped": why})
            continue
        xi, ti = xp.asarray(x), xp.asarray(t)

        def call(den: Any = den, xp: Any = xp, xi: Any = xi, ti: Any = ti) -> None:
            den(xi, ti)
            _sync(xp)
        for _ in range(5):                          # past ORT's warm-up and capture runs
            call()
        ms = []
        for _ in range(runs):
            t0 = time.perf_counter()
            call()
            ms.append((time.perf_counter() - t0) * 1e3)
        if graph == "on" and not den.cuda_graph:    # timed plain runs: not under the graph name
            rows.append({**row, "skipped": "CUDA graph capture failed: fell back to plain runs"})
        else:
            rows.append({**row, **stats(ms), "images_per_s": round(batch / (float(np.median(ms)) / 1e3), 1)})
        del den
    base = next((r["median_ms"] for r in rows if r["variant"] == BASELINE and "median_ms" in r), None)
    for r in rows:
        if "median_ms" in r:
            r["vs_ort_fp32_numpy"] = round(base / r["median_ms"], 3) if base else None
            r["vs_torch_eager_fp32"] = round(eager_ms / r["median_ms"], 3) if eager_ms else None
    return rows


def e2e_rows(arts: dict[str, Path], model: str, size: int, *, batch: int = 64, steps: int = 20,
             repeats: int = 3, provider: str = "cuda", plan: Plan = E2E_PLAN) -> list[dict[str, Any]]:
    from cxr_ddpm.runtime.sampling.generate import iter_batches, resolve_request
    rows: list[dict[str, Any]] = []
    for prec, graph, arrays in plan:
        row: dict[str, Any] = {"model": model, "px": size, "batch": batch, "sampler": "dpmpp-2m",
                               "steps": steps, "variant": variant_name(prec, graph, arrays), "provider": provider}
        t0 = time.perf_counter()
        den, xp, why = open_variant(arts[prec], graph, arrays, provider)
        if den is None:
            rows.append({**row, "skipped": why})
            continue
        session_s = time.perf_counter() - t0

        def one(seed: int, den: Any = den, xp: Any = xp) -> float:
            req = resolve_request(den, batch, sampler="dpmpp-2m", steps=steps, seed=seed)
            t1 = time.perf_counter()
            for _ in iter_batches(den, req, batch_size=batch, xp=xp):
                pass                                # each batch comes back to the host as numpy
            return time.perf_counter() - t1
        first_s = one(0)
        totals = [one(r + 1) for r in range(repeats)]
        med = float(np.median(totals))
        if graph == "on" and not den.cuda_graph:    # capture failed mid-run: plain runs were timed
            rows.append({**row, "skipped": "CUDA graph capture failed: fell back to plain runs"})
        else:
            rows.append({**row, "s_per_image": round(med / batch, 5), "images_per_s": round(batch / med, 1),
                         "session_s": round(session_s, 2), "first_batch_s": round(first_s, 2),
                         "repeats": repeats})
        del den
    base = next((r["s_per_image"] for r in rows if r["variant"] == BASELINE and "s_per_image" in r), None)
    for r in rows:
        if "s_per_image" in r:
            r["speedup_vs_ort_fp32_numpy"] = round(base / r["s_per_image"], 3) if base else None
    return rows


def eager_fp32_ms(rows: list[dict[str, Any]], model: str, size: int, batch: int) -> float | None:
    return next((r["median_ms"] for r in rows if (r["model"], r["px"], r["batch"], r["variant"])
                 == (model, size, batch, "eager_fp32")), None)


STEP_COLS = [("model", "model"), ("px", "px"), ("batch", "batch"), ("variant", "ORT CUDA variant"),
             ("median_ms", "median ms"), ("images_per_s", "images/s"),
             ("vs_ort_fp32_numpy", "vs fp32 plain numpy"), ("vs_torch_eager_fp32", "vs torch eager fp32"),
             ("skipped", "not measured")]
E2E_COLS = [("model", "model"), ("px", "px"), ("batch", "batch"), ("variant", "ORT CUDA variant"),
            ("s_per_image", "s/image"), ("images_per_s", "images/s"),
            ("speedup_vs_ort_fp32_numpy", "vs fp32 plain numpy"), ("session_s", "session s"),
            ("first_batch_s", "first batch s"), ("skipped", "not measured")]


def run_all(arts: dict[str, Path], model: str, size: int, torch_rows: list[dict[str, Any]], *,
            step_batch: int, e2e_batch: int, steps: int, runs: int, repeats: int,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both tables for one model, or why they were not measured."""
    why = missing()
    if why:
        return {"sampling_status": f"not measured: {why}", "sampling_step_rows": [], "sampling_e2e_rows": []}
    log(f"  sampling on CUDA: {model} {size} px, step batch {step_batch}, end to end batch {e2e_batch}")
    eager = eager_fp32_ms(torch_rows, model, size, step_batch)
    return {"sampling_status": "measured",
            "sampling_step_rows": step_rows(arts, model, size, step_batch, runs, eager),
            "sampling_e2e_rows": e2e_rows(arts, model, size, batch=e2e_batch, steps=steps, repeats=repeats)}
