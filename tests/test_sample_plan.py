"""The sample plan (#21.3): validated once, the record read once, hashes taken from the bytes written."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from cxr_ddpm.runtime.outputs import sample_set, shards
from cxr_ddpm.runtime.backends import load_denoiser
from cxr_ddpm.runtime.outputs.formats import FORMATS, DicomSeries, write_image
from cxr_ddpm.runtime.sampling.generate import resolve_request

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-1c52fd5.onnx"


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_image_returns_the_sha256_of_its_bytes(tmp_path: Path, fmt: str) -> None:
    import datetime as dt
    x = np.linspace(-1, 1, 32 * 32, dtype=np.float32).reshape(1, 32, 32)
    path = tmp_path / f"img.{fmt}"
    series = DicomSeries("0" * 64, dt.datetime(2026, 11, 26, tzinfo=dt.timezone.utc))
    written = write_image(path, x, fmt, meta={}, series=series)
    data = path.read_bytes()
    assert written.sha256 == hashlib.sha256(data).hexdigest() and written.size == len(data)


def test_writer_reads_no_image_back_and_the_record_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    den = load_denoiser(FIXTURE, threads=1)
    req = resolve_request(den, 3, sampler="ddim", steps=2, seed=1)
    first = sample_set.sample_to_dir(den, req, out=tmp_path, batch_size=2)

    def no_read_back(path: Path) -> str:
        raise AssertionError(f"read back {path}")
    monkeypatch.setattr(sample_set, "file_sha256", no_read_back, raising=False)
    (tmp_path / first["files"][0]).unlink()                          # a rerun makes image 0 again
    reads: list[Path] = []
    real = shards.read_record

    def counted(path: Path):
        reads.append(Path(path))
        return real(path)
    monkeypatch.setattr(shards, "read_record", counted)
    monkeypatch.setattr(sample_set, "read_record", counted)
    plan = sample_set.plan_set(den, req, out=tmp_path, batch_size=2)
    assert plan.todo == [0] and sorted(plan.done) == [1, 2]
    assert reads == [tmp_path / "samples.json"]                      # finished + request time: one read
    again = sample_set.SetWriter(den, plan).write()
    assert again["images"] == first["images"]                        # same bytes, same hashes


def test_plan_refuses_a_bad_batch_size_before_anything_is_written(tmp_path: Path) -> None:
    from cxr_ddpm.runtime.errors import CxrError
    den = load_denoiser(FIXTURE, threads=1)
    with pytest.raises(CxrError, match="--batch-size 0: must be >= 1"):
        sample_set.plan_set(den, resolve_request(den, 2, steps=2), out=tmp_path / "s", batch_size=0)
    assert not (tmp_path / "s").exists()
