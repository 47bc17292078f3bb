"""Acceptance: the daemon with a model repository and `edgecl serve` on the same repository:
once a task ends, serve answers for it as the learner predicts, on the task's held-out samples."""

import threading
import time

import numpy as np
from learn_helpers import call, records, running, stream_config, task_samples, wait_learned

from edgecl.daemon.daemon import Daemon
from edgecl.serve import create_server
from edgecl.serve.client import Client


def wait_published(daemon: Daemon, task: str, version: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while daemon.publisher.published.get(task) != version:
        assert daemon.publisher.failed == 0, daemon.publisher.last_error
        assert time.monotonic() < deadline, f"{task} v{version} not published"
        time.sleep(0.05)


def test_consolidated_tasks_are_published_and_served_as_the_learner_predicts(tmp_path):
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
                assert call(ingest, "POST", f"/v1/tasks/{task}/end")[0] == 202
                wait_learned(daemon, 120 * (index + 1))
                wait_published(daemon, task, 1)
                held_x, _ = daemon.learning.holdout.tensors(task)
                assert len(held_x) >= 10
                expected = daemon.call(lambda t=task, x=held_x: daemon.learning.learner.predict(
                    x, t).argmax(1).numpy()).result()
                deadline = time.monotonic() + 10
                while task not in server.models.all():
                    assert time.monotonic() < deadline, "serve did not load the new task"
                    time.sleep(0.05)
                got = client.infer(task, held_x.numpy()).argmax(1)
                np.testing.assert_array_equal(got, expected)
                meta = client.metadata(task)["parameters"]
                assert meta["classes"] == ["walk", "run", "sit"] and meta["method"] == "ewc"
            # export on request: a new version of a task already published
            assert call(ingest, "POST", "/v1/tasks/site-a/export")[0] == 202
            wait_published(daemon, "site-a", 2)
            status = call(ingest, "GET", "/v1/status")[1]
            assert status["tasks"]["site-a"]["published_version"] == 2
            assert call(ingest, "POST", "/v1/tasks/nope/export")[0] == 404
    finally:
        server.shutdown()
        serving.join(10)
