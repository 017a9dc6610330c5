"""`cxr-runtime eval REAL SYNTH`: how realistic a synthetic set is, and whether it copies patients.

    report = evaluate("data/covid-cxr", "synth/", features="inception.onnx", out="synth/eval")

1. Both sets at the model's image size: real radiographs are decoded and resized exactly as
   training sees them (runtime.inputs.imageio.load_resized); synthetic ones are read as written.
2. With an Inception feature extractor (`cxr-export inception`, pytorch-fid's weights), both
   sets are replicated to 3 channels and resized to 299 px bilinear inside the extractor, as
   pytorch-fid does; then FID, KID (mean, std over subsets) and precision/recall.
3. Always: the memorization audit (runtime/evaluation/memorization.py), per-class counts and the
   pixel-intensity histogram distance.
4. With `heldout` (real images of patients not trained on, read exactly as the training images):
   the three-sample data-copying test (runtime/evaluation/copying.py), which sees copying that the audit's
   near-exact threshold does not.
Writes eval.json, eval.md, closest_pairs.png, histograms.png and, with `heldout`, distances.png
(each atomically) under `out`, created only then: a run that fails leaves no folder behind.
Report folders (`out`, and any folder holding an eval.json) are never read as input.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from .copying import NOT_RUN, CopyingTest, data_copying, distance_plot
from ..inputs.datasets import list_images
from ..errors import CxrError
from ..fsutil import atomic_write, check_output_dir, ensure_writable_dir
from ..inputs.imageio import UnreadableImage, load_gray, load_resized, resize_center_crop
from .memorization import NEAR_DUPLICATE_NCC, PERCENTILE, SIZE, audit, feature_audit
from .metrics import frechet_distance, gaussian_stats, histogram_distance, kid, precision_recall
from ..outputs.formats import grid_png, png_bytes

PUBLISHED_WEIGHTS = "6726825d"        # sha256 prefix of pytorch-fid's pt_inception-2015-12-05-6726825d.pth


def read_synthetic(folder: Path, size: int | None,
                   skip: Sequence[Path] = ()) -> tuple[np.ndarray, list[str | None], int]:
    """A `cxr-runtime sample` folder (its samples.json) or any folder of images (but `skip`):
    (N, S, S) in [0, 1], class of each (None when unknown), S."""
    record = folder / "samples.json"
    if record.is_file():
        try:
            rec = json.loads(record.read_text())
            entries = [(folder / e["file"], e.get("class")) for e in rec.get("images", [])] or \
                      [(folder / f, None) for f in rec.get("files", [])]
            size = size or int(rec["image_size"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:   # JSONDecodeError is a ValueError
            raise CxrError(f"{record}: not a readable sample record ({type(e).__name__}: {e}); rerun "
                           "`cxr-runtime sample` or `cxr-runtime manifest` to rewrite it") from None
        except OSError as e:
            raise CxrError(f"{record}: cannot read: {e.strerror}") from None
    else:
        found = list_images(folder, skip)
        entries = [(f, found.class_names[k] if len(found.class_names) > 1 else None)
                   for f, k in zip(found.files, found.labels) if not _inside(f, skip)]
    if not entries:
        raise CxrError(f"{folder}: no synthetic images listed")
    images = []
    for path, _ in tqdm(entries, desc="reading synthetic", unit="img", leave=False):
        try:
            img = read_sample(path)
        except (OSError, UnreadableImage, ValueError) as e:
            raise CxrError(f"{path}: cannot read synthetic image ({e})") from None
        size = size or img.shape[0]
        images.append(img if img.shape == (size, size) else resize_center_crop(img, size))
    return np.stack(images), [c for _, c in entries], images[0].shape[0]    # each is (size, size) now


def read_sample(path: Path) -> np.ndarray:
    """As written by runtime/outputs/formats.py: 8/16-bit PNG, DICOM (16-bit), npy (float [0, 1])."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path)
        return np.asarray(arr[0] if arr.ndim == 3 else arr, np.float32)
    if suffix == ".dcm":
        import pydicom
        return pydicom.dcmread(path).pixel_array.astype(np.float32) / 65535.0
    from PIL import Image
    with Image.open(path) as im:
        arr = np.asarray(im)
    top = 65535.0 if arr.dtype == np.uint16 or arr.max() > 255 else 255.0
    return (arr.astype(np.float32) / top) if arr.ndim == 2 else load_gray(path)


def read_real(folder: Path, size: int, skip: Sequence[Path] = ()) -> tuple[np.ndarray, list[str], list[Path]]:
    """Real radiographs decoded and resized exactly as training sees them (unreadable ones skipped, as
    training skips them)."""
    found = list_images(folder, skip)
    images, classes, files = [], [], []
    listed = [(f, k) for f, k in zip(found.files, found.labels) if not _inside(f, skip)]
    for f, k in tqdm(listed, desc="reading real", unit="img", leave=False):
        try:
            images.append(load_resized(f, size))
        except (OSError, UnreadableImage):
            continue                                       # as training skips it
        classes.append(found.class_names[k])
        files.append(f)
    if len(images) < 2:
        raise CxrError(f"{folder}: fewer than 2 readable real images")
    return np.stack(images), classes, files


class FeatureExtractor:
    """The ONNX Inception of `cxr-export inception`: (B, 3, H, W) in [0, 1] -> (B, 2048)."""

    def __init__(self, path: Path, provider: str = "cpu") -> None:
        from ..backends.onnx import open_session
        self.session = open_session(path, provider=provider)     # fp32 features: TF32 off
        text = self.session.get_modelmeta().custom_metadata_map.get("cxr_ddpm_features")
        try:
            self.meta = json.loads(text or "")
        except ValueError:
            self.meta = None
        if not isinstance(self.meta, dict) or self.meta.get("kind") != "inception-features":
            raise CxrError(f"{path}: not a cxr-ddpm feature extractor (make one with cxr-export inception)")
        self.published = str(self.meta.get("weights_sha256", "")).startswith(PUBLISHED_WEIGHTS)

    def __call__(self, images: np.ndarray, batch: int = 32) -> np.ndarray:
        out = []
        for a in tqdm(range(0, len(images), batch), desc="features", unit="batch", leave=False):
            x = np.repeat(images[a:a + batch, None].astype(np.float32), 3, axis=1)   # (B, 3, H, W)
            out.append(self.session.run(["features"], {"images": x})[0])
        return np.concatenate(out).astype(np.float64)


def evaluate(real_dir: str | Path, synth_dir: str | Path, *, out: str | Path | None = None,
             features: str | Path | None = None, size: int | None = None, provider: str = "cpu",
             kid_subsets: int = 100, heldout: str | Path | None = None) -> dict[str, Any]:
    real_dir, synth_dir = Path(real_dir), Path(synth_dir)
    held_dir = Path(heldout) if heldout is not None else None
    for folder, what in ((real_dir, "REAL_DIR"), (synth_dir, "SYNTH_DIR"), (held_dir, "--heldout")):
        if folder is not None and not folder.is_dir():
            raise CxrError(f"{folder}: {what} not found (expected a folder)")
    if held_dir is not None and held_dir.resolve() == real_dir.resolve():
        raise CxrError(f"--heldout {held_dir}: is REAL_DIR; give real images of patients not trained on")
    extractor = FeatureExtractor(Path(features), provider) if features else None
    out = check_output_dir(Path(out) if out else synth_dir / "eval", "eval folder")
    synth, synth_classes, size = read_synthetic(synth_dir, size, _report_dirs(synth_dir, out))
    real, real_classes, real_files = read_real(real_dir, size, _report_dirs(real_dir, out))
    held = None
    if held_dir is not None:             # decoded and resized exactly as the training images
        held, _, held_files = read_real(held_dir, size, _report_dirs(held_dir, out))
        both = {f.resolve() for f in held_files} & {f.resolve() for f in real_files}
        if both:
            raise CxrError(f"--heldout {held_dir}: {len(both)} of its images are also in REAL_DIR "
                           f"(e.g. {sorted(both)[0]}); held-out images must be of patients not trained on")
    report: dict[str, Any] = {
        "real": str(real_dir), "synthetic": str(synth_dir), "image_size": size,
        "counts": {"real": _counts(real_classes), "synthetic": _counts(synth_classes)},
        "preprocessing": f"real images decoded and resized to {size} px as training sees them" + (
            "; for the features both sets are replicated to 3 channels and resized to 299 px bilinear "
            "inside the extractor, as pytorch-fid does" if extractor else ""),
        "histogram": histogram_distance(real, synth)}
    with tqdm(total=len(synth), desc="nearest training image", unit="img", leave=False) as bar:
        a = audit(real, synth, progress=bar.update)
    report["memorization"] = {
        "space": f"normalised cross-correlation at {SIZE} px, training images also mirrored",
        "threshold_distance": a.threshold, "threshold_rule": f"percentile {PERCENTILE:g} of each training "
        "image's distance (1 - NCC) to its nearest other training image",
        "copies": [{"synthetic": int(i), "training": str(real_files[a.nearest[i]]), "mirrored": bool(a.mirrored[i]),
                    "distance": float(a.distance[i])} for i in a.copies],
        "copy_share": a.copy_share, "median_nearest_distance": float(np.median(a.distance)),
        "training_near_duplicates": [{"a": str(real_files[i]), "b": str(real_files[j]), "ncc": v}
                                     for i, j, v in a.duplicates]}
    if extractor is not None:
        fr, fs = extractor(real), extractor(synth)
        mu_r, s_r = gaussian_stats(fr)
        mu_s, s_s = gaussian_stats(fs)
        k_mean, k_std = kid(fr, fs, subsets=kid_subsets)
        report["features"] = {"extractor": str(features), "published_weights": extractor.published,
                              "frechet_distance": frechet_distance(mu_r, s_r, mu_s, s_s),
                              "kid_mean": k_mean, "kid_std": k_std, **precision_recall(fr, fs)}
        report["memorization"]["feature_space"] = feature_audit(fr, extractor(real[:, :, ::-1]), fs)
    test = None
    if held is not None:
        test = data_copying(real, synth, held, audit=a)
        report["data_copying"] = {"heldout_dir": str(held_dir), **test.to_json(),
                                  "heldout_flagged_by_audit": int((test.heldout_distance < a.threshold).sum())}
    else:
        report["data_copying"] = {"verdict": "not run", "sentence": NOT_RUN}
    _write(ensure_writable_dir(out, "eval folder"), report, real, synth, a, test)
    return report


def _inside(path: Path, folders: Sequence[Path]) -> bool:
    return any(path.resolve().is_relative_to(d.resolve()) for d in folders)


def _report_dirs(folder: Path, out: Path) -> list[Path]:
    """Folders under `folder` that are reports, never input: `out` and any holding an eval.json."""
    return [out, *(d for d in folder.iterdir() if d.is_dir() and (d / "eval.json").is_file())]


def _counts(classes: Sequence[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in classes:
        out[c or "(unlabelled)"] = out.get(c or "(unlabelled)", 0) + 1
    return out


def first_line(report: dict[str, Any]) -> str:
    f = report.get("features")
    if f is None:
        return ("No feature extractor given: FID, KID and precision/recall need `--features` "
                "(cxr-export inception --weights pt_inception-2015-12-05-6726825d.pth).")
    if not f["published_weights"]:
        return ("WARNING: features from Inception weights that are not pytorch-fid's published ones "
                "(e.g. random): the distances below are NOT FID and compare with nothing published.")
    return f"FID {f['frechet_distance']:.2f} (pytorch-fid's Inception weights)."


def _write(out: Path, report: dict[str, Any], real: np.ndarray, synth: np.ndarray, a: Any,
           test: CopyingTest | None) -> None:
    m, f = report["memorization"], report.get("features")
    lines = [first_line(report), "", f"# Synthetic set evaluation: {report['synthetic']} vs {report['real']}", "",
             f"Images at {report['image_size']} px. {report['preprocessing']}.", "", "## Counts", "",
             "| class | real | synthetic |", "|---|---|---|"]
    names = sorted(set(report["counts"]["real"]) | set(report["counts"]["synthetic"]))
    lines += [f"| {n} | {report['counts']['real'].get(n, 0)} | {report['counts']['synthetic'].get(n, 0)} |"
              for n in names]
    if f is not None:
        label = "FID" if f["published_weights"] else "Frechet distance (unpublished features)"
        lines += ["", "## Feature statistics", "", f"- {label}: {f['frechet_distance']:.3f}",
                  f"- KID: {f['kid_mean']:.5f} +- {f['kid_std']:.5f}",
                  f"- precision {f['precision']:.3f}, recall {f['recall']:.3f} (k={f['k']})"]
    h = report["histogram"]
    lines += ["", "## Pixel intensities", "", f"- total variation {h['total_variation']:.4f}, "
              f"1-Wasserstein {h['wasserstein1']:.4f} (histograms.png)", "", "## Memorization", "",
              f"- {len(m['copies'])} of {len(synth)} synthetic images ({100 * m['copy_share']:.1f}%) are closer to a "
              f"training image than distance {m['threshold_distance']:.4f} ({m['threshold_rule']}); "
              "closest pairs in closest_pairs.png",
              f"- median distance of a synthetic image to its nearest training image: {m['median_nearest_distance']:.4f}",
              *([f"- in feature space: {len(m['feature_space']['copies'])} of {len(synth)} closer to a training image "
                 f"than distance {m['feature_space']['threshold_distance']:.4g} (same rule)"]
                if "feature_space" in m else []),
              f"- training pairs with NCC >= {NEAR_DUPLICATE_NCC}: {len(m['training_near_duplicates'])} "
              "(near-duplicates in the training set lower the threshold)",
              "", "Reading it: a share near 0 means no synthetic image is closer to a training patient than "
              "real distinct patients are to each other; any flagged image should be looked at and removed "
              "before the set is shared. The threshold catches near-exact copies only: a set can sit closer "
              "to the training patients as a whole without one image below it (the data-copying test).",
              "", "## Data-copying test (Meehan, Chaudhuri & Dasgupta, AISTATS 2020)", "", *_copying_lines(report)]
    with atomic_write(out / "eval.json", "w") as fh:
        json.dump(report, fh, indent=1)
    with atomic_write(out / "eval.md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    order = np.argsort(a.distance)[:8]                      # synthetic | nearest training (as matched)
    pairs: list[np.ndarray | None] = []
    for i in order:
        t = real[a.nearest[i]]
        pairs += [synth[i][None] * 2 - 1, (t[:, ::-1] if a.mirrored[i] else t)[None] * 2 - 1]
    grid_png(out / "closest_pairs.png", pairs, cols=2)
    with atomic_write(out / "histograms.png", "wb") as fh:
        fh.write(png_bytes(_histogram_image(real, synth)))
    if test is not None:
        with atomic_write(out / "distances.png", "wb") as fh:
            fh.write(png_bytes(distance_plot(test)))


def _copying_lines(report: dict[str, Any]) -> list[str]:
    c = report["data_copying"]
    if c["verdict"] == "not run":
        return [f"- Not run: {c['sentence']}."]
    md = c["median_distance"]
    lines = [f"- {c['sentence'][0].upper()}{c['sentence'][1:]}.",
             f"- median distance to the nearest training image: synthetic {md['synthetic']:.4f}, held-out "
             f"{md['heldout']:.4f} (distance: {c['distance']}; both histograms in distances.png)",
             f"- rule: {c['rule']}; Z is the Mann-Whitney U of the synthetic against the held-out distances, "
             "Z-scored (Z < 0: synthetic closer)",
             f"- held-out images ({c['heldout_dir']}) that the audit's threshold would flag: "
             f"{c['heldout_flagged_by_audit']} of {c['heldout']}"]
    if len(c["cells"]) > 1:
        lines += [f"- cells: {c['cell_rule']}", "", "| cell | training | held-out | synthetic | Z | counted |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {j} | {x['training']} | {x['heldout']} | {x['synthetic']} | "
                  f"{'-' if x['z'] is None else format(x['z'], '+.2f')} | {'yes' if x['used'] else 'no'} |"
                  for j, x in enumerate(c["cells"])]
    return lines


def _histogram_image(real: np.ndarray, synth: np.ndarray, w: int = 256, h: int = 128) -> np.ndarray:
    """Both intensity histograms as a small picture: real in light grey bars, synthetic as a white line."""
    img = np.zeros((h, w), np.uint8)
    hr = np.histogram(real, bins=w, range=(0, 1))[0].astype(float)
    hs = np.histogram(synth, bins=w, range=(0, 1))[0].astype(float)
    top = max(hr.max() / hr.sum(), hs.max() / hs.sum())
    for x in range(w):
        img[h - int(round((h - 1) * hr[x] / hr.sum() / top)):, x] = 110
        img[h - 1 - int(round((h - 1) * hs[x] / hs.sum() / top)), x] = 255
    return img
