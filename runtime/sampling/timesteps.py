"""Timestep grids for the samplers, as explicit (t, t_prev) pairs ending at t_prev = -1.

t_prev = -1 means "the clean image": the last pair's step returns the x0 prediction,
as lucidrains' `ddim_sample` does. Explicit pairs sidestep the off-by-one in
diffusers' DDIM prev-timestep arithmetic (huggingface/diffusers #11347, #12633).

The builders are pure functions of already-validated settings: a user's steps and time
grid are checked once, with the flag named, where the request is resolved
(samplers.resolve_steps, sampling.resolve_request). `_require_steps` only guards the
precondition against a library caller that skipped that (ValueError, a programmer error).
"""
from __future__ import annotations

import numpy as np


def _require_steps(steps: int, timesteps: int) -> None:
    """Precondition of the grid builders: an integer 1 <= steps <= T. Kept because breaking it
    is silent otherwise: steps=0 gives an empty DDIM grid (the starting noise comes back as the
    "sample"), and more ODE calls than levels walk into negative timesteps."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= timesteps:
        raise ValueError(f"steps={steps!r}: a grid needs an integer in 1..T={timesteps} "
                         "(samplers.resolve_steps checks and names a user's value)")


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
    Precondition: 1 <= steps <= T (ValueError otherwise).
    """
    _require_steps(steps, timesteps)
    times = np.trunc(torch_linspace_f32(-1.0, timesteps - 1.0, steps + 1)).astype(np.int64)
    times = [int(v) for v in times[::-1]]
    return list(zip(times[:-1], times[1:]))


def ddpm_pairs(timesteps: int) -> list[tuple[int, int]]:
    """Every level: [(T-1, T-2), ..., (0, -1)] (lucidrains' p_sample_loop)."""
    return [(t, t - 1) for t in range(timesteps - 1, -1, -1)]


TIME_GRIDS = ("logsnr", "time-uniform", "time-quadratic", "linspace")
LEGACY_GRID = "time-quadratic"   # dpmpp-2m's only grid in 0.2.0: sets begun on it are finished on it


def default_time_grid(timesteps: int, steps: int) -> str:
    """dpmpp-2m's grid, chosen by measurement on trained tiny models (T = 100 and T = 1000;
    bench/results/accuracy.md): log-SNR-uniform while steps are sparse, time-uniform once
    they are dense (steps > T/4: log-SNR spacing then wants finer levels than the model has
    at both ends, and the distinct-level fix bunches the calls there; on the T = 100 model
    the two tie at 30 steps and time-uniform wins at 50)."""
    return "logsnr" if 4 * steps <= timesteps else "time-uniform"


def _distinct_ascending(times: np.ndarray, top: int) -> np.ndarray:
    """Make ascending integer levels strictly increasing, last one `top` (rounding can repeat)."""
    times = times.astype(np.int64)
    times[-1] = top
    for i in range(1, len(times)):
        times[i] = max(times[i], times[i - 1] + 1)
    if times[-1] > top:                    # only when steps is close to T: shift the top down
        times[-1] = top
        for i in range(len(times) - 2, -1, -1):
            times[i] = min(times[i], times[i + 1] - 1)
    return times


def ode_pairs(alphas_cumprod: np.ndarray, steps: int, grid: str = LEGACY_GRID) -> list[tuple[int, int]]:
    """Grid for the ODE solver (dpmpp-2m): `steps` model calls from t = T-1, the last one's x0
    estimate returned (t_prev = -1). `grid`:

    - "logsnr": uniform in log-SNR lambda_t = log(alpha_t / sigma_t) (DPM-Solver's "logSNR"
      spacing, Lu et al. 2022), each call at the nearest level: steps h = (lambda_0 -
      lambda_{T-2}) / (S - 1/2) from level T-2 up to half a step short of level 0, so that the
      final x0 estimate covers the last half step (measured: at 5 steps this beats a last call
      at t = 0 by a third; from 10 on the two are alike); the first call stays at T-1. T-2, not
      T-1: schedules cap the last beta (sigmoid, cosine), so lambda_{T-1} lies far below the
      rest (-6.4 against -2.9 at T = 100, sigmoid) and spacing from it would spend calls
      between T-1 and T-2.
    - "time-uniform": round(linspace(0, T-1, S)), last call at t = 0.
    - "time-quadratic": t_k = round((k / (S-1))^2 (T-1)) (DPM-Solver's "time_quadratic"); the
      only grid in 0.2.0, kept so that sets begun on it are finished on it.
    - "linspace": diffusers' DPMSolverMultistepScheduler default (timestep_spacing="linspace",
      final_sigmas_type="zero"): calls at round(linspace(0, T-1, S+1))[:0:-1], then the x0 jump
      from t ~ T/S. For comparison (tests/test_samplers.py pins it to diffusers).

    "time-uniform" and "time-quadratic" end with a call at t = 0, as the T-step DDIM reference does.
    Preconditions: 1 <= steps <= T, grid in TIME_GRIDS (ValueError otherwise).
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    T = len(ac)
    _require_steps(steps, T)
    if grid not in TIME_GRIDS:         # else it would silently run the last branch's grid
        raise ValueError(f"time grid {grid!r} is unknown (valid: {', '.join(TIME_GRIDS)})")
    if steps == 1:                         # one call: straight from pure noise to x0
        return [(T - 1, -1)]
    if grid == "linspace":
        times = _distinct_ascending(np.round(np.linspace(0.0, T - 1.0, steps + 1))[1:], T - 1)
    elif grid == "logsnr":
        a = np.clip(ac, 1e-12, 1 - 1e-12)                             # tiny T: a level can be 0 or 1
        lam = 0.5 * np.log(a / (1 - a))                                  # decreasing in t
        h = (lam[0] - lam[max(T - 2, 0)]) / (steps - 0.5)
        targets = lam[0] - h * (0.5 + np.arange(steps))                  # ascending t, last at lambda_{T-2}
        times = _distinct_ascending(np.abs(lam[None, :] - targets[:, None]).argmin(axis=1), T - 1)
    elif grid == "time-uniform":
        times = _distinct_ascending(np.round(np.linspace(0.0, T - 1.0, steps)), T - 1)
    else:
        times = _distinct_ascending(np.round(np.linspace(0.0, np.sqrt(T - 1), steps) ** 2), T - 1)
    seq = [int(v) for v in times[::-1]] + [-1]
    return list(zip(seq[:-1], seq[1:]))
