"""Static type checking ([tool.mypy] in pyproject.toml; `make test` runs `python -m mypy` first).

- the project is clean under its own config (runtime/, train/, export/, bench/);
- the checker catches signature drift: the call bench/gpu_sampling.py made before
  `iter_batches` took a `Request` is reported, from a function without annotations, so
  the config's check_untyped_defs (and the typed runtime API it relies on) is what finds it.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

CONFIG = ROOT / "pyproject.toml"

# the pre-fix bench line, verbatim in shape: positional batch size where the Request goes,
# and the sampler settings as keywords
PRE_FIX_CALL = '''\
import numpy as np


def e2e(den, batch, steps, seed):
    from cxr_ddpm.runtime.sampling.generate import iter_batches
    for _ in iter_batches(den, 4, batch_size=4, sampler="dpmpp-2m", steps=20, seed=0, xp=np):
        pass
'''


def mypy(*targets: str) -> subprocess.CompletedProcess[str]:
    """`python -m mypy` from the repository root under the project's config (its cache too)."""
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(CONFIG), *targets],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_project_is_type_clean() -> None:
    p = mypy()                                   # no targets: the config's packages
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Success: no issues found" in p.stdout


def test_pre_fix_iter_batches_call_is_reported(tmp_path: Path) -> None:
    module = tmp_path / "prefix_bench_call.py"
    module.write_text(PRE_FIX_CALL)
    p = mypy(str(module))
    assert p.returncode == 1, p.stdout + p.stderr
    errors = [ln for ln in p.stdout.splitlines() if ": error: " in ln]
    assert errors and all(ln.startswith(f"{module}:6: ") for ln in errors), p.stdout
    text = "\n".join(errors)
    assert 'Unexpected keyword argument "sampler" for "iter_batches"' in text
    assert 'Argument 2 to "iter_batches" has incompatible type "int"; expected "Request"' in text
