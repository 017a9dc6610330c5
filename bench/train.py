"""Section 4: training throughput, DDP (ZeRO-0) vs ZeRO-1/2/3, fp32 and bf16, same global batch.

Every configuration runs the real `cxr-train fit` under torchrun (gloo on CPU) on the
bundled radiographs and reports the images/s and peak memory per rank that fit itself
measures (summary.json; the first step, which pays for warm-up, is left out of the rate).
Replaces the former bench/train_throughput.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .common import ROOT, figure, md_table, save_png, write_section

NAMES = {0: "DDP (ZeRO-0)", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
OVERHEAD_VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cxr-train fit (DeepSpeed, EMA, loader)", ()),
    ("  + train.channels_last", ("train.channels_last=true",)),
    ("  + train.ema_every=10", ("train.ema_every=10",)),
)


def fit_cmd(config: str | Path, data: str | Path, out: Path, ranks: int, overrides: Sequence[str]) -> list[str]:
    """`cxr-train fit` under torchrun --standalone (a free rendezvous port, any rank count)."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={ranks}",
           "-m", "cxr_ddpm.train.cli", "fit", "--config", str(config), "--data", str(data), "--out", str(out)]
    for s in overrides:
        cmd += ["--set", s]
    return cmd


def run_fit(config: str | Path, data: str | Path, out: Path, *, ranks: int, threads: int,
            overrides: Sequence[str]) -> dict[str, Any]:
    """Run fit; summary.json's content, or {"error": last stderr lines}."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    p = subprocess.run(fit_cmd(config, data, out, ranks, overrides), env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": " | ".join(p.stderr.strip().splitlines()[-3:])[:400]}
    return {**json.loads((out / "summary.json").read_text()), "wall_s": round(time.time() - t0, 1)}


def run_one(config: str, data: str, stage: int, precision: str, out: Path, *, ranks: int, threads: int,
            global_batch: int, steps: int) -> dict[str, Any]:
    sets = [f"train.zero_stage={stage}", f"train.precision={precision}", f"train.steps={steps}",
            f"train.micro_batch={global_batch // ranks}", "train.sample_every=0", "train.save_every=0",
            f"train.log_every={steps}", "data.num_workers=0", "train.warmup_steps=1"]
    s = run_fit(config, data, out, ranks=ranks, threads=threads, overrides=sets)
    row: dict[str, Any] = {"mode": NAMES[stage], "zero_stage": stage, "precision": precision}
    if "error" in s:
        return {**row, "error": s["error"]}
    return {**row, "images_per_s": round(s["images_per_s"], 2), "peak_mem_mib_per_rank": round(s["peak_mem_mib"], 1),
            "global_batch": s["global_batch"], "wall_s": s["wall_s"]}


def plain_torch_images_per_s(config: str, *, micro_batch: int, steps: int, threads: int) -> float:
    """The floor: lucidrains' GaussianDiffusion + torch AdamW on one in-memory batch, no
    DeepSpeed, no EMA, no loader, no logging. fit's rate divided by this is its per-step overhead."""
    import torch

    from cxr_ddpm.train.config import load_config
    from cxr_ddpm.train.model import build_diffusion
    cfg = load_config(config)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    diffusion = build_diffusion(cfg)
    opt = torch.optim.AdamW(diffusion.model.parameters(), lr=1e-4)
    x = torch.rand(micro_batch, cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    for i in range(steps + 1):
        if i == 1:                                      # the first step pays for warm-up
            t0 = time.perf_counter()
        loss = diffusion(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return micro_batch * steps / (time.perf_counter() - t0)


def step_overhead(config: str, data: str, tmp: Path, *, micro_batch: int, steps: int, threads: int,
                  variants: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, Any]]:
    """One rank, fp32: fit's images/s per variant next to the plain-PyTorch floor, as ratios."""
    floor = plain_torch_images_per_s(config, micro_batch=micro_batch, steps=steps, threads=threads)
    rows = [{"variant": "plain PyTorch step (floor)", "images_per_s": round(floor, 2), "vs_floor": 1.0}]
    base = [f"train.steps={steps + 1}", f"train.micro_batch={micro_batch}", "train.zero_stage=0",
            "train.sample_every=0", "train.save_every=0", f"train.log_every={steps + 1}", "train.warmup_steps=1"]
    for name, sets in variants:
        s = run_fit(config, data, tmp / f"oh-{len(rows)}", ranks=1, threads=threads, overrides=[*base, *sets])
        row: dict[str, Any] = {"variant": name}
        if "error" in s:
            row["error"] = s["error"]
        else:
            row.update(images_per_s=round(s["images_per_s"], 2), vs_floor=round(s["images_per_s"] / floor, 3))
        print(f"  overhead {name}: {row.get('images_per_s', row.get('error'))}", flush=True)
        rows.append(row)
    return rows


def add_mfu(rows: list[dict], config: str) -> str:
    """MFU column on CUDA: 3 x forward FLOPs per image (forward + backward) x images/s over the
    bf16 matmul peak measured in this run. Returns the note saying how, or why it is absent."""
    import torch
    if not torch.cuda.is_available():
        return "MFU: n/a (no CUDA device; CPU ranks)"
    from cxr_ddpm.train.config import load_config

    from .common import fresh_artifacts
    from .denoiser import flops_per_image
    from .gpu import bf16_peak_tflops
    peak = bf16_peak_tflops()
    size = load_config(Path(config)).model.image_size
    ckpt = fresh_artifacts(Path(config).stem, [], precisions=())["ckpt"]
    train_flops = 3 * flops_per_image(ckpt, size)
    for r in rows:
        if "images_per_s" in r:
            r["mfu_vs_bf16_peak"] = round(train_flops * r["images_per_s"] / (peak * 1e12), 4)
    return (f"MFU = 3 x {train_flops / 3e9:.1f} GFLOP per image (forward + backward) x images/s / "
            f"bf16 matmul peak {peak:.0f} TFLOP/s measured in this run")


def plot(rows: list[dict], path: Path) -> Path:
    fig, ax = figure(6, 3.5)
    ok = [r for r in rows if "images_per_s" in r]
    ax.bar(range(len(ok)), [r["images_per_s"] for r in ok],
           color=["tab:blue" if r["precision"] == "fp32" else "tab:orange" for r in ok])
    ax.set_xticks(range(len(ok)), [f"{r['mode']}\n{r['precision']}" for r in ok], fontsize=7)
    ax.set_ylabel("images/s (all ranks)")
    ax.set_title("Training throughput, CPU ranks (gloo)")
    return save_png(fig, path)


def run(out: Path, *, config: str = str(ROOT / "configs" / "tiny.yaml"), data: str = str(ROOT / "data" / "cxr-sample"),
        ranks: int = 2, threads: int = 1, global_batch: int = 16, steps: int = 5,
        stages: Sequence[int] = (0, 1, 2, 3), precisions: Sequence[str] = ("fp32", "bf16"),
        overhead_variants: Sequence[tuple[str, Sequence[str]]] = OVERHEAD_VARIANTS) -> Path:
    rows = []
    overhead: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if overhead_variants:
            overhead = step_overhead(config, data, Path(tmp), micro_batch=global_batch // ranks,
                                     steps=max(steps, 20), threads=threads, variants=overhead_variants)
        for precision in precisions:
            for stage in stages:
                row = run_one(config, data, stage, precision, Path(tmp) / f"z{stage}-{precision}", ranks=ranks,
                              threads=threads, global_batch=global_batch, steps=steps)
                print(f"  {row['mode']} {precision}: {row.get('images_per_s', row.get('error'))}", flush=True)
                rows.append(row)
    base = {r["precision"]: r["images_per_s"] for r in rows if r["zero_stage"] == 0 and "images_per_s" in r}
    for r in rows:
        if "images_per_s" in r and r["precision"] in base:
            r["vs_ddp"] = round(r["images_per_s"] / base[r["precision"]], 3)
    mfu = add_mfu(rows, config)
    doc = {"config": Path(config).name, "ranks": ranks, "threads_per_rank": threads, "global_batch": global_batch,
           "steps": steps, "timing": f"{steps} steps, first excluded (fit's own summary.json)", "rows": rows,
           "overhead": overhead, "mfu": mfu}
    plot(rows, out / "train.png")
    md = (f"## Training throughput ({ranks} CPU ranks, gloo, {Path(config).name}, global batch {global_batch}, "
          f"{steps} steps, first excluded)\n\n" + md_table(rows, [
              ("mode", "mode"), ("precision", "precision"), ("images_per_s", "images/s"), ("vs_ddp", "vs DDP"),
              ("peak_mem_mib_per_rank", "peak MiB/rank"), ("mfu_vs_bf16_peak", "MFU"), ("error", "error")])
          + f"\n{mfu}\n")
    if overhead:
        md += (f"\n\n### Per-step overhead (1 rank, fp32, micro-batch {global_batch // ranks}, "
               f"{max(steps, 20)} steps)\n\n" + md_table(overhead, [
                   ("variant", "variant"), ("images_per_s", "images/s"), ("vs_floor", "vs plain PyTorch"),
                   ("error", "error")]))
    return write_section(out, "train", doc, md)
