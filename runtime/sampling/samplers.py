"""Reverse-diffusion samplers as pure functions over a `denoise(x, t) -> model output` callable.

k-diffusion style: one model call per step, multistep state in locals, noise and a
per-step callback passed in, nothing hidden on objects. Every sampler takes

    sample_X(denoise, x_T, schedule, *, steps, eta, noise, callback, clip_x0, self_condition)

and returns x_0 in the model's [-1, 1] space (lucidrains normalizes [0, 1] images to it).

- `denoise(x, t)` (or `denoise(x, t, x_self_cond)` when self_condition) returns the raw
  U-Net output; `t` is an int64 array (B,) in x's namespace. `predict` turns it into
  (eps, x0) for every objective: the one place objectives are converted.
- `noise(k)` returns the k-th fresh N(0, 1) array shaped like x (k counts draws within
  one sampling run, 0-based). The caller decides where noise comes from, so tests can
  feed lucidrains' exact noise and `sampling.generate` can draw it per image.

Array API: the math uses only operators, `xp.clip` and `xp.full`, where `xp` is x's own
namespace, so CuPy arrays stay on the GPU. Coefficients are Python floats: under
NumPy 2 promotion a float32 array times a Python float stays float32 (a np.float64
scalar would silently promote the whole image to float64).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..errors import CxrError
from .schedule import Schedule, eps_from_x0, x0_from_eps, x0_from_v
from .timesteps import ddim_pairs, ddpm_pairs, default_time_grid, ode_pairs

Array = Any                                   # numpy.ndarray or cupy.ndarray
Denoise = Callable[..., Array]                # (x, t[, x_self_cond]) -> raw model output
NoiseFn = Callable[[int], Array]              # k -> N(0, 1) array shaped like x
Callback = Callable[[dict[str, Any]], None]


def array_namespace(x: Array) -> Any:
    """The array module that owns x: cupy for CuPy arrays, numpy otherwise."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return np


def predict(x: Array, out: Array, a: float, objective: str, *, clip_x0: bool,
            rederive_eps: bool = False) -> tuple[Array, Array]:
    """Model output at alpha_bar_t = a -> (eps, x0), with lucidrains' clipping rules.

    x0 is clipped to [-1, 1] when clip_x0 (the data range). eps is re-derived from the
    clipped x0 for pred_x0 / pred_v always, and for pred_noise only when
    `rederive_eps` (lucidrains `model_predictions(..., rederive_pred_noise=True)`, DDIM).
    """
    xp = array_namespace(x)
    if objective == "pred_noise":
        eps, x0 = out, x0_from_eps(x, out, a)
        if clip_x0:
            x0 = xp.clip(x0, -1.0, 1.0)
            if rederive_eps:
                eps = eps_from_x0(x, x0, a)
        return eps, x0
    if objective == "pred_x0":
        x0 = xp.clip(out, -1.0, 1.0) if clip_x0 else out
    elif objective == "pred_v":
        x0 = x0_from_v(x, out, a)
        x0 = xp.clip(x0, -1.0, 1.0) if clip_x0 else x0
    else:
        raise CxrError(f"unknown objective {objective!r}")
    return eps_from_x0(x, x0, a), x0


def _model(denoise: Denoise, x: Array, t: int, self_cond: Array | None, self_condition: bool) -> Array:
    xp = array_namespace(x)
    tt = xp.full((x.shape[0],), t, dtype=xp.int64)                   # (B,)
    return denoise(x, tt, self_cond) if self_condition else denoise(x, tt)


def _report(callback: Callback | None, i: int, n: int, t: int, t_prev: int, x: Array, x0: Array) -> None:
    if callback is not None:
        callback({"i": i, "steps": n, "t": t, "t_prev": t_prev, "x": x, "x0": x0})


def sample_ddpm(denoise: Denoise, x_T: Array, schedule: Schedule, *, steps: int | None = None,
                eta: float | None = None, noise: NoiseFn | None = None,
                callback: Callback | None = None, clip_x0: bool = True,
                self_condition: bool = False) -> Array:
    """Ancestral sampling over all T levels (Ho et al. 2020; lucidrains `p_sample_loop`).

    x_{t-1} = coef1_t * x0 + coef2_t * x_t + sqrt(posterior_var_t) * z, no z at t = 0.
    `steps`: None or T (resolve_steps refuses a user's other value, naming the flag).
    """
    T = schedule.timesteps
    if steps not in (None, T):         # a library caller's slip: it would silently run all T steps
        raise ValueError(f"steps={steps}: ddpm runs all T={T} steps")
    if noise is None:
        raise ValueError("sample_ddpm needs a noise source")
    coef1, coef2, var = schedule.posterior()
    x, x0, k = x_T, None, 0
    pairs = ddpm_pairs(T)
    for i, (t, t_prev) in enumerate(pairs):
        out = _model(denoise, x, t, x0, self_condition)
        _, x0 = predict(x, out, float(schedule.alphas_cumprod[t]), schedule.objective, clip_x0=clip_x0)
        x = float(coef1[t]) * x0 + float(coef2[t]) * x                 # posterior mean
        if t > 0:
            x = x + math.sqrt(max(float(var[t]), 1e-20)) * noise(k)
            k += 1
        _report(callback, i, len(pairs), t, t_prev, x, x0)
    return x


def sample_ddim(denoise: Denoise, x_T: Array, schedule: Schedule, *, steps: int,
                eta: float | None = 0.0, noise: NoiseFn | None = None,
                callback: Callback | None = None, clip_x0: bool = True,
                self_condition: bool = False) -> Array:
    """DDIM (Song et al. 2021) on lucidrains' grid, `eta` = 0 deterministic, 1 ~ ancestral."""
    eta = float(eta or 0.0)
    if eta < 0:                        # resolve_request refuses a user's --eta; this is a library slip
        raise ValueError(f"eta={eta} must be >= 0")
    if eta > 0 and noise is None:
        raise ValueError("sample_ddim with eta > 0 needs a noise source")
    ac = schedule.alphas_cumprod
    x, x0, k = x_T, None, 0
    pairs = ddim_pairs(schedule.timesteps, steps)
    for i, (t, t_prev) in enumerate(pairs):
        out = _model(denoise, x, t, x0, self_condition)
        a = float(ac[t])
        eps, x0 = predict(x, out, a, schedule.objective, clip_x0=clip_x0, rederive_eps=True)
        if t_prev < 0:
            x = x0
        else:
            a_next = float(ac[t_prev])
            sigma = eta * math.sqrt((1 - a / a_next) * (1 - a_next) / (1 - a))
            c = math.sqrt(max(1 - a_next - sigma ** 2, 0.0))
            x = math.sqrt(a_next) * x0 + c * eps
            if sigma > 0 and noise is not None:              # sigma > 0 needs eta > 0: noise checked above
                x = x + sigma * noise(k)
                k += 1
        _report(callback, i, len(pairs), t, t_prev, x, x0)
    return x


def sample_dpmpp_2m(denoise: Denoise, x_T: Array, schedule: Schedule, *, steps: int,
                    eta: float | None = None, noise: NoiseFn | None = None,
                    callback: Callback | None = None, clip_x0: bool = True,
                    self_condition: bool = False, time_grid: str | None = None) -> Array:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2) in VP form.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t),
    h = lambda_next - lambda_t and D the (multistep-corrected) x0 estimate:
        x_next = (sigma_next / sigma_t) * x_t - alpha_next * expm1(-h) * D
    The first step is first order; the last returns the x0 estimate of the last call.
    time_grid: one of timesteps.TIME_GRIDS; None = default_time_grid(T, steps).
    """
    ac = schedule.alphas_cumprod
    x, x0, old_x0, h_last = x_T, None, None, 0.0
    pairs = ode_pairs(ac, steps, time_grid or default_time_grid(schedule.timesteps, steps))
    for i, (t, t_prev) in enumerate(pairs):
        out = _model(denoise, x, t, x0, self_condition)
        a = float(ac[t])
        _, x0 = predict(x, out, a, schedule.objective, clip_x0=clip_x0)
        if t_prev < 0:
            x = x0
        else:
            a_next = float(ac[t_prev])
            lam, lam_next = 0.5 * math.log(a / (1 - a)), 0.5 * math.log(a_next / (1 - a_next))
            h = lam_next - lam
            d = x0
            if old_x0 is not None:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            x = math.sqrt((1 - a_next) / (1 - a)) * x - math.sqrt(a_next) * math.expm1(-h) * d
            old_x0, h_last = x0, h
        _report(callback, i, len(pairs), t, t_prev, x, x0)
    return x


SAMPLERS: dict[str, Callable[..., Array]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp-2m": sample_dpmpp_2m,
}
USES_ETA = frozenset({"ddim"})
DEFAULT_STEPS = {"ddim": 50, "dpmpp-2m": 20}        # ddpm: always T


def get_sampler(name: str) -> Callable[..., Array]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise CxrError(f"sampler {name!r} is unknown (valid: {', '.join(SAMPLERS)})") from None


def resolve_steps(sampler: str, steps: int | None, timesteps: int, what: str = "steps") -> int:
    """Model calls a run will make: T for ddpm, `steps` (or the sampler's default) otherwise.

    The one check of a user's steps (sampling.resolve_request calls it; the samplers and grid
    builders below it take the result as given): an integer in 1..T, one model call each.
    `what` names the parameter in errors (the CLI passes its flag)."""
    get_sampler(sampler)
    if sampler == "ddpm":
        if steps not in (None, timesteps):
            raise CxrError(f"{what}={steps}: ddpm runs all T={timesteps} steps; use sampler ddim or dpmpp-2m "
                           "for fewer")
        return timesteps
    steps = min(DEFAULT_STEPS[sampler], timesteps) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise CxrError(f"{what} must be an integer, got {steps!r}")
    if not 1 <= steps <= timesteps:
        raise CxrError(f"{what}={steps} is out of range: the model has T={timesteps} noise levels, "
                       f"so use 1..{timesteps}")
    return int(steps)

