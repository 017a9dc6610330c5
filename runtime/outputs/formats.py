"""Writing sampled images: PNG (8 or 16 bit), .npy, DICOM Secondary Capture, grid PNG.

Every write is atomic (temp file + rename), so an interrupted run never leaves a
half-written image. Samples arrive in the model's [-1, 1] space, (C, H, W) per image.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..fsutil import atomic_write

FORMATS = ("png", "png16", "npy", "dcm")
SUFFIX = {"png": ".png", "png16": ".png", "npy": ".npy", "dcm": ".dcm"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"   # Secondary Capture Image Storage


def to_unit(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 1] float32 (lucidrains' unnormalize), clipped."""
    return np.clip((np.asarray(x, dtype=np.float32) + 1.0) * 0.5, 0.0, 1.0)


def quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """[-1, 1] (C, H, W) or (H, W) -> (H, W) uint8/uint16 gray, rounded to nearest."""
    img = to_unit(x)
    img = img[0] if img.ndim == 3 else img                     # (H, W): radiographs are 1-channel
    top = (1 << bits) - 1
    return np.rint(img * top).astype(np.uint8 if bits == 8 else np.uint16)


def png_bytes(gray: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class DicomSeries:
    """Where a DICOM sample belongs. One Study per sampling request and one Series per class
    in it; UIDs are derived from the request's hash (and the image index), dates from the
    request's creation time, so the same request always writes the same files, whichever
    process (or shard of a job array) writes them."""
    request_sha256: str
    when: _dt.datetime                  # the request's creation time (UTC)
    name: str = ""                      # class name; "" for unconditional samples
    number: int = 1                     # SeriesNumber within the study

    def uid(self, *parts: str) -> str:
        from pydicom.uid import generate_uid
        return generate_uid(entropy_srcs=[self.request_sha256, *parts])


class Written(NamedTuple):
    sha256: str                    # of the bytes written, as file_sha256 would read them back
    size: int


def write_image(path: Path, x: np.ndarray, fmt: str, *, meta: dict[str, Any] | None = None,
                index: int = 0, seed: int | None = None, series: DicomSeries | None = None,
                instance: int = 1) -> Written:
    """Write one sample (C, H, W in [-1, 1]) as `fmt`; returns the sha256 and size of the bytes
    written (for the record: no read-back). DICOM needs `series` and the image's 1-based
    `instance` number within it."""
    if fmt == "png":
        data = png_bytes(quantize(x, 8))
    elif fmt == "png16":
        data = png_bytes(quantize(x, 16))
    elif fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, to_unit(x))                               # float32 [0, 1], (C, H, W)
        data = buf.getvalue()
    elif fmt == "dcm":
        if series is None:
            raise ValueError("DICOM output needs its DicomSeries")
        data = dicom_bytes(quantize(x, 16), meta or {}, index=index, seed=seed, series=series, instance=instance)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    with atomic_write(path) as f:
        f.write(data)
    return Written(hashlib.sha256(data).hexdigest(), len(data))


def dicom_bytes(gray: np.ndarray, meta: dict[str, Any], *, index: int, seed: int | None,
                series: DicomSeries, instance: int) -> bytes:
    """A DICOM Secondary Capture marked synthetic: derived image type, a generated-by
    series description, and no patient identity from anywhere."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    when = series.when
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)            # file meta attributes are typed UID
    fm.MediaStorageSOPInstanceUID = UID(series.uid("image", str(index)))
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = series.uid("study")
    ds.SeriesInstanceUID = series.uid("series", series.name)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Modality = "OT"
    ds.ConversionType = "SYN"                                  # synthetic image
    ds.BurnedInAnnotation = "NO"
    ds.PatientName = "SYNTHETIC"
    ds.PatientID = ""
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", series.number, instance
    ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.Laterality = ""                                          # type 2C: unknown, not a paired part
    ds.PatientOrientation = ""                                  # type 2C: no orientation claimed
    ds.Manufacturer = "cxr-ddpm"
    ds.StudyDescription = "SYNTHETIC: generated by cxr-ddpm"
    ds.SeriesDescription = ("SYNTHETIC: generated by cxr-ddpm"                  # LO: 64 chars at most
                            + (f", {series.name}" if series.name else ""))[:64]
    ds.ImageComments = (f"Synthetic image generated by cxr-ddpm (seed {seed}, index {index}, "
                        f"objective {meta.get('objective')}, package "
                        f"{(meta.get('provenance') or {}).get('package_version')}); not a real patient.")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(gray.shape[0]), int(gray.shape[1])
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(gray, dtype="<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def grid_png(path: Path, images: Sequence[np.ndarray | None], *, cols: int | None = None,
             pad: int = 2) -> Path:
    """Grid of 8-bit images ((C, H, W) in [-1, 1]) with black gutters, row-major; None
    leaves a cell black. `cols` defaults to a square-ish layout."""
    h, w = next(x for x in images if x is not None).shape[-2:]
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.uint8)
    for k, x in enumerate(images):
        if x is None:
            continue
        r, c = divmod(k, cols)
        y, x0 = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y:y + h, x0:x0 + w] = quantize(x, 8)
    with atomic_write(path) as f:
        f.write(png_bytes(canvas))
    return path
