"""Exponential moving average of the U-Net weights, held in fp32 on every rank.

The shadow lives on the same device as the weights (GPU when training on a GPU):
an update is one fused `torch._foreach_lerp_` over all floating tensors, with no
copy across the PCIe bus; it moves to the CPU only when saved or sampled from.
Every rank updates its own full copy, so any rank can sample or save it. Under
ZeRO-3 a rank holds only a shard of each parameter; the update then runs inside
`deepspeed.zero.GatheredParameters` (all ranks take part in the gather; nobody
modifies the gathered values).
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

    The warmup `min(decay, (1 + n) / (10 + n))` (n = updates so far) lets the average
    forget the random initialisation within the first few hundred updates instead of
    thousands. With `every` > 1 the update runs after every `every`-th optimizer step
    only (lucidrains' Trainer: 10), with the same per-update decay and warmup.
    """

    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int, every: int = 1):
        self.decay = decay
        self.zero_stage = zero_stage
        self.every = every
        self.updates = 0
        with full_params(module, zero_stage):  # fp32 copies beside the weights, same device
            self.shadow = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                           for k, v in module.state_dict().items()}

    def after_step(self, module: torch.nn.Module, step: int) -> None:
        """Call after every optimizer step (`step` counts from 1); updates when `every` divides it."""
        if step % self.every == 0:
            self.update(module)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadows, values = [], []
        with full_params(module, self.zero_stage):
            for name, value in module.state_dict().items():
                s = self.shadow[name]
                if s.is_floating_point():
                    shadows.append(s)
                    values.append(value.detach().to(s.device, torch.float32))  # no copy when already fp32
                else:
                    s.copy_(value)
            if shadows:
                torch._foreach_lerp_(shadows, values, 1.0 - d)
        self.updates += 1

    def cpu_shadow(self) -> dict[str, torch.Tensor]:
        """The shadow on the CPU (a copy when it lives on a GPU): for checkpoints and sample grids."""
        return {k: v.to("cpu") for k, v in self.shadow.items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.cpu_shadow()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not fit the model: {sorted(missing)[:3]}")
        self.updates = int(state["updates"])
        with torch.no_grad():
            for k, v in state["shadow"].items():
                self.shadow[k].copy_(v)  # keeps the shadow's device and dtype
