"""The KServe v2 inference protocol (REST): a raw ASGI app under uvicorn with httptools.

Endpoints: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{task}[/versions/{v}][/ready],
/metrics, /openapi.json (`edgecl.serve.openapi`); POST /v2/models/{task}[/versions/{v}]/infer
(messages: `edgecl.serve.kserve`).
Errors are `{"error": "..."}` with a 4xx status for anything the client got wrong; no input can
end the server.

The HTTP stack is `edgecl.web`'s. No web framework on top: routing is a regex, and onnxruntime
runs inline on the loop (microseconds for the models here; a much heavier model would want
worker processes).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import orjson

from edgecl import __version__
from edgecl.serve.guard import RangeGuard
from edgecl.serve.kserve import BINARY_HEADER, encode_response, metadata, parse_request
from edgecl.serve.metrics import ServerMetrics
from edgecl.serve.models import LiveModels
from edgecl.serve.openapi import OPENAPI
from edgecl.serve.runtime import LoadedModel
from edgecl.web import (
    HTTPServer,
    Receive,
    RequestError,
    Response,
    Send,
    authorize,
    error_response,
    off_loop,
    read_body,
    send_response,
)

log = logging.getLogger("edgecl.serve")
MODEL_URL = re.compile(r"/v2/models/(?P<task>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                       r"(?P<action>/infer|/ready)?")
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # probes need no token
_BINARY_KEY = BINARY_HEADER.lower().encode()  # ASGI header names are lower-case bytes
DEFAULT_MAX_BODY_BYTES = 8 << 20
_OPENAPI = orjson.dumps(OPENAPI)


def _json(obj: Any) -> bytes:
    return orjson.dumps(obj)


class InferenceApp:
    """The ASGI application: routes, auth, body limits, metrics; models come from `models`."""

    def __init__(self, models: LiveModels, metrics: ServerMetrics, token: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 guard: RangeGuard | None = None) -> None:
        self.models = models
        self.metrics = metrics
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.guard = guard or RangeGuard()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        t0 = time.perf_counter()
        method, path = scope["method"], scope["path"]
        headers = dict(scope["headers"])
        url = MODEL_URL.fullmatch(path)
        try:
            if path not in OPEN_PATHS:
                authorize(self.token, headers)
            if method == "GET":
                response = self._get(path, url)
            elif method == "POST":
                response = await self._post(path, url, headers, receive)
            else:
                allow = "POST" if url and url["action"] == "/infer" else "GET"
                raise RequestError(405, f"method {method} not allowed; use {allow}", close=True,
                                   headers=((b"allow", allow.encode()),))
        except RequestError as e:
            response = error_response(e)
        except Exception:
            log.exception("%s %s failed", method, path)
            response = Response(500, _json({"error": "internal error; see the log"}))
        await send_response(send, response)
        if method == "POST":  # labelled by task only for tasks served, not any name asked for
            task = url["task"] if url and self.models.get(url["task"]) else ""
            self.metrics.request(task, response.status, time.perf_counter() - t0)

    def _get(self, path: str, url: re.Match[str] | None) -> Response:
        models = self.models.all()
        if path == "/v2/health/live":
            return Response(200, _json({"live": True}))
        if path == "/v2/health/ready":
            return Response(200 if models else 503, _json({"ready": bool(models)}))
        if path == "/v2":
            return Response(200, _json({"name": "edgecl", "version": __version__,
                                        "extensions": ["binary_tensor_data"]}))
        if path == "/metrics":
            return Response(200, self.metrics.render(), self.metrics.content_type)
        if path == "/openapi.json":
            return Response(200, _OPENAPI)
        if url is None or url["action"] == "/infer":
            raise RequestError(404, f"no such endpoint: GET {path}")
        model = self._model(url["task"], url["version"])
        if url["action"] == "/ready":
            return Response(200, _json({"name": url["task"], "ready": True}))
        return Response(200, _json(metadata(model.manifest)))

    async def _post(self, path: str, url: re.Match[str] | None, headers: dict[bytes, bytes],
                    receive: Receive) -> Response:
        if url is None or url["action"] != "/infer":
            raise RequestError(404, f"no such endpoint: POST {path}", close=True)
        body = await read_body(headers, receive, self.max_body_bytes)
        model = self._model(url["task"], url["version"])
        json_length = headers.get(_BINARY_KEY)
        request = await off_loop(body, lambda: parse_request(
            body, json_length and json_length.decode("latin-1"), model.manifest.input))
        self._check_range(model, request.x)
        t0 = time.perf_counter()
        logits = model.infer(request.x)
        self.metrics.inference(model.manifest.task, time.perf_counter() - t0)
        payload, json_part = encode_response(model.manifest, logits, request)
        if json_part is None:
            return Response(200, payload)
        return Response(200, payload, "application/octet-stream",
                        ((_BINARY_KEY, str(json_part).encode()),))

    def _check_range(self, model: LoadedModel, x: Any) -> None:
        problem = self.guard.problem(model.manifest, x)
        if problem is None:
            return
        self.metrics.out_of_range(model.manifest.task)
        if self.guard.mode == "reject":
            raise RequestError(400, problem)
        self.guard.warn(model.manifest.task, problem)

    def _model(self, task: str, version: str | None) -> LoadedModel:
        model = self.models.get(task)
        if model is None:
            serving = sorted(self.models.all())
            names = ", ".join(serving[:20]) + (", ..." if len(serving) > 20 else "")
            raise RequestError(404, f"unknown task {task!r}; serving: {names or 'none yet'}")
        if version is not None and version != str(model.version):
            raise RequestError(404, f"task {task!r} serves version {model.version}, "
                                    f"not {version!r}")
        return model


class InferenceServer(HTTPServer):
    """The inference app served by uvicorn; `run()` also hot-reloads the repository."""

    def __init__(self, app: InferenceApp, host: str = "127.0.0.1", port: int = 8080,
                 tls: tuple[Path, Path] | None = None) -> None:
        super().__init__(app, host, port, tls)
        self.app = app
        self.models = app.models
        self.metrics = app.metrics

    def run(self, poll_s: float) -> None:
        """Serve, hot-reloading the repository every `poll_s` seconds, until `shutdown()`."""
        self.models.start_polling(poll_s)
        try:
            self.serve()
        finally:
            self.models.stop()
