"""Atomic file writes: readers never see a half-written artifact."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
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
