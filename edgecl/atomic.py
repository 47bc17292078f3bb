"""Crash-safe file replacement: write a temp file beside the target, fsync, rename, fsync dir.

Temp files and folders are created with the modes of any new file (0o666) or folder (0o777)
and the process umask, so what is renamed into place is as readable as a plainly written file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A fresh hidden name in `parent`: its 64 random bits keep concurrent writers apart."""
    return parent / f"{prefix}{secrets.token_hex(8)}{suffix}"


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file that replaces `path` only if the block finishes without error."""
    path = Path(path)
    with _replacing(path.parent, f".{path.name}.", lambda: path, mode) as f:
        yield f


@contextlib.contextmanager
def atomic_open_named(folder: Path, name: Callable[[], str], mode: str = "wb") -> Iterator[IO]:
    """As `atomic_open`, for a file whose name `name()` says once it is written (e.g. its
    hash): the file goes to `folder / name()`."""
    with _replacing(folder, ".unnamed.", lambda: folder / name(), mode) as f:
        yield f


@contextlib.contextmanager
def _replacing(parent: Path, prefix: str, target: Callable[[], Path], mode: str
               ) -> Iterator[IO]:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(parent, prefix, ".tmp")
    # O_EXCL: never someone else's file; 0o666 less the umask, like any new file (not mkstemp's
    # 0o600, which would leave result.json or checkpoint.pt readable by their owner only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)
