"""GPU decisions made on CPU: the SDPA kernel policy, the CPU override, one GPU per rank.

lucidrains' `Attend` configures nothing when CUDA is absent, so these tests call the
policy as a pure function of (dtype, compute capability) and check the attribute its
forward reads on CUDA (`cuda_config`). The `gpu` test at the end runs the real thing.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from denoising_diffusion_pytorch.attend import Attend
from torch.nn.attention import SDPBackend as B

from cxr_ddpm.train.config import load_config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.train.dist import check_gpus_per_node, local_world_size, resolve_world, wants_cuda
from cxr_ddpm.train.model import attention_config, attention_summary, build_diffusion, build_unet, sdpa_backends

ROOT = Path(__file__).resolve().parents[1]
CXR128 = ROOT / "configs" / "cxr128.yaml"
HOPPER, ADA, AMPERE, TURING = (9, 0), (8, 9), (8, 0), (7, 5)


def test_fp32_never_asks_for_flash_and_always_has_a_kernel():
    # the H100 failure: lucidrains allowed only FLASH above sm80, which has no fp32 kernel
    for cc in (HOPPER, ADA, AMPERE, TURING):
        assert sdpa_backends(torch.float32, cc) == (B.EFFICIENT_ATTENTION, B.MATH)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert B.MATH in sdpa_backends(dtype, cc)


def test_half_precision_gets_flash_and_cudnn_from_ampere():
    assert sdpa_backends(torch.bfloat16, HOPPER) == (B.FLASH_ATTENTION, B.CUDNN_ATTENTION,
                                                     B.EFFICIENT_ATTENTION, B.MATH)
    assert sdpa_backends(torch.float16, AMPERE)[:2] == (B.FLASH_ATTENTION, B.CUDNN_ATTENTION)
    assert sdpa_backends(torch.float16, TURING) == (B.EFFICIENT_ATTENTION, B.MATH)
    assert sdpa_backends(torch.bfloat16, TURING) == (B.MATH,)      # no bf16 mem-efficient before sm80


def _attends(unet: torch.nn.Module) -> list[Attend]:
    return [m for m in unet.modules() if isinstance(m, Attend) and m.flash]


@pytest.mark.parametrize("cc, want", [
    (HOPPER, {B.FLASH_ATTENTION, B.CUDNN_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH}),
    (TURING, {B.EFFICIENT_ATTENTION, B.MATH}),     # no flash/cuDNN before sm80
])
def test_build_unet_applies_the_policy(cc, want):
    m = load_config(CXR128).model
    assert m.flash_attn
    attends = _attends(build_unet(m, capability=cc))
    assert attends
    for a in attends:   # what Attend.flash_attn passes to sdpa_kernel for CUDA inputs
        assert set(a.cuda_config.backends) == want          # fp32 sampling and bf16 training both served
    assert "flash" in attention_summary(m, HOPPER) and "math" in attention_summary(m, HOPPER)


# denoising-diffusion-pytorch releases against what this project calls (wheels from PyPI, each
# put on PYTHONPATH in turn, model.py built and run on CPU; issue 18.5):
#   2.0.0           AttentionConfig(enable_flash, enable_math, enable_mem_efficient); Unet has no dropout
#   2.0.10 - 2.2.4  the same three-flag AttentionConfig: the CUDA policy raises TypeError
#   2.2.5 - 2.3.1   AttentionConfig(backends) (torch.nn.attention.sdpa_kernel), but the conditional
#                   Unet.forward has no cond_keep_mask (Denoiser passes it): TypeError
#   2.3.2, 2.3.4    everything model.py uses (there is no 2.3.3 on PyPI)
FIRST_WORKING_LUCIDRAINS = "2.3.2"


def test_installed_lucidrains_takes_our_attention_config():
    # the object model.py builds for an H100 in bf16 (an old release: TypeError), used where
    # lucidrains uses its own: Attend.flash_attn passes its fields to sdpa_kernel (CPU config here)
    attend = Attend(flash=True)
    attend.cpu_config = attention_config(HOPPER)
    q = torch.randn(1, 2, 16, 8)
    torch.testing.assert_close(attend(q, q, q), Attend(flash=False)(q, q, q), rtol=1e-4, atol=1e-5)


def test_pyproject_pins_the_first_working_lucidrains():
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    train = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    (pin,) = [Requirement(r) for r in train if Requirement(r).name == "denoising-diffusion-pytorch"]
    assert pin.specifier.contains(FIRST_WORKING_LUCIDRAINS)
    assert not pin.specifier.contains("2.3.1") and not pin.specifier.contains("2.2.4"), pin
    assert Version(version("denoising-diffusion-pytorch")) in pin.specifier   # this venv meets it


def test_readme_conditional_command_builds():
    # README: cxr-train fit --config configs/cxr128.yaml --set model.num_classes=4 --set diffusion.beta_schedule=cosine
    cfg = load_config(CXR128, ["model.num_classes=4", "diffusion.beta_schedule=cosine"])
    assert cfg.model.flash_attn
    unet = build_unet(cfg.model, capability=HOPPER)
    build_diffusion(cfg, unet)
    assert "no effect" in attention_summary(cfg.model, HOPPER)
    with pytest.raises(CxrError, match="self_condition or dropout"):
        build_unet(replace(cfg.model, dropout=0.1))


# -----------------------------------------------------------------------------
# CXR_DEVICE and ranks per node

def test_cxr_device_override():
    assert wants_cuda({}, True) and not wants_cuda({}, False)
    assert not wants_cuda({"CXR_DEVICE": "cpu"}, True)
    assert wants_cuda({"CXR_DEVICE": "cuda"}, True)
    with pytest.raises(CxrError, match="CXR_DEVICE='gpu'"):
        wants_cuda({"CXR_DEVICE": "gpu"}, True)
    with pytest.raises(CxrError, match="no CUDA device"):
        wants_cuda({"CXR_DEVICE": "cuda"}, False)


def test_more_ranks_per_node_than_gpus_refused():
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert local_world_size(torchrun, resolve_world(torchrun)) == 2
    srun = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "MASTER_ADDR": "n1",
            "MASTER_PORT": "29500", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    assert local_world_size(srun, resolve_world(srun)) == 4
    check_gpus_per_node(4, 4)
    with pytest.raises(CxrError, match="2 ranks per node but 1 CUDA device") as e:
        check_gpus_per_node(2, 1)
    assert "CXR_DEVICE=cpu" in str(e.value) and "\n" not in str(e.value)


# -----------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_fp32_bf16_sample_grid_and_torch_sampler(tmp_path):
    """On a GPU above sm80: the forwards that failed with "No available kernel"."""
    from PIL import Image

    from cxr_ddpm.runtime.sampling.samplers import sample_dpmpp_2m
    from cxr_ddpm.runtime.sampling.schedule import Schedule
    from cxr_ddpm.train.checkpoint import save_checkpoint
    from cxr_ddpm.train.grid import sample_grid
    from cxr_ddpm.train.torch_backend import TorchDenoiser

    cfg = load_config(CXR128, ["train.num_samples=4", "train.sample_steps=3"])
    torch.manual_seed(0)
    unet = build_unet(cfg.model).cuda()
    x = torch.randn(2, 1, 128, 128, device="cuda")
    t = torch.full((2,), 10, device="cuda", dtype=torch.long)
    with torch.no_grad():
        fp32 = unet(x, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = unet(x, t)
    assert torch.isfinite(fp32).all() and torch.isfinite(bf16).all()
    # bf16 training forward + backward, as DeepSpeed's engine runs it
    with torch.autocast("cuda", dtype=torch.bfloat16):
        unet(x, t).float().square().mean().backward()
    sd = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    grid = sample_grid(cfg, sd, tmp_path / "grid.png", torch.device("cuda"))   # the in-training EMA grid, fp32
    assert Image.open(grid).size == (2 + 2 * 130, 2 + 2 * 130)
    ckpt = save_checkpoint(tmp_path / "c.safetensors", cfg=cfg, step=0, class_names=["a"],
                           ema=sd, online=sd, data_fingerprint="test")
    x_T = np.random.default_rng(0).standard_normal((2, 1, 128, 128)).astype(np.float32)
    sched = Schedule.from_config(cfg.diffusion)
    outs = [sample_dpmpp_2m(TorchDenoiser(ckpt, provider=p), x_T, sched, steps=5) for p in ("cuda", "cpu")]
    assert np.abs(outs[0] - outs[1]).max() < 5e-2    # cuDNN convolutions may use TF32
