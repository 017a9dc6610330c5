"""TensorRT backend: wraps `runtime.backends.tensorrt.TrtEngine` as a denoiser.

TrtEngine owns the engine lifecycle and device buffers (cuda-python or CuPy, never torch);
this adapter only sizes the engine for each batch and runs named feeds. What the engine's
header says (config, schedule, I/O, null class) is the Artifact's, derived once in
runtime/contract/artifact.py as for every backend. Imported lazily: TensorRT is optional.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..contract.artifact import Artifact, open_artifact
from .denoiser import Denoiser
from ..errors import CxrError


class TrtDenoiser(Denoiser):
    backend = "tensorrt"

    def __init__(self, path: str | Path | Artifact, *, provider: str = "tensorrt", cuda_graph: str | None = None,
                 open_engine: bool = True, libs: Any = None, onnx_sha256: str | None = None) -> None:
        """path: the engine file, or its Artifact when already opened (load_denoiser does). The
        header is read and checked first (no TensorRT needed: `inspect` works anywhere);
        open_engine=False stops there, without deserializing the plan.
        cuda_graph: auto (default) | on | off. An engine always runs on CUDA, so auto is on, as for
        ONNX Runtime's cuda provider: one graph per batch size, captured on the first call at that
        size; a failed capture falls back to plain enqueue with one warning (and records off).
        libs: tensorrt.GpuLibs, the TensorRT and CUDA modules (default: the installed ones).
        onnx_sha256: refuse unless the engine was built from the ONNX file with this hash."""
        from .ort_cuda import resolve_cuda_graph
        artifact = path if isinstance(path, Artifact) else open_artifact(path, "tensorrt")
        super().__init__(artifact, provider="tensorrt")
        self.cuda_graph = resolve_cuda_graph(cuda_graph, "cuda")
        self.engine: Any = None
        if open_engine:
            if provider not in ("tensorrt", "cuda"):
                raise CxrError(f"--provider {provider}: a TensorRT engine runs only on the GPU "
                               f"(use --provider tensorrt, or an .onnx file for cpu)")
            from .tensorrt import TrtEngine
            header = None if artifact.plan_offset is None else (artifact.meta, artifact.plan_offset)
            self.engine = TrtEngine(self.path, header=header, libs=libs, onnx_sha256=onnx_sha256)
        self._batch: int | None = None

    def run(self, feeds: dict[str, Any]) -> Any:
        batch = int(feeds["x"].shape[0])
        if self._batch != batch:
            if self.cuda_graph:                  # allocates; False after a fallback (recorded)
                self.cuda_graph = self.engine.capture_graph(batch)
            else:
                self.engine.allocate(batch)
            self._batch = batch
        return self.engine.infer(feeds)["out"]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
