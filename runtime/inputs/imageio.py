"""Decode one radiograph (JPEG/PNG of any bit depth and mode, or DICOM) to a float image.

Output is always a 2-D float32 array in [0, 1] (0 = black), resized so the short
side equals `size` and centre-cropped to size x size. 8-bit images are divided
by 255; deeper images (16-bit PNG, DICOM) are windowed (DICOM VOI LUT when the
file has one) and then min-max scaled, because their stored range rarely uses
all 16 bits. MONOCHROME1 DICOMs (white = low values) are inverted.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must be reported, not half-read
Image.MAX_IMAGE_PIXELS = 20000 * 20000   # big detector images are legitimate; keep a bomb limit

RASTER_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
DICOM_EXTS = {".dcm", ".dicom"}
IMAGE_EXTS = RASTER_EXTS | DICOM_EXTS


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    bits: int          # stored bits per sample (8, 16, ...)
    mode: str          # PIL mode or "DICOM/<photometric>"


class UnreadableImage(Exception):
    """A file that cannot be decoded; the message says why."""


def probe(path: Path) -> ImageInfo:
    """Header-only read: size, bit depth, mode (cheap; for dataset scans)."""
    if path.suffix.lower() in DICOM_EXTS:
        ds = _dcmread(path, stop_before_pixels=True)
        return ImageInfo(int(ds.Columns), int(ds.Rows), int(ds.BitsStored),
                         f"DICOM/{ds.PhotometricInterpretation}")
    try:
        with Image.open(path) as img:
            return ImageInfo(img.width, img.height, _pil_bits(img), img.mode)
    except Exception as e:
        raise UnreadableImage(_reason(e)) from None


def load_gray(path: Path) -> np.ndarray:
    """Full decode to a 2-D float32 array in [0, 1], native resolution."""
    if path.suffix.lower() in DICOM_EXTS:
        return _load_dicom(path)
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_gray(img)
    except UnreadableImage:
        raise
    except Exception as e:
        raise UnreadableImage(_reason(e)) from None


def load_resized(path: Path, size: int) -> np.ndarray:
    """Decode, resize the short side to `size` (antialiased) and centre-crop: (size, size) float32."""
    if path.suffix.lower() not in DICOM_EXTS:
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; stay >= 2x the target to keep quality.
        try:
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft(img.mode, (2 * size, 2 * size))
                img.load()
                gray = _pil_to_gray(img)
        except UnreadableImage:
            raise
        except Exception as e:
            raise UnreadableImage(_reason(e)) from None
    else:
        gray = _load_dicom(path)
    return resize_center_crop(gray, size)


def resize_center_crop(gray: np.ndarray, size: int) -> np.ndarray:
    h, w = gray.shape
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = Image.fromarray(gray.astype(np.float32), mode="F").resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    out = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)  # bicubic overshoots at edges


# -----------------------------------------------------------------------------

def _pil_bits(img: Image.Image) -> int:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return 16
    if img.mode in ("I", "F"):
        return 32
    if img.mode == "1":
        return 1
    return 8


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite on black: a transparent region carries no anatomy.
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        lum = rgba[..., 0] * 0.299 + rgba[..., 1] * 0.587 + rgba[..., 2] * 0.114
        return (lum * rgba[..., 3]).astype(np.float32)
    if _pil_bits(img) > 8:
        arr = np.asarray(img, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr.mean(axis=-1)
        return _minmax(arr)
    if mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise UnreadableImage("image is constant (no contrast)")
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _dcmread(path: Path, stop_before_pixels: bool = False):  # -> pydicom.Dataset
    import pydicom
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except Exception as e:
        raise UnreadableImage(f"not a readable DICOM file: {_reason(e)}") from None
    for tag in ("Rows", "Columns", "PhotometricInterpretation"):
        if tag not in ds:
            raise UnreadableImage(f"DICOM lacks {tag} (no image in this file?)")
    if "BitsStored" not in ds:
        ds.BitsStored = ds.get("BitsAllocated", 16)
    return ds


def _load_dicom(path: Path) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    ds = _dcmread(path)
    try:
        with warnings.catch_warnings():
            # only pydicom's own (and this module's) warnings: decoding runs in worker threads
            # (prepare, check-data), and the filter list is the process's; a blanket "ignore"
            # swallowed the main thread's warnings meanwhile ("skipping unreadable image")
            warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
            warnings.filterwarnings("ignore", module=re.escape(__name__) + "$")
            arr = ds.pixel_array
    except Exception as e:
        raise UnreadableImage(f"cannot decode DICOM pixel data: {_reason(e)}") from None
    if arr.ndim == 3:  # multi-frame: a radiograph has one; take the first
        arr = arr[0]
    arr = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        arr = apply_voi_lut(arr, ds)
    gray = _minmax(np.asarray(arr, dtype=np.float32))
    if ds.PhotometricInterpretation == "MONOCHROME1":
        gray = 1.0 - gray
    return gray


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]
