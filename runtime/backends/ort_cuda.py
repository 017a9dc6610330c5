"""ONNX Runtime on a CUDA GPU: CUDA graphs per batch size, and CuPy arrays that stay on the device.

CUDA graphs (ORT CUDA provider option `enable_cuda_graph`, docs: "Using CUDA Graphs" in the CUDA
execution provider page) replay one captured launch sequence instead of launching every kernel
from Python/C++: the sampler calls the U-Net with the same shapes at every step, which is the case
graphs are made for. ORT's rules, and how `GraphRunner` follows them:
- replay reads and writes the addresses seen at capture, so inputs and output are bound once per
  batch size to fixed device buffers (IO binding); each call copies its inputs into them and copies
  the output out (a fresh array: the buffer is overwritten by the next step);
- one graph per shape: each batch size gets its own run option `gpu_graph_id` (1, 2, ...; 0 is
  ORT's internal default, -1 means "no graph");
- the first runs of an id are regular runs (ORT allocates its arena then), the next one captures;
- the session is refused at creation when some node is not on the CUDA provider (Memcpy nodes),
  and capture can fail at run time: both fall back to plain CUDA runs with one warning line.

CuPy and ORT use different CUDA streams (CuPy the legacy default stream, ORT its own non-blocking
stream), which do not order against each other: CuPy's stream is synchronized before every ORT
run, and ORT synchronizes its own stream at the end of a run (the default), so CuPy may read the
output as soon as `run_with_iobinding` returns.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..errors import CxrError

CUDA_GRAPH_MODES = ("auto", "on", "off")
ARRAY_MODES = ("auto", "numpy", "cupy")
CAPTURE_RUNS = 3        # ORT: up to 2 regular runs per graph id, then capture; past this, replays
ORT_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                   "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class GpuFallbackWarning(RuntimeWarning):
    """A faster GPU path was asked for and could not be used; the run goes on without it.
    Its own category so that callers silencing repeated user warnings still show it."""


def resolve_cuda_graph(mode: str | None, provider: str) -> bool:
    """Whether to ask ORT for CUDA graphs.

    auto (default): on for the cuda provider (every sampling step has the same shapes, and the
    step is bound by kernel launches; failure falls back with one warning); off elsewhere.
    on: the same, but refused with one line for a provider that has no CUDA graphs here.
    """
    mode = mode or "auto"
    if mode not in CUDA_GRAPH_MODES:
        raise CxrError(f"--cuda-graph {mode!r} is unknown (valid: {', '.join(CUDA_GRAPH_MODES)})")
    if mode == "on" and provider != "cuda":
        raise CxrError(f"--cuda-graph on needs --provider cuda (got {provider}): CUDA graphs are an "
                       f"ONNX Runtime CUDA provider feature")
    return mode != "off" and provider == "cuda"


def resolve_tf32(tf32: bool | None, provider: str) -> bool:
    """Whether ORT's CUDA provider may compute fp32 MatMul/Conv in TF32 (`use_tf32`).

    Off by default: TF32 rounds the inputs of fp32 MatMul/Conv to a 10-bit mantissa, so an fp32 model
    stops being fp32 (and `cxr-export verify`'s 1e-4 check is run with it off, always). Turn it on
    (--tf32) only after `python -m bench gpu` shows it faster with samples within the fp32
    tolerance. Refused with one line where there is no CUDA provider to apply it to.
    """
    if tf32 and provider not in ("cuda", "tensorrt"):
        raise CxrError(f"--tf32 needs --provider cuda or tensorrt (got {provider}): TF32 is a GPU math mode")
    return bool(tf32)


def choose_arrays(mode: str | None, provider: str, cupy_problem: str | None, backend: str = "onnx") -> str:
    """'cupy' or 'numpy' for the sampler math.

    auto: CuPy when the denoiser runs on CUDA, takes CuPy arrays (the ONNX Runtime and TensorRT
    backends; the PyTorch reference takes NumPy) and CuPy works (cupy_problem is None), so x never
    leaves the GPU; NumPy otherwise. cupy: refused with one line when it cannot be honoured.
    """
    mode = mode or "auto"
    if mode not in ARRAY_MODES:
        raise CxrError(f"--arrays {mode!r} is unknown (valid: {', '.join(ARRAY_MODES)})")
    gpu = provider in ("cuda", "tensorrt") and backend in ("onnx", "tensorrt")
    if mode == "cupy":
        if backend not in ("onnx", "tensorrt"):
            raise CxrError(f"--arrays cupy: the {backend} backend takes NumPy arrays")
        if not gpu:
            raise CxrError(f"--arrays cupy needs a GPU provider (--provider cuda), got {provider}")
        if cupy_problem:
            raise CxrError(f"--arrays cupy: {cupy_problem}")
        return "cupy"
    if mode == "numpy" or not gpu or cupy_problem:
        return "numpy"
    return "cupy"


CUPY_MISSING = "CuPy is not installed (pip install 'cupy-cuda13x[ctk]')"
CUPY_CTK = "install CuPy with its CUDA compiler: pip install 'cupy-cuda13x[ctk]' (CUDA 12: cupy-cuda12x[ctk])"


def cupy_problem() -> str | None:
    """None when CuPy works: it imports, sees a CUDA device, and compiles and runs a kernel;
    otherwise why not, in one line. The kernel matters: every CuPy elementwise op is compiled at
    first use by NVRTC, which `cupy-cuda13x` without its `[ctk]` extra does not bring, so a
    device count alone would pick CuPy and fail at the sampler's first operation."""
    try:
        import cupy
    except ImportError:
        return CUPY_MISSING
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as e:  # cupy raises CUDARuntimeError without a driver
        return f"CuPy cannot use CUDA ({_first_line(e, 120)})"
    try:
        kernel = cupy.ElementwiseKernel("float32 x", "float32 y", "y = 2 * x + 1", "cxr_ddpm_probe")
        got = [float(v) for v in kernel(cupy.arange(4, dtype=cupy.float32)).get()]
    except Exception as e:  # NVRTC missing: RuntimeError/CompileException/OSError, depending on the version
        return f"CuPy cannot compile its kernels ({_first_line(e, 120)}); {CUPY_CTK}"
    if got != [1.0, 3.0, 5.0, 7.0]:
        return f"CuPy's probe kernel computed {got} instead of [1, 3, 5, 7]"
    return None


def sampler_arrays(mode: str | None, provider: str, backend: str = "onnx") -> Any:
    """The array module (numpy or cupy) for the sampler math; CuPy is probed only when it could
    be chosen, so CPU runs never import it. Under auto, an installed CuPy that does not work
    falls back to NumPy with one warning line (a missing one silently: CuPy is optional)."""
    probe = (mode or "auto") != "numpy" and provider in ("cuda", "tensorrt") and backend != "torch"
    problem = cupy_problem() if probe else None
    if choose_arrays(mode, provider, problem, backend) == "cupy":
        import cupy
        return cupy
    if problem and problem != CUPY_MISSING:
        warnings.warn(f"--arrays auto: {problem}; the sampler math runs on NumPy", GpuFallbackWarning,
                      stacklevel=2)
    return np


def _first_line(error: BaseException | str, width: int = 200) -> str:
    return (" ".join(str(error).split()) or type(error).__name__)[:width]


def session_io_types(session: Any) -> dict[str, Any]:
    """name -> numpy dtype of every graph input and output (fp16 graphs may declare fp16 I/O)."""
    out = {}
    for arg in [*session.get_inputs(), *session.get_outputs()]:
        if arg.type not in ORT_NUMPY_TYPES:
            raise CxrError(f"input/output {arg.name!r} has type {arg.type}, which cxr-ddpm does not feed")
        out[arg.name] = ORT_NUMPY_TYPES[arg.type]
    return out


def warn_fallback(what: str, error: BaseException | str) -> None:
    warnings.warn(f"{what}; running without CUDA graphs ({_first_line(error)})", GpuFallbackWarning,
                  stacklevel=3)


def sync_cupy() -> None:
    """Wait for CuPy's queued work (it writes the inputs ORT is about to read on another stream)."""
    import cupy
    cupy.cuda.get_current_stream().synchronize()


class _Slot:
    """One batch size: device buffers bound once, its own IO binding and graph id."""

    def __init__(self, session: Any, feeds: dict[str, Any], out_dtype: Any, graph_id: int,
                 on_device: bool, device: str) -> None:
        import onnxruntime as ort
        self.on_device, self.runs, self.cpu = on_device, 0, device == "cpu"
        self.binding = session.io_binding()
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        shape = tuple(feeds["x"].shape)
        if on_device:                  # CuPy buffers, bound by pointer
            import cupy
            self.inputs = {k: cupy.empty(v.shape, v.dtype) for k, v in feeds.items()}
            self.out = cupy.empty(shape, out_dtype)
            for k, buf in self.inputs.items():
                self.binding.bind_input(k, "cuda", 0, buf.dtype.type, list(buf.shape), buf.data.ptr)
            self.binding.bind_output("out", "cuda", 0, self.out.dtype.type, list(shape), self.out.data.ptr)
        else:                          # NumPy callers: ORT-owned device buffers, update_inplace
            ov = ort.OrtValue.ortvalue_from_shape_and_type
            self.inputs = {k: ov(list(v.shape), v.dtype.type, device, 0) for k, v in feeds.items()}
            self.out = ov(list(shape), out_dtype, device, 0)
            for k, val in self.inputs.items():
                self.binding.bind_ortvalue_input(k, val)
            self.binding.bind_ortvalue_output("out", self.out)

    def load(self, feeds: dict[str, Any]) -> None:
        for k, arr in feeds.items():
            if self.on_device:
                self.inputs[k][...] = arr             # device-to-device on CuPy's stream
            else:
                self.inputs[k].update_inplace(arr)    # host-to-device, synchronous

    def result(self) -> Any:
        if self.on_device:
            return self.out.copy()
        out = self.out.numpy()          # a fresh host copy of a CUDA value; a view of a CPU one
        return out.copy() if self.cpu else out


class GraphRunner:
    """`run(feeds) -> out` through ORT CUDA graphs, one captured graph per input shape.

    `feeds` hold arrays of the session's declared dtypes, all NumPy or all CuPy. Raises
    `CaptureFailed` when a graph's warm-up or capture runs fail (the caller falls back).
    """

    def __init__(self, session: Any, out_dtype: Any = np.float32, device: str = "cuda") -> None:
        self.session, self.out_dtype, self.device = session, out_dtype, device  # device: cpu in tests
        self.slots: dict[tuple[Any, ...], _Slot] = {}

    def __call__(self, feeds: dict[str, Any]) -> Any:
        on_device = not isinstance(feeds["x"], np.ndarray)
        key = (on_device, *((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(feeds.items())))
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = _Slot(self.session, feeds, self.out_dtype, len(self.slots) + 1,
                                           on_device, self.device)
        slot.load(feeds)
        if on_device:
            sync_cupy()
        try:
            self.session.run_with_iobinding(slot.binding, slot.run_options)
        except Exception as e:  # ORT raises its own Fail/RuntimeException types
            if slot.runs < CAPTURE_RUNS:
                raise CaptureFailed(str(e)) from e
            raise
        slot.runs += 1
        return slot.result()


class CaptureFailed(RuntimeError):
    """A CUDA graph could not be set up (warm-up or capture run failed)."""
