"""`cxr-runtime` commands stay thin (#21.5): what they print and run is library code, tested here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_ddpm.runtime.sampling import bench
from cxr_ddpm.runtime import cli
from cxr_ddpm.runtime.contract.artifact import open_artifact
from cxr_ddpm.runtime.contract.describe import describe, describe_rows
from cxr_ddpm.runtime.errors import CxrError

from builders import run

FIXTURES = Path(__file__).parent / "fixtures"
BACKEND_FLAGS = {"provider", "threads", "backend", "cuda_graph", "arrays"}


def test_inspect_prints_describe(tmp_path: Path) -> None:
    path = FIXTURES / "tiny-cond-1c52fd5.onnx"
    art = open_artifact(path)
    rows = dict(describe_rows(art))
    assert rows["kind"] == "onnx" and rows["backend"] == "onnx" and rows["file"] == str(path)
    assert rows["class_names"] == ", ".join(art.class_names) and rows["objective"] == art.spec.diffusion.objective
    res = run("inspect", path)
    assert res.exit_code == 0 and res.output == describe(art, file=path, backend="onnx") + "\n"


@pytest.mark.parametrize("command", [cli.sample, cli.bench, cli.bench_worker])
def test_sampling_commands_share_the_backend_flags(command) -> None:
    assert BACKEND_FLAGS <= {p.name for p in command.params}


def test_bench_table_compares_with_the_first_run() -> None:
    base = {"backend": "onnx", "provider": "cpu", "step_ms_median": 2.0, "step_ms_p90": 3.0, "images_per_s": 10.0,
            "peak_rss_mib": 100.0, "start_to_first_step_s": 0.5}
    text = bench.table([base, {**base, "backend": "torch", "step_ms_median": 5.0}], batch_size=1, steps=4, repeats=2)
    lines = text.splitlines()
    assert lines[0] == "batch 1, 4 dpmpp-2m steps x 2 runs" and "torch/cpu / first" in lines[1]
    assert lines[2].split()[-3:] == ["2.000", "5.000", "2.50x"]


def test_bench_refuses_bad_counts_before_starting_a_worker(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="--batch-size, --steps and --repeats must be >= 1"):
        bench.compare(FIXTURES / "tiny-1c52fd5.onnx", steps=0)
    with pytest.raises(CxrError, match="--ckpt .*: checkpoint not found"):
        bench.compare(FIXTURES / "tiny-1c52fd5.onnx", ckpt=tmp_path / "none.safetensors")


def test_bench_worker_runs_from_the_bench_module() -> None:
    rec = bench.bench_in_subprocess(FIXTURES / "tiny-1c52fd5.onnx", backend=None, provider=None, threads=1,
                                    batch_size=1, steps=2, repeats=1)
    assert rec["backend"] == "onnx" and rec["steps"] == 2 and rec["torch_imported"] is False
    assert json.dumps(rec)                                            # one JSON line, as `bench` reads it
