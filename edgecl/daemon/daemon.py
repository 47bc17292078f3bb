"""The `edgecl learn` daemon: journal, restore + replay, the learning thread, checkpoints,
evaluation, publishing. Ingest sources (HTTP, unix socket, MQTT) call `submit`; the learning
thread is the only one that touches the learner.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgecl import __version__
from edgecl.config import Config, LearnConfig
from edgecl.daemon.checkpoints import CheckpointStore
from edgecl.daemon.fleet import (
    AggregateStore,
    FleetError,
    federation_refused,
    place,
    share_of,
)
from edgecl.daemon.journal import (
    FLEET,
    FLUSH,
    JOURNAL_RETRY_S,
    REHEARSE,
    Appended,
    Journal,
    JournalError,
    JournalGone,
)
from edgecl.daemon.loop import Learning
from edgecl.daemon.publisher import Publisher
from edgecl.daemon.reserve import SpaceReserve, reserve_size
from edgecl.daemon.schema import EndTask, SampleError, Samples, parse_body
from edgecl.fleet.wire import WireError, pack, unpack
from edgecl.learners import Learner, LearnerDiverged
from edgecl.setup import SampleSchema, new_learner, stream_learner_spec, stream_schema
from edgecl.web import release_freed_memory

log = logging.getLogger("edgecl.learn")
READ_CHUNK = 64  # journal chunks (up to a request's samples each) read per query
REHEARSE_CHUNK = 10  # idle rehearsal steps a REHEARSE marker asks for at most
T = TypeVar("T")


class DaemonError(RuntimeError):
    """The daemon cannot start: state dir locked or holding another learner."""


class Backpressure(Exception):
    """The learner is `max_lag` records behind: ingest must wait `retry_after_s`."""

    def __init__(self, lag: int, retry_after_s: float) -> None:
        super().__init__(f"the learner is {lag:,} records behind the journal; retry in "
                         f"{retry_after_s:g} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Refusal:
    """Why ingest did not take a request, as every transport answers it: `status` in HTTP's
    terms; `retry_after_s` None when the request must not be sent again as it is (4xx), else
    the seconds to wait before sending it again (429 backpressure, 507 journal full or
    failing)."""

    status: int
    message: str
    retry_after_s: float | None = None


# what admitting a request can raise: `Daemon.refusal` turns each into its answer
ADMISSION_ERRORS = (SampleError, Backpressure, JournalError)


def private_state_dir(state_dir: Path) -> None:
    """Create `state_dir` (mode 0700: the journal holds every sample), or check that the one
    there is a folder of this user, and take group and other access away from it."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.stat(state_dir, follow_symlinks=False)
    if not stat.S_ISDIR(info.st_mode):
        raise DaemonError(f"{state_dir}: not a folder (a symbolic link is refused)")
    if info.st_uid != os.geteuid():
        raise DaemonError(f"{state_dir}: owned by uid {info.st_uid}, not this user "
                          f"({os.geteuid()}); use a state dir of your own")
    if stat.S_IMODE(info.st_mode) & 0o077:
        log.warning("%s: others could read the journal (mode %o); it is made 0700", state_dir,
                    stat.S_IMODE(info.st_mode))
        os.chmod(state_dir, 0o700)


def lock_state_dir(state_dir: Path) -> int:
    """An exclusive lock on `state_dir/lock`, held until the process ends or it is closed (a
    `lock` that is a symbolic link is refused, not followed)."""
    try:
        fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DaemonError(f"{state_dir / 'lock'}: a symbolic link; remove it") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonError(f"{state_dir}: another edgecl learn holds this state dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class IdleRehearsal:
    """Idle time spent on memory steps: REHEARSE markers of at most REHEARSE_CHUNK steps, one
    at a time (the next once the learner has read the last, so that new samples wait behind
    one chunk at most), up to `rehearse_steps` in each idle period."""

    def __init__(self, journal: Journal, learning: Learning, cfg: LearnConfig) -> None:
        self.journal, self.learning, self.cfg = journal, learning, cfg
        self.taken = 0  # steps journaled in this idle period
        self.marked_at = -1  # the read_seq when the last marker was journaled

    def offer(self) -> None:
        """Journal the next chunk of steps, if the budget and the learner allow one."""
        remaining = self.cfg.rehearse_steps - self.taken
        learner = self.learning.learner
        if remaining <= 0 or not learner.can_rehearse or not learner.task_ids \
                or self.marked_at == self.learning.read_seq:
            return
        steps = min(REHEARSE_CHUNK, remaining)
        self.marked_at = self.learning.read_seq
        self.journal.append_rehearsal(steps)
        self.taken += steps


def _comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec dict without what may change between runs of one learner (device, daemon knobs)."""
    config = {k: v for k, v in spec["config"].items() if k not in ("device", "learn")}
    return {**spec, "config": config}


class Daemon:
    """Owns the state dir: `start()` restores and learns in a thread, `stop()` checkpoints."""

    def __init__(self, cfg: Config, state_dir: Path, repo: Path | None = None) -> None:
        self.cfg = cfg
        self.schema: SampleSchema = stream_schema(cfg)
        self.spec = stream_learner_spec(cfg, self.schema)
        private_state_dir(state_dir)
        self.state_dir = state_dir
        self._lock_fd = lock_state_dir(state_dir)
        self.journal = Journal(state_dir / "journal.sqlite3", self.schema.max_tasks)
        self.checkpoints = CheckpointStore(state_dir / "checkpoints", cfg.learn.keep_checkpoints)
        self.aggregates = AggregateStore(state_dir)
        self.reserve = SpaceReserve(state_dir / "reserve")
        self.making_room = False  # a checkpoint uses the reserve: ingest must not take it
        self.publisher = Publisher(repo, self.spec, self.schema,
                                   f"edgecl learn {state_dir.resolve()}") if repo else None
        self.rejected = 0
        self.lost = 0  # records truncated from the journal that no checkpoint holds
        self.last_checkpoint: dict[str, Any] | None = None
        self.checkpoint_failures = 0
        self.diverged: str | None = None  # why the learner stopped, if it diverged
        # what the ingest sources met beside samples (connections turned away or closed idle,
        # a broker refusing or dropping the connection): counted, shown in status and metrics
        self.ingest_events: collections.Counter[str] = collections.Counter()
        self._events_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgecl-learn")
        try:
            self.learning = self._restore()
            if cfg.learn.rehearse_steps and not self.learning.learner.can_rehearse:
                raise DaemonError(f"learn.rehearse_steps: {cfg.method.name} does not rehearse "
                                  "from memory; idle rehearsal is for the replay methods (er, "
                                  "der): set it to 0 or choose one of them")
        except BaseException:  # a refused state dir: release the lock and the threads now
            self.stop()
            raise
        self.replay_target = self.journal.last_seq
        # the offset up to which records are learned and their consolidations' exports queued
        self.settled = self.learning.offset
        self.footprint = self.learning.learner.footprint().to_dict()
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self.fleet_node: Callable[[], dict[str, Any]] | None = None  # its status (learn --fleet)
        self.fleet_shares = 0  # shares handed to the fleet's rounds since start
        self.started_at = time.time()

    # --- start and stop --------------------------------------------------------------------
    def _restore(self) -> Learning:
        restored = self.checkpoints.restore(self.cfg.device)
        if restored is not None:
            saved = restored.learner.spec.to_dict()
            if _comparable(saved) != _comparable(self.spec.to_dict()):
                raise DaemonError(f"{self.state_dir} holds a learner of another config "
                                  f"({restored.path.name}); use a new --state-dir or the same "
                                  "config")
            learning = Learning(restored.learner, self.schema, self.cfg.learn,
                                restored.meta["learning"], self.aggregates)
            self.journal.skip_to(learning.offset)  # a damaged journal may end before it
            log.info("restored %s: journal offset %d", restored.path.name, learning.offset)
            self.last_checkpoint = {"file": restored.path.name, "offset": learning.offset,
                                    "at": restored.path.stat().st_mtime, "seconds": 0.0}
            return learning
        learning = Learning(new_learner(self.spec), self.schema, self.cfg.learn,
                            aggregates=self.aggregates)
        first = self.journal.first_seq()
        if first > 1:  # every checkpoint refused and the journal before them truncated
            self.lost = first - 1
            log.error("no usable checkpoint; records 1..%d are gone: learning from the journal "
                      "that is left", first - 1)
            learning.offset = first - 1
        self._save_checkpoint(learning, force=True)  # the initial state: restarts start here
        return learning

    def start(self) -> None:
        self._publish_changed()  # what the last run did not publish, or published from later
        self._thread.start()

    def stop(self) -> None:
        """Finish the current step, checkpoint, close everything (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.publisher is not None:
            self.publisher.close()
        self.journal.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @property
    def alive(self) -> bool:
        """The learning thread runs (it stops only on stop() or an error it logged)."""
        return self._thread.is_alive()

    @property
    def ready(self) -> bool:
        """Restore and replay of the journal found at start are done."""
        return self._thread.is_alive() and self.learning.read_seq >= self.replay_target

    # --- ingest (any thread) ---------------------------------------------------------------
    def lag(self) -> int:
        """Records journaled whose effect, and the publishing it calls for, is not done."""
        return self.journal.last_seq - self.settled

    def check_backpressure(self) -> None:
        lag = self.lag()
        if lag > self.cfg.learn.max_lag:
            raise Backpressure(lag, 1.0)

    def parse(self, body: bytes, content_type: str) -> Samples | EndTask:
        """A request body of any transport, validated: samples or an end of task."""
        return parse_body(self.schema, body, content_type, self.cfg.learn.max_request_samples)

    def submit(self, message: Samples | EndTask) -> Future[Appended]:
        """Journal validated samples (unless the learner lags: Backpressure) or an end of task;
        the future resolves once it is durable. Every transport admits requests this way."""
        if self.making_room:
            raise JournalError("the disk is full: making room (a checkpoint, then the journal "
                               "truncated); nothing was accepted")
        if isinstance(message, EndTask):
            return self.journal.append_end(message.task, message.samples,
                                           self.cfg.learn.end_wait_s)
        self.check_backpressure()
        return self.journal.append(message)

    def count(self, event: str) -> None:
        """Count an ingest source's event (any thread)."""
        with self._events_lock:
            self.ingest_events[event] += 1

    def refusal(self, error: Exception) -> Refusal:
        """The answer to a request refused with one of `ADMISSION_ERRORS`; a refusal by
        validation counts as rejected."""
        if isinstance(error, SampleError):
            self.rejected += 1
            return Refusal(error.status, str(error))
        if isinstance(error, Backpressure):
            return Refusal(429, str(error), error.retry_after_s)
        if isinstance(error, JournalGone):
            return Refusal(503, str(error), JOURNAL_RETRY_S)
        if isinstance(error, JournalError):
            return Refusal(507, str(error), JOURNAL_RETRY_S)
        raise TypeError(f"not an admission error: {error!r}") from error

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the learning thread (between steps); its result comes in the future."""
        future: Future[T] = Future()
        if not self._thread.is_alive():
            future.set_exception(RuntimeError("the learning thread is not running"))
        else:
            self._calls.put((fn, future))
        return future

    def checkpoint(self) -> dict[str, Any]:
        """Checkpoint now (on the learning thread); a failure is counted and refused (507)."""
        try:
            self._save_checkpoint(self.learning, force=True)
        except OSError as e:
            self.checkpoint_failures += 1
            log.error("checkpoint failed: %s", e)
            raise SampleError(f"the checkpoint could not be written: {e}", 507) from None
        return self.last_checkpoint or {}

    # --- the fleet (any thread) -------------------------------------------------------------
    def fleet_share(self, timeout_s: float = 60.0) -> bytes:
        """The learner's share for a fleet round (edgecl.daemon.fleet), taken between steps."""
        learner = self.learning.learner
        refused = federation_refused(learner)
        if refused:
            raise SampleError(refused, 409)
        return self.call(lambda: self._share(learner)).result(timeout_s)

    def _share(self, learner: Learner) -> bytes:
        """The share, packed (on the learning thread, between steps), counted."""
        self.fleet_shares += 1
        return pack(share_of(learner, dict(self.journal.accepted)))

    def take_aggregate(self, data: bytes, timeout_s: float = 60.0) -> dict[str, Any]:
        """Journal the fleet's aggregate `data` (a FLEET marker, once it is stored) for the
        learner to take; returns the marker's seq and the aggregate's sha256. SampleError
        (400, 409, 422) for an aggregate this device cannot take: nothing is journaled."""
        learner = self.learning.learner
        refused = federation_refused(learner)
        if refused:
            raise SampleError(refused, 409)
        try:
            share = unpack(data)
        except WireError as e:
            raise SampleError(f"the aggregate: {e}", 400) from None
        try:
            self.call(lambda: place(learner, share)).result(timeout_s)
        except FleetError as e:
            raise SampleError(str(e), 422) from None
        if self.making_room:
            raise JournalError("the disk is full: making room; nothing was accepted")
        with self.aggregates.lock:
            sha256 = self.aggregates.write(data)
            appended = self.journal.append_aggregate(sha256).result(timeout_s)
        log.info("fleet aggregate %s journaled at seq %d", sha256[:12], appended.first_seq)
        return {"seq": appended.first_seq, "sha256": sha256}

    def evaluate(self) -> dict[str, float]:
        return self.learning.evaluate()

    def export(self, task: str) -> None:
        """Queue `task`'s model for export (on the learning thread)."""
        if self.publisher is None:
            raise SampleError("no model repository: start edgecl learn with --repo", 409)
        if task not in self.learning.learner.task_ids:
            raise SampleError(f"unknown task {task!r}: nothing learned of it yet", 404)
        self._publish_changed(force=task)

    # --- the learning thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._learn()
        except LearnerDiverged as e:  # no checkpoint of it: restarts resume from a good one
            self.diverged = str(e)
            log.error("the learner diverged at journal seq %d and cannot recover: %s; learning "
                      "stopped, the newest checkpoint (%s) holds the last good learner",
                      self.learning.read_seq, e, (self.last_checkpoint or {}).get("file"))
        except Exception:  # the thread ends; the process sees `alive` false and exits 1
            log.exception("the learning thread stopped at journal seq %d", self.learning.read_seq)

    def _learn(self) -> None:
        cfg = self.cfg.learn
        last_checkpoint_s, last_checkpoint_learned = time.monotonic(), self.learning.learned
        last_record_s, flushed_at = time.monotonic(), -1
        rehearsal = IdleRehearsal(self.journal, self.learning, cfg)
        while not self._stop.is_set():
            if self.journal.gone:  # nothing is learned or checkpointed into a state dir not ours
                raise DaemonError(self.journal.gone)
            self._run_calls()
            chunks = self.journal.read(self.learning.read_seq, READ_CHUNK)
            for chunk in chunks:
                if self._stop.is_set():
                    break
                for task in self.learning.take(chunk):
                    self._consolidated(task)
                self.settled = self.learning.offset
            now = time.monotonic()
            if any(chunk.kind != REHEARSE for chunk in chunks):
                last_record_s = now
                rehearsal.taken = 0
            if (self.learning.learned - last_checkpoint_learned >= cfg.checkpoint_every
                    or now - last_checkpoint_s >= cfg.checkpoint_seconds):
                last_checkpoint_s, last_checkpoint_learned = now, self.learning.learned
                try:
                    self._save_checkpoint(self.learning)
                except OSError as e:  # a full disk: learning goes on, the journal keeps all
                    self.checkpoint_failures += 1
                    log.error("checkpoint failed (will retry): %s", e)
            if not chunks:
                learning = self.learning
                if learning.pending and now - last_record_s > cfg.flush_idle_s \
                        and flushed_at != learning.read_seq:
                    flushed_at = learning.read_seq  # one marker per stalled batch
                    self.journal.append_marker(FLUSH, learning.pending_task or "")
                elif not learning.pending and now - last_record_s > cfg.rehearse_after_s:
                    rehearsal.offer()
                self.journal.wait(self.learning.read_seq, 0.05)
        self._run_calls()
        self._save_checkpoint(self.learning)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except Exception as e:  # the caller reports it; the thread goes on
                future.set_exception(e)

    def _save_checkpoint(self, learning: Learning, force: bool = False) -> None:
        """Checkpoint, unless nothing was learned since the last one (and not `force`), and
        truncate the journal. When that fails (a full disk), the space reserve is given up and
        only the new checkpoint kept, so that the journal can be truncated to it."""
        if not force and self.last_checkpoint and self.last_checkpoint["offset"] == learning.offset:
            return
        t0 = time.perf_counter()
        try:
            path = self._checkpoint_and_truncate(learning)
        except OSError as e:
            log.error("checkpoint failed, the disk of %s may be full: %s; giving up the space "
                      "reserve (%d bytes) and the older checkpoints to make room",
                      self.state_dir, e, self.reserve.bytes)
            self.making_room = True
            try:
                freed = self.reserve.give_up()
                path = self._checkpoint_and_truncate(learning, keep=1)
            finally:
                self.making_room = False
            log.warning("checkpoint %s written and the journal truncated in the room made (%d "
                        "bytes of reserve used); the reserve is taken again once there is room",
                        path.name, freed)
        self.reserve.hold(reserve_size(path, self.journal.path))
        self.footprint = learning.learner.footprint().to_dict()
        self.last_checkpoint = {"file": path.name, "offset": learning.offset,
                                "at": time.time(), "seconds": time.perf_counter() - t0}
        log.info("checkpoint %s (%.2f s)", path.name, self.last_checkpoint["seconds"])
        release_freed_memory()

    def _checkpoint_and_truncate(self, learning: Learning, keep: int | None = None) -> Path:
        meta = {"learning": learning.state_dict()}
        path = self.checkpoints.save(learning.learner, meta, learning.offset, keep)
        self.journal.truncate(self.checkpoints.oldest_offset())
        self.aggregates.prune(lambda: self.journal.marker_tasks(FLEET))
        return path

    def _consolidated(self, task: str) -> None:
        accs = self.learning.rows[task]
        log.info("task %s consolidated; held-out accuracy %s", task,
                 ", ".join(f"{t} {a:.3f}" for t, a in accs.items()) or "n/a")
        self._publish_changed()

    def _publish_changed(self, force: str | None = None) -> None:
        """Offer every task's model to the publisher (on the learning thread, or before it
        starts): it exports those that changed, and `force` whatever it is."""
        if self.publisher is None:
            return
        learning = self.learning
        for task in learning.learner.task_ids:
            x, _ = learning.holdout.tensors(task)
            self.publisher.offer(task, learning.learner.task_module(task), x.clone(),
                                 learning.ranges.get(task), learning.offset, force=task == force)

    # --- status ----------------------------------------------------------------------------
    def _served(self, task: str, behind: list[str]) -> dict[str, Any]:
        """The task's served model: version, the journal offset it was exported at, and
        whether the learner has moved on from it (`behind`: a newer export queued or failed)."""
        served = self.publisher.served.get(task) if self.publisher else None
        return {"served_version": served.version if served else None,
                "served_offset": served.offset if served else None,
                "behind": task in behind}

    def status(self) -> dict[str, Any]:
        learning = self.learning
        accepted = dict(self.journal.accepted)
        holdout = learning.holdout.counts()
        behind = self.publisher.behind() if self.publisher else []
        tasks = {
            task: {"accepted": n, "held_out": holdout.get(task, 0),
                   "accuracy": learning.accuracy_now.get(task),
                   "accuracy_when_learned": learning.accuracy_learned.get(task),
                   **self._served(task, behind)}
            for task, n in accepted.items()}
        return {
            "version": __version__, "ready": self.ready, "accepted": sum(accepted.values()),
            "learned": learning.learned, "trained": learning.trained, "rejected": self.rejected,
            # training steps not applied: their loss, gradients or new weights were not finite
            "skipped_steps": learning.learner.counters.get("nonfinite_steps", 0),
            # memory steps taken while ingest was idle (learn.rehearse_steps) and after fleet
            # aggregates (learn.fleet_rehearse_steps)
            "rehearsal_steps": learning.learner.counters.get("rehearsal_steps", 0),
            "diverged": self.diverged, "ingest_events": dict(self.ingest_events),
            "lost": self.lost + learning.lost,
            # numbered senders' messages that never arrived (dropped on the way, or refused)
            "missing": self.journal.missing,
            "journal": {"last_seq": self.journal.last_seq, "offset": learning.offset,
                        "lag": self.lag(), "pending": len(learning.pending),
                        "damage": self.journal.damage, "write_failures": self.journal.failures,
                        "gone": self.journal.gone, "ends_waiting": self.journal.ends_waiting,
                        "duplicates": self.journal.duplicates,
                        "senders": len(self.journal.senders),
                        "last_error": self.journal.last_error},
            "open_task": learning.learner.open_task, "tasks": tasks,
            "method": self.cfg.method.name, "device": str(learning.learner.device),
            "last_checkpoint": self.last_checkpoint,
            "corrupt_checkpoints": self.checkpoints.corrupt,
            "checkpoint_failures": self.checkpoint_failures,
            # disk held back for a checkpoint on a full disk, and how often it was given up
            "disk": {"reserve_bytes": self.reserve.bytes, "reserve_used": self.reserve.used},
            "footprint": self.footprint,
            # fleet aggregates taken (learn --fleet), and this device's SuperNode
            "fleet": {**learning.fleet, "shares": self.fleet_shares,
                      "node": self.fleet_node() if self.fleet_node else None},
            "publish": self.publisher.status() if self.publisher else None,
            "uptime_s": time.time() - self.started_at,
        }

