"""What `edgecl serve` serves follows what the learner knows.

After every consolidation the daemon offers each task's model (the learner's `task_module`) to
the `Publisher`, named by a digest of its weights; every task whose model differs from the one
last queued or served is exported again: with a shared head or trunk one consolidation changes
every task. A thread exports, verifies and publishes; a task offered again before its export
starts is exported once, at its newest state, so the queue never holds more than one export per
task and learning never waits for it. At start the digests in the repository's newest manifests
say what is served, so a restarted daemon exports only what changed.

A served model is therefore the learner as of the newest consolidation (of any task) that
changed it; `status()` names the tasks whose served model is behind that, queued or failed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgecl import repository
from edgecl.learners import LearnerSpec
from edgecl.setup import SampleSchema

log = logging.getLogger("edgecl.learn")


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state: every tensor's name, type, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{list(tensor.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class Served:
    """A task's newest published model."""

    version: int
    digest: str  # `weights_digest` of the module it was exported from
    offset: int | None  # the learner's journal offset then (None: published by an earlier run)


@dataclass(frozen=True, eq=False)
class ExportJob:
    task: str
    module: torch.nn.Module  # a copy: the learner goes on training
    real: torch.Tensor  # held-out inputs to verify on (may be empty)
    input_range: tuple[float, float] | None  # of every input the learner took for the task
    digest: str
    offset: int


class Publisher:
    """Exports the tasks offered to it into `repo`, one at a time, newest state first come."""

    def __init__(self, repo: Path, spec: LearnerSpec, schema: SampleSchema, source: str
                 ) -> None:
        self.repo = repo
        self.spec = spec
        self.schema = schema
        self.source = source  # what the manifests name as their origin
        self.served = self._served_in_repo()
        self.wanted: dict[str, str] = {t: s.digest for t, s in self.served.items()}
        self.failed = 0
        self.last_error: str | None = None
        self._pending: dict[str, ExportJob] = {}  # task -> its newest job, in offer order
        self._exporting: str | None = None
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="edgecl-publish", daemon=True)
        self._thread.start()

    def _served_in_repo(self) -> dict[str, Served]:
        served = {}
        for task in repository.tasks(self.repo):
            found = repository.versions(self.repo, task)
            if not found:
                continue
            try:
                manifest = repository.read_manifest(self.repo / task / str(found[-1]))
            except (OSError, ValueError) as e:  # exported again: its digest is unknown
                log.warning("%s version %d: unreadable manifest (%s)", task, found[-1], e)
                continue
            served[task] = Served(found[-1], manifest.source_sha256, None)
        return served

    def offer(self, task: str, module: torch.nn.Module, real: torch.Tensor,
              input_range: tuple[float, float] | None, offset: int, force: bool = False) -> bool:
        """Queue `task`'s export unless its model is the one queued or served already (or
        `force`); True when queued."""
        digest = weights_digest(module)
        with self._cond:
            if not force and self.wanted.get(task) == digest:
                return False
            self.wanted[task] = digest
            self._pending[task] = ExportJob(task, module, real, input_range, digest, offset)
            self._cond.notify_all()
        return True

    def behind(self) -> list[str]:
        """Tasks whose served model is not the newest offered: queued, exporting, or failed."""
        with self._cond:
            return sorted(t for t, d in self.wanted.items()
                          if t not in self.served or self.served[t].digest != d)

    def status(self) -> dict[str, Any]:
        with self._cond:
            queued = len(self._pending) + (self._exporting is not None)
        return {"repo": str(self.repo), "queued": queued, "behind": self.behind(),
                "failed": self.failed, "last_error": self.last_error}

    def close(self) -> None:
        """Finish the queued exports, then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=300)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return
                task = next(iter(self._pending))
                job = self._pending.pop(task)
                self._exporting = task
            try:
                self._export(job)
            finally:
                with self._cond:
                    self._exporting = None

    def _export(self, job: ExportJob) -> None:
        from edgecl.export import ExportError, export_module  # onnx loads on first export

        real = job.real if len(job.real) else None
        note = (f"{len(job.real)} held-out samples of the stream" if real is not None
                else "random inputs only: no held-out samples of this task yet")
        try:
            manifest = export_module(job.module, self.repo, job.task, self.spec,
                                     list(self.schema.classes_of(job.task)), real, note,
                                     f"{self.source} at journal seq {job.offset}", job.digest,
                                     input_range=job.input_range)
        except (ExportError, OSError, ValueError) as e:
            self.failed += 1
            self.last_error = str(e)
            log.error("export of %s failed: %s", job.task, e)
            return
        with self._cond:
            self.served[job.task] = Served(manifest.version, job.digest, job.offset)
        log.info("published %s version %d (journal offset %d)", job.task, manifest.version,
                 job.offset)
        try:  # a task exported after every consolidation keeps its newest versions only
            repository.prune(self.repo, job.task)
        except OSError as e:
            log.warning("could not prune old versions of %s: %s", job.task, e)

