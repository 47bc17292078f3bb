"""The KServe v2 inference protocol (REST): a raw ASGI app under uvicorn with httptools.

Endpoints: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{task}[/versions/{v}][/ready],
/metrics, /openapi.json (`edgecl.serve.openapi`); POST /v2/models/{task}[/versions/{v}]/infer
(messages: `edgecl.serve.kserve`).
Errors are `{"error": "..."}` with a 4xx status for anything the client got wrong; no input can
end the server.

The HTTP stack is `edgecl.web`'s. No web framework on top: routing is a regex. onnxruntime runs
on a pool of `inference_threads` threads, so health probes and small requests are answered
while a long batch runs; only a small request (at most `inline_max_values` input values) to a
model that has never taken over INLINE_MAX_S runs inline on the event loop, since handing a
microsecond inference to a thread and back costs more than the inference itself. A request
holds at most `max_batch` rows (413 beyond). After a burst of large requests the freed memory
is handed back to the OS.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from edgecl import __version__
from edgecl.serve.guard import RangeGuard
from edgecl.serve.kserve import (
    BINARY_HEADER,
    InferRequest,
    encode_response,
    metadata,
    parse_request,
)
from edgecl.serve.metrics import ServerMetrics
from edgecl.serve.models import LiveModels
from edgecl.serve.openapi import OPENAPI
from edgecl.serve.runtime import LoadedModel
from edgecl.web import (
    HEAD_TIMEOUT_S,
    MAX_CONNECTIONS,
    HTTPServer,
    Receive,
    RequestError,
    Response,
    Send,
    authorize,
    error_response,
    off_loop,
    read_body,
    release_freed_memory,
    send_response,
)

log = logging.getLogger("edgecl.serve")
MODEL_URL = re.compile(r"/v2/models/(?P<task>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                       r"(?P<action>/infer|/ready)?")
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # probes need no token
_BINARY_KEY = BINARY_HEADER.lower().encode()  # ASGI header names are lower-case bytes
DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_MAX_BATCH = 1024  # rows per request
INLINE_MAX_VALUES = 16_384  # input values of a request that may run on the event loop...
INLINE_MAX_S = 0.002  # ...unless its model once took longer than this there: never again
TRIM_AFTER_BYTES = 1 << 20  # a request body this large or larger: memory handed back after
TRIM_QUIET_S = 1.0  # ... once no such request came for this long
_OPENAPI = orjson.dumps(OPENAPI)


def _json(obj: Any) -> bytes:
    return orjson.dumps(obj)


class InferenceApp:
    """The ASGI application: routes, auth, body limits, metrics; models come from `models`."""

    def __init__(self, models: LiveModels, metrics: ServerMetrics, token: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 guard: RangeGuard | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 inference_threads: int = 1, inline_max_values: int = INLINE_MAX_VALUES
                 ) -> None:
        if max_batch < 1 or inference_threads < 1:
            raise ValueError("max_batch and inference_threads must be at least 1")
        self.models = models
        self.metrics = metrics
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.guard = guard or RangeGuard()
        self.max_batch = max_batch
        self.inline_max_values = inline_max_values  # 0: every inference off the loop
        self._inference = ThreadPoolExecutor(inference_threads, "edgecl-infer")
        self._slow: weakref.WeakSet[LoadedModel] = weakref.WeakSet()  # never inline again
        self._trim: asyncio.TimerHandle | None = None

    def close(self) -> None:
        """Let the inference threads go once the requests running on them are done."""
        self._inference.shutdown(wait=False)

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
        if len(body) >= TRIM_AFTER_BYTES:
            self._trim_when_quiet()
        model = self._model(url["task"], url["version"])
        json_length = headers.get(_BINARY_KEY)
        request = await off_loop(body, lambda: parse_request(
            body, json_length and json_length.decode("latin-1"), model.manifest.input,
            self.max_batch))
        self._check_range(model, request.x)
        if request.x.size <= self.inline_max_values and model not in self._slow:
            t0 = time.perf_counter()
            payload, json_part = self._infer(model, request)
            if time.perf_counter() - t0 > INLINE_MAX_S:
                self._slow.add(model)
        else:
            payload, json_part = await asyncio.get_running_loop().run_in_executor(
                self._inference, self._infer, model, request)
        if json_part is None:
            return Response(200, payload)
        return Response(200, payload, "application/octet-stream",
                        ((_BINARY_KEY, str(json_part).encode()),))

    def _infer(self, model: LoadedModel, request: InferRequest) -> tuple[bytes, int | None]:
        """Run and encode (on an inference thread, but for small requests to fast models)."""
        t0 = time.perf_counter()
        logits = model.infer(request.x)
        self.metrics.inference(model.manifest.task, time.perf_counter() - t0)
        return encode_response(model.manifest, logits, request)

    def _trim_when_quiet(self) -> None:
        """Hand freed memory back to the OS TRIM_QUIET_S after the last large request."""
        loop = asyncio.get_running_loop()
        if self._trim is not None:
            self._trim.cancel()
        self._trim = loop.call_later(TRIM_QUIET_S, loop.run_in_executor, None,
                                     release_freed_memory)

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
    """The inference app served by uvicorn; `run()` also hot-reloads the repository.
    Connection limits: `edgecl.web.HTTPServer`'s, counted in the app's metrics."""

    def __init__(self, app: InferenceApp, host: str = "127.0.0.1", port: int = 8080,
                 tls: tuple[Path, Path] | None = None,
                 max_connections: int = MAX_CONNECTIONS, max_per_client: int | None = None,
                 head_timeout_s: float = HEAD_TIMEOUT_S) -> None:
        super().__init__(app, host, port, tls, max_connections, max_per_client,
                         head_timeout_s)
        self.app = app
        self.models = app.models
        self.metrics = app.metrics
        self.metrics.watch_connections(self.guard.counts)

    def run(self, poll_s: float) -> None:
        """Serve, hot-reloading the repository every `poll_s` seconds, until `shutdown()`."""
        self.models.start_polling(poll_s)
        try:
            self.serve()
        finally:
            self.models.stop()
            self.app.close()
