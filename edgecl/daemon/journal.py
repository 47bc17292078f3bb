"""The journal: accepted samples and markers, durable and ordered, in SQLite (WAL mode).

Every sample and marker gets a sequence number that only increases (also across truncation).
A row is a chunk: a run of consecutive samples of one task from one request (seq = its first
sample's, `count` samples, labels and inputs as raw arrays), or one marker: one row per request,
not per sample, keeps reads and pages cheap. One writer thread commits whatever appends are
waiting as one transaction with `synchronous=FULL` (group commit: many requests per fsync under
load) and only then resolves their futures, so a caller acknowledges a sample only once it is on
disk. A torn write at a power cut is SQLite's to recover: a WAL commit that did not complete is
discarded whole when the database is opened.

Markers: END closes a task (the learner consolidates it there), FLUSH closes a partial batch,
LOST stands for `count` records that storage damage destroyed, REHEARSE has the learner take
the number of memory steps its `y` holds (idle rehearsal: journaled, so a replay repeats it),
FLEET has it take the fleet's aggregate stored under the sha256 in its `task`
(edgecl.daemon.fleet).
An end that says how many of the task's samples its sender had acknowledged waits, in the
writer, until that many have been journaled (from any transport), so it can never overtake
them; an end repeated with no sample of the task journaled since the last one is answered with
that one's seq, journaling nothing.
Likewise a request whose id (`Samples.request_id`) the journal holds is answered with its first
answer, `duplicate` set: ids are kept as long as the request's samples are (until a checkpoint
holds them and the journal before it is truncated). A numbered sender's message (`Samples.sender`)
numbered at or below the sender's last is answered `duplicate` with count 0; one beyond the next
adds the numbers skipped to the sender's `missing` (see `SenderCounts`). Both are committed with
the samples, so they survive restarts.

Damage: the last seq acknowledged is also kept outside SQLite, in `<journal>.last-seq` (written
and fsync'd after each commit, before its appends are answered): a journal that opens ending
before it lost committed transactions (SQLite drops every WAL frame from the first one that
fails its checksum on), and gets a LOST marker up to it; seqs never go back. Each row carries
a CRC-32 of its fields, checked on every read. At open, SQLite's
`quick_check` and every row's CRC are checked; a damaged journal is renamed `*.corrupt-<time>`,
logged, and replaced by what could be read of it: rows in seq order up to the first unreadable
one, a LOST marker in place of each row that fails its CRC and for the unreadable tail (as far
as the journal's last seq is still known). `Journal.damage` says what happened (status shows it).
A row that fails its CRC later, while running, raises `JournalCorrupt` from `read`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import struct
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecl.daemon.schema import SampleError, Samples, Sender

log = logging.getLogger("edgecl.learn")
SAMPLE, END, FLUSH, LOST, REHEARSE, FLEET = 0, 1, 2, 3, 4, 5
GROUP_MAX = 256  # appends committed together at most
COLUMNS = "seq, count, kind, task, y, x, crc"
SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    seq INTEGER PRIMARY KEY, count INTEGER NOT NULL, kind INTEGER NOT NULL,
    task TEXT NOT NULL, y BLOB, x BLOB, crc INTEGER);
CREATE TABLE IF NOT EXISTS tasks (name TEXT PRIMARY KEY, accepted INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ends (task TEXT PRIMARY KEY, seq INTEGER NOT NULL,
                                 accepted INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, first_seq INTEGER NOT NULL,
                                     count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS senders (name TEXT PRIMARY KEY, seq INTEGER NOT NULL,
                                    missing INTEGER NOT NULL, at INTEGER NOT NULL);
"""
MAX_SENDERS = 4096  # senders remembered; beyond, the one heard from least recently is dropped
WAL_LIMIT_BYTES = 4 << 20  # what the WAL file is cut back to after SQLite checkpoints it
END_POLL_S = 0.1  # how often the writer looks at waiting ends while nothing else arrives


@dataclass(frozen=True, eq=False)
class Chunk:
    """Samples seq .. seq + count - 1 of one task (`y` int64 [count], `x` float32
    [count, size]), or a marker (count 1, no x; a REHEARSE marker's `y` holds its steps)."""

    seq: int
    count: int
    kind: int
    task: str
    y: np.ndarray | None = None
    x: np.ndarray | None = None

    @property
    def last(self) -> int:
        return self.seq + self.count - 1


@dataclass(frozen=True)
class Appended:
    first_seq: int
    count: int
    duplicate: bool = False  # an end already journaled, answered again: nothing new was

    def answer(self) -> dict[str, int | bool]:
        """What ingest answers on every transport."""
        answer: dict[str, int | bool] = {"first_seq": self.first_seq, "count": self.count}
        return {**answer, "duplicate": True} if self.duplicate else answer


@dataclass(frozen=True)
class LastEnd:
    """A task's latest END marker and how many of its samples had been journaled then."""

    seq: int
    accepted: int


@dataclass(frozen=True)
class SenderState:
    """A numbered sender's last message number, the numbers it skipped, and the journal seq
    when it was last heard from."""

    seq: int
    missing: int
    at: int


class LastSeqFile:
    """The last seq acknowledged, kept beside the journal outside SQLite: 8 bytes and their
    CRC-32, rewritten in place and fsync'd after each commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)

    def read(self) -> int | None:
        """The seq written last; None when none was (or the file is damaged: logged)."""
        data = os.pread(self._fd, 12, 0)
        if not data:
            return None
        if len(data) == 12 and zlib.crc32(data[:8]) == struct.unpack("<I", data[8:])[0]:
            return struct.unpack("<q", data[:8])[0]
        log.error("%s is damaged: the journal's last acknowledged seq is unknown", self.path)
        return None

    def write(self, seq: int) -> None:
        head = struct.pack("<q", seq)
        os.pwrite(self._fd, head + struct.pack("<I", zlib.crc32(head)), 0)
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Append:
    def __init__(self, kind: int, samples: Samples | None, task: str | None,
                 expected: int | None = None, wait_s: float = 0.0, steps: int = 0) -> None:
        self.kind, self.samples, self.task = kind, samples, task
        self.expected = expected  # an END: the task's samples to journal first
        self.steps = steps  # a REHEARSE marker's memory steps
        self.deadline = time.monotonic() + wait_s
        self.future: Future[Appended] = Future()


def crc(seq: int, count: int, kind: int, task: str, y: bytes | None, x: bytes | None) -> int:
    """The CRC-32 of a row's fields: a flipped bit anywhere in them changes it."""
    head = struct.pack("<qqq", seq, count, kind) + task.encode()
    return zlib.crc32(x or b"", zlib.crc32(y or b"", zlib.crc32(head)))


def _row(seq: int, count: int, kind: int, task: str, y: bytes | None = None,
         x: bytes | None = None) -> tuple:
    return seq, count, kind, task, y, x, crc(seq, count, kind, task, y, x)


def _intact(row: tuple) -> bool:
    """The row's CRC matches (rows written before CRCs existed have none to check)."""
    return row[6] is None or row[6] == crc(*row[:6])


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")  # the reader's truncation waits for the writer
    # Debian builds SQLite to overwrite every page a DELETE frees, through the WAL: truncating
    # the journal would take as much free space as it gives back, and a full disk has none
    conn.execute("PRAGMA secure_delete=FAST")
    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")  # the WAL shrinks back to it
    return conn


class Journal:
    """Append (any thread) and read (one reader thread) the records of `path`."""

    def __init__(self, path: Path, max_tasks: int) -> None:
        self.path = path
        self.max_tasks = max_tasks
        self.damage: dict[str, object] | None = None  # what a damaged journal lost, if it was
        self.failures = 0  # commits refused by storage (a full disk, I/O errors) since start
        self.last_error: str | None = None  # the latest of them, until a commit succeeds
        problem = _check(path) if path.exists() else None
        if problem is not None:
            self.damage = salvage(path, problem)
        self._writer_db = connect(path)
        self._writer_db.executescript(SCHEMA)
        self._identity = _identity(path)  # the file every commit must still be going into
        self.gone: str | None = None  # why the journal's file is no longer ours, once it is not
        if "crc" not in {r[1] for r in self._writer_db.execute("PRAGMA table_info(chunks)")}:
            self._writer_db.execute("ALTER TABLE chunks ADD COLUMN crc INTEGER")  # older journal
        self._reader_db = connect(path)
        self._lock = threading.Condition()
        self._last_seq = self._meta("last_seq")
        self._last_seq_file = LastSeqFile(path.with_name(path.name + ".last-seq"))
        self._check_last_seq(self._last_seq_file.read())
        row = self._writer_db.execute("SELECT max(count) FROM chunks").fetchone()
        self.max_chunk = max(1, row[0] or 1)  # the longest chunk kept: bounds read queries
        self.accepted = dict(self._writer_db.execute("SELECT name, accepted FROM tasks"))
        self.ended = {task: LastEnd(seq, n) for task, seq, n
                      in self._writer_db.execute("SELECT task, seq, accepted FROM ends")}
        self._waiting: list[_Append] = []  # ends waiting for their samples (writer thread)
        self.requests = {key: (first, count) for key, first, count
                         in self._writer_db.execute("SELECT id, first_seq, count FROM requests")}
        self.senders = {name: SenderState(seq, missing, at) for name, seq, missing, at
                        in self._writer_db.execute("SELECT name, seq, missing, at FROM senders")}
        self.missing = self._meta("missing")  # message numbers senders skipped, ever
        self.duplicates = 0  # requests answered as already journaled, since start
        self._queue: queue.Queue[_Append | None] = queue.Queue()
        self._thread = threading.Thread(target=self._write_loop, name="edgecl-journal",
                                        daemon=True)
        self._thread.start()

    def _meta(self, key: str) -> int:
        row = self._writer_db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def _check_last_seq(self, acknowledged: int | None) -> None:
        """Mark as LOST what was acknowledged beyond the journal's end (lost WAL frames)."""
        if acknowledged is None or acknowledged <= self._last_seq:
            return
        lost = acknowledged - self._last_seq
        problem = (f"the journal ends at seq {self._last_seq:,} but seqs up to "
                   f"{acknowledged:,} were acknowledged (committed transactions are gone)")
        log.error("journal %s: %s: %d record(s) lost", self.path, problem, lost)
        db = self._writer_db
        db.execute("BEGIN IMMEDIATE")
        db.execute(f"INSERT INTO chunks ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   _row(self._last_seq + 1, lost, LOST, ""))
        db.execute("INSERT INTO meta (key, value) VALUES ('last_seq', ?) ON CONFLICT(key) "
                   "DO UPDATE SET value = excluded.value", (acknowledged,))
        db.execute("COMMIT")
        self._last_seq = acknowledged
        earlier = self.damage or {}
        self.damage = {**earlier, "problem": "; ".join(filter(None, [earlier.get("problem"),
                                                                      problem])),
                       "lost_records": int(earlier.get("lost_records", 0)) + lost}

    # --- writing ---------------------------------------------------------------------------
    def append(self, samples: Samples) -> Future[Appended]:
        """Journal `samples`; the future resolves once they are durable. A request naming a
        task beyond `max_tasks` fails (SampleError 409) and journals nothing."""
        return self._submit(_Append(SAMPLE, samples, None))

    def append_marker(self, kind: int, task: str) -> Future[Appended]:
        return self._submit(_Append(kind, None, task))

    def append_aggregate(self, sha256: str) -> Future[Appended]:
        """A FLEET marker: the learner takes the aggregate stored under `sha256`."""
        return self._submit(_Append(FLEET, None, sha256))

    def append_rehearsal(self, steps: int) -> Future[Appended]:
        """A REHEARSE marker: `steps` memory steps for the learner, where it reads it."""
        return self._submit(_Append(REHEARSE, None, "", steps=steps))

    def append_end(self, task: str, expected: int | None, wait_s: float) -> Future[Appended]:
        """Journal the end of `task` once `expected` of its samples (all it ever had, None: no
        condition) are journaled, waiting for them at most `wait_s` (then SampleError 409).
        An unknown task with nothing to wait for: SampleError 404. A repeated end (no sample
        of the task since the last) resolves to the last one's seq, `duplicate` set."""
        return self._submit(_Append(END, None, task, expected, wait_s))

    def _submit(self, item: _Append) -> Future[Appended]:
        self._queue.put(item)
        return item.future

    def _write_loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=END_POLL_S if self._waiting else None)
            except queue.Empty:
                self._commit([])  # nothing arrived: expire the ends that waited too long
                continue
            if first is None:
                break
            group = [first]
            while len(group) < GROUP_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this group
                    break
                group.append(item)
            self._commit(group)
        self._writer_db.close()

    def _commit(self, group: list[_Append]) -> None:
        state = _Pending(self._last_seq, dict(self.accepted), dict(self.ended), self.missing)
        for item in group:
            try:
                if item.kind == END:
                    self._end(item, state)
                elif self._repeated(item, state) or self._resent(item, state):
                    continue
                else:
                    new_rows, counts = self._rows(item, state.seq, state.accepted)
                    for task, n in counts.items():
                        state.accepted[task] = state.accepted.get(task, 0) + n
                    state.add(item, new_rows)
            except SampleError as e:
                state.done.append((item, e))
        self._settle_waiting(state)
        if state.rows and self._still_ours(state):
            self._write(state)
        for item, result in state.done:
            if isinstance(result, Appended) and result.duplicate:
                self.duplicates += 1
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _repeated(self, item: _Append, state: _Pending) -> bool:
        """Answer a request journaled before under the same id with that first answer."""
        key = item.samples.request_id if item.samples is not None else None
        if key is None:
            return False
        first = state.requests.get(key) or self.requests.get(key)
        if first is None:
            return False
        state.done.append((item, Appended(*first, duplicate=True)))
        return True

    def _resent(self, item: _Append, state: _Pending) -> bool:
        """A numbered sender's message at or below its last number: answered as a duplicate.
        Otherwise its number becomes the sender's last (the numbers skipped: missing)."""
        sender = item.samples.sender if item.samples is not None else None
        if sender is None:
            return False
        last = state.senders.get(sender.name) or self.senders.get(sender.name)
        if last is not None and sender.seq <= last.seq:
            state.done.append((item, Appended(state.seq + 1, 0, duplicate=True)))
            return True
        state.number(sender, last)
        return False

    def _end(self, item: _Append, state: _Pending) -> None:
        """Journal an END now, answer it as a duplicate, or let it wait for its samples."""
        task, have = item.task or "", state.accepted.get(item.task or "", 0)
        last = state.ended.get(task)
        if last is not None and last.accepted == have and (item.expected or 0) <= have:
            state.done.append((item, Appended(last.seq, 1, duplicate=True)))
        elif item.expected is not None and have < item.expected:
            self._waiting.append(item)
        elif task not in state.accepted:
            raise SampleError(f"unknown task {task!r}: no sample of it was accepted", 404)
        else:
            state.add_end(item)

    def _settle_waiting(self, state: _Pending) -> None:
        """Journal the waiting ends whose samples are all in; refuse those out of time."""
        now, still = time.monotonic(), []
        for item in self._waiting:
            have = state.accepted.get(item.task or "", 0)
            if have >= (item.expected or 0):
                self._end(item, state)
            elif now >= item.deadline:
                state.done.append((item, SampleError(
                    f"end of {item.task!r}: {have:,} of the {item.expected:,} samples its sender "
                    "had acknowledged were journaled in time; the end was not: send the missing "
                    "ones and end the task again", 409)))
            else:
                still.append(item)
        self._waiting = still

    def _still_ours(self, state: _Pending) -> bool:
        """Whether the journal's path still names the file being written; once it does not
        (the state dir removed, or the file replaced), every append is refused for good: a
        commit into an unlinked file would acknowledge samples nobody will ever read."""
        if self.gone is None and _identity(self.path) != self._identity:
            self.gone = (f"{self.path} was removed or replaced while edgecl learn ran; ingest "
                         "stopped: restart edgecl learn")
            log.error("%s", self.gone)
        if self.gone is None:
            return True
        state.done = [(item, JournalGone(self.gone) if isinstance(r, Appended) and not r.duplicate
                       else r) for item, r in state.done]
        return False

    def _write(self, state: _Pending) -> None:
        """Commit `state`'s rows; on a storage error, every append in it is refused."""
        try:
            db = self._writer_db
            db.execute("BEGIN IMMEDIATE")
            db.executemany(f"INSERT INTO chunks ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           state.rows)
            db.executemany("INSERT INTO tasks (name, accepted) VALUES (?, ?) ON CONFLICT(name) "
                           "DO UPDATE SET accepted = excluded.accepted", state.accepted.items())
            db.executemany("INSERT INTO requests (id, first_seq, count) VALUES (?, ?, ?)",
                           [(k, *v) for k, v in state.requests.items()])
            db.executemany("INSERT INTO ends (task, seq, accepted) VALUES (?, ?, ?) "
                           "ON CONFLICT(task) DO UPDATE SET seq = excluded.seq, "
                           "accepted = excluded.accepted",
                           [(t, e.seq, e.accepted) for t, e in state.ended.items()])
            forgotten = self._write_senders(state)
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) "
                           "DO UPDATE SET value = excluded.value",
                           [("last_seq", state.seq), ("missing", state.missing)])
            db.execute("COMMIT")
        except sqlite3.Error as e:
            log.error("journal write failed: %s", e)
            self.failures += 1
            self.last_error = str(e)
            if self._writer_db.in_transaction:
                self._writer_db.execute("ROLLBACK")
            refused = JournalError(f"the journal cannot be written ({e}); nothing was accepted")
            state.done = [(item, refused if isinstance(r, Appended) and not r.duplicate else r)
                          for item, r in state.done]
            return
        if self.last_error is not None:
            log.warning("the journal is writable again after %d failed commit(s)",
                        self.failures)
            self.last_error = None
        self._mark_acknowledged(state.seq)
        with self._lock:
            self._last_seq, self.accepted, self.ended = state.seq, state.accepted, state.ended
            self.requests.update(state.requests)
            self.senders.update(state.senders)
            for name in forgotten:
                del self.senders[name]
            self.missing = state.missing
            self.max_chunk = max([self.max_chunk, *(row[1] for row in state.rows)])
            self._lock.notify_all()

    def _mark_acknowledged(self, seq: int) -> None:
        """Record `seq` outside SQLite. The commit is durable whatever happens here: a failure
        only leaves the WAL loss it would detect undetected, so it is logged, not refused."""
        try:
            self._last_seq_file.write(seq)
        except OSError as e:
            self.last_error = f"cannot record the last seq in {self._last_seq_file.path}: {e}"
            log.error("%s", self.last_error)

    def _write_senders(self, state: _Pending) -> list[str]:
        """Write the senders heard from; forget the least recently heard beyond MAX_SENDERS.
        Returns those forgotten."""
        if not state.senders:
            return []
        self._writer_db.executemany(
            "INSERT INTO senders (name, seq, missing, at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET seq = excluded.seq, missing = excluded.missing, "
            "at = excluded.at", [(n, s.seq, s.missing, s.at) for n, s in state.senders.items()])
        new = sum(name not in self.senders for name in state.senders)
        excess = len(self.senders) + new - MAX_SENDERS
        if excess <= 0:  # the usual case: no copy of every sender on each commit
            return []
        known = {**self.senders, **state.senders}
        forgotten = sorted(known, key=lambda n: known[n].at)[:excess]
        self._writer_db.executemany("DELETE FROM senders WHERE name = ?",
                                    [(n,) for n in forgotten])
        return forgotten

    def _rows(self, item: _Append, seq: int, accepted: dict[str, int]
              ) -> tuple[list[tuple], dict[str, int]]:
        """The item's rows from seq + 1 on: one per run of one task's samples, or the marker."""
        if item.samples is None:
            steps = np.int64([item.steps]).astype("<i8").tobytes() if item.kind == REHEARSE \
                else None
            return [_row(seq + 1, 1, item.kind, item.task or "", steps)], {}
        s = item.samples
        counts: dict[str, int] = {}
        for task in s.tasks:
            counts[task] = counts.get(task, 0) + 1
        new = [t for t in counts if t not in accepted]
        if len(accepted) + len(new) > self.max_tasks:
            raise SampleError(f"task {new[0]!r} would be task number {len(accepted) + 1}, beyond "
                              f"max_tasks={self.max_tasks}", 409)
        x = np.ascontiguousarray(s.x, dtype="<f4").reshape(len(s), -1)
        y = np.ascontiguousarray(s.y, dtype="<i8")
        rows = []
        for start, end in _runs(s.tasks):
            rows.append(_row(seq + 1 + start, end - start, SAMPLE, s.tasks[start],
                             y[start:end].tobytes(), x[start:end].tobytes()))
        return rows, counts

    @property
    def ends_waiting(self) -> int:
        """Ends of task held until the samples their senders had acknowledged are in."""
        return len(self._waiting)

    # --- reading ---------------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        return self._last_seq

    def wait(self, after_seq: int, timeout: float) -> bool:
        """Block until a record beyond `after_seq` is durable, or `timeout` passes."""
        with self._lock:
            return self._lock.wait_for(lambda: self._last_seq > after_seq, timeout)

    def read(self, after_seq: int, limit: int) -> list[Chunk]:
        """Up to `limit` chunks holding seqs after `after_seq`, in order (the reader thread
        only); the first may start before `after_seq`. A row failing its CRC: JournalCorrupt
        (a restart salvages the journal)."""
        rows = self._reader_db.execute(
            f"SELECT {COLUMNS} FROM chunks "
            "WHERE seq > ? AND seq + count - 1 > ? ORDER BY seq LIMIT ?",
            (after_seq - self.max_chunk, after_seq, limit)).fetchall()
        for row in rows:
            if not _intact(row):
                raise JournalCorrupt(f"{self.path}: record {row[0]} fails its CRC; restart "
                                     "edgecl learn to salvage the journal")
        return [_chunk(*row[:6]) for row in rows]

    def skip_to(self, seq: int) -> None:
        """Number new records after `seq` at least: a checkpoint may hold records that a
        damaged journal no longer knows of."""
        if seq > self._last_seq:
            self._writer_db.execute("INSERT INTO meta (key, value) VALUES ('last_seq', ?) "
                                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                                    (seq,))
            self._last_seq_file.write(seq)
            with self._lock:
                self._last_seq = seq

    def marker_tasks(self, kind: int) -> set[str]:
        """The `task` field of every marker of `kind` kept (a FLEET marker's: a sha256)."""
        return {row[0] for row in self._reader_db.execute(
            "SELECT task FROM chunks WHERE kind = ?", (kind,))}

    def first_seq(self) -> int:
        """The oldest seq kept (last_seq + 1 when none is)."""
        row = self._reader_db.execute("SELECT min(seq) FROM chunks").fetchone()
        return row[0] if row[0] is not None else self._last_seq + 1

    def truncate(self, through_seq: int) -> None:
        """Drop the chunks whose seqs all lie at or before `through_seq` (a checkpoint holds
        their effect)."""
        try:
            self._reader_db.execute("DELETE FROM chunks WHERE seq + count - 1 <= ?",
                                    (through_seq,))
            self._reader_db.execute("DELETE FROM requests WHERE first_seq + count - 1 <= ?",
                                    (through_seq,))
            with self._lock:
                self.requests = {k: v for k, v in self.requests.items()
                                 if v[0] + v[1] - 1 > through_seq}
        except sqlite3.Error as e:  # a full disk: the next checkpoint truncates again
            raise JournalError(f"cannot truncate the journal: {e}") from None

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._reader_db.close()
        self._last_seq_file.close()


@dataclass
class _Pending:
    """One commit in the making: the rows, counts and answers it will make durable."""

    seq: int
    accepted: dict[str, int]
    ended: dict[str, LastEnd]
    missing: int
    requests: dict[str, tuple[int, int]] = field(default_factory=dict)  # new request ids
    senders: dict[str, SenderState] = field(default_factory=dict)  # senders heard from
    rows: list[tuple] = field(default_factory=list)
    done: list[tuple[_Append, Appended | Exception]] = field(default_factory=list)

    def add(self, item: _Append, rows: list[tuple]) -> None:
        count = sum(row[1] for row in rows)
        self.done.append((item, Appended(self.seq + 1, count)))
        if item.samples is not None and item.samples.request_id is not None:
            self.requests[item.samples.request_id] = (self.seq + 1, count)
        self.rows.extend(rows)
        self.seq += count

    def number(self, sender: Sender, last: SenderState | None) -> None:
        """`sender` is heard from; the numbers it skipped since `last` are missing (all below
        its number when it is new: senders number their messages from 1)."""
        skipped = sender.seq - 1 - (last.seq if last else 0)
        if skipped:
            log.warning("sender %s: message %d follows %d: %d message(s) missing (dropped on "
                        "the way, or refused)", sender.name, sender.seq,
                        last.seq if last else 0, skipped)
        self.missing += skipped
        self.senders[sender.name] = SenderState(sender.seq, (last.missing if last else 0)
                                                + skipped, self.seq)

    def add_end(self, item: _Append) -> None:
        task = item.task or ""
        self.add(item, [_row(self.seq + 1, 1, END, task)])
        self.ended[task] = LastEnd(self.seq, self.accepted.get(task, 0))


def _runs(tasks: list[str]) -> list[tuple[int, int]]:
    """[start, end) of each run of equal consecutive task ids."""
    starts = [i for i in range(len(tasks)) if i == 0 or tasks[i] != tasks[i - 1]]
    return list(zip(starts, [*starts[1:], len(tasks)], strict=True))


def _chunk(seq: int, count: int, kind: int, task: str, y: bytes | None, x: bytes | None
           ) -> Chunk:
    if kind == REHEARSE:
        return Chunk(seq, count, kind, task, np.frombuffer(y, dtype="<i8"))
    if kind != SAMPLE:
        return Chunk(seq, count, kind, task)
    # writable copies (bytearray): torch takes views of them without a warning
    return Chunk(seq, count, kind, task, np.frombuffer(bytearray(y), dtype="<i8"),
                 np.frombuffer(bytearray(x), dtype="<f4").reshape(count, -1))


JOURNAL_RETRY_S = 5  # what ingest tells a client to wait after a JournalError


class JournalError(OSError):
    """The journal could not be written (disk full, I/O error): nothing was accepted."""


class JournalGone(JournalError):
    """The journal's file was removed or replaced under the daemon: nothing is accepted again."""


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None when there is none."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


class JournalCorrupt(Exception):
    """A journal record failed its CRC while running."""


def _check(path: Path) -> str | None:
    """What is wrong with the journal at `path`, or None when SQLite's quick_check and every
    row's CRC pass."""
    try:
        db = sqlite3.connect(path)
        try:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                return f"SQLite quick_check: {verdict}"
            if "crc" not in {r[1] for r in db.execute("PRAGMA table_info(chunks)")}:
                return None  # a journal from before CRCs: nothing more to check
            for row in db.execute(f"SELECT {COLUMNS} FROM chunks ORDER BY seq"):
                if not _intact(row):
                    return f"record {row[0]} fails its CRC"
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        return f"SQLite: {e}"
    return None


def salvage(path: Path, problem: str) -> dict[str, object]:
    """Replace the damaged journal at `path` by what can be read of it (see the module's
    docstring); the damaged files are kept beside it. Returns what was lost."""
    rows, tasks, last_seq = _readable(path)
    moved = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        damaged = path.with_name(path.name + suffix)
        if damaged.exists():
            damaged.rename(moved.with_name(moved.name + suffix))
    fixed, end = [], (rows[0][0] - 1 if rows else 0)
    for row in rows:  # a row failing its CRC becomes part of the LOST span before the next
        if not _intact(row) or row[0] <= end:
            continue
        if row[0] > end + 1:
            fixed.append(_row(end + 1, row[0] - 1 - end, LOST, ""))
        fixed.append(_row(*row[:6]))
        end = row[0] + row[1] - 1
    if last_seq is not None and last_seq > end:
        fixed.append(_row(end + 1, last_seq - end, LOST, ""))
        end = last_seq
    lost = sum(row[1] for row in fixed if row[2] == LOST)
    db = connect(path)
    db.executescript(SCHEMA)
    db.execute("BEGIN IMMEDIATE")
    db.executemany(f"INSERT INTO chunks ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", fixed)
    db.executemany("INSERT INTO tasks (name, accepted) VALUES (?, ?)", tasks.items())
    db.execute("INSERT INTO meta (key, value) VALUES ('last_seq', ?)", (end,))
    db.execute("COMMIT")
    db.close()
    damage = {"problem": problem, "moved_to": moved.name, "lost_records": lost,
              "last_seq_known": last_seq is not None}
    log.error("journal %s is damaged (%s): kept what could be read, %d record(s) lost%s; the "
              "damaged file is %s", path, problem, lost,
              "" if last_seq is not None else " (and its last seq is unknown)", moved.name)
    return damage


def _readable(path: Path) -> tuple[list[tuple], dict[str, int], int | None]:
    """A damaged journal's rows in seq order up to the first unreadable one, its per-task
    accepted counts (recounted from the rows when unreadable) and its last seq (None when
    unreadable)."""
    rows: list[tuple] = []
    tasks: dict[str, int] | None = None
    last_seq = None
    db = sqlite3.connect(path)
    # a file shorter than its header says is refused whole, unless so: read what is there
    db.execute("PRAGMA writable_schema=ON")
    try:
        with contextlib.suppress(sqlite3.DatabaseError):
            row = db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
            last_seq = row[0] if row else 0
        with contextlib.suppress(sqlite3.DatabaseError):
            tasks = dict(db.execute("SELECT name, accepted FROM tasks"))
        with contextlib.suppress(sqlite3.DatabaseError):
            columns = COLUMNS if "crc" in {r[1] for r in db.execute(
                "PRAGMA table_info(chunks)")} else COLUMNS.replace("crc", "NULL")
            for row in db.execute(f"SELECT {columns} FROM chunks ORDER BY seq"):
                rows.append(row)
    finally:
        db.close()
    if tasks is None:
        tasks = {}
        for row in rows:
            if row[2] == SAMPLE and _intact(row):
                tasks[row[3]] = tasks.get(row[3], 0) + row[1]
    return rows, tasks, last_seq
