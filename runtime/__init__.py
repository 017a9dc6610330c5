"""cxr-ddpm runtime: the torch-free core (config schema, schedule math, samplers,
artifact metadata, ONNX Runtime / TensorRT backends). Never imports torch."""
from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("cxr-ddpm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
