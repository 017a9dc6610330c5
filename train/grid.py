"""The EMA sample grid drawn during training: the runtime's sampler over the current EMA U-Net."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .config import Config

from .model import Denoiser, build_unet, device_capability


def sample_grid(cfg: Config, ema_weights: dict[str, torch.Tensor], path: Path, device: torch.device) -> Path:
    """DDIM samples (cfg.train.sample_steps steps, eta 0) from the EMA weights, tiled into one PNG.

    The sampler is the runtime's torch-free `sample_ddim` (the same code `cxr-runtime`
    samples with) over a `denoise` callable that runs a fresh fp32 copy of the EMA U-Net.
    Noise comes from its own numpy generator: the training RNG streams are not touched.
    """
    from cxr_ddpm.runtime.outputs.formats import grid_png
    from cxr_ddpm.runtime.sampling.samplers import sample_ddim
    from cxr_ddpm.runtime.sampling.schedule import Schedule

    t, m = cfg.train, cfg.model
    unet = build_unet(m, device_capability(device))
    unet.load_state_dict(ema_weights)
    net = Denoiser(unet, m).to(device).eval()
    # conditional models: one row per class (class k fills row k), no label dropout
    cols = math.ceil(t.num_samples / m.num_classes) if m.num_classes else math.ceil(math.sqrt(t.num_samples))
    n = cols * m.num_classes if m.num_classes else t.num_samples
    classes = torch.arange(n, device=device) // cols

    @torch.no_grad()
    def denoise(x: np.ndarray, tt: np.ndarray, self_cond: np.ndarray | None = None) -> np.ndarray:
        xt, tc = torch.from_numpy(x).to(device), torch.from_numpy(tt).to(device)
        sc = None if self_cond is None else torch.from_numpy(self_cond).to(device)
        return net(xt, tc, classes if m.num_classes else sc).float().cpu().numpy()

    x_T = np.random.default_rng(t.seed).standard_normal(            # the same noise every grid
        (n, m.channels, m.image_size, m.image_size)).astype(np.float32)
    x0 = sample_ddim(denoise, x_T, Schedule.from_config(cfg.diffusion),
                     steps=min(t.sample_steps, cfg.diffusion.timesteps),
                     self_condition=m.self_condition and not m.num_classes)
    return grid_png(path, list(x0), cols=cols)
