"""Section 5: the denoiser on a CUDA GPU: eager fp32/bf16, CUDA graphs, ORT CUDA / TensorRT EP, MFU;
then the torch-free runtime sampling on CUDA (bench/gpu_sampling.py: ORT fp32/fp16, CUDA graphs,
CuPy vs NumPy sampler arrays, end to end at batch 64).

Without CUDA it writes gpu.json/gpu.md saying the section is pending and why, plus the
FLOPs per image (counted on CPU) that the MFU will be computed from.
MFU = FLOPs per image x images/s / measured bf16 matmul peak (8192^3 GEMMs).
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxr_ddpm.runtime.errors import CxrError

from . import gpu_sampling
from .common import fresh_artifacts, md_table, stats, write_section
from .denoiser import flops_per_image, load_unet


def cuda_time(fn: Callable[[], Any], runs: int) -> dict[str, float]:
    import torch
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t0) * 1e3)
    return stats(ms)


def bf16_peak_tflops(n: int = 8192, runs: int = 10) -> float:
    import torch
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / (cuda_time(lambda: a @ b, runs)["median_ms"] / 1e3) / 1e12


def graphed(unet: Any, x: Any, t: Any) -> Callable[[], Any]:
    """CUDA-graph capture of one inference_mode forward on static buffers."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.inference_mode():
        for _ in range(3):
            unet(x, t)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(g):
        unet(x, t)
    return g.replay


def ort_calls(path: Path, x: np.ndarray, t: np.ndarray, providers: Sequence[str] = ("cuda", "tensorrt")
              ) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """One denoiser call per ORT provider (`ort_<provider>`), and why each missing one is missing.

    Sessions come from the runtime's one factory (open_session: GPU libraries preloaded, TF32 off
    as in the runtime, the provider checked): ORT silently runs a session on CPU when a provider's
    libraries do not load, which would time the CPU under a GPU label."""
    from cxr_ddpm.runtime.backends.onnx import open_session
    calls: dict[str, Callable[[], Any]] = {}
    skipped: dict[str, str] = {}
    for provider in providers:
        try:
            sess = open_session(path, provider=provider, trt_batches=(x.shape[0],),
                                source=f"bench gpu: {path}")
        except CxrError as e:
            skipped[f"ort_{provider}"] = str(e)
            continue
        calls[f"ort_{provider}"] = functools.partial(sess.run, ["out"], {"x": x, "t": t})  # typed, unlike lambda s=sess
    return calls, skipped


def variants(arts: dict[str, Path], size: int, batch: int) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """The timed calls, and the variants that could not be set up with the reason."""
    import torch
    unet = load_unet(arts["ckpt"]).cuda()
    x = torch.randn(batch, 1, size, size, device="cuda")
    t = torch.full((batch,), 10, device="cuda", dtype=torch.long)

    def eager(dtype: Any | None) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                return unet(x, t)
        return call
    out: dict[str, Callable[[], Any]] = {"eager_fp32": eager(None), "eager_bf16": eager(torch.bfloat16)}
    skipped: dict[str, str] = {}
    try:
        out["cuda_graph_fp32"] = graphed(unet, x, t)
    except Exception as e:  # capture can fail on some ops; record as a missing variant
        skipped["cuda_graph_fp32"] = f"capture failed: {' '.join(str(e).split())[:160]}"
    calls, missing = ort_calls(arts["fp32"], x.cpu().numpy(), t.cpu().numpy())
    return {**out, **calls}, {**skipped, **missing}


def run(out: Path, *, models: tuple[tuple[str, int], ...] = (("tiny", 64), ("cxr128", 128)),
        batches: tuple[int, ...] = (1, 16), runs: int = 20, sampling: tuple[str, int] = ("cxr128", 128),
        step_batch: int = 16, e2e_batch: int = 64, e2e_steps: int = 20, e2e_repeats: int = 3) -> Path:
    import torch
    flops: list[dict[str, Any]] = []
    for model, size in models:
        arts = fresh_artifacts(model, [f"model.image_size={size}"], ("fp32",))
        flops.append({"model": model, "px": size, "gflops_per_image": round(flops_per_image(arts["ckpt"], size) / 1e9, 3)})
    if not torch.cuda.is_available():
        why = ("pending: no CUDA device visible to this process (this benchmark run was on a CPU-only machine; "
               "the session was not lent a GPU). Re-run `python -m bench gpu --out bench/results` on a GPU machine.")
        doc: dict[str, Any] = {"status": "pending", "why": why, "flops": flops, "rows": [],
               "sampling_status": "pending", "sampling_planned": gpu_sampling.planned()}
        md = (f"## GPU\n\n{why}\n\nFLOPs per image per denoiser call (counted on CPU):\n\n"
              + md_table(flops, [("model", "model"), ("px", "px"), ("gflops_per_image", "GFLOP")])
              + "\nPending sampling rows (runtime on CUDA, side by side):\n\n"
              + "".join(f"- {p}\n" for p in gpu_sampling.planned()))
        return write_section(out, "gpu", doc, md)
    peak = bf16_peak_tflops()
    rows = []
    for f in flops:
        arts = fresh_artifacts(f["model"], [f"model.image_size={f['px']}"], ("fp32",))
        for b in batches:
            calls, skipped = variants(arts, f["px"], b)
            rows += [{"model": f["model"], "px": f["px"], "batch": b, "variant": name, "skipped": why}
                     for name, why in skipped.items()]
            for name, fn in calls.items():
                r = cuda_time(fn, runs)
                ips = b / (r["median_ms"] / 1e3)
                rows.append({"model": f["model"], "px": f["px"], "batch": b, "variant": name, **r,
                             "images_per_s": round(ips, 1),
                             "mfu_vs_bf16_peak": round(f["gflops_per_image"] * 1e9 * ips / (peak * 1e12), 4)})
    try:
        import tensorrt  # noqa: F401
        trt = "tensorrt importable; native engines: cxr-export trt + cxr-runtime bench"
    except ImportError:
        trt = "tensorrt not installed: no TensorRT rows"
    s_model, s_px = sampling
    s_arts = fresh_artifacts(s_model, [f"model.image_size={s_px}"], ("fp32", "fp16"))
    samp = gpu_sampling.run_all(s_arts, s_model, s_px, rows, step_batch=step_batch, e2e_batch=e2e_batch,
                                steps=e2e_steps, runs=runs, repeats=e2e_repeats)
    doc = {"status": "measured", "bf16_matmul_peak_tflops": round(peak, 1), "tensorrt": trt,
           "flops": flops, "rows": rows, "gpu_name": torch.cuda.get_device_name(0), **samp}
    md = (f"## GPU ({doc['gpu_name']}, bf16 matmul peak {peak:.0f} TFLOP/s measured)\n\n{trt}\n\n"
          + md_table(rows, [("model", "model"), ("px", "px"), ("batch", "batch"), ("variant", "variant"),
                            ("median_ms", "median ms"), ("p90_ms", "p90 ms"), ("images_per_s", "images/s"),
                            ("mfu_vs_bf16_peak", "MFU"), ("skipped", "not measured")])
          + f"\n### Runtime sampling on CUDA ({samp['sampling_status']})\n\nDenoiser step:\n\n"
          + md_table(samp["sampling_step_rows"], gpu_sampling.STEP_COLS)
          + f"\nEnd to end (dpmpp-2m {e2e_steps} steps, batch {e2e_batch}; start-up separate):\n\n"
          + md_table(samp["sampling_e2e_rows"], gpu_sampling.E2E_COLS))
    return write_section(out, "gpu", doc, md)



