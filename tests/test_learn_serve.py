"""Acceptance: the daemon with a model repository and `edgecl serve` on the same repository:
once a task ends, serve answers for it as the learner predicts, on the task's held-out samples."""

import threading
import time

import numpy as np
from learn_helpers import call, records, running, stream_config, task_samples, wait_learned

from edgecl.daemon.daemon import Daemon
from edgecl.serve import create_server
from edgecl.serve.client import Client


def wait_current(daemon: Daemon, timeout_s: float = 120.0) -> dict:
    """Until every served model is the learner's (no export queued or behind); the status."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = daemon.status()
        if not s["journal"]["lag"] and not s["publish"]["queued"] and not s["publish"]["behind"]:
            return s
        assert daemon.publisher.failed == 0, daemon.publisher.last_error
        assert time.monotonic() < deadline, s["publish"]
        time.sleep(0.05)


def served_as_the_learner_predicts(daemon: Daemon, server, client: Client, task: str) -> None:
    """serve's argmax on the task's held-out samples is the learner's, once serve has the
    version the daemon published."""
    held_x, _ = daemon.learning.holdout.tensors(task)
    assert len(held_x) >= 10
    expected = daemon.call(lambda: daemon.learning.learner.predict(
        held_x, task).argmax(1).numpy()).result()
    version = daemon.status()["tasks"][task]["served_version"]
    deadline = time.monotonic() + 60  # a poll, and the new version's probe in a child process
    while getattr(server.models.get(task), "version", None) != version:
        assert time.monotonic() < deadline, f"serve did not load {task} v{version}"
        time.sleep(0.05)
    np.testing.assert_array_equal(client.infer(task, held_x.numpy()).argmax(1), expected)


def test_served_models_follow_the_learner_as_it_consolidates_each_task(tmp_path):
    """EWC trains one shared net: ending site-b changes site-a's model too, so site-a is
    published again, and serve answers for both as the learner predicts now."""
    repo = tmp_path / "repo"
    repo.mkdir()
    daemon = Daemon(stream_config("ewc", holdout=0.25), tmp_path / "state", repo)
    server = create_server(repo, port=0)
    serving = threading.Thread(target=server.run, args=(0.1,))
    serving.start()
    try:
        with running(daemon) as ingest, Client(server.url) as client:
            for index, task in enumerate(("site-a", "site-b")):
                x, y = task_samples(index, 120)
                assert call(ingest, "POST", "/v1/samples",
                            {"samples": records(task, x, y)})[0] == 202
                assert call(ingest, "POST", f"/v1/tasks/{task}/end",
                            {"samples": 120})[0] == 202
                wait_learned(daemon, 120 * (index + 1))
                status = wait_current(daemon)
                for known in status["tasks"]:
                    served_as_the_learner_predicts(daemon, server, client, known)
            tasks = status["tasks"]
            assert tasks["site-a"]["served_version"] == 2  # exported again after site-b
            assert tasks["site-b"]["served_version"] == 1
            # both exported as site-b ended: its END marker, seq 242 (120 + 1 + 120 + 1)
            assert tasks["site-a"]["served_offset"] == tasks["site-b"]["served_offset"] == 242
            assert not tasks["site-a"]["behind"] and status["publish"]["behind"] == []
            meta = client.metadata("site-a")["parameters"]
            assert meta["classes"] == ["walk", "run", "sit"] and meta["method"] == "ewc"
            # export on request: a new version even of a model that did not change
            assert call(ingest, "POST", "/v1/tasks/site-a/export")[0] == 202
            assert wait_current(daemon)["tasks"]["site-a"]["served_version"] == 3
            assert call(ingest, "POST", "/v1/tasks/nope/export")[0] == 404
    finally:
        server.shutdown()
        serving.join(10)


def test_a_restarted_daemon_exports_only_what_changed(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    daemon = Daemon(stream_config("finetune"), tmp_path / "state", repo)
    with running(daemon) as ingest:
        x, y = task_samples(0, 40)
        call(ingest, "POST", "/v1/samples", {"samples": records("site-a", x, y)})
        call(ingest, "POST", "/v1/tasks/site-a/end", {"samples": 40})
        wait_learned(daemon, 40)
        wait_current(daemon)
    again = Daemon(stream_config("finetune"), tmp_path / "state", repo)
    with running(again):
        status = wait_current(again)
    assert status["tasks"]["site-a"]["served_version"] == 1  # the same model: not again
