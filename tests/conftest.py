"""Shared test helpers: tiny learners on synthetic data (fast, no dataset needed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from edgecl.learners import Learner, LearnerSpec, build_learner
from edgecl.setup import build_config

# The suite's nets are small: one thread each, as `edgecl bench` and `learn` run them (`threads:
# 1`); torch's default of one per core makes them many times slower on a busy machine.
torch.set_num_threads(1)


def make_learner(method: str = "finetune", head: str = "shared", input_shape=(1, 4, 4),
                 n_classes: int = 3, max_tasks: int = 3, params: dict[str, Any] | None = None,
                 **overrides: Any) -> Learner:
    """A tiny CPU learner; `params` are the method's own, `overrides` other config sections."""
    data = {"seed": 0, "device": "cpu", "net": {"name": "mlp", "hidden": [16, 16]},
            "optimizer": {"name": "sgd", "lr": 0.1}, "memory": {"per_task": 8},
            "method": {"name": method, **(params or {})}}
    for key, value in overrides.items():  # a section naming another net/optimiser replaces
        base = data.get(key)
        same_kind = (isinstance(base, dict) and isinstance(value, dict)
                     and value.get("name", base.get("name")) == base.get("name"))
        data[key] = {**base, **value} if same_kind else value
    spec = LearnerSpec(build_config(data), tuple(input_shape), n_classes, head, max_tasks)
    return build_learner(spec)


def task_batches(task: int, n_batches: int = 5, batch: int = 8, input_shape=(1, 4, 4),
                 n_classes: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A separable synthetic task: the label is where a task-specific template is brightest."""
    g = torch.Generator().manual_seed(1000 * task + seed)
    templates = (torch.rand(n_classes, *input_shape, generator=g) > 0.5).float()
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, n_classes, (batch,), generator=g)
        x = templates[y] + 0.05 * torch.rand(batch, *input_shape, generator=g)
        out.append((x, y))
    return out


def train(learner: Learner, task: int, **batches: Any) -> None:
    """Observe synthetic task `task`, named t<task>, batch by batch (`task_batches` options),
    then end it."""
    spec = learner.spec
    for x, y in task_batches(task, input_shape=spec.input_shape, n_classes=spec.n_classes,
                             **batches):
        learner.observe(x, y, f"t{task}")
    learner.end_task(f"t{task}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mosquitto(folder: Path, listener: str = "allow_anonymous true\n", settings: str = ""
              ) -> Iterator[int]:
    """A real mosquitto broker of our own on a free loopback port, its listener's settings
    `listener`, its general ones `settings` (else the stock ones); yields the port. Skipped
    where mosquitto is not installed, except in CI, which must run it."""
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but mosquitto is not installed: .ci/run installs it")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI runs this")
    port = free_port()
    conf = folder / "mosquitto.conf"
    persistence = "" if "persistence true" in settings else "persistence false\n"
    conf.write_text(f"listener {port} 127.0.0.1\n{listener}{persistence}{settings}"
                    f"persistence_location {folder}/\nlog_dest stderr\n")
    with (folder / "mosquitto.log").open("wb") as out:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (folder / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not open its port"
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A mosquitto broker with its stock settings, anonymous; yields its mqtt:// URL."""
    with mosquitto(tmp_path_factory.mktemp("mosquitto")) as port:
        yield f"mqtt://127.0.0.1:{port}"


@contextlib.contextmanager
def small_tmpfs(path, size: str):
    """A tmpfs of `size` mounted at `path` (root only: skipped where mount is refused)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
