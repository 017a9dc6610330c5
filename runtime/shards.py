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
one request, then writes OUT/samples.json for the whole set and OUT/manifest.csv.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from .errors import CxrError
from .fsutil import atomic_write, file_sha256

RECORD = "samples.json"
MANIFEST = "manifest.csv"
_SHARD_RE = re.compile(r"^samples\.shard-(\d{5})-of-(\d{5})\.json$")
MANIFEST_FIELDS = ("index", "class", "seed", "file", "sha256", "request_sha256")


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


def read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CxrError(f"{path}: unreadable sample record ({e}); remove it to start this set again") from None
    if not isinstance(rec, dict):
        raise CxrError(f"{path}: not a cxr-ddpm sample record")
    return rec


def finished(out: Path, shard: tuple[int, int] | None, request_sha256: str) -> dict[int, dict[str, Any]]:
    """Entries of images this writer already finished for this very request (file present,
    sha256 as recorded). A record of another request in the same folder is refused."""
    path = out / record_name(shard)
    rec = read_record(path)
    if rec is None:
        return {}
    if rec.get("request_sha256") != request_sha256:
        raise CxrError(f"{path}: {out} holds samples of another request (other engine, seed or "
                       "settings); use another --out, or remove that folder to start again")
    done = {}
    for entry in rec.get("images", []):
        f = out / entry["file"]
        if f.is_file() and file_sha256(f) == entry["sha256"]:
            done[int(entry["index"])] = entry
    return done


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
    missing (listing the ranges) or made twice."""
    out = Path(out)
    if not out.is_dir():
        raise CxrError(f"{out}: sample folder not found")
    shards = sorted((m.groups(), p) for p in out.iterdir() if (m := _SHARD_RE.match(p.name)))
    if not shards:
        rec = read_record(out / RECORD)
        if rec is None or not rec.get("complete"):
            raise CxrError(f"{out}: no finished sample records (samples.json or samples.shard-*.json)")
        write_manifest(out, rec)
        return rec
    counts = {int(m) for (_, m), _ in shards}
    if len(counts) > 1:
        raise CxrError(f"{out}: shard records of different array sizes ({', '.join(map(str, sorted(counts)))}); "
                       "remove the stale ones")
    records = [read_record(p) or {} for _, p in shards]
    hashes = {r.get("request_sha256") for r in records}
    if len(hashes) > 1:
        raise CxrError(f"{out}: shard records belong to different requests; remove the stale ones")
    first = records[0]
    n, m = int(first["n"]), counts.pop()
    images: dict[int, dict[str, Any]] = {}
    for rec in records:
        for e in rec.get("images", []):
            if e["index"] in images:
                raise CxrError(f"{out}: image {e['index']} is listed by two shards")
            images[e["index"]] = e
    missing = [i for i in range(n) if i not in images]
    if missing:
        done_shards = sorted(int(k) for ((k, _), _), r in zip(shards, records) if r.get("complete"))
        todo = [k for k in range(m) if k not in done_shards]
        raise CxrError(f"{out}: {len(missing)} of {n} images missing (indices {_ranges(missing)}); "
                       f"shards not finished: {', '.join(map(str, todo)) or 'none'} of {m}: rerun them")
    merged = {k: v for k, v in first.items() if k not in ("shard", "indices", "seconds", "images_per_s")}
    merged.update(complete=True, shards=m, images=[images[i] for i in range(n)],
                  files=[images[i]["file"] for i in range(n)],
                  seconds=round(sum(float(r.get("seconds") or 0) for r in records), 3))
    write_record(out, None, merged)
    write_manifest(out, merged)
    return merged


def _ranges(idx: list[int], limit: int = 8) -> str:
    spans, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(spans[:limit]) + (f", ... ({len(spans) - limit} more)" if len(spans) > limit else "")
