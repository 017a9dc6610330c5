"""Samplers against closed forms: an analytic denoiser, convergence order, lucidrains' grid."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.sampling.samplers import (SAMPLERS, predict, resolve_steps, sample_ddim, sample_ddpm,
                                       sample_dpmpp_2m)
from cxr_ddpm.runtime.sampling.schedule import Schedule, v_from_x0_eps
from cxr_ddpm.runtime.sampling.timesteps import (LEGACY_GRID, TIME_GRIDS, ddim_pairs, default_time_grid, ode_pairs,
                                        torch_linspace_f32)

MU, SD = 0.2, 0.3                        # data: every pixel ~ N(MU, SD^2), inside [-1, 1]
CASES = [("pred_v", "sigmoid"), ("pred_noise", "linear"), ("pred_x0", "cosine")]


def gaussian_denoiser(schedule: Schedule):
    """The optimal (Bayes) model output for Gaussian data, in the schedule's objective."""
    ac = schedule.alphas_cumprod

    def denoise(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and t.dtype == np.int64
        a = float(ac[int(t[0])])
        x0 = MU + (a ** 0.5 * SD ** 2 / (a * SD ** 2 + 1 - a)) * (x - a ** 0.5 * MU)   # E[x0 | x_t]
        eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
        out = {"pred_noise": eps, "pred_x0": x0, "pred_v": v_from_x0_eps(x0, eps, a)}
        return out[schedule.objective].astype(np.float32)
    return denoise


def exact_ode_endpoint(schedule: Schedule, x_T: np.ndarray, t_end: int = 0) -> np.ndarray:
    """Probability-flow ODE from t = T-1 to t_end (for 1-D Gaussians it keeps the standardized
    value), then the x0 estimate there: what a sampler whose last model call is at t_end returns."""
    ac = schedule.alphas_cumprod
    aT, a0 = ac[-1], ac[t_end]
    z = (x_T.astype(np.float64) - aT ** 0.5 * MU) / np.sqrt(aT * SD ** 2 + 1 - aT)
    x_0 = a0 ** 0.5 * MU + np.sqrt(a0 * SD ** 2 + 1 - a0) * z
    return MU + (a0 ** 0.5 * SD ** 2 / (a0 * SD ** 2 + 1 - a0)) * (x_0 - a0 ** 0.5 * MU)


def test_ddim_grid_is_torch_linspace_exactly() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    cases = [(T, S) for T in range(1, 41) for S in range(1, T + 1)]
    cases += [(T, S) for T in (100, 250, 999, 1000, 1001, 4000) for S in range(1, T + 1, max(1, T // 300))]
    cases += [(int(T), int(rng.integers(1, T + 1))) for T in rng.integers(2, 5000, 300)]
    for T, S in cases:
        ref = torch.linspace(-1, T - 1, steps=S + 1)
        assert np.array_equal(torch_linspace_f32(-1.0, T - 1.0, S + 1), ref.numpy()), (T, S)
        times = list(reversed(ref.int().tolist()))
        assert ddim_pairs(T, S) == list(zip(times[:-1], times[1:])), (T, S)


def ac_of(T: int, beta_schedule: str = "sigmoid") -> np.ndarray:
    return Schedule.from_params(timesteps=T, beta_schedule=beta_schedule, objective="pred_v").alphas_cumprod


@pytest.mark.parametrize("grid", TIME_GRIDS)
@pytest.mark.parametrize("T,S", [(1, 1), (2, 1), (2, 2), (3, 2), (100, 1), (100, 2), (100, 20), (100, 99),
                                 (100, 100), (1000, 37), (1000, 1000)])
def test_ode_grid_distinct_and_ends_at_zero(T: int, S: int, grid: str) -> None:
    for sched in ("sigmoid", "linear", "cosine"):
        pairs = ode_pairs(ac_of(T, sched), S, grid)
        ts = [t for t, _ in pairs]
        assert len(pairs) == S and ts[0] == T - 1 and pairs[-1][1] == -1
        assert ts == sorted(set(ts), reverse=True) and all(p == n for (_, p), (n, _) in zip(pairs, pairs[1:]))
        assert S == 1 or ts[-1] == 0 or grid == "logsnr" or (grid == "linspace" and ts[-1] == round((T - 1) / S))


def test_legacy_grid_is_the_0_2_grid() -> None:
    """Sets begun by 0.2.0 are finished on its grid: it must not move (values from 0.2.0)."""
    assert [t for t, _ in ode_pairs(ac_of(100), 5, LEGACY_GRID)] == [99, 56, 25, 6, 0]
    assert [t for t, _ in ode_pairs(ac_of(1000), 10, LEGACY_GRID)] == [999, 789, 604, 444, 308, 197, 111,
                                                                         49, 12, 0]
    assert [t for t, _ in ode_pairs(ac_of(100), 20, LEGACY_GRID)][-6:] == [7, 4, 3, 2, 1, 0]


def test_default_grid_rule_and_logsnr_spacing() -> None:
    assert [default_time_grid(100, s) for s in (5, 10, 20, 25, 26, 50)] == ["logsnr"] * 4 + ["time-uniform"] * 2
    assert all(default_time_grid(1000, s) == "logsnr" for s in (5, 10, 20, 50, 250))
    ac = ac_of(1000)
    lam = 0.5 * np.log(ac / (1 - ac))
    ts = [t for t, _ in ode_pairs(ac, 10, "logsnr")]
    h = (lam[0] - lam[998]) / 9.5
    gaps = np.diff(lam[ts[1:]])                       # after the first call (T-1): equal log-SNR steps
    assert np.ptp(gaps) < 0.15 * h and abs(gaps.mean() - h) < 0.05 * h       # up to the nearest levels
    assert abs(lam[ts[-1]] - (lam[0] - h / 2)) < 0.2 * h          # the last call half a step short of t = 0
    with pytest.raises(ValueError, match="time grid 'karras' is unknown"):   # resolve_request names it to users
        ode_pairs(ac, 10, "karras")


@pytest.mark.parametrize("bad", [0, 101, -3, 2.5])
def test_grid_preconditions_are_programmer_errors(bad) -> None:
    """Below the request the steps are trusted; a library caller that skipped resolve_steps gets a
    ValueError (not a user's one-line CxrError) instead of the starting noise or negative timesteps."""
    sched = Schedule.from_params(timesteps=100, beta_schedule="sigmoid", objective="pred_v")
    x_T = np.zeros((1, 1, 4, 4), np.float32)
    den = gaussian_denoiser(sched)
    for call in (lambda: ddim_pairs(100, bad), lambda: ode_pairs(sched.alphas_cumprod, bad, "logsnr"),
                 lambda: sample_ddim(den, x_T, sched, steps=bad), lambda: sample_dpmpp_2m(den, x_T, sched, steps=bad)):
        with pytest.raises(ValueError, match=r"a grid needs an integer in 1\.\.T=100") as err:
            call()
        assert not isinstance(err.value, CxrError)
    with pytest.raises(ValueError, match="ddpm runs all T=100"):
        sample_ddpm(den, x_T, sched, steps=10, noise=lambda k: x_T)


def diffusers_default(den, x_T: np.ndarray, sched: Schedule, steps: int) -> np.ndarray:
    """diffusers' DPMSolverMultistepScheduler with its defaults (the schedule's own betas)."""
    torch = pytest.importorskip("torch")
    from diffusers import DPMSolverMultistepScheduler
    ac = sched.alphas_cumprod
    betas = 1 - ac / np.concatenate([[1.0], ac[:-1]])
    kind = {"pred_v": "v_prediction", "pred_noise": "epsilon", "pred_x0": "sample"}[sched.objective]
    dpm = DPMSolverMultistepScheduler(num_train_timesteps=sched.timesteps, trained_betas=betas.tolist(),
                                      prediction_type=kind)
    assert (dpm.config.timestep_spacing, dpm.config.final_sigmas_type, dpm.config.solver_order,
            dpm.config.lower_order_final, dpm.config.algorithm_type) == ("linspace", "zero", 2, True, "dpmsolver++")
    dpm.set_timesteps(steps)
    x = torch.from_numpy(x_T.copy())
    for t in dpm.timesteps:
        out = den(x.numpy(), np.full((len(x_T),), int(t), np.int64))
        x = dpm.step(torch.from_numpy(out), t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("objective,beta_schedule", CASES)
@pytest.mark.parametrize("T", [100, 1000])
def test_dpmpp_2m_matches_diffusers_on_its_grid(objective: str, beta_schedule: str, T: int) -> None:
    pytest.importorskip("diffusers", reason="diffusers is not a dependency; pip install diffusers to compare")
    sched = Schedule.from_params(timesteps=T, beta_schedule=beta_schedule, objective=objective)
    den = gaussian_denoiser(sched)
    x_T = np.random.default_rng(5).standard_normal((2, 1, 8, 8), dtype=np.float32)
    for steps in (5, 10, 20, 50):
        want = diffusers_default(den, x_T, sched, steps)
        got = sample_dpmpp_2m(den, x_T, sched, steps=steps, clip_x0=False, time_grid="linspace")
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_predict_recovers_eps_and_x0(objective: str) -> None:
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-0.9, 0.9, (2, 1, 4, 4)).astype(np.float32)
    eps = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    a = 0.37
    x = (a ** 0.5 * x0 + (1 - a) ** 0.5 * eps).astype(np.float32)
    out = {"pred_noise": eps, "pred_x0": x0, "pred_v": v_from_x0_eps(x0, eps, a)}[objective]
    got_eps, got_x0 = predict(x, out, a, objective, clip_x0=True, rederive_eps=True)
    assert got_eps.dtype == got_x0.dtype == np.float32          # Python-float coefficients keep fp32
    np.testing.assert_allclose(got_x0, x0, atol=2e-5)
    np.testing.assert_allclose(got_eps, eps, atol=2e-5)


@pytest.mark.parametrize("objective,beta_schedule", CASES)
@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 200), ("dpmpp-2m", 20)])
def test_samples_match_data_distribution(objective: str, beta_schedule: str, sampler: str,
                                         steps: int | None) -> None:
    sched = Schedule.from_params(timesteps=1000, beta_schedule=beta_schedule, objective=objective)
    rng = np.random.default_rng(2)
    x_T = rng.standard_normal((8, 1, 32, 32), dtype=np.float32)            # 8192 pixel samples
    x = SAMPLERS[sampler](gaussian_denoiser(sched), x_T, sched, steps=steps, clip_x0=False,
                          noise=lambda k: rng.standard_normal(x_T.shape, dtype=np.float32))
    assert x.dtype == np.float32 and x.shape == x_T.shape
    # the last step returns E[x0 | x_t] at the last model call, which shrinks the spread a little
    # (lucidrains' DDIM grid ends at t ~ T/S - 1): compare with that exact endpoint's std
    t_end = ddim_pairs(1000, steps)[-1][0] if sampler == "ddim" else 0
    want_sd = float(exact_ode_endpoint(sched, rng.standard_normal(200_000), t_end).std())
    assert abs(float(x.mean()) - MU) < 0.015, x.mean()
    assert abs(float(x.std()) / want_sd - 1) < 0.05, (x.std(), want_sd)


@pytest.mark.parametrize("objective,beta_schedule", CASES)
@pytest.mark.parametrize("grid,steps", [("time-quadratic", [10, 20, 40, 80]), ("logsnr", [20, 40, 80, 160])])
def test_dpmpp_2m_converges_quadratically(objective: str, beta_schedule: str, grid: str, steps: list[int]) -> None:
    sched = Schedule.from_params(timesteps=1000, beta_schedule=beta_schedule, objective=objective)
    den = gaussian_denoiser(sched)
    x_T = np.random.default_rng(3).standard_normal((2, 1, 32, 32), dtype=np.float32)
    exact = exact_ode_endpoint(sched, x_T)
    ref = sample_ddim(den, x_T, sched, steps=1000, clip_x0=False)           # 1000-step DDIM
    assert np.sqrt(np.mean((ref - exact) ** 2)) < 0.01                      # first order, small h
    err = [np.sqrt(np.mean((sample_dpmpp_2m(den, x_T, sched, steps=s, clip_x0=False, time_grid=grid)
                            - exact) ** 2)) for s in steps]
    slope = np.polyfit(np.log(steps), np.log(err), 1)[0]
    assert slope <= -1.5, (err, slope)
    ddim_err = np.sqrt(np.mean((sample_ddim(den, x_T, sched, steps=20, clip_x0=False) - ref) ** 2))
    err20_vs_ref = np.sqrt(np.mean((sample_dpmpp_2m(den, x_T, sched, steps=20, clip_x0=False) - ref) ** 2))
    assert err20_vs_ref < ddim_err                                          # the point of 2M


def test_clip_keeps_samples_in_range() -> None:
    sched = Schedule.from_params(timesteps=100, beta_schedule="sigmoid", objective="pred_v")
    x_T = np.random.default_rng(4).standard_normal((2, 1, 8, 8), dtype=np.float32) * 3
    wild = lambda x, t: (x * 5).astype(np.float32)                          # noqa: E731
    for name in ("ddim", "dpmpp-2m"):
        x = SAMPLERS[name](wild, x_T, sched, steps=10, clip_x0=True)
        assert np.abs(x).max() <= 1.0


def test_sampler_argument_errors() -> None:
    for bad in (0, 101, -3, 2.5, True):
        with pytest.raises(CxrError, match="out of range|must be an integer"):     # the user-facing check
            resolve_steps("ddim", bad, 100)
    with pytest.raises(CxrError, match="^--steps=10: ddpm runs all T=100"):
        resolve_steps("ddpm", 10, 100, what="--steps")
    assert resolve_steps("ddim", np.int64(7), 100) == 7
    with pytest.raises(CxrError, match="unknown"):
        resolve_steps("euler", 10, 100)
    assert resolve_steps("ddpm", None, 100) == 100 and resolve_steps("dpmpp-2m", None, 10) == 10
