"""The one denoiser type: an opened Artifact plus a backend that turns named feeds into outputs.

    den = load_denoiser("model.onnx")            # runtime/backends: OrtDenoiser, TrtDenoiser, TorchDenoiser
    out = den(x, t)                              # raw model output, float32, x's array type
    den.artifact.schedule, den.self_condition, den.null_class, den.sha256

The call convention lives here and nowhere else: `feeds` assembles the model's named inputs
from the artifact's derived facts (x_self_cond only when the model takes it, zeros when not
given; the class only for conditional models, the null class when not given), casts them to
the dtypes the backend declares, and `__call__` returns fp32. A backend implements `run(feeds)`
and sets what it knows about itself (cuda_graph, tf32, checkpoint); every signature that takes a
denoiser names this class.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..contract.artifact import Artifact
from ..contract.config import ModelSpec
from ..contract.interface import model_inputs
from ..sampling.schedule import Schedule


class Denoiser:
    backend: str = ""                    # "onnx" | "tensorrt" | "torch"
    cuda_graph: bool | None = None       # CUDA graphs in use (ONNX Runtime CUDA, TensorRT); None: n/a
    tf32: bool | None = None             # ORT CUDA fp32 in TF32 (changes pixels: recorded); None: n/a
    checkpoint: str | None = None        # torch: the checkpoint file a run folder resolved to

    def __init__(self, artifact: Artifact, *, provider: str, path: str | Path | None = None) -> None:
        self.artifact = artifact
        self.provider = provider
        self.path = Path(path) if path is not None else artifact.path    # as given (a run folder stays one)
        self.io_dtypes: dict[str, Any] = {}                              # input name -> dtype the backend wants

    # the artifact's facts, under the names sampling code has always used
    @property
    def meta(self) -> dict[str, Any]:
        return self.artifact.meta

    @property
    def config(self) -> ModelSpec:
        return self.artifact.spec

    @property
    def schedule(self) -> Schedule:
        return self.artifact.schedule

    @property
    def self_condition(self) -> bool:
        return self.artifact.self_condition

    @property
    def null_class(self) -> int | None:
        return self.artifact.null_class

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.artifact.input_names

    @property
    def sha256(self) -> str:
        return self.artifact.sha256

    def feeds(self, x: Any, t: Any, x_self_cond: Any = None, classes: Any = None) -> dict[str, Any]:
        feeds = model_inputs(list(self.input_names), x, t, x_self_cond, classes, self.null_class)
        for name, dtype in self.io_dtypes.items():       # fp16 graphs may declare fp16 I/O
            if name in feeds and feeds[name].dtype != dtype:
                feeds[name] = feeds[name].astype(dtype)
        return feeds

    def run(self, feeds: dict[str, Any]) -> Any:
        """The backend: named inputs (x's array type) -> the raw output `out`."""
        raise NotImplementedError

    def __call__(self, x: Any, t: Any, x_self_cond: Any = None, classes: Any = None) -> Any:
        out = self.run(self.feeds(x, t, x_self_cond, classes))
        return out if out.dtype == np.float32 else out.astype(np.float32)   # sampler math is fp32

    def close(self) -> None:
        """Release what the backend holds (TensorRT buffers); sessions go with the object."""

    def __enter__(self) -> "Denoiser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
