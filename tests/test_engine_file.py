"""The TensorRT engine file header (runtime/contract/engine_file.py): no TensorRT needed, plan bytes faked."""
from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_ddpm.runtime.contract.engine_file import (HEADER_VERSION, MAGIC, check_engine_compat, encode_header,
                                          is_engine_file, read_engine, read_engine_header, write_engine)
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.contract.metadata import build_metadata

PLAN = bytes(range(256)) * 40 + b"\x00plan-end"
ONNX_SHA = "ab" * 32
HERE = {"trt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.fixture
def meta(tiny_cfg) -> dict:
    from cxr_ddpm.export.trt_build import engine_metadata
    onnx_doc = build_metadata(tiny_cfg, kind="onnx", class_names=["a", "b"], precision="fp16",
                              io={"inputs": [], "outputs": []}, batch={"min": 1, "opt": 4, "max": 16})
    return engine_metadata(onnx_doc, trt_version=HERE["trt_version"], gpu=HERE["gpu_name"],
                           compute_capability=HERE["compute_capability"], onnx_sha256=ONNX_SHA,
                           precision="fp16", batch=(1, 4, 16))


@pytest.fixture
def engine(tmp_path: Path, meta: dict) -> Path:
    path = tmp_path / "unet.engine"
    write_engine(path, meta, PLAN)
    return path


def test_round_trip(engine: Path, meta: dict) -> None:
    assert is_engine_file(engine)
    got, offset = read_engine_header(engine)
    assert got == meta and got["kind"] == "tensorrt"
    assert got["tensorrt"]["profile"] == {"min": 1, "opt": 4, "max": 16}
    assert engine.read_bytes()[offset:] == PLAN
    assert read_engine(engine) == (meta, PLAN)
    raw = engine.read_bytes()
    assert raw[:8] == MAGIC == b"CXRTRT\x00\x01"
    version, n = struct.unpack("<IQ", raw[8:20])
    assert version == HEADER_VERSION and offset == 20 + n
    assert [p.name for p in engine.parent.iterdir()] == ["unet.engine"]


def test_compat_accepts_same_machine(meta: dict) -> None:
    check_engine_compat(meta, **HERE, onnx_sha256=ONNX_SHA, source="e")
    check_engine_compat(meta, **HERE, onnx_sha256=None, source="e")       # no --onnx given: not checked


@pytest.mark.parametrize("change, needle", [
    ({"trt_version": "10.14.1.48"}, "built with TensorRT 10.13.0.35, this machine has TensorRT 10.14.1.48"),
    ({"compute_capability": "8.9", "gpu_name": "NVIDIA L4"}, "built for compute capability 9.0"),
    ({"gpu_name": "NVIDIA H100 PCIe"}, "built on a NVIDIA H100 80GB HBM3, this GPU is a NVIDIA H100 PCIe"),
    ({"onnx_sha256": "cd" * 32}, "built from another ONNX file"),
])
def test_compat_refusals(meta: dict, change: dict, needle: str) -> None:
    kw = {**HERE, "onnx_sha256": ONNX_SHA, **change}
    with pytest.raises(CxrError, match="rebuild|another ONNX") as e:
        check_engine_compat(meta, **kw, source="unet.engine")
    assert needle in str(e.value) and str(e.value).startswith("unet.engine: ")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_refuses_wrong_magic(tmp_path: Path) -> None:
    p = _write(tmp_path / "raw.plan", b"ftrt" + PLAN)                  # a bare trtexec plan
    assert not is_engine_file(p)
    with pytest.raises(CxrError, match="wrong magic bytes"):
        read_engine_header(p)


def test_refuses_newer_header_version(tmp_path: Path, engine: Path) -> None:
    raw = bytearray(engine.read_bytes())
    raw[8:12] = struct.pack("<I", HEADER_VERSION + 1)
    with pytest.raises(CxrError, match=f"header version {HEADER_VERSION + 1} is newer.*upgrade cxr-ddpm"):
        read_engine_header(_write(tmp_path / "new.engine", bytes(raw)))


@pytest.mark.parametrize("cut, needle", [(12, "header cut short"), (100, "metadata cut short"),
                                         (None, "no plan after the header")])
def test_refuses_truncated(tmp_path: Path, engine: Path, cut: int | None, needle: str) -> None:
    raw = engine.read_bytes()
    cut = read_engine_header(engine)[1] if cut is None else cut
    with pytest.raises(CxrError, match=needle):
        read_engine_header(_write(tmp_path / "cut.engine", raw[:cut]))


def test_refuses_bad_json_and_missing_sections(tmp_path: Path, meta: dict) -> None:
    blob = b"{not json"
    bad = MAGIC + struct.pack("<IQ", HEADER_VERSION, len(blob)) + blob + PLAN
    with pytest.raises(CxrError, match="not valid JSON"):
        read_engine_header(_write(tmp_path / "a.engine", bad))
    no_trt = {k: v for k, v in meta.items() if k != "tensorrt"}
    with pytest.raises(CxrError, match="no 'tensorrt' section"):
        read_engine_header(_write(tmp_path / "b.engine", encode_header(no_trt) + PLAN))
    with pytest.raises(CxrError, match="engine file not found"):
        read_engine_header(tmp_path / "nope.engine")


def test_failed_write_leaves_nothing(tmp_path: Path, meta: dict) -> None:
    with pytest.raises(CxrError, match="no 'tensorrt' section"):
        write_engine(tmp_path / "x.engine", {**meta, "tensorrt": None}, PLAN)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CxrError, match="cannot create output folder"):
        write_engine(tmp_path / "file.txt" / "x.engine", meta, PLAN)
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_trt_engine_without_tensorrt_is_one_clear_error(engine: Path) -> None:
    from cxr_ddpm.runtime.backends.tensorrt import TrtEngine
    with pytest.raises(CxrError, match=r"TensorRT is not installed: pip install 'cxr-ddpm\[gpu\]'"):
        TrtEngine(engine)


def test_runtime_side_is_torch_free() -> None:
    code = ("import sys, cxr_ddpm.runtime.contract.engine_file, cxr_ddpm.runtime.backends.tensorrt, "
            "cxr_ddpm.runtime.contract.metadata as m; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
