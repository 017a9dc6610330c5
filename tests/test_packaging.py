"""Packaging: the core install is the torch-free runtime; [train] carries training and export.

- a static import check over runtime/ (every module's AST, so a lazy import inside a
  function counts too): no torch, no cxr_ddpm.train / cxr_ddpm.export, with exactly one
  allowed exception, the PyTorch backend loaded by module name for `--backend torch`;
- the wheel: what it holds, and which requirements are core and which are extras;
- a fresh virtualenv with the wheel installed core-only samples from an ONNX model, has no
  torch, and `cxr-train` / `cxr-export onnx` answer with the one-line install hint.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from builders import export_tiny_onnx

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "torchvision", "deepspeed", "denoising_diffusion_pytorch", "safetensors",
             "cxr_ddpm.train", "cxr_ddpm.export")
TORCH_LOADER = ("backends/__init__.py", "cxr_ddpm.train.torch_backend")


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import statement, every import_module / __import__ of a literal,
    and every string naming one of our torch-side modules (a module name held in a constant)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")):
            found.append((node.lineno, str(node.args[0].value)))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith(("cxr_ddpm.train", "cxr_ddpm.export"))):
            found.append((node.lineno, node.value))
    return found


def forbidden_imports(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for line, module in _imports(ast.parse(path.read_text(), str(path))):
            if not any(module == f or module.startswith(f + ".") for f in FORBIDDEN):
                continue
            if (rel, module) == TORCH_LOADER:
                continue
            bad.append(f"runtime/{rel}:{line} {module}")
    return bad


def test_runtime_imports_no_torch_train_or_export() -> None:
    assert forbidden_imports(ROOT / "runtime") == []


def test_static_import_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "backends").mkdir()
    (tmp_path / "a.py").write_text("def f():\n    import torch.nn\n")
    (tmp_path / "b.py").write_text("from cxr_ddpm.export.verify import x\n")
    (tmp_path / "c.py").write_text("import importlib\nM = 'cxr_ddpm.train.loop'\n"
                                   "importlib.import_module('torch')\n")
    (tmp_path / "backends" / "__init__.py").write_text("M = 'cxr_ddpm.train.torch_backend'\n")  # allowed
    assert [b.split(" ")[1] for b in forbidden_imports(tmp_path)] == [
        "torch.nn", "cxr_ddpm.export.verify", "cxr_ddpm.train.loop", "torch"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"            # a copy: setuptools writes build/ and *.egg-info into the tree it builds
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                             "__pycache__", "bench", "data", "docs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("cxr_ddpm-*.whl")
    return path


def test_wheel_contents_and_requirements(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"cxr_ddpm"}                                    # no bare train/ export/ runtime/
    for module in ("runtime/sampling/generate.py", "runtime/inputs/imageio.py", "train/loop.py", "train/ds_config.py",
                   "train/torch_backend.py", "export/onnx_export.py"):
        assert f"cxr_ddpm/{module}" in names
    reqs = meta.get_all("Requires-Dist")
    core = {r.split(">")[0].split("=")[0].split(";")[0].strip() for r in reqs if "extra ==" not in r}
    train = {r.split(">")[0].split(";")[0].strip() for r in reqs if "extra == \"train\"" in r}
    assert core == {"numpy", "onnxruntime", "click", "pyyaml", "pillow", "pydicom", "tqdm"}
    assert {"torch", "deepspeed", "denoising-diffusion-pytorch", "onnx", "safetensors"} <= train


def test_installed_wheel_can_build_a_deepspeed_config(wheel: Path, tmp_path: Path) -> None:
    """Training needs no file outside the package: the DeepSpeed dict is built in code."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    code = ("import cxr_ddpm.train.ds_config as m; from cxr_ddpm.train.config import Config;"
            "print(m.__file__); print(m.build_ds_config(Config(), 1, False)['zero_optimization']['stage'])")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    where, stage = out.stdout.split()
    assert Path(where).is_relative_to(tmp_path / "site") and stage == "2"


def test_core_only_install_samples_without_torch(wheel: Path, tmp_path: Path, tmp_path_factory,
                                                 tiny_ckpt: Path) -> None:
    onnx_path = export_tiny_onnx(tmp_path_factory, tiny_ckpt)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, bin_ = venv / "bin" / "python", venv / "bin"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True,
                         text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0
    out = subprocess.run([str(bin_ / "cxr-runtime"), "sample", "--engine", str(onnx_path), "-n", "2",
                          "--steps", "2", "--out", str(tmp_path / "s")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.csv", "sample_00000.png",
                                                                  "sample_00001.png", "samples.json"]
    for cmd in (["cxr-train", "fit", "--config", "x.yaml"], ["cxr-export", "onnx", "--ckpt", "x"]):
        res = subprocess.run([str(bin_ / cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
        assert lines[0].startswith(f"error: {cmd[0]}") and "torch" in lines[0]
        assert lines[0].endswith("pip install 'cxr-ddpm[train]'")
