"""A sampling request's steps are validated once, where it is resolved, in one line naming --steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_ddpm.runtime.backends import load_denoiser
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.sampling.samplers import DEFAULT_STEPS
from cxr_ddpm.runtime.sampling.generate import generate, resolve_request

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-1c52fd5.onnx"


@pytest.fixture(scope="module")
def den():
    return load_denoiser(FIXTURE, threads=1)


def test_bad_steps_are_refused_at_the_request(den) -> None:
    T = den.schedule.timesteps
    for sampler in ("ddim", "dpmpp-2m"):
        for bad in (0, T + 1, -3):
            with pytest.raises(CxrError, match=rf"^--steps={bad} is out of range: .* use 1\.\.{T}$"):
                resolve_request(den, 2, sampler=sampler, steps=bad)
        with pytest.raises(CxrError, match="^--steps must be an integer, got 2.5$"):
            resolve_request(den, 2, sampler=sampler, steps=2.5)        # type: ignore[arg-type]
    with pytest.raises(CxrError, match=f"^--steps=3: ddpm runs all T={T} steps"):
        resolve_request(den, 2, sampler="ddpm", steps=3)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m"])
def test_every_step_count_the_request_takes_runs(den, sampler: str) -> None:
    """The grid builders trust the request: their precondition (1 <= steps <= T) admits exactly
    what resolve_request admits, so its bounds and its default all sample."""
    T = den.schedule.timesteps
    for steps in (1, T, None):
        req = resolve_request(den, 1, sampler=sampler, steps=steps, seed=3)
        assert req.steps == (min(DEFAULT_STEPS[sampler], T) if steps is None else steps)
        img = generate(den, req, batch_size=1)
        assert img.shape[0] == 1 and np.isfinite(img).all()
