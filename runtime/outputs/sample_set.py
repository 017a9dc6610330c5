"""Writing a request's images to a folder: resumable, shardable, and listed as they land.

    rec = sample_to_dir(den, req, out="samples/", batch_size=8, fmt="png")
    rec = sample_to_dir(den, req, out="synth/", shard=(3, 8))     # indices [3n/8, 4n/8) only

Images are written atomically one by one; the writer's record (runtime/outputs/shards.py) is
rewritten after every batch and on any failure, so every image that was completely
written is kept and listed, and a rerun of the same request makes only what is missing.
Class-conditional requests put image i in out/<class name>/ and draw a grid row per class.
One writer per record (shards.writer_lock): a second process aimed at the same set (or shard)
is refused in one line naming the first one's pid and host.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import __version__
from ..backends.denoiser import Denoiser
from ..errors import CxrError
from ..fsutil import ensure_writable_dir, holds_lock
from .formats import FORMATS, SUFFIX, DicomSeries, grid_png, write_image
from ..sampling.generate import Request, StepFn, iter_batches, request_settings, request_sha256
from .shards import (MANIFEST, RECORD, check_not_folder, finished_in, lock_name, read_record, record_name,
                     shard_range, write_manifest, write_record, writer_lock)
from ..sampling.timesteps import LEGACY_GRID


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
    """A sample set before any image is made, validated once (plan_set); the writer takes it
    whole: what is made, where and how it is written, its hash and creation time, the images
    this writer already finished (from its record) and the indices still to make."""
    req: Request                      # what is made: the request, on an earlier set's time grid
    out: Path
    fmt: str
    batch_size: int
    shard: tuple[int, int] | None
    grid: Path | None
    xp: Any                           # the sampler math's array module (recorded as "arrays")
    settings: dict[str, Any]
    sha256: str
    when: _dt.datetime
    done: dict[int, dict[str, Any]]
    todo: list[int]

    @property
    def record_path(self) -> Path:
        return self.out / record_name(self.shard)


def check_outputs(out: str | Path, shard: tuple[int, int] | None = None, grid: str | Path | None = None) -> None:
    """Refuse up front what would otherwise fail only after every image was made (leaving the
    set incomplete): a folder where the record, manifest or grid goes. Before writer_lock,
    which creates `out`: a refused set leaves nothing behind."""
    out = Path(out)
    check_not_folder(out / record_name(shard))
    if shard is None:
        check_not_folder(out / MANIFEST)
    if grid is not None and Path(grid).is_dir():
        raise CxrError(f"--grid {grid}: is a folder; give the grid's file name (e.g. {Path(grid) / 'grid.png'})")


def plan_set(denoiser: Denoiser, req: Request, *, out: str | Path, batch_size: int = 8, fmt: str = "png",
             shard: tuple[int, int] | None = None, request_time: _dt.datetime | None = None,
             xp: Any = np, grid: str | Path | None = None) -> SetPlan:
    """Check the request against what `out` already holds; nothing is written. Plan while
    holding writer_lock(out, shard), or another writer may change the set under the plan;
    check_outputs(out, shard, grid) before taking that lock."""
    if fmt not in FORMATS:
        raise CxrError(f"--format {fmt!r} is unknown (valid: {', '.join(FORMATS)})")
    if batch_size <= 0:
        raise CxrError(f"--batch-size {batch_size}: must be >= 1")
    out = Path(out)
    req = earlier_grid(denoiser, req, out, fmt, xp)
    settings = request_settings(denoiser, req, fmt, xp)
    sha = request_sha256(settings)
    rec = read_record(out / record_name(shard)) if out.is_dir() else None      # read once, used twice
    done = finished_in(out, shard, sha, rec)
    when = _request_time(out / record_name(shard), rec, request_time)
    return SetPlan(req, out, fmt, batch_size, shard, Path(grid) if grid is not None else None, xp, settings,
                   sha, when, done, [i for i in shard_range(req.n, shard) if i not in done])


def earlier_grid(denoiser: Denoiser, req: Request, out: Path, fmt: str, xp: Any = np) -> Request:
    """`req` on the grid a dpmpp-2m set in `out` was begun with: 0.2.0 ran time-quadratic only and
    its records name no grid, so a set it began (any shard's record) is finished on that grid,
    and a rerun or another shard makes the same images as the first run; `req` otherwise."""
    if req.sampler != "dpmpp-2m" or req.time_grid == LEGACY_GRID or not out.is_dir():
        return req
    old = replace(req, time_grid=LEGACY_GRID)
    sha = request_sha256(request_settings(denoiser, old, fmt, xp))
    for path in [out / RECORD, *sorted(out.glob("samples.shard-*-of-*.json"))]:
        try:
            rec = read_record(path)
        except CxrError:
            continue                             # refused later, naming the file, if it is this writer's
        if rec is not None and rec["request_sha256"] == sha:
            return old
    return req


def sample_to_dir(denoiser: Denoiser, req: Request, *, out: str | Path, batch_size: int = 8, fmt: str = "png",
                  grid: str | Path | None = None, shard: tuple[int, int] | None = None,
                  request_time: _dt.datetime | None = None, on_step: StepFn | None = None,
                  xp: Any = np) -> dict[str, Any]:
    """Write the request's images (or the shard's share) under `out`; returns the record.
    Checks the outputs, locks (writer_lock(out, shard), unless this process holds it), plans, writes."""
    check_outputs(out, shard, grid)
    with contextlib.nullcontext() if holds_lock(out, lock_name(shard)) else writer_lock(out, shard):
        plan = plan_set(denoiser, req, out=out, batch_size=batch_size, fmt=fmt, shard=shard,
                        request_time=request_time, xp=xp, grid=grid)
        return SetWriter(denoiser, plan).write(on_step)


class SetWriter:
    """One planned set being written: the record grows image by image and is saved after
    every batch and on any failure, so that what it lists is exactly what is on disk.
    Made (its folders created) before any image, so a folder problem stops it up front;
    write it while holding writer_lock(plan.out, plan.shard)."""

    def __init__(self, denoiser: Denoiser, plan: SetPlan) -> None:
        req, out = plan.req, ensure_writable_dir(plan.out)
        if plan.grid is not None:
            ensure_writable_dir(plan.grid.parent, "grid folder")
        self.denoiser, self.plan, self.out = denoiser, plan, out
        self.names = list(denoiser.artifact.class_names)
        self.folders = ({k: ensure_writable_dir(out / self.names[k]) for k in sorted(set(req.labels))}
                        if req.labels else {})
        self.series = ({k: DicomSeries(plan.sha256, plan.when, self.names[k], k + 1) for k in self.folders}
                       if req.labels else {-1: DicomSeries(plan.sha256, plan.when)})
        self.instance = instance_numbers(req.labels, req.n)
        self.width = max(5, len(str(req.n - 1)))
        mine = shard_range(req.n, plan.shard)
        self.record: dict[str, Any] = {
            **plan.settings, "engine": str(denoiser.path), "checkpoint": denoiser.checkpoint,
            "cuda_graph": denoiser.cuda_graph, "tf32": denoiser.tf32,    # tf32 is hashed on GPUs only
            "request_sha256": plan.sha256, "request_time": plan.when.isoformat().replace("+00:00", "Z"),
            "batch_size": plan.batch_size, "shard": list(plan.shard) if plan.shard else None,
            "indices": [mine.start, mine.stop], "complete": False, "package_version": __version__,
            "grid": None, "images": [], "files": [], "seconds": None, "images_per_s": None}
        self.images = dict(plan.done)                                 # index -> entry, as listed
        self.saved = set(plan.done)                                   # indices of the last record on disk
        self.rows: dict[int, list[np.ndarray]] = {}                   # grid row (class) -> images
        self.t0 = time.perf_counter()

    def write(self, on_step: StepFn | None = None) -> dict[str, Any]:
        """Make plan.todo batch by batch; then the manifest (whole sets) and the grid. The record."""
        plan, record_path = self.plan, self.plan.record_path
        path = self.out                                               # the file being written, for errors
        self.t0 = time.perf_counter()
        try:
            for idx, batch in iter_batches(self.denoiser, plan.req, batch_size=plan.batch_size, indices=plan.todo,
                                           on_step=on_step, xp=plan.xp):
                for i, x in zip(idx, batch):
                    path = self._add(i, x)
                path = record_path
                self._save(complete=False)
            self.record["cuda_graph"] = self.denoiser.cuda_graph     # after any fallback
            path = record_path
            self._save(complete=True)          # the set is complete before its extras are tried
        except OSError as e:
            kept = self._keep_listed()
            raise CxrError(f"{path}: cannot write ({e.strerror or e}); {kept}; rerun the same command to make "
                           "the rest") from None
        except CxrError as e:
            raise CxrError(f"{e}; {self._keep_listed()}") from None
        self._extras()
        return self.record

    def _add(self, i: int, x: np.ndarray) -> Path:
        req = self.plan.req
        row = req.labels[i] if req.labels else -1
        path = self.folders.get(row, self.out) / f"sample_{i:0{self.width}d}{SUFFIX[self.plan.fmt]}"
        written = write_image(path, x, self.plan.fmt, meta=self.denoiser.meta, index=i, seed=req.seed,
                              series=self.series[row], instance=self.instance[i])
        self.images[i] = {"index": i, "class": self.names[row] if row >= 0 else None,
                          "file": str(path.relative_to(self.out)), "sha256": written.sha256,
                          "bytes": written.size}
        if self.plan.grid is not None and len(self.rows.setdefault(row, [])) < (8 if req.labels else 64):
            self.rows[row].append(x)
        return path

    def _save(self, complete: bool) -> None:
        entries = [self.images[i] for i in sorted(self.images)]
        seconds = time.perf_counter() - self.t0
        made = len(self.images) - len(self.plan.done)
        self.record.update(images=entries, files=[e["file"] for e in entries], complete=complete,
                           seconds=round(seconds, 3), images_per_s=round(made / seconds, 3) if seconds > 0 else None)
        write_record(self.out, self.plan.shard, self.record)
        self.saved = set(self.images)

    def _keep_listed(self) -> str:
        """After a failure: list every complete image; if even the small record cannot be written
        (a full disk), remove the images it does not list, so that listed == on disk. Says which."""
        where = self.plan.record_path
        try:
            self._save(False)
        except OSError:
            for i in set(self.images) - self.saved:
                (self.out / self.images.pop(i)["file"]).unlink(missing_ok=True)
            return (f"{len(self.images)} complete images are kept and listed in {where} (it could not be "
                    "rewritten, so the images made since were removed)")
        return f"{len(self.images)} complete images are kept and listed in {where}"

    def _extras(self) -> None:
        """The manifest (whole sets) and the grid, once the set itself is complete."""
        plan, out, grid = self.plan, self.out, self.plan.grid
        done_line = f"the set itself is complete ({plan.record_path})"
        if plan.shard is None:
            try:
                write_manifest(out, self.record)
            except OSError as e:
                raise CxrError(f"{out / MANIFEST}: cannot write ({e.strerror or e}); {done_line}: "
                               f"`cxr-runtime manifest {out}` writes it") from None
        if grid is not None and self.rows:   # none when nothing was made now: then none is claimed
            try:
                _write_grid(grid, self.rows, by_class=bool(plan.req.labels))
                self.record["grid"] = str(grid)
                write_record(out, plan.shard, self.record)
            except OSError as e:
                raise CxrError(f"--grid {grid}: cannot write ({e.strerror or e}); {done_line}") from None


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """While sampling: user warnings were shown once when the request was resolved, so repeats
    are silenced; a GPU fallback (a failed CUDA graph capture, mid-run) still reaches the user."""
    from ..backends.ort_cuda import GpuFallbackWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", GpuFallbackWarning)
        yield


def _request_time(path: Path, rec: dict[str, Any] | None, given: _dt.datetime | None) -> _dt.datetime:
    """The given time, else the one this set was started with (its record `rec` at `path`: a
    resumed set keeps its DICOM dates), else now. A given time that contradicts it is refused."""
    rec = rec or {}
    recorded = parse_time(rec["request_time"], f"{path}: field 'request_time'") if rec.get("request_time") else None
    if given is not None and recorded is not None and given != recorded:
        raise CxrError(f"--request-time {given.isoformat()}: {path.parent} was started with {rec['request_time']}; "
                       "pass that time (or none) to continue it")
    return given or recorded or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def _write_grid(path: Path, rows: dict[int, list[np.ndarray]], *, by_class: bool) -> None:
    if by_class:                                                      # a row of <= 8 per class
        picked = [rows[r] for r in sorted(rows)][:16]
        cols = max(map(len, picked))
        grid_png(path, [r[j] if j < len(r) else None for r in picked for j in range(cols)], cols=cols)
    else:                                                             # square, at most 8 x 8
        grid_png(path, rows[-1])
