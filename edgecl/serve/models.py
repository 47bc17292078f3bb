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

A new version is probed (`edgecl.serve.runtime.Prober`: a child process with a time limit)
before the refresh lock is taken, so a graph that loops forever or crashes onnxruntime is
refused without holding up the other tasks, a rollback or a stop. A repository that lists no
task at all while models are serving (an empty mountpoint: the disk was unmounted) is taken as
unavailable, not as every task deleted: the models loaded keep serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from edgecl import repository
from edgecl.repository import BAD_FILE, marked_bad
from edgecl.serve.metrics import ServerMetrics
from edgecl.serve.runtime import LoadedModel, ModelRefused, ProbeCancelled, Prober

log = logging.getLogger("edgecl.serve")
FileSignature = tuple[tuple[int, int], ...]
__all__ = ["BAD_FILE", "LiveModels", "file_signature", "marked_bad"]


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


def _bad_reason(version_dir: Path) -> str:
    try:
        text = (version_dir / BAD_FILE).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return f"marked BAD: {text[:200]}" if text else "marked BAD"


class LiveModels:
    """task -> the newest version that loaded and verified and is not rolled back.

    `load(folder)` loads and verifies a version (ModelRefused when it must not serve);
    `prober`, when given, is what `load` probes with: new versions are probed with it off the
    refresh lock first, and `stop()` closes it.
    """

    def __init__(self, repo: Path, load: Callable[[Path], LoadedModel],
                 metrics: ServerMetrics, prober: Prober | None = None) -> None:
        self.repo = repo
        self._load = load
        self._metrics = metrics
        self.prober = prober
        self._models: dict[str, LoadedModel] = {}  # replaced, never mutated: readers take no lock
        self._refused: dict[tuple[str, int], FileSignature] = {}
        self._refusals: dict[tuple[str, int], str] = {}  # (task, version) -> why refused
        self._refused_lock = threading.Lock()  # also guards _probing
        self._probing: set[tuple[str, int]] = set()  # probes running off the refresh lock
        self._scan_errors: dict[str, str] = {}  # task -> why its folder cannot be listed
        self._repo_missing = False
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def get(self, task: str) -> LoadedModel | None:
        return self._models.get(task)

    def all(self) -> dict[str, LoadedModel]:
        return self._models

    def refusals(self) -> dict[tuple[str, int], str]:
        """(task, version) -> why it was refused ("reason: message"), for versions refused
        since start and not rewritten since."""
        with self._refused_lock:
            return dict(self._refusals)

    def probing(self) -> set[tuple[str, int]]:
        """(task, version) of the probes running now off the refresh lock."""
        with self._refused_lock:
            return set(self._probing)

    @property
    def repository_available(self) -> bool:
        """False while the repository is missing or lists no task with models loaded."""
        return not self._repo_missing

    def refresh(self) -> None:
        """Bring every task to its newest good version: load newer versions, roll back from a
        version marked BAD or removed, stop serving a task none of whose versions is left.

        Each task on its own: one whose folder cannot be listed, or whose refresh fails in any
        other way, is logged and keeps what it serves; the other tasks still refresh. A
        repository folder that is gone as a whole, or lists no task at all (an unmounted disk),
        changes nothing.
        """
        if self._stop.is_set():
            return
        try:
            if self.prober is not None:
                try:
                    self._probe_new_versions()
                except ProbeCancelled:
                    raise
                except Exception:  # the refresh under the lock still runs, and rolls back
                    log.exception("probing new versions in %s failed", self.repo)
            with self._refresh_lock:
                self._refresh_all()
        except ProbeCancelled:  # stopping
            return

    def _refresh_all(self) -> None:
        listed = repository.tasks(self.repo)
        if self._models and not listed:
            if not self._repo_missing:
                what = ("is not a folder any more" if not self.repo.is_dir()
                        else "lists no task any more (an unmounted disk?)")
                log.warning("%s %s; keeping the %d model(s) loaded until it lists tasks "
                            "again", self.repo, what, len(self._models))
                self._metrics.repository_unavailable()
            self._repo_missing = True
            return
        if self._repo_missing:
            log.warning("%s lists tasks again", self.repo)
        self._repo_missing = False
        for task in sorted({*listed, *self._models}):
            try:
                self._refresh_task(task)
            except OSError as e:  # logged once, not at every poll, until it changes
                if self._scan_errors.get(task) != str(e):
                    log.warning("cannot scan %s: %s", self.repo / task, e)
                self._scan_errors[task] = str(e)
            except ProbeCancelled:
                raise
            except Exception:
                log.exception("refreshing %s failed", self.repo / task)
            else:
                self._scan_errors.pop(task, None)

    def _probe_new_versions(self) -> None:
        """Probe each task's newest unrefused version newer than the one serving, without the
        refresh lock: the slow part of a reload (and what a graph that never ends would hang)
        runs in `prober`'s child process, time-limited. All tasks' candidates go to one child
        process; a task whose candidate is refused sends its next older one in another round,
        until one passes or none is left."""
        assert self.prober is not None
        try:
            listed = repository.tasks(self.repo)
        except OSError:
            return  # said by the refresh under the lock
        waiting: dict[str, list[int]] = {}  # task -> its candidates, newest first
        for task in listed:
            serving = self._models.get(task)
            try:
                versions = repository.versions(self.repo, task)
                waiting[task] = [v for v in reversed(versions)
                                 if not (serving and v <= serving.version)
                                 and not marked_bad(self.repo / task / str(v))]
            except OSError:
                continue  # said by the refresh under the lock
        while waiting and not self._stop.is_set():
            batch: dict[Path, tuple[str, int, FileSignature]] = {}
            for task, candidates in list(waiting.items()):
                while candidates and task not in {t for t, _, _ in batch.values()}:
                    version = candidates.pop(0)
                    folder = self.repo / task / str(version)
                    signature = file_signature(folder)
                    with self._refused_lock:
                        if (task, version) in self._probing:
                            candidates.clear()  # another refresh is probing it: its turn
                            continue
                        if self._refused.get((task, version)) == signature:
                            continue
                        self._probing.add((task, version))
                    batch[folder] = (task, version, signature)
                if task not in {t for t, _, _ in batch.values()}:
                    del waiting[task]
            if not batch:
                return
            try:
                verdicts = self.prober.probe_versions(list(batch))
            finally:
                with self._refused_lock:
                    self._probing.difference_update((t, v) for t, v, _ in batch.values())
            for folder, (task, version, signature) in batch.items():
                error = verdicts[folder]
                if error is None:  # the load under the lock finds the pass remembered
                    waiting.pop(task, None)
                    continue
                serving = self._models.get(task)
                kept = f"version {serving.version} keeps serving" if serving else "none serving"
                self._refuse(task, version, signature, error, kept)

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
        """The newest of `candidates` that loads and verifies; refusals are remembered. One
        whose probe another refresh is running is passed over (for now)."""
        for version in reversed(candidates):
            folder = self.repo / task / str(version)
            signature = file_signature(folder)
            with self._refused_lock:
                if (self._refused.get((task, version)) == signature
                        or (task, version) in self._probing):
                    continue
            try:
                return self._load(folder)
            except ModelRefused as e:
                self._refuse(task, version, signature, e, kept)
        return None

    def _refuse(self, task: str, version: int, signature: FileSignature, e: ModelRefused,
                kept: str) -> None:
        """Remember, count and log a refusal, once per version and file signature."""
        with self._refused_lock:
            if self._refused.get((task, version)) == signature:
                return
            self._refused[task, version] = signature
            self._refusals[task, version] = f"{e.reason}: {e}"
        self._metrics.refuse(task, e.reason)
        log.warning("refused %s/%s (%s): %s; %s", task, version, e.reason, e, kept)

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
        """End polling; a probe running is killed, so this returns at once."""
        self._stop.set()
        if self.prober is not None:
            self.prober.close()
        if self._poller is not None:
            self._poller.join()
