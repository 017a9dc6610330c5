"""Backends: small adapters that run an opened artifact, turning named feeds into outputs.

`load_denoiser(path)` opens the artifact once (`runtime.contract.artifact.open_artifact`: a cxr-ddpm
TensorRT engine by its magic bytes, a checkpoint by its suffix, anything else as ONNX) and hands
it to the backend, so users never retype image size, schedule or objective. Every backend is a
`runtime.backends.denoiser.Denoiser`: `.artifact` (with `.path`, `.sha256`, `.meta`, `.config`,
`.schedule`, `.self_condition`, `.null_class` forwarded), `.backend`, `.provider`, `.cuda_graph`,
`.tf32`, `.checkpoint` and `__call__(x, t, x_self_cond=None, classes=None) -> raw model output`.
Backends import lazily: choosing ONNX never loads torch or TensorRT.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..contract.artifact import open_artifact
from .denoiser import Denoiser
from ..contract.engine_file import is_engine_file
from ..errors import CxrError

BACKENDS = ("onnx", "tensorrt", "torch")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")
TORCH_BACKEND_MODULE = "cxr_ddpm.train.torch_backend"


__all__ = ["BACKENDS", "Denoiser", "detect_backend", "load_denoiser", "check_source"]


def detect_backend(path: Path) -> str:
    if path.is_dir() or path.suffix in CHECKPOINT_SUFFIXES:
        return "torch"
    return "tensorrt" if is_engine_file(path) else "onnx"


def load_denoiser(path: str | Path, *, backend: str | None = None, provider: str | None = None,
                  threads: int | None = None, ckpt: str | Path | None = None,
                  **options: Any) -> Denoiser:
    """Open an ONNX model, TensorRT engine or checkpoint as a denoiser.

    provider: cpu | cuda | tensorrt (default: cpu, tensorrt for engine files).
    ckpt: the checkpoint this artifact must have been exported from (checked against
    the metadata's source.checkpoint_sha256; catches comparing the wrong pair).
    options: backend-specific (onnx: opt_level, mem_pattern, tf32, trt_cache_dir, trt_batches
    (see backends.onnx.open_session); tensorrt: libs; torch: channels_last);
    cuda_graph (auto | on | off) reaches the ONNX and TensorRT backends; torch refuses on.
    """
    path = Path(path)
    if not path.exists():
        raise CxrError(f"{path}: engine file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise CxrError(f"{path}: empty file (not an ONNX model, TensorRT engine or checkpoint)")
    if backend is not None and backend not in BACKENDS:
        raise CxrError(f"--backend {backend!r} is unknown (valid: {', '.join(BACKENDS)})")
    try:
        backend = backend or detect_backend(path)
    except OSError as e:
        raise CxrError(f"{path}: cannot read ({e.strerror})") from None
    cuda_graph = options.pop("cuda_graph", None)
    if backend == "torch" and cuda_graph == "on":         # auto/off: nothing to refuse
        raise CxrError(f"--cuda-graph on: {path} opens with the torch backend; CUDA graphs here are for "
                       f"ONNX models on --provider cuda and TensorRT engines")
    ort_only: dict[str, Any] = {k: options.pop(k) for k in ("tf32", "trt_cache_dir", "trt_batches") if k in options}
    for flag, key in (("--tf32", "tf32"), ("--trt-cache", "trt_cache_dir")):
        if backend != "onnx" and ort_only.get(key):
            raise CxrError(f"{flag}: {path} opens with the {backend} backend; {flag} is an ONNX Runtime "
                           f"setting (give an ONNX model)")
    den: Denoiser
    if backend == "tensorrt":
        from .trt_adapter import TrtDenoiser
        den = TrtDenoiser(open_artifact(path, "tensorrt"), provider=provider or "tensorrt", cuda_graph=cuda_graph,
                          **options)
    elif backend == "torch":
        den = torch_denoiser_class()(path, provider=provider or "cpu", threads=threads, **options)
    else:
        if path.is_dir():
            raise CxrError(f"{path}: is a folder, not an ONNX model")
        from .onnx import OrtDenoiser
        den = OrtDenoiser(open_artifact(path, "onnx"), provider=provider or "cpu", threads=threads,
                          cuda_graph=cuda_graph, **ort_only, **options)
    if ckpt is not None:
        check_source(den.meta, Path(ckpt), str(path))
    return den


def torch_denoiser_class() -> Any:
    """The PyTorch reference backend lives on the torch side (train/); the runtime imports it
    by module name only when --backend torch is chosen, so the runtime itself never needs torch."""
    import importlib
    try:
        module = importlib.import_module(TORCH_BACKEND_MODULE)
    except ImportError as e:
        raise CxrError(f"--backend torch needs the training extra (pip install 'cxr-ddpm[train]'): "
                       f"{e}") from None
    return module.TorchDenoiser


def check_source(meta: dict[str, Any], ckpt: Path, source: str) -> None:
    want = (meta.get("source") or {}).get("checkpoint_sha256")
    if want is None:
        return                                     # checkpoints themselves carry no source
    from ..fsutil import file_sha256
    got = file_sha256(ckpt)
    if got != want:
        raise CxrError(f"{source}: was exported from a different checkpoint than {ckpt} "
                       f"(sha256 {want[:12]}... vs {got[:12] or 'unreadable'}...)")
