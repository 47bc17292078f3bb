"""Disk space held back for checkpoints, so that a journal that fills its disk can recover.

The journal is truncated only after a checkpoint, and a checkpoint needs free space: on a full
disk neither happens again. The daemon therefore keeps a preallocated file, `reserve` in the
state dir, and gives it up when a checkpoint fails; the checkpoint is written in its space and
the journal truncated, which frees the journal's pages for new samples (SQLite reuses them). The
reserve is taken again after a later checkpoint, once the disk has room for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from pathlib import Path

log = logging.getLogger("edgecl.learn")
MIN_RESERVE_BYTES = 1 << 20
# SQLite checkpoints the WAL into the database at 1000 pages (4 KiB each): a full disk may stop
# that, and the database must grow by as much for the WAL to be reused
WAL_ROOM_BYTES = 4 << 20


def reserve_size(checkpoint: Path, journal: Path) -> int:
    """Room for a checkpoint twice the size of `checkpoint` (the newest; it may grow) and for
    the WAL of `journal` (as large as it has ever been, or SQLite's usual bound), in whole MiB:
    a reserve that followed every byte would be resized at each checkpoint."""
    wal = journal.with_name(journal.name + "-wal")
    wal_bytes = max(WAL_ROOM_BYTES, wal.stat().st_size if wal.exists() else 0)
    needed = max(MIN_RESERVE_BYTES, 2 * checkpoint.stat().st_size) + wal_bytes
    return -(-needed // MIN_RESERVE_BYTES) * MIN_RESERVE_BYTES


class SpaceReserve:
    """A preallocated file at `path` (mode 0600) holding `bytes` of the disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bytes = _regular_file_size(path)  # a reserve the last run left is held still
        self.used = 0  # times it was given up for a checkpoint since start

    def hold(self, size: int) -> None:
        """Hold `size` bytes; where the disk has no room for them, keep what is held (a later
        call tries again). Never raises: the reserve only ever helps."""
        if size == self.bytes:
            return
        try:
            # an allocation that fails would fill the disk for a moment, failing journal commits
            if size > self.bytes + shutil.disk_usage(self.path.parent).free:
                return
            self._resize(size)
        except OSError as e:
            log.debug("no space reserve of %d bytes in %s (%d held): %s", size, self.path,
                      self.bytes, e)
            return
        self.bytes = size
        log.info("space reserve of %d bytes held in %s", size, self.path)

    def give_up(self) -> int:
        """Free the reserve's space for a checkpoint; returns the bytes freed."""
        freed = self.bytes
        self._remove()
        if freed:
            self.used += 1
        return freed

    def _resize(self, size: int) -> None:
        """Make the file `size` bytes, all of them allocated; where that fails, as it was."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            os.ftruncate(fd, size)  # a larger reserve from before shrinks
        except OSError:
            os.ftruncate(fd, self.bytes)  # without what a failed allocation took
            raise
        finally:
            os.close(fd)

    def _remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.bytes = 0


def _regular_file_size(path: Path) -> int:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0
