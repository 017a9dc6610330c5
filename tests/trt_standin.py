"""Stand-ins for `tensorrt` and `cuda.bindings.runtime`, for running TrtEngine's bookkeeping on CPU.

Only the calls TrtEngine makes, with the libraries' conventions (cuda-python's (err, *values)
returns and cudaError_t names; TensorRT's name-based I/O API). "Device" memory is host memory
filled with 0xFF, as fresh cudaMalloc memory holds garbage; copies are memmove; a capturing
stream records the enqueue instead of running it and a graph launch replays it. The stand-in
execution context computes out = x/2 + t/100 + class + x_self_cond/4 from the bound addresses
and, like an embedding lookup, fails on a class id or timestep out of range. The plan is JSON:
{"io": io_spec, "timesteps": T, "num_classes": K}.
"""
from __future__ import annotations

import ctypes
import enum
import json
from types import SimpleNamespace
from typing import Any

import numpy as np

GPU, CC, TRT_VERSION = "NVIDIA H100 80GB HBM3", (9, 0), "10.13.0.35"


class Err(enum.Enum):                               # names as in cuda.bindings.runtime.cudaError_t
    cudaSuccess = 0
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureInvalidated = 901


class FakeCudart:
    """The part of cuda.bindings.runtime that TrtEngine calls, with cuda-python's (err, *values) returns."""
    cudaError_t = Err
    cudaMemcpyKind = enum.Enum("cudaMemcpyKind", "cudaMemcpyHostToDevice cudaMemcpyDeviceToHost "
                                                 "cudaMemcpyDeviceToDevice")
    cudaStreamCaptureMode = enum.Enum("cudaStreamCaptureMode", "cudaStreamCaptureModeThreadLocal")

    def __init__(self, gpu: str = GPU, cc: tuple[int, int] = CC, end_capture: Err = Err.cudaSuccess) -> None:
        self.gpu, self.cc, self.end_capture = gpu, cc, end_capture
        self.device: dict[int, Any] = {}            # live "device" allocations by address
        self.host: dict[int, Any] = {}              # live pinned host allocations
        self.mallocs = self.host_mallocs = self.launches = 0
        self.graphs_live = 0
        self.streams_live = 0

    def _mem(self, n: int, table: dict[int, Any]) -> tuple[Err, int]:
        buf = (ctypes.c_ubyte * n)()
        ctypes.memset(buf, 0xFF, n)                 # uninitialised memory: int64 -1, float NaN
        table[ctypes.addressof(buf)] = buf
        return Err.cudaSuccess, ctypes.addressof(buf)

    def cudaGetErrorName(self, err: Err) -> tuple[Err, bytes]:
        return Err.cudaSuccess, err.name.encode()

    def cudaSetDevice(self, device: int) -> tuple[Err]:
        return (Err.cudaSuccess,)

    def cudaGetDeviceCount(self) -> tuple[Err, int]:
        return Err.cudaSuccess, 1

    def cudaGetDeviceProperties(self, device: int) -> tuple[Err, Any]:
        return Err.cudaSuccess, SimpleNamespace(name=self.gpu.encode() + b"\x00" * 4, major=self.cc[0],
                                                minor=self.cc[1])

    def cudaStreamCreate(self) -> tuple[Err, Any]:
        self.streams_live += 1
        return Err.cudaSuccess, SimpleNamespace(capture=None)

    def cudaStreamDestroy(self, stream: Any) -> tuple[Err]:
        self.streams_live -= 1
        return (Err.cudaSuccess,)

    def cudaMalloc(self, n: int) -> tuple[Err, int]:
        self.mallocs += 1
        return self._mem(n, self.device)

    def cudaFree(self, ptr: int) -> tuple[Err]:
        del self.device[ptr]
        return (Err.cudaSuccess,)

    def cudaMallocHost(self, n: int) -> tuple[Err, int]:
        self.host_mallocs += 1
        return self._mem(n, self.host)

    def cudaFreeHost(self, ptr: int) -> tuple[Err]:
        del self.host[ptr]
        return (Err.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: Any, stream: Any) -> tuple[Err]:
        to_device = kind.name.endswith("ToDevice")
        assert dst in (self.device if to_device else self.host), "copy into memory that is not allocated"
        ctypes.memmove(dst, src, n)
        return (Err.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[Err]:
        return (Err.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream: Any, mode: Any) -> tuple[Err]:
        stream.capture = []
        return (Err.cudaSuccess,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[Err, Any]:
        ops, stream.capture = stream.capture, None
        if self.end_capture != Err.cudaSuccess:
            return self.end_capture, None
        self.graphs_live += 1
        return Err.cudaSuccess, SimpleNamespace(ops=ops)

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[Err, Any]:
        self.graphs_live += 1
        return Err.cudaSuccess, SimpleNamespace(ops=list(graph.ops))

    def cudaGraphDestroy(self, graph: Any) -> tuple[Err]:
        self.graphs_live -= 1
        return (Err.cudaSuccess,)

    def cudaGraphExecDestroy(self, graph_exec: Any) -> tuple[Err]:
        self.graphs_live -= 1
        return (Err.cudaSuccess,)

    def cudaGraphLaunch(self, graph_exec: Any, stream: Any) -> tuple[Err]:
        self.launches += 1
        for op in graph_exec.ops:                   # replay: reads the buffers as they are now
            op()
        return (Err.cudaSuccess,)

    def cudaGetLastError(self) -> tuple[Err]:
        return (Err.cudaSuccess,)


def _view(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_ubyte * n).from_address(ptr), dtype=dtype).reshape(shape)


class FakeContext:
    def __init__(self, engine: "FakeEngine") -> None:
        self.engine, self.shapes, self.addr = engine, {}, {}
        self.set_shapes: list[tuple[str, tuple[int, ...]]] = []
        self.seen: list[dict[str, np.ndarray]] = []      # the inputs of every executed enqueue

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.set_shapes.append((name, tuple(shape)))
        if name in self.engine.trt.refuse:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.trt.unresolved:
            return self.engine.get_tensor_shape(name)
        return self.shapes.get("x", self.engine.get_tensor_shape(name))

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addr[name] = ptr

    def execute_async_v3(self, stream: Any) -> bool:
        if stream.capture is not None:               # captured, not run
            stream.capture.append(self._run)
            return not self.engine.trt.fail_in_capture
        return self._run()

    def _run(self) -> bool:
        e = self.engine
        got = {n: _view(self.addr[n], self.shapes[n], e.dtype[n]).copy() for n in e.inputs}
        self.seen.append(got)
        if not (0 <= got["t"]).all() or not (got["t"] < e.timesteps).all():
            return False
        out = got["x"] / 2 + got["t"][:, None, None, None] / 100
        if "class" in got:
            if not ((0 <= got["class"]) & (got["class"] <= e.num_classes)).all():
                return False                          # the embedding gather would read out of bounds
            out = out + got["class"][:, None, None, None]
        if "x_self_cond" in got:
            out = out + got["x_self_cond"] / 4
        _view(self.addr["out"], self.shapes["x"], e.dtype["out"])[...] = out
        return True


class FakeEngine:
    def __init__(self, trt: "FakeTrt", plan: dict[str, Any]) -> None:
        self.trt, self.timesteps, self.num_classes = trt, plan["timesteps"], plan["num_classes"]
        specs = plan["io"]["inputs"] + plan["io"]["outputs"]
        self.inputs = [s["name"] for s in plan["io"]["inputs"]]
        self.names = [s["name"] for s in specs]
        self.dtype = {s["name"]: np.dtype(s["dtype"]) for s in specs}
        self.shape = {s["name"]: tuple(-1 if d == "B" else d for d in s["shape"]) for s in specs}
        self.num_io_tensors = len(specs)
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> Any:
        return FakeTrt.TensorIOMode.INPUT if name in self.inputs else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return self.dtype[name]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shape[name]

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeTrt:
    """The part of the tensorrt module that TrtEngine calls."""
    __version__ = TRT_VERSION
    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")

    def __init__(self, refuse: tuple[str, ...] = (), unresolved: bool = False,
                 fail_in_capture: bool = False) -> None:
        self.refuse, self.unresolved, self.fail_in_capture = refuse, unresolved, fail_in_capture
        self.engines: list[FakeEngine] = []

    @staticmethod
    def nptype(dtype: Any) -> Any:
        return dtype

    def Runtime(self, logger: Any) -> Any:
        def deserialize(plan: bytes) -> FakeEngine:
            self.engines.append(FakeEngine(self, json.loads(plan)))
            return self.engines[-1]
        return SimpleNamespace(deserialize_cuda_engine=deserialize)

    @property
    def context(self) -> FakeContext:
        return self.engines[-1].contexts[-1]
