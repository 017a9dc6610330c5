"""Config schema (typed, unknown keys refused) and schedule parity with lucidrains."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_ddpm.runtime.sampling import schedule as S
from cxr_ddpm.train.config import Config, load_config
from cxr_ddpm.runtime.errors import CxrError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("name, size", [("tiny", 32), ("cxr128", 128), ("cxr256", 256)])
def test_shipped_configs_load(name: str, size: int) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert (cfg.model.channels, cfg.model.image_size) == (1, size)


def test_seed_setup_is_lucidrains_defaults() -> None:
    """configs/cxr128.yaml is documented as lucidrains' defaults: checked against the library's own."""
    import inspect

    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    cfg = load_config(ROOT / "configs" / "cxr128.yaml")
    diff = inspect.signature(GaussianDiffusion.__init__).parameters
    unet = inspect.signature(Unet.__init__).parameters
    for key in ("timesteps", "objective", "beta_schedule"):
        assert getattr(cfg.diffusion, key) == diff[key].default, key
    assert tuple(cfg.model.dim_mults) == tuple(unet["dim_mults"].default)


def test_overrides_are_typed() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      ["train.steps=7", "model.dim_mults=1,2,2", "train.lr=3e-4",
                       "data.hflip=true", "diffusion.objective=pred_noise"])
    assert cfg.train.steps == 7 and cfg.model.dim_mults == (1, 2, 2)
    assert cfg.train.lr == 3e-4 and cfg.data.hflip is True
    assert cfg.diffusion.objective == "pred_noise"


def test_toml_and_yaml_agree(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[model]\ndim = 24\ndim_mults = [1, 2]\nimage_size = 32\n")
    (tmp_path / "a.yaml").write_text("model:\n  dim: 24\n  dim_mults: [1, 2]\n  image_size: 32\n")
    assert load_config(tmp_path / "a.toml") == load_config(tmp_path / "a.yaml")


def test_dict_round_trip() -> None:
    cfg = load_config(ROOT / "configs" / "cxr128.yaml")
    assert Config.from_dict(cfg.to_dict()) == cfg
    other = Config.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "steps": 1}})
    assert other.digest() == cfg.digest()         # the digest covers model + diffusion only...
    assert cfg.replace(model=dataclasses.replace(cfg.model, dim=8)).digest() != cfg.digest()  # ...all of them


@pytest.mark.parametrize("text, needle", [
    ("model:\n  dimm: 3\n", "unknown key 'model.dimm'"),
    ("modle:\n  dim: 3\n", "unknown section 'modle'"),
    ("model:\n  dim: abc\n", "model.dim must be an int"),
    ("model:\n  dim: 1.5\n", "model.dim must be an int"),
    ("diffusion:\n  objective: eps\n", "diffusion.objective must be one of pred_noise, pred_x0, pred_v"),
    ("train:\n  zero_stage: 4\n", "train.zero_stage=4 is not a ZeRO stage"),
    ("model:\n  image_size: 100\n", "must be divisible by 8"),
    ("data:\n  hflip: maybe\n", "data.hflip must be true or false"),
    ("model: [1, 2\n", "cannot parse"),
])
def test_bad_config_files_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CxrError) as e:
        load_config(path)
    assert str(path) in str(e.value) and needle in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, needle", [
    ("train.nope=1", "unknown key 'nope' in section 'train'"),
    ("nope.steps=1", "section one of model, diffusion, data, train"),
    ("train.steps", "expected section.key=value"),
    ("train.steps=ten", "--set train.steps must be an int"),
    ("train.steps=0", "train.steps must be > 0"),
])
def test_bad_overrides(override: str, needle: str) -> None:
    with pytest.raises(CxrError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_config(ROOT / "configs" / "tiny.yaml", [override])


FLOAT_KEYS = [f"{s}.{f.name}" for s, cls in (("model", Config().model), ("diffusion", Config().diffusion),
                                             ("data", Config().data), ("train", Config().train))
              for f in dataclasses.fields(cls) if f.type in ("float", float)]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_refused_in_every_field(tmp_path: Path, key: str, value: str) -> None:
    """NaN passes every `x <= 0` range check; lr: .nan reached AdamW as a traceback (#19.9, #19.13)."""
    section, name = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(CxrError, match=rf"c\.yaml: {key} must be a finite number"):
        load_config(path)
    with pytest.raises(CxrError, match=rf"^--set {key} must be a finite number"):
        load_config(None, [f"{key}={value.replace('.', '')}"])


def test_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  steps: 5   # r\u00e9sum\u00e9\n".encode("latin-1"))
    with pytest.raises(CxrError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset 23); save the file as UTF-8"


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp64", "--set train.precision must be one of fp32, bf16, fp16, got 'fp64'"),
    ("train.lr=-1", "--set train.lr=-1: train.lr must be > 0, got -1.0"),
    ("model.image_size=33", "--set model.image_size=33: model.image_size=33 must be divisible by 2"),
    ("data.root=", "--set data.root=: data.root is empty"),
    ("data.root=  ", "--set data.root=: data.root is empty"),
])
def test_override_errors_name_the_flag_not_the_file(override: str, message: str) -> None:
    """`--set train.precision=fp64` was blamed on configs/tiny.yaml (#19.18); an empty data.root
    trained on the current directory (#19.16)."""
    with pytest.raises(CxrError) as e:
        load_config(ROOT / "configs" / "tiny.yaml", ["train.steps=3", override])
    assert str(e.value).startswith(message) and "tiny.yaml" not in str(e.value), str(e.value)


def test_file_errors_still_name_the_file_beside_other_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: -1.0\n  precision: fp64\n")
    with pytest.raises(CxrError, match=r"c\.yaml: train\.lr must be > 0"):
        load_config(path, ["train.precision=bf16", "train.steps=3"])
    with pytest.raises(CxrError, match=r"c\.yaml: train\.precision must be one of"):
        load_config(path, ["train.lr=1e-4"])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


# ---------------------------------------------------------------- schedule parity

@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [100, 1000])
def test_alphas_cumprod_match_lucidrains(name: str, T: int) -> None:
    import torch
    from denoising_diffusion_pytorch import denoising_diffusion_pytorch as ddp

    ours = S.Schedule.from_params(timesteps=T, beta_schedule=name, objective="pred_v")
    theirs = getattr(ddp, f"{name}_beta_schedule")(T)
    np.testing.assert_allclose(ours.betas, theirs.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.alphas_cumprod, torch.cumprod(1 - theirs, 0).numpy(), rtol=0, atol=1e-12)


def test_custom_sigmoid_params_match_lucidrains() -> None:
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch import sigmoid_beta_schedule
    ours = S.sigmoid_betas(500, start=-2, end=4, tau=0.7)
    np.testing.assert_allclose(ours, sigmoid_beta_schedule(500, start=-2, end=4, tau=0.7).numpy(), atol=1e-12)


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_objective_conversions_match_lucidrains(objective: str, tiny_cfg) -> None:
    """Our conversions on float32 arrays == GaussianDiffusion's buffers-based ones, to 1e-6."""
    import torch

    from cxr_ddpm.train.model import build_diffusion

    cfg = tiny_cfg.replace(diffusion=tiny_cfg.diffusion.__class__(
        **{**tiny_cfg.to_dict()["diffusion"], "objective": objective}))
    gd = build_diffusion(cfg)
    sched = S.Schedule.from_config(cfg.diffusion)
    rng = np.random.default_rng(0)
    for t in (0, 10, 50, 99):
        x0 = rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
        eps = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
        a = float(sched.alphas_cumprod[t])
        tt = torch.full((2,), t)
        ref = lambda fn, *arrays: fn(*map(torch.from_numpy, arrays[:1]), tt, *map(torch.from_numpy, arrays[1:])).numpy()
        x_t = S.q_sample(x0, eps, a)
        v = S.v_from_x0_eps(x0, eps, a)
        np.testing.assert_allclose(x_t, ref(gd.q_sample, x0, eps), atol=1e-6)
        np.testing.assert_allclose(v, ref(gd.predict_v, x0, eps), atol=1e-6)
        np.testing.assert_allclose(S.x0_from_v(x_t, v, a), ref(gd.predict_start_from_v, x_t, v), atol=1e-6)
        np.testing.assert_allclose(S.x0_from_eps(x_t, eps, a), ref(gd.predict_start_from_noise, x_t, eps), atol=1e-6)
        np.testing.assert_allclose(S.eps_from_x0(x_t, x0, a), ref(gd.predict_noise_from_start, x_t, x0), atol=1e-6)
        assert S.x0_from_v(x_t, v, a).dtype == np.float32 == S.eps_from_x0(x_t, x0, a).dtype


def test_posterior_matches_lucidrains(tiny_cfg) -> None:
    from cxr_ddpm.train.model import build_diffusion
    gd = build_diffusion(tiny_cfg)
    c1, c2, var = S.Schedule.from_config(tiny_cfg.diffusion).posterior()
    np.testing.assert_allclose(c1, gd.posterior_mean_coef1.numpy(), rtol=1e-6)
    np.testing.assert_allclose(c2, gd.posterior_mean_coef2.numpy(), rtol=1e-6)
    np.testing.assert_allclose(var, gd.posterior_variance.numpy(), rtol=1e-5, atol=1e-12)


def test_schedule_digest_pins_parameters() -> None:
    a = S.Schedule.from_params(timesteps=100, beta_schedule="sigmoid", objective="pred_v")
    b = S.Schedule.from_params(timesteps=100, beta_schedule="sigmoid", objective="pred_v", sigmoid_tau=0.9)
    assert a.digest() != b.digest() and len(a.digest()) == 64


def test_runtime_import_does_not_import_torch() -> None:
    code = ("import sys, cxr_ddpm.runtime, cxr_ddpm.runtime.contract.config, cxr_ddpm.runtime.sampling.schedule, "
            "cxr_ddpm.runtime.contract.metadata, cxr_ddpm.runtime.fsutil, cxr_ddpm.runtime.errors; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_runtime_owns_only_the_contract_sections() -> None:
    """The deployed runtime holds what sampling needs (model, diffusion); the training schema,
    files and --set are train/'s, importable without torch (the runtime's --config passes a path)."""
    import cxr_ddpm.runtime.contract.config as rc
    assert not hasattr(rc, "TrainConfig") and not hasattr(rc, "DataConfig") and not hasattr(rc, "load_config")
    assert [f.name for f in dataclasses.fields(rc.ModelSpec)] == ["model", "diffusion"]
    assert Config().spec == rc.ModelSpec() and Config().digest() == rc.ModelSpec().digest()
    code = "import sys, cxr_ddpm.train.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- schedule values in the metadata

def test_metadata_stores_the_schedule_values(tiny_cfg) -> None:
    from cxr_ddpm.runtime.contract.metadata import build_metadata, dumps, parse_metadata, schedule_from_metadata
    meta = parse_metadata(dumps(build_metadata(tiny_cfg, kind="onnx", class_names=[])), "a.onnx")
    want = S.Schedule.from_config(tiny_cfg.diffusion)
    assert np.array_equal(np.asarray(meta["schedule"]["betas"]), want.betas)      # exact through JSON
    assert np.array_equal(schedule_from_metadata(meta, "a.onnx").betas, want.betas)


def test_stored_betas_win_over_the_schedule_code(tiny_cfg) -> None:
    """An artifact keeps sampling with the schedule it was trained with, whatever the code
    for its beta_schedule computes today."""
    from cxr_ddpm.runtime.contract.metadata import build_metadata, schedule_from_metadata
    meta = build_metadata(tiny_cfg, kind="onnx", class_names=[])
    changed = S.Schedule(betas=np.linspace(1e-3, 0.05, tiny_cfg.diffusion.timesteps), objective="pred_v")
    meta["schedule"].update(betas=changed.betas.tolist(), alphas_cumprod_sha256=changed.digest())
    assert np.array_equal(schedule_from_metadata(meta, "a.onnx").betas, changed.betas)
    meta["schedule"]["betas"][3] *= 1.01                                         # corrupt: hash no longer fits
    with pytest.raises(CxrError, match="a.onnx: schedule hash in metadata does not match its stored betas"):
        schedule_from_metadata(meta, "a.onnx")
    meta["schedule"]["betas"] = meta["schedule"]["betas"][:-1]
    with pytest.raises(CxrError, match="betas hold 99 values for T=100"):
        schedule_from_metadata(meta, "a.onnx")


def test_artifacts_without_stored_betas_still_load(tiny_cfg) -> None:
    from cxr_ddpm.runtime.contract.metadata import build_metadata, schedule_from_metadata
    meta = build_metadata(tiny_cfg, kind="onnx", class_names=[])
    del meta["schedule"]["betas"]                                                # as written before 0.2
    assert schedule_from_metadata(meta, "old.onnx").digest() == meta["schedule"]["alphas_cumprod_sha256"]
