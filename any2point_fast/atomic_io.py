"""Atomic file writes: a reader sees the old file or the new one, never a partly written one.

Used by the adapter-only checkpoints (:mod:`.checkpoint`) and the training checkpoints
(:mod:`.train_state`). A writer killed at any point (even by SIGKILL) leaves at most a hidden
``.<name>.*.tmp`` file beside the destination, which stays as it was.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file atomically: ``write(f)`` into a temporary file next to ``path``, fsync, ``os.replace``.

    The file gets the permissions of a newly created one (``0o666`` less the umask). If ``write``
    raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """:func:`atomic_write` of the bytes ``data``."""
    atomic_write(path, lambda handle: handle.write(data))


__all__ = ["atomic_write", "atomic_write_bytes", "fsync_dir"]
