"""Section 7: data loader images/s, raw JPEG decode vs the `cxr-train prepare` memory map.

Two sources: the bundled radiographs (JPEGs capped at 512 px) and copies of them upscaled
to 1-3 megapixels (the Curated COVID-19 set is mostly much larger files than the bundled
ones). For every source, image size and worker count, the raw loader (`CxrDataset`) and
the prepared one (`PreparedDataset`) run side by side in alternating rounds through a real
`torch.utils.data.DataLoader` (batch 32, random order); worker start-up is left out.
images/s per worker divides by max(1, workers): 0 workers means the training process
decodes itself. The files sit in the page cache; a cluster file system adds read time to
the raw loader only (one file per image vs one array).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from cxr_ddpm.train.data import CxrDataset, list_images
from cxr_ddpm.train.prepared import PreparedDataset, make_dataset, open_data, prepare

from .common import ROOT, md_table, write_section

MEGAPIXELS = (1.0, 2.0, 3.0)


def upscaled_copy(src: Path, dst: Path, megapixels: Sequence[float] = MEGAPIXELS) -> Path:
    """The class folders of `src` with every JPEG upscaled to 1, 2 or 3 MP in turn (quality 90)."""
    for i, f in enumerate(list_images(src).files):
        img = Image.open(f).convert("L")
        mp = megapixels[i % len(megapixels)] * 1e6
        s = (mp / (img.width * img.height)) ** 0.5
        out = dst / f.parent.name / (f.stem + ".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC).save(out, quality=90)
    return dst


class _Endless(torch.utils.data.Sampler):
    """Random indices forever: the timer, not the epoch, ends a measurement."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed

    def __iter__(self):
        g = np.random.default_rng(self.seed)
        while True:
            yield from g.permutation(self.n).tolist()


def _rate(loader_iter, batch: int, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        next(loader_iter)
        n += batch
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt


def measure(datasets: dict[str, CxrDataset | PreparedDataset], workers: int, *, seconds: float, rounds: int,
            batch: int = 32) -> dict[str, float]:
    """Median images/s per dataset over `rounds` alternating timed windows (workers already started)."""
    iters = {}
    for name, ds in datasets.items():
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=_Endless(len(ds)), num_workers=workers,
                                             persistent_workers=workers > 0,
                                             prefetch_factor=2 if workers else None)
        iters[name] = iter(loader)
        next(iters[name])                                   # start-up and first decode: not timed
    rates: dict[str, list[float]] = {k: [] for k in datasets}
    keys = list(datasets)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            rates[k].append(_rate(iters[k], batch, seconds))
    del iters
    return {k: float(np.median(v)) for k, v in rates.items()}


def run(out: Path, *, data: str = str(ROOT / "data" / "cxr-sample"), sizes: Sequence[int] = (64, 128),
        workers: Sequence[int] = (0, 1, 2), seconds: float = 1.5, rounds: int = 3,
        megapixels: Sequence[float] = MEGAPIXELS) -> Path:
    torch.set_num_threads(1)   # as in fit with OMP_NUM_THREADS=1: decode cost, not intra-op threads
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"bundled (<=512 px)": Path(data),
                   f"upscaled {'-'.join(f'{m:g}' for m in megapixels)} MP": upscaled_copy(Path(data), Path(tmp) / "big",
                                                                                       megapixels)}
        for source, root in sources.items():
            images = list_images(root)
            for size in sizes:
                prep_dir = Path(tmp) / f"prep-{len(rows)}"
                t0 = time.perf_counter()
                prepare(root, size, prep_dir, workers=1, progress=False)
                prep_s = time.perf_counter() - t0
                prepared = open_data(prep_dir, size)
                for w in workers:
                    r = measure({"raw": CxrDataset(images, size), "prepared": make_dataset(prepared, size)}, w,
                                seconds=seconds, rounds=rounds)
                    row = {"source": source, "px": size, "workers": w,
                           "raw_img_s": round(r["raw"], 1), "prepared_img_s": round(r["prepared"], 1),
                           "raw_per_worker": round(r["raw"] / max(1, w), 1),
                           "prepared_per_worker": round(r["prepared"] / max(1, w), 1),
                           "speedup": round(r["prepared"] / r["raw"], 1),
                           "prepare_img_s_1_thread": round(len(images.files) / prep_s, 1)}
                    print(f"  {source} {size} px, {w} workers: raw {row['raw_img_s']}, "
                          f"prepared {row['prepared_img_s']} images/s", flush=True)
                    rows.append(row)
    doc = {"data": data, "images": len(list_images(data).files), "batch": 32, "seconds_per_window": seconds,
           "rounds": rounds, "timing": "median of alternating timed windows; worker start-up excluded",
           "rows": rows}
    md = ("## Data loader: raw JPEG decode vs prepared memory map (CPU, images/s; batch 32, "
          f"median of {rounds} alternating {seconds:g} s windows)\n\n" + md_table(rows, [
              ("source", "source"), ("px", "px"), ("workers", "workers"), ("raw_img_s", "raw img/s"),
              ("prepared_img_s", "prepared img/s"), ("raw_per_worker", "raw /worker"),
              ("prepared_per_worker", "prepared /worker"), ("speedup", "prepared / raw"),
              ("prepare_img_s_1_thread", "prepare img/s (1 thread)")]))
    return write_section(out, "loader", doc, md)
