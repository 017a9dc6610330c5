"""cxr-ddpm runtime: the torch-free core. Never imports torch.

contract/ (the artifact contract, `open_artifact`), backends/ (the `Denoiser` type,
ONNX Runtime, TensorRT), sampling/ (schedule, samplers, guidance, requests), inputs/
(decoding real radiographs, the dataset layout), outputs/ (image formats, sample sets,
shards), evaluation/ (`cxr-runtime eval`); cli.py, errors.py, fsutil.py, system.py."""
from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("cxr-ddpm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
