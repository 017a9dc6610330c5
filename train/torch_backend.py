"""PyTorch reference backend: the checkpoint's EMA U-Net in eager PyTorch, for A/B comparisons.

Lives on the torch side; `runtime.backends.load_denoiser` imports it by module name only
when `--backend torch` is chosen, so the runtime package itself never imports torch. The
checkpoint's document becomes the same `Artifact` every backend gets (runtime/contract/artifact.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxr_ddpm.runtime.contract.artifact import artifact_from_document
from cxr_ddpm.runtime.backends.denoiser import Denoiser
from cxr_ddpm.runtime.errors import CxrError


class TorchDenoiser(Denoiser):
    """`__call__` takes and returns numpy, like the other backends; `call_torch` skips the copies."""

    backend = "torch"

    def __init__(self, path: str | Path, *, provider: str = "cpu", threads: int | None = None,
                 channels_last: bool = False, ema: bool = True, config: Any = None,
                 derive_diffusion: bool = False, config_file: str | Path | None = None) -> None:
        """config: the model config of a lucidrains model-N.pt (which carries none); see
        train.checkpoint.load_checkpoint for derive_diffusion. config_file: that config as a file
        (`--config`), read here by train.config.load_checkpoint_config."""
        import torch

        from cxr_ddpm.train.checkpoint import load_checkpoint
        from cxr_ddpm.train.model import Denoiser as DenoiserNet

        if provider not in ("cpu", "cuda"):
            raise CxrError(f"--provider {provider}: the torch backend runs on cpu or cuda")
        if provider == "cuda" and not torch.cuda.is_available():
            raise CxrError("--provider cuda: torch sees no CUDA device (available: cpu)")
        if threads:
            torch.set_num_threads(int(threads))
        if config_file is not None:
            from cxr_ddpm.train.config import load_checkpoint_config
            config, derive_diffusion = load_checkpoint_config(config_file)
        ckpt = load_checkpoint(path, config, derive_diffusion=derive_diffusion)
        # the two derived facts stay in the document as before: sample records hash it
        meta = {**ckpt.meta, "null_class": ckpt.meta.get("null_class", ckpt.cfg.model.num_classes or None),
                "self_condition": ckpt.meta.get("self_condition", ckpt.cfg.model.self_condition)}
        super().__init__(artifact_from_document(meta, ckpt.path, "checkpoint", known_sha256=ckpt.sha256),
                         provider=provider, path=path)
        self.checkpoint = str(ckpt.path)                   # a run folder names its newest
        self.device = torch.device(provider)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # two calls: torch's Module.to overloads take a device or a memory_format, not both
        unet = ckpt.build_unet(ema=ema).to(self.device).to(memory_format=self.memory_format)
        self.net = DenoiserNet(unet, ckpt.cfg.model)
        self._torch = torch

    def call_torch(self, x: Any, t: Any, x_self_cond: Any = None, classes: Any = None) -> Any:
        torch = self._torch
        with torch.inference_mode():      # the ONNX graph's convention: class id n = the null class
            return self.net(x, t, classes if self.null_class is not None else x_self_cond)

    def run(self, feeds: dict[str, Any]) -> Any:
        torch = self._torch

        def to(name: str, dtype: Any) -> Any:
            a = feeds.get(name)
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

        x = to("x", torch.float32).contiguous(memory_format=self.memory_format)
        out = self.call_torch(x, to("t", torch.long), to("x_self_cond", torch.float32), to("class", torch.long))
        return out.float().cpu().numpy()
