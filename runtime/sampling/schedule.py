"""Diffusion schedule math in float64 numpy: the one source for train, export and sampling.

Matches lucidrains' GaussianDiffusion (denoising_diffusion_pytorch.py) numerically:
betas are built in float64 and cast to float32 only at a backend's boundary.

Notation (<variable name> -> <name in Ho et al. 2020 / Salimans & Ho 2022>):
- alphas_cumprod[t]  -> alpha_bar_t
- eps                -> epsilon, the noise that made x_t from x_0
- v                  -> sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x_0
- x_t                -> sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps
Timesteps are integers 0..T-1, as in lucidrains (t=0 is the least noisy level).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CxrError

OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def linear_betas(timesteps: int) -> np.ndarray:
    """Ho et al. 2020, rescaled so that other T keep the same total noise."""
    scale = 1000 / timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal 2021, https://openreview.net/forum?id=-NEXDKk8gZ"""
    t = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64) / timesteps
    ac = np.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2
    ac = ac / ac[0]
    return np.clip(1 - ac[1:] / ac[:-1], 0, 0.999)


def sigmoid_betas(timesteps: int, start: float = -3, end: float = 3, tau: float = 1) -> np.ndarray:
    """Jabri et al. 2022, https://arxiv.org/abs/2212.11972 (Figure 8)."""
    t = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64) / timesteps
    # lucidrains evaluates these two in float32 (torch.tensor(float) defaults to it): so do we
    v_start, v_end = (float(1 / (1 + np.exp(-np.float32(v)))) for v in (start / tau, end / tau))
    ac = (-_sigmoid((t * (end - start) + start) / tau) + v_end) / (v_end - v_start)
    ac = ac / ac[0]
    return np.clip(1 - ac[1:] / ac[:-1], 0, 0.999)


@dataclass(frozen=True)
class Schedule:
    """A discrete DDPM schedule: alpha_bar_t for t = 0..T-1, plus the model's objective."""

    betas: np.ndarray            # (T,) float64
    objective: str

    @classmethod
    def from_params(cls, *, timesteps: int, beta_schedule: str, objective: str,
                    cosine_s: float = 0.008, sigmoid_start: float = -3.0,
                    sigmoid_end: float = 3.0, sigmoid_tau: float = 1.0, **_: Any) -> "Schedule":
        """Build from a DiffusionConfig's fields (as a dict or the artifact metadata)."""
        if objective not in OBJECTIVES:
            raise CxrError(f"unknown objective {objective!r} (valid: {', '.join(OBJECTIVES)})")
        if beta_schedule == "linear":
            betas = linear_betas(timesteps)
        elif beta_schedule == "cosine":
            betas = cosine_betas(timesteps, cosine_s)
        elif beta_schedule == "sigmoid":
            betas = sigmoid_betas(timesteps, sigmoid_start, sigmoid_end, sigmoid_tau)
        else:
            raise CxrError(f"unknown beta schedule {beta_schedule!r} (valid: linear, cosine, sigmoid)")
        return cls(betas=betas, objective=objective)

    @classmethod
    def from_config(cls, diffusion: Any) -> "Schedule":
        import dataclasses
        return cls.from_params(**dataclasses.asdict(diffusion))

    @property
    def timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.concatenate([[1.0], self.alphas_cumprod[:-1]])

    def digest(self) -> str:
        """sha256 of alphas_cumprod as float64 little-endian bytes: pins the exact schedule."""
        return hashlib.sha256(self.alphas_cumprod.astype("<f8").tobytes()).hexdigest()

    def posterior(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, var), each (T,), as lucidrains."""
        ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        var = self.betas * (1.0 - ac_prev) / (1.0 - ac)
        coef1 = self.betas * np.sqrt(ac_prev) / (1.0 - ac)
        coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - self.betas) / (1.0 - ac)
        return coef1, coef2, var


# -----------------------------------------------------------------------------
# objective conversions, elementwise over arrays. `a` is alpha_bar_t as a Python float: the
# coefficients are then computed in float64 and applied without changing the arrays' dtype
# (NumPy 2 keeps float32 * float as float32), exactly like lucidrains' float64->float32 buffers.
# Only + - * / on the operands' own array type: CuPy arrays work too.

def x0_from_eps(x_t: Any, eps: Any, a: Any) -> Any:
    return (1.0 / a) ** 0.5 * x_t - (1.0 / a - 1.0) ** 0.5 * eps


def eps_from_x0(x_t: Any, x0: Any, a: Any) -> Any:
    return ((1.0 / a) ** 0.5 * x_t - x0) / (1.0 / a - 1.0) ** 0.5


def x0_from_v(x_t: Any, v: Any, a: Any) -> Any:
    return a ** 0.5 * x_t - (1.0 - a) ** 0.5 * v


def v_from_x0_eps(x0: Any, eps: Any, a: Any) -> Any:
    return a ** 0.5 * eps - (1.0 - a) ** 0.5 * x0


def q_sample(x0: Any, eps: Any, a: Any) -> Any:
    """x_t from x_0 and noise."""
    return a ** 0.5 * x0 + (1.0 - a) ** 0.5 * eps
