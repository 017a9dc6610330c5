"""Timestep grids for the samplers, as explicit (t, t_prev) pairs ending at t_prev = -1.

t_prev = -1 means "the clean image": the last pair's step returns the x0 prediction,
as lucidrains' `ddim_sample` does. Explicit pairs sidestep the off-by-one in
diffusers' DDIM prev-timestep arithmetic (huggingface/diffusers #11347, #12633).
"""
from __future__ import annotations

import numpy as np

from .errors import CxrError


def check_steps(steps: int, timesteps: int, what: str = "steps") -> int:
    """Sampling steps must be in 1..T (one model call each); CxrError otherwise."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise CxrError(f"{what} must be an integer, got {steps!r}")
    if not 1 <= steps <= timesteps:
        raise CxrError(f"{what}={steps} is out of range: the model has T={timesteps} noise levels, "
                       f"so use 1..{timesteps}")
    return int(steps)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """What `torch.linspace(start, end, steps)` (float32, CPU) returns, bit for bit.

    ATen computes step = (end - start) / (steps - 1) in float32, then element i as
    start + step * i in the first half and end - step * (steps - 1 - i) in the
    second, each as one fused multiply-add (a single rounding). The float64
    product and sum below are exact for these magnitudes, so one cast to float32
    reproduces the fused rounding. numpy's own float64 linspace differs: it can
    land an exact integer where torch lands just below it, which `.int()` truncates.
    """
    f32 = np.float32
    if steps == 1:
        return np.array([start], dtype=f32)
    s, e = f32(start), f32(end)
    step = np.float64(f32(f32(e - s) / f32(steps - 1)))
    idx = np.arange(steps, dtype=np.float64)
    lo = np.float64(s) + step * idx
    hi = np.float64(e) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, lo, hi).astype(f32)


def ddim_pairs(timesteps: int, steps: int) -> list[tuple[int, int]]:
    """lucidrains' DDIM grid: `torch.linspace(-1, T-1, S+1).int()`, reversed, paired.

    S = T gives [(T-1, T-2), ..., (0, -1)]. Exactness matters for parity tests.
    """
    check_steps(steps, timesteps)
    times = np.trunc(torch_linspace_f32(-1.0, timesteps - 1.0, steps + 1)).astype(np.int64)
    times = [int(v) for v in times[::-1]]
    return list(zip(times[:-1], times[1:]))


def ddpm_pairs(timesteps: int) -> list[tuple[int, int]]:
    """Every level: [(T-1, T-2), ..., (0, -1)] (lucidrains' p_sample_loop)."""
    return [(t, t - 1) for t in range(timesteps - 1, -1, -1)]


def ode_pairs(timesteps: int, steps: int) -> list[tuple[int, int]]:
    """Grid for ODE solvers (dpmpp-2m): S model calls at t_k = round((k / (S-1))^2 (T-1)),
    DPM-Solver's "time_quadratic" spacing, so the last call is at t = 0.

    Why not lucidrains' uniform grid: it ends with a first-order jump to x0 from
    t ~ T/S, and near t = 0 log-SNR changes fast, so uniform-in-t steps make the
    2M extrapolation ratio swing wildly. Quadratic spacing gives the solver its
    second-order convergence (tests/test_samplers.py measures the slope).
    """
    check_steps(steps, timesteps)
    if steps == 1:                         # one call: straight from pure noise to x0
        return [(timesteps - 1, -1)]
    times = np.round(np.linspace(0.0, np.sqrt(timesteps - 1), steps) ** 2).astype(np.int64)
    for i in range(1, steps):              # rounding can repeat small t: keep them distinct
        times[i] = max(times[i], times[i - 1] + 1)
    if times[-1] > timesteps - 1:          # only when S is close to T: shift the top down
        times[-1] = timesteps - 1
        for i in range(steps - 2, -1, -1):
            times[i] = min(times[i], times[i + 1] - 1)
    seq = [int(v) for v in times[::-1]] + [-1]
    return list(zip(seq[:-1], seq[1:]))
