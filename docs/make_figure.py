"""Regenerate docs/samples.png: real radiographs (top row) above samples of a model.

    python docs/make_figure.py --engine runs/demo/tiny.onnx      # any ONNX/engine/checkpoint
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_ddpm.runtime.backends import load_denoiser
from cxr_ddpm.runtime.outputs import grid_png
from cxr_ddpm.runtime.sampling import generate, resolve_request
from cxr_ddpm.train.data import list_images
from cxr_ddpm.runtime.imageio import load_resized

ap = argparse.ArgumentParser()
ap.add_argument("--engine", required=True)
ap.add_argument("--data", default="data/cxr-sample")
ap.add_argument("--out", default="docs/samples.png")
ap.add_argument("--zoom", type=int, default=3)
args = ap.parse_args()

den = load_denoiser(args.engine)
size = den.config.model.image_size
files = list_images(args.data).files
real = [load_resized(f, size)[None] * 2 - 1 for f in files[:: max(1, len(files) // 8)][:8]]  # [-1, 1]
fake = list(generate(den, resolve_request(den, 16, sampler="dpmpp-2m", steps=20, seed=0), batch_size=16))
grid_png(Path(args.out), real + fake, cols=8)
img = Image.open(args.out)
img.resize((img.width * args.zoom, img.height * args.zoom), Image.Resampling.NEAREST).save(args.out)
print(f"wrote {args.out}: top row real ({size} px), two rows sampled (dpmpp-2m, 20 steps)")
