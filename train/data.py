"""The chest X-ray dataset: class folders under one root, as in the Curated COVID-19 CXR set.

    root/COVID-19/*.jpg, root/Normal/*.png, root/Pneumonia-Viral/*.dcm, ...

Class names are the folder names (sorted), labels their index. Images are
decoded by `runtime.inputs.imageio` to 1 x size x size float32 in [0, 1]; GaussianDiffusion
maps that to [-1, 1] itself. A file that fails to decode during training is
skipped with one warning and replaced by the next readable one.
"""
from __future__ import annotations

import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cxr_ddpm.runtime.inputs.datasets import ImageList, images_under as _images_under, list_images
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.inputs.imageio import UnreadableImage, load_resized, probe
from cxr_ddpm.runtime.system import cpu_allowance


# -----------------------------------------------------------------------------
# CPU allowance: a Slurm job owns some CPUs of a node, not all of them

def default_num_workers(requested: int = -1) -> int:
    """DataLoader workers: keep one CPU for the training process itself."""
    if requested >= 0:
        return requested
    return min(8, cpu_allowance() - 1)


# -----------------------------------------------------------------------------

class CxrDataset(torch.utils.data.Dataset):
    """(image (1, size, size) float32 in [0, 1], class index) pairs."""

    def __init__(self, images: ImageList, image_size: int, hflip: bool = False):
        self.images = images
        self.image_size = image_size
        self.hflip = hflip
        self._bad: set[int] = set()  # per worker process; each bad file warns once per worker

    def __len__(self) -> int:
        return len(self.images.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            try:
                arr = load_resized(self.images.files[i], self.image_size)
            except (UnreadableImage, OSError) as e:
                self._bad.add(i)
                # one line of our own: a Python warning here printed two lines attributed to
                # torch's DataLoader fetch code (the caller), in the worker that hit the file
                print(f"warning: skipping unreadable image {self.images.files[i]}: {e}", file=sys.stderr,
                      flush=True)
                continue
            if self.hflip and torch.rand(()) < 0.5:
                arr = arr[:, ::-1]
            return torch.from_numpy(np.ascontiguousarray(arr))[None], self.images.labels[i]
        raise CxrError(f"{self.images.root}: no readable images left")


# -----------------------------------------------------------------------------
# check-data: scan everything before anyone burns GPU hours

@dataclass
class ScanReport:
    images: ImageList
    counts: list[int]                                    # files per class
    sizes: Counter = field(default_factory=Counter)      # "WxH" bucketed to 64 px
    formats: Counter = field(default_factory=Counter)    # "<ext> <mode> <bits>-bit"
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return sum(self.counts) - len(self.unreadable)

    def usable_counts(self) -> list[int]:
        """Readable images per class (what training can use)."""
        bad = Counter(self.images.labels[i] for i, f in enumerate(self.images.files)
                      if f in {p for p, _ in self.unreadable})
        return [n - bad.get(k, 0) for k, n in enumerate(self.counts)]


def nested_datasets(images: ImageList) -> list[str]:
    """Class folders that themselves hold class folders of images: the root given is probably
    the parent of the dataset (its datasets became "classes"). A flat root (images directly in
    it, one class named after the root) has no class folder to look into."""
    folders = [(name, images.root / name) for name in images.class_names]
    return [name for name, folder in folders if folder.is_dir()
            and sum(1 for d in folder.iterdir() if d.is_dir() and _images_under(d)) >= 2]


def check_readable(images: ImageList, workers: int | None = None, decode: int = 64) -> None:
    """Before training starts: every file's header is probed (cheap) and files that probe well
    are decoded until one succeeds (at most `decode`). When nothing is readable, one line says
    why (the first failure), before any process group or run folder exists; unreadable files
    among readable ones are skipped by the loader with a warning each."""
    workers = workers or cpu_allowance()

    def problem(path: Path) -> str | None:
        try:
            probe(path)
        except (UnreadableImage, OSError) as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = list(pool.map(problem, images.files))
    failures = {f: e for f, e in zip(images.files, errors) if e is not None}
    for path in [f for f, e in zip(images.files, errors) if e is None][:decode]:
        try:
            load_resized(path, 32)
            return
        except (UnreadableImage, OSError) as e:
            failures[path] = str(e)
    path, why = next((f, failures[f]) for f in images.files if f in failures)     # the first, in file order
    tried = "" if len(failures) == len(images.files) else f" (the {len(failures)} tried)"
    raise CxrError(f"{images.root}: none of its {len(images.files)} images can be read{tried}, e.g. "
                   f"{path.relative_to(images.root)}: {why}")


def scan_dataset(root: str | Path, workers: int | None = None, progress: bool = True) -> ScanReport:
    images = list_images(root)
    report = ScanReport(images, images.class_counts())

    def check(path: Path) -> tuple[Path, str | None, str | None, str | None]:
        try:
            info = probe(path)
            load_resized(path, 32)  # full decode: catches truncated and corrupt files
        except (UnreadableImage, OSError) as e:
            return path, None, None, str(e)
        bucket = f"{_bucket(info.width)}x{_bucket(info.height)}"
        return path, bucket, f"{path.suffix.lower()} {info.mode} {info.bits}-bit", None

    workers = workers or cpu_allowance()
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL and pydicom release the GIL
        results = pool.map(check, images.files)
        for path, size, fmt, err in tqdm(results, total=len(images.files), desc="scanning",
                                         unit="img", disable=not progress):
            if err is not None:
                report.unreadable.append((path, err))
            else:
                report.sizes[size] += 1
                report.formats[fmt] += 1
    return report


def _bucket(px: int) -> int:
    return max(64, int(round(px / 64.0)) * 64)
