"""`cxr-train utility`: train on synthetic, test on real.

    report = run_utility("real/train", "real/test", "synth/", out="synth/utility", seeds=3)

The same classifier (train/classifier.py) is trained under each regime with the same steps,
seeds and augmentation, and scored on REAL_TEST (train/utility_report.py):
    real         REAL_TRAIN only
    synth        the synthetic set only
    real+synth   both
    balanced     (--balance) REAL_TRAIN plus synthetic images of the smaller classes until every
                 class has as many as the largest (the first ones of a fixed shuffle)
Refused in one line, before any training: class names that differ between the sets, fewer than
2 images of a class in a set, REAL_TEST sharing file content with REAL_TRAIN or the synthetic
set. A warning when REAL_TEST is in the generator's training data (train/utility_data.py).
Real images are decoded and resized exactly as training sees them (runtime.inputs.imageio.load_resized),
synthetic ones read as written (runtime.evaluation.evaluate). Writes utility.json, utility.md and roc.png
(atomically) under `out`, which is made only then.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from cxr_ddpm.runtime.inputs.datasets import ImageList
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.evaluation.evaluate import read_sample
from cxr_ddpm.runtime.fsutil import atomic_write, check_output_dir, ensure_writable_dir
from cxr_ddpm.runtime.inputs.imageio import UnreadableImage, load_resized, resize_center_crop

from . import utility_report as rep
from .utility_data import (MIN_PER_CLASS, LabelledSet, check_disjoint, check_sets, generator_data, hashes, real_set,
                           synthetic_set, warn_generator_data)

MIN_SIZE = 16
PLOT = "roc.png"


def _image_size(synth: LabelledSet, size: int | None) -> int:
    """--size, else the generator's: its record's image_size or the first image's side."""
    if size is None:
        rec_size = (synth.record or {}).get("image_size")
        size = int(rec_size) if isinstance(rec_size, int) else _read_synth(synth.files[0]).shape[0]
    if size < MIN_SIZE:
        raise CxrError(f"--size {size}: the classifier needs at least {MIN_SIZE} px")
    return size


def _read_synth(path: Path) -> np.ndarray:
    try:
        return read_sample(path)
    except (OSError, UnreadableImage, ValueError) as e:
        raise CxrError(f"--synth {path}: cannot read synthetic image ({e})") from None


def load(s: LabelledSet, size: int, synthetic: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S) float32 in [0, 1] and labels (index in s.names). An unreadable real image is
    skipped with a warning (as training skips it); an unreadable synthetic one is an error."""
    images, labels = [], []
    for f, c in tqdm(list(zip(s.files, s.classes)), desc=f"reading {s.flag[2:]}", unit="img", leave=False):
        if synthetic:
            img = _read_synth(f)
            img = img if img.shape == (size, size) else resize_center_crop(img, size)
        else:
            try:
                img = load_resized(f, size)
            except (OSError, UnreadableImage) as e:
                print(f"warning: skipping unreadable image {f}: {e}", file=sys.stderr, flush=True)
                continue
        images.append(img)
        labels.append(s.names.index(c))
    y = np.asarray(labels, np.int64)
    for k, name in enumerate(s.names):                     # unreadable files may have emptied a class
        if (n := int((y == k).sum())) < MIN_PER_CLASS:
            raise CxrError(f"{s.flag} {s.root}: class {name} has {n} readable image{'s' if n != 1 else ''}; "
                           f"at least {MIN_PER_CLASS} per class are needed")
    return np.stack(images).astype(np.float32), y


def regimes(real: tuple[np.ndarray, np.ndarray], synth: tuple[np.ndarray, np.ndarray], k: int,
            balance: bool) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """The training pools of every regime, and for `balanced` what each class got."""
    (xr, yr), (xs, ys) = real, synth
    out = {"real": (xr, yr), "synth": (xs, ys),
           "real+synth": (np.concatenate([xr, xs]), np.concatenate([yr, ys]))}
    notes: dict[str, Any] = {}
    if balance:
        counts = np.bincount(yr, minlength=k)
        order = np.random.default_rng(0).permutation(len(ys))   # fixed: the same images for every seed
        picked = []
        for c in range(k):
            need = int(counts.max() - counts[c])
            have = order[ys[order] == c][:need]
            picked.append(have)
            notes[str(c)] = {"needed": need, "added": len(have)}
        idx = np.concatenate(picked).astype(np.int64)
        out["balanced"] = (np.concatenate([xr, xs[idx]]), np.concatenate([yr, ys[idx]]))
    return out, notes


def run_utility(train_dir: str | Path, test_dir: str | Path, synth_dir: str | Path, *,
                out: str | Path | None = None, size: int | None = None, steps: int = 500, batch: int = 32,
                lr: float = 1e-3, seeds: int = 1, seed: int = 0, bootstrap: int = 1000,
                balance: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    synth_dir = Path(synth_dir)
    out = Path(out) if out is not None else synth_dir / "utility"
    check_output_dir(out, "report folder")
    train, test = real_set(Path(train_dir), "--train"), real_set(Path(test_dir), "--test")
    synth = synthetic_set(synth_dir, out)
    check_sets(train, test, synth)
    test_hashes = hashes(test)
    check_disjoint(test, test_hashes, train, hashes(train))
    check_disjoint(test, test_hashes, synth, hashes(synth))
    size = _image_size(synth, size)
    gen = generator_data(synth.record, cast(ImageList, train.images), cast(ImageList, test.images), test_hashes)
    warn_generator_data(gen)

    from .dist import use_cuda
    import torch
    device = "cuda" if use_cuda() else "cpu"
    if device == "cuda":                        # repeatable convolutions (a little slower)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    real, fake, (xt, yt) = load(train, size, False), load(synth, size, True), load(test, size, False)
    k, names = len(train.names), list(train.names)
    pools, balanced = regimes(real, fake, k, balance)
    resamples = rep.bootstrap_indices(yt, bootstrap, seed)
    seed_list = [seed + i for i in range(seeds)]

    from .classifier import predict, train_classifier
    results: dict[str, Any] = {}
    curves: dict[str, list[list[tuple[np.ndarray, np.ndarray]]]] = {}
    real_summary: tuple[float, np.ndarray] | None = None
    for name, (x, y) in pools.items():
        per_seed, boot = [], []
        curves[name] = [[] for _ in names]
        for s in seed_list:
            t1 = time.perf_counter()
            model = train_classifier(x, y, num_classes=k, steps=steps, batch=batch, lr=lr, seed=s, device=device,
                                     desc=f"{name} seed {s}")
            probs = predict(model, xt)
            per_seed.append({"seed": s, **rep.scores(probs, yt), "seconds": round(time.perf_counter() - t1, 2)})
            boot.append(rep.resampled(probs, yt, resamples))
            for c in range(k):
                curves[name][c].append(rep.roc_curve(probs[:, c], yt == c))
        summary, mean_boot = rep.summarise(per_seed, boot, names, real_summary)
        if name == "real":
            real_summary = (summary["macro_auroc"]["mean"], mean_boot)
        results[name] = {"train_counts": np.bincount(y, minlength=k).tolist(), **summary, "seeds": per_seed}
    if balance:
        results["balanced"]["added"] = {names[int(c)]: v for c, v in balanced.items()}

    report: dict[str, Any] = {
        "train": str(train.root), "test": str(test.root), "synth": str(synth.root), "classes": names,
        "size": size, "steps": steps, "batch": batch, "lr": lr, "seeds": seed_list, "bootstrap": bootstrap,
        "device": device, "torch_threads": torch.get_num_threads() if device == "cpu" else None,
        "counts": {"train": np.bincount(real[1], minlength=k).tolist(), "test": np.bincount(yt, minlength=k).tolist(),
                   "synth": np.bincount(fake[1], minlength=k).tolist()},
        "generator_data": gen, "regimes": results, "plot": PLOT,
    }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _write(ensure_writable_dir(out, "report folder"), report, curves, names)
    return report


def _write(out: Path, report: dict[str, Any], curves: dict[str, Any], names: list[str]) -> None:
    with atomic_write(out / PLOT) as f:
        f.write(rep.roc_png(curves, names, {name: f"{name}: macro AUROC {r['macro_auroc']['mean']:.3f}"
                                            for name, r in report["regimes"].items()}))
    with atomic_write(out / "utility.json", "w") as f:
        json.dump(report, f, indent=1)
    with atomic_write(out / "utility.md", "w") as f:
        f.write(rep.markdown(report))


def first_line(report: dict[str, Any]) -> str:
    """The summary line the command prints: macro AUROC per regime."""
    cells = [f"{name} {r['macro_auroc']['mean']:.3f}" + (f" ± {r['macro_auroc']['std']:.3f}" if len(report["seeds"]) > 1
                                                          else "")
             for name, r in report["regimes"].items()]
    return f"macro AUROC on {report['test']}: " + ", ".join(cells) + f" ({report['seconds']:.0f} s)"
