"""The dataset layout shared by training, data checks and evaluation: class folders under one
root, as in the Curated COVID-19 CXR set (root/COVID-19/*.jpg, root/Normal/*.png, ...).
Class names are the folder names (sorted), labels their index. numpy-free and torch-free."""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable

from ..errors import CxrError
from .imageio import IMAGE_EXTS


@dataclass(frozen=True)
class ImageList:
    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    def fingerprint(self) -> str:
        """Hash of relative paths, sizes and labels: identifies the data a checkpoint was trained on.

        Not the bytes: hashing every file of the full set at each save would read gigabytes
        from a shared filesystem; a same-size in-place edit is the case this does not catch."""
        return fingerprint_entries((str(f.relative_to(self.root)), f.stat().st_size, y)
                                   for f, y in zip(self.files, self.labels))

    def class_counts(self) -> list[int]:
        counts = Counter(self.labels)
        return [counts.get(i, 0) for i in range(len(self.class_names))]


def fingerprint_entries(entries: Iterable[tuple[str, int, int]]) -> str:
    """ImageList.fingerprint of (relative path, size in bytes, label) entries in list order: lets a
    reader rebuild the fingerprint of a file list it assembles (cxr-train utility: train + test)."""
    h = hashlib.sha256()
    for rel, size, label in entries:
        h.update(f"{rel}\0{size}\0{label}\n".encode())
    return h.hexdigest()[:16]


def list_images(root: str | Path, skip: Collection[Path] = ()) -> ImageList:
    """Find images under class folders; images directly in root form one class named after it.
    Folders in `skip` (e.g. an evaluation report's, with its PNGs) are no class folders."""
    root = Path(root)
    if not root.exists():
        raise CxrError(f"{root}: data folder not found")
    if not root.is_dir():
        raise CxrError(f"{root}: not a folder (expected one folder per class)")
    skipped = {Path(p).resolve() for p in skip}
    class_dirs = sorted(d for d in root.iterdir()
                        if d.is_dir() and not d.name.startswith(".") and d.resolve() not in skipped)
    groups = [(d.name, images_under(d)) for d in class_dirs]
    groups = [(name, files) for name, files in groups if files]
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if loose and not groups:
        groups = [(root.resolve().name, loose)]
    if not groups:
        exts = ", ".join(sorted(IMAGE_EXTS))
        raise CxrError(f"{root}: no images found (expected class folders holding {exts})")
    files, labels = [], []
    for label, (_, paths) in enumerate(groups):
        files += paths
        labels += [label] * len(paths)
    return ImageList(root, tuple(files), tuple(labels), tuple(name for name, _ in groups))


def images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
