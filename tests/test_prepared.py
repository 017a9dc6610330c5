"""`cxr-train prepare`: the memory-mapped dataset gives the raw loader's pixels up to quantisation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.train.cli import main
from cxr_ddpm.train.data import CxrDataset, list_images
from cxr_ddpm.train.prepared import META, PreparedDataset, make_dataset, open_data, prepare


ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _items(ds) -> tuple[torch.Tensor, list[int]]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), list(ys)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_prepared_equals_raw_loader_up_to_uint8_step(tmp_path, cxr_mini):
    out = prepare(cxr_mini, 32, tmp_path / "p32", progress=False)
    assert out.dtype == "uint8" and out.count == 44 and not out.skipped
    raw_images = list_images(cxr_mini)
    prep = open_data(tmp_path / "p32", 32)
    assert prep.fingerprint() == raw_images.fingerprint()       # provenance names the source data
    assert prep.class_names == raw_images.class_names and prep.labels == raw_images.labels
    raw_x, raw_y = _items(CxrDataset(raw_images, 32))
    prep_x, prep_y = _items(make_dataset(prep, 32))
    assert raw_y == prep_y and prep_x.shape == raw_x.shape == (44, 1, 32, 32)
    err = (prep_x - raw_x).abs().max().item()
    assert 0 < err <= 0.5 / 255 + 1e-6, err                        # quantised, by at most half a step
    # flips act on the tensor with the raw loader's RNG draw: the same images flip
    torch.manual_seed(3)
    raw_f, _ = _items(CxrDataset(raw_images, 32, hflip=True))
    torch.manual_seed(3)
    prep_f, _ = _items(PreparedDataset(prep, hflip=True))
    assert (prep_f - raw_f).abs().max().item() <= 0.5 / 255 + 1e-6
    assert not torch.equal(prep_f, prep_x)                          # some were flipped


def test_deep_sources_give_uint16_and_unreadable_are_listed(tmp_path, odd_dataset):  # noqa: F811
    with pytest.warns(UserWarning, match="skipping unreadable image") as rec:
        r = prepare(odd_dataset, 16, tmp_path / "p", progress=False)
    assert len(rec) == 2 and r.dtype == "uint16" and r.count == 6
    meta = json.loads((tmp_path / "p" / META).read_text())
    assert sorted(Path(p).name for p, _ in meta["skipped"]) == ["notanimage.png", "truncated.jpg"]
    assert "truncated.jpg" not in " ".join(meta["files"]) and meta["max_abs_error"] == 0.5 / 65535
    prep = open_data(tmp_path / "p", 16)
    raw = list_images(odd_dataset)
    keep = [i for i, f in enumerate(raw.files) if f.name not in ("notanimage.png", "truncated.jpg")]
    raw_ds = CxrDataset(raw, 16)
    for j, i in enumerate(keep):
        x, y = make_dataset(prep, 16)[j]
        rx, ry = raw_ds[i]
        assert y == ry and (x - rx).abs().max().item() <= 0.5 / 65535 + 1e-7


def test_prepare_cli_is_atomic_and_refuses_existing(tmp_path, cxr_mini):
    out = tmp_path / "p"
    res = CliRunner().invoke(main, ["prepare", str(cxr_mini), "--size", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "44 images, 16 px, uint8" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]      # no temp folder left behind
    res = CliRunner().invoke(main, ["prepare", str(cxr_mini), "--size", "16", "--out", str(out)])
    assert res.exit_code == 2 and "already exists" in res.stderr and res.stderr.count("\n") == 1
    bad = tmp_path / "empty"
    bad.mkdir()
    res = CliRunner().invoke(main, ["prepare", str(bad), "--size", "16", "--out", str(tmp_path / "q")])
    assert res.exit_code == 2 and "no images found" in res.stderr
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.*"))


def test_fit_refuses_size_mismatch_in_one_line(tmp_path, cxr_mini):
    prepare(cxr_mini, 16, tmp_path / "p16", progress=False)
    res = CliRunner().invoke(main, ["fit", "--config", TINY, "--data", str(tmp_path / "p16"),
                                    "--out", str(tmp_path / "run")],
                             env={"RANK": None, "WORLD_SIZE": None, "SLURM_STEP_NUM_TASKS": None})
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "prepared at 16 px but model.image_size=32" in lines[0]
    assert not (tmp_path / "run").exists()


def test_stale_cache_refused(tmp_path, cxr_mini):
    src = _copy(cxr_mini, tmp_path / "src")
    prepare(src, 16, tmp_path / "p", progress=False)
    open_data(tmp_path / "p", 16)                                    # fresh: accepted
    extra = next((src / "Normal").iterdir())
    shutil.copy(extra, src / "Normal" / "added.jpg")
    with pytest.raises(CxrError, match="stale: .* changed since it was prepared"):
        open_data(tmp_path / "p", 16)
    shutil.rmtree(src)                                               # unreachable source: trusted
    assert len(open_data(tmp_path / "p", 16).labels) == 44


@pytest.mark.parametrize("damage", ["foreign_meta", "not_json", "missing_array", "wrong_count"])
def test_foreign_or_damaged_folder_refused(tmp_path, cxr_mini, damage):
    p = tmp_path / "p"
    prepare(cxr_mini, 16, p, progress=False)
    meta = json.loads((p / META).read_text())
    if damage == "foreign_meta":
        (p / META).write_text(json.dumps({"format": "something else"}))
    elif damage == "not_json":
        (p / META).write_text("{not json")
    elif damage == "missing_array":
        (p / "images.npy").unlink()
    else:
        (p / META).write_text(json.dumps({**meta, "count": 43}))
    with pytest.raises(CxrError, match="rerun cxr-train prepare") as e:
        open_data(p, 16)
    assert "\n" not in str(e.value)
