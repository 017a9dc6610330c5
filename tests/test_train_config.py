"""Training input checks, launcher env mapping, resume bookkeeping: fast, no process group."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import assert_user_error as assert_one_line_error
from cxr_ddpm.train.config import load_config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.train import state
from cxr_ddpm.train.cli import main
from cxr_ddpm.train.dist import resolve_world, slurm_port
from cxr_ddpm.train.ds_config import build_ds_config, load_stage_file, stage_defaults
from cxr_ddpm.train.batches import StepSampler

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def run_fit(tmp_path: Path, data: Path, *args: str, env: dict | None = None):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["fit", "--config", TINY, "--data", str(data), "--out", str(out), *args],
                             env={"RANK": None, "WORLD_SIZE": None, "SLURM_STEP_NUM_TASKS": None,
                                  "CXR_DEVICE": "cpu", **(env or {})})   # CPU even with a GPU visible
    return res, out


# -----------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written, before any process group starts

def test_batch_mismatch(tmp_path, cxr_mini):
    res, out = run_fit(tmp_path, cxr_mini, "--set", "train.global_batch=12", "--set", "train.micro_batch=4",
                       env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert_one_line_error(res, "train.global_batch=12", "train.micro_batch=4", "world size 2", "= 8")
    assert not out.exists()


def test_unknown_zero_stage(tmp_path, cxr_mini):
    res, out = run_fit(tmp_path, cxr_mini, "--set", "train.zero_stage=4")
    assert_one_line_error(res, "train.zero_stage=4", "0, 1, 2 or 3")
    assert not out.exists()


def test_fp16_on_cpu(tmp_path, cxr_mini):
    res, out = run_fit(tmp_path, cxr_mini, "--set", "train.precision=fp16")
    assert_one_line_error(res, "fp16", "GPU", "bf16")
    assert not out.exists()


@pytest.mark.parametrize("body, needles", [
    ("train:\n  lr: .nan\n".encode(), ("bad.yaml", "train.lr must be a finite number, got nan")),
    ("train:\n  steps: 5  # \u00e9\n".encode("latin-1"), ("bad.yaml", "not UTF-8 text (byte 0xe9")),
])
def test_bad_config_file_is_one_line(tmp_path, cxr_mini, body, needles):
    """`lr: .nan` reached AdamW (ValueError traceback); a Latin-1 file gave a UnicodeDecodeError."""
    (tmp_path / "bad.yaml").write_bytes(body)
    res = CliRunner().invoke(main, ["fit", "--config", str(tmp_path / "bad.yaml"), "--data", str(cxr_mini),
                                    "--out", str(tmp_path / "run")], env={"CXR_DEVICE": "cpu"})
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "run").exists()


def test_out_of_range_override_names_the_flag(tmp_path, cxr_mini):
    res, out = run_fit(tmp_path, cxr_mini, "--set", "train.precision=fp64")
    assert_one_line_error(res, "--set train.precision must be one of fp32, bf16, fp16, got 'fp64'")
    assert "tiny.yaml" not in res.stderr and not out.exists()


@pytest.mark.parametrize("args, needle", [(["--set", "data.root="], "--set data.root=: data.root is empty"),
                                          (["--data", ""], "--data is empty")])
def test_empty_data_folder_refused(tmp_path, args, needle):
    """An empty data.root (or --data "") trained on the current directory / data.root silently (#19.16)."""
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["fit", "--config", TINY, "--out", str(out), *args], env={"CXR_DEVICE": "cpu"})
    assert_one_line_error(res, needle)
    assert not out.exists()


def test_missing_data(tmp_path):
    res, out = run_fit(tmp_path, tmp_path / "nope")
    assert_one_line_error(res, str(tmp_path / "nope"), "data folder not found")
    assert not out.exists()


def test_resume_incomplete_path_refused(tmp_path, cxr_mini):
    tag = tmp_path / "run" / "deepspeed" / "step_00000004"
    tag.mkdir(parents=True)
    res, _ = run_fit(tmp_path, cxr_mini, "--resume", str(tag))
    assert_one_line_error(res, "incomplete", "COMPLETE")


def test_fresh_start_into_used_run_folder_refused(tmp_path, cxr_mini):
    state.mark_complete(_mkdir(tmp_path / "run" / "deepspeed" / "step_00000002"), {"step": 2})
    res, _ = run_fit(tmp_path, cxr_mini)
    assert_one_line_error(res, "already holds checkpoints", "--resume auto")


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True)
    return p


def test_user_deepspeed_config_checked(tmp_path):
    bad = tmp_path / "zero2.json"
    bad.write_text('{"zero_optimization": {"stage": 2, "contiguous_gradients": false}}')
    with pytest.raises(CxrError, match="contiguous_gradients"):
        build_ds_config(load_config(TINY, [f"train.deepspeed_config={bad}"]), world_size=1, cuda=False)
    other = tmp_path / "zero3.json"
    other.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(CxrError, match="does not match train.zero_stage=1"):
        build_ds_config(load_config(TINY, [f"train.deepspeed_config={other}", "train.zero_stage=1"]),
                        world_size=1, cuda=False)
    for text, why in (("{", "cannot parse"), ('{"optimizer": {}}', "zero_optimization section")):
        bad.write_text(text)
        with pytest.raises(CxrError, match=why):
            load_stage_file(bad, 2)
    with pytest.raises(CxrError, match="file not found"):
        load_stage_file(tmp_path / "nope.json", 2)


def test_user_deepspeed_config_is_used(tmp_path):
    mine = stage_defaults(2)
    mine["zero_optimization"]["reduce_bucket_size"] = 1234
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(mine))
    ds = build_ds_config(load_config(TINY, [f"train.deepspeed_config={path}"]), world_size=1, cuda=False)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1234 and "_comment" not in ds


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_example_deepspeed_files_equal_the_built_in_dicts(stage):
    """configs/deepspeed/*.json document what the package builds in code; they must not drift."""
    example = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    assert example == stage_defaults(stage)


# -----------------------------------------------------------------------------

def test_ds_config_from_train_section(tiny_cfg):
    cfg = load_config(TINY, ["train.micro_batch=3", "train.grad_accum=2", "train.precision=bf16",
                             "train.zero_stage=3", "train.grad_clip=0.5"])
    ds = build_ds_config(cfg, world_size=2, cuda=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (12, 3, 2)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["gradient_clipping"] == 0.5
    assert not any(k.startswith("_") for k in ds)
    ddp = build_ds_config(load_config(TINY, ["train.zero_stage=0"]), 1, cuda=False)
    assert ddp["zero_optimization"] == {"stage": 0} and not ddp["bf16"]["enabled"]


def test_resolve_world_launchers():
    w = resolve_world({"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "123"})
    assert (w.rank, w.local_rank, w.world_size, w.master_addr, w.master_port, w.launcher) == (1, 0, 2, "h", 123, "torchrun")
    srun = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4",
            "SLURM_JOB_ID": "4242", "MASTER_ADDR": "node01"}
    w = resolve_world(srun)
    assert (w.rank, w.local_rank, w.world_size, w.master_addr, w.launcher) == (3, 1, 4, "node01", "srun")
    assert w.master_port == slurm_port(srun) == 24242
    # inside the batch script but outside srun: one process, not SLURM_NTASKS of them
    w = resolve_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})
    assert (w.rank, w.world_size, w.launcher) == (0, 1, "none") and w.master_port > 0
    with pytest.raises(CxrError, match="WORLD_SIZE"):
        resolve_world({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(CxrError, match="rank 2 of world size 2"):
        resolve_world({"RANK": "2", "WORLD_SIZE": "2"})


def test_step_sampler_resumes_and_splits():
    full = StepSampler(10, rank=0, world=2, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(23)]
    resumed = iter(StepSampler(10, rank=0, world=2, seed=3, start=7))
    assert [next(resumed) for _ in range(16)] == stream[7:]
    r0 = [next(iter(StepSampler(10, 0, 2, 3, start=i))) for i in range(5)]
    r1 = [next(iter(StepSampler(10, 1, 2, 3, start=i))) for i in range(5)]
    assert sorted(r0 + r1) == list(range(10))          # one epoch: every image exactly once


def test_find_resume_skips_incomplete_and_prune(tmp_path):
    run = tmp_path / "run"
    assert state.find_resume(run, "auto") is None and state.find_resume(run, None) is None
    for step in (2, 4, 6, 8):
        d = run / "deepspeed" / state.tag_name(step)
        d.mkdir(parents=True)
        if step != 8:                                   # step 8: a save that was killed
            state.mark_complete(d, {"step": step})
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "checkpoints" / f"step_{step:08d}.safetensors").write_bytes(b"x")
    assert state.find_resume(run, "auto").name == "step_00000006"
    assert state.find_resume(run, str(run)).name == "step_00000006"
    state.prune(run, keep_last=2)
    assert sorted(p.name for p in (run / "deepspeed").iterdir()) == ["step_00000004", "step_00000006"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000004.safetensors", "step_00000006.safetensors", "step_00000008.safetensors"]
    with pytest.raises(CxrError, match="not found"):
        state.find_resume(run, str(tmp_path / "missing"))


def test_sync_interval_follows_step_time():
    """Ranks sync about every CHECK_S seconds: a stop signal waits at most that long (plus a step)."""
    from cxr_ddpm.train.loop import CHECK_S, sync_every
    assert CHECK_S <= 5
    for dt in (0.0, 1e-4, 0.003, 0.1, 0.7, CHECK_S, CHECK_S * 3, 60.0):
        every = sync_every(dt)
        assert 1 <= every <= 1000, dt                               # at least every 1000 steps
        assert every * dt <= max(CHECK_S, dt) * (1 + 1e-9), dt      # an interval outlasts CHECK_S by < 1 step
        assert every in (1, 1000) or (every + 1) * dt > CHECK_S, dt  # and is not needlessly short
