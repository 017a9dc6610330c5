"""Runtime samplers vs lucidrains' GaussianDiffusion from identical noise, torch and ORT backends."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_ddpm.runtime.backends import load_denoiser
from cxr_ddpm.runtime.sampling.samplers import sample_ddim, sample_ddpm
from cxr_ddpm.runtime.sampling.generate import generate, resolve_request

from builders import export_tiny_onnx

TOL = 1e-4


@pytest.fixture(scope="module")
def lucid(tiny_ckpt: Path):
    """lucidrains' GaussianDiffusion around the same EMA U-Net."""
    from cxr_ddpm.train.checkpoint import load_checkpoint
    from cxr_ddpm.train.model import build_diffusion
    ck = load_checkpoint(tiny_ckpt)
    return build_diffusion(ck.cfg, ck.build_unet()).eval()


def run_lucid(monkeypatch: pytest.MonkeyPatch, fn, arrays: list[np.ndarray], shape) -> np.ndarray:
    """Call a lucidrains sampler with torch.randn / randn_like returning `arrays` in order;
    result mapped back to [-1, 1] (lucidrains unnormalizes to [0, 1])."""
    import torch
    it = iter(arrays)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.from_numpy(next(it).copy()))
    monkeypatch.setattr(torch, "randn_like", lambda x, **k: torch.from_numpy(next(it).copy()))
    out = fn(shape).numpy() * 2 - 1
    monkeypatch.undo()
    return out


@pytest.fixture(scope="module")
def noise(lucid) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (2, 1, lucid.image_size[0], lucid.image_size[1])
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(lucid.num_timesteps + 1)]


@pytest.fixture(scope="module", params=["torch", "onnx"])
def denoiser(request: pytest.FixtureRequest, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    path = tiny_ckpt if request.param == "torch" else export_tiny_onnx(tmp_path_factory, tiny_ckpt)
    den = load_denoiser(path, threads=1)     # one thread: other jobs share these 2 cores
    assert den.backend == request.param
    return den


def test_ddpm_matches_p_sample_loop(denoiser, lucid, noise, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = run_lucid(monkeypatch, lucid.p_sample_loop, noise, noise[0].shape)
    ours = sample_ddpm(denoiser, noise[0], denoiser.schedule, noise=lambda k: noise[k + 1])
    assert ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("steps", [7, 100])
def test_ddim_matches_ddim_sample(denoiser, lucid, noise, monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    lucid.sampling_timesteps, lucid.ddim_sampling_eta = steps, 0.0
    theirs = run_lucid(monkeypatch, lucid.ddim_sample, noise, noise[0].shape)
    ours = sample_ddim(denoiser, noise[0], denoiser.schedule, steps=steps, eta=0.0)
    assert np.abs(ours - theirs).max() <= TOL


def test_ddim_eta_matches_ddim_sample(denoiser, lucid, noise, monkeypatch: pytest.MonkeyPatch) -> None:
    lucid.sampling_timesteps, lucid.ddim_sampling_eta = 20, 1.0
    theirs = run_lucid(monkeypatch, lucid.ddim_sample, noise, noise[0].shape)
    ours = sample_ddim(denoiser, noise[0], denoiser.schedule, steps=20, eta=1.0, noise=lambda k: noise[k + 1])
    assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("dpmpp-2m", 5), ("ddpm", None)])
def test_batch_size_does_not_change_images(onnx_path: Path, sampler: str, steps: int | None) -> None:
    den = load_denoiser(onnx_path, threads=1)
    req = resolve_request(den, 3, sampler=sampler, steps=steps, seed=7, eta=1.0 if sampler == "ddim" else None)
    one = generate(den, req, batch_size=1)
    assert np.array_equal(one, generate(den, req, batch_size=2))          # batches [0, 1], [2]
    assert np.array_equal(one[1:], generate(den, req, batch_size=2, indices=[1, 2]))   # a shard's share
    if sampler != "ddpm":                                                # ddpm: 100 steps, keep it short
        assert np.array_equal(one, generate(den, req, batch_size=3))
        other = resolve_request(den, 3, sampler=sampler, steps=steps, seed=8, eta=req.eta)
        assert not np.array_equal(one, generate(den, other, batch_size=3))
    assert not np.array_equal(one[0], one[1])


def test_onnx_and_torch_backends_agree(onnx_path: Path, tiny_ckpt: Path) -> None:
    ort, ref = load_denoiser(onnx_path, threads=1), load_denoiser(tiny_ckpt, threads=1)
    a = generate(ort, resolve_request(ort, 2, sampler="dpmpp-2m", steps=10, seed=3), batch_size=2)
    b = generate(ref, resolve_request(ref, 2, sampler="dpmpp-2m", steps=10, seed=3), batch_size=2)
    assert np.abs(a - b).max() <= TOL
