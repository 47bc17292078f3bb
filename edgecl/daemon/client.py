"""A small Python client for `edgecl learn`: batching, the binary form, backpressure.

    from edgecl.daemon.client import LearnClient
    with LearnClient("http://127.0.0.1:8765") as client:
        client.send("site-a", x, 3)            # buffered; sent `batch` samples at a time
        client.send_many("site-a", xs, ys)     # [n, *input_shape], [n] (indices or names)
        client.end_task("site-a")              # flushes; ends the task after what it sent
        client.status()

Samples go out in the order they were given (a task switch flushes the buffer), in the binary
form, which states their shape. Before the first, the client reads the daemon's schema
(GET /v1/schema) and refuses, with a ValueError saying what the daemon expects, an input of
another shape (a window [steps, channels] sent to a daemon that reads [channels, steps] is not
silently flattened into the wrong one) or a class name the task does not have. A 429 (the
learner lags) is waited out and sent again: nothing of a refused request was accepted. Every
request carries an id (`request_id`), so one whose connection was lost mid-request is sent
again (LOST_RETRIES times) without risk: the daemon answers a request it journaled already
with its first answer, so each sample is journaled exactly once end to end. Not thread-safe:
one per thread.
"""

from __future__ import annotations

import http.client
import time
import uuid
from typing import Any

import numpy as np
import orjson

from edgecl.daemon.schema import BINARY_TYPE
from edgecl.httpclient import StatusError, connection, error_message

Label = int | str
IDLE_S = 50.0  # the daemon closes keep-alive connections idle for 60 s: reconnect before that
LOST_RETRIES = 3  # a request whose connection was lost is sent again this many times


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
        self._schema: dict[str, Any] | None = None  # the daemon's, read on first use
        self.sent = 0  # samples acknowledged
        self.acknowledged: dict[str, int] = {}  # per task
        self.retries = 0  # requests sent again after a 429
        self.reconnects = 0  # requests sent again after a lost connection

    def send(self, task: str, x: Any, y: Label) -> None:
        """Buffer one sample (`x` in the daemon's input shape, `y` a label index or one of the
        task's class names); full batches go out at once."""
        x = np.asarray(x, dtype=np.float32)
        self.check(task, x, y)
        if task != self._task:
            self.flush()
            self._task = task
        self._x.append(x)
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
        header = orjson.dumps({"task": task, "y": y, "dtype": "float32",
                               "shape": list(x.shape[1:]), "request_id": uuid.uuid4().hex})
        body = header + b"\n" + np.ascontiguousarray(x, dtype="<f4").tobytes()
        ack = self._request("POST", "/v1/samples", body, BINARY_TYPE)
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

    def schema(self) -> dict[str, Any]:
        """What the daemon takes: input_shape, classes (or task_classes), head, max_tasks."""
        if self._schema is None:
            self._schema = self._request("GET", "/v1/schema")
        return self._schema

    def check(self, task: str, x: np.ndarray, y: Label) -> None:
        """ValueError unless the daemon's schema takes `x` and `y` for `task`."""
        schema = self.schema()
        shape = list(schema["input_shape"])
        if list(x.shape) != shape:
            hint = (" (the same values in another order: transpose the window to "
                    "[channels, steps])" if sorted(x.shape) == sorted(shape) else "")
            raise ValueError(f"an input shaped {list(x.shape)}; the daemon takes {shape}{hint}")
        classes = schema["task_classes"].get(task) if schema["task_classes"] \
            else schema["classes"]
        if classes is None:
            raise ValueError(f"task {task!r} has no class list in the daemon's schema; tasks "
                             f"with one: {', '.join(schema['task_classes'])}")
        known = y in classes if isinstance(y, str) else type(y) is int and 0 <= y < len(classes)
        if not known:
            raise ValueError(f"label {y!r} is not one of task {task!r}'s classes "
                             f"({', '.join(classes)}) or their indices")

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
        """Until everything journaled is learned and, with a model repository, every task's
        served model is the learner's (its exports done); the status. A served model left
        behind by a failed export: LearnError, with the export's error."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.status()
            publishing = s["publish"]["queued"] if s["publish"] else 0
            if s["journal"]["lag"] == 0 and not publishing:
                behind = s["publish"]["behind"] if s["publish"] else []
                if behind:
                    raise LearnError(500, f"served models behind the learner: "
                                          f"{', '.join(behind)} (export failed: "
                                          f"{s['publish']['last_error']})")
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
            response, raw = self._exchange(method, path, body, headers)
            if response.status != 429 or time.monotonic() > deadline:
                break
            self.retries += 1
            time.sleep(float(response.getheader("Retry-After", "1")))
        if response.status >= 400:
            raise LearnError(response.status, error_message(response, raw))
        return orjson.loads(raw)

    def _exchange(self, method: str, path: str, body: bytes | None, headers: dict[str, str]
                  ) -> tuple[http.client.HTTPResponse, bytes]:
        """One request and its answer, sent again on a new connection if the connection was
        lost (every request is safe to repeat: samples carry their id)."""
        attempt = 0
        while True:
            try:
                self._conn.request(method, path, body, headers)
                response = self._conn.getresponse()
                raw = response.read()
                self._last_used = time.monotonic()
                return response, raw
            except (OSError, http.client.HTTPException):
                self._conn.close()
                if attempt == LOST_RETRIES:
                    raise
                attempt += 1
                self.reconnects += 1
                time.sleep(0.1 * attempt)
