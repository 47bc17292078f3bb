"""Idle rehearsal: memory steps taken while ingest is idle, journaled, so a replay repeats them."""

from __future__ import annotations

import copy
import time

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

from edgecl.daemon.daemon import Daemon, DaemonError
from edgecl.daemon.journal import REHEARSE, Journal
from edgecl.daemon.loop import replay
from edgecl.setup import new_learner, stream_learner_spec, stream_schema

IDLE = {"rehearse_steps": 25, "rehearse_after_s": 0.2, "keep_checkpoints": 100}


def wait_for_status(daemon: Daemon, key: str, value: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while daemon.status()[key] != value:
        assert time.monotonic() < deadline, (key, daemon.status()[key])
        time.sleep(0.02)


def post(server, *tasks: tuple[str, int], n: int = 40) -> None:
    """One request holding `n` samples of each (task, index): no idle time between them."""
    samples = [r for task, index in tasks for r in records(task, *task_samples(index, n))]
    assert call(server, "POST", "/v1/samples", {"samples": samples})[0] == 202


@pytest.mark.parametrize("method", ["er", "der"])
def test_idle_rehearsal_is_journaled_bounded_and_replayed_exactly(tmp_path, method):
    cfg = stream_config(method, **IDLE)
    daemon = Daemon(cfg, tmp_path / "state")
    with running(daemon) as server:
        post(server, ("a", 0), ("b", 1))  # one request: no idle period between the tasks
        wait_learned(daemon, 80)
        wait_for_status(daemon, "rehearsal_steps", 25)  # 10 + 10 + 5, then the budget is spent
        post(server, ("b", 2))  # a new record opens another idle period
        wait_for_status(daemon, "rehearsal_steps", 50)
        metrics = call(server, "GET", "/metrics")[1]
        assert "edgecl_learn_rehearsal_steps_total 50.0" in metrics
        state = daemon.call(lambda: daemon.learning.learner.state_dict()).result()
    chunks = Journal(tmp_path / "state" / "journal.sqlite3", 3).read(0, 10_000)
    marked = [int(c.y[0]) for c in chunks if c.kind == REHEARSE]
    assert marked == [10, 10, 5, 10, 10, 5]
    schema = stream_schema(cfg)
    again = replay(new_learner(stream_learner_spec(cfg, schema)), schema, cfg.learn, chunks)
    assert_same_state(again.learner.state_dict(), state)  # the journal alone gives the learner


def test_rehearsal_waits_for_idle_time_and_moves_the_weights(tmp_path):
    cfg = stream_config("er", **{**IDLE, "rehearse_after_s": 3600.0})
    daemon = Daemon(cfg, tmp_path / "state")
    with running(daemon) as server:
        post(server, ("a", 0), ("b", 1))
        wait_learned(daemon, 80)
        assert daemon.status()["rehearsal_steps"] == 0  # not idle long enough
        weights = daemon.call(lambda: copy.deepcopy(daemon.learning.learner.net.state_dict()))
        before = weights.result()
        daemon.call(lambda: daemon.learning.learner.rehearse(5)).result()
        after = daemon.learning.learner.net.state_dict()
        assert daemon.status()["rehearsal_steps"] == 5
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_method_without_a_memory_to_rehearse_is_refused_at_start(tmp_path):
    with pytest.raises(DaemonError, match="does not rehearse from memory"):
        Daemon(stream_config("ewc", **IDLE), tmp_path / "state")
