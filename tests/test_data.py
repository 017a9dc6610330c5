"""Data pipeline on real radiographs and on generated odd files (16-bit, RGBA, truncated, DICOM)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from builders import ramp as _ramp, write_dicom as _write_dicom
from conftest import assert_user_error
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.inputs.imageio import UnreadableImage, load_gray, load_resized
from cxr_ddpm.train.cli import main as train_cli
from cxr_ddpm.runtime.system import cpu_allowance
from cxr_ddpm.train.data import CxrDataset, default_num_workers, list_images, scan_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_real_radiographs_load(cxr_mini: Path) -> None:
    images = list_images(cxr_mini)
    assert images.class_names == ("COVID-19", "Normal")
    assert images.class_counts() == [26, 18]
    ds = CxrDataset(images, image_size=64)
    x, y = ds[0]
    assert x.shape == (1, 64, 64) and x.dtype.__str__() == "torch.float32"
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
    assert y == 0 and ds[len(ds) - 1][1] == 1


def test_odd_formats_decode_consistently(odd_dataset: Path) -> None:
    ramp = _ramp()
    for name in ("A/deep16.png", "B/rgba.png", "B/rgb.jpg", "B/mono2.dcm"):
        gray = load_gray(odd_dataset / name)
        assert gray.shape == ramp.shape and gray.dtype == np.float32
        np.testing.assert_allclose(gray, ramp, atol=0.02, err_msg=name)
    # MONOCHROME1 stores white as low values: the decoder must invert it
    np.testing.assert_allclose(load_gray(odd_dataset / "B" / "mono1.dcm"), 1.0 - ramp, atol=0.02)


def test_rgba_transparency_is_black(tmp_path: Path) -> None:
    rgba = np.full((10, 10, 4), 255, np.uint8)
    rgba[:, :5, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    gray = load_gray(tmp_path / "a.png")
    assert gray[:, :5].max() == 0.0 and gray[:, 5:].min() == 1.0


def test_dicom_window_is_applied(tmp_path: Path) -> None:
    _write_dicom(tmp_path / "w.dcm", _ramp() * 4095, window=(1024, 512))
    gray = load_gray(tmp_path / "w.dcm")
    # values below 768 clip to black, above 1280 to white: most of the ramp saturates
    assert (gray == 1.0).mean() > 0.6 and (gray == 0.0).mean() > 0.1


def test_dicom_decoding_in_a_thread_keeps_other_threads_warnings(tmp_path: Path) -> None:
    """prepare and check-data decode in worker threads while the main thread warns ("skipping
    unreadable image"). The decoder quiets pydicom's warnings only: a blanket "ignore" there
    (the process's filter list) dropped the main thread's warnings while a DICOM decoded."""
    import threading
    import warnings
    _write_dicom(tmp_path / "w.dcm", _ramp() * 4095)
    decoded, done = [0], threading.Event()

    def decode() -> None:
        while not done.is_set():
            load_gray(tmp_path / "w.dcm")
            decoded[0] += 1

    worker, sent = threading.Thread(target=decode), 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        worker.start()
        try:
            while decoded[0] < 60:                 # warn all through 60 decodes, however fast they are
                warnings.warn(f"main thread {sent}", UserWarning)
                sent += 1
        finally:
            done.set()
            worker.join()
    assert sent > 0 and sum(str(w.message).startswith("main thread") for w in seen) == sent


def test_resize_center_crop_keeps_middle(tmp_path: Path) -> None:
    img = np.zeros((100, 300), np.uint8)
    img[:, 100:200] = 255  # a bright central band, a third of the width
    Image.fromarray(img).save(tmp_path / "wide.png")
    out = load_resized(tmp_path / "wide.png", 32)
    assert out.shape == (32, 32)
    assert out[:, 8:24].mean() > 0.9  # the crop keeps the centre band


def test_truncated_and_garbage_are_unreadable(odd_dataset: Path) -> None:
    with pytest.raises(UnreadableImage, match="truncated"):
        load_gray(odd_dataset / "A" / "truncated.jpg")
    with pytest.raises(UnreadableImage):
        load_gray(odd_dataset / "B" / "notanimage.png")


def test_dataset_skips_bad_files_with_one_warning(odd_dataset: Path, capfd: pytest.CaptureFixture) -> None:
    """One `warning:` line of ours, not a two-line Python warning attributed to torch (#19.19)."""
    ds = CxrDataset(list_images(odd_dataset), image_size=32)
    bad = [i for i, f in enumerate(ds.images.files) if f.name == "truncated.jpg"][0]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no Python warning at all
        x, _ = ds[bad]
        assert x.shape == (1, 32, 32)
        lines = capfd.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"warning: skipping unreadable image {ds.images.files[bad]}: ")
        ds[bad]                                         # second time: nothing new for the same file
        assert capfd.readouterr().err == ""


def test_scan_reports_counts_formats_and_unreadable(odd_dataset: Path) -> None:
    report = scan_dataset(odd_dataset, progress=False)
    assert report.images.class_names == ("A", "B") and report.counts == [3, 5]
    assert {p.name for p, _ in report.unreadable} == {"truncated.jpg", "notanimage.png"}
    assert report.usable == 6
    fmts = " ".join(report.formats)
    assert "16-bit" in fmts and "RGBA" in fmts and "DICOM/MONOCHROME1" in fmts


def test_check_data_cli_good(cxr_mini: Path) -> None:
    res = CliRunner().invoke(train_cli, ["check-data", str(cxr_mini)])
    assert res.exit_code == 0, res.output
    assert "COVID-19" in res.output and "26" in res.output and "usable: 44 of 44" in res.output


def test_check_data_cli_lists_unreadable(odd_dataset: Path) -> None:
    res = CliRunner().invoke(train_cli, ["check-data", str(odd_dataset)])
    assert res.exit_code == 0 and "unreadable: 2" in res.output and "truncated.jpg" in res.output


@pytest.mark.parametrize("setup, needle", [
    ("missing", "data folder not found"),
    ("empty", "no images found"),
    ("allbad", "all 2 images are unreadable"),
    ("file", "not a folder"),
])
def test_check_data_cli_refuses(tmp_path: Path, setup: str, needle: str) -> None:
    root = tmp_path / "d"
    if setup == "empty":
        (root / "Normal").mkdir(parents=True)
    elif setup == "allbad":
        (root / "Normal").mkdir(parents=True)
        (root / "Normal" / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
        (root / "Normal" / "b.png").write_bytes(b"")
    elif setup == "file":
        root.write_text("x")
    res = CliRunner().invoke(train_cli, ["check-data", str(root)])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output


def test_loose_images_form_one_class(tmp_path: Path, cxr_mini: Path) -> None:
    for f in sorted((cxr_mini / "Normal").glob("*.jpg"))[:2]:
        shutil.copy(f, tmp_path / f.name)
    images = list_images(tmp_path)
    assert images.class_names == (tmp_path.name,) and len(images.files) == 2


@pytest.mark.parametrize("args, needle", [
    (["check-data", "{data}", "--workers", "-3"], "'--workers': -3 is not in the range x>=1"),
    (["check-data", "{data}", "--max-list", "-1"], "'--max-list': -1 is not in the range x>=0"),
    (["prepare", "{data}", "--size", "32", "--out", "{out}", "--workers", "0"], "'--workers': 0 is not"),
])
def test_out_of_range_counts_are_one_line(tmp_path: Path, cxr_mini: Path, args: list[str], needle: str) -> None:
    """--workers -3 was a ValueError traceback from ThreadPoolExecutor (#19.19)."""
    args = [a.format(data=cxr_mini, out=tmp_path / "p") for a in args]
    assert_user_error(CliRunner().invoke(train_cli, args), needle)
    assert not (tmp_path / "p").exists()


def test_check_data_on_a_flat_folder_of_images(tmp_path: Path, cxr_mini: Path) -> None:
    """No class folders (lucidrains' Trainer layout): one class, as fit and prepare take it (#19.12)."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((cxr_mini / "Normal").glob("*.jpg"))[:3]:
        shutil.copy(f, flat / f.name)
    res = CliRunner().invoke(train_cli, ["check-data", str(flat)])
    assert res.exit_code == 0, res.output
    assert "3 files in 1 class (" in res.output and "usable: 3 of 3 images" in res.output and not res.stderr


def test_workers_respect_slurm_allowance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cpu_allowance() == 1 and default_num_workers() == 0
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    import os
    assert cpu_allowance() == len(os.sched_getaffinity(0))
    assert default_num_workers(3) == 3


def test_fingerprint_tracks_files_sizes_and_labels(tmp_path: Path, cxr_mini: Path) -> None:
    shutil.copytree(cxr_mini, tmp_path / "d")
    normal = tmp_path / "d" / "Normal"
    seen = {list_images(tmp_path / "d").fingerprint()}
    first, second = sorted(normal.glob("*.jpg"))[:2]
    with open(first, "ab") as f:                                  # same name, another size
        f.write(b"\0")
    seen.add(list_images(tmp_path / "d").fingerprint())
    first.rename(first.with_name("renamed.jpg"))                  # same bytes, another path
    seen.add(list_images(tmp_path / "d").fingerprint())
    second.rename(tmp_path / "d" / "COVID-19" / second.name)      # same file, another label
    seen.add(list_images(tmp_path / "d").fingerprint())
    next(normal.glob("*.jpg")).unlink()                            # one file fewer
    seen.add(list_images(tmp_path / "d").fingerprint())
    assert len(seen) == 5


def test_missing_root_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="data folder not found"):
        list_images(tmp_path / "nope")


# ---------------------------------------------------------------- check-data: usable per class (#11.8)

def test_check_data_counts_usable_images_and_refuses_an_empty_class(tmp_path: Path, cxr_mini: Path) -> None:
    root = tmp_path / "d"
    shutil.copytree(cxr_mini / "Normal", root / "Normal")
    (root / "COVID-19").mkdir()
    for k in range(3):                                              # a class whose files all fail
        (root / "COVID-19" / f"bad{k}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    res = CliRunner().invoke(train_cli, ["check-data", str(root)])
    assert res.exit_code == 2, res.output
    assert "COVID-19       0  (  0.0%)  of 3 files" in res.output and "Normal        18  (100.0%)" in res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {root}: class 'COVID-19' has no readable image (training would never draw it)"]


def test_check_data_warns_when_classes_look_like_datasets(tmp_path: Path, cxr_mini: Path) -> None:
    shutil.copytree(cxr_mini, tmp_path / "parent" / "cxr-mini")       # the dataset's parent given
    shutil.copytree(cxr_mini / "Normal", tmp_path / "parent" / "other" / "x")
    res = CliRunner().invoke(train_cli, ["check-data", str(tmp_path / "parent")])
    assert "warning: class 'cxr-mini' holds class folders itself" in res.stderr
    assert "other" not in res.stderr.split("warning:")[1]                # one class folder: not a dataset


# ---------------------------------------------------------------- fit on undecodable data (#11.5)

@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_fit_refuses_data_that_never_decodes_before_anything_starts(tmp_path: Path, cxr_mini: Path,
                                                                     kind: str) -> None:
    data = tmp_path / "d" / "Normal"
    data.mkdir(parents=True)
    real = sorted((cxr_mini / "Normal").glob("*.jpg"))[0].read_bytes()
    for k in range(3):
        (data / f"x{k}.jpg").write_bytes(b"\xff\xd8\xff garbage" if kind == "garbage" else real[: len(real) // 3])
    out = tmp_path / "run"
    res = CliRunner().invoke(train_cli, ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data",
                                    str(tmp_path / "d"), "--out", str(out)],
                             env={"RANK": None, "WORLD_SIZE": None, "SLURM_STEP_NUM_TASKS": None, "CXR_DEVICE": "cpu"})
    assert_user_error(res, f"{tmp_path / 'd'}: none of its 3 images can be read", "x0.jpg")
    assert not out.exists()
