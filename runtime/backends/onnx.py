"""ONNX Runtime backend: an exported U-Net as a `denoise(x, t)` callable, torch-free.

Session settings were chosen by measurement (`python -m bench denoiser`, its ORT
settings table): full graph optimisation, intra-op threads = the CPU allowance (ORT's default spins one thread per core and ignores
cgroup/affinity limits), sequential execution, memory pattern on (shapes repeat
every step). The CUDA provider uses IO binding so CuPy arrays are bound by device
pointer and never copied through the host; CUDA graphs and the CuPy/ORT stream handshake live in
`ort_cuda.py`.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import CxrError
from ..fsutil import file_sha256
from ..interface import model_inputs
from ..metadata import METADATA_KEY, read_metadata
from ..system import cpu_allowance
from . import ort_cuda

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
_OPT_LEVELS = ("disable", "basic", "extended", "all")


def available_providers() -> list[str]:
    import onnxruntime as ort
    names = {v: k for k, v in PROVIDERS.items()}
    return [names[p] for p in ort.get_available_providers() if p in names]


def provider_problem(requested: str, session_providers: list[str], load_error: str | None = None) -> str | None:
    """None when the session runs on `requested`; else the one-line refusal.

    ORT falls back to CPU when a listed provider cannot load (missing CUDA/cuDNN
    libraries) and says so only in its log, which session_options silences.
    """
    want = PROVIDERS[requested]
    if session_providers and session_providers[0] == want:
        return None
    got = session_providers[0] if session_providers else "no provider"
    why = f" ({load_error})" if load_error else ""
    return (f"--provider {requested}: onnxruntime could not load {want} and would run on {got}"
            f"{why}; install the CUDA 13 / cuDNN 9 libraries that onnxruntime-gpu needs (see README, GPU)")


def provider_load_error(requested: str) -> str | None:
    """Why ORT's provider library does not load: dlopen it as ORT does; the loader names the first
    missing library (e.g. 'libcudnn.so.9: cannot open shared object file'). None if it loads."""
    import ctypes
    import onnxruntime as ort
    lib = Path(ort.__file__).parent / "capi" / f"libonnxruntime_providers_{requested}.so"
    if not lib.is_file():
        return None
    try:
        ctypes.CDLL(str(lib))
    except OSError as e:
        return " ".join(str(e).split())[:200]
    return None


def preload_gpu_libraries() -> None:
    """Driver check (one line if too old for this onnxruntime-gpu's CUDA), then, on onnxruntime
    >= 1.21, load the pip-installed CUDA/cuDNN (nvidia-* wheels) before the session."""
    import onnxruntime as ort
    from onnxruntime.capi import build_and_package_info as build

    from .gpu_driver import check_driver
    check_driver(getattr(build, "cuda_version", None), f"onnxruntime-gpu {ort.__version__}")
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls(cuda=True, cudnn=True, msvc=False)
        except Exception:  # noqa: BLE001 - best effort; the provider check below has the last word
            pass


def check_session_provider(session: Any, requested: str, source: str) -> None:
    """Refuse (one line) a session that silently fell back from the requested provider."""
    problem = provider_problem(requested, list(session.get_providers()))
    if problem:
        problem = provider_problem(requested, list(session.get_providers()), provider_load_error(requested))
        raise CxrError(f"{source}: {problem}")


def session_options(*, threads: int | None = None, opt_level: str = "all",
                    mem_pattern: bool = True) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[opt_level]
    so.intra_op_num_threads = int(threads) if threads else cpu_allowance()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_mem_pattern = mem_pattern
    so.log_severity_level = 3                     # ORT warnings are not the user's problem
    return so


GPU_SWAP = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.31'"


def installed_ort_packages() -> set[str]:
    from importlib.metadata import PackageNotFoundError, version
    found = set()
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            version(name)
            found.add(name)
        except PackageNotFoundError:
            pass
    return found


def gpu_install_hint(installed: set[str]) -> str:
    """What to do when the CUDA provider is missing. onnxruntime and onnxruntime-gpu install
    the same `onnxruntime` module; with both, whichever was installed last owns the files."""
    if {"onnxruntime", "onnxruntime-gpu"} <= installed:
        return f"both onnxruntime and onnxruntime-gpu are installed and the CPU build won: {GPU_SWAP}"
    return f"for cuda/tensorrt install the GPU build: pip install 'cxr-ddpm[gpu]', then {GPU_SWAP}"


class OrtDenoiser:
    """Exported U-Net in an ONNX Runtime session; `__call__` returns the raw model output."""

    backend = "onnx"

    def __init__(self, path: str | Path, *, provider: str = "cpu", threads: int | None = None,
                 opt_level: str = "all", mem_pattern: bool = True, cuda_graph: str | None = None) -> None:
        import onnxruntime as ort
        self.path = Path(path)
        if provider not in PROVIDERS:
            raise CxrError(f"--provider {provider!r} is unknown (valid: {', '.join(PROVIDERS)})")
        have = available_providers()
        if provider not in have:
            raise CxrError(f"--provider {provider}: not available in this onnxruntime "
                           f"(available: {', '.join(have)}); " + gpu_install_hint(installed_ort_packages()))
        self.cuda_graph = ort_cuda.resolve_cuda_graph(cuda_graph, provider)
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        so = session_options(threads=threads, opt_level=opt_level, mem_pattern=mem_pattern)
        if provider != "cpu":
            preload_gpu_libraries()
        try:
            self.session = self._open(providers, so)
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
            first = " ".join(str(e).split())[:160]
            raise CxrError(f"{self.path}: not a loadable ONNX model ({first})") from None
        check_session_provider(self.session, provider, str(self.path))
        text = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        info = read_metadata(text, str(self.path))           # parsed and checked once
        self.meta: dict[str, Any] = info.meta
        self.config: Config = info.config
        self.schedule = info.schedule
        self.provider = provider
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = {"x", "t"} - set(self.input_names)
        if missing or [o.name for o in self.session.get_outputs()] != ["out"]:
            raise CxrError(f"{self.path}: inputs {self.input_names} / outputs do not follow the "
                           f"cxr-ddpm denoiser interface (x, t[, x_self_cond][, class] -> out)")
        self.self_condition = "x_self_cond" in self.input_names
        self.null_class = self.meta.get("null_class")
        self._binding = provider != "cpu"
        self.io_types = ort_cuda.session_io_types(self.session)
        self._graphs = ort_cuda.GraphRunner(self.session, self.io_types["out"]) if self.cuda_graph else None

    def _open(self, providers: list[Any], so: Any) -> Any:
        """The session; with CUDA graphs when asked and ORT accepts them (else one warning)."""
        import onnxruntime as ort
        self._reopen = (providers, so)
        if self.cuda_graph:
            try:
                return ort.InferenceSession(str(self.path), sess_options=so,
                                            providers=[ort_cuda.cuda_provider(True), *providers[1:]])
            except Exception as e:  # e.g. "cannot use the graph capture feature": a node off CUDA
                session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
                self.cuda_graph = False                # only now: a broken file is not a graph problem
                ort_cuda.warn_fallback(f"{self.path}: ONNX Runtime refused CUDA graphs for this model", e)
                return session
        return ort.InferenceSession(str(self.path), sess_options=so, providers=providers)

    def feeds(self, x: Any, t: Any, x_self_cond: Any = None, classes: Any = None) -> dict[str, Any]:
        feeds = model_inputs(self.input_names, x, t, x_self_cond, classes, self.null_class)
        for name, dtype in self.io_types.items():      # fp16 graphs may declare fp16 I/O
            if name in feeds and feeds[name].dtype != dtype:
                feeds[name] = feeds[name].astype(dtype)
        return feeds

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the artifact file, read once, when a record first needs it."""
        return file_sha256(self.path)

    def __call__(self, x: Any, t: Any, x_self_cond: Any = None, classes: Any = None) -> Any:
        feeds = self.feeds(x, t, x_self_cond, classes)
        if not self._binding:
            out = self.session.run(["out"], feeds)[0]
        elif self._graphs is not None:
            try:
                out = self._graphs(feeds)
            except ort_cuda.CaptureFailed as e:       # plain CUDA runs from here on
                self._graphs, self.cuda_graph = None, False
                ort_cuda.warn_fallback(f"{self.path}: CUDA graph capture failed", e)
                self.session = self._open(*self._reopen)
                out = self._run_bound(feeds)
        else:
            out = self._run_bound(feeds)
        return out if out.dtype == np.float32 else out.astype(np.float32)   # sampler math is fp32

    def _run_bound(self, feeds: dict[str, Any]) -> Any:
        """IO binding on the GPU: CuPy inputs by pointer, output left on the device for CuPy."""
        binding = self.session.io_binding()
        on_device = not isinstance(feeds["x"], np.ndarray)
        for name, arr in feeds.items():
            if on_device:
                binding.bind_input(name, "cuda", 0, arr.dtype.type, list(arr.shape), arr.data.ptr)
            else:
                binding.bind_cpu_input(name, arr)
        if on_device:
            cp = _cupy()
            out = cp.empty(feeds["x"].shape, dtype=self.io_types["out"])
            binding.bind_output("out", "cuda", 0, out.dtype.type, list(out.shape), out.data.ptr)
            ort_cuda.sync_cupy()                       # CuPy wrote x on its own stream
            self.session.run_with_iobinding(binding)
            return out
        binding.bind_output("out", "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def _cupy() -> Any:
    import cupy
    return cupy
