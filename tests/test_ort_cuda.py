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
from cxr_ddpm.runtime.sampling.generate import generate, resolve_request

from builders import record_provider_lists, sample
from conftest import assert_user_error


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
    (["--tf32"], "--tf32 needs --provider cuda or tensorrt (got cpu)"),
    (["--provider", "tensorrt", "--trt-cache", "/proc/no-such/cache"], "not available in this onnxruntime"),
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
    assert rec["tf32"] is False


def test_gpu_fallback_warning_survives_sampling_filters(onnx_path: Path, tmp_path: Path) -> None:
    """The CLI silences repeated user warnings while it samples; a GPU fallback raised
    mid-run (as a failed CUDA graph capture is) must still reach the user, once."""
    import warnings

    from cxr_ddpm.runtime.backends.ort_cuda import GpuFallbackWarning, warn_fallback
    from cxr_ddpm.runtime.outputs.sample_set import quiet_warnings, sample_to_dir
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
    assert rec["provider"] == "cuda" and rec["arrays"] == "cupy"
    assert rec["cuda_graph"] is True and "warning: " not in res.stderr, res.stderr  # captured, no fallback


# ---------------------------------------------------------------------------------------------
# TF32 (#18.2), TensorRT through ORT (#18.9) and the CuPy probe (#18.3), on CPU

def test_tf32_refused_where_ort_does_not_run_it(tiny_ckpt: Path) -> None:
    with pytest.raises(CxrError, match="--tf32: .* torch backend; --tf32 is an ONNX Runtime setting"):
        load_denoiser(tiny_ckpt, tf32=True)
    assert load_denoiser(tiny_ckpt, tf32=False).backend == "torch"        # off: nothing to refuse


def test_tf32_is_part_of_the_request(onnx_path: Path) -> None:
    """TF32 changes the U-Net's rounding and so the pixels: a set started without it is not resumed
    with it (samples.json records it, and it is in request_sha256)."""
    from cxr_ddpm.runtime.sampling.generate import request_settings, request_sha256
    den = load_denoiser(onnx_path, threads=1)
    req = resolve_request(den, 2, steps=2)
    plain = request_settings(den, req, "png")
    assert "tf32" not in plain                        # CPU: no TF32, and 0.2.0 CPU sets keep their hash
    den.provider = "cuda"                             # as --provider cuda sessions report it, off and on
    off = request_settings(den, req, "png")
    den.tf32 = True
    on = request_settings(den, req, "png")
    assert off["tf32"] is False and on["tf32"] is True
    assert len({request_sha256(plain), request_sha256(off), request_sha256(on)}) == 3


@pytest.mark.parametrize("provider,first", [
    ("cuda", ("CUDAExecutionProvider", {"use_tf32": "0", "enable_cuda_graph": "1"})),
    ("tensorrt", None),
])
def test_gpu_sessions_ask_for_the_right_providers(onnx_path: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, provider: str, first) -> None:
    """What the runtime asks ORT for on a GPU, from the real model's metadata; this onnxruntime then
    refuses (CPU build) without leaving an engine cache folder behind."""
    seen = record_provider_lists(monkeypatch)
    cache = tmp_path / "cache"
    try:
        load_denoiser(onnx_path, provider=provider, trt_cache_dir=cache, trt_batches=(1, 4))
    except CxrError as e:                             # a GPU machine may get further (a TensorRT-less one)
        if "not available in this onnxruntime" in str(e):
            assert not cache.exists()
    got = seen[0]
    if provider == "cuda":
        assert got == [first, "CPUExecutionProvider"]
        return
    assert [p if isinstance(p, str) else p[0] for p in got] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert got[0][1]["trt_engine_cache_path"] == str(cache) and got[0][1]["trt_engine_cache_enable"] == "True"
    assert (got[0][1]["trt_profile_min_shapes"], got[0][1]["trt_profile_max_shapes"]) == (
        "x:1x1x32x32,t:1", "x:4x1x32x32,t:4")
    assert got[1] == ("CUDAExecutionProvider", {"use_tf32": "0"})


def test_default_trt_cache_is_beside_the_model(onnx_path: Path) -> None:
    from cxr_ddpm.runtime.backends.onnx import default_trt_cache
    assert default_trt_cache(onnx_path) == onnx_path.parent / (onnx_path.name + ".trtcache")


class _StandInCupy:
    """CuPy as installed without its compiler: imports, counts a device, and fails at the first
    kernel launch the way CuPy does when NVRTC cannot be loaded (CuPy cannot be installed here)."""

    def __init__(self, devices: int = 1, compiles: bool = False) -> None:
        runtime = type("runtime", (), {"getDeviceCount": staticmethod(lambda: devices)})
        self.cuda = type("cuda", (), {"runtime": runtime})
        self.float32 = np.float32
        self.compiles = compiles

    def arange(self, n: int, dtype=None):
        return _Device(np.arange(n, dtype=dtype))

    def ElementwiseKernel(self, in_params: str, out_params: str, body: str, name: str):
        def launch(x):
            if not self.compiles:
                raise RuntimeError("CuPy failed to load libnvrtc.so.13: OSError: libnvrtc.so.13: cannot open "
                                   "shared object file: No such file or directory")
            return _Device(2 * x.host + 1)
        return launch


class _Device:
    def __init__(self, host: np.ndarray) -> None:
        self.host = host

    def get(self) -> np.ndarray:
        return self.host


def test_cupy_without_nvrtc_is_not_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import warnings

    from cxr_ddpm.runtime.backends.ort_cuda import GpuFallbackWarning, cupy_problem
    monkeypatch.setitem(sys.modules, "cupy", _StandInCupy())
    problem = cupy_problem()
    assert problem is not None and "\n" not in problem
    assert "CuPy cannot compile its kernels" in problem and "libnvrtc.so.13" in problem
    assert "pip install 'cupy-cuda13x[ctk]'" in problem
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sampler_arrays("auto", "cuda") is np                      # NumPy, and says so once
    msgs = [str(w.message) for w in caught if w.category is GpuFallbackWarning]
    assert len(msgs) == 1 and msgs[0].startswith("--arrays auto: CuPy cannot compile") and "\n" not in msgs[0]
    assert msgs[0].endswith("; the sampler math runs on NumPy")
    with pytest.raises(CxrError, match=r"^--arrays cupy: CuPy cannot compile its kernels"):
        sampler_arrays("cupy", "cuda")


def test_cupy_probe_passes_a_working_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import warnings

    from cxr_ddpm.runtime.backends.ort_cuda import cupy_problem
    fake = _StandInCupy(compiles=True)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert cupy_problem() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # no warning when CuPy works
        assert sampler_arrays("auto", "cuda") is fake
    monkeypatch.setitem(sys.modules, "cupy", _StandInCupy(devices=0))
    assert cupy_problem() == "CuPy sees no CUDA device"


def test_missing_cupy_falls_back_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import warnings
    monkeypatch.setitem(sys.modules, "cupy", None)                       # import cupy -> ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sampler_arrays("auto", "cuda") is np
