"""Exponential moving average of the U-Net weights, held in fp32 on every rank.

The shadow lives on the same device as the weights (GPU when training on a GPU):
an update is one fused `torch._foreach_lerp_` over all floating tensors, with no
copy across the PCIe bus; it moves to the CPU only when saved or sampled from.
Every rank updates its own full copy, so any rank can sample or save it. Under
ZeRO-3 a rank holds only a shard of each parameter; the update then runs inside
`deepspeed.zero.GatheredParameters` (all ranks take part in the gather; nobody
modifies the gathered values), unless fp32 masters (below) arrive whole anyway.

With bf16 (or fp16) DeepSpeed holds the module's parameters in 16 bits and the fp32
weights it actually updates (the "masters") in the optimizer. The EMA is fed the
masters: an average of the 16-bit copies averages their rounding too (measured on the
tiny model, bf16, 200 steps: the EMA then sits 1.1e-3 (relative) from the master-fed
one, a quarter of the EMA's whole distance from the online weights).
"""
from __future__ import annotations

import contextlib
from typing import Any

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


def fp32_masters(module: torch.nn.Module, optimizer: Any) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 master weight of each 16-bit parameter of `module`, by state-dict name
    ({} when the parameters are fp32: the module then holds the weights the optimizer updates).

    ZeRO-1/2/3: `deepspeed.utils.safe_get_full_fp32_param`, whole tensors on every rank (one
    collective per parameter, so every rank calls this at the same steps, as the EMA does).
    ZeRO-0 (DeepSpeed's FP16_UnfusedOptimizer, bf16 too, since ds_config always picks torch's
    AdamW): the optimizer's own per-parameter fp32 tensors, no copy.
    """
    params = dict(module.named_parameters(remove_duplicate=False))   # tied weights under each name
    if all(p.dtype == torch.float32 for p in params.values()):
        return {}
    by_id: dict[int, torch.Tensor | None] = {}
    for group, fp32 in zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", [])):
        by_id.update((id(p), v) for p, v in zip(group, fp32))
    from deepspeed.utils import safe_get_full_fp32_param
    masters: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        if id(p) not in by_id:
            by_id[id(p)] = safe_get_full_fp32_param(p)      # None: not optimized (frozen)
        master = by_id[id(p)]
        if master is not None:
            masters[name] = master
    return masters


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

    def after_step(self, module: torch.nn.Module, step: int, optimizer: Any = None) -> None:
        """Call after every optimizer step (`step` counts from 1); updates when `every` divides it.
        `optimizer`: the DeepSpeed engine's, whose fp32 masters feed the EMA of 16-bit weights."""
        if step % self.every == 0:
            self.update(module, optimizer)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, optimizer: Any = None) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadows, values = [], []
        masters = fp32_masters(module, optimizer) if optimizer is not None else {}
        # ZeRO-3: the masters arrive whole; gather the 16-bit shards only for what they miss
        whole = len(masters) == len(dict(module.named_parameters(remove_duplicate=False)))
        with contextlib.nullcontext() if whole else full_params(module, self.zero_stage):
            for name, value in module.state_dict().items():
                value = masters.get(name, value)
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
