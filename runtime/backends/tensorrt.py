"""Run a cxr-ddpm TensorRT engine file: header check, deserialize, fixed buffers, optional CUDA graph.

Torch-free: device memory and streams come from cuda-python (`cuda.bindings.runtime`,
or the older `cuda.cudart`). TensorRT and cuda-python are imported lazily, so this
module imports fine on machines without them and only `TrtEngine(...)` fails,
with one line saying how to install them.

    with TrtEngine("unet.engine", onnx_sha256=None) as eng:
        out = eng.infer({"x": x, "t": t})["out"]          # numpy in -> numpy out

The lifecycle follows NVIDIA's Python samples (TensorRT 10/11 name-based I/O API):
Runtime.deserialize_cuda_engine -> create_execution_context -> set_input_shape /
set_tensor_address per tensor -> execute_async_v3(stream).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..engine_file import check_engine_compat, read_engine
from ..errors import CxrError

INSTALL_HINT = "pip install 'cxr-ddpm[gpu]'"


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise CxrError(f"TensorRT is not installed: {INSTALL_HINT}") from None
    return tensorrt


def import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise CxrError(f"cuda-python is not installed: {INSTALL_HINT}") from None
    return cudart


def cuda_call(result: Any) -> Any:
    """cuda-python returns (err, *values): raise on error, unwrap the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    cudart = import_cudart()
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise CxrError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def gpu_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of `device`."""
    cudart = import_cudart()
    count = cuda_call(cudart.cudaGetDeviceCount())
    if count <= device:
        raise CxrError(f"no CUDA GPU {device} (found {count})")
    prop = cuda_call(cudart.cudaGetDeviceProperties(device))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"


class TrtEngine:
    """One engine, one execution context, one stream; buffers sized for the current batch."""

    def __init__(self, path: str | Path, *, onnx_sha256: str | None = None, device: int = 0) -> None:
        trt = import_tensorrt()
        self._cudart = import_cudart()
        self.path = Path(path)
        self.meta, plan = read_engine(path)
        cuda_call(self._cudart.cudaSetDevice(device))
        name, cc = gpu_info(device)
        check_engine_compat(self.meta, trt_version=trt.__version__, gpu_name=name, compute_capability=cc,
                            onnx_sha256=onnx_sha256, source=str(path))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise CxrError(f"{path}: TensorRT could not deserialize the plan (see the log above)")
        self._context = self._engine.create_execution_context()
        self._stream = cuda_call(self._cudart.cudaStreamCreate())
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
        self._host_out: dict[str, np.ndarray] = {}
        self._batch: int | None = None
        self._graph_exec: Any = None

    # -- buffers ---------------------------------------------------------------
    def allocate(self, batch: int) -> None:
        """Set the input shapes for `batch` and (re)allocate every I/O buffer."""
        if not self.min_batch <= batch <= self.max_batch:
            raise CxrError(f"{self.path}: batch {batch} is outside the engine's profile "
                           f"{self.min_batch}..{self.max_batch}; rebuild with --batch")
        self._free_buffers()
        for name in self.inputs:
            shape = tuple(batch if d < 0 else d for d in self._engine.get_tensor_shape(name))
            self._context.set_input_shape(name, shape)
            self._alloc(name, shape)
        for name in self.outputs:                # output shapes follow from the input shapes
            shape = tuple(self._context.get_tensor_shape(name))
            self._alloc(name, shape)
            self._host_out[name] = np.empty(shape, self._dtypes[name])
        self._batch = batch

    def _alloc(self, name: str, shape: tuple[int, ...]) -> None:
        nbytes = int(np.prod(shape)) * self._dtypes[name].itemsize
        ptr = cuda_call(self._cudart.cudaMalloc(max(nbytes, 1)))
        self._buffers[name] = (int(ptr), nbytes)
        self._context.set_tensor_address(name, int(ptr))

    def _free_buffers(self) -> None:
        self._drop_graph()
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        self._host_out.clear()
        self._batch = None

    # -- CUDA graph ----------------------------------------------------------------
    def capture_graph(self, batch: int) -> None:
        """Capture one enqueue as a CUDA graph: later infer() calls at this batch replay it.

        Our buffers are fixed, so the captured addresses stay valid; inputs are
        copied into them before the launch on the same stream.
        """
        cudart = self._cudart
        self.allocate(batch)
        self._enqueue()                          # TensorRT wants one plain enqueue before capture
        cuda_call(cudart.cudaStreamSynchronize(self._stream))
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_call(cudart.cudaStreamBeginCapture(self._stream, mode))
        try:
            self._enqueue()
        finally:
            graph = cuda_call(cudart.cudaStreamEndCapture(self._stream))
        self._graph_exec = cuda_call(cudart.cudaGraphInstantiate(graph, 0))
        cuda_call(cudart.cudaGraphDestroy(graph))

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
        if on_device:
            import cupy
            cupy.cuda.get_current_stream().synchronize()   # producer kernels ran on CuPy's stream
        for name in self.inputs:
            ptr, nbytes = self._buffers[name]
            arr = feeds[name]
            if on_device:
                arr = arr.astype(self._dtypes[name], copy=False)
                arr = arr if arr.flags.c_contiguous else arr.copy()
                src, kind = arr.data.ptr, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            else:
                arr = np.ascontiguousarray(arr, dtype=self._dtypes[name])
                src, kind = arr.ctypes.data, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            if arr.nbytes != nbytes:
                raise CxrError(f"{self.path}: input '{name}' has shape {tuple(arr.shape)}, the engine "
                               f"expects {nbytes // self._dtypes[name].itemsize} elements at batch {batch}")
            cuda_call(cudart.cudaMemcpyAsync(ptr, src, nbytes, kind, self._stream))
        if self._graph_exec is not None:
            cuda_call(cudart.cudaGraphLaunch(self._graph_exec, self._stream))
        else:
            self._enqueue()
        out: dict[str, Any] = {}
        for name in self.outputs:
            ptr, nbytes = self._buffers[name]
            if on_device:
                import cupy
                dst = cupy.empty(self._host_out[name].shape, self._dtypes[name])
                cuda_call(cudart.cudaMemcpyAsync(dst.data.ptr, ptr, nbytes,
                                                 cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream))
                out[name] = dst
            else:
                host = self._host_out[name]
                cuda_call(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, nbytes,
                                                 cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        cuda_call(cudart.cudaStreamSynchronize(self._stream))
        if not on_device:
            out = {n: self._host_out[n].copy() for n in self.outputs}   # callers may keep them
        return out

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
