"""`sbatch slurm/train.sh` on a real two-node Slurm cluster (localhost): CPU, gloo, ZeRO-2.

Skips with the reason when Slurm cannot be installed or run (not root, no apt);
CI sets CXR_REQUIRE_SLURM=1 so that a skip becomes a failure there.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, slurm_unavailable

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_unavailable()
    if reason:
        if os.environ.get("CXR_REQUIRE_SLURM") == "1":
            pytest.fail(f"CXR_REQUIRE_SLURM=1 but: {reason}")
        pytest.skip(reason)
    with SlurmCluster() as c:
        yield c


def test_sbatch_two_nodes_zero2(cluster, tmp_path, tiny_cfg):
    from cxr_ddpm.train.checkpoint import load_checkpoint

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CXR_VENV=str(Path(sys.executable).parents[1]), CXR_DATA=str(ROOT / "data" / "cxr-sample"),
               CXR_OUT=str(out), OMP_NUM_THREADS="1")
    job, rc = cluster.sbatch(
        ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10", "--job-name=cxrtest",
         str(ROOT / "slurm" / "train.sh"), str(ROOT / "configs" / "tiny.yaml"),
         "--set", "train.steps=4", "--set", "train.micro_batch=2", "--set", "train.zero_stage=2",
         "--set", "train.sample_every=0", "--set", "train.log_every=1", "--set", "data.num_workers=0"],
        env=env, cwd=tmp_path, timeout=480)
    log = (tmp_path / f"cxrtest-{job}.out").read_text()
    info = cluster.job_info(job)
    print(f"job {job}: {info.get('StartTime')} -> {info.get('EndTime')} ({info.get('RunTime')})")
    assert rc == 0 and info["JobState"] == "COMPLETED", f"{info.get('JobState')}\n{log[-3000:]}"
    assert info["NumNodes"] == "2" and "master 127.0.0.1:" in log
    assert "2 rank(s) [srun, gloo], ZeRO-2" in log and "fit: done: step 4/4" in log
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and all(float(r["loss"]) > 0 for r in rows)
    marker = json.loads((out / "deepspeed" / "step_00000004" / "COMPLETE").read_text())
    assert marker["world_size"] == 2 and len(set(marker["param_digests"])) == 1
    ck = load_checkpoint(out, config=tiny_cfg)
    assert ck.step == 4 and ck.meta["provenance"]["world_size"] == 2
    ck.build_unet()
