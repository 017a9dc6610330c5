"""Build lucidrains' Unet + GaussianDiffusion from the config (we build on it, not rewrite it).

The schedule lucidrains computes must equal `runtime.schedule` (the one the
runtime samples with); `build_diffusion` checks that once at construction.
"""
from __future__ import annotations

import numpy as np
import torch
from denoising_diffusion_pytorch import GaussianDiffusion, Unet

from cxr_ddpm.runtime.config import Config, DiffusionConfig, ModelConfig
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.schedule import Schedule


def build_unet(m: ModelConfig) -> torch.nn.Module:
    if m.num_classes > 0:
        from denoising_diffusion_pytorch.classifier_free_guidance import Unet as CondUnet
        if m.self_condition or m.flash_attn or m.dropout:
            raise CxrError("model.num_classes > 0 does not support self_condition, flash_attn or dropout")
        return CondUnet(dim=m.dim, num_classes=m.num_classes, cond_drop_prob=m.cond_drop_prob,
                        dim_mults=tuple(m.dim_mults), channels=m.channels,
                        attn_dim_head=m.attn_dim_head, attn_heads=m.attn_heads)
    return Unet(dim=m.dim, dim_mults=tuple(m.dim_mults), channels=m.channels,
                self_condition=m.self_condition, flash_attn=m.flash_attn,
                attn_dim_head=m.attn_dim_head, attn_heads=m.attn_heads, dropout=m.dropout)


class Denoiser(torch.nn.Module):
    """lucidrains' Unet as out = f(x, t[, x_self_cond | class]): the one place its call
    convention lives (ONNX export traces this module; the PyTorch backend and the training
    sample grids call it).

    `t` arrives as int64 and is cast here (lucidrains feeds its long timesteps into a
    float sinusoidal embedding: same values). `class == num_classes` is the null
    (unconditional) label for classifier-free guidance: it selects the U-Net's learned
    null embedding through `cond_keep_mask`, so one call (or one graph) serves both passes.
    """

    def __init__(self, unet: torch.nn.Module, m: ModelConfig) -> None:
        super().__init__()
        self.unet = unet
        self.num_classes = m.num_classes
        self.self_condition = m.self_condition and m.num_classes == 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor | None) -> torch.Tensor:
        time = t.to(torch.float32)
        if self.num_classes > 0:
            cls = extra[0] if extra and extra[0] is not None else torch.full(
                (x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            keep = cls < self.num_classes                      # (B,) False -> null embedding
            return self.unet(x, time, classes=cls.clamp(max=self.num_classes - 1),
                             cond_drop_prob=0.0, cond_keep_mask=keep)
        if self.self_condition:
            return self.unet(x, time, extra[0] if extra else None)
        return self.unet(x, time)


def schedule_kwargs(d: DiffusionConfig) -> dict:
    if d.beta_schedule == "cosine":
        return {"s": d.cosine_s}
    if d.beta_schedule == "sigmoid":
        return {"start": d.sigmoid_start, "end": d.sigmoid_end, "tau": d.sigmoid_tau}
    return {}


def build_diffusion(cfg: Config, unet: torch.nn.Module | None = None) -> GaussianDiffusion:
    """GaussianDiffusion around `unet` (built from cfg.model when None); schedule stays fp32."""
    unet = unet if unet is not None else build_unet(cfg.model)
    d = cfg.diffusion
    if cfg.model.num_classes > 0:
        from denoising_diffusion_pytorch.classifier_free_guidance import GaussianDiffusion as CondGD
        diffusion = CondGD(unet, image_size=cfg.model.image_size, timesteps=d.timesteps,
                           objective=d.objective, beta_schedule=d.beta_schedule,
                           min_snr_loss_weight=d.min_snr_loss_weight, min_snr_gamma=d.min_snr_gamma)
    else:
        diffusion = GaussianDiffusion(
            unet, image_size=cfg.model.image_size, timesteps=d.timesteps, objective=d.objective,
            beta_schedule=d.beta_schedule, schedule_fn_kwargs=schedule_kwargs(d),
            min_snr_loss_weight=d.min_snr_loss_weight, min_snr_gamma=d.min_snr_gamma,
            offset_noise_strength=d.offset_noise_strength)
    ours = Schedule.from_config(d).alphas_cumprod.astype(np.float32)
    theirs = diffusion.alphas_cumprod.detach().cpu().numpy()
    if not np.allclose(ours, theirs, rtol=0, atol=1e-6):  # e.g. custom schedule params lucidrains ignores
        raise CxrError(f"diffusion: schedule {d.beta_schedule} with these parameters is not what "
                       "denoising_diffusion_pytorch builds for this model; use its defaults")
    return diffusion

