"""A small Python client for `edgecl learn`: batching, the binary form, backpressure.

    from edgecl.daemon.client import LearnClient
    with LearnClient("http://127.0.0.1:8765") as client:
        client.send("site-a", x, 3)            # buffered; sent `batch` samples at a time
        client.send_many("site-a", xs, ys)     # [n, *input_shape], [n] (indices or names)
        client.end_task("site-a")              # flushes; ends the task after what it sent
        client.status()

Samples go out in the order they were given (a task switch flushes the buffer), as the binary
form when their labels are indices, else as JSON. A 429 (the learner lags) is waited out and
sent again: nothing of a refused request was accepted. A connection lost mid-request is an
error, not retried: the daemon may have journaled it already. Not thread-safe: one per thread.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson

from edgecl.daemon.schema import BINARY_TYPE
from edgecl.httpclient import StatusError, connection, error_message

Label = int | str
IDLE_S = 50.0  # the daemon closes keep-alive connections idle for 60 s: reconnect before that


class LearnError(StatusError):
    """The daemon refused a request; `status` is the HTTP code."""


class LearnClient:
    def __init__(self, url: str = "http://127.0.0.1:8765", token: str | None = None,
                 batch: int = 100, timeout_s: float = 60.0, max_wait_s: float = 600.0) -> None:
        self._conn = connection(url, timeout_s)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.batch = batch
        self.max_wait_s = max_wait_s  # longest total wait on 429s for one request
        self._task: str | None = None
        self._x: list[np.ndarray] = []
        self._y: list[Label] = []
        self._last_used = time.monotonic()
        self.sent = 0  # samples acknowledged
        self.acknowledged: dict[str, int] = {}  # per task
        self.retries = 0  # requests sent again after a 429

    def send(self, task: str, x: Any, y: Label) -> None:
        """Buffer one sample; full batches go out at once."""
        if task != self._task:
            self.flush()
            self._task = task
        self._x.append(np.asarray(x, dtype=np.float32))
        self._y.append(y)
        if len(self._y) >= self.batch:
            self.flush()

    def send_many(self, task: str, x: Any, y: Any) -> None:
        """Buffer a batch: `x` [n, *input_shape], `y` [n] label indices or class names (lists,
        numpy arrays or tensors)."""
        labels = y.tolist() if hasattr(y, "tolist") else list(y)
        for xi, yi in zip(np.asarray(x, dtype=np.float32), labels, strict=True):
            self.send(task, xi, yi)

    def flush(self) -> None:
        """Send what is buffered; returns once the daemon has made it durable."""
        if not self._y:
            return
        task, x, y = self._task, np.stack(self._x), self._y
        self._x, self._y = [], []
        if all(type(label) is int for label in y):
            header = orjson.dumps({"task": task, "y": y, "dtype": "float32"})
            body = header + b"\n" + np.ascontiguousarray(x, dtype="<f4").tobytes()
            content_type = BINARY_TYPE
        else:
            body = orjson.dumps({"samples": [{"task": task, "x": xi.ravel(), "y": yi}
                                             for xi, yi in zip(x, y, strict=True)]},
                                option=orjson.OPT_SERIALIZE_NUMPY)
            content_type = "application/json"
        ack = self._request("POST", "/v1/samples", body, content_type)
        self.sent += ack["count"]
        self.acknowledged[task] = self.acknowledged.get(task, 0) + ack["count"]

    def end_task(self, task: str, samples: int | None = None) -> dict[str, Any]:
        """Flush, then end `task` (the daemon consolidates it there) once `samples` of its
        samples have arrived: by default those this client had acknowledged; pass the count
        when some were sent another way (MQTT, the socket, another client). The answer says
        `duplicate` when the task had ended already with nothing sent since."""
        self.flush()
        count = self.acknowledged.get(task, 0) if samples is None else samples
        return self._request("POST", f"/v1/tasks/{task}/end", orjson.dumps({"samples": count}))

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/v1/status")

    def wait_ready(self, timeout_s: float) -> None:
        """Until the daemon answers /readyz with 200 (it may still be starting)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._request("GET", "/readyz")
                return
            except (OSError, LearnError):
                self._conn.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def wait_learned(self, timeout_s: float) -> dict[str, Any]:
        """Until everything journaled is learned and every export queued is done; the status."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.status()
            publishing = s["publish"]["queued"] if s["publish"] else 0
            if s["journal"]["lag"] == 0 and not publishing:
                return s
            if time.monotonic() > deadline:
                raise TimeoutError(f"still {s['journal']['lag']:,} records to learn and "
                                   f"{publishing} exports after {timeout_s:g} s")
            time.sleep(0.2)

    def checkpoint(self) -> dict[str, Any]:
        return self._request("POST", "/v1/checkpoint")

    def export(self, task: str) -> dict[str, Any]:
        """Queue `task`'s model for export into the daemon's repository now."""
        return self._request("POST", f"/v1/tasks/{task}/export")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> LearnClient:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.flush()
        self.close()

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json") -> dict[str, Any]:
        headers = {**self._headers, "Content-Type": content_type}
        deadline = time.monotonic() + self.max_wait_s
        if time.monotonic() - self._last_used > IDLE_S:
            self._conn.close()  # a request on a connection the server dropped could be lost
        while True:
            self._conn.request(method, path, body, headers)
            response = self._conn.getresponse()
            raw = response.read()
            self._last_used = time.monotonic()
            if response.status != 429 or time.monotonic() > deadline:
                break
            self.retries += 1
            time.sleep(float(response.getheader("Retry-After", "1")))
        if response.status >= 400:
            raise LearnError(response.status, error_message(response, raw))
        return orjson.loads(raw)
