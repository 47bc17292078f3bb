"""The models now serving, one per task, kept up to date by polling the repository.

A new version is loaded and verified beside the serving one, then swapped in by replacing the
whole task -> model mapping in one assignment: a request that already holds the old model finishes
on it, the next one gets the new model. A version that fails to load or verify is refused (logged,
counted in metrics) and the old one keeps serving; it is retried only if its files change.

Rolling a model back: a version folder holding a file named `BAD` (`touch <repo>/<task>/<v>/BAD`;
its text, if any, is logged as the reason) is never served, and neither is a version whose folder
was removed. When the version serving is marked BAD or removed, the next poll serves the newest
remaining good version of the task (older ones included), or, when none is left or none loads,
stops serving the task (404, and /v2/health/ready says 503 once no task is left). Marking BAD is
the better of the two: it is one atomic step, it keeps the version's number taken (the next
export gets a higher one) and its files for inspection, and deleting the `BAD` file serves the
version again at the next poll (when it is newer than the one serving).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from edgecl import repository
from edgecl.serve.metrics import ServerMetrics
from edgecl.serve.runtime import LoadedModel, ModelRefused

log = logging.getLogger("edgecl.serve")
FileSignature = tuple[tuple[int, int], ...]
BAD_FILE = "BAD"  # <repo>/<task>/<version>/BAD: an operator rolled this version back


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


def marked_bad(version_dir: Path) -> bool:
    """Whether an operator marked this version bad (a `BAD` file in its folder).

    Raises OSError when the folder cannot be searched: a version that cannot be checked is not
    taken as good, and the caller keeps what is serving.
    """
    try:
        (version_dir / BAD_FILE).lstat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _bad_reason(version_dir: Path) -> str:
    try:
        text = (version_dir / BAD_FILE).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return f"marked BAD: {text[:200]}" if text else "marked BAD"


class LiveModels:
    """task -> the newest version that loaded and verified and is not rolled back."""

    def __init__(self, repo: Path, load: Callable[[Path], LoadedModel],
                 metrics: ServerMetrics) -> None:
        self.repo = repo
        self._load = load
        self._metrics = metrics
        self._models: dict[str, LoadedModel] = {}  # replaced, never mutated: readers take no lock
        self._refused: dict[tuple[str, int], FileSignature] = {}
        self._scan_errors: dict[str, str] = {}  # task -> why its folder cannot be listed
        self._repo_missing = False
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def get(self, task: str) -> LoadedModel | None:
        return self._models.get(task)

    def all(self) -> dict[str, LoadedModel]:
        return self._models

    def refresh(self) -> None:
        """Bring every task to its newest good version: load newer versions, roll back from a
        version marked BAD or removed, stop serving a task none of whose versions is left.

        Each task on its own: one whose folder cannot be listed, or whose refresh fails in any
        other way, is logged and keeps what it serves; the other tasks still refresh. A
        repository folder that is gone as a whole (an unmounted disk) changes nothing.
        """
        with self._refresh_lock:
            if self._models and not self.repo.is_dir():
                if not self._repo_missing:
                    log.warning("%s is not a folder any more; keeping the %d model(s) loaded",
                                self.repo, len(self._models))
                self._repo_missing = True
                return
            self._repo_missing = False
            for task in sorted({*repository.tasks(self.repo), *self._models}):
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
        versions = repository.versions(self.repo, task)
        good = [v for v in versions if not marked_bad(self.repo / task / str(v))]
        if serving is None or serving.version in good:
            newer = [v for v in good if serving is None or v > serving.version]
            kept = f"version {serving.version} keeps serving" if serving else "none serving"
            model = self._newest_loadable(task, newer, kept)
            if model is not None:
                self._serve(task, model)
                log.info("serving %s version %s from %s", task, model.version, model.path)
            return
        # The version serving was marked BAD or removed: roll back to the newest good one.
        folder = self.repo / task / str(serving.version)
        why = _bad_reason(folder) if serving.version in versions else "removed"
        model = self._newest_loadable(task, good, "trying the next older good version")
        if model is None:
            self._models = {t: m for t, m in self._models.items() if t != task}
            self._metrics.unloaded(task)
            log.warning("stopped serving %s: version %s is %s and no other good version "
                        "loads", task, serving.version, why)
            return
        self._serve(task, model)
        log.warning("rolled %s back from version %s (%s) to version %s", task, serving.version,
                    why, model.version)

    def _serve(self, task: str, model: LoadedModel) -> None:
        self._models = {**self._models, task: model}
        self._metrics.loaded(task, model.version)

    def _newest_loadable(self, task: str, candidates: list[int], kept: str
                         ) -> LoadedModel | None:
        """The newest of `candidates` that loads and verifies; refusals are remembered."""
        for version in reversed(candidates):
            folder = self.repo / task / str(version)
            signature = file_signature(folder)
            if self._refused.get((task, version)) == signature:
                continue
            try:
                return self._load(folder)
            except ModelRefused as e:
                self._refused[task, version] = signature
                self._metrics.refuse(task, e.reason)
                log.warning("refused %s/%s (%s): %s; %s", task, version, e.reason, e, kept)
        return None

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
