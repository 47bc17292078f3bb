"""The models now serving, one per task, kept up to date by polling the repository.

A new version is loaded and verified beside the serving one, then swapped in by replacing the
whole task -> model mapping in one assignment: a request that already holds the old model finishes
on it, the next one gets the new model. A version that fails to load or verify is refused (logged,
counted in metrics) and the old one keeps serving; it is retried only if its files change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from edgecl.serve import repository
from edgecl.serve.metrics import ServerMetrics
from edgecl.serve.runtime import LoadedModel, ModelRefused

log = logging.getLogger("edgecl.serve")
FileSignature = tuple[tuple[int, int], ...]


def file_signature(version_dir: Path) -> FileSignature:
    """(mtime_ns, size) of a version's files: it changes when a refused version is rewritten."""
    out = []
    for name in (repository.MODEL_FILE, repository.MANIFEST_FILE):
        try:
            st = (version_dir / name).stat()
        except OSError:  # missing or unreadable: the load refuses it and says why
            continue
        out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


class LiveModels:
    """task -> the newest version that loaded and verified."""

    def __init__(self, repo: Path, load: Callable[[Path], LoadedModel],
                 metrics: ServerMetrics) -> None:
        self.repo = repo
        self._load = load
        self._metrics = metrics
        self._models: dict[str, LoadedModel] = {}  # replaced, never mutated: readers take no lock
        self._refused: dict[tuple[str, int], FileSignature] = {}
        self._scan_errors: dict[str, str] = {}  # task -> why its folder cannot be listed
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def get(self, task: str) -> LoadedModel | None:
        return self._models.get(task)

    def all(self) -> dict[str, LoadedModel]:
        return self._models

    def refresh(self) -> None:
        """Load the newest loadable version of every task newer than the one serving.

        Each task on its own: one whose folder cannot be listed, or whose refresh fails in any
        other way, is logged and the other tasks still get their new versions.
        """
        with self._refresh_lock:
            for task in repository.tasks(self.repo):
                try:
                    self._refresh_task(task)
                except OSError as e:  # logged once, not at every poll, until it changes
                    if self._scan_errors.get(task) != str(e):
                        log.warning("cannot scan %s: %s", self.repo / task, e)
                    self._scan_errors[task] = str(e)
                except Exception:
                    log.exception("refreshing %s failed", self.repo / task)
                else:
                    self._scan_errors.pop(task, None)

    def _refresh_task(self, task: str) -> None:
        serving = self._models.get(task)
        newer = [v for v in repository.versions(self.repo, task)
                 if serving is None or v > serving.version]
        for version in reversed(newer):
            folder = self.repo / task / str(version)
            signature = file_signature(folder)
            if self._refused.get((task, version)) == signature:
                continue
            try:
                model = self._load(folder)
            except ModelRefused as e:
                self._refused[task, version] = signature
                self._metrics.refuse(task, e.reason)
                kept = f"version {serving.version} keeps serving" if serving else "none serving"
                log.warning("refused %s/%s (%s): %s; %s", task, version, e.reason, e, kept)
                continue
            self._models = {**self._models, task: model}
            self._metrics.loaded(task, version)
            log.info("serving %s version %s from %s", task, version, folder)
            return

    def start_polling(self, interval_s: float) -> None:
        """Refresh every `interval_s` seconds in a daemon thread until `stop()`."""
        def poll() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.refresh()
                except Exception:  # a vanished folder or a full disk must not end polling
                    log.exception("polling %s failed; retrying", self.repo)

        self._poller = threading.Thread(target=poll, name="edgecl-reload", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
