"""ONNX Runtime must not fall back from CUDA to CPU silently (#10.4): the decision as a pure function."""
from __future__ import annotations

from pathlib import Path

import pytest

from cxr_ddpm.runtime.backends.onnx import check_session_provider, provider_load_error, provider_problem
from cxr_ddpm.runtime.errors import CxrError


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

    from cxr_ddpm.runtime.backends.onnx import preload_gpu_libraries
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    path = _identity(tmp_path)
    preload_gpu_libraries()
    sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_session_provider(sess, "cuda", str(path))


def test_gpu_install_hint_names_the_swap() -> None:
    from cxr_ddpm.runtime.backends.onnx import GPU_SWAP, gpu_install_hint
    both = gpu_install_hint({"onnxruntime", "onnxruntime-gpu"})
    assert both.startswith("both onnxruntime and onnxruntime-gpu are installed") and both.endswith(GPU_SWAP)
    assert gpu_install_hint({"onnxruntime"}).startswith("for cuda/tensorrt install the GPU build")
