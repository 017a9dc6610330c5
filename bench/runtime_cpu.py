"""CPU per-step latency: ONNX Runtime vs PyTorch eager, same U-Net, plus process start-up and RSS.

    .venv/bin/python bench/runtime_cpu.py                  # full table, ~5-10 min on 2 cores
    .venv/bin/python bench/runtime_cpu.py --quick          # 64 px only, fewer repeats

Model: configs/cxr128.yaml's U-Net (dim 64, mults 1,2,4,8), freshly initialised
(latency does not depend on the weights), at 128 px and with image_size=64 for the
64 px rows. One denoiser call = one sampling step. For each (size, batch) the
variants run interleaved (A, B, C, A, B, C, ...) so drift from other load on the
machine hits them alike. PyTorch eager is the best of plain and channels_last.
Then ORT session settings at 64 px batch 4, and two fresh processes (ORT-only vs
the PyTorch reference) for peak RSS and start-to-first-step time.
Writes bench/results/runtime_cpu.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from cxr_ddpm.export.onnx_export import export_onnx                     # noqa: E402
from cxr_ddpm.runtime.backends.onnx import OrtDenoiser, cpu_allowance   # noqa: E402
from cxr_ddpm.runtime.backends.torch_ref import TorchDenoiser           # noqa: E402
from cxr_ddpm.runtime.cli import bench_in_subprocess                    # noqa: E402
from cxr_ddpm.runtime.config import load_config                         # noqa: E402
from cxr_ddpm.train.checkpoint import save_checkpoint                   # noqa: E402
from cxr_ddpm.train.model import build_unet                             # noqa: E402


def make_artifacts(size: int, work: Path) -> tuple[Path, Path]:
    cfg = load_config(ROOT / "configs" / "cxr128.yaml", [f"model.image_size={size}"])
    torch.manual_seed(0)
    sd = build_unet(cfg.model).state_dict()
    ckpt = save_checkpoint(work / f"cxr{size}.safetensors", cfg=cfg, step=0, class_names=[],
                           ema=sd, online=None)
    onnx_path = work / f"cxr{size}.onnx"
    export_onnx(ckpt, onnx_path, verify=False, log=lambda msg: None)
    return ckpt, onnx_path


def static_batch_copy(src: Path, batch: int, dst: Path) -> Path:
    import onnx
    model = onnx.load(str(src))
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(dst))
    return dst


def slim_copy(src: Path, dst: Path) -> Path | None:
    try:
        import onnxslim
    except ImportError:
        return None
    import onnx
    model = onnxslim.slim(onnx.load(str(src)))
    src_meta = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    del model.metadata_props[:]
    for k, v in src_meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(dst))
    return dst


def interleaved(calls: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:     # rotate: no variant always first
            fn = calls[k]
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90)), "n": len(v)}
            for k, v in times.items()}


def inputs(size: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, 1, size, size), dtype=np.float32),
            np.full((batch,), 500, dtype=np.int64))


def latency_rows(size: int, ckpt: Path, onnx_path: Path, batches: list[int], reps: int) -> list[dict]:
    ort_den = OrtDenoiser(onnx_path)
    plain = TorchDenoiser(ckpt)
    cl = TorchDenoiser(ckpt, channels_last=True)
    rows = []
    for b in batches:
        x, t = inputs(size, b)
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)
        xcl = xt.contiguous(memory_format=torch.channels_last)
        n = reps if size == 64 else max(2, reps // b)         # 128 px x 16 takes seconds per call
        res = interleaved({"ort": lambda: ort_den(x, t),
                           "torch": lambda: plain.call_torch(xt, tt),
                           "torch_cl": lambda: cl.call_torch(xcl, tt)}, n)
        best = min(("torch", "torch_cl"), key=lambda k: res[k]["median_ms"])
        row = {"size": size, "batch": b, "ort": res["ort"], "torch_plain": res["torch"],
               "torch_channels_last": res["torch_cl"], "torch_best": best,
               "ratio_ort_over_torch": res["ort"]["median_ms"] / res[best]["median_ms"]}
        rows.append(row)
        print(f"{size:>4} px  batch {b:>2}  ORT {row['ort']['median_ms']:9.1f} ms (p90 "
              f"{row['ort']['p90_ms']:8.1f})  torch {res[best]['median_ms']:9.1f} ms ({best}, p90 "
              f"{res[best]['p90_ms']:8.1f})  ratio {row['ratio_ort_over_torch']:.2f}x", flush=True)
    return rows


def ort_settings(onnx_path: Path, work: Path, size: int, batch: int, reps: int) -> list[dict]:
    """Which SessionOptions / graph tweaks move the needle, interleaved at one shape."""
    x, t = inputs(size, batch)
    variants: dict[str, OrtDenoiser] = {
        "default (opt=all, threads=allowance, mem_pattern)": OrtDenoiser(onnx_path),
        "opt=basic": OrtDenoiser(onnx_path, opt_level="basic"),
        "opt=disable": OrtDenoiser(onnx_path, opt_level="disable"),
        "mem_pattern off": OrtDenoiser(onnx_path, mem_pattern=False),
        "threads=1": OrtDenoiser(onnx_path, threads=1),
        "static batch": OrtDenoiser(static_batch_copy(onnx_path, batch, work / "static.onnx")),
    }
    slim = slim_copy(onnx_path, work / "slim.onnx")
    if slim is not None:
        variants["onnxslim"] = OrtDenoiser(slim)
    res = interleaved({k: (lambda d=d: d(x, t)) for k, d in variants.items()}, reps)
    base = res["default (opt=all, threads=allowance, mem_pattern)"]["median_ms"]
    out = []
    for k, r in res.items():
        out.append({"variant": k, **r, "vs_default": r["median_ms"] / base})
        print(f"  {k:<52} {r['median_ms']:8.1f} ms  p90 {r['p90_ms']:8.1f}  {r['median_ms'] / base:.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 px only, fewer repeats")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "runtime_cpu.json")
    args = ap.parse_args()
    sizes = [64] if args.quick else [64, 128]
    reps = 3 if args.quick else args.reps
    torch.set_num_threads(cpu_allowance())
    result: dict = {"machine": {"cpus": cpu_allowance(), "platform": platform.platform(),
                                "processor": platform.processor(), "torch": torch.__version__,
                                "torch_threads": torch.get_num_threads()},
                    "rows": [], "ort_settings": [], "processes": []}
    import onnxruntime
    result["machine"]["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        arts = {}
        for size in sizes:
            t0 = time.perf_counter()
            arts[size] = make_artifacts(size, work)
            print(f"exported {size} px model in {time.perf_counter() - t0:.0f} s", flush=True)
        print("per-step latency (one U-Net call), interleaved A/B:")
        for size in sizes:
            result["rows"] += latency_rows(size, *arts[size], [1, 4, 16], reps)
        print("ORT settings at 64 px, batch 4:")
        result["ort_settings"] = ort_settings(arts[64][1], work, 64, 4, reps)
        print("fresh processes, 64 px, batch 1, 3 dpmpp-2m steps:")
        ckpt, onnx_path = arts[64]
        for label, path, backend in (("ort", onnx_path, "onnx"), ("torch", ckpt, "torch")):
            rec = bench_in_subprocess(path, backend=backend, provider=None, threads=None,
                                      batch_size=1, steps=3, repeats=2)
            rec["label"] = label
            result["processes"].append(rec)
            print(f"  {label:<6} peak RSS {rec['peak_rss_mib']:7.0f} MiB  start to first step "
                  f"{rec['start_to_first_step_s']:5.2f} s  step {rec['step_ms_median']:.1f} ms  "
                  f"torch imported: {rec['torch_imported']}")
        o, p = result["processes"]
        print(f"  ratio ORT/torch: RSS {o['peak_rss_mib'] / p['peak_rss_mib']:.2f}x, start-up "
              f"{o['start_to_first_step_s'] / p['start_to_first_step_s']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
