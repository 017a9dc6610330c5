"""Build lucidrains' Unet + GaussianDiffusion from the config (we build on it, not rewrite it).

The schedule lucidrains computes must equal `runtime.sampling.schedule` (the one the
runtime samples with); `build_diffusion` checks that once at construction.

The attention-kernel policy lives here too (`sdpa_backends`): lucidrains' `Attend`
restricts SDPA to the flash kernel on every GPU above compute capability 8.0, and
flash has no fp32 kernel, so every fp32 forward (EMA sample grids, the torch
reference sampler, benchmarks) failed with "No available kernel". `build_unet`
replaces that choice on every U-Net it builds, so training, sampling and
benchmarks all get the same policy.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from denoising_diffusion_pytorch import GaussianDiffusion, Unet
from denoising_diffusion_pytorch.attend import Attend, AttentionConfig
from torch.nn.attention import SDPBackend

from .config import Config, DiffusionConfig, ModelConfig
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.sampling.schedule import Schedule


# dtypes a U-Net forward may run in: fp32 (sampling, fp32 training), bf16/fp16 (autocast)
FORWARD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sdpa_backends(dtype: torch.dtype, capability: tuple[int, int]) -> tuple[SDPBackend, ...]:
    """The SDPA kernels that can run attention in `dtype` on a GPU of this compute capability.

    Flash and cuDNN attention need sm80+ and fp16/bf16; memory-efficient runs fp32 and fp16
    everywhere and bf16 from sm80; math runs anything, so a forward never finds no kernel.
    SDPA picks the fastest allowed kernel that accepts the actual inputs.
    """
    half = dtype in (torch.float16, torch.bfloat16)
    ampere = tuple(capability) >= (8, 0)
    allowed = []
    if half and ampere:
        allowed += [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    if dtype != torch.bfloat16 or ampere:
        allowed.append(SDPBackend.EFFICIENT_ATTENTION)
    allowed.append(SDPBackend.MATH)
    return tuple(allowed)


def attention_config(capability: tuple[int, int],
                     dtypes: tuple[torch.dtype, ...] = FORWARD_DTYPES) -> AttentionConfig:
    """What `Attend.cuda_config` holds: every kernel allowed for some dtype the U-Net runs in
    (one module serves fp32 sampling and bf16 training); SDPA skips those the dtype rules out."""
    allowed: list[SDPBackend] = []
    for dtype in dtypes:
        allowed += [b for b in sdpa_backends(dtype, capability) if b not in allowed]
    return AttentionConfig(allowed)


def cuda_capability() -> tuple[int, int] | None:
    """Compute capability of the current CUDA device; None on CPU (incl. CXR_DEVICE=cpu)."""
    from .dist import use_cuda
    return torch.cuda.get_device_capability() if use_cuda() else None


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of `device` when it is a GPU, else None (a run's device: plan.RunPlan)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def apply_attention_policy(unet: torch.nn.Module, capability: tuple[int, int] | None) -> torch.nn.Module:
    """Set the kernels lucidrains' `Attend` modules read on CUDA (`cuda_config`)."""
    if capability is not None:
        for mod in unet.modules():
            if isinstance(mod, Attend) and mod.flash:
                mod.cuda_config = attention_config(capability)
    return unet


def build_unet(m: ModelConfig, capability: tuple[int, int] | None | Literal["auto"] = "auto") -> torch.nn.Module:
    """lucidrains' U-Net with our attention policy for `capability` ("auto": this process's GPU)."""
    if capability == "auto":
        capability = cuda_capability()
    if m.num_classes > 0:
        from denoising_diffusion_pytorch.classifier_free_guidance import Unet as CondUnet
        if m.self_condition or m.dropout:
            raise CxrError("model.num_classes > 0 does not support self_condition or dropout")
        # flash_attn is accepted and has no effect here: the classifier-free-guidance Unet's
        # attention is plain einsum (no SDPA), which runs in every dtype on every device.
        return CondUnet(dim=m.dim, num_classes=m.num_classes, cond_drop_prob=m.cond_drop_prob,
                        dim_mults=tuple(m.dim_mults), channels=m.channels,
                        attn_dim_head=m.attn_dim_head, attn_heads=m.attn_heads)
    unet = Unet(dim=m.dim, dim_mults=tuple(m.dim_mults), channels=m.channels,
                self_condition=m.self_condition, flash_attn=m.flash_attn,
                attn_dim_head=m.attn_dim_head, attn_heads=m.attn_heads, dropout=m.dropout)
    return apply_attention_policy(unet, capability)


def attention_summary(m: ModelConfig, capability: tuple[int, int] | None) -> str:
    """One phrase for the start-up line: which attention the U-Net runs."""
    if m.num_classes > 0:
        return "einsum attention (conditional U-Net" + ("; model.flash_attn has no effect)" if m.flash_attn else ")")
    if not m.flash_attn:
        return "einsum attention"
    if capability is None:
        return "SDPA attention (CPU)"
    names = [b.name.split("_")[0].lower() for b in attention_config(capability).backends]
    return f"SDPA attention (sm{capability[0]}{capability[1]}: {'/'.join(names)})"


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

