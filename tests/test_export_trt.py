"""cxr-export trt: version branching, profiles and verify's engine checks without TensorRT; a real build where it can."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import assert_user_error
from cxr_ddpm.export.cli import main
from cxr_ddpm.export.trt_build import BuildPlan, engine_metadata, plan_build, profile_shapes, trt_major
from cxr_ddpm.runtime.backends.gpu_driver import driver_problem
from cxr_ddpm.runtime.backends.tensorrt import capture_decision, shape_problem
from cxr_ddpm.runtime.contract.engine_file import write_engine
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.contract.interface import io_spec
from cxr_ddpm.runtime.contract.metadata import build_metadata

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_trt_major() -> None:
    assert trt_major("10.13.0.35") == 10 and trt_major("11.4.0.106") == 11
    with pytest.raises(CxrError, match="cannot parse TensorRT version"):
        trt_major("x")


@pytest.mark.parametrize("version, precision, onnx_precision, want", [
    # strongly typed on 10 as on 11 (11 has no other mode: the flag is not passed), TF32 always cleared
    ("10.13.0.35", "fp32", "fp32", BuildPlan("fp32", True, ("TF32",))),
    ("10.13.0.35", "fp16", "fp16", BuildPlan("fp16", True, ("TF32",))),
    ("11.4.0.106", "fp32", "fp32", BuildPlan("fp32", False, ("TF32",))),
    ("11.4.0.106", "fp16", "fp16", BuildPlan("fp16", False, ("TF32",))),
    # no --precision: the ONNX's own (the README's `cxr-export trt --onnx cxr128.onnx`)
    ("11.4.0.106", None, "fp32", BuildPlan("fp32", False, ("TF32",))),
    ("10.13.0.35", None, "fp16", BuildPlan("fp16", True, ("TF32",))),
])
def test_plan_build(version: str, precision: str | None, onnx_precision: str, want: BuildPlan) -> None:
    assert plan_build(version, precision, onnx_precision) == want


@pytest.mark.parametrize("version, precision, onnx_precision, needle", [
    # a weakly typed fp16 build of an fp32 ONNX could run the time embedding in fp16: refused on 10 too
    ("10.13.0.35", "fp16", "fp32", "export with cxr-export onnx --precision fp16"),
    ("11.4.0.106", "fp16", "fp32", "export with cxr-export onnx --precision fp16"),
    ("10.13.0.35", "bf16", "fp32", "cxr-export onnx writes no bf16 ONNX"),
    ("11.4.0.106", "bf16", "fp16", "cxr-export onnx writes no bf16 ONNX"),
    ("10.13.0.35", "fp32", "fp16", "the ONNX is fp16"),
    ("8.6.1", "fp16", "fp32", "too old: cxr-export trt needs TensorRT 10"),
    ("10.13.0.35", "int8", "fp32", "use one of fp32, fp16, bf16"),
    ("10.13.0.35", None, "bf16", "ONNX precision 'bf16' is not one cxr-export writes"),
])
def test_plan_build_refuses(version: str, precision: str | None, onnx_precision: str, needle: str) -> None:
    with pytest.raises(CxrError) as e:
        plan_build(version, precision, onnx_precision)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("version", ["10.13.0.35", "11.4.0.106"])
def test_engine_metadata_records_the_plans_tf32(version: str) -> None:
    """build_engine records plan.tf32: derived from the flags it clears, never restated."""
    assert BuildPlan("fp32", False, ()).tf32 is True and BuildPlan("fp32", False, ("TF32",)).tf32 is False
    plan = plan_build(version, "fp32", "fp32")
    doc = engine_metadata({"precision": "fp32"}, trt_version=version, gpu="H100", compute_capability="9.0",
                          onnx_sha256="0" * 64, precision="fp32", batch=(1, 2, 4), tf32=plan.tf32)
    assert doc["tensorrt"]["tf32"] is False and doc["tensorrt"]["onnx_precision"] == "fp32"


def test_shape_problem() -> None:
    ok = shape_problem("e", 2, {"x": True, "t": True}, {"out": (2, 1, 32, 32)})
    assert ok is None
    refused = shape_problem("e", 99, {"x": False, "t": True}, {"out": (99, 1, 32, 32)})
    assert refused == "e: TensorRT refused the input shape(s) of x at batch 99"
    unresolved = shape_problem("e", 2, {"x": True, "t": True}, {"out": (-1, 1, 32, 32)})
    assert unresolved == "e: TensorRT left output shape(s) unresolved at batch 2: out[-1, 1, 32, 32]"


@pytest.mark.parametrize("enqueue_ok, end_error, want", [
    (True, "cudaSuccess", "use"),
    (False, "cudaSuccess", "discard"),                         # graph made but not usable: destroy it
    (True, "cudaErrorStreamCaptureInvalidated", "fallback"),   # no graph; clear the error, plain enqueue
    (False, "cudaErrorStreamCaptureInvalidated", "fallback"),  # the enqueue error is not masked
    (True, "cudaErrorIllegalAddress", "error"),
])
def test_capture_decision(enqueue_ok: bool, end_error: str, want: str) -> None:
    assert capture_decision(enqueue_ok, end_error) == want


@pytest.mark.parametrize("driver, needed, ok", [
    (13000, "13.0", True), (13020, "13.1", True),   # minor version compatibility within 13.x
    (12080, "13.0", False), (12080, "12.9", True),  # a CUDA 12 cluster with the CUDA 12 builds passes
    (None, "13.0", False), (12080, "", True),
])
def test_driver_problem(driver: int | None, needed: str, ok: bool) -> None:
    msg = driver_problem(driver, needed, "cuda-python")
    assert (msg is None) == ok
    if driver == 12080 and not ok:
        assert msg == ("the NVIDIA driver supports CUDA 12.8 but cuda-python is built for CUDA 13: update the "
                       "driver (CUDA 13: R580 or newer) or install the CUDA 12 builds (README, GPU install)")


def test_profile_shapes() -> None:
    io = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["B", 1, 32, 32]},
                     {"name": "t", "dtype": "int64", "shape": ["B"]}]}
    assert profile_shapes(io, (1, 4, 16)) == {"x": ((1, 1, 32, 32), (4, 1, 32, 32), (16, 1, 32, 32)),
                                               "t": ((1,), (4,), (16,))}


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_cli_without_tensorrt_says_how_to_install(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["trt", "--onnx", str(tmp_path / "any.onnx"), "--out", str(tmp_path / "e")])
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: TensorRT is not installed: pip install 'cxr-ddpm[gpu]'"
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_batch_before_anything(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["trt", "--onnx", str(tmp_path / "a.onnx"), "--batch", "4:2:8"])
    assert res.exit_code == 2 and res.stderr.strip().startswith("error: --batch 4:2:8: need 1 <= MIN")


def test_verify_refuses_a_range_outside_the_engine_profile(tiny_cfg: Any, tmp_path: Path) -> None:
    """A real engine header with profile 1:2:4: sizes it cannot run are refused in one line, from the
    header alone (before the checkpoint, missing here, is loaded)."""
    onnx_doc = build_metadata(tiny_cfg, kind="onnx", class_names=[], precision="fp32", io=io_spec(tiny_cfg.model))
    meta = engine_metadata(onnx_doc, trt_version="10.13.0.35", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                           onnx_sha256="ab" * 32, precision="fp32", batch=(1, 2, 4))
    engine = tmp_path / "unet.engine"
    write_engine(engine, meta, b"{}")
    missing = tmp_path / "missing.safetensors"
    for batch in ("1:4:8", "5", "1:1:5"):
        res = CliRunner().invoke(main, ["verify", str(engine), "--ckpt", str(missing), "--batch", batch])
        assert_user_error(res, f"--batch {batch if ':' in batch else ':'.join([batch] * 3)}: outside the "
                               "engine's profile 1:2:4")
    res = CliRunner().invoke(main, ["verify", str(engine), "--ckpt", str(missing), "--batch", "2:3:4"])
    assert_user_error(res, str(missing))                 # inside the profile: on to the checkpoint


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_build_and_verify(precision: str, tiny_ckpt: Path, tmp_path: Path) -> None:
    """ONNX -> engine on this GPU -> header checks -> parity against PyTorch via TrtEngine."""
    import tensorrt as trt

    from cxr_ddpm.export.onnx_export import export_onnx
    from cxr_ddpm.export.trt_build import build_engine
    from cxr_ddpm.runtime.fsutil import file_sha256
    from cxr_ddpm.export.verify import verify_artifact
    from cxr_ddpm.runtime.contract.engine_file import read_engine_header

    onnx_path = export_onnx(tiny_ckpt, tmp_path / "tiny.onnx", precision=precision).path
    cache = tmp_path / "timing.cache"
    engine = build_engine(onnx_path, tmp_path / "tiny.engine", batch=(1, 2, 4),   # precision: the ONNX's
                          timing_cache=cache, workspace_gb=1)
    meta, _ = read_engine_header(engine)
    assert meta["tensorrt"]["precision"] == precision and meta["tensorrt"]["tf32"] is False
    assert meta["tensorrt"]["version"] == trt.__version__ and meta["tensorrt"]["onnx_sha256"] == file_sha256(onnx_path)
    assert cache.stat().st_size > 0
    report = verify_artifact(engine, tiny_ckpt, onnx_sha256=file_sha256(onnx_path))  # the engine's profile
    assert report.ok, report.table()
    assert sorted({r.batch for r in report.rows}) == [1, 2, 4]
    report = verify_artifact(engine, tiny_ckpt, batch=(3, 3, 3))
    assert report.ok and {r.batch for r in report.rows} == {3}
    with pytest.raises(CxrError, match=r"--batch 1:4:8: outside the engine's profile 1:2:4"):
        verify_artifact(engine, tiny_ckpt, batch=(1, 4, 8))
    with pytest.raises(CxrError, match="built from another ONNX file"):
        verify_artifact(engine, tiny_ckpt, onnx_sha256="0" * 64)
