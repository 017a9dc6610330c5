"""Does post-export processing pay off in ONNX Runtime? fp32 vs fp32+onnxslim vs fp16, CPU.

    .venv/bin/python bench/export_ort.py            # tiny + cxr128 U-Net at 64 px, batch 1 and 4
    .venv/bin/python bench/export_ort.py --quick    # tiny only, fewer repeats

Each model is exported once by cxr-export's own export_onnx (dynamo exporter,
opset 18), then slimmed with onnxslim (when installed) and converted to fp16.
Variants run interleaved (A, B, C, A, B, C, ...) so load from other processes on
the machine hits them alike; the table reports the median ms per denoiser call.
Writes bench/results/export_ort.json. onnxslim is not a dependency: export_onnx
only uses it if this bench shows a clear win.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]

from cxr_ddpm.export.onnx_export import export_onnx      # noqa: E402
from cxr_ddpm.runtime.config import load_config          # noqa: E402
from cxr_ddpm.train.checkpoint import save_checkpoint    # noqa: E402
from cxr_ddpm.train.model import build_unet              # noqa: E402


def variants(name: str, overrides: list[str], work: Path) -> dict[str, Path]:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", overrides)
    torch.manual_seed(0)
    sd = build_unet(cfg.model).state_dict()
    ck = save_checkpoint(work / f"{name}.safetensors", cfg=cfg, step=0, class_names=[], ema=sd, online=None)
    out = {p: export_onnx(ck, work / f"{name}.{p}.onnx", precision=p, verify=False, log=lambda m: None).path
           for p in ("fp32", "fp16")}
    try:
        import onnx
        import onnxslim
        slim = work / f"{name}.fp32-slim.onnx"
        onnx.save(onnxslim.slim(onnx.load(str(out["fp32"]))), str(slim))
        out["fp32+onnxslim"] = slim
    except ImportError:
        print("onnxslim not installed: skipping that variant", file=sys.stderr)
    return out


def bench(paths: dict[str, Path], size: int, batch: int, repeats: int) -> dict[str, float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((batch, 1, size, size)).astype(np.float32),
             "t": np.full((batch,), 500, np.int64)}
    for s in sessions.values():                  # warm-up
        s.run(["out"], feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(["out"], feeds)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    models = [("tiny", [], 32)] + ([] if args.quick else [("cxr128", ["model.image_size=64"], 64)])
    repeats = 10 if args.quick else 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides, size in models:
            paths = variants(name, overrides, Path(tmp))
            sizes = {k: p.stat().st_size for k, p in paths.items()}
            for batch in (1, 4):
                for variant, ms in bench(paths, size, batch, repeats).items():
                    rows.append({"model": name, "px": size, "batch": batch, "variant": variant,
                                 "ms_median": round(ms, 3), "file_mb": round(sizes[variant] / 1e6, 3)})
    print(f"{'model':<8}{'px':>4}{'batch':>6}  {'variant':<15}{'ms/call':>9}{'MB':>8}")
    for r in rows:
        print(f"{r['model']:<8}{r['px']:>4}{r['batch']:>6}  {r['variant']:<15}{r['ms_median']:>9.2f}{r['file_mb']:>8.2f}")
    out = ROOT / "bench" / "results" / "export_ort.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "ort": ort.__version__,
                               "repeats": repeats, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
