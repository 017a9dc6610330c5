"""Packaging: namespaced imports only, and the three CLIs answer --help."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_no_bare_top_level_packages(tmp_path: Path) -> None:
    """From outside the source tree, `train`/`export`/`runtime` must not be importable."""
    code = ("import importlib.util as u, cxr_ddpm.runtime, cxr_ddpm.train, cxr_ddpm.export; "
            "print([n for n in ('train', 'export', 'runtime') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("cli, command", [("cxr-train", "fit"), ("cxr-train", "check-data"), ("cxr-train", "prepare"),
                                          ("cxr-export", "onnx"), ("cxr-export", "trt"),
                                          ("cxr-export", "verify"), ("cxr-runtime", "sample"),
                                          ("cxr-runtime", "inspect"), ("cxr-runtime", "bench")])
def test_cli_help_lists_commands(cli: str, command: str) -> None:
    exe = Path(sys.executable).parent / cli
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert command in out.stdout


def test_a_run_decides_cpu_or_cuda_in_one_place() -> None:
    """fit asks use_cuda() once, in plan_run, and hands the answer on (RunPlan.cuda / .device):
    a second asker could disagree with it (CXR_DEVICE read twice) and nobody would notice.
    Outside a run: cxr-train utility (its own run) and model.cuda_capability (export, the torch backend)."""
    import re
    train = Path(__file__).resolve().parents[1] / "train"
    askers = sorted(f"{p.name}:{i}" for p in train.glob("*.py")
                    for i, line in enumerate(p.read_text().splitlines(), 1)
                    if re.search(r"(?<![`\w.])use_cuda\(\)", line) and not line.lstrip().startswith(("def ", "#")))
    assert [a.split(":")[0] for a in askers] == ["model.py", "plan.py", "utility.py"], askers
