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
