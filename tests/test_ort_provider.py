"""ONNX Runtime must not fall back from CUDA to CPU silently (#10.4): the decision as a pure function."""
from __future__ import annotations

from pathlib import Path

import pytest

from cxr_ddpm.runtime.backends.onnx import check_session_provider, provider_load_error, provider_problem
from cxr_ddpm.runtime.errors import CxrError

from builders import record_provider_lists


def test_requested_provider_first_is_ok() -> None:
    assert provider_problem("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None
    assert provider_problem("cpu", ["CPUExecutionProvider"]) is None


def test_silent_cpu_fallback_is_refused_with_the_library() -> None:
    msg = provider_problem("cuda", ["CPUExecutionProvider"],
                           "libcudnn.so.9: cannot open shared object file: No such file or directory")
    assert msg is not None and "\n" not in msg
    assert "CUDAExecutionProvider" in msg and "CPUExecutionProvider" in msg and "libcudnn.so.9" in msg


def test_tensorrt_behind_cuda_is_refused() -> None:
    assert provider_problem("tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"]) is not None


def test_provider_library_absent_on_cpu_build() -> None:
    # the CPU onnxruntime wheel ships no CUDA provider library: nothing to diagnose
    assert provider_load_error("cuda") is None


def _identity(tmp_path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    path = tmp_path / "id.onnx"
    onnx.save(helper.make_model(g), str(path))
    return path


def test_real_session_checked(tmp_path: Path) -> None:
    import onnxruntime as ort
    path = _identity(tmp_path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check_session_provider(sess, "cpu", str(path))
    with pytest.raises(CxrError, match="could not load CUDAExecutionProvider"):
        check_session_provider(sess, "cuda", str(path))   # a session that ended up on CPU


@pytest.mark.gpu
def test_real_cuda_session_runs_on_cuda(tmp_path: Path) -> None:
    """On a GPU machine with onnxruntime-gpu: driver ok, libraries preloaded, CUDA provider first."""
    import onnxruntime as ort

    from cxr_ddpm.runtime.backends.onnx import open_session
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    path = _identity(tmp_path)
    sess = open_session(path, provider="cuda")             # preloads, checks the provider
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    assert sess.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"


def test_gpu_install_hint_names_the_swap() -> None:
    from cxr_ddpm.runtime.backends.onnx import GPU_SWAP, gpu_install_hint
    both = gpu_install_hint({"onnxruntime", "onnxruntime-gpu"})
    assert both.startswith("both onnxruntime and onnxruntime-gpu are installed") and both.endswith(GPU_SWAP)
    assert gpu_install_hint({"onnxruntime"}).startswith("for cuda/tensorrt install the GPU build")


# ---------------------------------------------------------------------------------------------
# the one session factory (#18.2, .4, .9): provider lists as pure functions, verify's TF32, and
# no ONNX Runtime session made anywhere else

def test_cuda_provider_list_states_tf32() -> None:
    from cxr_ddpm.runtime.backends.onnx import provider_list
    assert provider_list("cpu") == ["CPUExecutionProvider"]
    assert provider_list("cuda") == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert provider_list("cuda", tf32=True, cuda_graph=True) == [
        ("CUDAExecutionProvider", {"use_tf32": "1", "enable_cuda_graph": "1"}), "CPUExecutionProvider"]


def test_tensorrt_provider_list_has_cuda_cache_and_profile(tmp_path: Path) -> None:
    """TensorRT, then CUDA for what TensorRT does not take, then CPU; engine + timing cache; a
    profile covering the run's batch sizes for every input with a batch axis."""
    from cxr_ddpm.runtime.backends.onnx import provider_list, trt_profile
    io = [{"name": "x", "shape": ["B", 1, 32, 32]}, {"name": "t", "shape": ["B"]},
          {"name": "class", "shape": ["B"]}, {"name": "fixed", "shape": [3]}]
    profile = trt_profile(io, (1, 8))
    assert profile == {"trt_profile_min_shapes": "x:1x1x32x32,t:1,class:1",
                       "trt_profile_opt_shapes": "x:8x1x32x32,t:8,class:8",
                       "trt_profile_max_shapes": "x:8x1x32x32,t:8,class:8"}
    got = provider_list("tensorrt", cuda_graph=True, trt_cache_dir=tmp_path, trt_profile=profile)
    assert [p if isinstance(p, str) else p[0] for p in got] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt, cuda = got[0][1], got[1][1]
    assert trt == {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(tmp_path),
                   "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(tmp_path), **profile}
    assert cuda == {"use_tf32": "0"}                     # no CUDA graphs behind TensorRT


def test_trt_profile_refuses_bad_batches() -> None:
    from cxr_ddpm.runtime.backends.onnx import trt_profile
    for batches in ((), (0, 4)):
        with pytest.raises(CxrError, match="batch sizes must be >= 1"):
            trt_profile([{"name": "x", "shape": ["B", 1, 8, 8]}], batches)


def test_verify_runs_fp32_without_tf32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cxr-export verify's 1e-4 fp32 tolerance is for fp32 math: its CUDA session says use_tf32 0
    (ORT's CUDA default is 1). Checked on the list the factory builds before it asks ORT."""
    import numpy as np

    from cxr_ddpm.export.verify import ort_runner
    path = Path(__file__).parent / "fixtures" / "tiny-1c52fd5.onnx"     # verify runs the sampling adapter
    seen = record_provider_lists(monkeypatch)
    try:
        ort_runner(path, "cuda")
    except CxrError as e:                                   # CPU onnxruntime: refused after the list is built
        assert "not available in this onnxruntime" in str(e)
    assert seen[-1][0] == ("CUDAExecutionProvider", {"use_tf32": "0"})
    run = ort_runner(path, "cpu")                           # a real session, through the same factory
    out = run({"x": np.ones((1, 1, 32, 32), np.float32), "t": np.zeros(1, np.int64)})
    assert out.shape == (1, 1, 32, 32) and out.dtype == np.float32


def test_every_session_goes_through_the_factory() -> None:
    """No `InferenceSession(` outside backends.onnx.open_session in the package or bench/: a session
    made elsewhere skips the library preload, the TF32 choice or the fallback check (#18.4)."""
    import ast
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("runtime", "export", "bench", "train"):
        for file in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(file.read_text(), str(file))
            allowed: set[int] = set()
            if file.relative_to(root).as_posix() == "runtime/backends/onnx.py":
                factory = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "open_session")
                allowed = {id(n) for n in ast.walk(factory)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and id(node) not in allowed:
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                    if name == "InferenceSession":
                        offenders.append(f"{file.relative_to(root)}:{node.lineno}")
    assert not offenders, f"ONNX Runtime sessions made outside open_session: {offenders}"
