"""What the two Python clients (`edgecl.serve.client`, `edgecl.daemon.client`) share: one
keep-alive HTTP connection from a URL, and errors that carry the server's status and message."""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

import orjson


class StatusError(RuntimeError):
    """The server answered with an error status; `status` is the HTTP code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def connection(url: str, timeout_s: float) -> http.client.HTTPConnection:
    """A (lazily connecting) keep-alive connection to `url`, which must be http://HOST[:PORT]."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected a URL like http://127.0.0.1:8080, got {url!r}")
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)


def error_message(response: http.client.HTTPResponse, body: bytes) -> str:
    """The `{"error": ...}` an edgecl (or KServe) server sent, else the status's reason."""
    try:
        return orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return response.reason
