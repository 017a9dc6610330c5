"""dpmpp-2m's time grid: the default beats diffusers' on trained models, and sets begun on the
0.2.0 grid are finished on it (their images do not change under a rerun or another shard)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_ddpm.runtime.backends import load_denoiser
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.outputs.sample_set import plan_set, sample_to_dir
from cxr_ddpm.runtime.sampling.samplers import sample_ddim, sample_dpmpp_2m
from cxr_ddpm.runtime.sampling.generate import resolve_request
from cxr_ddpm.runtime.outputs.shards import merge
from cxr_ddpm.runtime.sampling.timesteps import LEGACY_GRID

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.accuracy import MODELS, per_image_rmse01  # noqa: E402


@pytest.mark.parametrize("model", [pytest.param(m, marks=[pytest.mark.slow] if "1000" in m else [])
                                   for m in sorted(MODELS)])               # T = 1000: a 1000-call reference
def test_default_grid_at_least_as_accurate_as_diffusers_default_on_trained_models(model: str) -> None:
    """The committed trained models (T = 100 and T = 1000), 4 images: dpmpp-2m on its default
    grid is at least as close to the T-step DDIM run as on diffusers' default grid (the same
    solver, tests/test_samplers.py pins it to diffusers), at the step counts people use."""
    den = load_denoiser(MODELS[model])
    sched, T = den.schedule, den.schedule.timesteps
    x_T = np.random.default_rng(7).standard_normal((4, 1, 32, 32), dtype=np.float32)
    ref = sample_ddim(den, x_T, sched, steps=T)
    for steps in (5, 10, 20, 50):
        mine = np.sqrt(np.mean(per_image_rmse01(sample_dpmpp_2m(den, x_T, sched, steps=steps), ref) ** 2))
        theirs = np.sqrt(np.mean(per_image_rmse01(
            sample_dpmpp_2m(den, x_T, sched, steps=steps, time_grid="linspace"), ref) ** 2))
        assert mine <= theirs, (model, steps, mine, theirs)


def test_set_begun_on_the_0_2_grid_is_finished_on_it(tmp_path: Path, tiny_ckpt: Path) -> None:
    den = load_denoiser(tiny_ckpt)
    old = resolve_request(den, 3, sampler="dpmpp-2m", steps=5, seed=1, time_grid=LEGACY_GRID)
    new = resolve_request(den, 3, sampler="dpmpp-2m", steps=5, seed=1)
    assert new.time_grid == "logsnr" and old.time_grid == LEGACY_GRID
    rec = sample_to_dir(den, old, out=tmp_path / "set", batch_size=1)
    assert "time_grid" not in rec                    # what 0.2.0 wrote: no grid named, none hashed
    last = tmp_path / "set" / rec["files"][2]
    made = last.read_bytes()
    last.unlink()                                    # an interrupted run: the last image never landed
    assert plan_set(den, new, out=tmp_path / "set").req.time_grid == LEGACY_GRID
    again = sample_to_dir(den, new, out=tmp_path / "set", batch_size=1)
    assert again["request_sha256"] == rec["request_sha256"] and last.read_bytes() == made
    fresh = sample_to_dir(den, new, out=tmp_path / "fresh", batch_size=1)
    assert fresh["time_grid"] == "logsnr" and fresh["request_sha256"] != rec["request_sha256"]
    assert (tmp_path / "fresh" / fresh["files"][2]).read_bytes() != made


def test_other_shard_of_a_0_2_set_joins_it(tmp_path: Path, tiny_ckpt: Path) -> None:
    den = load_denoiser(tiny_ckpt)
    old = resolve_request(den, 4, sampler="dpmpp-2m", steps=5, seed=2, time_grid=LEGACY_GRID)
    new = resolve_request(den, 4, sampler="dpmpp-2m", steps=5, seed=2)
    sample_to_dir(den, old, out=tmp_path, shard=(0, 2), batch_size=2)
    sample_to_dir(den, new, out=tmp_path, shard=(1, 2), batch_size=2)   # started after the upgrade
    whole = merge(tmp_path)
    assert whole["n"] == 4 and "time_grid" not in whole
    assert sample_to_dir(den, new, out=tmp_path / "other", batch_size=4)["request_sha256"] != whole["request_sha256"]


def test_time_grid_only_for_dpmpp_2m(tiny_ckpt: Path) -> None:
    den = load_denoiser(tiny_ckpt)
    with pytest.raises(CxrError, match="time grid is for sampler dpmpp-2m"):
        resolve_request(den, 1, sampler="ddim", steps=5, time_grid="logsnr")
    with pytest.raises(CxrError, match="time grid 'karras' is unknown"):
        resolve_request(den, 1, sampler="dpmpp-2m", steps=5, time_grid="karras")
    assert resolve_request(den, 1, sampler="dpmpp-2m", steps=30).time_grid == "time-uniform"   # T = 100
