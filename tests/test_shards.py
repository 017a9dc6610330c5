"""Sharded sample sets: index ranges, resumable records, and the merge into one manifest."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import file_sha256
from cxr_ddpm.runtime.outputs.shards import finished, merge, parse_shard, record_name, shard_range, write_record


@pytest.mark.parametrize("n, m", [(10, 3), (7, 7), (5, 8), (1000, 16)])
def test_shards_cover_every_index_once(n: int, m: int) -> None:
    got = [i for k in range(m) for i in shard_range(n, (k, m))]
    assert got == list(range(n))


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "2/0"])
def test_bad_shard_flag(text: str) -> None:
    with pytest.raises(CxrError, match="--shard"):
        parse_shard(text)


def _shard(out: Path, k: int, m: int, n: int, *, complete: bool = True, request: str = "r1",
           skip: tuple[int, ...] = ()) -> None:
    images = []
    for i in shard_range(n, (k, m)):
        if i in skip:
            continue
        f = out / f"sample_{i:05d}.png"
        f.write_bytes(f"image {i}".encode())
        images.append({"index": i, "class": None, "file": f.name, "sha256": file_sha256(f)})
    write_record(out, (k, m), {"request_sha256": request, "n": n, "seed": 0, "shard": [k, m],
                               "complete": complete, "images": images, "files": [e["file"] for e in images],
                               "seconds": 1.0})


def test_merge_writes_one_record_and_manifest(tmp_path: Path) -> None:
    for k in range(3):
        _shard(tmp_path, k, 3, 10)
    rec = merge(tmp_path)
    assert rec["files"] == [f"sample_{i:05d}.png" for i in range(10)] and rec["shards"] == 3
    assert json.loads((tmp_path / "samples.json").read_text())["complete"] is True
    with open(tmp_path / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(10)) and {r["request_sha256"] for r in rows} == {"r1"}
    assert rows[4]["sha256"] == file_sha256(tmp_path / "sample_00004.png")


def test_merge_names_what_is_missing(tmp_path: Path) -> None:
    _shard(tmp_path, 0, 3, 10)
    _shard(tmp_path, 1, 3, 10, complete=False, skip=(4,))
    with pytest.raises(CxrError, match=r"5 of 10 images missing \(indices 4, 6-9\); shards not finished: 1, 2 of 3"):
        merge(tmp_path)
    assert not (tmp_path / "manifest.csv").exists()


def test_merge_refuses_mixed_requests_and_sizes(tmp_path: Path) -> None:
    _shard(tmp_path, 0, 2, 4)
    _shard(tmp_path, 1, 2, 4, request="other")
    with pytest.raises(CxrError, match="different requests"):
        merge(tmp_path)
    _shard(tmp_path, 0, 3, 4)
    with pytest.raises(CxrError, match="different array sizes"):
        merge(tmp_path)


def test_finished_checks_each_file_and_the_request(tmp_path: Path) -> None:
    _shard(tmp_path, 1, 2, 6)
    assert sorted(finished(tmp_path, (1, 2), "r1")) == [3, 4, 5]
    (tmp_path / "sample_00004.png").write_bytes(b"changed")              # does not count any more
    (tmp_path / "sample_00005.png").unlink()
    assert sorted(finished(tmp_path, (1, 2), "r1")) == [3]
    assert finished(tmp_path, (0, 2), "r1") == {}                         # no record yet
    with pytest.raises(CxrError, match="holds samples of another request"):
        finished(tmp_path, (1, 2), "r2")
    (tmp_path / record_name((0, 2))).write_text("{not json")
    with pytest.raises(CxrError, match="unreadable sample record"):
        finished(tmp_path, (0, 2), "r1")
