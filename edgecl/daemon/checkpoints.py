"""Checkpoints of the daemon: learner + journal offset, atomic, sha256-named, the last K kept.

A checkpoint is `ckpt-<offset>-<sha256>.pt` in the state dir's `checkpoints/`: streamed to a
temp file while its sha256 is computed (no copy of it in memory), fsync'd, renamed, the folder
fsync'd. Its name carries the sha256 of its bytes, checked before it is loaded (weights-only).
A checkpoint that fails the check or the load is renamed `*.corrupt`, logged and counted, and
the next older one is tried.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgecl.atomic import atomic_open_named
from edgecl.checkpoint import checkpoint_payload, learner_from_payload, read_checkpoint
from edgecl.learners import Learner
from edgecl.repository import sha256_of

log = logging.getLogger("edgecl.learn")
NAME = re.compile(r"ckpt-(?P<offset>\d{12})-(?P<sha256>[0-9a-f]{64})\.pt")


class _HashingWriter:
    """A file-like object for torch.save that hashes what it writes."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


@dataclass(frozen=True)
class Restored:
    learner: Learner
    meta: dict[str, Any]
    path: Path


class CheckpointStore:
    def __init__(self, folder: Path, keep: int) -> None:
        self.folder = folder
        self.keep = keep
        self.corrupt = 0  # checkpoints refused since start
        folder.mkdir(parents=True, exist_ok=True)
        for partial in folder.glob(".unnamed.*.tmp"):  # a write that a crash cut short
            log.warning("removing %s: a checkpoint write that did not finish", partial.name)
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()

    def paths(self) -> list[Path]:
        """Valid-looking checkpoint names, oldest first (by offset, then time written)."""
        found = [p for p in self.folder.iterdir() if NAME.fullmatch(p.name)]
        return sorted(found, key=lambda p: (int(NAME.fullmatch(p.name)["offset"]),
                                            p.stat().st_mtime_ns))

    def save(self, learner: Learner, meta: dict[str, Any], offset: int,
             keep: int | None = None) -> Path:
        """Write a checkpoint at journal `offset`; keep only the newest `keep` (the store's
        unless given)."""
        hashing: _HashingWriter | None = None

        def name() -> str:
            assert hashing is not None
            return f"ckpt-{offset:012d}-{hashing.sha256.hexdigest()}.pt"

        with atomic_open_named(self.folder, name) as f:
            hashing = _HashingWriter(f)
            try:
                torch.save(checkpoint_payload(learner, {**meta, "offset": offset}), hashing)
            except RuntimeError as e:  # torch's zip writer turns a failed write (ENOSPC) into this
                raise OSError(f"checkpoint write failed: {e}") from e
        path = self.folder / name()
        for old in self.paths()[:-(keep or self.keep)]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        return path

    def oldest_offset(self) -> int:
        """The journal offset of the oldest kept checkpoint: records up to it can go."""
        paths = self.paths()
        return int(NAME.fullmatch(paths[0].name)["offset"]) if paths else 0

    def restore(self, device: str) -> Restored | None:
        """The newest checkpoint that passes its sha256 and loads, or None."""
        for path in reversed(self.paths()):
            try:
                data = path.read_bytes()
                expected = NAME.fullmatch(path.name)["sha256"]
                if sha256_of(data) != expected:
                    raise ValueError(f"{path}: sha256 {sha256_of(data)[:12]}... does not match "
                                     f"its name's {expected[:12]}...")
                payload = read_checkpoint(path, data)
                learner = learner_from_payload(path, payload, device)
                return Restored(learner, payload["meta"], path)
            except (OSError, ValueError, KeyError) as e:
                self.corrupt += 1
                log.error("checkpoint refused, trying an older one: %s", e)
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".corrupt"))
        return None
