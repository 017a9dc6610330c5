"""PyTorch reference backend: the checkpoint's EMA U-Net in eager PyTorch, for A/B comparisons.

Lives on the torch side; `runtime.backends.load_denoiser` imports it by module name only
when `--backend torch` is chosen, so the runtime package itself never imports torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxr_ddpm.runtime.metadata import schedule_from_metadata


class TorchDenoiser:
    """`__call__` takes and returns numpy, like the other backends; `call_torch` skips the copies."""

    backend = "torch"

    def __init__(self, path: str | Path, *, provider: str = "cpu", threads: int | None = None,
                 channels_last: bool = False, ema: bool = True, config: Any = None,
                 derive_diffusion: bool = False) -> None:
        """config: the model config of a lucidrains model-N.pt (which carries none); see
        train.checkpoint.load_checkpoint for derive_diffusion."""
        import torch

        from cxr_ddpm.train.checkpoint import load_checkpoint
        from cxr_ddpm.train.model import Denoiser
        from cxr_ddpm.runtime.errors import CxrError

        if provider not in ("cpu", "cuda"):
            raise CxrError(f"--provider {provider}: the torch backend runs on cpu or cuda")
        if provider == "cuda" and not torch.cuda.is_available():
            raise CxrError("--provider cuda: torch sees no CUDA device (available: cpu)")
        if threads:
            torch.set_num_threads(int(threads))
        ckpt = load_checkpoint(path, config, derive_diffusion=derive_diffusion)
        self.path = Path(path)
        self.checkpoint, self.sha256 = str(ckpt.path), ckpt.sha256     # a run folder names its newest
        self.meta: dict[str, Any] = dict(ckpt.meta)
        self.meta.setdefault("null_class", ckpt.cfg.model.num_classes or None)
        self.meta.setdefault("self_condition", ckpt.cfg.model.self_condition)
        self.config = ckpt.cfg
        self.schedule = schedule_from_metadata(ckpt.meta, str(path))
        self.provider = provider
        self.self_condition = ckpt.cfg.model.self_condition
        self.null_class = self.meta["null_class"]
        self.device = torch.device(provider)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        unet = ckpt.build_unet(ema=ema).to(self.device, memory_format=self.memory_format)
        self.net = Denoiser(unet, ckpt.cfg.model)
        self._torch = torch

    def call_torch(self, x: Any, t: Any, x_self_cond: Any = None, classes: Any = None) -> Any:
        torch = self._torch
        with torch.inference_mode():      # the ONNX graph's convention: class id n = the null class
            return self.net(x, t, classes if self.config.model.num_classes else x_self_cond)

    def __call__(self, x: np.ndarray, t: np.ndarray, x_self_cond: np.ndarray | None = None,
                 classes: np.ndarray | None = None) -> np.ndarray:
        torch = self._torch

        def to(a: Any, dtype: Any) -> Any:
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

        xt = to(x, torch.float32).contiguous(memory_format=self.memory_format)
        sc = to(x_self_cond, torch.float32)
        out = self.call_torch(xt, to(t, torch.long), sc, to(classes, torch.long))
        return out.float().cpu().numpy()
