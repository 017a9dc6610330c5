"""The TensorRT engine file: a small self-describing header, then the serialized plan.

Layout (all integers little-endian):

    8 bytes   magic b"CXRTRT\\x00\\x01"
    uint32    header format version (HEADER_VERSION)
    uint64    length N of the JSON document
    N bytes   UTF-8 JSON: the ONNX metadata document with kind="tensorrt" and a
              "tensorrt" section {version, gpu, compute_capability, onnx_sha256,
              precision, profile: {min, opt, max}}
    rest      the plan exactly as IBuilder.build_serialized_network returned it

Why one file and not plan + sidecar JSON: a plan is only valid with the exact
TensorRT version and GPU it was built for, and a sidecar gets separated from
(or paired with the wrong) plan when files are copied around. With the header in
the same file, every load can check compatibility first and fail with one clear
line instead of a crash inside TensorRT. Torch-free and numpy-free.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from ..errors import CxrError
from ..fsutil import atomic_write
from .metadata import ArtifactInfo, dumps, read_metadata

MAGIC = b"CXRTRT\x00\x01"
HEADER_VERSION = 1
_FIXED = struct.Struct("<8sIQ")            # magic, header version, JSON length
MAX_JSON_BYTES = 64 << 20                  # a metadata doc is a few kB; more means a corrupt length
TRT_KEYS = ("version", "gpu", "compute_capability", "onnx_sha256", "precision", "profile")


def is_engine_file(path: str | Path) -> bool:
    """True when the file starts with our magic bytes (cheap: reads 8 bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def encode_header(meta: dict[str, Any]) -> bytes:
    blob = dumps(meta).encode("utf-8")
    return _FIXED.pack(MAGIC, HEADER_VERSION, len(blob)) + blob


def write_engine(path: str | Path, meta: dict[str, Any], plan: bytes) -> None:
    """Header + plan, written atomically (temp file + rename)."""
    if not plan:
        raise ValueError("write_engine needs a non-empty plan")
    _check_trt_section(meta, str(path))
    with atomic_write(path, "wb") as f:
        f.write(encode_header(meta))
        f.write(plan)


def read_engine_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(metadata, byte offset of the plan); CxrError for anything that is not a usable engine file."""
    info, offset = read_engine_info(path)
    return info.meta, offset


def read_engine_info(path: str | Path) -> tuple[ArtifactInfo, int]:
    """(metadata with its config and schedule, byte offset of the plan), read and checked once."""
    src = str(path)
    try:
        with open(path, "rb") as f:
            fixed = f.read(_FIXED.size)
            if len(fixed) < len(MAGIC) or fixed[:len(MAGIC)] != MAGIC:
                raise CxrError(f"{src}: not a cxr-ddpm TensorRT engine (wrong magic bytes); "
                               "raw trtexec plans carry no metadata: rebuild with cxr-export trt")
            if len(fixed) < _FIXED.size:
                raise CxrError(f"{src}: engine file is truncated (header cut short)")
            _, version, n = _FIXED.unpack(fixed)
            if version > HEADER_VERSION:
                raise CxrError(f"{src}: engine header version {version} is newer than this cxr-ddpm "
                               f"understands ({HEADER_VERSION}); upgrade cxr-ddpm")
            if version < 1 or n > MAX_JSON_BYTES:
                raise CxrError(f"{src}: corrupt engine header (version {version}, JSON length {n})")
            blob = f.read(n)
            if len(blob) < n:
                raise CxrError(f"{src}: engine file is truncated (metadata cut short)")
            offset = f.tell()
            if not f.read(1):
                raise CxrError(f"{src}: engine file is truncated (no plan after the header)")
    except FileNotFoundError:
        raise CxrError(f"{src}: engine file not found") from None
    except IsADirectoryError:
        raise CxrError(f"{src}: is a folder, not an engine file") from None
    except OSError as e:
        raise CxrError(f"{src}: cannot read engine file: {e.strerror}") from None
    info = read_metadata(blob, src)
    _check_trt_section(info.meta, src)
    return info, offset


def read_engine(path: str | Path, header: tuple[dict[str, Any], int] | None = None) -> tuple[dict[str, Any], bytes]:
    """(metadata, plan). `header`: what read_engine_header already returned, so the header
    is read and parsed once per open."""
    meta, offset = header if header is not None else read_engine_header(path)
    with open(path, "rb") as f:
        f.seek(offset)
        return meta, f.read()


def check_engine_compat(meta: dict[str, Any], *, trt_version: str, gpu_name: str,
                        compute_capability: str, onnx_sha256: str | None, source: str) -> None:
    """Refuse an engine this machine cannot (or should not) run, naming what differs.

    A plan is tied to the exact TensorRT version and GPU model it was built on;
    TensorRT itself would fail deserialization with a long log, or worse, run a
    plan tuned for another GPU.
    """
    trt = meta["tensorrt"]
    if str(trt["version"]) != str(trt_version):
        raise CxrError(f"{source}: engine was built with TensorRT {trt['version']}, this machine has "
                       f"TensorRT {trt_version}; rebuild it here with cxr-export trt")
    if str(trt["compute_capability"]) != str(compute_capability):
        raise CxrError(f"{source}: engine was built for compute capability {trt['compute_capability']} "
                       f"({trt['gpu']}), this GPU is {compute_capability} ({gpu_name}); "
                       "rebuild it here with cxr-export trt")
    if str(trt["gpu"]) != str(gpu_name):
        raise CxrError(f"{source}: engine was built on a {trt['gpu']}, this GPU is a {gpu_name}; "
                       "rebuild it here with cxr-export trt")
    if onnx_sha256 is not None and trt["onnx_sha256"] != onnx_sha256:
        raise CxrError(f"{source}: engine was built from another ONNX file (sha256 "
                       f"{str(trt['onnx_sha256'])[:12]}..., given {onnx_sha256[:12]}...)")


def _check_trt_section(meta: dict[str, Any], source: str) -> None:
    trt = meta.get("tensorrt")
    if meta.get("kind") != "tensorrt" or not isinstance(trt, dict):
        raise CxrError(f"{source}: engine metadata has no 'tensorrt' section")
    missing = [k for k in TRT_KEYS if k not in trt]
    if missing:
        raise CxrError(f"{source}: engine metadata lacks tensorrt.{', tensorrt.'.join(missing)}")


__all__ = ["MAGIC", "HEADER_VERSION", "is_engine_file", "write_engine", "read_engine_header", "read_engine",
           "check_engine_compat", "encode_header"]
