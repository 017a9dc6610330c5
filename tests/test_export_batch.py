"""The one --batch syntax of cxr-export onnx / trt / verify (export/batch.py), without any model."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import assert_user_error
from cxr_ddpm.export.batch import VERIFY_DEFAULT, batch_sizes, parse_batch, recorded_batch
from cxr_ddpm.export.cli import main
from cxr_ddpm.runtime.errors import CxrError


@pytest.mark.parametrize("text, want", [("1:4:16", (1, 4, 16)), ("8", (8, 8, 8)), (" 2 : 2 : 3 ", (2, 2, 3))])
def test_parse_batch(text: str, want: tuple) -> None:
    assert parse_batch(text) == want


@pytest.mark.parametrize("text", ["4:2:8", "a:b:c", "0:1:2", "1:2", "1:2:3:4", "", "-1:2:3", "1.5:2:3", "1,3"])
def test_parse_batch_refuses(text: str) -> None:
    with pytest.raises(CxrError, match=r"^--batch "):
        parse_batch(text)


@pytest.mark.parametrize("batch, sizes", [((1, 4, 16), (1, 4, 16)), ((8, 8, 8), (8,)), ((1, 1, 3), (1, 3)),
                                          ((2, 5, 5), (2, 5))])
def test_range_to_distinct_sizes(batch: tuple, sizes: tuple) -> None:
    assert batch_sizes(batch) == sizes


def test_verify_default_tests_a_batch_above_one_and_an_odd_one() -> None:
    sizes = batch_sizes(VERIFY_DEFAULT)
    assert max(sizes) > 1 and any(s % 2 for s in sizes if s > 1)


def test_range_sizes_refuse_a_disordered_range() -> None:
    with pytest.raises(CxrError, match=r"^--batch 4:2:8: need 1 <= MIN <= OPT <= MAX"):
        batch_sizes((4, 2, 8))


def test_recorded_batch_prefers_the_engine_profile() -> None:
    onnx_meta = {"kind": "onnx", "batch": {"min": 1, "opt": 4, "max": 16}}
    engine_meta = {**onnx_meta, "kind": "tensorrt", "tensorrt": {"profile": {"min": 2, "opt": 3, "max": 8}}}
    assert recorded_batch(onnx_meta) == (1, 4, 16)
    assert recorded_batch(engine_meta) == (2, 3, 8)               # what the engine can run, not the ONNX's range
    assert recorded_batch({"kind": "onnx"}) is None and recorded_batch({"batch": {"min": 1}}) is None


@pytest.mark.parametrize("command", ["onnx", "trt", "verify"])
def test_old_comma_list_refused_in_one_line(command: str, tmp_path: Path) -> None:
    """'1,3' (verify's old syntax) fails before any work, with the syntax all three commands take."""
    args = {"onnx": ["--ckpt", str(tmp_path / "none.safetensors")], "trt": ["--onnx", str(tmp_path / "a.onnx")],
            "verify": [str(tmp_path / "a.onnx"), "--ckpt", str(tmp_path / "none.safetensors")]}[command]
    res = CliRunner().invoke(main, [command, *args, "--batch", "1,3"])
    assert_user_error(res, "--batch '1,3'", "MIN:OPT:MAX", "comma lists")
    assert list(tmp_path.iterdir()) == []


def test_help_strings_describe_one_syntax() -> None:
    for command in ("onnx", "trt", "verify"):
        res = CliRunner().invoke(main, [command, "--help"])
        assert res.exit_code == 0 and "MIN:OPT:MAX (or N for N:N:N)" in " ".join(res.output.split()), command
