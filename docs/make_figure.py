"""The README's figures, from the project's own commands (`make pretrained` runs both).

    python docs/make_figure.py samples --engine models/tiny-demo/tiny-demo.onnx    # docs/samples.png
    python docs/make_figure.py steps --run runs/pretrained                         # docs/training-steps.png

samples: eight real radiographs (top row) above 16 samples of a model (dpmpp-2m, 20 steps, seed 0).
steps: every checkpoint of a training run (RUN/checkpoints/step_*.safetensors): 64 images each
(dpmpp-2m, 20 steps, seed 0: the same seeds at every step) written as a sample set under
RUN/steps/step_N, evaluated by `cxr-runtime eval` against the training images with the held-out
patients of data/cxr-heldout; the first images of each step side by side, and realism (median
distance to the nearest training image, histogram TV) and copying (the data-copying Z) against
the step. Sets and reports are resumed, not remade, on a rerun. RUN/steps/series.json holds the
numbers.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr_ddpm.runtime.backends import load_denoiser
from cxr_ddpm.runtime.evaluation.evaluate import evaluate
from cxr_ddpm.runtime.inputs.imageio import load_resized
from cxr_ddpm.runtime.outputs.formats import grid_png
from cxr_ddpm.runtime.outputs.sample_set import plan_set, sample_to_dir
from cxr_ddpm.runtime.sampling.generate import generate, resolve_request
from cxr_ddpm.train.data import list_images

GOALS = {"median": 0.24, "tv": 0.16, "z": -3.0}    # issue 20: the 1,000-step row; Meehan et al.'s rule


def samples(args: argparse.Namespace) -> None:
    den = load_denoiser(args.engine)
    size = den.config.model.image_size
    files = list_images(args.data).files
    real = [load_resized(f, size)[None] * 2 - 1 for f in files[:: max(1, len(files) // 8)][:8]]  # [-1, 1]
    fake = list(generate(den, resolve_request(den, 16, sampler="dpmpp-2m", steps=20, seed=0), batch_size=16))
    grid_png(Path(args.out), real + fake, cols=8)
    img = Image.open(args.out)
    img.resize((img.width * args.zoom, img.height * args.zoom), Image.Resampling.NEAREST).save(args.out)
    print(f"wrote {args.out}: top row real ({size} px), two rows sampled from {args.engine} (dpmpp-2m, 20 steps, "
          "seed 0)")


def step_metrics(ckpt: Path, work: Path, data: str, heldout: str | None, n: int) -> dict[str, Any]:
    """Sample set + eval report of one checkpoint (both resumed when already there)."""
    den = load_denoiser(ckpt)
    req = resolve_request(den, n, sampler="dpmpp-2m", steps=20, seed=0)
    plan = plan_set(den, req, out=work) if (work / "samples.json").is_file() else None
    rec = (json.loads((work / "samples.json").read_text()) if plan is not None and not plan.todo
           else sample_to_dir(den, req, out=work, batch_size=16))        # a finished set is not rewritten
    report = work / "eval" / "eval.json"
    if not report.is_file() or report.stat().st_mtime < (work / "samples.json").stat().st_mtime:
        evaluate(data, work, heldout=heldout, out=work / "eval")      # overwrites the report's files
    ev = json.loads(report.read_text())
    cp = ev.get("data_copying") or {}
    return {"step": int(re.findall(r"\d+", ckpt.stem)[-1]), "checkpoint": str(ckpt), "images": n,
            "median_nearest": round(ev["memorization"]["median_nearest_distance"], 4),
            "copies": len(ev["memorization"]["copies"]), "tv": round(ev["histogram"]["total_variation"], 4),
            "z": None if cp.get("z") is None else round(cp["z"], 2), "verdict": cp.get("verdict"),
            "heldout_median": (cp.get("median_distance") or {}).get("heldout"),
            "files": [str(work / f) for f in rec["files"]]}


def steps(args: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run = Path(args.run)
    ckpts = sorted((run / "checkpoints").glob("step_*.safetensors"))
    if not ckpts:
        raise SystemExit(f"error: {run}/checkpoints holds no step_*.safetensors (train with --set train.keep_last=N)")
    work = Path(args.work or run / "steps")
    if not Path(args.heldout).is_dir():
        print(f"note: {args.heldout} not found (docs/make_heldout.py builds it): no data-copying Z", flush=True)
        args.heldout = None
    rows = []
    for c in ckpts:
        rows.append(step_metrics(c, work / c.stem, args.data, args.heldout, args.n))
        r = rows[-1]
        print(f"step {r['step']:>5}: median nearest {r['median_nearest']:.3f}  TV {r['tv']:.3f}  Z {r['z']}",
              flush=True)
    (work / "series.json").write_text(json.dumps({"run": str(run), "rows": rows}, indent=1))
    shown = [r for r in rows if r["step"] in set(args.show)] if args.show else rows
    ims = [[np.asarray(Image.open(f), np.float32) / 255 for f in r["files"][:args.seeds]] for r in shown]
    h = ims[0][0].shape[0]
    mosaic = np.ones((args.seeds * (h + 2), len(shown) * (h + 2)))
    for j, col in enumerate(ims):
        for i, im in enumerate(col):
            mosaic[i * (h + 2):i * (h + 2) + h, j * (h + 2):j * (h + 2) + h] = im
    width = 9.0
    mosaic_h = 0.78 * width * args.seeds / len(shown)               # the image axes keep the mosaic's aspect
    fig = plt.figure(figsize=(width, mosaic_h + 3.6))
    grid = fig.add_gridspec(2, 1, height_ratios=[mosaic_h, 3.0], hspace=0.12)
    ax = fig.add_subplot(grid[0])
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([j * (h + 2) + h / 2 for j in range(len(shown))], [f"{r['step']}" for r in shown], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.set_title(f"the same {args.seeds} seeds after N training steps (micro-batch 16; dpmpp-2m, 20 steps)",
                 fontsize=9)
    m = fig.add_subplot(grid[1])
    x = [r["step"] for r in rows]
    m.plot(x, [r["median_nearest"] for r in rows], "o-", color="C0", label="median distance to nearest training image")
    m.plot(x, [r["tv"] for r in rows], "s-", color="C1", label="histogram TV")
    held = [r["heldout_median"] for r in rows if r["heldout_median"] is not None]
    if held:
        m.axhline(held[0], color="C0", ls=":", lw=1, label=f"held-out patients' median distance ({held[0]:.2f})")
    m.axhline(GOALS["median"], color="C0", ls="--", lw=0.7)
    m.axhline(GOALS["tv"], color="C1", ls="--", lw=0.7)
    m.set_xlabel("training step")
    m.set_ylabel("realism (lower = closer)")
    z = m.twinx()
    zs = [r["z"] for r in rows if r["z"] is not None]
    if zs:
        z.plot(x, [r["z"] for r in rows], "^-", color="C3", label="data-copying Z (held-out)")
        z.axhline(GOALS["z"], color="C3", ls="--", lw=0.7)
        z.set_ylim(min(zs + [GOALS["z"]]) - 1, max(zs + [0.0]) + 1)
    if args.mark:
        m.axvline(args.mark, color="grey", lw=0.8)
        m.annotate(f"committed model: step {args.mark}", (args.mark, m.get_ylim()[0]), xytext=(3, 4),
                   textcoords="offset points", fontsize=7, color="grey")
    z.set_ylabel("copying Z (< -3: copies)", color="C3")
    lines = m.get_legend_handles_labels()[0] + z.get_legend_handles_labels()[0]
    labels = m.get_legend_handles_labels()[1] + z.get_legend_handles_labels()[1]
    m.legend(lines, labels, fontsize=7, loc="upper right")
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out} and {work / 'series.json'} ({len(rows)} checkpoints)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("samples", help="docs/samples.png: real radiographs above samples of a model")
    s.add_argument("--engine", required=True)
    s.add_argument("--data", default="data/cxr-sample")
    s.add_argument("--out", default="docs/samples.png")
    s.add_argument("--zoom", type=int, default=3)
    t = sub.add_parser("steps", help="docs/training-steps.png: samples and eval figures per checkpoint")
    t.add_argument("--run", required=True, help="a cxr-train run folder")
    t.add_argument("--work", help="where the sample sets and reports go [RUN/steps]")
    t.add_argument("--data", default="data/cxr-sample")
    t.add_argument("--heldout", default="data/cxr-heldout")
    t.add_argument("--out", default="docs/training-steps.png")
    t.add_argument("-n", type=int, default=64, help="images per checkpoint")
    t.add_argument("--seeds", type=int, default=6, help="images shown per checkpoint")
    t.add_argument("--show", type=int, nargs="*", help="steps shown as images (default: all)")
    t.add_argument("--mark", type=int, help="the step marked as the committed model")
    args = ap.parse_args()
    samples(args) if args.cmd == "samples" else steps(args)


if __name__ == "__main__":
    main()
