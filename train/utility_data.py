"""The inputs of `cxr-train utility` and their checks: three class-folder sets, their content hashes,
and what the synthetic set's record tells about the generator's training data.

Was REAL_TEST in the generator's training data? A checkpoint records `data_fingerprint`, a hash
of the relative paths, sizes and labels of every training file (runtime/inputs/datasets.py), not of
each file, plus data.root, the folder as given to `cxr-train fit` (under provenance.training,
or config in older artifacts). ONNX and TensorRT files carry that folder too and name their
checkpoint (path and sha256), which holds the fingerprint.
From samples.json (engine path and sha256) `generator_data` follows that chain and tells:
- REAL_TEST is in it: the fingerprint is REAL_TEST's own or that of REAL_TRAIN + REAL_TEST merged
  (the whole folder before the split), or the training folder, reachable from here, holds files
  with the bytes of REAL_TEST files (sizes compared first, then sha256);
- REAL_TEST is not in it: the fingerprint is REAL_TRAIN's exactly, or the reachable training folder
  (unchanged since training: same fingerprint) holds none of REAL_TEST's files;
- unknown otherwise: no record or engine, files moved, or a fingerprint of some other file list
  (a larger folder that held REAL_TEST among others is not recognised without the folder).
It never sees the same patient in different files, nor re-encoded or resized copies.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from tqdm import tqdm

from cxr_ddpm.runtime.contract.artifact import open_artifact
from cxr_ddpm.runtime.inputs.datasets import ImageList, fingerprint_entries, list_images
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import file_sha256
from cxr_ddpm.runtime.outputs.shards import RECORD

MIN_PER_CLASS = 2       # AUROC and its bootstrap need both sides of every class; training needs some


@dataclass(frozen=True)
class LabelledSet:
    """Files with their class names, as listed from class folders or a sample record."""
    flag: str
    root: Path
    files: tuple[Path, ...]
    classes: tuple[str, ...]                    # the class of each file
    names: tuple[str, ...]                      # the distinct classes, sorted
    record: dict[str, Any] | None = None        # samples.json, for a synthetic set that has one
    images: ImageList | None = None             # real sets: their listing (fingerprints)

    def counts(self) -> list[int]:
        return [self.classes.count(c) for c in self.names]


def real_set(root: Path, flag: str, skip: list[Path] | None = None) -> LabelledSet:
    try:
        found = list_images(root, skip or ())
    except CxrError as e:
        raise CxrError(f"{flag} {e}") from None
    if len(found.class_names) == 1 and not (root / found.class_names[0]).is_dir():
        raise CxrError(f"{flag} {root}: images lie directly in it; put them in one folder per class")
    classes = tuple(found.class_names[k] for k in found.labels)
    return LabelledSet(flag, root, found.files, classes, found.class_names, images=found)


def report_dirs(folder: Path, out: Path) -> list[Path]:
    """Folders under `folder` that hold reports, never images to read: `out` and any with an
    eval.json or utility.json."""
    return [out, *(d for d in folder.iterdir() if d.is_dir() and any(
        (d / name).is_file() for name in ("eval.json", "utility.json")))]


def synthetic_set(root: Path, out: Path) -> LabelledSet:
    """`cxr-runtime sample --per-class` output (its samples.json lists file and class of every
    image) or any class folders of images."""
    flag = "--synth"
    if not root.is_dir():
        raise CxrError(f"{flag} {root}: {'not found' if not root.exists() else 'not a folder'}")
    path = root / RECORD
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            entries = [(root / e["file"], e["class"]) for e in record["images"]]
        except (ValueError, KeyError, TypeError) as e:
            raise CxrError(f"{flag} {path}: not a readable sample record ({type(e).__name__}: {e})") from None
        except OSError as e:
            raise CxrError(f"{flag} {path}: cannot read: {e.strerror}") from None
        if not entries:
            raise CxrError(f"{flag} {path}: lists no images")
        if any(c is None for _, c in entries):
            raise CxrError(f"{flag} {root}: an unconditional set (its images have no class); sample a "
                           "class-conditional model with --per-class")
        files, classes = tuple(f for f, _ in entries), tuple(str(c) for _, c in entries)
        return LabelledSet(flag, root, files, classes, tuple(sorted(set(classes))), record=record)
    return real_set(root, flag, report_dirs(root, out))


def check_sets(train: LabelledSet, test: LabelledSet, synth: LabelledSet) -> None:
    """Same class names everywhere and enough images of each class in each set."""
    for s in (test, synth):
        if s.names != train.names:
            raise CxrError(f"{s.flag} {s.root}: classes ({', '.join(s.names)}) do not match --train's "
                           f"({', '.join(train.names)})")
    if len(train.names) < 2:
        raise CxrError(f"--train {train.root}: one class ({train.names[0]}); AUROC needs at least two")
    for s in (train, test, synth):
        for name, n in zip(s.names, s.counts()):
            if n < MIN_PER_CLASS:
                raise CxrError(f"{s.flag} {s.root}: class {name} has {n} image{'s' if n != 1 else ''}; at least "
                               f"{MIN_PER_CLASS} per class are needed (every class on both sides of the AUROC)")


def hashes(s: LabelledSet) -> dict[str, Path]:
    """sha256 -> a file of that content."""
    return {file_sha256(f): f for f in tqdm(s.files, desc=f"hashing {s.flag[2:]}", unit="file", leave=False)}


def check_disjoint(test: LabelledSet, test_hashes: dict[str, Path], other: LabelledSet,
                   other_hashes: dict[str, Path]) -> None:
    shared = sorted(set(test_hashes) & set(other_hashes), key=lambda h: test_hashes[h])
    if shared:
        a, b = test_hashes[shared[0]], other_hashes[shared[0]]
        raise CxrError(f"--test {test.root} and {other.flag} {other.root} share {len(shared)} file"
                       f"{'s' if len(shared) != 1 else ''} (same content, e.g. {a.relative_to(test.root)} = "
                       f"{b.relative_to(other.root)}): test images must be new to every classifier")


# -----------------------------------------------------------------------------
# the generator's training data

def _merged_fingerprint(sets: list[ImageList]) -> str:
    """The fingerprint of one folder holding every file of `sets` (same class names)."""
    entries = [(PurePath(str(f.relative_to(s.root))), f.stat().st_size, y)
               for s in sets for f, y in zip(s.files, s.labels)]
    return fingerprint_entries((str(rel), size, y) for rel, size, y in sorted(entries, key=lambda e: (e[2], e[0])))


def _trace(record: dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
    """(what the chain record -> engine -> checkpoint gives, why it stops early or None)."""
    info: dict[str, Any] = {"engine": None, "checkpoint": None, "data_root": None, "data_fingerprint": None}
    if record is None:
        return info, f"no {RECORD} (not written by cxr-runtime sample), so no engine to ask"
    engine = record.get("engine")
    info["engine"] = engine
    if not engine or not Path(engine).is_file():
        return info, f"the engine {engine} named in {RECORD} is not reachable from here"
    if record.get("engine_sha256") and file_sha256(engine) != record["engine_sha256"]:
        return info, f"{engine} is not the engine that sampled the set (its sha256 differs from the record's)"
    try:
        art = open_artifact(engine)
    except CxrError as e:
        return info, str(e)
    root = (art.training.get("data") or {}).get("root")
    info["data_root"] = str(root) if root else None
    info["data_fingerprint"] = art.provenance.get("data_fingerprint")
    source = art.meta.get("source") or {}
    ck = source.get("path")
    if info["data_fingerprint"] is None and ck:                  # ONNX / TensorRT: ask the checkpoint
        info["checkpoint"] = ck
        if not Path(ck).is_file():
            return info, None
        if source.get("checkpoint_sha256") and file_sha256(ck) != source["checkpoint_sha256"]:
            return info, None                                   # overwritten since export: not trusted
        try:
            info["data_fingerprint"] = open_artifact(ck, "checkpoint").provenance.get("data_fingerprint")
        except CxrError:
            pass
    return info, None


def _training_folder(root: str | None) -> Path | None:
    """The folder of the generator's training images, when reachable; a prepared folder's source."""
    if not root or not Path(root).is_dir():
        return None
    prepared = Path(root) / "cxr-prepared.json"
    if prepared.is_file():
        try:
            source = json.loads(prepared.read_text())["source_root"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return Path(source) if Path(source).is_dir() else None
    return Path(root)


def generator_data(record: dict[str, Any] | None, train: ImageList, test: ImageList,
                   test_hashes: dict[str, Path]) -> dict[str, Any]:
    """What can be told about REAL_TEST being in the generator's training data (see the module
    docstring): the traced fields plus verdict ("REAL_TEST is in it", "REAL_TEST is not in it",
    "unknown") and a detail sentence."""
    info, stop = _trace(record)

    def out(verdict: str, detail: str) -> dict[str, Any]:
        return {**info, "verdict": verdict, "detail": detail}

    if stop:
        return out("unknown", stop)
    fp = info["data_fingerprint"]
    if fp and fp == test.fingerprint():
        return out("REAL_TEST is in it", f"its data fingerprint {fp} is REAL_TEST's: trained on REAL_TEST")
    if fp and fp == _merged_fingerprint([train, test]):
        return out("REAL_TEST is in it", f"its data fingerprint {fp} is that of REAL_TRAIN and REAL_TEST merged "
                   "(the data before the split)")
    if fp and fp == train.fingerprint():
        return out("REAL_TEST is not in it", f"its data fingerprint {fp} is REAL_TRAIN's (file names, sizes, "
                   "classes): trained on REAL_TRAIN alone")
    folder = _training_folder(info["data_root"])
    if folder is None:
        why = "no fingerprint recorded" if not fp else (f"fingerprint {fp} matches neither REAL_TEST, REAL_TRAIN "
                                                        "nor the two merged")
        return out("unknown", f"{why}, and its training folder {info['data_root']} is not reachable from here")
    try:
        held = list_images(folder)
    except CxrError as e:
        return out("unknown", str(e))
    sizes = {f.stat().st_size for f in test_hashes.values()}
    found = {h for f in held.files if f.stat().st_size in sizes and (h := file_sha256(f)) in test_hashes}
    changed = bool(fp) and held.fingerprint() != fp
    if found:
        return out("REAL_TEST is in it", f"{len(found)} of REAL_TEST's {len(test.files)} files are in its training "
                   f"folder {folder} (same content)" + (" as it is now (changed since training)" if changed else ""))
    if changed:
        return out("unknown", f"its training folder {folder} holds none of REAL_TEST's files now, but it changed "
                   f"since training (fingerprint {held.fingerprint()}, trained on {fp})")
    return out("REAL_TEST is not in it", f"its training folder {folder} holds none of REAL_TEST's "
               f"{len(test.files)} files (content hashes)")


def warn_generator_data(gen: dict[str, Any]) -> None:
    if gen["verdict"] == "REAL_TEST is in it":
        print(f"warning: REAL_TEST is part of the generator's training data ({gen['detail']}): the synthetic "
              "regimes are scored on images their generator has seen", file=sys.stderr, flush=True)
