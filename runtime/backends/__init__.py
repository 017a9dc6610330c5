"""Backends: small adapters that turn an artifact into a `denoise(x, t)` callable.

`load_denoiser(path)` picks the backend from the file itself (a cxr-ddpm TensorRT
engine by its magic bytes, a checkpoint by its suffix, anything else is tried as
ONNX) and configures it from the embedded metadata, so users never retype image
size, schedule or objective. Every denoiser has `.path`, `.sha256` (of the artifact file), `.meta`, `.config`,
`.schedule`, `.backend`, `.provider`, `.self_condition` and
`__call__(x, t, x_self_cond=None, classes=None) -> raw model output`.
Backends import lazily: choosing ONNX never loads torch or TensorRT.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..config import Config
from ..engine_file import is_engine_file
from ..errors import CxrError
from ..schedule import Schedule

BACKENDS = ("onnx", "tensorrt", "torch")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")
TORCH_BACKEND_MODULE = "cxr_ddpm.train.torch_backend"


class Denoiser(Protocol):
    path: Path
    sha256: str | None
    meta: dict[str, Any]
    config: Config
    schedule: Schedule
    backend: str
    provider: str
    self_condition: bool

    def __call__(self, x: Any, t: Any, x_self_cond: Any = None, classes: Any = None) -> Any: ...


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
    options: backend-specific (onnx: opt_level, mem_pattern, cuda_graph; torch: channels_last).
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
    if backend != "onnx" and options.pop("cuda_graph", None) == "on":
        raise CxrError(f"--cuda-graph on: {path} opens with the {backend} backend; CUDA graphs here "
                       f"are an ONNX Runtime CUDA provider feature (give an ONNX model)")
    if backend == "tensorrt":
        from .trt_adapter import TrtDenoiser
        den: Any = TrtDenoiser(path, provider=provider or "tensorrt", **options)
    elif backend == "torch":
        den = torch_denoiser_class()(path, provider=provider or "cpu", threads=threads, **options)
    else:
        if path.is_dir():
            raise CxrError(f"{path}: is a folder, not an ONNX model")
        from .onnx import OrtDenoiser
        den = OrtDenoiser(path, provider=provider or "cpu", threads=threads, **options)
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
