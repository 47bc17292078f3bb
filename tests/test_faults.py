"""Storage faults under `edgecl learn`: a journal whose file lost its tail or had a bit flipped,
and a full disk. Each is detected, logged, shown in /v1/status, and recovered from; no sample
acknowledged and still on disk is lost, and what damage destroyed is counted, not hidden.
(A corrupt newest checkpoint: test_learn_daemon.py; a corrupt newest model version under
`edgecl serve`: test_serve.py.)"""

import contextlib
import errno
import logging
import re
import stat
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import orjson
from conftest import small_tmpfs
from learn_helpers import call, records, running, stream_config, task_samples, wait_learned

from edgecl.config import Config
from edgecl.daemon.daemon import Daemon
from edgecl.daemon.journal import LOST, SAMPLE, Journal
from edgecl.daemon.schema import BINARY_TYPE
from edgecl.setup import build_config

REQUESTS, PER_REQUEST = 12, 200  # 6 kB a request: rows span many pages


def post(server, task: str, n: int, index: int = 0):
    x, y = task_samples(index, n, seed=n)
    return call(server, "POST", "/v1/samples", {"samples": records(task, x, y)})


def post_retrying(server, task: str, n: int, index: int = 0, timeout_s: float = 60.0):
    """`post`, sent again after each 507 (a full disk) until accepted or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while (answer := post(server, task, n, index))[0] == 507 and time.monotonic() < deadline:
        time.sleep(0.05)
    return answer


def journal_unlearned(tmp_path) -> tuple[Daemon, list[bytes]]:
    """A daemon's state dir whose journal holds REQUESTS requests the learner never took (it
    did not run); returns the stopped daemon and each request's journaled x bytes."""
    daemon = Daemon(stream_config(), tmp_path / "state")
    with running(daemon, start=False) as server:
        for i in range(REQUESTS):
            assert post(server, "a", PER_REQUEST, i)[0] == 202
    journal = Journal(tmp_path / "state" / "journal.sqlite3", 3)
    xs = [c.x.tobytes() for c in journal.read(0, 1000)]
    journal.close()  # the last connection: SQLite moves the WAL into the main file
    assert len(xs) == REQUESTS
    return daemon, xs


def restarted(tmp_path, caplog) -> Daemon:
    with caplog.at_level(logging.ERROR, logger="edgecl.learn"):
        daemon = Daemon(stream_config(), tmp_path / "state")
    assert "journal" in caplog.text and "damaged" in caplog.text
    return daemon


def check_recovered(daemon: Daemon, tmp_path, learned: int, lost: int) -> None:
    """Status tells the damage; the kept samples are learned, the lost ones counted, and new
    samples are accepted and learned."""
    damage = daemon.status()["journal"]["damage"]
    assert damage["lost_records"] == lost
    assert (tmp_path / "state" / damage["moved_to"]).exists()
    with running(daemon) as server:
        wait_learned(daemon, learned)
        assert post(server, "b", 8)[0] == 202
        wait_learned(daemon, learned + 8)
        status = call(server, "GET", "/v1/status")[1]
        metrics = call(server, "GET", "/metrics")[1]
    assert status["lost"] == lost and status["learned"] == learned + 8
    assert f"edgecl_learn_lost_total {float(lost)}" in metrics
    assert status["journal"]["damage"] == damage


def test_a_journal_file_cut_short_keeps_what_is_readable_and_counts_the_rest(tmp_path, caplog):
    _, xs = journal_unlearned(tmp_path)
    path = tmp_path / "state" / "journal.sqlite3"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3 // 4096 * 4096])  # a tail of whole pages gone
    daemon = restarted(tmp_path, caplog)
    chunks = daemon.journal.read(0, 1000)
    samples = [c for c in chunks if c.kind == SAMPLE]
    assert 0 < len(samples) < REQUESTS
    assert [c.x.tobytes() for c in samples] == xs[:len(samples)]  # a prefix, intact
    assert chunks[-1].kind == LOST and chunks[-1].last == REQUESTS * PER_REQUEST
    lost = (REQUESTS - len(samples)) * PER_REQUEST
    check_recovered(daemon, tmp_path, len(samples) * PER_REQUEST, lost)


def test_a_bit_flipped_journal_record_becomes_a_lost_gap_and_the_rest_is_kept(tmp_path,
                                                                                  caplog):
    _, xs = journal_unlearned(tmp_path)
    path = tmp_path / "state" / "journal.sqlite3"
    data = bytearray(path.read_bytes())
    at = data.find(xs[-2][:256])  # the second newest request's samples (their first page)
    assert at > 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))
    daemon = restarted(tmp_path, caplog)
    assert "CRC" in daemon.journal.damage["problem"]
    chunks = daemon.journal.read(0, 1000)
    assert [c.kind for c in chunks[-2:]] == [LOST, SAMPLE]
    assert [c.x.tobytes() for c in chunks if c.kind == SAMPLE] == xs[:-2] + xs[-1:]
    check_recovered(daemon, tmp_path, (REQUESTS - 1) * PER_REQUEST, PER_REQUEST)


def fill(folder) -> None:
    """Write a file in `folder` until its filesystem is full."""
    # unbuffered: a buffered file keeps the bytes a full disk refused, and raises ENOSPC again
    # when it is closed, outside this loop (how this test failed now and then)
    with (folder / f"filler-{uuid.uuid4().hex}").open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_a_full_disk_is_refused_with_507_until_space_returns_and_nothing_is_lost(tmp_path):
    with small_tmpfs(tmp_path / "disk", "8m") as disk:
        daemon = Daemon(stream_config(checkpoint_every=40, keep_checkpoints=100), disk / "state")
        acked = 0
        with running(daemon) as server:
            assert post(server, "a", 40)[0] == 202
            acked += 40
            with learner_held(daemon):  # no checkpoint makes room meanwhile: the journal's 507
                fill(disk)
                answers = []
                for i in range(200):  # the WAL's free pages may still take a few
                    status, body, response = post(server, "a", 40, i)
                    answers.append(status)
                    if status == 202:
                        acked += 40
                    else:
                        break
                assert status == 507, answers
                assert "disk is full" in body["error"] and response.getheader("Retry-After")
                state = call(server, "GET", "/v1/status")[1]
                assert state["journal"]["write_failures"] >= 1
                assert "full" in state["journal"]["last_error"]
                metrics = call(server, "GET", "/metrics")[1]
                assert re.search(r"^edgecl_learn_journal_write_failures_total [1-9]", metrics,
                                 re.M)
            for filler in disk.glob("filler-*"):
                filler.unlink()
            for i in range(3):  # a 507 may still come while a checkpoint makes room
                assert post_retrying(server, "a", 40, 100 + i)[0] == 202
                acked += 40
            wait_learned(daemon, acked)
            state = call(server, "GET", "/v1/status")[1]
        assert state["accepted"] == state["learned"] == acked and state["lost"] == 0
        assert state["journal"]["last_error"] is None
        journal = Journal(disk / "state" / "journal.sqlite3", 3)
        journal.close()
        assert journal.accepted == {"a": acked}  # exactly the acknowledged ones, none refused


WIDE = 1000  # floats a sample: 4 kB, so that a few thousand fill a small disk


def wide_config(**learn) -> Config:
    return build_config({
        "seed": 0, "device": "cpu", "net": {"name": "mlp", "hidden": [4]},
        "memory": {"per_task": 8}, "method": {"name": "finetune"},
        "stream": {"input_shape": [WIDE], "classes": ["a", "b"], "head": "shared",
                   "max_tasks": 2, "batch_size": 10},
        "learn": learn})


def post_wide(server, n: int = 50):
    header = orjson.dumps({"task": "a", "y": [0, 1] * (n // 2)}) + b"\n"
    x = np.random.default_rng(n).random((n, WIDE), dtype=np.float32)
    return call(server, "POST", "/v1/samples", header + x.tobytes(),
                {"Content-Type": BINARY_TYPE})


@contextlib.contextmanager
def learner_held(daemon: Daemon) -> Iterator[None]:
    """The learning thread waits (nothing is learned, checkpointed or truncated) until the
    block ends; the block begins once it waits, so a step or checkpoint it was taking is done."""
    waiting, release = threading.Event(), threading.Event()

    def hold() -> None:
        waiting.set()
        release.wait()

    daemon.call(hold)
    try:
        assert waiting.wait(60), "the learning thread did not stop to wait"
        yield
    finally:
        release.set()


def test_a_journal_that_fills_its_disk_recovers_by_itself_and_loses_nothing(tmp_path, caplog):
    """The journal alone fills the state dir's disk (a real 16 MB tmpfs) while the learner
    waits: ingest answers 507. With no one freeing space, the daemon checkpoints in the room of
    its space reserve and truncates the journal, and samples are accepted again; every one
    acknowledged is learned."""
    with small_tmpfs(tmp_path / "disk", "16m") as disk, \
            caplog.at_level(logging.INFO, logger="edgecl.learn"):
        daemon = Daemon(wide_config(checkpoint_every=100, checkpoint_seconds=0.2), disk / "state")
        assert daemon.status()["disk"]["reserve_bytes"] > 0
        acked = 0
        with running(daemon) as server:
            with learner_held(daemon):
                while (answer := post_wide(server))[0] == 202:
                    acked += 50
                assert answer[0] == 507 and "disk is full" in answer[1]["error"]
                full_at = daemon.journal.last_seq
            deadline = time.monotonic() + 120
            while (answer := post_wide(server))[0] != 202:
                assert answer[0] == 507 and time.monotonic() < deadline, answer
                time.sleep(0.05)
            acked += 50
            wait_learned(daemon, acked)
            state = call(server, "GET", "/v1/status")[1]
            metrics = call(server, "GET", "/metrics")[1]
        assert state["accepted"] == state["learned"] == acked and state["lost"] == 0
        assert state["last_checkpoint"]["offset"] >= full_at  # so the journal was truncated
        assert state["checkpoint_failures"] == 0 and state["disk"]["reserve_used"] >= 1
        assert re.search(r"^edgecl_learn_disk_reserve_used_total [1-9]", metrics, re.M)
        assert "reserve used" in caplog.text


def test_a_checkpoint_on_a_full_disk_is_written_in_the_space_reserve(tmp_path):
    """The reserve (0600) is given up for a checkpoint that finds the disk full, only that
    checkpoint is kept, and the reserve is held again once there is room."""
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        daemon = Daemon(wide_config(keep_checkpoints=3), disk / "state")
        reserve = disk / "state" / "reserve"
        assert stat.S_IMODE(reserve.stat().st_mode) == 0o600
        assert daemon.status()["disk"] == {"reserve_bytes": reserve.stat().st_size,
                                           "reserve_used": 0}
        with running(daemon) as server:
            assert post_wide(server)[0] == 202
            wait_learned(daemon, 50)
            fill(disk)
            assert call(server, "POST", "/v1/checkpoint")[0] == 200
            assert daemon.status()["disk"]["reserve_used"] == 1
            assert len(list((disk / "state" / "checkpoints").glob("ckpt-*"))) == 1
            for filler in disk.glob("filler-*"):
                filler.unlink()
            assert call(server, "POST", "/v1/checkpoint")[0] == 200
            state = call(server, "GET", "/v1/status")[1]
        assert state["disk"]["reserve_bytes"] == reserve.stat().st_size > 0
        assert state["checkpoint_failures"] == 0
