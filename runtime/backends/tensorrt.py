"""Run a cxr-ddpm TensorRT engine file: header check, deserialize, fixed buffers, optional CUDA graph.

Torch-free: device memory and streams come from cuda-python >= 13 (`cuda.bindings.runtime`;
the old `from cuda import cudart` is gone in 13.x). TensorRT and cuda-python are imported lazily, so this
module imports fine on machines without them and only `TrtEngine(...)` fails,
with one line saying how to install them.

    with TrtEngine("unet.engine", onnx_sha256=None) as eng:
        out = eng.infer({"x": x, "t": t})["out"]          # numpy in -> numpy out

Every TensorRT and CUDA call goes through one `GpuLibs` (the two modules); tests pass stand-ins
for both, so the bookkeeping (shapes, buffers, copies, graph decisions) runs on CPU too.

The lifecycle follows NVIDIA's Python samples (TensorRT 10/11 name-based I/O API):
Runtime.deserialize_cuda_engine -> create_execution_context -> set_input_shape /
set_tensor_address per tensor -> execute_async_v3(stream).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.engine_file import check_engine_compat, read_engine
from ..errors import CxrError
from .gpu_driver import check_driver
from .ort_cuda import warn_fallback

INSTALL_HINT = "pip install 'cxr-ddpm[gpu]'"


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise CxrError(f"TensorRT is not installed: {INSTALL_HINT}") from None
    return tensorrt


@functools.cache
def import_cudart() -> Any:
    """cuda.bindings.runtime (cuda-python >= 12.6; 13.x dropped `from cuda import cudart`), after the
    driver check: cuda-bindings N.x needs a CUDA N driver."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise CxrError(f"cuda-python is not installed (>= 13 needed): {INSTALL_HINT}") from None
    check_driver(_cuda_bindings_version(), "cuda-python")
    return cudart


def _cuda_bindings_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("cuda-bindings")
    except PackageNotFoundError:
        return None


@dataclass(frozen=True)
class GpuLibs:
    """The libraries TrtEngine calls: the `tensorrt` module and `cuda.bindings.runtime`."""
    trt: Any
    cudart: Any


def gpu_libs() -> GpuLibs:
    """The real ones; TensorRT first, so a machine without it gets that install line."""
    trt = import_tensorrt()
    return GpuLibs(trt, import_cudart())


def cuda_call(result: Any, cudart: Any = None) -> Any:
    """cuda-python returns (err, *values): raise on error, unwrap the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    cudart = cudart or import_cudart()
    if err != cudart.cudaError_t.cudaSuccess:
        raise CxrError(f"CUDA error {_error_name(cudart, err)}")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def _error_name(cudart: Any, err: Any) -> str:
    _, name = cudart.cudaGetErrorName(err)
    return name.decode() if isinstance(name, bytes) else str(name)


def gpu_info(device: int = 0, cudart: Any = None) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of `device`."""
    cudart = cudart or import_cudart()
    count = cuda_call(cudart.cudaGetDeviceCount(), cudart)
    if count <= device:
        raise CxrError(f"no CUDA GPU {device} (found {count})")
    prop = cuda_call(cudart.cudaGetDeviceProperties(device), cudart)
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"


def shape_problem(source: str, batch: int, set_ok: dict[str, bool],
                  out_shapes: dict[str, tuple[int, ...]]) -> str | None:
    """One line when TensorRT refused an input shape or left an output dim unresolved (-1):
    sizing a buffer from a -1 dim would allocate a byte and let TensorRT write past it."""
    bad_in = [n for n, ok in set_ok.items() if not ok]
    if bad_in:
        return f"{source}: TensorRT refused the input shape(s) of {', '.join(bad_in)} at batch {batch}"
    bad_out = [f"{n}{list(s)}" for n, s in out_shapes.items() if any(d < 0 for d in s)]
    if bad_out:
        return f"{source}: TensorRT left output shape(s) unresolved at batch {batch}: {', '.join(bad_out)}"
    return None


def capture_decision(enqueue_ok: bool, end_capture_error: str) -> str:
    """What to do after cudaStreamEndCapture, as trtexec's TrtCudaGraph::endCaptureOnError does:
    "use" the graph; "discard" it (captured, but the enqueue inside failed: destroy, run plain);
    "fallback" (capture invalidated, no graph: clear the error, run plain); "error" (a CUDA error
    that is not about capture: raise)."""
    if end_capture_error == "cudaErrorStreamCaptureInvalidated":
        return "fallback"
    if end_capture_error != "cudaSuccess":
        return "error"
    return "use" if enqueue_ok else "discard"


def warmup_inputs(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype],
                  null_class: int | None) -> dict[str, np.ndarray]:
    """Valid inputs for the plain enqueue before graph capture. The buffers are fresh cudaMalloc
    memory, and a garbage int64 `class` would index the class embedding out of bounds: zeros
    everywhere (t = 0, no self-conditioning estimate), the null class (else 0) for `class`."""
    fill = {"class": null_class or 0}
    return {n: np.full(s, fill.get(n, 0), dtype=dtypes[n]) for n, s in shapes.items()}


class TrtEngine:
    """One engine, one execution context, one stream; buffers sized for the current batch."""

    def __init__(self, path: str | Path, *, onnx_sha256: str | None = None, device: int = 0,
                 header: tuple[dict[str, Any], int] | None = None, libs: GpuLibs | None = None) -> None:
        """header: (metadata, plan offset) when the caller already read it (read_engine_header);
        libs: the TensorRT and CUDA modules (default: the installed ones)."""
        libs = libs or gpu_libs()
        trt, self._cudart = libs.trt, libs.cudart
        self.path = Path(path)
        self.meta, plan = read_engine(path, header)
        self._check(self._cudart.cudaSetDevice(device))
        name, cc = gpu_info(device, self._cudart)
        check_engine_compat(self.meta, trt_version=trt.__version__, gpu_name=name, compute_capability=cc,
                            onnx_sha256=onnx_sha256, source=str(path))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise CxrError(f"{path}: TensorRT could not deserialize the plan (see the log above)")
        self._context = self._engine.create_execution_context()
        self._stream = self._check(self._cudart.cudaStreamCreate())
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self._dtypes: dict[str, np.dtype] = {}
        for i in range(self._engine.num_io_tensors):
            tname = self._engine.get_tensor_name(i)
            is_input = self._engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(tname)
            self._dtypes[tname] = np.dtype(trt.nptype(self._engine.get_tensor_dtype(tname)))
        profile = self.meta["tensorrt"]["profile"]
        self.min_batch, self.max_batch = int(profile["min"]), int(profile["max"])
        self._buffers: dict[str, tuple[int, int]] = {}      # name -> (device pointer, nbytes)
        self._in_shapes: dict[str, tuple[int, ...]] = {}
        self._host_out: dict[str, np.ndarray] = {}     # views of pinned host memory
        self._host_ptrs: list[int] = []
        self._batch: int | None = None
        self._graph_exec: Any = None
        self._graph_failed = False

    # -- buffers ---------------------------------------------------------------
    def allocate(self, batch: int) -> None:
        """Set the input shapes for `batch` and (re)allocate every I/O buffer."""
        if not self.min_batch <= batch <= self.max_batch:
            raise CxrError(f"{self.path}: batch {batch} is outside the engine's profile "
                           f"{self.min_batch}..{self.max_batch}; rebuild with --batch")
        self._free_buffers()
        shapes = {n: tuple(batch if d < 0 else d for d in self._engine.get_tensor_shape(n)) for n in self.inputs}
        set_ok = {n: bool(self._context.set_input_shape(n, s)) for n, s in shapes.items()}
        out_shapes = {n: tuple(self._context.get_tensor_shape(n)) for n in self.outputs}
        problem = shape_problem(str(self.path), batch, set_ok, out_shapes)
        if problem:
            raise CxrError(problem)
        for name, shape in {**shapes, **out_shapes}.items():
            self._alloc(name, shape)
        for name, shape in out_shapes.items():
            self._host_out[name] = self._pinned(shape, self._dtypes[name])
        self._in_shapes, self._batch = shapes, batch

    def _pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Page-locked host buffer (cudaMallocHost) so the device->host copy is truly asynchronous."""
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        ptr = int(self._check(self._cudart.cudaMallocHost(nbytes)))
        self._host_ptrs.append(ptr)
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        return np.frombuffer(memoryview(raw), dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def _alloc(self, name: str, shape: tuple[int, ...]) -> None:
        nbytes = int(np.prod(shape)) * self._dtypes[name].itemsize
        ptr = self._check(self._cudart.cudaMalloc(max(nbytes, 1)))
        self._buffers[name] = (int(ptr), nbytes)
        self._context.set_tensor_address(name, int(ptr))

    def _free_buffers(self) -> None:
        self._drop_graph()
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._host_out.clear()
        for ptr in self._host_ptrs:
            self._cudart.cudaFreeHost(ptr)
        self._host_ptrs.clear()
        self._buffers.clear()
        self._batch = None

    # -- CUDA graph ----------------------------------------------------------------
    def capture_graph(self, batch: int) -> bool:
        """Capture one enqueue as a CUDA graph: later infer() calls at this batch replay it.

        Our buffers are fixed, so the captured addresses stay valid; inputs are copied into
        them before the launch on the same stream. If capture fails, the error is cleared,
        whatever was made is destroyed and plain enqueue is used (said once), as trtexec does.
        Returns whether a graph is in use.
        """
        cudart = self._cudart
        if self._batch != batch:
            self.allocate(batch)
        self._drop_graph()
        if self._graph_failed:
            return False
        warm = warmup_inputs(self._in_shapes, self._dtypes, self.meta.get("null_class"))
        self._copy_in(warm, on_device=False)     # the buffers are fresh: no garbage class ids
        self._enqueue()                          # TensorRT wants one plain enqueue before capture
        self._check(cudart.cudaStreamSynchronize(self._stream))
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(cudart.cudaStreamBeginCapture(self._stream, mode))
        enqueue_ok = bool(self._context.execute_async_v3(self._stream))
        err, graph = cudart.cudaStreamEndCapture(self._stream)
        reason = _error_name(cudart, err)
        decision = capture_decision(enqueue_ok, reason)
        if decision == "error":
            self._check((err,))
        if decision == "use":
            err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
            cudart.cudaGraphDestroy(graph)
            if err == cudart.cudaError_t.cudaSuccess:
                self._graph_exec = graph_exec
                return True
            reason = f"instantiate: {_error_name(cudart, err)}"
        elif decision == "discard":              # "fallback": capture invalidated, no graph was made
            cudart.cudaGraphDestroy(graph)
            reason = "the enqueue failed while capturing"
        cudart.cudaGetLastError()                # clear the capture error
        self._graph_failed = True
        warn_fallback(f"{self.path}: TensorRT CUDA graph capture failed", reason)   # one line, as ORT's
        return False

    def _drop_graph(self) -> None:
        if self._graph_exec is not None:
            self._cudart.cudaGraphExecDestroy(self._graph_exec)
            self._graph_exec = None

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream):
            raise CxrError(f"{self.path}: TensorRT enqueue failed (see the log above)")

    # -- inference -------------------------------------------------------------------
    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run one batch. numpy in -> numpy out; CuPy in -> CuPy out (device copies only)."""
        cudart = self._cudart
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise CxrError(f"{self.path}: missing engine input(s) {', '.join(missing)}")
        batch = int(feeds[self.inputs[0]].shape[0])
        if batch != self._batch:
            self.allocate(batch)
        on_device = all(hasattr(feeds[n], "__cuda_array_interface__") for n in self.inputs)
        arrays = {}
        for name in self.inputs:
            arr = feeds[name]
            if on_device:
                arr = arr.astype(self._dtypes[name], copy=False)
                arrays[name] = arr if arr.flags.c_contiguous else arr.copy()
            else:
                arrays[name] = np.ascontiguousarray(arr, dtype=self._dtypes[name])
        if on_device:
            import cupy
            # the producers and the conversions above ran on CuPy's stream: finish them before
            # the engine's stream reads the memory
            cupy.cuda.get_current_stream().synchronize()
        self._copy_in(arrays, on_device)
        if self._graph_exec is not None:
            self._check(cudart.cudaGraphLaunch(self._graph_exec, self._stream))
        else:
            self._enqueue()
        out: dict[str, Any] = {}
        for name in self.outputs:
            ptr, nbytes = self._buffers[name]
            if on_device:
                import cupy
                dst = cupy.empty(self._host_out[name].shape, self._dtypes[name])
                self._check(cudart.cudaMemcpyAsync(dst.data.ptr, ptr, nbytes,
                                                   cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream))
                out[name] = dst
            else:
                host = self._host_out[name]
                self._check(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, nbytes,
                                                   cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        self._check(cudart.cudaStreamSynchronize(self._stream))
        if not on_device:
            out = {n: self._host_out[n].copy() for n in self.outputs}   # callers may keep them
        return out

    def _copy_in(self, arrays: dict[str, Any], on_device: bool) -> None:
        """Copy contiguous arrays of the engine's dtypes into the input buffers, on the engine's stream."""
        cudart = self._cudart
        for name in self.inputs:
            ptr, nbytes = self._buffers[name]
            arr = arrays[name]
            if on_device:
                src, kind = arr.data.ptr, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            else:
                src, kind = arr.ctypes.data, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            if arr.nbytes != nbytes:
                raise CxrError(f"{self.path}: input '{name}' has shape {tuple(arr.shape)}, the engine "
                               f"expects {nbytes // self._dtypes[name].itemsize} elements at batch {self._batch}")
            self._check(cudart.cudaMemcpyAsync(ptr, src, nbytes, kind, self._stream))

    def _check(self, result: Any) -> Any:
        return cuda_call(result, self._cudart)

    def close(self) -> None:
        if getattr(self, "_stream", None) is None:
            return
        self._free_buffers()
        self._cudart.cudaStreamDestroy(self._stream)
        self._stream = None
        self._context = self._engine = self._runtime = None

    def __enter__(self) -> "TrtEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
