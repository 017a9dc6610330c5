"""Writing a request's images to a folder: resumable, shardable, and listed as they land.

    rec = sample_to_dir(den, req, out="samples/", batch_size=8, fmt="png")
    rec = sample_to_dir(den, req, out="synth/", shard=(3, 8))     # indices [3n/8, 4n/8) only

Images are written atomically one by one; the writer's record (runtime/shards.py) is
rewritten after every batch and on any failure, so every image that was completely
written is kept and listed, and a rerun of the same request makes only what is missing.
Class-conditional requests put image i in out/<class name>/ and draw a grid row per class.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import __version__
from .errors import CxrError
from .fsutil import ensure_writable_dir, file_sha256
from .outputs import FORMATS, SUFFIX, DicomSeries, grid_png, write_image
from .sampling import Request, iter_batches, request_settings, request_sha256
from .shards import finished, read_record, record_name, shard_range, write_manifest, write_record

StepFn = Callable[[int], None]


def parse_time(text: str, flag: str = "--request-time") -> _dt.datetime:
    """ISO 8601 (e.g. 2026-11-26T17:00:00Z) -> aware UTC datetime, whole seconds."""
    try:
        when = _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise CxrError(f"{flag} {text!r}: expected an ISO 8601 time such as 2026-11-26T17:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).replace(microsecond=0)


def instance_numbers(labels: tuple[int, ...] | None, n: int) -> list[int]:
    """1-based InstanceNumber of each image within its series (one series per class)."""
    if labels is None:
        return list(range(1, n + 1))
    seen: dict[int, int] = {}
    out = []
    for k in labels:
        seen[k] = seen.get(k, 0) + 1
        out.append(seen[k])
    return out


@dataclass(frozen=True)
class SetPlan:
    """A sample set before any image is made: its request hash, creation time, the images this
    writer already finished (from its record) and the indices still to make."""
    settings: dict[str, Any]
    sha256: str
    when: _dt.datetime
    done: dict[int, dict[str, Any]]
    todo: list[int]


def plan_set(denoiser: Any, req: Request, *, out: str | Path, fmt: str = "png",
             shard: tuple[int, int] | None = None, request_time: _dt.datetime | None = None,
             xp: Any = np) -> SetPlan:
    """Check the request against what `out` already holds; nothing is written."""
    if fmt not in FORMATS:
        raise CxrError(f"--format {fmt!r} is unknown (valid: {', '.join(FORMATS)})")
    settings = request_settings(denoiser, req, fmt, xp)
    sha = request_sha256(settings)
    out = Path(out)
    done = finished(out, shard, sha) if out.is_dir() else {}
    when = _request_time(out, shard, request_time)
    return SetPlan(settings, sha, when, done, [i for i in shard_range(req.n, shard) if i not in done])


def sample_to_dir(denoiser: Any, req: Request, *, out: str | Path, batch_size: int = 8, fmt: str = "png",
                  grid: str | Path | None = None, shard: tuple[int, int] | None = None,
                  request_time: _dt.datetime | None = None, on_step: StepFn | None = None,
                  xp: Any = np, plan: SetPlan | None = None) -> dict[str, Any]:
    """Write the request's images (or the shard's share) under `out`; returns the record.
    plan: what plan_set returned for these arguments (the CLI plans first, for its checks)."""
    plan = plan or plan_set(denoiser, req, out=out, fmt=fmt, shard=shard, request_time=request_time, xp=xp)
    out = ensure_writable_dir(Path(out))
    if grid is not None:
        ensure_writable_dir(Path(grid).parent, "grid folder")
    settings, sha, when, done, todo = plan.settings, plan.sha256, plan.when, plan.done, plan.todo
    names = list(denoiser.meta.get("class_names") or [])
    folders = {k: ensure_writable_dir(out / names[k]) for k in sorted(set(req.labels))} if req.labels else {}
    series = ({k: DicomSeries(sha, when, names[k], k + 1) for k in folders} if req.labels
              else {-1: DicomSeries(sha, when)})
    instance = instance_numbers(req.labels, req.n)
    width = max(5, len(str(req.n - 1)))
    mine = shard_range(req.n, shard)
    record: dict[str, Any] = {
        **settings, "engine": str(denoiser.path), "checkpoint": getattr(denoiser, "checkpoint", None),
        "cuda_graph": getattr(denoiser, "cuda_graph", None),
        "request_sha256": sha, "request_time": when.isoformat().replace("+00:00", "Z"),
        "batch_size": batch_size, "shard": list(shard) if shard else None, "indices": [mine.start, mine.stop],
        "complete": False, "package_version": __version__, "grid": str(grid) if grid else None,
        "images": [], "files": [], "seconds": None, "images_per_s": None}
    images = dict(done)
    rows: dict[int, list[np.ndarray]] = {}                            # grid row (class) -> images
    t0 = time.perf_counter()

    saved = set(done)                                                 # indices of the last record on disk

    def save(complete: bool) -> None:
        entries = [images[i] for i in sorted(images)]
        seconds = time.perf_counter() - t0
        record.update(images=entries, files=[e["file"] for e in entries], complete=complete,
                      seconds=round(seconds, 3),
                      images_per_s=round((len(images) - len(done)) / seconds, 3) if seconds > 0 else None)
        write_record(out, shard, record)
        saved.clear()
        saved.update(images)

    def keep_listed() -> None:
        """After a failure: list every complete image; if even the small record cannot be written
        (a full disk), remove the images it does not list, so that listed == on disk."""
        try:
            save(False)
        except OSError:
            for i in set(images) - saved:
                (out / images.pop(i)["file"]).unlink(missing_ok=True)

    path = out
    try:
        for idx, batch in iter_batches(denoiser, req, batch_size=batch_size, indices=todo, on_step=on_step, xp=xp):
            for i, x in zip(idx, batch):
                row = req.labels[i] if req.labels else -1
                path = folders.get(row, out) / f"sample_{i:0{width}d}{SUFFIX[fmt]}"
                write_image(path, x, fmt, meta=denoiser.meta, index=i, seed=req.seed, series=series[row],
                            instance=instance[i])
                images[i] = {"index": i, "class": names[row] if row >= 0 else None,
                             "file": str(path.relative_to(out)), "sha256": file_sha256(path)}
                if grid is not None and len(rows.setdefault(row, [])) < (8 if req.labels else 64):
                    rows[row].append(x)
            save(complete=False)
    except OSError as e:
        keep_listed()
        raise CxrError(f"{path}: cannot write ({e.strerror or e}); {len(images)} complete images are kept and "
                       f"listed in {out / record_name(shard)}; rerun the same command to make the rest") from None
    except CxrError as e:
        keep_listed()
        raise CxrError(f"{e}; {len(images)} complete images are kept and listed in "
                       f"{out / record_name(shard)}") from None
    record["cuda_graph"] = getattr(denoiser, "cuda_graph", None)       # after any fallback
    if grid is not None and rows:
        _write_grid(Path(grid), rows, by_class=bool(req.labels))
    save(complete=True)
    if shard is None:
        write_manifest(out, record)
    return record


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """While sampling: user warnings were shown once when the request was resolved, so repeats
    are silenced; a GPU fallback (a failed CUDA graph capture, mid-run) still reaches the user."""
    from .backends.ort_cuda import GpuFallbackWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", GpuFallbackWarning)
        yield


def _request_time(out: Path, shard: tuple[int, int] | None, given: _dt.datetime | None) -> _dt.datetime:
    """The given time, else the one this set was started with (a resumed set keeps its DICOM
    dates), else now. A given time that contradicts the recorded one is refused."""
    rec = (read_record(out / record_name(shard)) if out.is_dir() else None) or {}
    recorded = parse_time(rec["request_time"]) if rec.get("request_time") else None
    if given is not None and recorded is not None and given != recorded:
        raise CxrError(f"--request-time {given.isoformat()}: {out} was started with {rec['request_time']}; "
                       "pass that time (or none) to continue it")
    return given or recorded or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def _write_grid(path: Path, rows: dict[int, list[np.ndarray]], *, by_class: bool) -> None:
    if by_class:                                                      # a row of <= 8 per class
        picked = [rows[r] for r in sorted(rows)][:16]
        cols = max(map(len, picked))
        grid_png(path, [r[j] if j < len(r) else None for r in picked for j in range(cols)], cols=cols)
    else:                                                             # square, at most 8 x 8
        grid_png(path, rows[-1])
