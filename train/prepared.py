"""A prepared dataset: every image decoded and resized once into one memory-mapped array.

    cxr-train prepare DATA --size 128 --out DIR   ->   DIR/images.npy   (N, size, size) uint8|uint16
                                                       DIR/labels.npy   (N,) int64
                                                       DIR/cxr-prepared.json

Decoding, windowing and resizing are exactly the raw loader's (`runtime.inputs.imageio.load_resized`);
the only difference is quantisation of its float output to the stored integers: uint8 when
every source has at most 8 bits per sample, else uint16. A prepared image therefore differs
from the raw loader's by at most half a step, 0.5/255 (uint8) or 0.5/65535 (uint16).
Training then costs one memory-mapped row read per image instead of a JPEG decode.

The metadata keeps the source folder's fingerprint (checkpoint provenance stays that of the
original data) and its path: when the source is still reachable and has changed since, the
prepared folder is stale and refused.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import exclusive_lock, remove_dead_temps
from cxr_ddpm.runtime.inputs.imageio import UnreadableImage, load_resized, probe

from .data import CxrDataset, ImageList, cpu_allowance, list_images

META = "cxr-prepared.json"
FORMAT = "cxr-ddpm prepared dataset"
VERSION = 1
SCALE = {"uint8": 255, "uint16": 65535}


@dataclass(frozen=True)
class PreparedImages:
    """The prepared folder's view of a dataset; quacks like `ImageList` for the training loop."""
    root: Path
    files: tuple[str, ...]          # source paths relative to source_root, one per stored image
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    size: int
    dtype: str
    source_root: str
    source_fingerprint: str

    def fingerprint(self) -> str:
        """The source data's fingerprint: a checkpoint trained from here names the original data."""
        return self.source_fingerprint

    def class_counts(self) -> list[int]:
        counts = Counter(self.labels)
        return [counts.get(i, 0) for i in range(len(self.class_names))]


# -----------------------------------------------------------------------------
# writing

@dataclass
class PrepareReport:
    out: Path
    count: int
    dtype: str
    skipped: list[tuple[Path, str]]
    seconds: float


def prepare(data_dir: str | Path, size: int, out: str | Path, workers: int | None = None,
            progress: bool = True) -> PrepareReport:
    """Decode + resize every image of `data_dir` once into `out` (written atomically)."""
    if size < 8:
        raise CxrError(f"--size {size}: must be >= 8 px")
    images = list_images(data_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CxrError(f"{out}: already exists; remove it or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CxrError(f"{out}: cannot create the output folder: {e.strerror}") from None
    # Every prepare of `out` holds this lock, so a .OUT.XXXX.tmp folder found under it is a
    # killed prepare's: removed, not left for good. The lock file goes with the lock.
    with exclusive_lock(out.parent, "cxr-train prepare", name=f".{out.name}.lock"):
        remove_dead_temps(out)
        return _prepare_locked(images, size, out, workers, progress)


def _prepare_locked(images: ImageList, size: int, out: Path, workers: int | None,
                    progress: bool) -> PrepareReport:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):   # again: a prepare just finished
        raise CxrError(f"{out}: already exists; remove it or choose another --out")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise CxrError(f"{out}: cannot create the output folder: {e.strerror}") from None
    t0 = time.perf_counter()
    try:
        report = _write(images, size, tmp, workers or cpu_allowance(), progress)
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes it 0700; a shared cluster needs group read
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.out, report.seconds = out, time.perf_counter() - t0
    return report


def _write(images: ImageList, size: int, tmp: Path, workers: int, progress: bool) -> PrepareReport:
    n = len(images.files)
    skipped: list[tuple[Path, str]] = []

    def bits(path: Path) -> int:
        try:
            return probe(path).bits
        except (UnreadableImage, OSError):
            return 8                      # the decode pass reports it
    with ThreadPoolExecutor(max_workers=workers) as pool:   # headers only: fast
        deep = max(pool.map(bits, images.files)) > 8
    dtype = "uint16" if deep else "uint8"
    scale = SCALE[dtype]

    def load(path: Path) -> np.ndarray | str:
        try:
            return load_resized(path, size)
        except (UnreadableImage, OSError) as e:
            return str(e)

    arr = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=dtype, shape=(n, size, size))
    kept: list[int] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:   # PIL and pydicom release the GIL
        results = pool.map(load, images.files)
        for i, img in enumerate(tqdm(results, total=n, desc="preparing", unit="img", disable=not progress)):
            if isinstance(img, str):
                skipped.append((images.files[i], img))
                warnings.warn(f"skipping unreadable image {images.files[i]}: {img}", stacklevel=2)
                continue
            arr[len(kept)] = np.rint(img * scale).astype(dtype)
            kept.append(i)
    if not kept:
        raise CxrError(f"{images.root}: all {n} images are unreadable")
    arr.flush()
    del arr
    if len(kept) < n:                     # drop the unused tail rows: rewrite with the true shape
        full = np.load(tmp / "images.npy", mmap_mode="r")
        np.save(tmp / "images.part.npy", full[: len(kept)])
        del full
        os.replace(tmp / "images.part.npy", tmp / "images.npy")
    labels = np.asarray([images.labels[i] for i in kept], dtype=np.int64)
    np.save(tmp / "labels.npy", labels)
    meta = {
        "format": FORMAT, "version": VERSION, "size": size, "dtype": dtype, "count": len(kept),
        "class_names": list(images.class_names),
        "class_counts": np.bincount(labels, minlength=len(images.class_names)).tolist(),
        "source_root": str(images.root.resolve()), "source_fingerprint": images.fingerprint(),
        "files": [str(images.files[i].relative_to(images.root)) for i in kept],
        "skipped": [[str(p), why] for p, why in skipped],
        "resize": "runtime.inputs.imageio.load_resized (short side, bicubic, centre crop)",
        "max_abs_error": 0.5 / scale,
    }
    (tmp / META).write_text(json.dumps(meta, indent=1))
    for name in ("images.npy", "labels.npy", META):
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
    return PrepareReport(tmp, len(kept), dtype, skipped, 0.0)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -----------------------------------------------------------------------------
# reading

def is_prepared(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def open_data(path: str | Path, image_size: int) -> ImageList | PreparedImages:
    """`--data`: a prepared folder (it has cxr-prepared.json) or raw class folders."""
    return open_prepared(path, image_size) if is_prepared(path) else list_images(path)


def open_prepared(path: str | Path, image_size: int) -> PreparedImages:
    root = Path(path)
    try:
        meta = json.loads((root / META).read_text())
        ok = isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("version") == VERSION
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise CxrError(f"{root}: {META} is not a cxr-ddpm prepared dataset (version {VERSION}); "
                       f"rerun cxr-train prepare")
    try:
        arr = np.load(root / "images.npy", mmap_mode="r")
        labels = np.load(root / "labels.npy")
        shape_ok = (arr.shape == (meta["count"], meta["size"], meta["size"]) and str(arr.dtype) == meta["dtype"]
                    and labels.shape == (meta["count"],) and len(meta["files"]) == meta["count"])
    except (OSError, ValueError, KeyError):
        shape_ok = False
    if not shape_ok:
        raise CxrError(f"{root}: images.npy/labels.npy do not match {META} (damaged or foreign folder); "
                       f"rerun cxr-train prepare")
    if meta["size"] != image_size:
        raise CxrError(f"{root}: prepared at {meta['size']} px but model.image_size={image_size}; "
                       f"run cxr-train prepare --size {image_size}")
    source = Path(meta["source_root"])
    now = None
    if source.is_dir():                   # reachable: refuse a cache older than its source
        with contextlib.suppress(CxrError):   # e.g. emptied: then it cannot be compared
            now = list_images(source).fingerprint()
    if now is not None and now != meta["source_fingerprint"]:
        raise CxrError(f"{root}: stale: {source} changed since it was prepared (fingerprint "
                       f"{meta['source_fingerprint']} -> {now}); rerun cxr-train prepare")
    return PreparedImages(root, tuple(meta["files"]), tuple(int(y) for y in labels),
                          tuple(meta["class_names"]), int(meta["size"]), meta["dtype"],
                          meta["source_root"], meta["source_fingerprint"])


class PreparedDataset(torch.utils.data.Dataset):
    """(image (1, size, size) float32 in [0, 1], class index) pairs read from the memory map."""

    def __init__(self, images: PreparedImages, hflip: bool = False):
        self.images = images
        self.hflip = hflip
        self.scale = np.float32(SCALE[images.dtype])
        self._arr: np.ndarray | None = None    # opened lazily: each worker maps the file itself

    def __len__(self) -> int:
        return len(self.images.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._arr is None:
            self._arr = np.load(self.images.root / "images.npy", mmap_mode="r")
        x = torch.from_numpy(self._arr[index].astype(np.float32) / self.scale)[None]
        if self.hflip and torch.rand(()) < 0.5:   # same RNG draw as the raw loader's flip
            x = x.flip(-1)
        return x, self.images.labels[index]


def make_dataset(images: ImageList | PreparedImages, image_size: int,
                 hflip: bool = False) -> CxrDataset | PreparedDataset:
    if isinstance(images, PreparedImages):
        return PreparedDataset(images, hflip)
    return CxrDataset(images, image_size, hflip)
