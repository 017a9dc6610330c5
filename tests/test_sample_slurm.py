"""`sbatch slurm/sample.sh` on the real two-node localhost Slurm cluster: a job array makes the
same files as one `cxr-runtime sample` process, and a cancelled task is completed by a rerun.

Skips with the reason when Slurm cannot run here; CI sets CXR_REQUIRE_SLURM=1 (then it fails).
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from builders import sample

ROOT = Path(__file__).resolve().parents[1]
WHEN = "2026-11-26T17:00:00Z"
pytestmark = pytest.mark.slurm


def submit(cluster, tmp: Path, engine: Path, out: Path, *args: str) -> tuple[str, str]:
    """The user's `sbatch slurm/sample.sh ...`: waits for the planning job; returns (array, merge) ids."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CXR_VENV=str(Path(sys.executable).parents[1]), CXR_TASKS="3", CXR_REQUEST_TIME=WHEN,
               CXR_SBATCH_ARGS="--cpus-per-task=1", OMP_NUM_THREADS="1")
    job, rc = cluster.sbatch(["--cpus-per-task=1", "--job-name=plan", str(ROOT / "slurm" / "sample.sh"),
                              str(engine), "--out", str(out), *args], env=env, cwd=tmp, timeout=240)
    log = next(tmp.glob(f"plan-{job}*.out")).read_text()
    m = re.search(r"array job (\d+) \(3 tasks\) -> .*, merge job (\d+)", log)
    assert rc == 0 and m, log[-2000:]
    return m.group(1), m.group(2)


def wait_done(cluster, job: str, timeout: float = 150) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = cluster.job_info(job)["JobState"]
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state
        time.sleep(1)
    raise TimeoutError(f"job {job} still {state}")


def test_array_equals_one_process_and_a_cancelled_task_is_completed(cluster, onnx_path: Path,
                                                                     tmp_path: Path) -> None:
    t0 = time.time()
    common = ("--steps", "3", "--batch-size", "2")
    assert sample(onnx_path, tmp_path / "one", "-n", "10", *common, "--request-time", WHEN).exit_code == 0
    array, merge = submit(cluster, tmp_path, onnx_path, tmp_path / "arr", "--count", "10", *common)
    assert wait_done(cluster, merge) == "COMPLETED"
    one = json.loads((tmp_path / "one" / "samples.json").read_text())
    arr = json.loads((tmp_path / "arr" / "samples.json").read_text())
    assert arr["complete"] and arr["shards"] == 3 and arr["request_sha256"] == one["request_sha256"]
    for e in one["images"]:                                        # png byte-identical
        assert (tmp_path / "arr" / e["file"]).read_bytes() == (tmp_path / "one" / e["file"]).read_bytes()
    with open(tmp_path / "arr" / "manifest.csv", newline="") as f:
        assert [int(r["index"]) for r in csv.DictReader(f)] == list(range(10))

    # -- a task cancelled mid-run: the merge reports what is missing, a rerun completes the set
    out = tmp_path / "big"
    array, merge = submit(cluster, tmp_path, onnx_path, out, "--count", "60", "--steps", "99", "--batch-size", "1")
    record = out / "samples.shard-00001-of-00003.json"
    deadline = time.time() + 90
    while time.time() < deadline and not (record.is_file() and json.loads(record.read_text())["images"]):
        time.sleep(0.2)
    cluster.scancel(f"{array}_1")
    assert wait_done(cluster, merge) != "COMPLETED"                # afterany: it ran, and refused
    partial = json.loads(record.read_text())
    assert not partial["complete"] and 0 < len(partial["images"]) < 20
    array, merge = submit(cluster, tmp_path, onnx_path, out, "--count", "60", "--steps", "99", "--batch-size", "1")
    assert wait_done(cluster, merge) == "COMPLETED"
    full = json.loads((out / "samples.json").read_text())
    assert [e["index"] for e in full["images"]] == list(range(60))  # none missing, none twice
    assert len({e["file"] for e in full["images"]}) == 60 and len(list(out.glob("sample_*.png"))) == 60
    print(f"Slurm sample tests: {time.time() - t0:.0f} s")
