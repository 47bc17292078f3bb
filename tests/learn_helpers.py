"""Helpers for the `edgecl learn` tests: a tiny stream config, samples, a daemon over HTTP."""

from __future__ import annotations

import collections
import contextlib
import http.client
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import torch

from edgecl.config import Config
from edgecl.daemon.daemon import Daemon
from edgecl.daemon.service import LearnService, Listeners
from edgecl.setup import build_config
from edgecl.web import HTTPServer

CLASSES = ["walk", "run", "sit"]
SHAPE = (2, 3)  # [channels, steps]: a tiny sensor window


def stream_config(method: str = "finetune", **learn: Any) -> Config:
    """A tiny CPU learner on 2 x 3 windows, 3 classes, batches of 4, at most 3 tasks."""
    return build_config({
        "seed": 0, "device": "cpu", "net": {"name": "mlp", "hidden": [16]},
        "optimizer": {"name": "sgd", "lr": 0.1}, "memory": {"per_task": 8},
        "method": {"name": method},
        "stream": {"input_shape": list(SHAPE), "classes": CLASSES, "head": "shared",
                   "max_tasks": 3, "batch_size": 4},
        "learn": {"holdout": 0.2, "flush_idle_s": 0.3, **learn}})


def task_samples(task: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable synthetic task: the label is where a task's template is brightest."""
    rng = np.random.default_rng([seed, task])
    templates = rng.random((len(CLASSES), *SHAPE)) > 0.5
    y = rng.integers(0, len(CLASSES), n)
    x = templates[y] + 0.05 * rng.random((n, *SHAPE))
    return x.astype(np.float32), y


def records(task: str, x: np.ndarray, y: np.ndarray) -> list[dict[str, Any]]:
    return [{"task": task, "x": xi.tolist(), "y": int(yi)} for xi, yi in zip(x, y, strict=True)]


@contextlib.contextmanager
def running(daemon: Daemon, token: str | None = None, start: bool = True
            ) -> Iterator[HTTPServer]:
    """The daemon (its learning thread unless `start` is False) behind its HTTP app on a free
    port, assembled as `edgecl learn` assembles it."""
    service = LearnService(daemon, Listeners(port=0, token=token))
    service.start(learn=start)
    try:
        yield service.http
    finally:
        service.stop()


def call(server: HTTPServer, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, http.client.HTTPResponse]:
    """One request on a fresh connection: (status, decoded JSON or raw text, response)."""
    host, port = server.socket.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    payload = body if isinstance(body, bytes | None) else orjson.dumps(body)
    conn.request(method, path, payload, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    try:
        return response.status, orjson.loads(raw), response
    except orjson.JSONDecodeError:
        return response.status, raw.decode(), response


def wait_learned(daemon: Daemon, n: int, timeout_s: float = 30.0) -> None:
    """Until the daemon has consumed `n` samples and the journal, markers included."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.learning.learned >= n and daemon.lag() == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"learned {daemon.learning.learned} of {n} within {timeout_s} s "
                         f"(lag {daemon.lag()})")


def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    """Equal nested learner states: tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class DaemonProcess:
    """A process (`edgecl learn`, `serve`, `fleet`) whose stderr is drained by a thread (the
    last lines kept, for failures); `wait_url` waits for the address a daemon announces."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.url: str | None = None
        self._announced = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"listening on (http://[\d.]+:\d+)", line)
            if found and self.url is None:
                self.url = found[1]
                self._announced.set()

    def wait_url(self, timeout_s: float = 120) -> str:
        if not self._announced.wait(timeout_s):
            raise AssertionError("no address announced:\n" + "".join(self.lines))
        assert self.url
        return self.url

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 60 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
