"""The daemon's HTTP API (`edgecl.web`'s stack): ingest, control, status, metrics, OpenAPI.

POST /v1/samples             JSON, NDJSON or the binary form (`edgecl.daemon.schema`) -> 202
                             {"first_seq", "count"} once durable (an `Idempotency-Key` header
                             or a request_id seen before: the first answer, "duplicate": true,
                             nothing journaled again); 429 + Retry-After when the
                             learner lags; 4xx naming the field for a bad sample. An end of
                             task (`{"end_task", "samples"}`) is taken here too
POST /v1/tasks/{task}/end    journal an end-of-task marker (consolidation happens there), with
                             `{"samples": n}` once n samples of the task are in; 202
                             {"first_seq", "count", "duplicate"}
POST /v1/tasks/{task}/export export the task's model now (needs --repo)
POST /v1/checkpoint          checkpoint now;  POST /v1/evaluate: held-out accuracy now
GET  /v1/fleet/share         the learner's weights for a fleet round (edgecl.fleet.wire)
POST /v1/fleet/aggregate     the fleet's aggregate to take: 202 {"seq", "sha256"} once journaled
GET  /v1/status, /v1/schema (what a sample must look like), /healthz, /readyz, /metrics,
     /openapi.json
With a token every endpoint but /healthz needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from edgecl.daemon.daemon import ADMISSION_ERRORS, Daemon
from edgecl.daemon.openapi import openapi
from edgecl.daemon.schema import EndTask, SampleError, Samples, check_request_id, end_body
from edgecl.fleet import wire
from edgecl.web import (
    Receive,
    RequestError,
    Response,
    Send,
    authorize,
    error_response,
    json_response,
    off_loop,
    read_body,
    send_response,
)

log = logging.getLogger("edgecl.learn")
TASK_URL = re.compile(r"/v1/tasks/(?P<task>[^/]+)/(?P<action>end|export)")
OPEN_PATHS = frozenset({"/healthz"})
FLEET_CALLS = frozenset({("GET", "/v1/fleet/share"), ("POST", "/v1/fleet/aggregate")})


class IngestApp:
    """The ASGI app of `edgecl learn`."""

    def __init__(self, daemon: Daemon, token: str | None = None) -> None:
        self.daemon = daemon
        self.token = token
        self.max_body_bytes = int(daemon.cfg.learn.max_body_mb * (1 << 20))
        self.openapi = orjson.dumps(openapi(daemon.schema, daemon.cfg.learn.max_request_samples))
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(daemon))

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        try:
            if path not in OPEN_PATHS:
                authorize(self.token, dict(scope["headers"]))
            if (method, path) in FLEET_CALLS:
                response = await self._fleet(path, dict(scope["headers"]), receive)
            elif method == "GET":
                response = self._get(path)
            elif method == "POST":
                response = await self._post(path, dict(scope["headers"]), receive)
            else:
                raise RequestError(405, f"method {method} not allowed", close=True,
                                   headers=((b"allow", b"GET, POST"),))
        except RequestError as e:
            response = error_response(e)
        except Exception:
            log.exception("%s %s failed", method, path)
            response = json_response(500, {"error": "internal error; see the log"})
        await send_response(send, response)

    def _get(self, path: str) -> Response:
        d = self.daemon
        if path == "/healthz":
            return json_response(200, {"live": True})
        if path == "/readyz":
            return json_response(200 if d.ready else 503, {"ready": d.ready})
        if path == "/v1/status":
            return json_response(200, d.status())
        if path == "/v1/schema":
            return json_response(200, d.schema.to_dict())
        if path == "/metrics":
            return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        if path == "/openapi.json":
            return Response(200, self.openapi)
        raise RequestError(404, f"no such endpoint: GET {path}")

    async def _fleet(self, path: str, headers: dict[bytes, bytes], receive: Receive
                     ) -> Response:
        """A fleet round's two calls (edgecl.fleet.client): the device's share, and the
        aggregate to take (202 once it is journaled)."""
        d = self.daemon
        try:
            if path == "/v1/fleet/share":
                share = await asyncio.to_thread(d.fleet_share)
                return Response(200, share, wire.MEDIA_TYPE)
            body = await read_body(headers, receive, self.max_body_bytes)
            return json_response(202, await asyncio.to_thread(d.take_aggregate, body))
        except SampleError as e:
            raise RequestError(e.status, str(e)) from None
        except ADMISSION_ERRORS as e:
            raise self._refused(e) from None
        except RuntimeError as e:  # the learning thread is not running
            raise RequestError(503, str(e)) from None
        except TimeoutError:
            raise RequestError(503, "the learner or the journal did not answer in time; an "
                               "aggregate sent may still be journaled and taken") from None

    async def _post(self, path: str, headers: dict[bytes, bytes], receive: Receive
                    ) -> Response:
        d = self.daemon
        if path == "/v1/samples":
            body = await read_body(headers, receive, self.max_body_bytes)
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            try:
                message = await off_loop(body, lambda: d.parse(body, content_type))
                message = with_idempotency_key(message, headers.get(b"idempotency-key"))
            except SampleError as e:
                raise self._refused(e) from None
            return await self._accept(lambda: d.submit(message))
        body = await read_body(headers, receive, 1 << 16)
        url = TASK_URL.fullmatch(path)
        if url and url["action"] == "end":
            try:
                end = end_body(url["task"], body)
            except SampleError as e:
                raise self._refused(e) from None
            return await self._accept(lambda: d.submit(end))
        if url:
            return await self._on_learner(lambda: d.export(url["task"]) or
                                          {"queued": url["task"]}, 202)
        if path == "/v1/checkpoint":
            return await self._on_learner(d.checkpoint, 200)
        if path == "/v1/evaluate":
            return await self._on_learner(lambda: {"accuracy": d.evaluate()}, 200)
        raise RequestError(404, f"no such endpoint: POST {path}")

    async def _accept(self, journal: Callable[[], Future[Any]]) -> Response:
        """Validate + journal; 202 once durable, or the 4xx/429/5xx that says why not."""
        try:
            appended = await asyncio.wrap_future(journal())
        except ADMISSION_ERRORS as e:
            raise self._refused(e) from None
        return json_response(202, appended.answer())

    def _refused(self, error: Exception) -> RequestError:
        refusal = self.daemon.refusal(error)
        if refusal.retry_after_s is None:
            return RequestError(refusal.status, refusal.message)
        retry = str(max(1, round(refusal.retry_after_s))).encode()
        return RequestError(refusal.status, refusal.message, headers=((b"retry-after", retry),))

    async def _on_learner(self, fn: Callable[[], Any], status: int) -> Response:
        try:
            result = await asyncio.wrap_future(self.daemon.call(fn))
        except SampleError as e:
            raise RequestError(e.status, str(e)) from None
        except RuntimeError as e:
            raise RequestError(503, str(e)) from None
        return json_response(status, result)


def with_idempotency_key(message: Samples | EndTask, key: bytes | None) -> Samples | EndTask:
    """The samples with the request id an `Idempotency-Key` header gives (an end needs none:
    a repeated end is answered as one already)."""
    if key is None or isinstance(message, EndTask):
        return message
    request_id = check_request_id(key.decode("latin-1"), "Idempotency-Key")
    if message.request_id not in (None, request_id):
        raise SampleError(f"Idempotency-Key {request_id!r} and the body's request_id "
                          f"{message.request_id!r} differ")
    return dataclasses.replace(message, request_id=request_id)


class DaemonCollector:
    """Prometheus metrics read from the daemon's status at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Any:
        s = self.daemon.status()
        for name, help_text in (("accepted", "Samples journaled and acknowledged."),
                                ("learned", "Samples consumed by the learner (trained or held "
                                            "out)."),
                                ("trained", "Samples trained on."),
                                ("rejected", "Samples or requests refused by validation."),
                                ("skipped_steps", "Training steps not applied: their loss, "
                                                  "gradients or new weights were not finite."),
                                ("rehearsal_steps", "Memory steps taken while ingest was idle "
                                                    "(learn.rehearse_steps) and after fleet "
                                                    "aggregates (learn.fleet_rehearse_steps).")):
            yield CounterMetricFamily(f"edgecl_learn_{name}", help_text, value=s[name])
        events = CounterMetricFamily("edgecl_learn_ingest_events", "Ingest sources' events "
                                     "beside samples (connections refused or closed idle, MQTT "
                                     "connections refused or lost).", labels=["event"])
        for event, n in s["ingest_events"].items():
            events.add_metric([event], n)
        yield events
        lag = GaugeMetricFamily("edgecl_learn_journal_lag", "Journal records not yet learned.")
        lag.add_metric([], s["journal"]["lag"])
        yield lag
        ready = GaugeMetricFamily("edgecl_learn_ready", "1 once restore and replay are done.")
        ready.add_metric([], int(s["ready"]))
        yield ready
        accuracy = GaugeMetricFamily("edgecl_learn_task_accuracy", "Held-out accuracy now.",
                                     labels=["task"])
        learned = GaugeMetricFamily("edgecl_learn_task_accuracy_when_learned",
                                    "Held-out accuracy right after the task was learned.",
                                    labels=["task"])
        for task, t in s["tasks"].items():  # task ids: at most max_tasks, all journaled
            if t["accuracy"] is not None:
                accuracy.add_metric([task], t["accuracy"])
            if t["accuracy_when_learned"] is not None:
                learned.add_metric([task], t["accuracy_when_learned"])
        yield accuracy
        yield learned
        corrupt = CounterMetricFamily("edgecl_learn_corrupt_checkpoints",
                                      "Checkpoints refused at restore (sha256 or load).",
                                      value=s["corrupt_checkpoints"])
        yield corrupt
        yield CounterMetricFamily("edgecl_learn_lost", "Acknowledged records that storage "
                                  "damage destroyed before they were learned.", value=s["lost"])
        yield CounterMetricFamily("edgecl_learn_missing", "Numbered senders' messages that "
                                  "never arrived: dropped on the way (a broker's queue limit) "
                                  "or refused.", value=s["missing"])
        fleet = CounterMetricFamily("edgecl_learn_fleet_aggregates", "Fleet aggregates "
                                    "journaled and taken, or failed (their file gone or "
                                    "damaged); tasks an aggregate held that found no free "
                                    "task slot (unplaced).", labels=["outcome"])
        for outcome in ("taken", "failed", "unplaced"):
            fleet.add_metric([outcome], s["fleet"][outcome])
        yield fleet
        yield CounterMetricFamily("edgecl_learn_duplicates", "Requests answered as already "
                                  "journaled (a request id or a sender's number seen before) "
                                  "since start.", value=s["journal"]["duplicates"])
        yield CounterMetricFamily("edgecl_learn_journal_write_failures", "Journal commits "
                                  "refused by storage (a full disk, I/O errors) since start.",
                                  value=s["journal"]["write_failures"])
        yield CounterMetricFamily("edgecl_learn_checkpoint_failures", "Checkpoints that could "
                                  "not be written since start.",
                                  value=s["checkpoint_failures"])
        yield CounterMetricFamily("edgecl_learn_disk_reserve_used", "Times the space reserve "
                                  "was given up for a checkpoint on a full disk since start.",
                                  value=s["disk"]["reserve_used"])
        yield GaugeMetricFamily("edgecl_learn_disk_reserve_bytes", "Disk space held back for "
                                "checkpoints on a full disk (0: none is held).",
                                value=s["disk"]["reserve_bytes"])
