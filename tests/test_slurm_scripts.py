"""slurm/*.sh argument handling, run as Slurm runs a batch script (SLURM_* set, srun on PATH).

The real-cluster tests (test_train_slurm.py, test_sample_slurm.py) cover the jobs themselves;
these check what happens before anything starts, in milliseconds.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_in_job(script: str, *args: str, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    """The script as a job's batch step: SLURM_* set, and an `srun` that records its arguments."""
    bin_ = tmp / "bin"
    bin_.mkdir(exist_ok=True)
    (bin_ / "srun").write_text(f'#!/bin/bash\necho "$@" > {tmp}/srun-args\n')
    (bin_ / "srun").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CXR_"))}
    base.update(PATH=f"{bin_}:{base['PATH']}", SLURM_JOB_ID="123", SLURM_JOB_NAME="cxr-ddpm",
                SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                SLURM_SUBMIT_DIR=str(ROOT), **env)
    return subprocess.run(["bash", str(ROOT / "slurm" / script), *args], cwd=tmp, env=base,
                          capture_output=True, text=True, timeout=60)


def test_train_without_config_needs_cxr_data(tmp_path: Path) -> None:
    p = run_in_job("train.sh", tmp=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: no CONFIG given") and "CXR_DATA" in p.stderr
    assert not (tmp_path / "srun-args").exists()


def test_train_without_config_trains_the_default(tmp_path: Path) -> None:
    p = run_in_job("train.sh", "--set", "train.steps=5", tmp=tmp_path, CXR_DATA="/data/cxr", CXR_OUT="out")
    assert p.returncode == 0, p.stderr
    first = p.stdout.splitlines()[0]
    assert f"no CONFIG given: training the default {ROOT}/configs/cxr128.yaml on CXR_DATA=/data/cxr" in first
    srun = (tmp_path / "srun-args").read_text().split()
    i = srun.index("--config")
    assert srun[i + 1] == str(ROOT / "configs" / "cxr128.yaml") and srun[srun.index("--data") + 1] == "/data/cxr"
    assert srun[-2:] == ["--set", "train.steps=5"]


def test_train_with_config_passes_it(tmp_path: Path) -> None:
    p = run_in_job("train.sh", "configs/tiny.yaml", tmp=tmp_path, CXR_OUT="out")
    assert p.returncode == 0, p.stderr
    srun = (tmp_path / "srun-args").read_text().split()
    assert srun[srun.index("--config") + 1] == "configs/tiny.yaml" and "--data" not in srun
