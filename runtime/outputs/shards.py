"""Sharded, resumable sample sets: which indices a shard owns, what is already on disk, and the
merge of every shard's record into one manifest.

Image i depends only on the request (engine, sampler, seed, ...) and i, so a set of N images
can be cut into M disjoint index ranges made by M processes (a Slurm job array) and still be
exactly the set one process would make. Each writer keeps a record beside the images,
rewritten atomically after every batch:

    OUT/samples.json                          one process (no --shard)
    OUT/samples.shard-00003-of-00008.json     shard 3 of 8

holding the request's settings, its `request_sha256`, and one entry per finished image
{index, class, file, sha256}. A rerun with the same request skips the images its record lists
(after checking each file's sha256); files are written by rename, so a half-written image never
exists, and an image written but not yet recorded is simply made again, byte for byte.
`merge` (`cxr-runtime manifest OUT`) checks that the shards cover 0..N-1 exactly once with
one request and that every listed file is on disk as recorded (size, sha256), then writes
OUT/samples.json for the whole set and OUT/manifest.csv.

One writer per record: a writer holds OUT/.samples.json.lock (or its shard's
.samples.shard-K-of-M.json.lock), an OS lock (fsutil.exclusive_lock) that dies with it, so the
tasks of a job array run side by side while a second writer of the same record is refused;
the merge holds every one of them.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

from ..errors import CxrError
from ..fsutil import atomic_write, exclusive_lock, file_sha256

RECORD = "samples.json"
MANIFEST = "manifest.csv"
_SHARD_RE = re.compile(r"^samples\.shard-(\d{5})-of-(\d{5})\.json$")
_SHARD_LOCK_RE = re.compile(r"^\.samples\.shard-(\d{5})-of-(\d{5})\.json\.lock$")
# The record holds one entry per image and is rewritten after every batch: past ~10M images
# it is a GB-sized file, and a typo'd -n (1e20) would build its index list until memory ran out.
MAX_IMAGES = 10_000_000
MANIFEST_FIELDS = ("index", "class", "seed", "file", "sha256", "request_sha256")


def check_count(count: int, flag: str = "-n") -> None:
    """Refuse an image count no sample set can hold (before any list of that length is built)."""
    if count > MAX_IMAGES:
        raise CxrError(f"{flag} {count}: at most {MAX_IMAGES} images per sample set"
                       + (" (split a bigger one over several --out folders)" if flag == "-n" else ""))


def parse_shard(text: str) -> tuple[int, int]:
    """'K/M' -> (K, M) with 0 <= K < M."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise CxrError(f"--shard {text!r}: expected K/M with 0 <= K < M (e.g. 0/4)")
    return int(m.group(1)), int(m.group(2))


def shard_range(n: int, shard: tuple[int, int] | None) -> range:
    """The image indices shard (K, M) owns: [K*n//M, (K+1)*n//M); all of 0..n-1 without a shard."""
    if shard is None:
        return range(n)
    k, m = shard
    return range(k * n // m, (k + 1) * n // m)


def record_name(shard: tuple[int, int] | None) -> str:
    return RECORD if shard is None else f"samples.shard-{shard[0]:05d}-of-{shard[1]:05d}.json"


def lock_name(shard: tuple[int, int] | None) -> str:
    """The lock file of a record's writer (hidden, beside the record; removed on release)."""
    return f".{record_name(shard)}.lock"


@contextlib.contextmanager
def writer_lock(out: str | Path, shard: tuple[int, int] | None) -> Iterator[Path]:
    """Be the only writer of this record (of this shard: other shards go on side by side)."""
    what = "cxr-runtime sample" + (f" --shard {shard[0]}/{shard[1]}" if shard else "")
    with exclusive_lock(out, what, name=lock_name(shard)) as path:
        yield path


def check_not_folder(path: Path) -> None:
    """A record or manifest path taken by a folder would fail only when the set is done."""
    if path.exists() and not path.is_file():
        raise CxrError(f"{path}: is a folder (or other non-file) where the sample set keeps its "
                       f"{'manifest' if path.name == MANIFEST else 'record'}; move it away")


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at `path` (None when there is none), its fields checked: a hand-edited or
    foreign file is refused in one line naming the field."""
    check_not_folder(path)
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CxrError(f"{path}: unreadable sample record ({e}); remove it to start this set again") from None
    if not isinstance(rec, dict):
        raise CxrError(f"{path}: not a cxr-ddpm sample record")
    _check_record(path, rec)
    return rec


def _check_record(path: Path, rec: dict[str, Any]) -> None:
    fix = "fix it, or remove it and rerun (what it listed is made again)"

    def bad(where: str, value: Any, expected: str) -> CxrError:
        got = "missing" if value is _MISSING else f"{value!r}"
        return CxrError(f"{path}: {where} is {got}, expected {expected}; {fix}")

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    n = rec.get("n", _MISSING)
    if not whole(n) or not 1 <= n <= MAX_IMAGES:
        raise bad("field 'n'", n, f"a whole number in 1..{MAX_IMAGES}")
    for key in ("seed", "request_sha256"):
        v = rec.get(key, _MISSING)
        if not (whole(v) if key == "seed" else isinstance(v, str)):
            raise bad(f"field {key!r}", v, "a whole number" if key == "seed" else "a string")
    images = rec.get("images", _MISSING)
    if not isinstance(images, list):
        raise bad("field 'images'", images, "a list")
    for k, e in enumerate(images):
        if not isinstance(e, dict):
            raise bad(f"images[{k}]", e, "an object {index, file, sha256}")
        i = e.get("index", _MISSING)
        if not whole(i) or not 0 <= i < n:
            raise bad(f"images[{k}] field 'index'", i, f"a whole number in 0..{n - 1}")
        for key in ("file", "sha256"):
            v = e.get(key, _MISSING)
            if not isinstance(v, str) or not v:
                raise bad(f"images[{k}] (index {i}) field {key!r}", v, "a string")
        size = e.get("bytes")
        if size is not None and (not whole(size) or size < 0):
            raise bad(f"images[{k}] (index {i}) field 'bytes'", size, "a whole number >= 0")


_MISSING = object()


def finished(out: Path, shard: tuple[int, int] | None, request_sha256: str) -> dict[int, dict[str, Any]]:
    """Entries of images this writer already finished for this very request (file present,
    sha256 as recorded). A record of another request in the same folder is refused."""
    return finished_in(out, shard, request_sha256, read_record(out / record_name(shard)))


def finished_in(out: Path, shard: tuple[int, int] | None, request_sha256: str,
                rec: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """`finished` for the record `rec` already read from out/record_name(shard)."""
    path = out / record_name(shard)
    if rec is None:
        return {}
    if rec.get("request_sha256") != request_sha256:
        raise CxrError(f"{path}: {out} holds samples of another request (other engine, seed or "
                       "settings); use another --out, or remove that folder to start again")
    return {int(e["index"]): e for e in rec["images"] if not _mismatch(out, e)}


def _mismatch(out: Path, entry: dict[str, Any]) -> str:
    """What is wrong with a listed image on disk ("" when it is as recorded)."""
    f = out / entry["file"]
    if not f.exists():
        return "missing"
    if not f.is_file():
        return "not a file"
    size = f.stat().st_size
    if entry.get("bytes") is not None and size != entry["bytes"]:
        return f"{size} bytes, {entry['bytes']} recorded"
    digest = file_sha256(f)
    return "" if digest == entry["sha256"] else f"sha256 {digest[:12]}..., {entry['sha256'][:12]}... recorded"


def verify_files(out: Path, listed: list[tuple[str, dict[str, Any]]]) -> None:
    """Every (record name, entry) must be on disk as recorded (existence, size, sha256);
    CxrError naming the first few that are not, before any manifest is written."""
    bad = [f"{e['file']} {why} (in {rec})" for rec, e in listed if (why := _mismatch(out, e))]
    if bad:
        more = f"; ... ({len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CxrError(f"{out}: {len(bad)} of {len(listed)} listed images are not on disk as recorded: "
                       f"{'; '.join(bad[:3])}{more}; rerun the sample command that made them "
                       "(it remakes them), then the manifest")


def write_record(out: Path, shard: tuple[int, int] | None, record: dict[str, Any]) -> Path:
    path = out / record_name(shard)
    with atomic_write(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return path


def write_manifest(out: Path, record: dict[str, Any]) -> Path:
    """OUT/manifest.csv: one row per image (index order) of a complete record."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_FIELDS)
    for e in sorted(record["images"], key=lambda e: e["index"]):
        w.writerow([e["index"], e.get("class") or "", record["seed"], e["file"], e["sha256"],
                    record["request_sha256"]])
    with atomic_write(out / MANIFEST, "w") as f:
        f.write(buf.getvalue())
    return out / MANIFEST


def merge(out: str | Path) -> dict[str, Any]:
    """Merge the shard records of OUT into OUT/samples.json + OUT/manifest.csv; returns the record.

    Refused with one line when the shards disagree on the request, when an index is
    missing (listing the ranges) or made twice, when a listed file is not on disk as recorded,
    and while any writer of the set is still at work."""
    out = Path(out)
    if not out.is_dir():
        raise CxrError(f"{out}: sample folder not found")
    with contextlib.ExitStack() as locks:
        locks.enter_context(exclusive_lock(out, "cxr-runtime manifest", name=lock_name(None)))
        # every shard with a record or a live writer (whose lock file exists from its start on)
        shards = set()
        for p in out.iterdir():
            if hit := _SHARD_RE.match(p.name) or _SHARD_LOCK_RE.match(p.name):
                shards.add((int(hit.group(1)), int(hit.group(2))))
        for shard in sorted(shards):
            locks.enter_context(exclusive_lock(out, "cxr-runtime manifest", name=lock_name(shard)))
        return _merge(out)


def _merge(out: Path) -> dict[str, Any]:
    check_not_folder(out / MANIFEST)
    shards = sorted((hit.groups(), p) for p in out.iterdir() if (hit := _SHARD_RE.match(p.name)))
    if not shards:
        rec = read_record(out / RECORD)
        if rec is None or not rec.get("complete"):
            raise CxrError(f"{out}: no finished sample records (samples.json or samples.shard-*.json)")
        verify_files(out, [(RECORD, e) for e in rec["images"]])
        write_manifest(out, rec)
        return rec
    counts = {int(m) for (_, m), _ in shards}
    if len(counts) > 1:
        raise CxrError(f"{out}: shard records of different array sizes ({', '.join(map(str, sorted(counts)))}); "
                       "remove the stale ones")
    records = [rec for _, p in shards if (rec := read_record(p)) is not None]
    if len(records) < len(shards):
        raise CxrError(f"{out}: a shard record was removed during the merge; run it again")
    hashes = {r.get("request_sha256") for r in records}
    if len(hashes) > 1:
        raise CxrError(f"{out}: shard records belong to different requests; remove the stale ones")
    first = records[0]
    n, m = first["n"], counts.pop()
    if any(r["n"] != n for r in records):
        raise CxrError(f"{out}: shard records disagree on n; remove the stale ones")
    images: dict[int, dict[str, Any]] = {}
    listed: list[tuple[str, dict[str, Any]]] = []
    for (_, p), rec in zip(shards, records):
        for e in rec["images"]:
            if e["index"] in images:
                raise CxrError(f"{out}: image {e['index']} is listed by two shards")
            images[e["index"]] = e
            listed.append((p.name, e))
    missing = [i for i in range(n) if i not in images]
    if missing:
        done_shards = sorted(int(k) for ((k, _), _), r in zip(shards, records) if r.get("complete"))
        todo = [k for k in range(m) if k not in done_shards]
        raise CxrError(f"{out}: {len(missing)} of {n} images missing (indices {_ranges(missing)}); "
                       f"shards not finished: {', '.join(map(str, todo)) or 'none'} of {m}: rerun them")
    verify_files(out, listed)
    merged = {k: v for k, v in first.items() if k not in ("shard", "indices", "seconds", "images_per_s")}
    merged.update(complete=True, shards=m, images=[images[i] for i in range(n)],
                  files=[images[i]["file"] for i in range(n)],
                  seconds=round(sum(float(r.get("seconds") or 0) for r in records), 3))
    write_record(out, None, merged)
    write_manifest(out, merged)
    return merged


def _ranges(idx: list[int], limit: int = 8) -> str:
    spans: list[str] = []
    start: int | None = idx[0]
    for a, b in zip(idx, [*idx[1:], None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(spans[:limit]) + (f", ... ({len(spans) - limit} more)" if len(spans) > limit else "")
