"""The artifact contract (runtime/contract/metadata.py, docs/artifact-contract.schema.json) and the artifact
opened once into one typed object (runtime/contract/artifact.py), on real ONNX files.

The fixtures in tests/fixtures/ were exported and sampled by the code of commit 1c52fd5, before
the contract was versioned major.minor (tests/fixtures/README.md): they must keep sampling the
same pixels under the sampler and grid given explicitly.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_user_error
from cxr_ddpm.runtime.contract.artifact import Artifact, open_artifact
from cxr_ddpm.runtime.backends import load_denoiser
from cxr_ddpm.runtime.cli import main
from cxr_ddpm.runtime.contract.config import DiffusionConfig, ModelConfig
from cxr_ddpm.runtime.backends.denoiser import Denoiser
from cxr_ddpm.runtime.contract.engine_file import write_engine
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.contract.metadata import (FORMAT_MAJOR, FORMAT_MINOR, REQUIRED_KEYS, build_metadata,
                                       check_metadata, onnx_metadata_props)
from cxr_ddpm.train.config import config_from_metadata

from builders import with_metadata

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
COMMIT = "1c52fd5"                           # the code that wrote and sampled the fixtures
TINY, COND = FIXTURES / f"tiny-{COMMIT}.onnx", FIXTURES / f"tiny-cond-{COMMIT}.onnx"
CLASSES = {TINY: (), COND: ("--per-class", "2", "--guidance", "2.0")}     # COND: 2 x COVID-19, 2 x Normal
TRT_SECTION = {"version": "10.0.0", "gpu": "Test GPU", "compute_capability": "9.0", "onnx_sha256": "0" * 64,
               "precision": "fp32", "profile": {"min": 1, "opt": 2, "max": 4}}


def sample(engine: Path, out: Path, *extra: str):
    args = ["sample", "--engine", engine, "-n", "4", "--sampler", "ddim", "--steps", "10", "--seed", "0",
            "--format", "npy", "--out", out, "--threads", "1", *extra]
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def sample_pixels(engine: Path, out: Path, *extra: str) -> np.ndarray:
    """The four images as written, (4, C, H, W) in index order."""
    res = sample(engine, out, *extra)
    assert res.exit_code == 0, res.output
    images = sorted(json.loads((out / "samples.json").read_text())["images"], key=lambda e: e["index"])
    return np.stack([np.load(out / e["file"]) for e in images])


def reference(onnx: Path) -> np.ndarray:
    return np.load(onnx.with_suffix(".npy"))


def edited(src: Path, dst: Path, edit: typing.Callable[[dict], None]) -> Path:
    def apply(text: str) -> str:
        doc = json.loads(text)
        edit(doc)
        return json.dumps(doc)
    with_metadata(src, dst, apply)
    return dst


def as_1_1(doc: dict) -> None:
    """A fixture document laid out as this version writes it (training sections in provenance)."""
    doc["format_minor"] = 1
    doc["provenance"]["training"] = {k: doc["config"].pop(k) for k in ("data", "train")}


# ----------------------------------------------------------------------------- old artifacts
@pytest.mark.parametrize("onnx", [TINY, COND], ids=["tiny", "tiny-cond"])
def test_artifact_from_before_the_contract_samples_the_same_pixels(onnx: Path, tmp_path: Path) -> None:
    got = sample_pixels(onnx, tmp_path, *CLASSES[onnx])
    np.testing.assert_allclose(got, reference(onnx), rtol=0, atol=1e-5)   # < a 16-bit step; measured: equal
    art = open_artifact(onnx)
    assert art.version == (1, 0) and art.training["train"]["steps"] == 200   # an integer version is N.0


# ----------------------------------------------------------------------------- the version rule
@pytest.mark.parametrize("layout", ["1.0", "1.1"])
def test_unknown_training_key_loads_samples_and_shows(layout: str, tmp_path: Path) -> None:
    def edit(doc: dict) -> None:
        if layout == "1.1":
            as_1_1(doc)
        training = doc["provenance"]["training"] if layout == "1.1" else doc["config"]
        training["train"]["new_knob"] = 3                     # a training setting added after this runtime
        training["data"]["new_source"] = "s3://bucket"
        training["curriculum"] = {"stages": 2}                 # a whole new training section
    onnx = edited(TINY, tmp_path / "new.onnx", edit)
    np.testing.assert_array_equal(sample_pixels(onnx, tmp_path / "out"), sample_pixels(TINY, tmp_path / "ref"))
    res = CliRunner().invoke(main, ["inspect", str(onnx)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "new_knob=3" in res.output and "new_source=s3://bucket" in res.output and "stages" in res.output
    assert f"format {layout} (this cxr-ddpm reads" in " ".join(res.output.split())


def test_newer_major_is_refused_in_one_line_naming_both_versions(tmp_path: Path) -> None:
    def edit(doc: dict) -> None:
        doc["format_version"], doc["format_minor"] = FORMAT_MAJOR + 1, 0
        doc["config"] = {"unet": {}}                           # a new major may lay anything out anew
    onnx = edited(TINY, tmp_path / "major.onnx", edit)
    assert_user_error(sample(onnx, tmp_path / "out"), str(onnx),
                      f"format_version {FORMAT_MAJOR + 1}.0 is newer than this cxr-ddpm understands "
                      f"({FORMAT_MAJOR}.{FORMAT_MINOR}); upgrade cxr-ddpm")
    assert not (tmp_path / "out").exists()


def test_newer_minor_loads_and_its_additions_are_skipped(tmp_path: Path) -> None:
    def edit(doc: dict) -> None:
        as_1_1(doc)
        doc["format_minor"] = FORMAT_MINOR + 1
        doc["config"]["model"]["future_knob"] = "x"            # additions a newer minor may make
        doc["config"]["diffusion"]["future_rate"] = 0.5
        doc["future_section"] = {"anything": [1, 2]}
    onnx = edited(TINY, tmp_path / "minor.onnx", edit)
    np.testing.assert_allclose(sample_pixels(onnx, tmp_path / "out"), reference(TINY), rtol=0, atol=1e-5)
    assert open_artifact(onnx).version == (FORMAT_MAJOR, FORMAT_MINOR + 1)


def test_unknown_contract_key_at_a_known_minor_is_refused(tmp_path: Path) -> None:
    """At this runtime's minor or older, an unknown model key is a contract change made without a
    version bump: refused, not silently ignored (it could change what the model needs)."""
    onnx = edited(TINY, tmp_path / "bad.onnx", lambda doc: doc["config"]["model"].update(future_knob="x"))
    assert_user_error(sample(onnx, tmp_path / "out"), "unknown key 'model.future_knob'", str(onnx))


@pytest.mark.parametrize("value", ["1.1", True, -1, None])
def test_unreadable_version_is_one_line(value: object) -> None:
    doc = build_metadata(load_tiny(), kind="onnx", class_names=[])
    doc["format_version"] = value
    with pytest.raises(CxrError, match=r"^x\.onnx: metadata format_version .* is not a version number"):
        check_metadata(doc, "x.onnx")


def load_tiny():
    from cxr_ddpm.train.config import load_config
    return load_config(ROOT / "configs" / "tiny.yaml")


def test_new_documents_carry_training_as_provenance_which_only_training_validates() -> None:
    cfg = load_tiny()
    doc = build_metadata(cfg, kind="onnx", class_names=["a"])
    assert (doc["format_version"], doc["format_minor"]) == (FORMAT_MAJOR, FORMAT_MINOR)
    assert set(doc["config"]) == {"model", "diffusion"}
    assert doc["provenance"]["training"] == {k: cfg.to_dict()[k] for k in ("data", "train")}
    assert config_from_metadata(doc, "x") == cfg               # training reads its whole config back
    doc["provenance"]["training"]["train"]["new_knob"] = 1
    assert check_metadata(doc, "x").spec == cfg.spec           # the runtime: loads
    with pytest.raises(CxrError, match=r"x \(embedded config\): unknown key 'train\.new_knob'"):
        config_from_metadata(doc, "x")                         # training: strict, as for config files


def test_schema_file_pins_the_contract() -> None:
    """docs/artifact-contract.schema.json lists the contract's keys per version: changing a model or
    diffusion field without the schema fails here, and a minor version may only add keys."""
    schema = json.loads((ROOT / "docs" / "artifact-contract.schema.json").read_text())
    assert schema["x-contract-version"] == f"{FORMAT_MAJOR}.{FORMAT_MINOR}"
    assert schema["required"] == list(REQUIRED_KEYS)
    history = schema["x-contract-history"]
    assert history[-1]["version"] == schema["x-contract-version"]
    config = schema["properties"]["config"]["properties"]
    for name, cls in (("model", ModelConfig), ("diffusion", DiffusionConfig)):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert history[-1][name] == list(fields) == list(config[name]["properties"]), name
        for key, prop in config[name]["properties"].items():
            default = fields[key].default if fields[key].default is not dataclasses.MISSING \
                else fields[key].default_factory()
            assert prop["default"] == (list(default) if isinstance(default, tuple) else default), key
        for old, new in zip(history, history[1:]):
            if old["version"].split(".")[0] == new["version"].split(".")[0]:
                assert set(old[name]) <= set(new[name]), (old["version"], new["version"], name)


# ----------------------------------------------------------------------------- one typed object
def facts(art: Artifact) -> tuple:
    return (art.self_condition, art.null_class, art.io.input_names, art.class_names, art.schedule.digest(),
            art.spec)


def test_every_kind_derives_the_same_facts(tmp_path: Path, tiny_ckpt: Path) -> None:
    for onnx in (TINY, COND):
        art = open_artifact(onnx)
        engine = tmp_path / f"{onnx.stem}.engine"
        write_engine(engine, {**art.meta, "kind": "tensorrt", "tensorrt": TRT_SECTION}, b"plan")
        eng = open_artifact(engine)
        assert eng.kind == "tensorrt" and eng.plan_offset and facts(eng) == facts(art)
        den = load_denoiser(engine, open_engine=False)             # header only: no TensorRT needed
        assert isinstance(den, Denoiser) and facts(den.artifact) == facts(art)
    assert facts(open_artifact(COND))[:3] == (False, 2, ("x", "t", "class"))
    ckpt = open_artifact(tiny_ckpt)                                # the safetensors header, torch-free
    torch_den = load_denoiser(tiny_ckpt, threads=1)
    ort_den = load_denoiser(TINY, threads=1)
    assert ckpt.kind == "checkpoint" and facts(torch_den.artifact) == facts(ckpt)
    assert facts(ckpt)[:3] == facts(ort_den.artifact)[:3] == (False, None, ("x", "t"))
    assert isinstance(torch_den, Denoiser) and isinstance(ort_den, Denoiser)
    assert ckpt.sha256 == torch_den.sha256 and ort_den.sha256 == open_artifact(TINY).sha256


@pytest.mark.parametrize("edit, needle", [
    (lambda doc: doc.update(null_class=5), "metadata null_class=5 contradicts"),
    (lambda doc: doc["io"]["inputs"].pop(), "contradict its model config (num_classes 2"),
    (lambda doc: doc["io"].update(outputs=[]), "do not follow the cxr-ddpm denoiser interface"),
    (lambda doc: doc.update(class_names="COVID-19"), "class_names must be a list of strings"),
])
def test_contradictions_are_refused_once_for_every_backend(tmp_path: Path, edit, needle: str) -> None:
    onnx = edited(COND, tmp_path / "bad.onnx", edit)
    with pytest.raises(CxrError, match=needle.replace("(", r"\(")):
        open_artifact(onnx)
    assert_user_error(sample(onnx, tmp_path / "out", *CLASSES[COND]), needle, str(onnx))


def test_denoiser_signatures_name_the_one_type() -> None:
    """The sampling library's functions take runtime.backends.denoiser.Denoiser, not Any (no getattr probing)."""
    from cxr_ddpm.runtime.sampling import bench, generate as sampling
    from cxr_ddpm.runtime.outputs import sample_set
    for fn in (sampling.resolve_request, sampling.iter_batches, sampling.generate, sampling.request_settings,
               bench.bench_run, sample_set.plan_set, sample_set.earlier_grid, sample_set.sample_to_dir,
               sample_set.SetWriter.__init__):
        assert typing.get_type_hints(fn)["denoiser"] is Denoiser, fn.__name__


def test_onnx_document_is_read_without_onnx_or_a_session() -> None:
    """The protobuf walk reads what the onnx package reads, skipping the graph."""
    import onnx
    for path in (TINY, COND):
        assert onnx_metadata_props(path) == {p.key: p.value for p in onnx.load(str(path)).metadata_props}
