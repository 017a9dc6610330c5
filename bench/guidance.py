"""Cost of classifier-free guidance per sampling step, as a ratio to unguided sampling.

Guided sampling (weight W not 0 or 1) runs conditional and unconditional in ONE ORT
call on a 2B batch (runtime.sampling.guidance). Compared in the same interleaved rounds:
unguided (B), guided (one 2B call) and the naive two separate B calls.
Models: class-conditional (4 classes) tiny and cxr128 U-Nets, freshly initialised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import fresh_artifacts, interleaved, md_table, write_section

COND = ["model.num_classes=4", "diffusion.beta_schedule=cosine", "model.flash_attn=false"]


def run(out: Path, *, models: tuple[tuple[str, int], ...] = (("tiny", 32), ("cxr128", 64)),
        batches: tuple[int, ...] = (1, 4, 16), runs: int = 10, budget_s: float = 60.0,
        weight: float = 3.0) -> Path:
    from cxr_ddpm.runtime.backends import load_denoiser
    from cxr_ddpm.runtime.sampling.guidance import guided

    rows: list[dict[str, Any]] = []
    for model, size in models:
        arts = fresh_artifacts(model, [*COND, f"model.image_size={size}"])
        den = load_denoiser(arts["fp32"])
        null = den.config.model.num_classes
        for b in batches:
            rng = np.random.default_rng(b)
            x = rng.standard_normal((b, 1, size, size)).astype(np.float32)   # (B, 1, H, W)
            t = np.full((b,), den.schedule.timesteps // 2, np.int64)
            cls = np.zeros((b,), np.int64)
            plain, guide = guided(den, cls, 1.0, null), guided(den, cls, weight, null)
            res = interleaved({
                "unguided": lambda: plain(x, t),
                "guided": lambda: guide(x, t),
                "two_calls": lambda: (den(x, t, classes=cls), den(x, t, classes=np.full_like(cls, null))),
            }, runs=runs, budget_s=budget_s)
            base = res["unguided"]["median_ms"]
            rows.append({"model": model, "size": size, "batch": b, "unguided_ms": base,
                         "guided_ms": res["guided"]["median_ms"], "guided_p90_ms": res["guided"]["p90_ms"],
                         "two_calls_ms": res["two_calls"]["median_ms"],
                         "guided_ratio": round(res["guided"]["median_ms"] / base, 3),
                         "two_calls_ratio": round(res["two_calls"]["median_ms"] / base, 3),
                         "runs": res["guided"]["n"]})
    md = ("### Classifier-free guidance: cost per step (ORT CPU, ratio to unguided)\n\n"
          + md_table(rows, [("model", "model"), ("size", "px"), ("batch", "batch"),
                            ("unguided_ms", "unguided ms"), ("guided_ms", "guided ms (one 2B call)"),
                            ("guided_ratio", "guided / unguided"), ("two_calls_ratio", "two calls / unguided"),
                            ("runs", "runs")]))
    return write_section(out, "guidance", {"weight": weight, "rows": rows, "target_ratio": 1.9}, md)
