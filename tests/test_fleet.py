"""Fleet learning end to end, with real processes: `edgecl fleet` (a Flower SuperLink and
edgecl's ServerApp) and three `edgecl learn --fleet` daemons, each with its SuperNode, each
streamed a different pmnist task. After the rounds every device predicts the tasks it never saw;
one daemon SIGKILLed during a round loses no acknowledged sample, and its learner after a
restart is what a replay of its journal gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from learn_helpers import DaemonProcess, assert_same_state

from edgecl.daemon.checkpoints import CheckpointStore
from edgecl.daemon.client import LearnClient
from edgecl.daemon.fleet import AggregateStore
from edgecl.daemon.journal import FLEET, SAMPLE, Journal
from edgecl.daemon.loop import replay
from edgecl.learners import Learner
from edgecl.setup import (
    benchmark_for,
    build_config,
    new_learner,
    stream_learner_spec,
    stream_schema,
)

BIN = Path(sys.executable).parent
EDGECL = BIN / "edgecl"
SAMPLES = 500  # per task
# three devices, each streamed one pmnist task (device i: task i), learning with ER
CONFIG = {"seed": 0, "device": "cpu", "method": {"name": "er"},
          "benchmark": {"name": "pmnist", "n_tasks": 3, "samples_per_task": SAMPLES},
          "learn": {"holdout": 0.05, "checkpoint_seconds": 3600,
                    "checkpoint_every": 1_000_000, "fleet_rehearse_steps": 100}}


def needs_flower() -> None:
    if (BIN / "flower-superlink").exists():
        return
    if os.environ.get("CI"):
        pytest.fail("flwr is missing in CI: the dev extra installs it (`pip install -e '.[dev]'`)")
    pytest.skip("Flower is not installed (`pip install -e '.[fleet]'`)")



def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.2)


def learn_command(root: Path, i: int, *fleet: str) -> list[str]:
    return [str(EDGECL), "learn", "--state-dir", str(root / f"dev{i}"), "--config",
            str(root / "learn.yaml"), "--port", "0", *fleet]


def newest_learner(state: Path) -> Learner:
    restored = CheckpointStore(state / "checkpoints", 3).restore("cpu")
    assert restored is not None
    return restored.learner


def union_accuracy(learner: Learner, tasks) -> float:
    """Mean test accuracy over every task; one the learner never met goes through its one
    head (pmnist's head is shared), as the tasks it adopted from the fleet do."""
    accs = []
    for task in tasks:
        if task.name not in learner.task_ids:
            learner.register_task(task.name)
        predicted = learner.predict(task.x_test, task.name).argmax(1)
        accs.append(float((predicted == task.y_test).float().mean()))
    return sum(accs) / len(accs)


def test_a_fleet_teaches_every_device_the_others_tasks_and_survives_a_kill(tmp_path):
    needs_flower()
    (tmp_path / "learn.yaml").write_text(yaml.safe_dump(CONFIG))
    tasks = benchmark_for(build_config(CONFIG)).tasks
    superlink = f"127.0.0.1:{free_port()}"
    devices = [DaemonProcess(learn_command(tmp_path, i, "--fleet", superlink,
                                           "--fleet-insecure"), dict(os.environ))
               for i in range(3)]
    status_file = tmp_path / "fleet" / "status.json"
    fleet = None
    try:
        alone = []
        for i, device in enumerate(devices):
            subprocess.run([str(EDGECL), "replay", "embedded:pmnist", "--samples-per-task",
                            str(SAMPLES), "--tasks", str(i), "--to", device.wait_url()],
                           check=True, capture_output=True, timeout=300)
            with LearnClient(device.url) as client:
                client.checkpoint()
            alone.append(union_accuracy(newest_learner(tmp_path / f"dev{i}"), tasks))
        fleet = DaemonProcess([str(EDGECL), "fleet", "--state-dir", str(tmp_path / "fleet"),
                               "--port", superlink.split(":")[1], "--insecure", "--rounds", "4",
                               "--min-nodes", "3", "--round-timeout", "20"], dict(os.environ))
        # device 2 dies during the second round: it took the first round's aggregate and has
        # handed out its second share; that round's aggregate comes only once every device
        # replied (or the round timed out)
        with LearnClient(devices[2].url) as client:
            wait_for(lambda: client.status()["fleet"]["shares"] >= 2, "device 2's second share",
                     timeout_s=240)
        devices[2].proc.send_signal(signal.SIGKILL)
        devices[2].proc.wait(10)
        assert fleet.proc.wait(300) == 0, "".join(fleet.lines)
    finally:
        for device in devices:
            device.stop()
        if fleet is not None:
            fleet.stop()
    status = json.loads(status_file.read_text())
    assert status["finished"] and len(status["rounds"]) == 4
    assert len(status["rounds"][0]["replied"]) == 3
    last = status["rounds"][-1]
    assert len(last["replied"]) == 2 and len(last["acks"]) == 2  # the two left alive
    shown = subprocess.run([str(EDGECL), "fleet", "--state-dir", str(tmp_path / "fleet"),
                            "--show"], capture_output=True, text=True, env={
                                **os.environ, "COLUMNS": "200"}, check=True).stdout
    assert "4 of 4 rounds (finished)" in shown and "3/3" in shown and "2/3" in shown
    weights = sum(t.numel() for t in newest_learner(tmp_path / "dev0").net.parameters())
    assert all(b <= 4 * weights for b in last["bytes_received"].values())  # weights, no data

    for i in (0, 1):  # the survivors: better on the fleet's tasks than any device alone
        federated = union_accuracy(newest_learner(tmp_path / f"dev{i}"), tasks)
        assert federated > max(alone) + 0.2, (i, federated, alone)

    killed = tmp_path / "dev2"  # restarted, alone: it restores, replays its journal, stops
    restarted = DaemonProcess(learn_command(tmp_path, 2), dict(os.environ))
    try:
        with LearnClient(restarted.wait_url()) as client:
            client.wait_ready(120)
    finally:
        restarted.stop()
    chunks = Journal(killed / "journal.sqlite3", 3).read(0, 1_000_000)
    assert sum(c.count for c in chunks if c.kind == SAMPLE) == SAMPLES  # every sample acked
    cfg = build_config(CONFIG)
    schema = stream_schema(cfg)
    again = replay(new_learner(stream_learner_spec(cfg, schema)), schema, cfg.learn, chunks,
                   AggregateStore(killed))
    assert_same_state(again.learner.state_dict(), newest_learner(killed).state_dict())
    taken = [c for c in chunks if c.kind == FLEET]
    assert len(taken) >= 1 and again.fleet["taken"] == len(taken)
    assert again.fleet["failed"] == 0
