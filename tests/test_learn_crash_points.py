"""Acceptance: `edgecl learn` SIGKILLed at seeded points: once in a checkpoint (inside its write,
or between it and the journal's truncation) and once in an export (while it writes its files,
or right after its rename), by tests/crash_at.py, restarted each time, while two tasks stream
in over HTTP. (Each seed picks the two points and where in them; a daemon start costs seconds,
so CI runs one seed; EDGECL_CRASH_SEEDS=20 runs more.) At the end every acknowledged sample
was learned once (the learner equals an uninterrupted replay of the journal, bit for bit), no
checkpoint was refused or left half written, and every ended task has a published model whose
files pass their sha256."""

import http.client
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from learn_helpers import CLASSES, SHAPE, task_samples
from test_learn_crash import EDGECL, assert_learned_once

from edgecl import repository
from edgecl.daemon.client import LearnClient, LearnError

SEEDS = range(int(os.environ.get("EDGECL_CRASH_SEEDS", "1")))
HOOK = Path(__file__).with_name("crash_at.py")
TASKS = ("site-a", "site-b")
# point -> the range of n: the n-th time the point is reached is the kill
CHECKPOINT_POINTS = {"checkpoint-write": (1, 30), "checkpoint-truncate": (1, 3)}
EXPORT_POINTS = {"export-write": (1, 2), "export-rename": (2, 3)}


class Daemon:
    def __init__(self, config, state, repo, port):
        self.options = ["--config", str(config), "--state-dir", str(state), "--repo", str(repo),
                        "--port", str(port)]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None
        self.kills = []

    def start(self, kill_at=None):
        if kill_at is None:
            args = [str(EDGECL), "learn", *self.options]
        else:
            args = [sys.executable, str(HOOK), kill_at[0], str(kill_at[1]), *self.options]
        self.proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)

    def client(self):
        return LearnClient(self.url, batch=16)

    def died(self) -> bool:
        """The daemon was SIGKILLed (then recorded), or it is still running."""
        if self.proc.poll() is None:
            return False
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode
        self.kills.append(self.proc.returncode)
        return True


def kill_schedule(seed: int) -> list[tuple[str, int]]:
    """One checkpoint point and one export point, each with its n, in a seeded order."""
    rng = random.Random(seed)
    picks = [rng.choice(sorted(points.items())) for points in (CHECKPOINT_POINTS, EXPORT_POINTS)]
    return rng.sample([(point, rng.randint(*span)) for point, span in picks], 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_kills_in_checkpoint_writes_and_exports_lose_and_repeat_nothing(tmp_path, seed):
    config = tmp_path / "mlp.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 0, "device": "cpu", "net": {"name": "mlp", "hidden": [16]},
        "optimizer": {"name": "sgd", "lr": 0.1}, "memory": {"per_task": 8},
        "method": {"name": "finetune"},
        "stream": {"input_shape": list(SHAPE), "classes": CLASSES, "head": "shared",
                   "max_tasks": 3, "batch_size": 5},
        "learn": {"holdout": 0.1, "checkpoint_every": 30, "keep_checkpoints": 10_000,
                  "flush_idle_s": 0.3}}))
    schedule = kill_schedule(seed)
    daemon = Daemon(config, tmp_path / "state", tmp_path / "repo", free_port())
    hooks = iter(schedule)
    daemon.start(next(hooks))

    def attempt(action):
        """Run `action(client)` until it succeeds; a daemon that died is started again with the
        next kill point of the schedule."""
        while True:
            try:
                with daemon.client() as client:
                    return action(client)
            except (OSError, http.client.HTTPException, LearnError):
                if daemon.died():
                    daemon.start(next(hooks, None))
                time.sleep(0.05)

    try:
        for index, task in enumerate(TASKS):
            x, y = task_samples(index, 150, seed=seed)
            for i in range(0, len(y), 25):
                labels = [CLASSES[k] for k in y[i:i + 25]]
                attempt(lambda c, t=task, x=x[i:i + 25], y=labels: c.send_many(t, x, y))
            attempt(lambda c, t=task: c.end_task(t))
        while len(daemon.kills) < len(schedule):  # a kill point not reached yet: reach it
            attempt(lambda c: c.checkpoint() and c.export(TASKS[0]))
            time.sleep(0.2)
        deadline = time.monotonic() + 120
        while True:  # everything learned, and every export done
            s = attempt(lambda c: c.status())
            if (not s["journal"]["lag"] and s["learned"] >= s["accepted"]
                    and not s["publish"]["queued"] and not s["publish"]["behind"]):
                break
            assert time.monotonic() < deadline, s
            time.sleep(0.1)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(60) == 0
    finally:
        daemon.proc.kill()
        daemon.proc.wait(30)

    assert len(daemon.kills) == len(schedule)
    assert s["corrupt_checkpoints"] == 0 and s["publish"]["failed"] == 0
    assert not list((tmp_path / "state" / "checkpoints").glob(".unnamed.*"))  # cleaned up
    assert_learned_once(tmp_path / "state", config, s["accepted"])
    for task in TASKS:
        assert repository.versions(tmp_path / "repo", task), task
        for version in repository.versions(tmp_path / "repo", task):
            folder = tmp_path / "repo" / task / str(version)
            manifest = repository.read_manifest(folder)
            model = (folder / repository.MODEL_FILE).read_bytes()
            assert repository.sha256_of(model) == manifest.sha256
