"""The model engine of a run: lucidrains' U-Net under DeepSpeed, the fp32 GaussianDiffusion
around it, the EMA and the learning-rate schedule.

DeepSpeed wraps only the U-Net; lucidrains' GaussianDiffusion (schedule buffers, q_sample,
the loss) stays fp32 outside, because DeepSpeed's bf16/fp16 modes cast every parameter and
buffer of the module they get.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .ema import EMA
from .model import build_diffusion, build_unet, device_capability
from .plan import RunPlan
from .state import seed_everything


class AutocastUnet(torch.nn.Module):
    """The module DeepSpeed gets: the U-Net, its forward under autocast when training in bf16/fp16."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.unet = unet
        self.dtype = dtype

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.dtype is None:
            return self.unet(*args, **kwargs)
        x = args[0]
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.unet(*args, **kwargs)
        return out.float()  # the loss and the schedule math stay fp32


@dataclass
class ModelEngine:
    engine: Any                  # deepspeed.DeepSpeedEngine around AutocastUnet
    diffusion: torch.nn.Module   # lucidrains GaussianDiffusion; its .model is the engine
    ema: EMA
    scheduler: Any               # DeepSpeed's WarmupLR

    @property
    def unet(self) -> torch.nn.Module:
        """The trained U-Net (the engine's module; sharded under ZeRO-3)."""
        return self.engine.module.unet


def build_engine(plan: RunPlan) -> ModelEngine:
    import deepspeed
    t = plan.cfg.train
    seed_everything(t.seed)                        # same initial weights on every rank
    unet = build_unet(plan.cfg.model, device_capability(plan.device))
    diffusion = build_diffusion(plan.cfg, unet).to(plan.device)  # fp32 schedule buffers, never seen by DeepSpeed
    if t.compile:
        import torch._dynamo as dynamo
        dynamo.config.suppress_errors = True  # a graph that fails to compile runs eager
        unet.compile()                              # in place: state_dict keys stay unprefixed
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    net = AutocastUnet(unet, amp)
    engine, _, _, scheduler = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                                   config=plan.ds_config)
    diffusion.model = engine                       # lucidrains' p_losses now calls the engine
    ema = EMA(engine.module.unet, t.ema_decay, t.zero_stage, t.ema_every)
    seed_everything(t.seed * 1000 + plan.world.rank)   # different noise and timesteps per rank
    return ModelEngine(engine, diffusion, ema, scheduler)
