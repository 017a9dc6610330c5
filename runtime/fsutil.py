"""Atomic file writes (readers never see a half-written artifact) and exclusive folder locks."""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

from .errors import CxrError


def ensure_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create `path` if needed and check we can write there; CxrError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CxrError(f"{path}: cannot create {what}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CxrError(f"{path}: {what} is not writable")
    return path


def _publish(tmp: str, path: Path) -> None:
    """fsync, give the file normal permissions (mkstemp makes it 0600), rename over `path`."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # artifacts on a shared cluster must be readable by the group
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write to a temp file beside `path`, fsync, then rename over it.

    If the body raises, the temp file is removed and `path` is left untouched.
    """
    path = Path(path)
    ensure_writable_dir(path.parent or Path("."), "output folder")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Like atomic_write, for writers that want a path (safetensors, onnx.save): yields a temp path."""
    path = Path(path)
    ensure_writable_dir(path.parent or Path("."), "output folder")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_file(path: str | Path, flag: str = "--out", example: str = "out") -> Path:
    """An output file's path, checked before the work that makes it: not an existing folder
    (the final rename would fail after all the work) and in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise CxrError(f"{flag} {path}: is a folder; give the file to write, e.g. {flag} {path / example}")
    ensure_writable_dir(path.parent or Path("."))
    return path


def check_output_dir(path: str | Path, what: str, flag: str = "--out") -> Path:
    """An output folder's path, checked before the work that fills it but not made yet (a failed
    run leaves no empty folder): not a file, and its nearest existing parent is writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CxrError(f"{flag} {path}: is a file, not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise CxrError(f"{flag} {path}: cannot create the {what} ({probe} is not a writable folder)")
    return path


def remove_dead_temps(path: str | Path) -> None:
    """Remove the temp files/folders (.NAME.XXXXXXXX.tmp) that atomic_write, atomic_path or a
    mkdtemp of the same naming left beside `path` when their writer was killed (kill -9 runs no
    cleanup). `path`'s name may be a glob ("step_*.safetensors"). Only while holding a lock that
    every writer of `path` takes: otherwise one of them may be a live writer's temp file."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (artifacts can be GBs)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise CxrError(f"{path}: cannot read: {e.strerror}") from None
    return h.hexdigest()


_HELD: set[str] = set()                 # lock files this process holds now


def holds_lock(folder: str | Path, name: str = ".lock") -> bool:
    """Whether this process holds exclusive_lock(folder, ..., name) now."""
    return os.path.abspath(Path(folder) / name) in _HELD


def _holder(f: IO[str]) -> tuple[str | None, str]:
    """(the holder's own description, "pid P on HOST (started T)") from its lock file."""
    # The holder writes its line right after it gets the lock; a refused opener can look in
    # between. Retry a moment so the message names it (a message detail, never a correctness one).
    for _ in range(50):
        f.seek(0)
        parts = f.read(1000).split(maxsplit=3)
        if len(parts) == 4:
            return parts[3].strip(), f"pid {parts[0]} on {parts[1]} (started {parts[2]})"
        time.sleep(0.01)
    return None, "pid ? on ? (it has not recorded itself yet)"


@contextlib.contextmanager
def exclusive_lock(folder: str | Path, what: str, name: str = ".lock") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (file `folder/name`) for the body; CxrError if another
    process holds it: "<folder>: in use by <what> pid P on HOST (started T); wait for it or use
    another folder", where <what> is the holder's own `what` (e.g. "cxr-runtime sample").

    The lock is flock(2) LOCK_EX|LOCK_NB on an open file: the kernel drops it when the holder's
    file is closed, so a writer that dies (kill -9, OOM, node reboot) never blocks the next one;
    there is no stale-lock cleanup. The file records "pid host started-at what" and is removed on
    release (a killed holder leaves it behind, harmlessly: the next holder takes it over); a
    contender that opened the file just before it was removed sees, after locking, that the path
    names another file (or none) and starts over, so two holders never coexist. `name` lets one
    folder hold several independent locks (one per shard of a sample set). Not re-entrant: a
    second exclusive_lock of the same file in the same process is refused like any other.

    Scope: processes of one machine on a local file system. On NFS (where Slurm run folders
    live), since Linux 2.6.12 the client emulates flock() as a POSIX (fcntl(2)) byte-range lock on
    the whole file, which goes to the server (NLM for NFSv2/v3, NFSv4's own locking), so the lock
    excludes processes on every client -- provided the server supports locking. A crashed
    client's lock is freed by the server's recovery (NFSv4 lease expiry, NLM/statd), not at once.
    On a mount with `nolock` (NFSv2/v3) or `local_lock=flock|all`, locks are local to the client:
    writers on one node are still kept apart, but two nodes can both "hold" the lock.
    A child made by fork() without exec shares the open file and keeps the lock alive; the fd is
    close-on-exec, so subprocesses do not.
    """
    folder = ensure_writable_dir(folder, "folder")
    path = folder / name
    for _ in range(100):
        try:
            # No O_TRUNC: a refused opener must still read the holder's line. On NFS an
            # exclusive lock needs the file open for writing (flock(2)), hence O_RDWR.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise CxrError(f"{path}: cannot open lock file: {e.strerror}") from None
        f = os.fdopen(fd, "r+")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, who = _holder(f)
            f.close()
            raise CxrError(f"{folder}: in use by {holder or what} {who}; "
                           "wait for it or use another folder") from None
        except OSError as e:        # ENOLCK: e.g. an NFS server without a lock manager
            f.close()
            raise CxrError(f"{path}: cannot lock: {e.strerror}") from None
        with contextlib.suppress(FileNotFoundError):
            st, mine = os.stat(path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                break
        f.close()                   # the holder removed it as we opened it: lock the new one
    else:
        raise CxrError(f"{path}: lock file keeps being replaced; is another program removing it?")
    key = os.path.abspath(path)
    try:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        f.truncate(0)
        f.write(f"{os.getpid()} {socket.gethostname()} {started} {what}\n")
        f.flush()
        _HELD.add(key)
        yield path
    finally:
        _HELD.discard(key)
        with contextlib.suppress(OSError):
            os.unlink(path)         # still locked here: a contender that opened it starts over
        f.close()
