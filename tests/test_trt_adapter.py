"""The TensorRT backend's bookkeeping, executed on CPU: TensorRT and CUDA cannot be installed
here, so `GpuLibs` carries stand-ins for both (tests/trt_standin.py; passed in, nothing patched).

The engine file is real (header and metadata written by write_engine and checked by the real
header code); only its plan is the stand-in's JSON. Untested here (needs a GPU with TensorRT):
the real kernels and CUDA calls, stream ordering, CuPy device inputs (tests marked tensorrt).
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from trt_standin import CC, GPU, TRT_VERSION, Err, FakeCudart, FakeTrt

from cxr_ddpm.export.trt_build import engine_metadata
from cxr_ddpm.runtime.backends import load_denoiser
from cxr_ddpm.runtime.backends.ort_cuda import GpuFallbackWarning
from cxr_ddpm.runtime.backends.tensorrt import GpuLibs, warmup_inputs
from cxr_ddpm.runtime.contract.engine_file import write_engine
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.contract.interface import io_spec
from cxr_ddpm.runtime.contract.metadata import build_metadata
from cxr_ddpm.runtime.sampling.generate import generate, resolve_request

NULL = 2                                            # the null class of a two-class model


@pytest.fixture(params=["class", "self_cond"])
def engine_file(request: pytest.FixtureRequest, tiny_cfg: Any, tmp_path: Path) -> Path:
    """A real engine file (header + metadata) for a two-class or a self-conditioning model."""
    m, d = tiny_cfg.model, tiny_cfg.diffusion
    if request.param == "class":
        cfg = tiny_cfg.replace(model=dataclasses.replace(m, num_classes=2),
                               diffusion=dataclasses.replace(d, beta_schedule="cosine"))
    else:
        cfg = tiny_cfg.replace(model=dataclasses.replace(m, self_condition=True))
    io = io_spec(cfg.model)
    classes = cfg.model.num_classes
    onnx_doc = build_metadata(cfg, kind="onnx", class_names=["a", "b"][:classes], precision="fp32", io=io,
                              null_class=classes or None, self_condition=cfg.model.self_condition)
    meta = engine_metadata(onnx_doc, trt_version=TRT_VERSION, gpu=GPU, compute_capability=f"{CC[0]}.{CC[1]}",
                           onnx_sha256="ab" * 32, precision="fp32", batch=(1, 4, 8))
    plan = {"io": io, "timesteps": cfg.diffusion.timesteps, "num_classes": classes}
    write_engine(tmp_path / "unet.engine", meta, json.dumps(plan).encode())
    return tmp_path / "unet.engine"


def _open(path: Path, trt: FakeTrt, cudart: FakeCudart, cuda_graph: str = "auto") -> Any:
    return load_denoiser(path, cuda_graph=cuda_graph, libs=GpuLibs(trt, cudart))


def _inputs(den: Any, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, 32, 32)).astype(np.float32)
    t = rng.integers(0, 100, batch)
    extra = ({"classes": rng.integers(0, NULL + 1, batch)} if "class" in den.input_names
             else {"x_self_cond": rng.standard_normal(x.shape).astype(np.float32)})
    return x, t, extra


def _want(x: np.ndarray, t: np.ndarray, extra: dict[str, np.ndarray]) -> np.ndarray:
    out = x / 2 + t[:, None, None, None] / 100
    if "classes" in extra:
        return out + extra["classes"][:, None, None, None]
    return out + extra["x_self_cond"] / 4


def test_warmup_inputs_are_zero_and_null_class() -> None:
    shapes = {"x": (2, 1, 4, 4), "t": (2,), "class": (2,), "x_self_cond": (2, 1, 4, 4)}
    dtypes = {"x": np.dtype(np.float32), "t": np.dtype(np.int64), "class": np.dtype(np.int64),
              "x_self_cond": np.dtype(np.float16)}
    got = warmup_inputs(shapes, dtypes, null_class=NULL)
    assert {n: (a.shape, a.dtype) for n, a in got.items()} == {n: (shapes[n], dtypes[n]) for n in shapes}
    assert (got["class"] == NULL).all() and not any(got[n].any() for n in ("x", "t", "x_self_cond"))
    assert (warmup_inputs({"class": (3,)}, dtypes, null_class=None)["class"] == 0).all()


@pytest.mark.parametrize("mode, want", [("auto", True), (None, True), ("on", True), ("off", False)])
def test_cuda_graph_choice_reaches_trt_denoiser(engine_file: Path, mode: str | None, want: bool) -> None:
    den = load_denoiser(engine_file, cuda_graph=mode, open_engine=False)    # header only
    assert den.backend == "tensorrt" and den.cuda_graph is want


def test_cuda_graph_unknown_mode_is_one_line(engine_file: Path) -> None:
    with pytest.raises(CxrError, match=r"^--cuda-graph 'sometimes' is unknown \(valid: auto, on, off\)$"):
        load_denoiser(engine_file, cuda_graph="sometimes", open_engine=False)


def test_graph_warmup_runs_on_filled_inputs(engine_file: Path) -> None:
    """The plain enqueue before capture reads valid inputs (not 0xFF garbage: class -1), then the
    captured graph is replayed on each call's inputs."""
    trt, cudart = FakeTrt(), FakeCudart()
    den = _open(engine_file, trt, cudart, cuda_graph="on")
    for seed in (0, 1):
        x, t, extra = _inputs(den, 3, seed)
        np.testing.assert_allclose(den(x, t, **extra), _want(x, t, extra), rtol=1e-6)
    warm = trt.context.seen[0]
    assert not any(warm[n].any() for n in warm if n != "class")
    assert "class" not in warm or (warm["class"] == NULL).all()
    assert den.cuda_graph is True and cudart.launches == 2 and len(trt.context.seen) == 3   # warm-up + 2 replays
    den.close()
    assert cudart.graphs_live == 0 and not cudart.device and not cudart.host and cudart.streams_live == 0


@pytest.mark.parametrize("mode", ["off", "on"])
def test_buffers_once_per_batch_size(engine_file: Path, mode: str) -> None:
    trt, cudart = FakeTrt(), FakeCudart()
    den = _open(engine_file, trt, cudart, cuda_graph=mode)
    n_io = len(den.input_names) + 1
    first = None
    for i, batch in enumerate((2, 2, 2, 3, 2)):
        x, t, extra = _inputs(den, batch, i)
        out = den(x, t, **extra)
        np.testing.assert_allclose(out, _want(x, t, extra), rtol=1e-6)
        first = (out, _want(x, t, extra)) if first is None else first
        if i == 2:                                   # three calls at batch 2: one allocation
            assert (cudart.mallocs, cudart.host_mallocs) == (n_io, 1)
    assert (cudart.mallocs, cudart.host_mallocs) == (3 * n_io, 3) and len(cudart.device) == n_io
    np.testing.assert_allclose(*first, rtol=1e-6)     # a copy: later calls did not overwrite it
    assert ("x", (3, 1, 32, 32)) in trt.context.set_shapes and ("t", (3,)) in trt.context.set_shapes
    graphs = mode == "on"                            # each call replays; a warm-up per batch size
    assert cudart.launches == (5 if graphs else 0) and len(trt.context.seen) == (8 if graphs else 5)
    den.close()
    assert not cudart.device and not cudart.host and cudart.graphs_live == 0 and cudart.streams_live == 0


@pytest.mark.parametrize("trt_kw, end_capture, reason", [
    ({}, Err.cudaErrorStreamCaptureInvalidated, "cudaErrorStreamCaptureInvalidated"),   # "fallback"
    ({"fail_in_capture": True}, Err.cudaSuccess, "the enqueue failed while capturing"),  # "discard"
])
def test_capture_failure_falls_back_once(engine_file: Path, trt_kw: dict, end_capture: Err, reason: str) -> None:
    trt, cudart = FakeTrt(**trt_kw), FakeCudart(end_capture=end_capture)
    den = _open(engine_file, trt, cudart)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (2, 3):
            x, t, extra = _inputs(den, batch, batch)
            np.testing.assert_allclose(den(x, t, **extra), _want(x, t, extra), rtol=1e-6)
    assert [(w.category, str(w.message)) for w in caught] == [
        (GpuFallbackWarning, f"{engine_file}: TensorRT CUDA graph capture failed; running without "
                             f"CUDA graphs ({reason})")]
    assert den.cuda_graph is False and cudart.launches == 0 and cudart.graphs_live == 0   # recorded: off


def test_capture_cuda_error_is_raised(engine_file: Path) -> None:
    den = _open(engine_file, FakeTrt(), FakeCudart(end_capture=Err.cudaErrorIllegalAddress))
    x, t, extra = _inputs(den, 2, 0)
    with pytest.raises(CxrError, match="^CUDA error cudaErrorIllegalAddress$"):
        den(x, t, **extra)


@pytest.mark.parametrize("trt_kw, call, needle", [
    ({"refuse": ("x",)}, 2, "TensorRT refused the input shape(s) of x at batch 2"),
    ({"unresolved": True}, 2, "TensorRT left output shape(s) unresolved at batch 2: out[-1, 1, 32, 32]"),
    ({}, 9, "batch 9 is outside the engine's profile 1..8; rebuild with --batch"),
])
def test_shape_problems_are_one_line(engine_file: Path, trt_kw: dict, call: int, needle: str) -> None:
    cudart = FakeCudart()
    den = _open(engine_file, FakeTrt(**trt_kw), cudart, cuda_graph="off")
    x, t, extra = _inputs(den, call, 0)
    with pytest.raises(CxrError) as e:
        den(x, t, **extra)
    assert str(e.value) == f"{engine_file}: {needle}"
    assert not cudart.device and not cudart.host     # nothing sized from a refused shape


def test_engine_from_another_gpu_is_refused(engine_file: Path) -> None:
    cudart = FakeCudart(gpu="NVIDIA L4", cc=(8, 9))
    with pytest.raises(CxrError, match="built for compute capability 9.0"):
        _open(engine_file, FakeTrt(), cudart)
    assert cudart.streams_live == 0 and not cudart.device


def test_sampling_through_a_graph(engine_file: Path) -> None:
    """The sampler's calls (guidance doubles the batch) replay one graph per batch size."""
    trt, cudart = FakeTrt(), FakeCudart()
    den = _open(engine_file, trt, cudart)
    conditional = "class" in den.input_names
    req = resolve_request(den, 3, steps=4, labels=[0, 1, 0] if conditional else None,
                          guidance=2.0 if conditional else None)
    images = generate(den, req, batch_size=2)
    assert images.shape == (3, 1, 32, 32) and np.isfinite(images).all()
    n_io, sizes = len(den.input_names) + 1, 2                # batches of 2 and 1 (x2 with guidance)
    assert den.cuda_graph is True and cudart.mallocs == sizes * n_io and cudart.launches == 2 * 4
    den.close()
