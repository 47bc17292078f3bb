"""A device's side of fleet learning, without Flower: the share it hands out, the aggregate it
takes (journaled, so a replay gives the same learner), and what it refuses."""

from __future__ import annotations

import http.client

import numpy as np
import pytest
import torch
from learn_helpers import (
    assert_same_state,
    call,
    records,
    running,
    stream_config,
    task_samples,
    wait_learned,
)

from edgecl.config import Config
from edgecl.daemon.daemon import Daemon
from edgecl.daemon.fleet import FLEET_DIR
from edgecl.daemon.journal import Journal
from edgecl.daemon.loop import replay
from edgecl.fleet.wire import MEDIA_TYPE, Share, pack, unpack
from edgecl.setup import build_config, new_learner, stream_learner_spec, stream_schema


def per_task_config(method: str = "er", rehearse_steps: int = 0) -> Config:
    """`stream_config` with a head per task (tasks of different devices stay apart) and
    `rehearse_steps` memory steps after each aggregate."""
    data = stream_config(method).model_dump(mode="json")
    data["stream"]["head"] = "per_task"
    data["learn"]["fleet_rehearse_steps"] = rehearse_steps
    return build_config(data)


def share_of(server) -> Share:
    host, port = server.socket.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/v1/fleet/share")
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 200 and response.getheader("Content-Type") == MEDIA_TYPE
    return unpack(body)


def learn_task(server, daemon: Daemon, task: str, index: int, n: int = 60) -> None:
    target = daemon.learning.learned + n
    x, y = task_samples(index, n)
    assert call(server, "POST", "/v1/samples", {"samples": records(task, x, y)})[0] == 202
    assert call(server, "POST", f"/v1/tasks/{task}/end")[0] == 202
    wait_learned(daemon, target)


def post_aggregate(server, data: bytes) -> tuple[int, object]:
    status, answer, _ = call(server, "POST", "/v1/fleet/aggregate", data,
                             {"Content-Type": MEDIA_TYPE})
    return status, answer


def test_a_device_takes_another_ones_task_as_the_other_one_predicts_it(tmp_path):
    cfg = per_task_config()
    a, b = Daemon(cfg, tmp_path / "a"), Daemon(cfg, tmp_path / "b")
    with running(a) as server_a, running(b) as server_b:
        learn_task(server_a, a, "site-a", 0)
        learn_task(server_b, b, "site-b", 1)
        share = share_of(server_a)
        assert {k for k in share.arrays if k.startswith("head/")} == {
            "head/site-a/weight", "head/site-a/bias"}
        assert share.weights["head/site-a/weight"] == share.weights["body/1.1.weight"] == 60
        status, answer = post_aggregate(server_b, pack(share))
        assert status == 202 and answer["seq"] == b.journal.last_seq
        wait_learned(b, b.learning.learned)
        assert b.status()["fleet"]["taken"] == 1
        assert b.status()["fleet"]["adopted"] == ["site-a"]
        x, _ = task_samples(0, 50, seed=3)
        x = torch.from_numpy(x)
        assert torch.equal(b.call(lambda: b.learning.learner.predict(x, "site-a")).result(),
                           a.call(lambda: a.learning.learner.predict(x, "site-a")).result())


def test_a_replay_of_the_journal_takes_the_aggregates_and_their_rehearsal_again(tmp_path):
    cfg = per_task_config(rehearse_steps=30)
    a, b = Daemon(cfg, tmp_path / "a"), Daemon(cfg, tmp_path / "b")
    with running(a) as server_a, running(b) as server_b:
        learn_task(server_a, a, "site-a", 0)
        learn_task(server_b, b, "site-b", 1)
        assert post_aggregate(server_b, pack(share_of(server_a)))[0] == 202
        learn_task(server_b, b, "site-b", 1)  # learning goes on after the aggregate
        assert b.status()["rehearsal_steps"] == 30 and b.status()["fleet"]["taken"] == 1
        state = b.call(lambda: b.learning.learner.state_dict()).result()
    chunks = Journal(tmp_path / "b" / "journal.sqlite3", 3).read(0, 10_000)
    schema = stream_schema(cfg)
    again = replay(new_learner(stream_learner_spec(cfg, schema)), schema, cfg.learn, chunks,
                   b.aggregates)
    assert_same_state(again.learner.state_dict(), state)
    assert list((tmp_path / "b" / FLEET_DIR).glob("*.npz"))  # named by the journal: kept


def test_an_aggregate_the_device_cannot_take_is_refused_and_journals_nothing(tmp_path):
    daemon = Daemon(per_task_config(), tmp_path / "state")
    with running(daemon) as server:
        learn_task(server, daemon, "site-a", 0)
        share = share_of(server)
        last = daemon.journal.last_seq
        status, answer = post_aggregate(server, b"not weights")
        assert status == 400 and "not an edgecl weights file" in answer["error"]
        wrong = Share({**share.arrays, "body/1.1.weight": np.zeros((3, 3), np.float32)},
                      share.weights)
        status, answer = post_aggregate(server, pack(wrong))
        assert status == 422 and "body/1.1.weight" in answer["error"]
        alien = Share({"body/9.weight": np.zeros(2, np.float32)}, {"body/9.weight": 1.0})
        status, answer = post_aggregate(server, pack(alien))
        assert status == 422 and "no part of this device's net" in answer["error"]
        poisoned = Share({**share.arrays, "body/1.1.bias": np.full(
            share.arrays["body/1.1.bias"].shape, np.nan, np.float32)}, share.weights)
        status, answer = post_aggregate(server, pack(poisoned))
        assert status == 422 and "NaN or infinite" in answer["error"]
        assert daemon.journal.last_seq == last
        assert not list((tmp_path / "state" / FLEET_DIR).glob("*.npz"))


@pytest.mark.parametrize("method", ["wsn", "independent"])
def test_a_method_without_a_shared_body_is_refused_a_fleet_round(tmp_path, method):
    daemon = Daemon(per_task_config(method), tmp_path / "state")
    with running(daemon) as server:
        status, answer, _ = call(server, "GET", "/v1/fleet/share")
        assert status == 409 and "cannot take part in a fleet" in answer["error"]


def test_aggregates_no_journal_record_names_are_pruned_at_a_checkpoint(tmp_path):
    daemon = Daemon(per_task_config(), tmp_path / "state")
    with running(daemon) as server:
        learn_task(server, daemon, "site-a", 0)
        share = share_of(server)
        assert post_aggregate(server, pack(share))[0] == 202
        wait_learned(daemon, daemon.learning.learned)
        assert len(list((tmp_path / "state" / FLEET_DIR).glob("*.npz"))) == 1
        for _ in range(3):  # keep_checkpoints is 3: the journal before the oldest goes
            assert call(server, "POST", "/v1/checkpoint")[0] == 200
            learn_task(server, daemon, "site-a", 0, n=4)
        assert call(server, "POST", "/v1/checkpoint")[0] == 200
        assert not list((tmp_path / "state" / FLEET_DIR).glob("*.npz"))
