"""Run `edgecl learn` (the arguments after the first two) and SIGKILL it at the `n`-th time it
reaches `point`: mid-way through writing a checkpoint, between a checkpoint and the journal's
truncation, while an export writes its files, or right after an export's rename.

    python tests/crash_at.py checkpoint-write 3 --state-dir ... (edgecl learn's options)
"""

import functools
import os
import signal
import sys

from edgecl import repository
from edgecl.cli import app
from edgecl.daemon import checkpoints, journal

POINTS = {  # point -> (object, attribute): the function whose n-th call is the kill
    "checkpoint-write": (checkpoints._HashingWriter, "write"),
    "checkpoint-truncate": (journal.Journal, "truncate"),
    "export-write": (repository, "_write_synced"),
    "export-rename": (repository, "fsync_dir"),  # after the version's rename, before the fsyncs
}


def kill_at(point: str, n: int) -> None:
    owner, name = POINTS[point]
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, counting)


if __name__ == "__main__":
    kill_at(sys.argv[1], int(sys.argv[2]))
    sys.argv = ["edgecl", "learn", *sys.argv[3:]]
    app()
