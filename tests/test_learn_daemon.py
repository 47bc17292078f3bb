"""The `edgecl learn` daemon in-process: HTTP ingest and control, backpressure, auth, the state
dir lock, checkpoints and their recovery, the unix socket."""

import os
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pytest
import torch
from conftest import small_tmpfs
from learn_helpers import (
    assert_same_state,
    call,
    records,
    running,
    stream_config,
    task_samples,
    wait_learned,
)

from edgecl.daemon.client import LearnClient
from edgecl.daemon.daemon import Daemon, DaemonError
from edgecl.daemon.journal import END, Journal
from edgecl.daemon.loop import HoldoutSet, replay
from edgecl.daemon.schema import BINARY_TYPE
from edgecl.daemon.unixsocket import SocketSource
from edgecl.setup import build_config, new_learner, stream_learner_spec, stream_schema


def post_task(server, task: str, n: int, index: int = 0):
    x, y = task_samples(index, n)
    return call(server, "POST", "/v1/samples", {"samples": records(task, x, y)})


def test_samples_are_acknowledged_learned_and_shown_in_status(tmp_path):
    daemon = Daemon(stream_config(), tmp_path / "state")
    with running(daemon) as server:
        status, ack, _ = post_task(server, "site-a", 60)
        assert (status, ack) == (202, {"first_seq": 1, "count": 60})
        x, y = task_samples(1, 40)
        ndjson = b"\n".join(orjson.dumps(r) for r in records("site-b", x, y))
        status, ack, _ = call(server, "POST", "/v1/samples", ndjson,
                              {"Content-Type": "application/x-ndjson"})
        assert (status, ack) == (202, {"first_seq": 61, "count": 40})
        header = orjson.dumps({"task": "site-b", "y": ["walk", "run"]})
        status, ack, _ = call(server, "POST", "/v1/samples",
                              header + b"\n" + x[:2].astype("<f4").tobytes(),
                              {"Content-Type": BINARY_TYPE})
        assert (status, ack) == (202, {"first_seq": 101, "count": 2})
        for task in ("site-a", "site-b"):
            assert call(server, "POST", f"/v1/tasks/{task}/end")[0] == 202
        wait_learned(daemon, 102)
        status, s, _ = call(server, "GET", "/v1/status")
        assert s["accepted"] == s["learned"] == 102 and s["journal"]["lag"] == 0
        assert s["trained"] + sum(t["held_out"] for t in s["tasks"].values()) == 102
        assert set(s["tasks"]) == {"site-a", "site-b"} and s["open_task"] is None
        for t in s["tasks"].values():  # learned right after its task, still known now
            assert t["accuracy_when_learned"] is not None and t["accuracy"] is not None
        assert s["tasks"]["site-a"]["accuracy_when_learned"] > 0.5  # a learnable task
        assert call(server, "GET", "/readyz")[0] == 200
        status, text, _ = call(server, "GET", "/metrics")
        assert status == 200 and "edgecl_learn_accepted_total 102.0" in text
        assert 'edgecl_learn_task_accuracy{task="site-a"}' in text
        assert call(server, "GET", "/openapi.json")[1]["paths"]["/v1/samples"]


def test_held_out_counts_can_be_read_while_the_learner_adds_tasks():
    """Status reads the held-out counts on the HTTP thread while the learning thread adds the
    first sample of a new task: reading must never see the task map change under it (it once
    answered /v1/status with a 500 when a task began during a poll)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    holdout = HoldoutSet(1, (1,), max_tasks=3000)
    x, y = np.zeros((1, 1), np.float32), np.zeros(1, np.int64)
    adder = threading.Thread(target=lambda: [holdout.add(f"t{i}", x, y) for i in range(3000)])
    reads = 0
    try:
        adder.start()
        while adder.is_alive():
            holdout.counts()
            reads += 1
    finally:
        adder.join()
        sys.setswitchinterval(interval)
    assert reads > 0 and holdout.counts() == {f"t{i}": 1 for i in range(3000)}


def test_a_bad_request_is_refused_whole_and_changes_nothing(tmp_path):
    daemon = Daemon(stream_config(), tmp_path / "state")
    with running(daemon) as server:
        post_task(server, "site-a", 8)
        wait_learned(daemon, 8)  # with the flush marker that closed the partial batch
        seq = daemon.journal.last_seq
        before = {k: v.clone() for k, v in daemon.learning.learner.net.state_dict().items()}
        x, y = task_samples(0, 3)
        bad = records("site-a", x, y)
        bad[2]["x"][1][1] = True
        status, body, _ = call(server, "POST", "/v1/samples", {"samples": bad})
        assert status == 400 and "samples[2].x" in body["error"] and "bool" in body["error"]
        assert call(server, "POST", "/v1/samples", b"{", {})[0] == 400
        assert call(server, "POST", "/v1/tasks/nope/end")[0] == 404
        for t in ("b", "c"):
            assert post_task(server, t, 1)[0] == 202
        status, body, _ = post_task(server, "d", 1)  # max_tasks is 3
        assert status == 409 and "max_tasks" in body["error"]
        time.sleep(0.2)
        s = daemon.status()
        assert s["accepted"] == 10 and s["rejected"] == 4 and daemon.journal.last_seq == seq + 2
        after = daemon.learning.learner.net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # b, c: 1 sample pending


def test_backpressure_answers_429_with_retry_after_and_accepts_nothing(tmp_path):
    daemon = Daemon(stream_config(max_lag=50), tmp_path / "state")
    with running(daemon, start=False) as server:  # no learning thread: the lag only grows
        assert post_task(server, "a", 51)[0] == 202
        status, body, response = post_task(server, "a", 1)
        assert status == 429 and response.getheader("Retry-After") == "1"
        assert "behind" in body["error"] and daemon.journal.last_seq == 51
        assert call(server, "GET", "/readyz")[0] == 503


def test_a_token_guards_every_endpoint_but_liveness(tmp_path):
    daemon = Daemon(stream_config(), tmp_path / "state")
    with running(daemon, token="s3cret") as server:
        assert call(server, "GET", "/healthz")[0] == 200
        for method, path in (("GET", "/v1/status"), ("GET", "/readyz"), ("GET", "/metrics"),
                             ("GET", "/openapi.json"), ("POST", "/v1/samples"),
                             ("POST", "/v1/checkpoint"), ("POST", "/v1/tasks/a/end")):
            assert call(server, method, path)[0] == 401, path
        ok = {"Authorization": "bearer s3cret"}
        assert call(server, "GET", "/v1/status", headers=ok)[0] == 200


def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path):
    first = Daemon(stream_config(), tmp_path / "state")
    try:
        with pytest.raises(DaemonError, match="another edgecl learn"):
            Daemon(stream_config(), tmp_path / "state")
    finally:
        first.stop()
    Daemon(stream_config(), tmp_path / "state").stop()  # free again once stopped


def test_a_state_dir_of_another_config_is_refused(tmp_path):
    Daemon(stream_config("finetune"), tmp_path / "state").stop()
    with pytest.raises(DaemonError, match="another config"):
        Daemon(stream_config("ewc"), tmp_path / "state")
    Daemon(stream_config("finetune"), tmp_path / "state").stop()  # the refusal let go the lock


def test_restart_restores_the_checkpoint_and_replays_the_journal(tmp_path):
    cfg = stream_config(keep_checkpoints=2)
    daemon = Daemon(cfg, tmp_path / "state")
    with running(daemon) as server:
        post_task(server, "a", 30)
        wait_learned(daemon, 28)
        assert call(server, "POST", "/v1/checkpoint")[0] == 200
        post_task(server, "a", 30)
        wait_learned(daemon, 58)
    # stop() checkpointed; a partial batch stays in the journal, after the offset
    again = Daemon(cfg, tmp_path / "state")
    try:
        assert again.learning.learned == daemon.learning.learned
        assert_same_state(again.learning.learner.state_dict(),
                          daemon.learning.learner.state_dict())
        checkpoints = sorted(p.name for p in (tmp_path / "state" / "checkpoints").iterdir())
        assert len(checkpoints) == 2  # keep_checkpoints
        assert again.journal.first_seq() > 1  # truncated up to the oldest kept checkpoint
    finally:
        again.stop()


def test_a_corrupt_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
    cfg = stream_config()
    daemon = Daemon(cfg, tmp_path / "state")
    with running(daemon) as server:
        post_task(server, "a", 40)
        wait_learned(daemon, 40)
        assert call(server, "POST", "/v1/tasks/a/end")[0] == 202
        wait_learned(daemon, 40)
    expected = daemon.learning.learner.state_dict()
    newest = sorted((tmp_path / "state" / "checkpoints").iterdir())[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    again = Daemon(cfg, tmp_path / "state")
    try:
        assert again.checkpoints.corrupt == 1
        assert newest.with_name(newest.name + ".corrupt").exists()
        assert again.status()["corrupt_checkpoints"] == 1
        again.start()
        wait_learned(again, 40)  # the older checkpoint + a longer replay: the same learner
        assert_same_state(again.learning.learner.state_dict(), expected)
    finally:
        again.stop()


def test_unix_socket_acks_each_line_and_is_private(tmp_path):
    daemon = Daemon(stream_config(), tmp_path / "state")
    path = tmp_path / "ingest.sock"
    source = SocketSource(daemon, path)
    source.start()
    daemon.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            reader = sock.makefile("rb")
            x, y = task_samples(0, 3)
            lines = [orjson.dumps(r) for r in records("a", x, y)]
            lines.append(orjson.dumps({"samples": records("a", x, y)}))
            lines.append(b'{"task": "a", "x": [1], "y": 0}')
            lines.append(b'{"end_task": "a"}')
            sock.sendall(b"\n".join(lines) + b"\n")
            answers = [orjson.loads(reader.readline()) for _ in lines]
        assert answers[:4] == [{"first_seq": 1, "count": 1}, {"first_seq": 2, "count": 1},
                               {"first_seq": 3, "count": 1}, {"first_seq": 4, "count": 3}]
        assert answers[4]["status"] == 400 and "sample.x" in answers[4]["error"]
        assert answers[5] == {"first_seq": 7, "count": 1}
        wait_learned(daemon, 6)
        assert daemon.status()["accepted"] == 6
    finally:
        source.stop()
        daemon.stop()
    assert not path.exists()


def test_a_full_disk_is_a_507_that_accepts_nothing_and_passes(tmp_path):
    """The state dir on a 3 MB tmpfs: ingest fills it, gets 507s that accept nothing, learning
    and the daemon go on; once there is room again, samples are accepted again."""
    with small_tmpfs(tmp_path / "disk", "3m") as disk:
        cfg = build_config({
            "seed": 0, "device": "cpu", "net": {"name": "mlp", "hidden": [4]},
            "method": {"name": "finetune"},
            "stream": {"input_shape": [1000], "classes": ["a", "b"], "head": "shared",
                       "max_tasks": 2, "batch_size": 10},
            "learn": {"checkpoint_every": 100}})
        daemon = Daemon(cfg, disk / "state")
        with running(daemon) as server:
            x = np.ones((50, 1000), dtype=np.float32)
            header = orjson.dumps({"task": "a", "y": [0] * 50}) + b"\n"
            statuses = []
            for _ in range(40):  # 200 KB a request: the disk is full well before the end
                status, body, _ = call(server, "POST", "/v1/samples", header + x.tobytes(),
                                       {"Content-Type": BINARY_TYPE})
                statuses.append(status)
                if status == 507:
                    assert "nothing was accepted" in body["error"]
            assert 202 in statuses and 507 in statuses
            accepted = daemon.status()["accepted"]
            assert accepted == 50 * statuses.count(202)
            assert call(server, "GET", "/healthz")[0] == 200 and daemon.alive
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
            status, _, _ = call(server, "POST", "/v1/samples", header + x.tobytes(),
                                {"Content-Type": BINARY_TYPE})
            assert status == 202 and daemon.status()["accepted"] == accepted + 50
            wait_learned(daemon, accepted + 50 - 10)


def ends_in_journal(daemon: Daemon) -> list[tuple[int, str]]:
    return [(c.seq, c.task) for c in daemon.journal.read(0, 10_000) if c.kind == END]


def test_an_end_waits_for_the_samples_its_sender_had_acknowledged(tmp_path):
    """The race of an end sent over one transport right after samples sent over another: the
    end names the count, and is journaled only once that many samples of the task are in."""
    daemon = Daemon(stream_config(), tmp_path / "state")
    with running(daemon) as server, ThreadPoolExecutor(1) as pool:
        post_task(server, "site-a", 20)
        end = pool.submit(call, server, "POST", "/v1/tasks/site-a/end", {"samples": 60})
        deadline = time.monotonic() + 30
        while daemon.status()["journal"]["ends_waiting"] != 1:  # the end is in, held
            assert time.monotonic() < deadline and not end.done(), end
            time.sleep(0.01)
        assert not end.done()
        post_task(server, "site-a", 40, index=1)
        status, ack, _ = end.result(timeout=30)
        assert status == 202 and ack == {"first_seq": 61, "count": 1}
        wait_learned(daemon, 60)
        assert ends_in_journal(daemon) == [(61, "site-a")]
        assert "site-a" in daemon.learning.rows  # consolidated, after all 60 samples
        assert daemon.status()["tasks"]["site-a"]["accepted"] == 60


def test_an_end_repeated_is_answered_without_a_second_end_or_consolidation(tmp_path):
    daemon = Daemon(stream_config(), tmp_path / "state")
    with running(daemon) as server:
        post_task(server, "site-a", 30)
        first = call(server, "POST", "/v1/tasks/site-a/end", {"samples": 30})[1]
        again = call(server, "POST", "/v1/tasks/site-a/end", {"samples": 30})[1]
        bare = call(server, "POST", "/v1/samples", {"end_task": "site-a", "samples": 30})[1]
        assert first == {"first_seq": 31, "count": 1}
        assert again == bare == {"first_seq": 31, "count": 1, "duplicate": True}
        post_task(server, "site-a", 10, index=1)  # the task goes on: a new end is a new one
        later = call(server, "POST", "/v1/tasks/site-a/end", {"samples": 40})[1]
        assert later == {"first_seq": 42, "count": 1}
        wait_learned(daemon, 40)
        assert ends_in_journal(daemon) == [(31, "site-a"), (42, "site-a")]


def test_an_end_whose_samples_never_come_is_refused_in_time_and_journals_nothing(tmp_path):
    daemon = Daemon(stream_config(end_wait_s=0.5), tmp_path / "state")
    with running(daemon) as server:
        post_task(server, "site-a", 10)
        status, body, _ = call(server, "POST", "/v1/tasks/site-a/end", {"samples": 25})
        assert status == 409 and "10 of the 25 samples" in body["error"]
        status, body, _ = call(server, "POST", "/v1/tasks/nope/end")
        assert status == 404 and "unknown task 'nope'" in body["error"]
        for bad in ({"samples": -1}, {"samples": "all"}, {"count": 3}, [1]):
            status, body, _ = call(server, "POST", "/v1/tasks/site-a/end", bad)
            assert status == 400, body
            assert "an end of task is" in body["error"] or "samples: " in body["error"]
        assert ends_in_journal(daemon) == []
        assert daemon.status()["rejected"] == 6


def test_the_client_reads_the_schema_and_refuses_a_transposed_window_or_an_unknown_class(
        tmp_path):
    daemon = Daemon(stream_config(), tmp_path / "state")
    with running(daemon) as server:
        with LearnClient(server.url) as client:
            assert client.schema()["input_shape"] == [2, 3]
            x, _ = task_samples(0, 2)
            with pytest.raises(ValueError, match=r"shaped \[3, 2\]; the daemon takes \[2, 3\] "
                                                 r"\(the same values in another order"):
                client.send("a", x[0].T, "walk")
            with pytest.raises(ValueError, match="'swim' is not one of task 'a'"):
                client.send("a", x[0], "swim")
            client.send_many("a", x, ["walk", "sit"])  # names, in the binary form
        wait_learned(daemon, 2)
        assert daemon.status()["accepted"] == 2 and daemon.status()["rejected"] == 0


def test_a_socket_flood_is_bounded_and_idle_connections_are_closed(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(SocketSource, "max_connections", 8)
    daemon = Daemon(stream_config(), tmp_path / "state")
    path = tmp_path / "ingest.sock"
    source = SocketSource(daemon, path)
    source.start()
    daemon.start()

    def half_a_line() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        sock.sendall(b'{"task": "a", "x": [')
        return sock

    try:
        flood = [half_a_line() for _ in range(12)]  # 8 slots, a minute's idle timeout
        for sock in flood[8:]:
            answer = orjson.loads(sock.makefile("rb").readline())
            assert answer["status"] == 503 and "8 connections are open" in answer["error"]
        assert source.refused == 4 and source.active == 8
        assert daemon.status()["ingest_events"] == {"socket_refused": 4}
        for sock in flood:
            sock.close()
        deadline = time.monotonic() + 30
        while source.active:  # the server sees them gone: every slot free again
            assert time.monotonic() < deadline
            time.sleep(0.02)
        monkeypatch.setattr(SocketSource, "idle_timeout_s", 0.3)
        with half_a_line() as idle:
            answer = orjson.loads(idle.makefile("rb").readline())
        assert answer["status"] == 408 and source.timed_out == 1
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            x, y = task_samples(0, 1)
            sock.sendall(orjson.dumps(records("a", x, y)[0]) + b"\n")
            assert orjson.loads(sock.makefile("rb").readline()) == {"first_seq": 1, "count": 1}
    finally:
        source.stop()
        daemon.stop()


def test_a_state_dir_removed_while_running_stops_ingest_instead_of_acknowledging(tmp_path):
    import shutil

    daemon = Daemon(stream_config(), tmp_path / "state")
    with running(daemon) as server:
        assert post_task(server, "site-a", 10)[0] == 202
        wait_learned(daemon, 10)
        shutil.rmtree(tmp_path / "state")
        status, body, _ = post_task(server, "site-a", 10, index=1)
        assert status == 503 and "removed or replaced" in body["error"]
        assert post_task(server, "site-a", 10, index=2)[0] == 503  # for good
        deadline = time.monotonic() + 30
        while daemon.alive:  # the learning thread stops: the process exits, systemd restarts
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert "removed or replaced" in daemon.status()["journal"]["gone"]
    assert not (tmp_path / "state").exists()  # no checkpoint recreated it


def test_the_state_dir_is_private_and_a_lock_symlink_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    Daemon(stream_config(), shared).stop()
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(shared / "lock").st_mode) == 0o600
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    state = tmp_path / "trap"
    state.mkdir(mode=0o700)
    (state / "lock").symlink_to(victim)
    with pytest.raises(DaemonError, match="symbolic link"):
        Daemon(stream_config(), state)
    assert victim.read_text() == "keep me"


def test_a_request_sent_again_with_its_id_is_journaled_once(tmp_path):
    daemon = Daemon(stream_config(), tmp_path / "state")
    x, y = task_samples(0, 5)
    batch = {"samples": records("site-a", x, y), "request_id": "req-1"}
    binary = (orjson.dumps({"task": "site-a", "y": y.tolist(), "request_id": "req-2"}) + b"\n"
              + x.astype("<f4").tobytes())
    with running(daemon) as server:
        first = call(server, "POST", "/v1/samples", batch)[1]
        again = call(server, "POST", "/v1/samples", batch)[1]
        assert first == {"first_seq": 1, "count": 5}
        assert again == {"first_seq": 1, "count": 5, "duplicate": True}
        headers = {"Content-Type": BINARY_TYPE}
        assert call(server, "POST", "/v1/samples", binary, headers)[1]["first_seq"] == 6
        assert call(server, "POST", "/v1/samples", binary, headers)[1]["duplicate"]
        keyed = {"Idempotency-Key": "req-3"}
        one = {"samples": records("site-a", x[:1], y[:1])}
        assert call(server, "POST", "/v1/samples", one, keyed)[1] == {"first_seq": 11, "count": 1}
        assert call(server, "POST", "/v1/samples", one, keyed)[1]["duplicate"]
        status, body, _ = call(server, "POST", "/v1/samples", batch, {"Idempotency-Key": "other"})
        assert status == 400 and "differ" in body["error"]
        wait_learned(daemon, 11)
        assert daemon.status()["accepted"] == 11
    again = Daemon(stream_config(), tmp_path / "state")  # ids survive a restart
    with running(again) as server:
        assert call(server, "POST", "/v1/samples", batch)[1]["duplicate"]
        assert again.status()["accepted"] == 11


def test_the_client_sends_a_request_again_when_its_answer_is_lost_and_it_counts_once(
        tmp_path, monkeypatch):
    daemon = Daemon(stream_config(), tmp_path / "state")
    with running(daemon) as server, LearnClient(server.url, batch=5) as client:
        client.schema()
        conn = client._conn
        answer = conn.getresponse

        def lost_once():
            conn.getresponse = answer  # the next one gets through
            answer().read()  # the daemon journaled it and answered; the answer never arrives
            raise ConnectionResetError("connection reset by peer")

        monkeypatch.setattr(conn, "getresponse", lost_once)
        x, y = task_samples(0, 5)
        client.send_many("site-a", x, y)
        assert client.reconnects == 1 and client.sent == 5
        wait_learned(daemon, 5)
        assert daemon.status()["accepted"] == 5  # journaled once


def test_a_poisoned_sample_is_skipped_counted_and_the_journal_replays_to_the_same_weights(
        tmp_path):
    """A finite but huge window (a sensor glitch) makes its batch's loss overflow: that step is
    not applied; the model stays finite; status and metrics count it; and a learner replaying
    the journal from scratch ends with the very same weights."""
    cfg = stream_config("finetune").model_copy(update={"normalize": "none"})  # raw, as sent
    daemon = Daemon(cfg, tmp_path / "state")
    x, y = task_samples(0, 40)
    x[[5, 17, 30]] = 3e38  # within float32's range: finite, accepted; their logits overflow
    with running(daemon) as server:
        assert call(server, "POST", "/v1/samples", {"samples": records("a", x, y)})[0] == 202
        x2, y2 = task_samples(0, 40, seed=1)
        assert call(server, "POST", "/v1/samples", {"samples": records("a", x2, y2)})[0] == 202
        wait_learned(daemon, 80)
        status = daemon.status()
        assert status["skipped_steps"] >= 1 and status["diverged"] is None
        metrics = call(server, "GET", "/metrics")[1]
        assert "edgecl_learn_skipped_steps_total" in metrics
        state = daemon.call(lambda: daemon.learning.learner.state_dict()).result()
    weights = [t for t in state["net"].values() if t.is_floating_point()]
    assert all(torch.isfinite(t).all() for t in weights)
    chunks = Journal(tmp_path / "state" / "journal.sqlite3", 3).read(0, 10_000)
    schema = stream_schema(cfg)
    again = replay(new_learner(stream_learner_spec(cfg, schema)), schema, cfg.learn, chunks)
    assert_same_state(again.learner.state_dict(), state)
