"""ONNX Runtime backend: an exported U-Net as a `denoise(x, t)` callable, torch-free.

Every ONNX Runtime session of the project is made by `open_session` (a test enforces it): the
provider check and install hint, the pip CUDA libraries preloaded, the provider list of
`provider_list` (TF32 stated explicitly, TensorRT with CUDA behind it and an engine cache), and
the refusal of a session that silently fell back to the CPU.

Session settings were chosen by measurement (`python -m bench denoiser`, its ORT
settings table): full graph optimisation, intra-op threads = the CPU allowance (ORT's default spins one thread per core and ignores
cgroup/affinity limits), sequential execution, memory pattern on (shapes repeat
every step). The CUDA provider uses IO binding so CuPy arrays are bound by device
pointer and never copied through the host; CUDA graphs and the CuPy/ORT stream handshake live in
`ort_cuda.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..contract.artifact import Artifact, open_artifact
from .denoiser import Denoiser
from ..errors import CxrError
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


def preload_gpu_libraries(tensorrt: bool = False) -> None:
    """Driver check (one line if too old for this onnxruntime-gpu's CUDA), then, on onnxruntime
    >= 1.21, load the pip-installed CUDA/cuDNN (nvidia-* wheels) before the session.
    tensorrt: also import the `tensorrt` wheel, which loads its libnvinfer from site-packages
    (tensorrt_libs/, not on the loader path), so ORT's TensorRT provider finds it by soname."""
    if tensorrt:
        try:
            import tensorrt as _trt  # noqa: F401
        except ImportError:
            pass                   # system TensorRT, or none: the provider check has the last word
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


class SessionError(CxrError):
    """ONNX Runtime refused to create the session; `reason` is its first line (a CUDA-graph retry
    reports that, not the 'not a loadable model' wrapping)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        raise CxrError(f"--provider {provider!r} is unknown (valid: {', '.join(PROVIDERS)})")


def default_trt_cache(path: str | Path) -> Path:
    """Beside the model, `<model>.onnx.trtcache/`: it goes wherever the model goes, and ORT names
    each engine by the model's hash and the GPU's compute capability, so one folder serves
    several GPUs. `--trt-cache DIR` puts it elsewhere (e.g. when the model's folder is read-only)."""
    return Path(f"{path}.trtcache")


def trt_profile(inputs: Sequence[dict[str, Any]], batches: Sequence[int]) -> dict[str, str]:
    """TensorRT optimization-profile options for the batch sizes a run feeds: min = the smallest,
    opt = max = the largest. `inputs` as in the metadata's io spec ("B" = the batch axis); ORT
    wants every input with a dynamic axis, as 'name:d0xd1...,name2:...' (ORT docs, TensorRT
    execution provider, "Explicit range of dynamic input shape for TRT optimization profiles")."""
    if not batches or min(batches) < 1:
        raise CxrError(f"TensorRT profile: batch sizes must be >= 1 (got {list(batches)})")

    def shapes(b: int) -> str:
        return ",".join(f"{s['name']}:" + "x".join(str(b) if d == "B" else str(int(d)) for d in s["shape"])
                        for s in inputs if "B" in s["shape"])
    lo, hi = min(batches), max(batches)
    return {"trt_profile_min_shapes": shapes(lo), "trt_profile_opt_shapes": shapes(hi),
            "trt_profile_max_shapes": shapes(hi)}


def provider_list(provider: str, *, tf32: bool = False, cuda_graph: bool = False,
                  trt_cache_dir: str | Path | None = None,
                  trt_profile: dict[str, str] | None = None) -> list[Any]:
    """`providers=[...]` for an ORT session; pure, so the choice is tested on CPU.

    CUDA: `use_tf32` always stated. ORT's CUDA provider defaults it to on ("By default, enable
    TF32 to speed up float GEMM/MatMul or cuDNN convolution", cuda_execution_provider_info.h;
    option added in ORT #19357/#19426); off keeps fp32 models fp32, as `cxr-export trt` does.
    CUDA options parse "0"/"1". TensorRT: TensorRT, then CUDA for the nodes TensorRT does not
    take (ORT docs recommend registering both), then CPU; engine and timing caches on, in
    `trt_cache_dir`. Its options are parsed by the Python binding as "True"/"False" only
    (onnxruntime_pybind_state.cc). TensorRT subgraphs follow TensorRT's own builder default
    (TF32 allowed): ORT's TensorRT provider has no TF32 switch; `use_tf32` covers the CUDA nodes.
    """
    check_provider(provider)
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    cuda: dict[str, str] = {"use_tf32": "1" if tf32 else "0"}
    if cuda_graph and provider == "cuda":          # graphs need every node on CUDA: not with TensorRT
        cuda["enable_cuda_graph"] = "1"
    if provider == "cuda":
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    trt: dict[str, str] = {}
    if trt_cache_dir is not None:
        trt = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(trt_cache_dir),
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(trt_cache_dir)}
    trt.update(trt_profile or {})
    return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


def open_session(path: str | Path, *, provider: str = "cpu", threads: int | None = None,
                 opt_level: str = "all", mem_pattern: bool = True, tf32: bool = False,
                 cuda_graph: bool = False, trt_cache_dir: str | Path | None = None,
                 trt_batches: Sequence[int] | None = None, source: str | None = None) -> Any:
    """The one way the project opens an ONNX Runtime session (backends, verify, eval, bench).

    trt_cache_dir: TensorRT engine cache (default `default_trt_cache(path)`); trt_batches: the
    batch sizes the run feeds, for the TensorRT profile, from a cxr-ddpm model's io spec (None:
    TensorRT takes the first shapes it sees and rebuilds for others). Refuses in one line: an unknown or unavailable provider, a file
    ORT cannot load (`SessionError`), a session that fell back from the requested provider.
    """
    import onnxruntime as ort
    source = source or str(path)
    check_provider(provider)
    cache = profile = None
    if provider == "tensorrt":
        cache = (Path(trt_cache_dir) if trt_cache_dir is not None else default_trt_cache(path)).absolute()
        if trt_batches:
            from ..contract.metadata import read_onnx_metadata
            profile = trt_profile(read_onnx_metadata(path)["io"]["inputs"], trt_batches)
    providers = provider_list(provider, tf32=tf32, cuda_graph=cuda_graph, trt_cache_dir=cache,
                              trt_profile=profile)
    have = available_providers()
    if provider not in have:
        raise CxrError(f"--provider {provider}: not available in this onnxruntime "
                       f"(available: {', '.join(have)}); " + gpu_install_hint(installed_ort_packages()))
    if cache is not None:
        from ..fsutil import ensure_writable_dir
        try:
            ensure_writable_dir(cache, "TensorRT engine cache")
        except CxrError as e:
            raise CxrError(f"--trt-cache: {e}") from None
    so = session_options(threads=threads, opt_level=opt_level, mem_pattern=mem_pattern)
    if provider != "cpu":
        preload_gpu_libraries(tensorrt=provider == "tensorrt")
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
        first = " ".join(str(e).split())[:160]
        raise SessionError(f"{source}: not a loadable ONNX model ({first})", first) from None
    check_session_provider(session, provider, source)
    return session


class OrtDenoiser(Denoiser):
    """Exported U-Net in an ONNX Runtime session: `run` turns named feeds into the raw output."""

    backend = "onnx"

    def __init__(self, path: str | Path | Artifact, *, provider: str = "cpu", threads: int | None = None,
                 opt_level: str = "all", mem_pattern: bool = True, cuda_graph: str | None = None,
                 tf32: bool = False, trt_cache_dir: str | Path | None = None,
                 trt_batches: Sequence[int] | None = None) -> None:
        """path: the ONNX file, or its Artifact when already opened (load_denoiser does)."""
        artifact = path if isinstance(path, Artifact) else open_artifact(path, "onnx")
        super().__init__(artifact, provider=provider)
        check_provider(provider)
        self.cuda_graph = ort_cuda.resolve_cuda_graph(cuda_graph, provider)
        self.tf32 = ort_cuda.resolve_tf32(tf32, provider)
        self._session_args: dict[str, Any] = dict(
            provider=provider, threads=threads, opt_level=opt_level, mem_pattern=mem_pattern, tf32=self.tf32,
            trt_cache_dir=trt_cache_dir, trt_batches=trt_batches, source=str(self.path))
        self.session = self._open()
        graph_in = [i.name for i in self.session.get_inputs()]
        graph_out = [o.name for o in self.session.get_outputs()]
        if sorted(graph_in) != sorted(self.input_names) or graph_out != ["out"]:
            raise CxrError(f"{self.path}: the graph's inputs {graph_in} / outputs {graph_out} differ from its "
                           f"metadata's ({list(self.input_names)} -> ['out'])")
        self._binding = provider != "cpu"
        self.io_types = ort_cuda.session_io_types(self.session)
        self.io_dtypes = self.io_types
        self._graphs = ort_cuda.GraphRunner(self.session, self.io_types["out"]) if self.cuda_graph else None

    def _open(self) -> Any:
        """The session; with CUDA graphs when asked and ORT accepts them (else one warning)."""
        if self.cuda_graph:
            try:
                return open_session(self.path, cuda_graph=True, **self._session_args)
            except SessionError as e:  # e.g. "cannot use the graph capture feature": a node off CUDA
                session = open_session(self.path, **self._session_args)
                self.cuda_graph = False                # only now: a broken file is not a graph problem
                ort_cuda.warn_fallback(f"{self.path}: ONNX Runtime refused CUDA graphs for this model", e.reason)
                return session
        return open_session(self.path, **self._session_args)

    def run(self, feeds: dict[str, Any]) -> Any:
        if not self._binding:
            return self.session.run(["out"], feeds)[0]
        if self._graphs is not None:
            try:
                return self._graphs(feeds)
            except ort_cuda.CaptureFailed as e:       # plain CUDA runs from here on
                self._graphs, self.cuda_graph = None, False
                ort_cuda.warn_fallback(f"{self.path}: CUDA graph capture failed", e)
                self.session = self._open()
        return self._run_bound(feeds)

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
