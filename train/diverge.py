"""A diverged run stops: the first non-finite loss or gradient norm ends training.

The host never waits for the device inside a step, so each step's verdict is kept on the
device (a few scalar kernels) and read at the ranks' next sync (loop.Clock). Saves and
sample grids happen at sync steps only, so nothing is written from weights trained past the
first bad step: the last checkpoint on disk is the last finite one.

Skipped steps: fp32 and bf16 have no loss scaler, so a non-finite gradient norm is
divergence at once (MAX_SKIPPED_STEPS 0; the loss is never excused). Under fp16 DeepSpeed's
dynamic loss scaler skips a step whose scaled gradients overflow and halves the scale (the
first overflow only uses up `hysteresis` = 2); from cxr-train's initial 2**16 that is at most
1 + 16 skipped steps in a row down to a scale of 1, so more than that is divergence too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

EXIT_DIVERGED = 3                                  # cxr-train fit's exit status for a diverged run
MAX_SKIPPED_STEPS = {"fp32": 0, "bf16": 0, "fp16": 17}   # consecutive non-finite gradient norms excused


@dataclass(frozen=True)
class Divergence:
    step: int                  # first optimizer step whose loss or gradient norm was not finite
    loss: float
    grad_norm: float | None    # None: the engine reports no norm (ZeRO-0 without clipping)
    skipped: int               # non-finite gradient norms in a row up to `step` (fp16 excuses some)

    def message(self, lr: float, warmup_steps: int, last_ckpt: int | None) -> str:
        what = (f"loss is {_name(self.loss)}" + (f" (grad_norm {_name(self.grad_norm)})"
                                                  if self.grad_norm is not None else "")
                if not math.isfinite(self.loss) else
                f"grad_norm is {_name(self.grad_norm)} for {self.skipped} step(s) in a row (loss {self.loss:.4g})")
        kept = (f"the last finite checkpoint is step {last_ckpt}" if last_ckpt is not None
                else "no checkpoint was written")
        return (f"training diverged at step {self.step}: {what}; lower train.lr (now {_num(lr)}) or raise "
                f"train.warmup_steps (now {warmup_steps}); {kept}")


class NonFiniteWatch:
    """Per-rank, on the device: the first step with a non-finite loss, or with more than
    `max_skipped` non-finite gradient norms in a row, and the loss / norm seen there."""

    def __init__(self, dev: torch.device, max_skipped: int):
        self.dev, self.max_skipped = dev, max_skipped
        z = torch.zeros((), device=dev)
        self.first, self.loss, self.grad, self.run, self.run_at_first = z, z, z, z, z
        self.has_grad = False

    def update(self, step: int, loss: torch.Tensor, grad_norm: Any) -> None:
        """After optimizer step `step`: `loss` on the device, `grad_norm` as the engine gives it
        (float, tensor or None). Only device kernels: no host sync."""
        loss = loss.detach().float().reshape(())
        grad = _on_device(grad_norm, self.dev)
        if grad is None:
            grad_bad = torch.zeros((), dtype=torch.bool, device=self.dev)
            grad = torch.zeros((), device=self.dev)
        else:
            self.has_grad = True
            grad_bad = ~torch.isfinite(grad)
        self.run = torch.where(grad_bad, self.run + 1, torch.zeros_like(self.run))
        new = (~torch.isfinite(loss) | (self.run > self.max_skipped)) & (self.first == 0)
        self.first = torch.where(new, float(step), self.first)
        self.loss = torch.where(new, loss, self.loss)
        self.grad = torch.where(new, grad, self.grad)
        self.run_at_first = torch.where(new, self.run, self.run_at_first)

    def flag(self) -> torch.Tensor:
        """1.0 once this rank has seen divergence, for the sync's all-reduce."""
        return (self.first > 0).float()

    def verdict(self) -> Divergence | None:
        """This rank's record (reads the device: call at a sync, once the flag is up)."""
        first, loss, grad, run = (float(v) for v in torch.stack(
            [self.first, self.loss, self.grad, self.run_at_first]).tolist())
        if first == 0:
            return None
        return Divergence(int(first), loss, grad if self.has_grad else None, int(run))


def earliest(verdicts: list[Divergence | None]) -> Divergence:
    """The first divergence over all ranks (their all_gather'd verdicts)."""
    return min((v for v in verdicts if v is not None), key=lambda v: v.step)


def first_divergence(watch: NonFiniteWatch) -> Divergence:
    """Collective, once a sync saw the flag up on some rank: the earliest record of all ranks."""
    import torch.distributed as dist
    verdicts: list[Divergence | None] = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, watch.verdict())
    return earliest(verdicts)


def _on_device(value: Any, dev: torch.device) -> torch.Tensor | None:
    if value is None:
        return None
    if torch.is_tensor(value):
        return value.detach().float().reshape(()).to(dev, non_blocking=True)
    return torch.full((), float(value), device=dev)   # a fill kernel: no host-to-device copy to wait on


def _name(x: float | None) -> str:
    return "NaN" if x is None or math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else f"{x:.4g}"


def _num(x: float) -> str:
    """1e6, not 1e+06: the form a user types in --set."""
    return f"{x:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
