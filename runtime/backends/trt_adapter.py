"""TensorRT backend: wraps `runtime.backends.tensorrt.TrtEngine` (export side) as a denoiser.

TrtEngine owns the engine lifecycle and device buffers (cuda-python or CuPy, never
torch); this adapter only maps the denoiser call onto its named I/O and rebuilds
config and schedule from the header metadata. Imported lazily: TensorRT is optional.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ..errors import CxrError
from ..fsutil import file_sha256
from ..interface import model_inputs


class TrtDenoiser:
    backend = "tensorrt"

    def __init__(self, path: str | Path, *, provider: str = "tensorrt", cuda_graph: bool = False,
                 open_engine: bool = True) -> None:
        """Reads and checks the header first (no TensorRT needed: `inspect` works anywhere);
        open_engine=False stops there, without deserializing the plan."""
        from ..engine_file import read_engine_info
        self.path = Path(path)
        info, offset = read_engine_info(self.path)      # read, parsed and checked once, here
        self.meta: dict[str, Any] = info.meta
        self.engine: Any = None
        if open_engine:
            if provider not in ("tensorrt", "cuda"):
                raise CxrError(f"--provider {provider}: a TensorRT engine runs only on the GPU "
                               f"(use --provider tensorrt, or an .onnx file for cpu)")
            from .tensorrt import TrtEngine
            self.engine = TrtEngine(self.path, header=(info.meta, offset))
        self.config, self.schedule = info.config, info.schedule
        self.provider = "tensorrt"
        self.self_condition = bool(self.meta.get("self_condition", self.config.model.self_condition))
        self.null_class = self.meta.get("null_class")
        self.input_names = [i["name"] for i in self.meta.get("io", {}).get("inputs", [])] or ["x", "t"]
        self.cuda_graph = cuda_graph
        self._batch: int | None = None

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the artifact file, read once, when a record first needs it."""
        return file_sha256(self.path)

    def __call__(self, x: Any, t: Any, x_self_cond: Any = None, classes: Any = None) -> Any:
        feeds = model_inputs(self.input_names, x, t, x_self_cond, classes, self.null_class)
        if self._batch != x.shape[0]:
            if self.cuda_graph:
                self.engine.capture_graph(int(x.shape[0]))   # allocates; falls back to plain enqueue
            else:
                self.engine.allocate(int(x.shape[0]))
            self._batch = int(x.shape[0])
        return self.engine.infer(feeds)["out"]

    def close(self) -> None:
        self.engine.close()
