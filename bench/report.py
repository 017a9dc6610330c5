"""README-performance.md: headline tables and plots assembled from the section JSONs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxr_ddpm.runtime.fsutil import atomic_write

from .common import md_table

COMMAND = "python -m bench all --out bench/results"


def _load(out: Path, name: str) -> dict[str, Any] | None:
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def write_readme_snippet(out: Path, rel: str = "bench/results") -> Path:
    parts = ["## Performance\n\n", f"Produced by `{COMMAND}` (sections: `python -m bench "
             "denoiser|sampling|accuracy|train|gpu|loader`). Raw numbers with machine info: "
             f"`{rel}/<section>.json`; full tables: `{rel}/<section>.md`.\n\n"]
    machine = None
    den = _load(out, "denoiser")
    if den:
        machine = den["machine"]
        head = [r for r in den["rows"] if r["batch"] in (1, 16)]
        cells = sorted({(r["model"], r["px"], r["batch"]) for r in head})
        table = []
        for c in cells:
            by = {r["variant"]: r for r in head if (r["model"], r["px"], r["batch"]) == c}
            table.append({"cell": f"{c[0]} {c[1]} px b{c[2]}", "eager_ms": by["eager"]["median_ms"],
                          **{v: f"{by[v]['speedup_vs_eager']:.2f}x" for v in ("eager_cl", "compile", "ort_fp32", "ort_fp16")
                             if v in by}})
        parts.append("### Denoiser step (one U-Net call), speed-up over PyTorch eager, CPU\n\n" + md_table(
            table, [("cell", "model / size / batch"), ("eager_ms", "eager ms"), ("eager_cl", "channels_last"),
                    ("compile", "torch.compile"), ("ort_fp32", "ORT fp32"), ("ort_fp16", "ORT fp16")])
            + f"\n![denoiser]({rel}/denoiser.png)\n\n")
    smp = _load(out, "sampling")
    if smp:
        rows = [r for r in smp["rows"] if r["backend"] == "ort"]
        parts.append("### End-to-end sampling, batch 16, ORT (speed-up over the PyTorch reference)\n\n" + md_table(
            rows, [("model", "model"), ("sampler", "sampler"), ("steps", "steps"), ("s_per_image", "s/image"),
                   ("images_per_s", "images/s"), ("speedup_vs_torch", "vs PyTorch"), ("how", "how")])
            + f"\n![sampling]({rel}/sampling.png)\n\n")
    acc = _load(out, "accuracy")
    if acc and "summary" in acc:                 # trained models, with diffusers' default beside dpmpp-2m
        parts.append("### Sampler accuracy vs cost (trained tiny models)\n\n"
                     f"Reference: {acc['reference']}; RMSE in [0, 1] pixels ± the spread of per-image RMSEs, "
                     f"{acc['images']} images. dpmpp-2m at least as accurate as diffusers' default everywhere: "
                     f"{'yes' if acc['goal']['vs_diffusers_met'] else 'NO'}.\n\n"
                     + md_table(acc["summary"], [("model", "model"), ("clip_x0", "clip x0"), ("steps", "steps"),
                                                 ("ddim", "ddim"), ("grid", "2M grid"), ("dpmpp", "dpmpp-2m"),
                                                 ("diffusers", "diffusers default")])
                     + f"\n![accuracy]({rel}/accuracy.png)\n\n")
    elif acc:
        g = acc.get("goal") or {}
        parts.append(f"### Sampler accuracy vs cost (tiny model)\n\nReference: {acc['reference']}. "
                     + (f"dpmpp-2m at 20 steps: RMSE {g['rmse']:.4f} (goal <= {g['threshold']}: "
                        f"{'met' if g['met'] else 'not met'}).\n\n" if g else "\n\n")
                     + md_table(acc["rows"], [("sampler", "sampler"), ("calls", "denoiser calls"), ("rmse", "RMSE")])
                     + f"\n![accuracy]({rel}/accuracy.png)\n\n")
    tr = _load(out, "train")
    if tr:
        parts.append(f"### Training throughput ({tr['ranks']} CPU ranks, gloo, global batch {tr['global_batch']})\n\n"
                     + md_table(tr["rows"], [("mode", "mode"), ("precision", "precision"), ("images_per_s", "images/s"),
                                             ("vs_ddp", "vs DDP"), ("peak_mem_mib_per_rank", "peak MiB/rank")])
                     + f"\n![train]({rel}/train.png)\n\n")
    ld = _load(out, "loader")
    if ld:
        parts.append("### Data loader, raw JPEG vs `cxr-train prepare` (CPU, images/s)\n\n" + md_table(
            ld["rows"], [("source", "source"), ("px", "px"), ("workers", "workers"), ("raw_img_s", "raw"),
                         ("prepared_img_s", "prepared"), ("raw_per_worker", "raw /worker"),
                         ("prepared_per_worker", "prepared /worker"), ("speedup", "prepared / raw")]) + "\n")
    gpu = _load(out, "gpu")
    if gpu:
        parts.append("### GPU\n\n" + (gpu["why"] if gpu["status"] == "pending" else
                                       f"See `{rel}/gpu.md` ({gpu.get('gpu_name')}).") + "\n\n")
        if gpu.get("sampling_planned") and gpu["status"] == "pending":
            parts.append(f"Pending GPU rows for the runtime ({len(gpu['sampling_planned'])}, listed in "
                         f"`{rel}/gpu.md`): ORT CUDA fp32/fp16, with and without CUDA graphs, CuPy vs NumPy "
                         f"sampler arrays; step at batch 16 and end to end at batch 64, dpmpp-2m 20 steps.\n\n")
    if machine:
        v = machine["versions"]
        parts.append(f"Machine: {machine['cpu']}, {machine['cpu_allowance']} cores usable, {machine['ram_gib']} GiB RAM, "
                     f"GPU: {machine['gpu'] or 'none'}; load average when the denoiser section finished {machine['load_avg_1_5_15']}; "
                     f"python {v['python']}, torch {v['torch']}, onnxruntime {v['onnxruntime']}, numpy {v['numpy']}, "
                     f"deepspeed {v['deepspeed']}, denoising-diffusion-pytorch {v['denoising-diffusion-pytorch']}; "
                     f"{machine['date_utc']}.\n")
    path = out / "README-performance.md"
    with atomic_write(path, "w") as f:
        f.write("".join(parts))
    return path
