"""A small client for `edgecl serve` (any KServe v2 server works): one keep-alive connection.

    from edgecl.serve.client import Client
    with Client("http://127.0.0.1:8080") as client:
        logits = client.infer("task00", x)          # x: float32 [batch, *input_shape]
        labels = client.classify("task00", x)       # class names from the manifest

A Client is not thread-safe: use one per thread.
"""

from __future__ import annotations

import http.client
from typing import Any

import numpy as np
import orjson

from edgecl.httpclient import StatusError, connection, error_message


class ServeError(StatusError):
    """The inference server answered with an error status; `status` is the HTTP code."""


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8080", token: str | None = None,
                 timeout_s: float = 10.0) -> None:
        self._conn = connection(url, timeout_s)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._metadata: dict[str, dict[str, Any]] = {}

    def ready(self) -> bool:
        """True if the server is up and serves at least one model."""
        try:
            return self._request("GET", "/v2/health/ready")["ready"]
        except (ServeError, OSError):
            return False

    def metadata(self, task: str) -> dict[str, Any]:
        """The task's model metadata (input, output, versions, classes...)."""
        return self._request("GET", f"/v2/models/{task}")

    def infer(self, task: str, x: np.ndarray, version: int | None = None) -> np.ndarray:
        """Logits [batch, n_classes] for the float32 batch `x`."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        body = {"inputs": [{"name": self._cached_metadata(task)["inputs"][0]["name"],
                            "shape": list(x.shape), "datatype": "FP32", "data": x.ravel()}]}
        path = f"/v2/models/{task}" + (f"/versions/{version}" if version else "") + "/infer"
        out = self._request("POST", path, body)["outputs"][0]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

    def classify(self, task: str, x: np.ndarray) -> list[str]:
        """The most likely class name of each sample of `x`."""
        logits = self.infer(task, x)
        classes = self._cached_metadata(task)["parameters"]["classes"]
        return [classes[k] for k in logits.argmax(axis=1)]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cached_metadata(self, task: str) -> dict[str, Any]:
        if task not in self._metadata:
            self._metadata[task] = self.metadata(task)
        return self._metadata[task]

    def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        headers = dict(self._headers)
        payload = None
        if body is not None:
            # float32 arrays go out in their shortest round-trip form (9 digits at most)
            payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
            headers["Content-Type"] = "application/json"
        try:
            response = self._send(method, path, payload, headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # The server let an idle keep-alive connection go; inference has no side effects.
            self._conn.close()
            response = self._send(method, path, payload, headers)
        raw = response.read()
        if response.status >= 400:
            raise ServeError(response.status, error_message(response, raw))
        return orjson.loads(raw)

    def _send(self, method: str, path: str, payload: bytes | None, headers: dict[str, str]
              ) -> http.client.HTTPResponse:
        self._conn.request(method, path, payload, headers)
        return self._conn.getresponse()
