"""ORT on CUDA: which path is chosen (CUDA graphs, CuPy arrays) for which provider, refusals,
fp16 graphs through the same runtime, and (on a GPU) graphs and CuPy against the plain paths."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr_ddpm.runtime.backends import load_denoiser
from cxr_ddpm.runtime.backends.ort_cuda import (
    CUDA_GRAPH_MODES, choose_arrays, resolve_cuda_graph, sampler_arrays, session_io_types)
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.sampling import generate, resolve_request

from test_runtime_cli import assert_user_error, sample
from test_runtime_parity import export_tiny_onnx


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    return export_tiny_onnx(tmp_path_factory, tiny_ckpt)


@pytest.fixture(scope="module")
def fp16_path(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    from cxr_ddpm.export.onnx_export import export_onnx
    out = tmp_path_factory.getbasetemp() / "runtime-onnx" / "tiny.fp16.onnx"
    if not out.exists():
        out.parent.mkdir(exist_ok=True)
        export_onnx(tiny_ckpt, out, precision="fp16", exporter="legacy", verify=False, log=lambda m: None)
    return out


@pytest.mark.parametrize("mode,provider,want", [
    (None, "cuda", True), ("auto", "cuda", True), ("on", "cuda", True), ("off", "cuda", False),
    (None, "cpu", False), ("auto", "cpu", False), ("off", "cpu", False), ("auto", "tensorrt", False),
])
def test_cuda_graph_decision(mode: str | None, provider: str, want: bool) -> None:
    assert resolve_cuda_graph(mode, provider) is want


@pytest.mark.parametrize("mode,provider,needle", [
    ("on", "cpu", "--cuda-graph on needs --provider cuda"),
    ("on", "tensorrt", "--cuda-graph on needs --provider cuda"),
    ("yes", "cuda", "--cuda-graph 'yes' is unknown"),
])
def test_cuda_graph_refusals(mode: str, provider: str, needle: str) -> None:
    with pytest.raises(CxrError, match=needle):
        resolve_cuda_graph(mode, provider)
    assert set(CUDA_GRAPH_MODES) == {"auto", "on", "off"}


@pytest.mark.parametrize("mode,provider,problem,want", [
    ("auto", "cuda", None, "cupy"),                    # x stays on the GPU
    (None, "cuda", None, "cupy"),
    ("auto", "cuda", "CuPy is not installed", "numpy"),
    ("auto", "cpu", None, "numpy"),
    ("numpy", "cuda", None, "numpy"),
    ("cupy", "cuda", None, "cupy"),
    ("auto", "tensorrt", None, "cupy"),
])
def test_array_choice(mode: str | None, provider: str, problem: str | None, want: str) -> None:
    assert choose_arrays(mode, provider, problem) == want
    if mode != "cupy":                                                 # the torch backend takes NumPy
        assert choose_arrays(mode, provider, problem, "torch") == "numpy"


@pytest.mark.parametrize("mode,provider,problem,needle", [
    ("cupy", "cpu", None, "--arrays cupy needs a GPU provider"),
    ("cupy", "cuda", "CuPy is not installed (pip install cupy-cuda13x)", "pip install cupy-cuda13x"),
    ("jax", "cuda", None, "--arrays 'jax' is unknown"),
])
def test_array_refusals(mode: str, provider: str, problem: str | None, needle: str) -> None:
    with pytest.raises(CxrError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        choose_arrays(mode, provider, problem)
    with pytest.raises(CxrError, match="the torch backend takes NumPy"):
        choose_arrays("cupy", "cuda", None, "torch")


def test_cpu_never_probes_cupy() -> None:
    assert sampler_arrays("auto", "cpu") is np and sampler_arrays("numpy", "cuda") is np


@pytest.mark.parametrize("args,needle", [
    (["--cuda-graph", "on"], "--cuda-graph on needs --provider cuda"),
    (["--arrays", "cupy"], "--arrays cupy needs a GPU provider"),
])
def test_cli_gpu_flags_refused_on_cpu(onnx_path: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    assert_user_error(sample(onnx_path, out, "-n", "1", "--steps", "2", *args), needle)
    assert not out.exists()


def test_cuda_graph_on_refused_for_checkpoints(tiny_ckpt: Path) -> None:
    with pytest.raises(CxrError, match="--cuda-graph on: .* torch backend"):
        load_denoiser(tiny_ckpt, cuda_graph="on")
    assert load_denoiser(tiny_ckpt, cuda_graph="auto").backend == "torch"   # auto: nothing to refuse


def test_cpu_run_records_its_path(onnx_path: Path, tmp_path: Path) -> None:
    res = sample(onnx_path, tmp_path, "-n", "2", "--steps", "2")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "samples.json").read_text())
    assert (rec["arrays"], rec["cuda_graph"], rec["provider"], rec["precision"]) == ("numpy", False, "cpu", "fp32")


def test_gpu_fallback_warning_survives_sampling_filters(onnx_path: Path, tmp_path: Path) -> None:
    """The CLI silences repeated user warnings while it samples; a GPU fallback raised
    mid-run (as a failed CUDA graph capture is) must still reach the user, once."""
    import warnings

    from cxr_ddpm.runtime.backends.ort_cuda import GpuFallbackWarning, warn_fallback
    from cxr_ddpm.runtime.sample_set import quiet_warnings, sample_to_dir
    den = load_denoiser(onnx_path, threads=1)

    class FallsBackOnce:                      # the real denoiser; its first call reports a fallback
        def __init__(self) -> None:
            self.warned = False

        def __getattr__(self, name: str):
            return getattr(den, name)

        def __call__(self, *a, **k):
            if not self.warned:
                self.warned = True
                warn_fallback("model.onnx: CUDA graph capture failed", RuntimeError("capture\n failed"))
            return den(*a, **k)
    with warnings.catch_warnings(record=True) as caught:
        with quiet_warnings():
            warnings.warn("repeated user warning")                    # silenced
            sample_to_dir(FallsBackOnce(), resolve_request(den, 2, steps=2), out=tmp_path, batch_size=2)
    assert not [w for w in caught if w.category is UserWarning]
    msgs = [str(w.message) for w in caught if w.category is GpuFallbackWarning]
    assert msgs == ["model.onnx: CUDA graph capture failed; running without CUDA graphs (capture failed)"]


def test_fp16_graph_through_the_runtime(onnx_path: Path, fp16_path: Path) -> None:
    """fp16 weights/activations, fp32 I/O: the runtime feeds what the graph declares and the
    sampler math stays fp32; images agree with the fp32 model to fp16 accuracy."""
    den16, den32 = load_denoiser(fp16_path, threads=1), load_denoiser(onnx_path, threads=1)
    assert den16.meta["precision"] == "fp16"
    assert session_io_types(den16.session) == {"x": np.float32, "t": np.int64, "out": np.float32}
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32), dtype=np.float32)
    t = np.array([5, 90], np.int64)
    a, b = den16(x, t), den32(x, t)
    assert a.dtype == np.float32 and a.shape == x.shape
    assert 0 < np.abs(a - b).max() <= 2e-2 * b.std()                 # export's fp16 tolerance
    img16 = generate(den16, resolve_request(den16, 2, steps=3, seed=1), batch_size=2)
    img32 = generate(den32, resolve_request(den32, 2, steps=3, seed=1), batch_size=2)
    assert img16.dtype == np.float32 and np.abs(img16 - img32).max() < 0.1


def test_io_types_refuse_what_is_not_fed(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1])],
                          [helper.make_tensor_value_info("out", TensorProto.DOUBLE, [1])])
    path = tmp_path / "double.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(CxrError, match="'x' has type tensor\\(double\\)"):
        session_io_types(sess)


def test_graph_runner_buffers_on_cpu(onnx_path: Path) -> None:
    """The runner's bookkeeping with ORT's CPU device standing in for CUDA (the CPU provider ignores
    gpu_graph_id): one slot per batch size bound once, inputs copied in every call, each output a
    fresh array equal to a plain run, none overwritten by later calls."""
    from cxr_ddpm.runtime.backends.ort_cuda import GraphRunner
    den = load_denoiser(onnx_path, threads=1)
    runner = GraphRunner(den.session, np.float32, device="cpu")
    outs, wants = [], []
    for k in range(3):
        for b in (2, 1):
            x, t = _inputs(b, k)
            outs.append(runner(den.feeds(x, t)))
            wants.append(den(x, t))
    assert len(runner.slots) == 2 and [s.runs for s in runner.slots.values()] == [3, 3]
    ids = sorted(s.run_options.get_run_config_entry("gpu_graph_id") for s in runner.slots.values())
    assert ids == ["1", "2"]
    for got, want in zip(outs, wants):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.array_equal(outs[0], outs[2])


# ---------------------------------------------------------------------------------------------
# GPU: CUDA graphs and CuPy against the plain paths (skipped without a GPU)

def _inputs(b: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(k)
    return rng.standard_normal((b, 1, 32, 32), dtype=np.float32), rng.integers(0, 100, b).astype(np.int64)


@pytest.mark.gpu
@pytest.mark.parametrize("arrays", ["numpy", "cupy"])
def test_cuda_graph_matches_plain_cuda(onnx_path: Path, arrays: str) -> None:
    """Fresh inputs every call, two batch sizes (two graph ids), past the capture runs: replayed
    graphs give what plain CUDA runs give, and every output is a fresh array."""
    xp = sampler_arrays(arrays, "cuda")
    graph = load_denoiser(onnx_path, provider="cuda", cuda_graph="on")
    plain = load_denoiser(onnx_path, provider="cuda", cuda_graph="off")
    assert graph.cuda_graph is True and plain.cuda_graph is False
    host = (lambda a: a) if xp is np else xp.asnumpy
    outs, wants = [], []
    for k in range(6):
        for b in (4, 1):
            x, t = _inputs(b, k)
            outs.append(graph(xp.asarray(x), xp.asarray(t)))
            wants.append(plain(xp.asarray(x), xp.asarray(t)))
    assert graph.cuda_graph is True and len(graph._graphs.slots) == 2
    for got, want in zip(outs, wants):                   # compared at the end: no output was overwritten
        np.testing.assert_allclose(host(got), host(want), atol=1e-4, rtol=1e-4)
    assert not np.array_equal(host(outs[0]), host(outs[-2]))


@pytest.mark.gpu
def test_cupy_sampler_matches_numpy(onnx_path: Path) -> None:
    import cupy
    den = load_denoiser(onnx_path, provider="cuda")
    req = resolve_request(den, 3, steps=5, seed=3)
    a = generate(den, req, batch_size=2, xp=np)
    b = generate(den, req, batch_size=2, xp=cupy)
    assert b.dtype == np.float32 and np.abs(a - b).max() < 1e-4


@pytest.mark.gpu
def test_fp16_on_cuda(onnx_path: Path, fp16_path: Path) -> None:
    x, t = _inputs(4, 0)
    ref = load_denoiser(onnx_path, provider="cuda", cuda_graph="off")(x, t)
    for mode in ("off", "on"):
        got = load_denoiser(fp16_path, provider="cuda", cuda_graph=mode)(x, t)
        assert got.dtype == np.float32 and np.abs(got - ref).max() <= 2e-2 * ref.std()


@pytest.mark.gpu
def test_cli_cuda_records_gpu_path(onnx_path: Path, tmp_path: Path) -> None:
    res = sample(onnx_path, tmp_path, "-n", "3", "--batch-size", "2", "--steps", "4", "--provider", "cuda")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "samples.json").read_text())
    assert rec["provider"] == "cuda" and rec["arrays"] == "cupy" and rec["cuda_graph"] in (True, False)
    assert rec["cuda_graph"] or "warning: " in res.stderr                # off only after a fallback warning
