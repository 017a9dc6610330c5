"""Exponential moving average of the U-Net weights, held in fp32 on every rank.

Every rank updates its own full copy each step, so any rank can sample or save
it. Under ZeRO-3 a rank holds only a shard of each parameter; the update then
runs inside `deepspeed.zero.GatheredParameters` (all ranks take part in the
gather; nobody modifies the gathered values).
"""
from __future__ import annotations

import contextlib

import torch


def full_params(module: torch.nn.Module, zero_stage: int) -> contextlib.AbstractContextManager:
    """Context in which `module`'s parameters are whole tensors on every rank (a no-op below ZeRO-3)."""
    if zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def full_state_dict(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 CPU copy of the whole state dict (collective under ZeRO-3: call on every rank)."""
    with full_params(module, zero_stage):
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}


class EMA:
    """shadow = decay * shadow + (1 - decay) * online, with a warmup of the decay.

    The warmup `min(decay, (1 + n) / (10 + n))` lets the average forget the random
    initialisation within the first few hundred steps instead of thousands.
    """

    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int):
        self.decay = decay
        self.zero_stage = zero_stage
        self.updates = 0
        self.shadow = full_state_dict(module, zero_stage)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with full_params(module, self.zero_stage):
            for name, value in module.state_dict().items():
                s = self.shadow[name]
                if s.is_floating_point():
                    s.lerp_(value.detach().to(s.device, torch.float32), 1.0 - d)
                else:
                    s.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not fit the model: {sorted(missing)[:3]}")
        self.updates = int(state["updates"])
        self.shadow = {k: v.to(torch.float32) if v.is_floating_point() else v.clone()
                       for k, v in state["shadow"].items()}
