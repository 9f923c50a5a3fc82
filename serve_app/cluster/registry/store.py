"""Durable manifest file: an update is acknowledged only once it is on disk."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def save(path: Path, data: bytes) -> None:
    """Write atomically: temp file in the same directory, fsync, rename, fsync the directory.

    A reader (or a restarted actor) sees the old file or the new one, never a torn one. The file
    holds the models config, which may carry api tokens, so it is private to its owner.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
